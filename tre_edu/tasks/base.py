"""The task protocol shared by Countdown, MATH and HH, the tasks' option table, and data helpers.

Plain Python (no torch): ``tre_edu.config`` imports this module to validate ``task.options``.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

PROMPT_STYLES = ("chat", "plain", "compact")


class Task(ABC):
    """Turns examples into prompts and scores responses.

    - ``load(split, n, seed, offline_ok)``: example dicts, each with ``"source"`` (hub id, ``"bundled"`` or
      ``"generated"``) so every run can say what data it used.
    - ``prompt`` styles: ``"chat"`` (the paper's prompt in the chat template), ``"plain"`` (the paper's prompt as
      raw text) or ``"compact"`` (a short prompt for the tiny CPU model).
    - ``score(response, example)``: a float reward; never raises on malformed model output.
    - ``success_threshold``: success = score >= it (``None``: no notion of success, e.g. HH's reward-model scores).
    - ``last_reward_stats``: counters of the last :meth:`reward` call for the trainer's metrics.
    """

    name: str = "task"
    style: str = "plain"
    success_threshold: float | None = 1.0
    last_reward_stats: dict[str, float] = {}

    @abstractmethod
    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]: ...

    def user_text(self, example: dict[str, Any], style: str) -> str:
        raise NotImplementedError

    def messages(self, example: dict[str, Any], user_text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": user_text}]

    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str | None = None) -> str:
        """:meth:`user_text`; for ``style="chat"``, :meth:`messages` in the tokenizer's chat template (if it has one)
        with the generation prompt."""
        style = self.check_style(style or self.style)
        text = self.user_text(example, style)
        if style != "chat" or not getattr(tokenizer, "chat_template", None):
            return text
        return tokenizer.apply_chat_template(self.messages(example, text), tokenize=False, add_generation_prompt=True)

    def prompts(self, examples: list[dict[str, Any]], tokenizer: Any = None, style: str | None = None) -> list[str]:
        return [self.prompt(e, tokenizer, style) for e in examples]

    @abstractmethod
    def score(self, response: str, example: dict[str, Any]) -> float: ...

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        """Score a batch (tasks that grade in batches override this)."""
        check_batch(responses, examples)
        return [float(self.score(r, e)) for r, e in zip(responses, examples)]

    def sample_metrics(self, texts: list[str], rewards: list[float], n: int) -> dict[str, float]:
        """Task-specific metrics of ``n`` consecutive samples per example (none by default)."""
        return {}

    @staticmethod
    def check_style(style: str) -> str:
        return check_choice("prompt style", style, PROMPT_STYLES)


def check_choice(name: str, value: Any, allowed: Iterable, context: str = "") -> Any:
    """``value``; ValueError "NAME must be one of A, B{context}; got VALUE" when it is not in ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}{context}; got {value!r}")
    return value


def check_batch(responses: list, examples: list) -> None:
    if len(responses) != len(examples):
        raise ValueError(f"responses and examples must have the same length; got {len(responses)} and {len(examples)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_of(*values: Any) -> tuple[Any, str]:
    return (lambda v: not isinstance(v, bool) and v in values), "one of " + ", ".join(map(str, values))


_BOOL = (lambda v: isinstance(v, bool)), "true or false"
_POS_INT = (lambda v: _is_int(v) and v >= 1), "an integer >= 1"
_SECONDS = (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf), "a number > 0"
_TEXT = (lambda v: v is None or isinstance(v, str)), "a string or null"
_RANGE = (
    (lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) for x in v) and 0 <= v[0] <= v[1]),
    "a [low, high] pair of integers with 0 <= low <= high",
)

# task name -> option -> (check, allowed values in words). The task constructors check with this table too.
OPTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "countdown": {
        "num_count": _one_of(3, 4),
        "number_range": _RANGE,
        "target_range": _RANGE,
        "think": _BOOL,
        "style": _one_of(*PROMPT_STYLES),
    },
    "math": {
        "dataset": _one_of("lighteval", "math500"),
        "hub_id": _TEXT,
        "use_math_verify": _BOOL,
        "timeout_s": _SECONDS,
        "batch_timeout_s": _SECONDS,
        "workers": _POS_INT,
    },
    "hh": {
        "source": _one_of("ultrafeedback", "hh-rlhf"),
        "reward_model": ((lambda v: True), "a path / hub id or a reward model"),
        "batch_size": _POS_INT,
        "rm_max_length": ((lambda v: _is_int(v) and v >= 2), "an integer >= 2"),
        "hub_id": _TEXT,
        "shuffle_seed": (_is_int, "an integer"),
        "n_train": _POS_INT,
        "n_test": _POS_INT,
    },
}


def check_options(name: str, options: dict[str, Any], prefix: str = "task.options.") -> dict[str, Any]:
    """Raise ValueError naming ``task.options.<key>`` and the allowed keys / values; return ``options``."""
    spec = OPTIONS[check_choice("task", name, OPTIONS)]
    for key, value in options.items():
        if key not in spec:
            raise ValueError(f"unknown option {prefix}{key}; {name} options are: {', '.join(spec)}")
        check, allowed = spec[key]
        if not check(value):
            raise ValueError(f"{prefix}{key} must be {allowed}; got {value!r}")
    return options


def load_or_fallback(what: str, load: Callable[[], Any], instead: str, fallback: Callable[[], Any], offline_ok: bool):
    """``load()``; when it fails, a warning and ``fallback()`` if ``offline_ok``, else RuntimeError."""
    try:
        return load()
    except Exception as err:  # offline, no cache, a renamed dataset, ...
        reason = f"{type(err).__name__}: {str(err)[:200]}"
        if not offline_ok:
            raise RuntimeError(
                f"could not load {what} ({reason}); connect to the Hugging Face hub (unset HF_DATASETS_OFFLINE) "
                f"or pass offline_ok=True to fall back to {instead}"
            ) from err
        warnings.warn(
            f"could not load {what} ({reason}); offline: falling back to {instead}, NOT comparable with the paper",
            UserWarning,
            stacklevel=3,
        )
        return fallback()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (a path, or a file bundled in ``tre_edu/data/``); a line that is not UTF-8 or not a JSON
    object raises ValueError naming the file and line."""
    file = Path(path) if Path(path).is_file() else resources.files("tre_edu").joinpath("data", str(path))
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{file}: line {line} is not UTF-8 ({err.reason} at byte {err.start})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def subsample(rows: list, n: int | None, seed: int) -> list:
    """All ``rows`` when ``n`` is None or >= len(rows); else ``n`` rows drawn without replacement (seeded)."""
    if n is not None and (not _is_int(n) or n < 1):
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in random.Random(seed).sample(range(len(rows)), n)]
