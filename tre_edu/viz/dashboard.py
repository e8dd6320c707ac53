"""A live PPO dashboard: the metrics of one or several runs drawn into a plotly ``FigureWidget`` as they arrive."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tre_edu.viz.records import finite, series
from tre_edu.viz.style import finish, run_color


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
        "response length (tokens)<br><sub>solid: mean length</sub>", (Series("response/length_mean", "mean length"),)
    ),
)


class LiveDashboard:
    """Live training plots for one or several runs; implements the hooks of :class:`tre_edu.trainer.Callback`.

    Pass it to ``run_training(cfg, callbacks=[dash])`` (or a trainer) and display it *before* training: every
    ``every`` PPO steps, and at every evaluation, the new points go into the ``FigureWidget`` in one
    ``batch_update``. A run starts at ``on_train_begin``, named by an earlier ``start_run(name)``, else after the
    trainer's regulariser kind (a new run of an existing name replaces it; the same trainer training again continues
    its run). ``live=False`` draws into a plain ``go.Figure`` (headless); everything is recorded in :attr:`runs`.
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
        self.every, self.panels, self.live = every, tuple(panels), live
        self._records: dict[str, list[dict]] = {}  # run name -> training records
        self._evals: dict[str, list[dict]] = {}  # run name -> evaluation records
        self._traces: dict[str, list[int]] = {}  # run name -> the indices of its traces
        self._colors: dict[str, str] = {}
        self.current: str | None = None  # the run that records go to
        self._pending: str | None = None  # a name given to start_run that no trainer has claimed yet
        self._trainer = self._total = self._widget = None
        self.n_refresh, self._status_text = 0, ""
        self.figure = self._build(title, height, width)

    # ---- figure --------------------------------------------------------------------------------------------
    def _cell(self, i: int) -> dict[str, int]:
        return {"row": i // 2 + 1, "col": i % 2 + 1}

    def _build(self, title: str | None, height: int, width: int | None) -> go.Figure:
        rows = (len(self.panels) + 1) // 2
        secondary = [any(s.secondary for s in panel.series) for panel in self.panels]
        cells = [{"secondary_y": sec} for sec in secondary] + [None] * (2 * rows - len(self.panels))
        specs = [cells[i : i + 2] for i in range(0, 2 * rows, 2)]
        titles, spacing = [p.title for p in self.panels], 0.16 if rows > 1 else 0.1
        fig = make_subplots(
            rows=rows, cols=2, specs=specs, subplot_titles=titles, vertical_spacing=spacing, horizontal_spacing=0.1
        )
        for i, panel in enumerate(self.panels):
            fig.update_xaxes(title_text="PPO step", **self._cell(i))
            if panel.log_y:
                fig.update_yaxes(type="log", exponentformat="power", secondary_y=False, **self._cell(i))
            if secondary[i]:
                fig.update_yaxes(range=[0, 1.02], secondary_y=True, **self._cell(i))
        fig.update_annotations(font_size=12)
        layout = {"height": height, "width": width, "title": title, "legend": {"orientation": "h", "y": -0.08}}
        return finish(fig, self.live, {"r": 40, "t": 90, "b": 60}, hovermode="closest", **layout)

    def _add_run_traces(self, name: str) -> None:
        color = run_color(name, self._colors)
        self._traces[name] = []
        for i, panel in enumerate(self.panels):
            for s in panel.series:
                hover = f"{name} · {s.label}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>"
                line, mode = {"color": color, "dash": s.dash, "width": 2}, "lines+markers" if s.eval else "lines"
                trace = go.Scatter(x=[], y=[], mode=mode, line=line, marker={"size": 7}, hovertemplate=hover)
                trace.update(name=name, legendgroup=name, showlegend=not self._traces[name])  # one legend entry per run
                self.figure.add_trace(trace, secondary_y=True if s.secondary else None, **self._cell(i))
                self._traces[name].append(len(self.figure.data) - 1)

    # ---- runs ----------------------------------------------------------------------------------------------
    @property
    def runs(self) -> dict[str, dict[str, list[dict]]]:
        """``name -> {"history": [...], "eval_history": [...]}`` (copies; for :func:`comparison_figure`)."""
        return {
            n: {"history": [dict(r) for r in self._records[n]], "eval_history": [dict(e) for e in self._evals[n]]}
            for n in self._records
        }

    def start_run(self, name: str) -> None:
        """Make ``name`` the run that the next records go to (an existing run of that name is cleared)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}")
        if name not in self._records:
            self._add_run_traces(name)
        self._records[name], self._evals[name] = [], []
        self.current = self._pending = name
        self.refresh()

    def _record(self, into: dict[str, list[dict]], step: int, metrics: Mapping[str, float]) -> None:
        if self.current is None:
            self.start_run("run")
        into[self.current].append({"step": int(step), **{k: v for k, v in metrics.items() if finite(v)}})

    # ---- callback hooks -------------------------------------------------------------------------------
    def on_train_begin(self, trainer: Any) -> None:
        if self._pending is None and (trainer is not self._trainer or self.current is None):
            self.start_run(str(trainer.config.regularizer.kind))
        self._pending = None  # a name given with start_run: this trainer claims it
        self._trainer, self._total = trainer, int(trainer.config.ppo.steps)

    def on_step_end(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        self._record(self._records, step, metrics)
        if step % self.every == 0:
            self.refresh()

    def on_evaluate(self, trainer: Any, step: int, metrics: Mapping[str, float]) -> None:
        self._record(self._evals, step, metrics)
        self.refresh()

    def on_train_end(self, trainer: Any, history: list[dict[str, float]]) -> None:
        self.refresh()

    # ---- drawing ---------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Write every run's points into the figure (one ``batch_update``) and update the status line."""
        pairs = [(p, s) for p in self.panels for s in p.series]  # the order of each run's traces
        with self.figure.batch_update() if self.live else contextlib.nullcontext():
            for name, idx in self._traces.items():
                for (panel, s), j in zip(pairs, idx):
                    xs, ys = series(self._evals[name] if s.eval else self._records[name], s.key)
                    if panel.log_y and not s.secondary:  # a log axis cannot show 0: leave a gap
                        ys = [y if y > 0 else None for y in ys]
                    self.figure.data[j].x, self.figure.data[j].y = xs, ys
        self.n_refresh += 1
        self._status_text = self.status_text()
        if self._widget is not None:
            self._widget.children[0].value = self._status_text

    def status_text(self) -> str:
        """One line about the current run: step, reward, held-out accuracy, tail mass, seconds per step."""
        name = self.current
        if name is None:
            return "no run yet"
        recs, evals = self._records.get(name, []), self._evals.get(name, [])
        parts = [f"<b>{name}</b>"]
        if recs:
            last = recs[-1]
            parts.append(f"step {last['step']}" + (f" / {self._total}" if self._total else ""))
            shown = (("reward/mean", "reward {:.3f}"), ("tail/mass_outside_top10", "mass outside top-10 {:.2e}"))
            parts += [text.format(last[key]) for key, text in (*shown, ("time/step", "{:.2f} s/step")) if key in last]
        if evals and "eval/greedy_accuracy" in evals[-1]:
            parts.append(f"greedy accuracy {evals[-1]['eval/greedy_accuracy']:.3f} (step {evals[-1]['step']})")
        return " · ".join(parts)

    @property
    def widget(self) -> widgets.VBox:
        """An ``ipywidgets.VBox``: the status line and the live figure (built on first use)."""
        if self._widget is None:
            status = widgets.HTML(value=self._status_text)
            self._widget = widgets.VBox([status, self.figure] if self.live else [status])
        return self._widget

    def _repr_mimebundle_(self, **kwargs):
        return (self.widget if self.live else self.figure)._repr_mimebundle_(**kwargs)
