"""The task protocol shared by Countdown, MATH and HH, the tasks' option table, and JSONL / subset helpers.

Plain Python (no torch): ``tre_edu.config`` imports this module to validate ``task.options``.
"""

from __future__ import annotations

import json
import math
import random
from abc import ABC, abstractmethod
from importlib import resources
from pathlib import Path
from typing import Any

PROMPT_STYLES = ("chat", "plain", "compact")


class Task(ABC):
    """A task turns examples into prompts and scores responses.

    Subclasses set ``name`` and implement :meth:`load`, :meth:`prompt` and :meth:`score`.

    - ``load(split, n, seed, offline_ok)`` returns a list of example dicts; each records ``"source"``
      (the hub dataset id, ``"bundled"`` or ``"generated"``) so every run can say what data it used.
    - ``prompt(example, tokenizer, style)`` returns the prompt text. ``style`` is ``"chat"`` (the paper's prompt in
      the tokenizer's chat template), ``"plain"`` (the paper's prompt as raw text) or ``"compact"`` (a short prompt
      for the tiny CPU model).
    - ``score(response, example)`` returns a float reward and never raises on malformed model output.
    - ``success_threshold``: a response succeeds when its score >= this (accuracy = fraction of successes);
      ``None`` for tasks without a notion of success (HH's reward-model scores).
    - ``last_reward_stats``: counters of the last :meth:`reward` call for the trainer's metrics, e.g.
      ``{"reward/grader_timeouts": 2.0}`` (tasks assign a new dict; empty when there is nothing to report).
    """

    name: str = "task"
    success_threshold: float | None = 1.0
    last_reward_stats: dict[str, float] = {}

    @abstractmethod
    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]: ...

    @abstractmethod
    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str = "plain") -> str: ...

    @abstractmethod
    def score(self, response: str, example: dict[str, Any]) -> float: ...

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        """Score a batch. Tasks with a learned reward model override this to score in batches."""
        check_batch(responses, examples)
        return [float(self.score(r, e)) for r, e in zip(responses, examples)]

    def prompts(self, examples: list[dict[str, Any]], tokenizer: Any = None, style: str | None = None) -> list[str]:
        return [self.prompt(e, tokenizer, style) if style is not None else self.prompt(e, tokenizer) for e in examples]

    @staticmethod
    def check_style(style: str) -> str:
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
        return style


def check_batch(responses: list, examples: list) -> None:
    if len(responses) != len(examples):
        raise ValueError(f"responses and examples must have the same length; got {len(responses)} and {len(examples)}")


def apply_chat_template(tokenizer: Any, user_text: str) -> str:
    """The user's message in the tokenizer's chat template with the generation prompt (falls back to plain text)."""
    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        return user_text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


# ----------------------------------------------------------------------------------------------------
# Options of each task (checked when a config is validated, before anything is built)
# ----------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _one_of(*values: Any) -> tuple[Any, str]:
    return (lambda v: not isinstance(v, bool) and v in values), "one of " + ", ".join(map(str, values))


_BOOL = (lambda v: isinstance(v, bool)), "true or false"
_POS_INT = (lambda v: _is_int(v) and v >= 1), "an integer >= 1"
_INT = _is_int, "an integer"
_SECONDS = (lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf), "a number > 0"
_TEXT = (lambda v: v is None or isinstance(v, str)), "a string or null"
_RANGE = (
    (lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) for x in v) and 0 <= v[0] <= v[1]),
    "a [low, high] pair of integers with 0 <= low <= high",
)

# task name -> option -> (check, allowed values in words). make_task / the constructors check with this table too.
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
        "shuffle_seed": _INT,
        "n_train": _POS_INT,
        "n_test": _POS_INT,
    },
}


def check_options(name: str, options: dict[str, Any], prefix: str = "task.options.") -> dict[str, Any]:
    """Raise ValueError naming ``task.options.<key>`` and the allowed keys / values; return ``options``."""
    if name not in OPTIONS:
        raise ValueError(f"task must be one of {', '.join(OPTIONS)}; got {name!r}")
    spec = OPTIONS[name]
    for key, value in options.items():
        if key not in spec:
            raise ValueError(f"unknown option {prefix}{key}; {name} options are: {', '.join(spec)}")
        check, allowed = spec[key]
        if not check(value):
            raise ValueError(f"{prefix}{key} must be {allowed}; got {value!r}")
    return options


# ----------------------------------------------------------------------------------------------------
# Data helpers
# ----------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file: a path, or the name of a file bundled in ``tre_edu/data/``.

    A file that is not UTF-8 or a line that is not a JSON object raises ValueError naming the file and line.
    """
    file = Path(path) if Path(path).is_file() else resources.files("tre_edu").joinpath("data", str(path))
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[: err.start].count(b"\n") + 1
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
    if n is None:
        return list(rows)
    if not _is_int(n) or n < 1:
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if n >= len(rows):
        return list(rows)
    idx = random.Random(seed).sample(range(len(rows)), n)
    return [rows[i] for i in idx]
