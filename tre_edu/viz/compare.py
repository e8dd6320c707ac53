"""Several methods side by side: a three-panel figure and a plain-text table, means over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tre_edu.viz.records import RecordedRun, finite, group_runs, is_single_run, last_value, normalize_run, series
from tre_edu.viz.style import finish, run_color

Members = list[tuple[list[dict], list[dict]]]  # (history, eval_history) per seed


def _groups(runs: Mapping[str, Any], group: bool) -> dict[str, Members]:
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError("runs must be a non-empty dict name -> run (or list of runs over seeds)")
    if group and all(isinstance(r, RecordedRun) for r in runs.values()):
        runs = group_runs(runs)
    return {
        str(name): [normalize_run(m, str(name)) for m in ([value] if is_single_run(value) else value)]
        for name, value in runs.items()
    }


def _finals_and_starts(members: Members, key: str) -> tuple[list[float], list[float]]:
    """Per seed: the last evaluation's ``key`` and the first evaluation's (the start)."""
    finals = [f for f in (last_value(e, key) for _, e in members) if f is not None]
    starts = [float(e[0][key]) for _, e in members if e and finite(e[0].get(key))]
    return finals, starts


def _mean_curve(members: list[list[dict]], key: str, smooth: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps (where any seed has ``key``), the mean over seeds there, and the (min, max) band, shape (2, n)."""
    per_step: dict[float, list[float]] = {}
    for records in members:
        xs, ys = series(records, key)
        if smooth > 1:  # trailing moving average over the last `smooth` points
            ys = [float(np.mean(ys[max(0, i - smooth + 1) : i + 1])) for i in range(len(ys))]
        for x, y in zip(xs, ys):
            per_step.setdefault(x, []).append(y)
    steps = np.array(sorted(per_step))
    vals = [per_step[s] for s in steps]
    band = np.array([[min(v) for v in vals], [max(v) for v in vals]]).reshape(2, len(vals))
    return steps, np.array([np.mean(v) for v in vals]), band


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    return (float(np.mean(values)) if values else None), (float(np.std(values, ddof=1)) if len(values) >= 2 else None)


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
    """Several methods side by side, means over seeds: the final ``accuracy_key`` (bars = mean, error bars = std
    over seeds (n >= 2), dots = seeds, grey dash = start), ``accuracy_key`` over PPO steps, and ``tail_key`` over
    PPO steps (log y) with the min-max band over seeds (``smooth`` > 1: a trailing mean).

    ``runs``: ``name -> run`` or ``name -> [run, ...]`` (seeds), a run being anything :func:`normalize_run` reads;
    :class:`RecordedRun` values are grouped by :func:`group_runs` when ``group`` is True.
    """
    if not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be an integer >= 1; got {smooth!r}")
    groups = _groups(runs, group)
    acc_name, tail_name = (key.split("/")[-1].replace("_", " ") for key in (accuracy_key, tail_key))
    titles = (f"final {acc_name}", "held-out accuracy during PPO", f"{tail_name} (log)")
    fig = make_subplots(rows=1, cols=3, column_widths=[0.3, 0.35, 0.35], horizontal_spacing=0.08, subplot_titles=titles)
    colors: dict[str, str] = {}
    for i, (name, members) in enumerate(groups.items()):
        color = run_color(name, colors)
        line = {"legendgroup": name, "showlegend": False, "line": {"color": color}, "name": name}
        finals, starts = _finals_and_starts(members, accuracy_key)
        mean, std = _mean_std(finals)
        hover = f"{name}<br>mean %{{y:.3f}} over {len(finals)} seed(s)<extra></extra>"
        error = {"type": "data", "array": [std], "visible": std is not None}
        text = [f"{mean:.3f}" if mean is not None else "n/a"]
        bar = {"name": name, "legendgroup": name, "marker_color": color, "hovertemplate": hover}
        fig.add_bar(x=[name], y=[mean], error_y=error, text=text, textposition="outside", row=1, col=1, **bar)
        seeds = {"color": "black", "size": 6, "symbol": "circle-open"}
        fig.add_scatter(x=[name] * len(finals), y=finals, mode="markers", marker=seeds, row=1, col=1, **line)
        if starts:
            dash = {"color": "#888888", "size": 22, "symbol": "line-ew", "line": {"width": 3}}
            start = {"name": "start (warm start)", "legendgroup": "start", "showlegend": i == 0}
            fig.add_scatter(x=[name], y=[float(np.mean(starts))], mode="markers", marker=dash, row=1, col=1, **start)
        steps, acc, _ = _mean_curve([e for _, e in members], accuracy_key, 1)
        fig.add_scatter(x=steps, y=acc, mode="lines+markers", row=1, col=2, **line)
        steps, tail, (lo, hi) = _mean_curve([h for h, _ in members], tail_key, smooth)
        keep = tail > 0  # a log axis cannot show 0
        if len(members) > 1 and keep.any():  # the min-max band over seeds, as one closed polygon
            xs = np.concatenate([steps[keep], steps[keep][::-1]])
            ys = np.concatenate([hi[keep], lo[keep][::-1]])
            band = {**line, "line": {"width": 0}, "name": f"{name}: seed range"}
            ys = np.where(ys > 0, ys, np.nan)
            fig.add_scatter(
                x=xs, y=ys, fill="toself", fillcolor=color, opacity=0.15, hoverinfo="skip", row=1, col=3, **band
            )
        fig.add_scatter(x=steps[keep], y=tail[keep], mode="lines", row=1, col=3, **line)
    fig.update_yaxes(title_text="accuracy", rangemode="tozero", col=1)
    fig.update_yaxes(title_text="accuracy", rangemode="tozero", col=2)
    fig.update_yaxes(type="log", exponentformat="power", col=3)
    fig.update_xaxes(title_text="PPO step", col=2)
    fig.update_xaxes(title_text="PPO step", col=3)
    layout = {"height": height, "width": width, "title": title, "legend": {"orientation": "h", "y": -0.2}}
    return finish(fig, as_widget, {"t": 70, "b": 60}, barmode="overlay", **layout)


def comparison_table(runs: Mapping[str, Any], *, accuracy_key: str = "eval/greedy_accuracy", group=True) -> str:
    """A plain-text table: per method the number of seeds, start and final ``accuracy_key`` (mean ± std) and
    the mass outside the top 10 over the first and the last 10 % of steps (mean over seeds)."""
    groups = _groups(runs, group)
    width = max(12, *(len(n) for n in groups))
    lines = [
        f"{'method':{width}s} seeds  {'start':>6s}  {'final (mean ± std)':>18s}  {'tail@start':>10s}  {'tail@end':>10s}"
    ]
    for name, members in groups.items():
        finals, starts = _finals_and_starts(members, accuracy_key)
        tails = [ys for _, ys in (series(h, "tail/mass_outside_top10") for h, _ in members) if ys]
        cuts = [math.ceil(len(ys) / 10) for ys in tails]  # the first and the last 10 % of the steps
        tails0 = [float(np.mean(ys[:n])) for ys, n in zip(tails, cuts)]
        tails1 = [float(np.mean(ys[-n:])) for ys, n in zip(tails, cuts)]
        mean, std = _mean_std(finals)
        fin = "n/a" if mean is None else f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
        st = f"{np.mean(starts):.3f}" if starts else "n/a"
        t0 = f"{np.mean(tails0):.2e}" if tails0 else "n/a"
        t1 = f"{np.mean(tails1):.2e}" if tails1 else "n/a"
        lines.append(f"{name:{width}s} {len(members):5d}  {st:>6s}  {fin:>18s}  {t0:>10s}  {t1:>10s}")
    return "\n".join(lines)
