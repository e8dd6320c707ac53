"""Training visualisation: a live PPO dashboard, run comparisons, a launcher panel (no training logic here).

- :class:`LiveDashboard`: a :class:`~tre_edu.trainer.Callback` that draws the metrics of one or several runs
  into a plotly ``FigureWidget`` (reward, held-out accuracy, global / TRE entropy, the vocabulary tail, PPO
  health, response length), updated in place (``batch_update``) every ``every`` steps. Without a notebook
  front end it simply records (``.runs``).
- :func:`comparison_figure`: several methods side by side: final held-out accuracy (bars, error bars over
  seeds), accuracy and tail-mass curves.
- :func:`load_recorded_runs`: the recorded longer runs of ``data/countdown_runs/`` (``summary.json``,
  ``metrics.jsonl``, ``config.yaml`` per run, a ``README.md`` with the command that made them).
- :class:`RunLauncher`: sliders for method, coefficient, K, p, tail size and steps; a "Train" button that runs
  a short PPO job (:func:`tre_edu.pipeline.run_training`) with a live dashboard.

Histories are lists of metric dicts as the trainer makes them (``trainer.history``: one dict per PPO step;
``trainer.eval_history``: dicts with ``"step"``) or as ``metrics.jsonl`` stores them (one list, each record
with ``"step"``; evaluation records carry ``"kind": "eval"``).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tre_edu.trainer import Callback
from tre_edu.viz.figures import TEMPLATE

__all__ = [
    "DASHBOARD_PANELS",
    "FAST_OVERRIDES",
    "METHODS",
    "METHOD_COLORS",
    "LiveDashboard",
    "Panel",
    "RecordedRun",
    "RecordedRuns",
    "RunLauncher",
    "Series",
    "comparison_figure",
    "comparison_table",
    "group_runs",
    "load_recorded_runs",
    "normalize_run",
]

# The methods of the paper's comparison (clip-cov is a sibling of KL-Cov, available in the library).
METHODS = ("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov")
METHOD_COLORS = {
    "none": "#444444",  # vanilla PPO: dark grey
    "entropy": "#d62728",  # red: the global entropy bonus (as in notebooks 01 / 02)
    "tre-k": "#1f77b4",  # blue
    "tre-p": "#2ca02c",  # green
    "forking": "#9467bd",  # purple
    "kl-cov": "#ff7f0e",  # orange
    "clip-cov": "#8c564b",  # brown
}
_PALETTE = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39")

# Tiny sizes for TRE_EDU_FAST=1 (notebooks under `pytest --nbmake`, tests): seconds instead of minutes.
# threads=1: one torch thread (a busy 2-core machine runs the tiny model far faster single-threaded).
FAST_OVERRIDES = (
    "threads=1",
    "model.tail_tokens=300",
    "model.n_embd=32",
    "model.n_layer=1",
    "model.n_head=2",
    "sft.steps=5",
    "sft.batch_size=32",
    "sft.examples=256",
    "sft.eval_every=5",
    "ppo.steps=2",
    "ppo.prompts_per_step=4",
    "ppo.samples_per_prompt=4",
    "ppo.minibatch_size=8",
    "ppo.micro_batch_size=8",
    "ppo.max_new_tokens=16",
    "task.train_size=64",
    "task.eval_size=8",
    "eval.every=0",
    "eval.sampled=false",
    "eval.batch_size=8",
    "device=cpu",
)


# ---------------------------------------------------------------------------------------------------------
# Histories: one normal form for trainer histories, metrics.jsonl records and recorded runs
# ---------------------------------------------------------------------------------------------------------
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
        for rec in reversed(self.eval_history):
            if _finite(rec.get(key)):
                return float(rec[key])
        value = self.summary.get("eval_final", {}).get(key)
        return float(value) if _finite(value) else None


class RecordedRuns(dict):
    """``name -> RecordedRun`` (sorted by name) with ``path``, ``readme`` (the directory's README.md text or
    None) and ``commands`` (the fenced code blocks of the README: the commands that made the runs)."""

    def __init__(self, runs: Mapping[str, RecordedRun], path: Path, readme: str | None):
        super().__init__(runs)
        self.path = path
        self.readme = readme
        self.commands = re.findall(r"```[a-zA-Z]*\n(.*?)```", readme or "", flags=re.S)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
            r = dict(rec)
            r.setdefault("step", len(train) + 1)
            train.append(r)
    return train, evals


def normalize_run(run: Any, name: str = "run") -> tuple[list[dict], list[dict]]:
    """``(history, eval_history)`` of one run given as any of:

    - a :class:`RecordedRun`, a :class:`~tre_edu.trainer.PPOTrainer` (``.history`` / ``.eval_history``);
    - a dict with ``"history"`` (and ``"eval_history"`` or a ``"trainer"``, e.g. the result of
      :func:`tre_edu.pipeline.run_training` or a :attr:`LiveDashboard.runs` entry);
    - a list of metric dicts (``trainer.history`` or the records of a ``metrics.jsonl``).

    Every record of both lists has a ``"step"``.
    """
    if isinstance(run, RecordedRun):
        return list(run.history), list(run.eval_history)
    if hasattr(run, "history") and hasattr(run, "eval_history") and not isinstance(run, Mapping):
        train, _ = _split_records(run.history)
        return train, [dict(e) for e in run.eval_history]
    if isinstance(run, Mapping) and "history" in run:
        train, evals = _split_records(run["history"])
        if "eval_history" in run:
            evals = evals + [dict(e) for e in run["eval_history"]]
        elif run.get("trainer") is not None:
            evals = evals + [dict(e) for e in run["trainer"].eval_history]
        return train, evals
    if isinstance(run, Sequence) and not isinstance(run, (str, bytes)):
        return _split_records(run)
    raise ValueError(
        f"runs[{name!r}] must be a history (list of metric dicts), a dict with 'history', a RecordedRun or a "
        f"trainer; got {type(run).__name__}"
    )


def _is_single_run(obj: Any) -> bool:
    """A list is several runs (seeds) when its items are runs, one history when its items are records."""
    if isinstance(obj, (RecordedRun, Mapping)) or not isinstance(obj, Sequence):
        return True
    items = [x for x in obj]
    if not items:
        return True
    first = items[0]
    is_record = isinstance(first, Mapping) and "history" not in first
    return is_record


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Steps and finite values of ``key`` (records without it, or with a non-finite value, are skipped)."""
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if _finite(v):
            xs.append(float(rec["step"]))
            ys.append(float(v))
    return xs, ys


def _color(name: str, used: dict[str, str]) -> str:
    if name in used:
        return used[name]
    base = name.split()[0].split("·")[0].strip()
    color = METHOD_COLORS.get(base)
    if color is None or color in used.values():
        free = [c for c in _PALETTE if c not in used.values()]
        color = free[0] if free else _PALETTE[len(used) % len(_PALETTE)]
    used[name] = color
    return color


# ---------------------------------------------------------------------------------------------------------
# Live dashboard
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    """One metric of a dashboard panel: ``key`` in the metrics dict, its ``label``, the line ``dash``,
    ``eval`` (read from evaluation records) and ``secondary`` (right-hand y axis of the panel)."""

    key: str
    label: str
    dash: str = "solid"
    eval: bool = False
    secondary: bool = False


@dataclass(frozen=True)
class Panel:
    """One subplot: ``title``, its ``series``, ``log_y`` (log scale of the left y axis)."""

    title: str
    series: tuple[Series, ...]
    log_y: bool = False


DASHBOARD_PANELS = (
    Panel(
        "reward on the training samples<br><sub>solid: mean reward · dotted: accuracy</sub>",
        (Series("reward/mean", "mean reward"), Series("reward/accuracy", "accuracy", "dot")),
    ),
    Panel(
        "held-out accuracy<br><sub>solid: greedy · dotted: sampled (T=1, top-p 0.7)</sub>",
        (
            Series("eval/greedy_accuracy", "greedy accuracy", eval=True),
            Series("eval/sampled_accuracy", "sampled accuracy", "dot", eval=True),
        ),
    ),
    Panel(
        "entropy (nats)<br><sub>solid: global · dashed: TRE-K · dotted: TRE-P (rescaled)</sub>",
        (
            Series("entropy/global", "global entropy"),
            Series("entropy/tre_k", "TRE-K entropy", "dash"),
            Series("entropy/tre_p", "TRE-P entropy", "dot"),
        ),
    ),
    Panel(
        "the vocabulary tail<br><sub>solid: mass outside top-10 (log, left) · dashed: top-1 (right)</sub>",
        (
            Series("tail/mass_outside_top10", "mass outside top-10"),
            Series("tail/top1_prob", "top-1 probability", "dash", secondary=True),
        ),
        log_y=True,
    ),
    Panel(
        "PPO health<br><sub>solid: approx KL(old‖new) · dashed: clip fraction</sub>",
        (Series("policy/approx_kl", "approx KL"), Series("policy/clipfrac", "clip fraction", "dash")),
    ),
    Panel(
        "response length (tokens)<br><sub>solid: mean length</sub>",
        (Series("response/length_mean", "mean length"),),
    ),
)


class LiveDashboard(Callback):
    """Live training plots for one or several runs; a :class:`~tre_edu.trainer.Callback`.

    Pass it to ``PPOTrainer(callbacks=[dash])`` or ``run_training(cfg, callbacks=[dash])`` and display it
    (the last expression of a cell, or ``display(dash)``) *before* training: every ``every`` PPO steps, and at
    every evaluation, the new points are written into the ``FigureWidget`` inside one ``batch_update`` (one
    message to the browser). Each run gets a colour (by method: red global entropy, blue TRE-K, green TRE-P,
    ...); within a panel the line style tells the metrics apart (see the panel's subtitle).

    A run starts at ``on_train_begin``, named after ``start_run(name)`` when it was called before, else after
    the trainer's regulariser kind (starting a run of an existing name replaces it; the same trainer training
    again continues its run). Without a notebook front end nothing is drawn on screen; everything is still
    recorded (:attr:`runs`, :attr:`figure`).

    Args:
        every: redraw every ``every`` PPO steps (evaluations and the end of training always redraw).
        panels: the subplots (default :data:`DASHBOARD_PANELS`, 3 x 2).
        live: use a ``go.FigureWidget`` (True) or a plain ``go.Figure`` (False: headless, no widget library).
        title, height, width: layout.
    """

    def __init__(
        self,
        every: int = 1,
        *,
        panels: Sequence[Panel] = DASHBOARD_PANELS,
        live: bool = True,
        title: str | None = "PPO training",
        height: int = 760,
        width: int | None = None,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an integer >= 1; got {every!r}")
        if not panels:
            raise ValueError("panels must hold at least one Panel")
        self.every = every
        self.panels = tuple(panels)
        self.live = live
        self._records: dict[str, list[dict]] = {}
        self._evals: dict[str, list[dict]] = {}
        self._traces: dict[str, list[int]] = {}
        self._colors: dict[str, str] = {}
        self._pending: str | None = None
        self._trainer: Any = None
        self.current: str | None = None
        self.n_refresh = 0
        self._widget = None
        self._status_text = ""
        self._t_last = time.perf_counter()
        self.figure = self._build(title, height, width)

    # ---- figure --------------------------------------------------------------------------------------------
    def _cell(self, i: int) -> tuple[int, int]:
        return i // 2 + 1, i % 2 + 1

    def _build(self, title: str | None, height: int, width: int | None) -> go.Figure:
        n = len(self.panels)
        rows = (n + 1) // 2
        specs = [
            [
                {"secondary_y": any(s.secondary for s in self.panels[r * 2 + c].series)} if r * 2 + c < n else None
                for c in range(2)
            ]
            for r in range(rows)
        ]
        fig = make_subplots(
            rows=rows,
            cols=2,
            specs=specs,
            subplot_titles=[p.title for p in self.panels],
            vertical_spacing=0.16 if rows > 1 else 0.1,
            horizontal_spacing=0.1,
        )
        for i, panel in enumerate(self.panels):
            row, col = self._cell(i)
            fig.update_xaxes(title_text="PPO step", row=row, col=col)
            if panel.log_y:
                fig.update_yaxes(type="log", exponentformat="power", row=row, col=col, secondary_y=False)
            if any(s.secondary for s in panel.series):
                fig.update_yaxes(range=[0, 1.02], row=row, col=col, secondary_y=True)
        fig.update_annotations(font_size=12)
        fig.update_layout(
            template=TEMPLATE,
            height=height,
            width=width,
            title=title,
            legend={"orientation": "h", "y": -0.08},
            margin={"l": 60, "r": 40, "t": 90, "b": 60},
            hovermode="closest",
        )
        if self.live:
            try:
                return go.FigureWidget(fig)
            except Exception as err:  # pragma: no cover - only without the widget libraries
                warnings.warn(f"no FigureWidget ({err}); the dashboard records without live display", stacklevel=3)
                self.live = False
        return fig

    def _add_run_traces(self, name: str) -> None:
        color = _color(name, self._colors)
        first = True
        idx = []
        for i, panel in enumerate(self.panels):
            row, col = self._cell(i)
            for s in panel.series:
                trace = go.Scatter(
                    x=[],
                    y=[],
                    mode="lines+markers" if s.eval else "lines",
                    name=name,
                    legendgroup=name,
                    showlegend=first,
                    line={"color": color, "dash": s.dash, "width": 2},
                    marker={"size": 7},
                    hovertemplate=f"{name} · {s.label}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                )
                first = False
                kw = {"secondary_y": True} if s.secondary else {}
                self.figure.add_trace(trace, row=row, col=col, **kw)
                idx.append(len(self.figure.data) - 1)
        self._traces[name] = idx

    # ---- runs ----------------------------------------------------------------------------------------------
    @property
    def run_names(self) -> list[str]:
        return list(self._records)

    @property
    def runs(self) -> dict[str, dict[str, list[dict]]]:
        """``name -> {"history": [...], "eval_history": [...]}`` (copies; for :func:`comparison_figure`)."""
        return {
            n: {
                "history": [dict(r) for r in self._records[n]],
                "eval_history": [dict(e) for e in self._evals[n]],
            }
            for n in self._records
        }

    def start_run(self, name: str) -> None:
        """Make ``name`` the run that the next records go to (an existing run of that name is cleared)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        if name not in self._records:
            self._add_run_traces(name)
        self._records[name], self._evals[name] = [], []
        self.current = name
        self._pending = name
        self.refresh()

    def add_history(
        self,
        history: Any,
        eval_history: Sequence[Mapping[str, Any]] | None = None,
        run: str | None = None,
    ) -> None:
        """Record a whole history at once (a finished or recorded run: anything :func:`normalize_run` reads)
        into the run ``run`` (default: the current run, or ``"run"``), then redraw."""
        name = run or self.current or "run"
        train, evals = normalize_run(history, name)
        if eval_history is not None:
            evals = evals + [dict(e) for e in eval_history]
        if name not in self._records:
            self.start_run(name)
        self._records[name].extend(train)
        self._evals[name].extend(evals)
        self.current = name
        self.refresh()

    def _ensure_run(self) -> str:
        if self.current is None:
            self.start_run("run")
        return self.current

    # ---- callback hooks -------------------------------------------------------------------------------
    def on_train_begin(self, trainer: Any) -> None:
        if self._pending is not None:
            self._pending = None  # a name given with start_run: this trainer claims it
        elif trainer is not self._trainer or self.current is None:
            self.start_run(str(trainer.config.regularizer.kind))
            self._pending = None
        self._trainer = trainer
        self._total = int(trainer.config.ppo.steps)
        self._t_last = time.perf_counter()

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        name = self._ensure_run()
        self._records[name].append({"step": int(step), **{k: v for k, v in metrics.items() if _finite(v)}})
        if step % self.every == 0:
            self.refresh()

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        name = self._ensure_run()
        self._evals[name].append({"step": int(step), **{k: v for k, v in metrics.items() if _finite(v)}})
        self.refresh()

    def on_train_end(self, trainer: Any, history: list[dict[str, float]]) -> None:
        self.refresh()

    # ---- drawing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Write every run's points into the figure (one ``batch_update``) and update the status line."""
        ctx = self.figure.batch_update() if isinstance(self.figure, go.FigureWidget) else _nullcontext()
        with ctx:
            for name, idx in self._traces.items():
                j = 0
                for panel in self.panels:
                    for s in panel.series:
                        records = self._evals[name] if s.eval else self._records[name]
                        xs, ys = _series(records, s.key)
                        if panel.log_y and not s.secondary:  # a log axis cannot show 0: leave a gap
                            ys = [y if y > 0 else None for y in ys]
                        trace = self.figure.data[idx[j]]
                        trace.x, trace.y = xs, ys
                        j += 1
        self.n_refresh += 1
        self._update_status()

    def status_text(self) -> str:
        """One line about the current run: step, reward, held-out accuracy, tail mass, seconds per step."""
        name = self.current
        if name is None:
            return "no run yet"
        recs, evals = self._records.get(name, []), self._evals.get(name, [])
        parts = [f"<b>{name}</b>"]
        if recs:
            last = recs[-1]
            total = getattr(self, "_total", None)
            parts.append(f"step {last['step']}" + (f" / {total}" if total else ""))
            if "reward/mean" in last:
                parts.append(f"reward {last['reward/mean']:.3f}")
            if "tail/mass_outside_top10" in last:
                parts.append(f"mass outside top-10 {last['tail/mass_outside_top10']:.2e}")
            if "time/step" in last:
                parts.append(f"{last['time/step']:.2f} s/step")
        if evals and "eval/greedy_accuracy" in evals[-1]:
            parts.append(f"greedy accuracy {evals[-1]['eval/greedy_accuracy']:.3f} (step {evals[-1]['step']})")
        return " · ".join(parts)

    def _update_status(self) -> None:
        self._status_text = self.status_text()
        if self._widget is not None:
            self._widget.children[0].value = self._status_text

    @property
    def widget(self):
        """An ``ipywidgets.VBox``: the status line and the live figure (built on first use)."""
        if self._widget is None:
            import ipywidgets as widgets

            status = widgets.HTML(value=self._status_text)
            children = [status, self.figure] if isinstance(self.figure, go.FigureWidget) else [status]
            self._widget = widgets.VBox(children)
        return self._widget

    def _repr_mimebundle_(self, **kwargs):
        if isinstance(self.figure, go.FigureWidget):
            return self.widget._repr_mimebundle_(**kwargs)
        return self.figure._repr_mimebundle_(**kwargs)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------------------
# Recorded runs
# ---------------------------------------------------------------------------------------------------------
def _resolve(path: str | Path) -> Path:
    """``path`` as given, else relative to the repository root (so ``data/...`` works from notebooks/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    root = Path(__file__).resolve().parents[2]
    return root / p if (root / p).exists() else p


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


def load_recorded_runs(path: str | Path = "data/countdown_runs") -> RecordedRuns:
    """Every run under ``path`` that has a ``summary.json`` (at any depth), as :class:`RecordedRun` objects.

    Per run directory: ``summary.json`` (required, written by :func:`tre_edu.pipeline.run_training`),
    ``metrics.jsonl`` (optional: one JSON object per PPO step with ``"step"``, evaluations with
    ``"kind": "eval"``; see :class:`~tre_edu.trainer.JSONLLogger`) and ``config.yaml`` (optional). The run's
    name is its directory relative to ``path``. A missing ``path`` gives an empty result (``len(runs) == 0``),
    never an error, so a notebook can say how to produce the runs. A relative ``path`` that does not exist
    from the current directory is looked up from the repository root.
    """
    import yaml

    root = _resolve(path)
    readme_file = root / "README.md"
    readme = readme_file.read_text() if readme_file.is_file() else None
    runs: dict[str, RecordedRun] = {}
    if root.is_dir():
        for summary_file in sorted(root.rglob("summary.json")):
            run_dir = summary_file.parent
            name = str(run_dir.relative_to(root)) if run_dir != root else root.name
            try:
                summary = json.loads(summary_file.read_text())
            except json.JSONDecodeError as err:
                warnings.warn(f"{summary_file}: not valid JSON ({err}); run skipped", stacklevel=2)
                continue
            records = _read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
            train, evals = _split_records(records)
            config = {}
            if (run_dir / "config.yaml").is_file():
                config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            runs[name] = RecordedRun(name, run_dir, summary, train, evals, config)
    return RecordedRuns(runs, root, readme)


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
_COEF_KINDS = ("entropy", "tre-k", "tre-p")


def _get(d: Mapping[str, Any], dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


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
                if key.startswith("regularizer.") and r.method not in _COEF_KINDS:
                    continue
                value = _get(r.config, key)
                if value is not None:
                    parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
            label = " ".join(parts)
        groups.setdefault(str(label), []).append(r)
    return groups


# ---------------------------------------------------------------------------------------------------------
# Comparison of methods
# ---------------------------------------------------------------------------------------------------------
def _groups(runs: Mapping[str, Any], group: bool) -> dict[str, list[tuple[list[dict], list[dict]]]]:
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty dict name -> run (or list of runs over seeds)")
    if group and all(isinstance(r, RecordedRun) for r in runs.values()):
        runs = group_runs(runs)
    out = {}
    for name, value in runs.items():
        members = [value] if _is_single_run(value) else list(value)
        out[str(name)] = [normalize_run(m, str(name)) for m in members]
    return out


def _mean_curve(members: list[list[dict]], key: str, smooth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds at each step (steps where any seed has the value), and the min / max band."""
    per_step: dict[float, list[float]] = {}
    for records in members:
        xs, ys = _series(records, key)
        if smooth > 1:  # trailing moving average over the last `smooth` points
            ys = [float(np.mean(ys[max(0, i - smooth + 1) : i + 1])) for i in range(len(ys))]
        for x, y in zip(xs, ys):
            per_step.setdefault(x, []).append(y)
    steps = np.array(sorted(per_step))
    vals = [per_step[s] for s in steps]
    mean = np.array([np.mean(v) for v in vals])
    lo = np.array([np.min(v) for v in vals])
    hi = np.array([np.max(v) for v in vals])
    return steps, mean, np.stack([lo, hi]) if len(steps) else np.zeros((2, 0))


def _final(evals: list[dict], key: str) -> float | None:
    for rec in reversed(evals):
        if _finite(rec.get(key)):
            return float(rec[key])
    return None


def comparison_figure(
    runs: Mapping[str, Any],
    *,
    accuracy_key: str = "eval/greedy_accuracy",
    tail_key: str = "tail/mass_outside_top10",
    group: bool = True,
    smooth: int = 1,
    title: str | None = "methods compared",
    height: int = 420,
    width: int | None = None,
    as_widget: bool = False,
) -> go.Figure:
    """Several methods side by side, in three panels.

    1. Final held-out accuracy (``accuracy_key`` of the last evaluation): bars = mean over the seeds of a
       method, error bars = standard deviation over seeds (n >= 2), dots = the single seeds, a grey dash = the
       accuracy at the start (the warm start).
    2. Held-out accuracy over PPO steps (mean over seeds).
    3. ``tail_key`` (mass outside the top 10 tokens, per training batch) over PPO steps, log y axis: mean over
       seeds, shaded min-max band; ``smooth`` > 1 applies a trailing moving average.

    Args:
        runs: ``name -> run`` or ``name -> [run, run, ...]`` (seeds); a run is anything :func:`normalize_run`
            reads. A dict of :class:`RecordedRun` (from :func:`load_recorded_runs`) is grouped by
            :func:`group_runs` when ``group`` is True.
    """
    if not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be an integer >= 1; got {smooth!r}")
    groups = _groups(runs, group)
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.3, 0.35, 0.35],
        horizontal_spacing=0.08,
        subplot_titles=(
            f"final {accuracy_key.split('/')[-1].replace('_', ' ')}",
            "held-out accuracy during PPO",
            f"{tail_key.split('/')[-1].replace('_', ' ')} (log)",
        ),
    )
    colors: dict[str, str] = {}
    names = list(groups)
    for name in names:
        members = groups[name]
        color = _color(name, colors)
        finals = [f for f in (_final(e, accuracy_key) for _, e in members) if f is not None]
        starts = [e[0][accuracy_key] for _, e in members if e and _finite(e[0].get(accuracy_key))]
        mean = float(np.mean(finals)) if finals else None
        std = float(np.std(finals, ddof=1)) if len(finals) >= 2 else None
        fig.add_trace(
            go.Bar(
                x=[name],
                y=[mean],
                marker_color=color,
                name=name,
                legendgroup=name,
                error_y={"type": "data", "array": [std], "visible": std is not None},
                text=[f"{mean:.3f}" if mean is not None else "n/a"],
                textposition="outside",
                hovertemplate=f"{name}<br>mean %{{y:.3f}} over {len(finals)} seed(s)"
                + (f"<br>std {std:.3f}" if std is not None else "")
                + "<extra></extra>",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[name] * len(finals),
                y=finals,
                mode="markers",
                marker={"color": "black", "size": 6, "symbol": "circle-open"},
                name=f"{name}: seeds",
                legendgroup=name,
                showlegend=False,
                hovertemplate="seed: %{y:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        if starts:
            fig.add_trace(
                go.Scatter(
                    x=[name],
                    y=[float(np.mean(starts))],
                    mode="markers",
                    marker={"color": "#888888", "size": 22, "symbol": "line-ew", "line": {"width": 3}},
                    name="start (warm start)",
                    legendgroup="start",
                    showlegend=name == names[0],
                    hovertemplate="at step 0: %{y:.3f}<extra></extra>",
                ),
                row=1,
                col=1,
            )
        steps, acc, _ = _mean_curve([e for _, e in members], accuracy_key, 1)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=acc,
                mode="lines+markers",
                line={"color": color},
                name=name,
                legendgroup=name,
                showlegend=False,
                hovertemplate=f"{name}<br>step %{{x}}<br>accuracy %{{y:.3f}}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        steps, tail, band = _mean_curve([h for h, _ in members], tail_key, smooth)
        keep = tail > 0
        if len(members) > 1 and keep.any():
            xs = np.concatenate([steps[keep], steps[keep][::-1]])
            ys = np.concatenate([band[1][keep], band[0][keep][::-1]])
            ys = np.where(ys > 0, ys, np.nan)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    fill="toself",
                    fillcolor=color,
                    opacity=0.15,
                    line={"width": 0},
                    name=f"{name}: seed range",
                    legendgroup=name,
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=3,
            )
        fig.add_trace(
            go.Scatter(
                x=steps[keep],
                y=tail[keep],
                mode="lines",
                line={"color": color},
                name=name,
                legendgroup=name,
                showlegend=False,
                hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.3g}}<extra></extra>",
            ),
            row=1,
            col=3,
        )
    fig.update_yaxes(title_text="accuracy", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=3)
    fig.update_xaxes(title_text="PPO step", row=1, col=2)
    fig.update_xaxes(title_text="PPO step", row=1, col=3)
    fig.update_layout(
        template=TEMPLATE,
        height=height,
        width=width,
        title=title,
        barmode="overlay",
        legend={"orientation": "h", "y": -0.2},
        margin={"l": 60, "r": 20, "t": 70, "b": 60},
    )
    return go.FigureWidget(fig) if as_widget else fig


def comparison_table(runs: Mapping[str, Any], *, accuracy_key: str = "eval/greedy_accuracy", group=True) -> str:
    """A plain-text table: per method the number of seeds, start and final ``accuracy_key`` (mean ± std) and
    the mass outside the top 10 over the first and the last 10 % of steps (mean over seeds)."""
    groups = _groups(runs, group)
    width = max(12, *(len(n) for n in groups))
    lines = [
        f"{'method':{width}s} seeds  {'start':>6s}  {'final (mean ± std)':>18s}  {'tail@start':>10s}  {'tail@end':>10s}"
    ]
    for name, members in groups.items():
        finals = [f for f in (_final(e, accuracy_key) for _, e in members) if f is not None]
        starts = [e[0][accuracy_key] for _, e in members if e and _finite(e[0].get(accuracy_key))]
        tails0, tails1 = [], []
        for h, _ in members:
            _, ys = _series(h, "tail/mass_outside_top10")
            if ys:
                n = max(1, math.ceil(len(ys) / 10))
                tails0.append(float(np.mean(ys[:n])))
                tails1.append(float(np.mean(ys[-n:])))
        fin = (
            f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}"
            if len(finals) >= 2
            else (f"{finals[0]:.3f}" if finals else "n/a")
        )
        st = f"{np.mean(starts):.3f}" if starts else "n/a"
        t0 = f"{np.mean(tails0):.2e}" if tails0 else "n/a"
        t1 = f"{np.mean(tails1):.2e}" if tails1 else "n/a"
        lines.append(f"{name:{width}s} {len(members):5d}  {st:>6s}  {fin:>18s}  {t0:>10s}  {t1:>10s}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Launcher panel
# ---------------------------------------------------------------------------------------------------------
def _vocab_size(tail_tokens: int) -> int:
    from tre_edu.models.tiny import alphabet

    return len(alphabet()) + int(tail_tokens)


class RunLauncher:
    """Sliders for a short PPO run and a "Train" button; the run is drawn live into a :class:`LiveDashboard`.

    Widgets (``ipywidgets``): ``method`` (dropdown: none, entropy, tre-k, tre-p, forking, kl-cov), ``coef``
    (log slider, the paper's units), ``k_slider`` ("K", TRE-K), ``p_slider`` ("p", TRE-P), ``tail_slider``
    ("tail": tail tokens of the tiny model's vocabulary), ``steps_slider`` ("steps") and ``button`` ("Train").
    The info line shows the effective coefficient (``coef · log V / log K`` for TRE-K).

    Training is synchronous in the kernel: :func:`tre_edu.pipeline.run_training` from the warm start of the
    chosen tail size, with ``output_dir`` under ``output_root`` (a new temporary directory by default). A tail
    size without a warm start gets one first (:func:`tre_edu.pipeline.run_warm_start` with ``base_config``'s
    ``sft`` section), cached for later runs. ``results[label]`` keeps each run's ``summary``, ``history`` and
    ``eval_history``.

    Args:
        base_config: the :class:`~tre_edu.config.TrainConfig` every run starts from (sizes, rates, ...).
        warm_starts: ``tail_tokens -> warm-start directory`` already made (e.g. by the notebook).
        tails: the choices of the "tail" slider (default: the warm starts' and base_config's tail sizes).
        dashboard: the live dashboard to draw into (default: a new one).
        output_root: where runs and new warm starts are written (default: a new temporary directory).
        max_steps: the largest value of the "steps" slider.
    """

    def __init__(
        self,
        base_config: Any,
        *,
        warm_starts: Mapping[int, str] | None = None,
        tails: Sequence[int] | None = None,
        dashboard: LiveDashboard | None = None,
        output_root: str | Path | None = None,
        max_steps: int = 200,
        progress: bool = False,
    ) -> None:
        import ipywidgets as widgets

        self.base_config = base_config.validate()
        self.warm_starts: dict[int, str] = {int(k): str(v) for k, v in (warm_starts or {}).items()}
        if output_root is None:
            import tempfile

            output_root = tempfile.mkdtemp(prefix="tre_edu_launcher_")
        self.output_root = Path(output_root)
        self.dashboard = dashboard if dashboard is not None else LiveDashboard(title="launcher runs")
        self.progress = progress
        self.results: dict[str, dict[str, Any]] = {}
        self.last_error: BaseException | None = None
        reg = self.base_config.regularizer
        tail0 = int(self.base_config.model.tail_tokens)
        choices = sorted({tail0, *self.warm_starts, *(tails or ())})
        style = {"description_width": "4em"}
        self.method = widgets.Dropdown(
            options=list(METHODS),
            value=reg.kind if reg.kind in METHODS else "none",
            description="method",
            style=style,
        )
        self.coef = widgets.FloatLogSlider(
            value=reg.coef if reg.coef > 0 else 1e-3,
            base=10,
            min=-5,
            max=-0.5,
            step=0.25,
            description="coef",
            readout_format=".1e",
            continuous_update=False,
            style=style,
        )
        self.k_slider = widgets.IntSlider(
            value=reg.k, min=1, max=16, description="K", continuous_update=False, style=style
        )
        self.p_slider = widgets.FloatSlider(
            value=reg.p,
            min=0.5,
            max=0.999,
            step=0.001,
            readout_format=".3f",
            description="p",
            continuous_update=False,
            style=style,
        )
        self.tail_slider = widgets.SelectionSlider(
            options=choices, value=tail0, description="tail", continuous_update=False, style=style
        )
        self.steps_slider = widgets.IntSlider(
            value=min(int(self.base_config.ppo.steps), max_steps),
            min=1,
            max=max_steps,
            description="steps",
            continuous_update=False,
            style=style,
        )
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.info = widgets.HTML()
        self.status = widgets.HTML(value="ready")
        for w in (self.method, self.coef, self.k_slider, self.p_slider, self.tail_slider):
            w.observe(self._on_change, names="value")
        self.button.on_click(self._on_click)
        self._on_change()
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.method, self.coef, self.k_slider]),
                widgets.HBox([self.p_slider, self.tail_slider, self.steps_slider]),
                widgets.HBox([self.button, self.status]),
                self.info,
                self.dashboard.widget,
            ]
        )

    # ---- settings ------------------------------------------------------------------------------------------
    def regularizer_overrides(self) -> dict[str, Any]:
        """The ``regularizer.*`` overrides of the current widget values."""
        kind = self.method.value
        out: dict[str, Any] = {"regularizer.kind": kind}
        if kind in _COEF_KINDS:
            out["regularizer.coef"] = float(self.coef.value)
        if kind == "tre-k":
            out["regularizer.k"] = int(self.k_slider.value)
        if kind == "tre-p":
            out["regularizer.p"] = float(self.p_slider.value)
        return out

    def label(self) -> str:
        """A run name from the settings, e.g. ``"tre-k α=1.0e-03 K=2 tail=2000"``."""
        kind = self.method.value
        parts = [kind]
        if kind in _COEF_KINDS:
            parts.append(f"α={self.coef.value:.1e}")
        if kind == "tre-k":
            parts.append(f"K={self.k_slider.value}")
        if kind == "tre-p":
            parts.append(f"p={self.p_slider.value:.3f}")
        parts.append(f"tail={self.tail_slider.value}")
        return " ".join(parts)

    def _on_change(self, _change=None) -> None:
        kind = self.method.value
        self.coef.disabled = kind not in _COEF_KINDS
        self.k_slider.disabled = kind != "tre-k"
        self.p_slider.disabled = kind != "tre-p"
        V = _vocab_size(self.tail_slider.value) if self.base_config.model.name == "tiny" else None
        text = f"V = {V:,} tokens (33 useful + {self.tail_slider.value:,} tail). " if V else ""
        if kind in _COEF_KINDS and V:
            from tre_edu.regularizers import Regularizer

            k = int(self.k_slider.value)
            reg = Regularizer(kind=kind, coef=float(self.coef.value), k=k)
            eff = reg.effective_coef(V)
            how = {
                "entropy": "no rescaling, on all V tokens",
                "tre-k": f"α · log V / log K = α · {math.log(V):.2f} / {math.log(max(k, 2)):.2f}"
                if k >= 2
                else "K = 1: min-entropy, unscaled",
                "tre-p": "α · log V / log 2 at |A_TR| = 2 (an upper bound; per position)",
            }[kind]
            text += f"Effective coefficient {eff:.4f} ({how})."
        elif kind == "forking":
            text += "Forking tokens: the policy-gradient loss only on the 20% highest-entropy tokens."
        elif kind == "kl-cov":
            text += "KL-Cov: |log π − log π_old| penalty (coef 1) on the top 0.2% tokens by Cov(A, log π)."
        else:
            text += "Vanilla PPO: no exploration term."
        if self.tail_slider.value not in self.warm_starts:
            text += " <i>(this tail size has no warm start yet: one is trained first)</i>"
        self.info.value = text

    def config(self) -> Any:
        """The :class:`~tre_edu.config.TrainConfig` of the next run (without ``init_from``)."""
        n = len(self.results) + 1
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label())
        return self.base_config.replace(
            {
                **self.regularizer_overrides(),
                "model.tail_tokens": int(self.tail_slider.value),
                "ppo.steps": int(self.steps_slider.value),
                "output_dir": str(self.output_root / f"run{n:02d}_{slug}"),
                "sft.enabled": False,
            }
        )

    def _warm_start(self, tail: int) -> str:
        if tail not in self.warm_starts:
            from tre_edu.pipeline import run_warm_start

            self.status.value = f"warm start for tail = {tail:,} ..."
            cfg = self.base_config.replace({"model.tail_tokens": tail, "init_from": None})
            out = self.output_root / f"warm_start_tail{tail}"
            run_warm_start(cfg, out, progress=self.progress)
            self.warm_starts[tail] = str(out)
        return self.warm_starts[tail]

    # ---- running -------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run PPO with the current settings (blocking); return ``{"summary", "history", "eval_history"}``."""
        from tre_edu.pipeline import run_training

        label = self.label()
        cfg = self.config()
        cfg = cfg.replace({"init_from": self._warm_start(int(self.tail_slider.value))})
        self.status.value = f"training <b>{label}</b> ..."
        self.dashboard.start_run(label)
        t0 = time.perf_counter()
        result = run_training(cfg, callbacks=[self.dashboard], progress=self.progress)
        trainer = result["trainer"]
        out = {
            "summary": result["summary"],
            "history": result["history"],
            "eval_history": trainer.eval_history,
        }
        self.results[label] = out
        final = result["summary"].get("eval_final", {}).get("eval/greedy_accuracy")
        acc = f", greedy accuracy {final:.3f}" if _finite(final) else ""
        self.status.value = f"done: <b>{label}</b>, {trainer.step} steps in {time.perf_counter() - t0:.0f} s{acc}"
        return out

    def _on_click(self, _button=None) -> None:
        self.button.disabled = True
        self.button.description = "Training..."
        try:
            self.train()
            self.last_error = None
        except Exception as err:  # shown in the panel: a widget callback has no cell to raise into
            self.last_error = err
            self.status.value = f"<span style='color:#d62728'>failed: {type(err).__name__}: {err}</span>"
        finally:
            self.button.disabled = False
            self.button.description = "Train"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
