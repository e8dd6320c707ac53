"""A real LLM trained for a few PPO steps with each regulariser: the cells that ``scripts/record_smollm2_leak.py``
writes (one JSON-lines file per method and seed, a header and one record per PPO step; the format is in
``data/smollm2_leak/README.md``), read back and drawn. ``probe`` metrics are measured on fixed contexts after n
updates (no sampling noise, update 0 = the pretrained model); ``metrics`` are the trainer's, on the responses each
step sampled at the weights it started from, among them ``tail/sampled_outside_top2`` (outside TRE-K's region).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tre_edu.viz.records import _resolve, finite
from tre_edu.viz.style import COLORS, finish, method_label

# (panel title, source, metric key): source "probe" = fixed contexts after n updates, "rollout" = the step's samples
PANELS = (
    ("mass outside the top 10", "probe", "tail/mass_outside_top10"),
    ("mass outside the 0.99-nucleus", "probe", "tail/mass_outside_nucleus_p99"),
    ("sampled tokens outside the top 2 (each step's rollout)", "rollout", "tail/sampled_outside_top2"),
    ("entropy (nats): global (solid), H_TRE-K (dotted)", "probe", "entropy/global"),
)
SECOND = {3: "entropy/tre_k"}  # a second, dotted line in panel 3


@dataclass
class LeakCell:
    """One (method, seed) of the recording: ``header``, ``steps`` (step records in order) and ``path``."""

    method: str
    seed: int
    header: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    def probe(self, key: str) -> tuple[list[int], list[float]]:
        """(updates, values) of a fixed-context metric: update 0 is the pretrained model (the header)."""
        recs = [(0, self.header.get("probe", {}))] + [(int(s["step"]), s.get("probe", {})) for s in self.steps]
        pairs = [(n, float(p[key])) for n, p in recs if finite(p.get(key))]
        return [n for n, _ in pairs], [v for _, v in pairs]

    def rollout(self, key: str) -> tuple[list[int], list[float]]:
        """(updates before the step, values) of a training metric: step i sampled after i - 1 updates."""
        pairs = [(int(s["step"]) - 1, float(s["metrics"][key])) for s in self.steps if finite(s["metrics"].get(key))]
        return [n for n, _ in pairs], [v for _, v in pairs]

    def series(self, source: str, key: str) -> tuple[list[int], list[float]]:
        return self.probe(key) if source == "probe" else self.rollout(key)

    @property
    def label(self) -> str:
        eff = self.header.get("effective_coef")
        weight = f", effective weight {eff:g}" if self.method != "none" and finite(eff) else ""
        return f"{method_label(self.method)}{weight}"


def cell_from_lines(lines: Sequence[Mapping[str, Any]], path: Path | None = None) -> LeakCell:
    """A :class:`LeakCell` from its records (the header first); ValueError naming ``path`` if there is none."""
    headers = [dict(r) for r in lines if r.get("kind") == "header"]
    if not headers:
        raise ValueError(f"{path or 'the records'}: no header line ({{'kind': 'header', ...}})")
    h = headers[0]
    steps = sorted((dict(r) for r in lines if r.get("kind") == "step"), key=lambda r: int(r["step"]))
    return LeakCell(str(h["method"]), int(h["seed"]), h, steps, path)


def load_leak_cells(path: str | Path = "data/smollm2_leak") -> dict[tuple[str, int], LeakCell]:
    """Every ``<method>_s<seed>.jsonl`` under ``path`` (finished cells only: the recorder renames a cell into place
    when it is complete), keyed by (method, seed). A missing folder gives no cells, never an error."""
    root = _resolve(path)
    cells: dict[tuple[str, int], LeakCell] = {}
    for file in sorted(root.glob("*.jsonl")) if root.is_dir() else []:
        lines = [json.loads(t) for t in file.read_text(encoding="utf-8").splitlines() if t.strip()]
        cell = cell_from_lines(lines, file)
        cells[(cell.method, cell.seed)] = cell
    return cells


def leak_figure(
    cells: Sequence[LeakCell] | Mapping[Any, LeakCell],
    *,
    methods: Sequence[str] = ("none", "entropy", "tre-k"),
    title: str = "",
    height: int = 560,
    as_widget: bool = False,
) -> go.Figure:
    """Four panels over PPO updates, one colour per method: mass outside the top 10 and outside the 0.99-nucleus
    on the fixed contexts, the fraction of sampled tokens outside the top 2 (TRE-K's trust region), and the global
    entropy with H_TRE-K. With several seeds per method: a thin line per seed and their mean (thick).

    Traces (the same for the same ``methods`` and seeds, whatever has been recorded so far, for
    :func:`~tre_edu.viz.panels.sync_figure`): for each panel, for each method, its mean line, then (with more than
    one seed) its per-seed lines; panel 3 adds the dotted H_TRE-K lines after them.
    """
    cells = list(cells.values()) if isinstance(cells, Mapping) else list(cells)
    seeds = sorted({c.seed for c in cells}) or [0]
    by_method = {m: sorted((c for c in cells if c.method == m), key=lambda c: c.seed) for m in methods}
    fig = make_subplots(
        rows=2, cols=2, subplot_titles=[p[0] for p in PANELS], horizontal_spacing=0.1, vertical_spacing=0.16
    )
    for i, (_, source, key) in enumerate(PANELS):
        row, col = divmod(i, 2)
        for k, dash in [(key, "solid")] + ([(SECOND[i], "dot")] if i in SECOND else []):
            for m in methods:
                legend = i == 0 and dash == "solid"
                _method_traces(fig, by_method[m], m, seeds, source, k, dash, row + 1, col + 1, legend)
        xtitle = "PPO updates (0: the pretrained model)" if row == 1 else None
        fig.update_xaxes(title_text=xtitle, row=row + 1, col=col + 1, rangemode="tozero", dtick=1)
        fig.update_yaxes(title_text="nats" if i == 3 else "fraction", row=row + 1, col=col + 1, rangemode="tozero")
    legend = {"orientation": "h", "y": -0.14, "x": 0}
    return finish(fig, as_widget, {"t": 90}, height=height, title=title, legend=legend)


def _method_traces(fig, cells, method, seeds, source, key, dash, row, col, legend) -> None:
    color = COLORS.get(method, "#7f7f7f")
    curves = {c.seed: c.series(source, key) for c in cells}
    x, mean = _mean(list(curves.values()))
    label = cells[0].label if cells else method_label(method)
    name = label + (f" (mean of {len(cells)} seeds)" if len(seeds) > 1 else "")
    width = 3 if len(seeds) > 1 else 2
    fig.add_scatter(x=x, y=mean, mode="lines+markers", name=name, legendgroup=method, showlegend=legend,
                    line={"color": color, "dash": dash, "width": width}, row=row, col=col)  # fmt: skip
    if len(seeds) > 1:
        for s in seeds:
            xs, ys = curves.get(s, ([], []))
            fig.add_scatter(x=xs, y=ys, mode="lines", name=f"{method_label(method)} seed {s}", legendgroup=method,
                            showlegend=False, opacity=0.35, line={"color": color, "dash": dash, "width": 1},
                            row=row, col=col)  # fmt: skip


def _mean(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over curves at the x values they all have."""
    if not curves:
        return [], []
    xs = sorted(set.intersection(*(set(x) for x, _ in curves)))
    maps = [dict(zip(x, y, strict=True)) for x, y in curves]
    return xs, [float(np.mean([m[x] for m in maps])) for x in xs]


def leak_table(
    cells: Sequence[LeakCell] | Mapping[Any, LeakCell], methods: Sequence[str] = ("none", "entropy", "tre-k")
):
    """Rows (method, seeds, then per metric of :data:`PANELS`: start, end, change) as a list of dicts: the mean
    over seeds of each fixed-context metric at update 0 and after the last update, and of the rollout metric at the
    first and the last step."""
    cells = list(cells.values()) if isinstance(cells, Mapping) else list(cells)
    rows = []
    for m in methods:
        mine = [c for c in cells if c.method == m]
        if not mine:
            continue
        row: dict[str, Any] = {"method": m, "label": mine[0].label, "seeds": len(mine)}
        for _, source, key in (*PANELS, ("", "probe", "entropy/tre_k")):
            curves = [(x, y) for x, y in (c.series(source, key) for c in mine) if y]
            if curves:
                starts, ends = [y[0] for _, y in curves], [y[-1] for _, y in curves]
                row[key] = {"start": float(np.mean(starts)), "end": float(np.mean(ends))}
                row[key].update(
                    end_min=float(min(ends)), end_max=float(max(ends)), updates=min(x[-1] for x, _ in curves)
                )
        rows.append(row)
    return rows
