"""HH: preference alignment scored by a learned reward model.

Two data sources (``source=``), and every example and :meth:`HHTask.describe` say which one was used:

- ``"ultrafeedback"``: ``trl-lib/ultrafeedback_binarized``, the data the paper's code really used. Its
  ``train`` split is shuffled with seed 42; the first 7,500 rows are our train split, the next 5,000 our
  test split.
  ``chosen`` / ``rejected`` are message lists; the prompt is the conversation before the last assistant turn
  (one user turn in practice).
- ``"hh-rlhf"``: ``Anthropic/hh-rlhf``, the dataset the paper's task name refers to; its own train / test
  splits. ``chosen`` / ``rejected`` are transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``;
  :func:`split_transcript` cuts them at the LAST ``"\\n\\nAssistant:"`` (earlier turns stay in the prompt).

Example dict: ``{"prompt": [{"role", "content"}, ...] (turns before the response, ends with a user turn),
"prompt_text": str (the plain-text prompt), "chosen": str, "rejected": str, "source": hub id or "bundled",
"dataset": "ultrafeedback" | "hh-rlhf"}``. Offline, the loader warns and uses small hand-written samples
bundled with the package.

Reward: a scalar reward model r(prompt, response) (:class:`tre_edu.reward_model.RewardModel`, or any object
with ``score(prompts, responses) -> list[float]``), scored in batches. :func:`train_reward_model` makes one
(``tre-edu train-rm``).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from tre_edu.config import RewardModelConfig
from tre_edu.reward_model import RewardModel, build_tiny_reward_model, fit, pair_accuracy, valid_text
from tre_edu.tasks.base import Task, check_batch, check_options, read_jsonl, subsample

SOURCES = {
    "ultrafeedback": "trl-lib/ultrafeedback_binarized",
    "hh-rlhf": "Anthropic/hh-rlhf",
}
BUNDLED_FILES = {"ultrafeedback": "ultrafeedback_sample.jsonl", "hh-rlhf": "hh_sample.jsonl"}
# The paper's UltraFeedback split: hub train split, shuffled (seed 42); first 7,500 train, next 5,000 test.
ULTRAFEEDBACK_SHUFFLE_SEED = 42
ULTRAFEEDBACK_N_TRAIN = 7500
ULTRAFEEDBACK_N_TEST = 5000

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


# ----------------------------------------------------------------------------------------------------
# Transcripts
# ----------------------------------------------------------------------------------------------------


def split_transcript(text: str) -> tuple[str, str]:
    """Split an hh-rlhf transcript at its LAST ``"\\n\\nAssistant:"`` into ``(prompt, response)``.

    The prompt keeps every earlier turn and ends with ``"\\n\\nAssistant:"`` (so a model continues it); the
    response is the final assistant text without its leading space. Raises ``ValueError`` if ``text`` is not a
    string, has no ``"\\n\\nAssistant:"`` turn, or has no ``"\\n\\nHuman:"`` turn before it.
    """
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string; got {type(text).__name__}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"malformed transcript: no '\\n\\nAssistant:' turn in {text[:80]!r}")
    if text.find(HUMAN, 0, cut) < 0:
        raise ValueError(
            f"malformed transcript: no '\\n\\nHuman:' turn before the last Assistant turn in {text[:80]!r}"
        )
    end = cut + len(ASSISTANT)
    return text[:end], text[end:].strip()


def transcript_to_messages(prompt: str) -> list[dict[str, str]]:
    """An hh-rlhf prompt (as returned by :func:`split_transcript`) as chat messages ``[{"role", "content"}]``.

    The trailing empty ``"Assistant:"`` is dropped, so the list ends with the user turn to be answered.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    parts = _TURN.split(prompt)
    # parts = [before-first-marker, name1, text1, name2, text2, ...]
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"malformed transcript: must start with '\\n\\nHuman:'; got {prompt[:80]!r}")
    messages = []
    for name, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if name == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise ValueError(f"malformed transcript: turns must start and end with Human; got {prompt[:80]!r}")
    return messages


def prompt_as_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """Plain text of a prompt given as text or as a message list (contents joined by blank lines)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m.get("content", "")) for m in prompt)


# ----------------------------------------------------------------------------------------------------
# Row -> example
# ----------------------------------------------------------------------------------------------------


def _from_hh_row(row: dict[str, Any], source: str) -> dict[str, Any]:
    prompt, chosen = split_transcript(row["chosen"])
    prompt_r, rejected = split_transcript(row["rejected"])
    if prompt_r != prompt:
        raise ValueError("chosen and rejected transcripts have different prompts")
    return {
        "prompt": transcript_to_messages(prompt),
        "prompt_text": prompt.lstrip("\n"),
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "dataset": "hh-rlhf",
    }


def _split_messages(messages: Any, field: str) -> tuple[list[dict[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{field} must be a non-empty list of messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise ValueError(f"the last message of {field} must be an assistant turn")
    prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:-1]]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"{field} must contain a user turn before the assistant turn")
    return prompt, str(last["content"])


def _from_ultrafeedback_row(row: dict[str, Any], source: str) -> dict[str, Any]:
    prompt, chosen = _split_messages(row["chosen"], "chosen")
    prompt_r, rejected = _split_messages(row["rejected"], "rejected")
    if prompt_r != prompt:
        raise ValueError("chosen and rejected conversations have different prompts")
    ex = {
        "prompt": prompt,
        "prompt_text": prompt[-1]["content"] if len(prompt) == 1 else prompt_as_text(prompt),
        "chosen": chosen,
        "rejected": rejected,
        "source": source,
        "dataset": "ultrafeedback",
    }
    for key in ("score_chosen", "score_rejected"):
        if key in row:
            ex[key] = row[key]
    return ex


def _convert(rows: Any, source_key: str, source: str) -> list[dict[str, Any]]:
    convert = _from_hh_row if source_key == "hh-rlhf" else _from_ultrafeedback_row
    out, bad = [], []
    for i, row in enumerate(rows):
        try:
            out.append(convert(dict(row), source))
        except (ValueError, KeyError, TypeError) as err:
            bad.append(f"row {i}: {type(err).__name__}: {err}")
    if bad:
        msg = f"skipped {len(bad)} malformed {source_key} row(s) from {source} (first: {bad[0][:200]})"
        warnings.warn(msg, UserWarning, stacklevel=3)
    return out


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def bundled_examples(source: str, split: str | None = None) -> list[dict[str, Any]]:
    """The hand-written sample for ``source`` (optionally one split); ``source="bundled"`` in each example."""
    check_options("hh", {"source": source}, prefix="")
    rows = [r for r in read_jsonl(BUNDLED_FILES[source]) if split is None or r.get("split") == split]
    return _convert(rows, source, "bundled")


def ultrafeedback_split_indices(
    n_rows: int | None, split: str, *, shuffle_seed: int, n_train: int, n_test: int
) -> tuple[int, int]:
    """``(start, stop)`` of ``split`` in the shuffled hub train split (paper: 0-7,500, 7,500-12,500); ``n_rows=None``
    checks the arguments only."""
    check_options("hh", dict(shuffle_seed=shuffle_seed, n_train=n_train, n_test=n_test), prefix="")
    if n_rows is not None and n_train + n_test > n_rows:
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {n_rows} rows of the dataset")
    return (0, n_train) if split == "train" else (n_train, n_train + n_test)


def load(
    split: str = "train",
    n: int | None = None,
    offline_ok: bool = True,
    seed: int = 0,
    *,
    source: str = "ultrafeedback",
    hub_id: str | None = None,
    shuffle_seed: int = ULTRAFEEDBACK_SHUFFLE_SEED,
    n_train: int = ULTRAFEEDBACK_N_TRAIN,
    n_test: int = ULTRAFEEDBACK_N_TEST,
) -> list[dict[str, Any]]:
    """HH preference examples (see the module docstring for the fields).

    Args:
        split: ``"train"`` or ``"test"``.
        n: a seeded random subset of ``n`` examples of the split (``None``: all of it).
        offline_ok: on any loading failure warn and use the bundled sample instead of raising.
        seed: seed of the subset drawn when ``n`` is given.
        source: ``"ultrafeedback"`` (paper's code) or ``"hh-rlhf"``.
        hub_id: override the Hugging Face id, or a local directory / JSONL file (rows as on the hub).
        shuffle_seed, n_train, n_test: UltraFeedback only: the paper's split (42, 7,500, 5,000).
    """
    check_options("hh", {"source": source}, prefix="")
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of train, test; got {split!r}")
    hub = hub_id or SOURCES[source]
    if source == "ultrafeedback":  # check the split sizes before touching the network
        ultrafeedback_split_indices(None, split, shuffle_seed=shuffle_seed, n_train=n_train, n_test=n_test)
    local = None
    if Path(hub).is_file():  # a local JSONL file: its errors name the file and line; hh-rlhf rows carry "split"
        local = [r for r in read_jsonl(hub) if source == "ultrafeedback" or r.get("split") == split]
    try:
        if local is not None:
            ds = datasets.Dataset.from_list(local)
        else:  # UltraFeedback: both of our splits come from the hub's train split (the paper's code).
            ds = datasets.load_dataset(hub, split="train" if source == "ultrafeedback" else split)
    except Exception as err:
        if not offline_ok:
            raise RuntimeError(
                f"could not load HH data {hub!r} (source={source!r}) split {split!r}: "
                f"{type(err).__name__}: {err}. Connect to the Hugging Face hub (unset HF_DATASETS_OFFLINE) "
                "or pass offline_ok=True to use the small bundled sample."
            ) from err
        warnings.warn(
            f"could not load {hub!r} ({type(err).__name__}: {str(err)[:200]}); falling back to the "
            f"small bundled {source} sample tre_edu/data/{BUNDLED_FILES[source]} (source='bundled'). "
            "Results on it are NOT comparable with the paper.",
            UserWarning,
            stacklevel=2,
        )
        return subsample(bundled_examples(source, split), n, seed)
    if source == "ultrafeedback":
        start, stop = ultrafeedback_split_indices(
            len(ds), split, shuffle_seed=shuffle_seed, n_train=n_train, n_test=n_test
        )
        ds = ds.shuffle(seed=shuffle_seed).select(range(start, stop))
    examples = _convert(ds, source, hub)
    if not examples:
        raise ValueError(f"{hub} split {split!r} has no usable rows (source={source!r})")
    return subsample(examples, n, seed)


# ----------------------------------------------------------------------------------------------------
# Task
# ----------------------------------------------------------------------------------------------------


def _resolve_reward_model(reward_model: Any, max_length: int) -> Any:
    if isinstance(reward_model, str):  # FileNotFoundError "reward model not found: PATH; make it with ..."
        return RewardModel.from_pretrained(reward_model, max_length=max_length)
    if not (hasattr(reward_model, "score") or callable(reward_model)):
        raise ValueError(
            "reward_model must be a path / hub id, a RewardModel, or an object with "
            f"score(prompts, responses); got {type(reward_model).__name__}"
        )
    return reward_model


def _accepts_batch_size(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "batch_size" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class HHTask(Task):
    """Preference alignment: reward = a reward model's score of (prompt, response).

    Args:
        source: ``"ultrafeedback"`` (default, what the paper's code used) or ``"hh-rlhf"``.
        reward_model: a :class:`~tre_edu.reward_model.RewardModel`, any object with
            ``score(prompts, responses) -> list[float]`` (prompts are message lists), a callable with the same
            signature, or a path / hub id (loaded on first use). May be set later: ``task.reward_model =
            ...``.
        batch_size: responses per reward-model forward pass.
        rm_max_length: token budget when the reward model is loaded from a path.
        hub_id, shuffle_seed, n_train, n_test: passed to :func:`load`.
    """

    name = "hh"
    success_threshold = None  # reward-model scores: no notion of success

    def __init__(
        self,
        source: str = "ultrafeedback",
        reward_model: Any = None,
        *,
        batch_size: int = 16,
        rm_max_length: int = 1024,
        hub_id: str | None = None,
        shuffle_seed: int = ULTRAFEEDBACK_SHUFFLE_SEED,
        n_train: int = ULTRAFEEDBACK_N_TRAIN,
        n_test: int = ULTRAFEEDBACK_N_TEST,
    ):
        options = dict(source=source, batch_size=batch_size, rm_max_length=rm_max_length, hub_id=hub_id)
        check_options("hh", dict(options, shuffle_seed=shuffle_seed, n_train=n_train, n_test=n_test), prefix="")
        self.source = source
        self.batch_size = batch_size
        self.rm_max_length = rm_max_length
        self.hub_id = hub_id
        self.shuffle_seed = shuffle_seed
        self.n_train = n_train
        self.n_test = n_test
        self._reward_model = None if reward_model is None else _resolve_reward_model(reward_model, rm_max_length)
        self.loaded_from: str | None = None  # hub id or "bundled", set by load()

    @property
    def reward_model(self) -> Any:
        return self._reward_model

    @reward_model.setter
    def reward_model(self, value: Any) -> None:
        self._reward_model = None if value is None else _resolve_reward_model(value, self.rm_max_length)

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        examples = load(
            split,
            n=n,
            offline_ok=offline_ok,
            seed=seed,
            source=self.source,
            hub_id=self.hub_id,
            shuffle_seed=self.shuffle_seed,
            n_train=self.n_train,
            n_test=self.n_test,
        )
        if examples:
            self.loaded_from = examples[0]["source"]
        return examples

    def prompt(self, example: dict[str, Any], tokenizer: Any = None, style: str = "plain") -> str:
        """``"chat"``: the prompt turns in the tokenizer's chat template (with the generation prompt; plain
        text when the tokenizer has no template); ``"plain"`` / ``"compact"``: ``example["prompt_text"]``."""
        self.check_style(style)
        if "prompt_text" not in example or "prompt" not in example:
            raise ValueError("example must have 'prompt' (messages) and 'prompt_text' fields (see tre_edu.tasks.hh)")
        if style == "chat" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        return example["prompt_text"]

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        """Reward-model scores, ``batch_size`` responses per forward pass (a non-str response is scored as "",
        text UTF-8 cannot encode as ``?``)."""
        check_batch(responses, examples)
        if self._reward_model is None:
            raise ValueError(
                "HHTask needs a reward model: make_task(reward_model=PATH or RewardModel) or set "
                "task.reward_model "
                "(train one with tre_edu.reward_model.train_reward_model)"
            )
        if not responses:
            return []
        missing = [i for i, e in enumerate(examples) if not isinstance(e, dict) or "prompt" not in e]
        if missing:
            raise ValueError(f"HH example {missing[0]} has no 'prompt' field (messages or text; see tre_edu.tasks.hh)")
        prompts = [e["prompt"] for e in examples]
        texts = [valid_text(r) if isinstance(r, str) else "" for r in responses]
        rm = self._reward_model
        fn = rm.score if hasattr(rm, "score") else rm
        if _accepts_batch_size(fn):  # e.g. RewardModel.score: it batches (and sorts by length) itself
            scores = list(fn(prompts, texts, batch_size=self.batch_size))
        else:  # a plain scorer: batch here
            scores = []
            for i in range(0, len(texts), self.batch_size):
                scores += list(fn(prompts[i : i + self.batch_size], texts[i : i + self.batch_size]))
        if len(scores) != len(texts):
            raise ValueError(f"reward model returned {len(scores)} scores for {len(texts)} responses")
        return [float(s) for s in scores]

    def score(self, response: str, example: dict[str, Any]) -> float:
        return self.reward([response], [example])[0]

    def describe(self) -> str:
        hub = self.hub_id or SOURCES[self.source]
        used = "" if self.loaded_from is None else f"; loaded from {self.loaded_from!r}"
        rm = "none set" if self._reward_model is None else type(self._reward_model).__name__
        split = ", hub train / test splits"
        if self.source == "ultrafeedback":
            split = f", hub train split shuffled (seed {self.shuffle_seed}): {self.n_train} train, {self.n_test} test"
        return f"HH, source={self.source} ({hub}{split}){used}; reward = reward model ({rm})"


def tiny_reward_model(source: str | None = None, *, max_length: int = 256, seed: int = 0) -> RewardModel:
    """:func:`~tre_edu.reward_model.build_tiny_reward_model` with the words of the bundled samples (one source or
    both) as its vocabulary: an untrained CPU reward model for tests and notebooks."""
    examples = [e for s in ([source] if source else SOURCES) for e in bundled_examples(s)]
    return build_tiny_reward_model(_texts(examples), max_length=max_length, seed=seed)


def _texts(examples: list[dict[str, Any]]) -> list[str]:  # vocabulary corpus of a tiny reward model
    return [f"{prompt_as_text(e['prompt'])} {e['chosen']} {e['rejected']}" for e in examples]


def train_reward_model(cfg: RewardModelConfig, offline_ok: bool = True) -> dict[str, Any]:
    """``tre-edu train-rm``: train ``cfg.model`` on the ``cfg.source`` preference pairs
    (:func:`tre_edu.reward_model.fit`, TRL's RewardTrainer) and report the pair accuracy (r_chosen > r_rejected)."""
    task = HHTask(source=cfg.source)
    train = task.load("train", n=cfg.n_train, seed=cfg.seed, offline_ok=offline_ok)
    test = task.load("test", n=cfg.n_test, seed=cfg.seed, offline_ok=offline_ok)
    model = None
    if cfg.model == "tiny":  # the vocabulary covers the test pairs' words too
        model = build_tiny_reward_model(_texts(train + test), max_length=min(cfg.max_length, 1024), seed=cfg.seed)
    rm = fit(train, cfg, model)
    return {
        "source": train[0]["source"],
        "dataset": train[0]["dataset"],
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": pair_accuracy(rm, train),
        "test_accuracy": pair_accuracy(rm, test),
        "final_loss": rm.history[-1]["loss"] if rm.history else float("nan"),
        "output_dir": cfg.output_dir,
    }


def score(response: str, reward_model: Any = None, **example: Any) -> float:
    """Reward of one response under ``reward_model``: ``score(response, reward_model=rm, **example)``."""
    if reward_model is None:
        raise ValueError("hh.score needs reward_model= (a RewardModel or an object with score(prompts, responses))")
    return HHTask(source=example.get("dataset", "ultrafeedback"), reward_model=reward_model).score(response, example)


make_task = HHTask  # tre_edu.tasks.get_task(name, **options) calls tre_edu.tasks.<name>.make_task(**options)


__all__ = [
    "SOURCES",
    "HHTask",
    "bundled_examples",
    "load",
    "make_task",
    "prompt_as_text",
    "score",
    "split_transcript",
    "tiny_reward_model",
    "train_reward_model",
    "transcript_to_messages",
    "ultrafeedback_split_indices",
]
