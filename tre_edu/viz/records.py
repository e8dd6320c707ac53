"""Run histories in one normal form, and the recorded runs on disk (summary.json, metrics.jsonl, config.yaml).

A history is a list of metric dicts as the trainer makes them (``trainer.history``: one dict per PPO step, no
``"step"``; ``trainer.eval_history``: dicts with ``"step"``) or as ``metrics.jsonl`` stores them (one list, each
record with ``"step"``; evaluation records carry ``"kind": "eval"``).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tre_edu.env import repo_root
from tre_edu.regularizers import ENTROPY_KINDS  # the kinds whose coefficient weighs an entropy

# Config fields that tell runs apart in labels (when they differ between the runs being compared).
_LABEL_FIELDS = (
    ("regularizer.coef", "α"),
    ("regularizer.k", "K"),
    ("regularizer.p", "p"),
    ("model.tail_tokens", "tail"),
    ("task.options.num_count", "numbers"),
    ("task.options.think", "think"),
    ("ppo.max_new_tokens", "T"),
)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def last_value(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The last finite ``key`` of ``records``, or None."""
    return next((float(rec[key]) for rec in reversed(records) if finite(rec.get(key))), None)


@dataclass
class RecordedRun:
    """One finished run on disk: ``summary`` (``summary.json`` of :func:`tre_edu.pipeline.run_training`),
    ``history`` (training records of ``metrics.jsonl``, each with ``"step"``), ``eval_history`` (its
    ``"kind": "eval"`` records), ``config`` (``config.yaml`` as a dict, {} when absent) and ``path``."""

    name: str
    path: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The regulariser kind (``summary["regularizer"]``, else the config's, else ``"?"``)."""
        return str(self.summary.get("regularizer") or self.config.get("regularizer", {}).get("kind") or "?")

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", self.config.get("seed"))
        return int(seed) if isinstance(seed, (int, float)) else None

    def final_eval(self, key: str = "eval/greedy_accuracy") -> float | None:
        """The last evaluation's ``key`` (from ``eval_history``, else ``summary["eval_final"]``)."""
        return last_value([self.summary.get("eval_final", {}), *self.eval_history], key)  # read from the end


class RecordedRuns(dict):
    """``name -> RecordedRun`` (sorted by name) with ``path``, ``readme`` (the directory's README.md text or
    None) and ``commands`` (the fenced code blocks of the README: the commands that made the runs)."""

    def __init__(self, runs: Mapping[str, RecordedRun], path: Path, readme: str | None):
        super().__init__(runs)
        self.path, self.readme = path, readme
        self.commands = re.findall(r"```[a-zA-Z]*\n(.*?)```", readme or "", flags=re.S)


def _split_records(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of one history; a training record without ``"step"`` gets its
    1-based position among the training records (``trainer.history`` has no step key)."""
    train, evals = [], []
    for rec in records:
        if not isinstance(rec, Mapping):
            raise ValueError(f"a history must be a list of metric dicts; got an item of type {type(rec).__name__}")
        if rec.get("kind") == "eval":
            evals.append(dict(rec))
        else:
            train.append({"step": len(train) + 1, **rec})
    return train, evals


def normalize_run(run: Any, name: str = "run") -> tuple[list[dict], list[dict]]:
    """``(history, eval_history)``, every record with a ``"step"``, of a :class:`RecordedRun`, a trainer, a dict
    with ``"history"`` (and ``"eval_history"`` or ``"trainer"``: :func:`tre_edu.pipeline.run_training`'s result, a
    :attr:`LiveDashboard.runs` entry) or a list of metric dicts (``trainer.history``, a ``metrics.jsonl``)."""
    if isinstance(run, RecordedRun):
        return list(run.history), list(run.eval_history)
    if hasattr(run, "history") and hasattr(run, "eval_history") and not isinstance(run, Mapping):
        return _split_records(run.history)[0], [dict(e) for e in run.eval_history]
    if isinstance(run, Mapping) and "history" in run:
        train, evals = _split_records(run["history"])
        extra = run["eval_history"] if "eval_history" in run else getattr(run.get("trainer"), "eval_history", [])
        return train, evals + [dict(e) for e in extra]
    if isinstance(run, Sequence) and not isinstance(run, (str, bytes)):
        return _split_records(run)
    raise ValueError(
        f"runs[{name!r}] must be a history (list of metric dicts), a dict with 'history', a RecordedRun or a "
        f"trainer; got {type(run).__name__}"
    )


def is_single_run(obj: Any) -> bool:
    """A list is several runs (seeds) when its items are runs, one history when its items are records."""
    if isinstance(obj, (RecordedRun, Mapping)) or not isinstance(obj, Sequence) or not obj:
        return True
    return isinstance(obj[0], Mapping) and "history" not in obj[0]


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and finite values of ``key`` (records without it, or with a non-finite value, are skipped)."""
    pairs = [(float(r["step"]), float(r[key])) for r in records if finite(r.get(key))]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _read_jsonl(file: Path) -> list[dict]:
    records = []
    for i, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{file}:{i}: not a JSON line, skipped", stacklevel=3)
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def _resolve(path: str | Path) -> Path:
    """``path`` as given, else relative to the repository root (so ``data/...`` works from notebooks/)."""
    p = Path(path)
    if not (p.exists() or p.is_absolute()):
        with contextlib.suppress(FileNotFoundError):  # outside a checkout
            p = repo_root() / p if (repo_root() / p).exists() else p
    return p


def load_recorded_runs(path: str | Path = "data/countdown_runs") -> RecordedRuns:
    """Every directory under ``path`` with a ``summary.json`` (and optional ``metrics.jsonl``, ``config.yaml``) as a
    :class:`RecordedRun` named by its path relative to ``path``. A missing ``path`` gives no runs, never an error;
    a relative one that does not exist here is looked up from the repository root."""
    root = _resolve(path)
    readme = (root / "README.md").read_text() if (root / "README.md").is_file() else None
    runs: dict[str, RecordedRun] = {}
    for summary_file in sorted(root.rglob("summary.json")) if root.is_dir() else []:
        run_dir = summary_file.parent
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError as err:
            warnings.warn(f"{summary_file}: not valid JSON ({err}); run skipped", stacklevel=2)
            continue
        metrics, config = run_dir / "metrics.jsonl", run_dir / "config.yaml"
        train, evals = _split_records(_read_jsonl(metrics) if metrics.is_file() else [])
        config_dict = (yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}
        name = str(run_dir.relative_to(root)) if run_dir != root else root.name
        runs[name] = RecordedRun(name, run_dir, summary, train, evals, config_dict)
    return RecordedRuns(runs, root, readme)


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, Mapping) else None
    return d


def group_runs(runs: Mapping[str, RecordedRun]) -> dict[str, list[RecordedRun]]:
    """Group recorded runs that differ only by seed: the label is the method plus every setting of
    :data:`_LABEL_FIELDS` that varies between the runs (e.g. ``"tre-k α=0.001 tail=20000"``); the coefficient
    only for the entropy-type methods. A ``"label"`` in a run's summary wins."""
    runs = list(runs.values())
    varying = [
        (key, short)
        for key, short in _LABEL_FIELDS
        if len({json.dumps(_get(r.config, key), sort_keys=True) for r in runs}) > 1
    ]
    groups: dict[str, list[RecordedRun]] = {}
    for r in runs:
        label = r.summary.get("label")
        if not label:
            parts = [r.method]
            for key, short in varying:
                value = _get(r.config, key)
                if value is None or (key.startswith("regularizer.") and r.method not in ENTROPY_KINDS):
                    continue
                parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
            label = " ".join(parts)
        groups.setdefault(str(label), []).append(r)
    return groups
