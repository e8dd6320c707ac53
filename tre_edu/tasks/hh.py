"""HH: preference alignment scored by a learned reward model.

Two data sources (``source=``); every example and :meth:`HHTask.describe` say which one was used:

- ``"ultrafeedback"``: ``trl-lib/ultrafeedback_binarized``, the data the paper's code used: its ``train`` split
  shuffled with seed 42, the first 7,500 rows our train split, the next 5,000 our test split. ``chosen`` /
  ``rejected`` are message lists; the prompt is the conversation before the last assistant turn.
- ``"hh-rlhf"``: ``Anthropic/hh-rlhf`` (its own train / test splits), transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` cut at the LAST ``"\\n\\nAssistant:"`` (:func:`split_transcript`).

Example: ``{"prompt": messages ending with a user turn, "prompt_text": str, "chosen": str, "rejected": str,
"source": hub id or "bundled", "dataset": "ultrafeedback" | "hh-rlhf"}``; offline, small bundled samples.
Reward: a scalar reward model r(prompt, response); :func:`tre_edu.pipeline.train_reward_model` makes one.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from tre_edu.reward_model import RewardModel, valid_text
from tre_edu.tasks.base import Task, check_batch, check_choice, check_options, load_or_fallback, read_jsonl, subsample

SOURCES = {"ultrafeedback": "trl-lib/ultrafeedback_binarized", "hh-rlhf": "Anthropic/hh-rlhf"}
BUNDLED_FILES = {"ultrafeedback": "ultrafeedback_sample.jsonl", "hh-rlhf": "hh_sample.jsonl"}
ULTRAFEEDBACK_SHUFFLE_SEED = 42  # the paper's split (module docstring)
ULTRAFEEDBACK_N_TRAIN = 7500
ULTRAFEEDBACK_N_TEST = 5000
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_transcript(text: str) -> tuple[str, str]:
    """``(prompt, response)`` of an hh-rlhf transcript cut at its LAST ``"\\n\\nAssistant:"``: the prompt keeps the
    earlier turns and ends with ``"\\n\\nAssistant:"``; ValueError without a Human turn before that."""
    if not isinstance(text, str):
        raise ValueError(f"transcript must be a string; got {type(text).__name__}")
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError(f"malformed transcript: no {ASSISTANT!r} turn in {text[:80]!r}")
    if text.find(HUMAN, 0, cut) < 0:
        raise ValueError(f"malformed transcript: no {HUMAN!r} turn before the last Assistant turn in {text[:80]!r}")
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :].strip()


def transcript_to_messages(prompt: str) -> list[dict[str, str]]:
    """A :func:`split_transcript` prompt as chat messages, without the trailing empty ``"Assistant:"``."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
    parts = _TURN.split(prompt)  # [before the first marker, name1, text1, name2, text2, ...]
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"malformed transcript: must start with '\\n\\nHuman:'; got {prompt[:80]!r}")
    messages = [
        {"role": "user" if name == "Human" else "assistant", "content": content.strip()}
        for name, content in zip(parts[1::2], parts[2::2])
    ]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "user":
        raise ValueError(f"malformed transcript: turns must start and end with Human; got {prompt[:80]!r}")
    return messages


def prompt_as_text(prompt: str | Sequence[dict[str, str]]) -> str:
    """Plain text of a prompt given as text or as a message list (contents joined by blank lines)."""
    return prompt if isinstance(prompt, str) else "\n\n".join(str(m.get("content", "")) for m in prompt)


def _hh_side(transcript: Any, field: str) -> tuple[list[dict[str, str]], str, str]:
    prompt, response = split_transcript(transcript)
    return transcript_to_messages(prompt), prompt.lstrip("\n"), response


def _ultrafeedback_side(messages: Any, field: str) -> tuple[list[dict[str, str]], str, str]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{field} must be a non-empty list of messages")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise ValueError(f"the last message of {field} must be an assistant turn")
    prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages[:-1]]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError(f"{field} must contain a user turn before the assistant turn")
    return prompt, prompt_as_text(prompt), str(last["content"])


def _convert(rows: Any, source_key: str, source: str) -> list[dict[str, Any]]:
    """Rows ``{chosen, rejected}`` (transcripts or message lists) as examples; malformed rows are skipped, warned."""
    side = _hh_side if source_key == "hh-rlhf" else _ultrafeedback_side
    out, bad = [], []
    for i, row in enumerate(rows):
        try:
            row = dict(row)
            *prompt, chosen = side(row["chosen"], "chosen")
            *prompt_r, rejected = side(row["rejected"], "rejected")
            if prompt_r != prompt:
                raise ValueError("chosen and rejected have different prompts")
            scores = {k: row[k] for k in ("score_chosen", "score_rejected") if k in row}
            ex = dict(prompt=prompt[0], prompt_text=prompt[1], chosen=chosen, rejected=rejected, source=source)
            out.append({**ex, "dataset": source_key, **scores})
        except (ValueError, KeyError, TypeError) as err:
            bad.append(f"row {i}: {type(err).__name__}: {err}")
    if bad:
        msg = f"skipped {len(bad)} malformed {source_key} row(s) from {source} (first: {bad[0][:200]})"
        warnings.warn(msg, UserWarning, stacklevel=3)
    return out


def bundled_examples(source: str, split: str | None = None) -> list[dict[str, Any]]:
    """The hand-written sample for ``source`` (optionally one split); ``source="bundled"`` in each example."""
    check_options("hh", {"source": source}, prefix="")
    rows = [r for r in read_jsonl(BUNDLED_FILES[source]) if split is None or r.get("split") == split]
    return _convert(rows, source, "bundled")


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
    """HH preference examples of ``split`` ("train" / "test"), a seeded random subset of ``n`` of them (``None``:
    all). ``hub_id``: another hub id, or a local directory / JSONL file (rows as on the hub); on a loading failure,
    with ``offline_ok``: the bundled sample."""
    check_options("hh", dict(source=source, shuffle_seed=shuffle_seed, n_train=n_train, n_test=n_test), prefix="")
    check_choice("split", split, ("train", "test"))
    hub, uf = hub_id or SOURCES[source], source == "ultrafeedback"
    local = None
    if Path(hub).is_file():  # a local JSONL file: its errors name the file and line; hh-rlhf rows carry "split"
        local = [r for r in read_jsonl(hub) if uf or r.get("split") == split]

    def from_hub():  # UltraFeedback: both of our splits come from the hub's train split (the paper's code)
        if local is not None:
            return datasets.Dataset.from_list(local), hub
        return datasets.load_dataset(hub, split="train" if uf else split), hub

    rows, where = load_or_fallback(
        f"HH data {hub!r} (source={source!r}) split {split!r}",
        from_hub,
        f"the small bundled {source} sample tre_edu/data/{BUNDLED_FILES[source]} (source='bundled')",
        lambda: (bundled_examples(source, split), "bundled"),
        offline_ok,
    )
    if uf and where != "bundled":
        if n_train + n_test > len(rows):
            raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(rows)} rows of the dataset")
        start, stop = (0, n_train) if split == "train" else (n_train, n_train + n_test)
        rows = rows.shuffle(seed=shuffle_seed).select(range(start, stop))
    examples = rows if where == "bundled" else _convert(rows, source, hub)
    if not examples:
        raise ValueError(f"{hub} split {split!r} has no usable rows (source={source!r})")
    return subsample(examples, n, seed)


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


@dataclass(eq=False)
class HHTask(Task):
    """Preference alignment: reward = a reward model's score of (prompt, response).

    ``reward_model``: a :class:`~tre_edu.reward_model.RewardModel`, an object with ``score(prompts, responses)``
    (prompts are message lists), a callable with that signature, or a path / hub id (loaded with ``rm_max_length``
    tokens); may be set later. ``batch_size``: responses per reward-model call; the rest is passed to :func:`load`."""

    source: str = "ultrafeedback"
    reward_model: Any = None
    _: KW_ONLY
    batch_size: int = 16
    rm_max_length: int = 1024
    hub_id: str | None = None
    shuffle_seed: int = ULTRAFEEDBACK_SHUFFLE_SEED
    n_train: int = ULTRAFEEDBACK_N_TRAIN
    n_test: int = ULTRAFEEDBACK_N_TEST
    loaded_from: str | None = field(default=None, init=False)  # hub id or "bundled", set by load()

    name = "hh"
    success_threshold = None  # reward-model scores: no notion of success

    def __post_init__(self):
        check_options("hh", {k: v for k, v in vars(self).items() if k != "loaded_from"}, prefix="")
        if self.reward_model is not None:
            self.reward_model = _resolve_reward_model(self.reward_model, self.rm_max_length)

    def load(
        self, split: str = "train", n: int | None = None, seed: int = 0, offline_ok: bool = True
    ) -> list[dict[str, Any]]:
        options = {k: getattr(self, k) for k in ("source", "hub_id", "shuffle_seed", "n_train", "n_test")}
        examples = load(split, n=n, offline_ok=offline_ok, seed=seed, **options)
        self.loaded_from = examples[0]["source"]
        return examples

    def user_text(self, example: dict[str, Any], style: str) -> str:
        if "prompt_text" not in example or "prompt" not in example:
            raise ValueError("example must have 'prompt' (messages) and 'prompt_text' fields (see tre_edu.tasks.hh)")
        return example["prompt_text"]

    def messages(self, example: dict[str, Any], user_text: str) -> list[dict[str, str]]:
        return example["prompt"]  # the whole conversation

    def reward(self, responses: list[str], examples: list[dict[str, Any]]) -> list[float]:
        """Reward-model scores, ``batch_size`` responses per call (a non-str response is scored as "", text UTF-8
        cannot encode as ``?``)."""
        check_batch(responses, examples)
        if self.reward_model is None:
            raise ValueError(
                "HHTask needs a reward model: make_task(reward_model=PATH or RewardModel) or set task.reward_model "
                "(train one with tre_edu.pipeline.train_reward_model)"
            )
        if not responses:
            return []
        if missing := [i for i, e in enumerate(examples) if not isinstance(e, dict) or "prompt" not in e]:
            raise ValueError(f"HH example {missing[0]} has no 'prompt' field (messages or text; see tre_edu.tasks.hh)")
        prompts = [e["prompt"] for e in examples]
        texts = [valid_text(r) if isinstance(r, str) else "" for r in responses]
        self.reward_model = rm = _resolve_reward_model(self.reward_model, self.rm_max_length)  # set later: a path
        fn = rm.score if hasattr(rm, "score") else rm
        b = self.batch_size
        if _accepts_batch_size(fn):  # e.g. RewardModel.score: it batches (and sorts by length) itself
            scores = list(fn(prompts, texts, batch_size=b))
        else:
            scores = [s for i in range(0, len(texts), b) for s in fn(prompts[i : i + b], texts[i : i + b])]
        if len(scores) != len(texts):
            raise ValueError(f"reward model returned {len(scores)} scores for {len(texts)} responses")
        return [float(s) for s in scores]

    def score(self, response: str, example: dict[str, Any]) -> float:
        return self.reward([response], [example])[0]

    def describe(self) -> str:
        hub = self.hub_id or SOURCES[self.source]
        used = "" if self.loaded_from is None else f"; loaded from {self.loaded_from!r}"
        rm = "none set" if self.reward_model is None else type(self.reward_model).__name__
        split = ", hub train / test splits"
        if self.source == "ultrafeedback":
            split = f", hub train split shuffled (seed {self.shuffle_seed}): {self.n_train} train, {self.n_test} test"
        return f"HH, source={self.source} ({hub}{split}){used}; reward = reward model ({rm})"


def corpus(examples: list[dict[str, Any]]) -> list[str]:
    """The text of every pair (prompt, chosen, rejected): the vocabulary corpus of a tiny reward model."""
    return [f"{prompt_as_text(e['prompt'])} {e['chosen']} {e['rejected']}" for e in examples]


def score(response: str, reward_model: Any = None, **example: Any) -> float:
    """Reward of one response under ``reward_model``: ``score(response, reward_model=rm, **example)``."""
    if reward_model is None:
        raise ValueError("hh.score needs reward_model= (a RewardModel or an object with score(prompts, responses))")
    return HHTask(source=example.get("dataset", "ultrafeedback"), reward_model=reward_model).score(response, example)


make_task = HHTask  # what tre_edu.tasks.get_task("hh", **options) calls
