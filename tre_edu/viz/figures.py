"""Plotly figure builders: numbers in, ``go.Figure`` out (``as_widget=True`` gives a ``go.FigureWidget``).

Every builder makes the *same traces in the same order* whatever its arguments (a region of K tokens is a trace
with K bars, never a trace that appears or disappears), so a panel can rebuild the figure for new slider values and
copy the traces into a live ``FigureWidget`` (:func:`tre_edu.viz.panels.sync_figure`). The numbers come from
:mod:`tre_edu.entropy` and :mod:`tre_edu.dynamics`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from tre_edu import dynamics as dyn
from tre_edu import entropy as ent
from tre_edu.viz.style import COLORS, finish, method_label

LOG = {"type": "log", "exponentformat": "power"}


def _rank_curve(logits: Tensor, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """A log-spaced grid of ranks and the sorted probabilities there."""
    probs = dyn.sorted_probs(logits)
    grid = dyn.log_rank_grid(probs.size, n=n_points)
    return grid, probs[grid - 1]


def _three_panels(fig: go.Figure, as_widget: bool, title: str, title_size: int, legend_y: float, **layout):
    """The layout of the three-panel figures: a small title on the left, the legend below."""
    title = {"text": title, "font": {"size": title_size}, "x": 0.01}
    legend = {"orientation": "h", "y": legend_y, "x": 0.0, "font": {"size": 11}}
    return finish(fig, as_widget, {"l": 55, "t": 80}, title=title, legend=legend, **layout)


# ---- notebook 01: the trust region of one distribution ---------------------------------------------------


def trust_region_figure(
    logits: Tensor,
    *,
    k: int = 2,
    p: float = 0.99,
    n_bars: int = 20,
    coef: float = 0.001,
    max_candidates: int | None = 256,
    n_points: int = 400,
    height: int = 480,
    width: int | None = None,
    as_widget: bool = False,
) -> go.Figure:
    """Three panels for one next-token distribution ``logits`` ``(V,)``: the ``n_bars`` most likely tokens (the
    TRE-K region highlighted, the TRE-P region marked), probability by rank (log-log) with both regions shaded, and
    the global, TRE-K and TRE-P entropies, raw ``H_TR`` and rescaled ``H_TRE = H_TR log V / log|A_TR|``.

    Traces, in order: 0 "TRE-K region" (bars, exactly K of them when K <= n_bars), 1 "outside TRE-K" (bars),
    2 "TRE-P region" (markers), 3 "p(rank)" (line), 4 "TRE-K region" (shading), 5 "TRE-P region" (shading),
    6 "raw H_TR" (bars), 7 "rescaled" (bars), 8 "log V" (line).
    """
    probs = dyn.sorted_probs(logits)
    v, n_bars = logits.numel(), min(n_bars, logits.numel())
    n_p = int(ent.nucleus_size(logits.detach(), p, max_candidates=max_candidates))
    region = {"k": k, "p": p, "max_candidates": max_candidates}
    raw, rescaled = (
        [float(dyn.regularizer_value(logits, m, rescale=r, **region)) for m in dyn.METHODS] for r in (False, True)
    )
    titles = (f"top {n_bars} of V = {v:,} tokens", "probability by rank (log-log)", "entropy (nats)")
    fig = make_subplots(
        rows=1, cols=3, column_widths=[0.34, 0.36, 0.30], horizontal_spacing=0.07, subplot_titles=titles
    )
    ranks, top = np.arange(1, n_bars + 1), probs[:n_bars]
    in_k, in_p = ranks <= k, ranks <= n_p
    for sel, name, color, where in (
        (in_k, f"TRE-K region (K = {k})", COLORS["tre-k"], "in TRE-K region"),
        (~in_k, "outside TRE-K", COLORS["outside"], "outside"),
    ):
        hover = f"rank %{{x}}<br>p = %{{y:.3g}}<extra>{where}</extra>"
        fig.add_bar(x=ranks[sel], y=top[sel], name=name, marker_color=color, hovertemplate=hover, row=1, col=1)
    marker = {"symbol": "triangle-down", "size": 8, "color": COLORS["tre-p"]}
    name, hover = f"TRE-P region (p = {p:.3g}, |A_TR| = {n_p})", "rank %{x}<extra>in TRE-P region</extra>"
    fig.add_scatter(
        x=ranks[in_p], y=top[in_p] * 1.6, mode="markers", marker=marker, name=name, hovertemplate=hover, row=1, col=1
    )

    grid, y = _rank_curve(logits, n_points)
    y_min = max(float(y.min()) / 3, 1e-300)
    line = {"color": COLORS["start"], "width": 2}
    hover = "rank %{x}<br>p = %{y:.3g}<extra></extra>"
    fig.add_scatter(x=grid, y=y, mode="lines", line=line, name="p(rank)", hovertemplate=hover, row=1, col=2)
    for name, size, color in (("TRE-K region", k, COLORS["tre-k"]), ("TRE-P region", n_p, COLORS["tre-p"])):
        x, box = [0.8, size + 0.4, size + 0.4, 0.8, 0.8], [y_min, y_min, 1.5, 1.5, y_min]
        shade = {"fill": "toself", "fillcolor": color, "opacity": 0.22, "line": {"width": 0}, "hoverinfo": "skip"}
        fig.add_scatter(x=x, y=box, mode="lines", name=f"{name} (shaded, {size} tokens)", row=1, col=2, **shade)

    cell = {"row": 1, "col": 3}
    cats = ["global H", f"TRE-K (K={k})", f"TRE-P (p={p:.3g})"]
    for name, hs, colors, font in (
        ("raw: H, H_TR", raw, ["#f4a3a3", "#9ec5e8", "#a8dba8"], {"size": 10}),
        ("rescaled: H_TRE = H_TR·log V / log|A_TR|", rescaled, [COLORS[m] for m in dyn.METHODS], None),
    ):
        text = {"text": [f"{h:.3f}" for h in hs], "textposition": "outside", "textfont": font}
        fig.add_bar(x=cats, y=hs, name=name, marker_color=colors, **text, **cell)
    log_v, dash = math.log(v), {"dash": "dash", "color": "#777"}
    name = f"log V = {log_v:.2f} (max)"
    fig.add_scatter(x=[cats[0], cats[-1]], y=[log_v] * 2, mode="lines", line=dash, name=name, **cell)

    f_k, f_p = dyn.rescale_factor(v, k), dyn.rescale_factor(v, n_p)
    if k == 1:  # the official code's special case: min-entropy -log max pi, unscaled
        f_k = 1.0
        k_txt = "TRE-K: |A_TR| = 1, min-entropy −log max π (unscaled), effective coef"
    else:
        k_txt = f"TRE-K: |A_TR| = {k}, factor log V/log K = {f_k:.1f}, effective coef {coef:g}×{f_k:.1f} ="
    title = f"{k_txt} {coef * f_k:.4f}<br>TRE-P: |A_TR| = {n_p}, factor {f_p:.1f}, effective {coef * f_p:.4f}"
    fig.update_xaxes(title_text="rank", row=1, col=1)
    fig.update_yaxes(title_text="probability", dtick=1, row=1, col=1, **LOG)
    fig.update_xaxes(title_text="rank", row=1, col=2, **LOG)
    fig.update_yaxes(dtick=2, range=[math.log10(y_min), math.log10(1.5)], row=1, col=2, **LOG)
    fig.update_yaxes(range=[0, log_v * 1.15], row=1, col=3)
    return _three_panels(fig, as_widget, title, 13, -0.18, height=height, width=width, barmode="group")


def gradient_figure(
    logits: Tensor,
    *,
    k: int = 2,
    p: float = 0.99,
    max_candidates: int | None = 256,
    n_points: int = 300,
    height: int = 480,
    width: int | None = None,
    as_widget: bool = False,
) -> go.Figure:
    """``dH/dz`` of every token by rank, for the global entropy, TRE-K and TRE-P (``logits``: shape ``(V,)``).

    Top: ``|dH/dz|`` on log axes, coloured by sign (up = the bonus raises that logit). Bottom: the sign per
    rank for each method (TRE is exactly 0 outside its trust region). The dotted line is the rank where
    ``log pi = -H``: every global-entropy gradient beyond it is positive.

    Traces, in order: 0 "global, up", 1 "global, down", 2 "TRE-K", 3 "TRE-P", 4/5/6 sign rows (+, 0, -),
    7 and 8 the threshold lines.
    """
    dyn._check_logits(logits)
    v = logits.numel()
    order = torch.argsort(logits.detach(), descending=True)
    grads = {
        m: dyn.entropy_gradient(logits, m, k=k, p=p, max_candidates=max_candidates)[order].double().numpy()
        for m in dyn.METHODS
    }
    grid = dyn.log_rank_grid(v, n=n_points, dense_head=32)
    at = {m: g[grid - 1] for m, g in grads.items()}  # the gradients at the plotted ranks
    h = -dyn.sign_threshold(logits)
    below = np.nonzero(torch.log_softmax(logits.detach().double(), -1)[order].numpy() < -h)[0]
    thr_rank = int(below[0]) + 1 if below.size else v

    titles = ("|dH/dz| per token (log scale)", "sign of dH/dz: + raises the logit, − lowers it")
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.68, 0.32], vertical_spacing=0.06, subplot_titles=titles
    )
    g, top = at["entropy"], {"row": 1, "col": 1}
    for sel, y, size, symbol, how in ((g > 0, g, 5, None, "> 0 (raised)"), (g < 0, -g, 7, "x", "< 0 (lowered)")):
        marker, name = {"color": COLORS["entropy"], "size": size, "symbol": symbol}, f"global entropy: dH/dz {how}"
        fig.add_scatter(x=grid[sel], y=y[sel], mode="markers", marker=marker, name=name, **top)
    for m, symbol in (("tre-k", "diamond"), ("tre-p", "square")):
        nz = at[m] != 0
        marker = {"color": COLORS[m], "size": 9, "symbol": symbol, "line": {"width": 1, "color": "white"}}
        name = f"{method_label(m)}: |dH/dz| (exactly 0 for the other {int((grads[m] == 0).sum()):,} tokens)"
        fig.add_scatter(x=grid[nz], y=np.abs(at[m][nz]), mode="markers", marker=marker, name=name, **top)
    labels = [method_label(m) for m in dyn.METHODS]
    ys, xs = np.repeat(np.array(labels, dtype=object), grid.size), np.tile(grid, len(labels))
    signs = np.sign(np.concatenate([at[m] for m in dyn.METHODS]))
    for sign, color, label in ((1, COLORS["entropy"], "+"), (0, COLORS["outside"], "0"), (-1, COLORS["down"], "−")):
        sel, marker = signs == sign, {"color": color, "size": 7, "symbol": "square"}
        fig.add_scatter(x=xs[sel], y=ys[sel], mode="markers", marker=marker, name=f"sign {label}", row=2, col=1)
    pos = np.abs(np.concatenate([g[g != 0], at["tre-k"], at["tre-p"]]))
    pos = pos[pos > 0]
    lo, hi = (float(pos.min()) / 3, float(pos.max()) * 3) if pos.size else (1e-12, 1.0)
    name, line = f"log π = −H (H = {h:.3f}): rank {thr_rank}", {"dash": "dot", "color": "#555"}
    for row, y in ((1, [lo, hi]), (2, [labels[0], labels[-1]])):
        fig.add_scatter(x=[thr_rank] * 2, y=y, mode="lines", line=line, name=name, showlegend=row == 1, row=row, col=1)
    fig.update_xaxes(dtick=1, **LOG)
    fig.update_xaxes(title_text="rank", row=2, col=1)
    fig.update_yaxes(range=[math.log10(lo), math.log10(hi)], title_text="|dH/dz_a|", row=1, col=1, **LOG)
    fig.update_yaxes(categoryorder="array", categoryarray=labels[::-1], title_text="method", row=2, col=1)
    return finish(fig, as_widget, {"t": 40}, height=height, width=width, legend={"font": {"size": 11}})


def effective_coef_figure(
    vocab_sizes: Sequence[int],
    *,
    ks: Sequence[int] = (2, 4, 16),
    coef: float = 0.001,
    height: int = 360,
    as_widget: bool = False,
) -> go.Figure:
    """Effective coefficient ``coef · log V / log K`` of TRE-K against the vocabulary size V (log x axis)."""
    vs = np.asarray(sorted(int(v) for v in vocab_sizes))
    fig = go.Figure()
    for k in ks:
        y = [coef * dyn.rescale_factor(int(v), k) for v in vs]
        fig.add_scatter(x=vs, y=y, mode="lines+markers", name=f"K = {k}")
    fig.add_hline(y=coef, line_dash="dash", annotation_text=f"global entropy: {coef:g} (no rescaling)")
    title = f"effective weight of the TRE-K term, coef = {coef:g}"
    yaxis = {"title": "coef · log V / log K", "rangemode": "tozero"}
    return finish(fig, as_widget, height=height, title=title, xaxis={**LOG, "title": "vocabulary size V"}, yaxis=yaxis)


# ---- notebook 02: tail dilution under an entropy bonus ---------------------------------------------------


def rank_curves_figure(
    curves: Mapping[str, Tensor],
    *,
    colors: Mapping[str, str] | None = None,
    n_points: int = 300,
    title: str = "probability by rank (log-log)",
    height: int = 400,
    as_widget: bool = False,
) -> go.Figure:
    """One log-log line of probability against rank per ``{label: logits (V,)}`` (in the mapping's order)."""
    fig = go.Figure()
    for label, logits in curves.items():
        dyn._check_logits(logits, f"curves[{label!r}]")
        x, y = _rank_curve(logits, n_points)
        color = (colors or {}).get(label)
        fig.add_scatter(x=x, y=y, mode="lines", name=label, line={"color": color} if color else None)
    axes = {"xaxis": {**LOG, "title": "rank"}, "yaxis": {**LOG, "title": "probability"}}
    return finish(fig, as_widget, height=height, title=title, **axes)


def tail_mass_figure(
    results: Mapping[tuple[str, int], dyn.AscentResult],
    *,
    log_y: bool = True,
    height: int = 420,
    as_widget: bool = False,
) -> go.Figure:
    """Tail mass (outside the top-k) by ascent step, one line per ``(method, V)`` of ``dyn.ascent_sweep``.

    Colour = method, line style = V (solid for the largest V).
    """
    vs = sorted({v for _, v in results})
    dashes = ["dot", "dash", "dashdot", "longdash", "solid"]
    style = {v: dashes[max(len(dashes) - len(vs) + i, 0)] for i, v in enumerate(vs)}
    fig = go.Figure()
    for (method, v), res in results.items():
        line, name = {"color": COLORS.get(method), "dash": style[v], "width": 2}, f"{method_label(method)}, V = {v:,}"
        fig.add_scatter(x=res.steps, y=res.tail_mass, mode="lines", name=name, line=line)
    k = next(iter(results.values())).tail_k if results else 0
    title = f"mass outside the top {k} tokens during entropy ascent"
    yaxis = {**LOG, "title": "tail mass", "type": "log" if log_y else "linear"}
    return finish(fig, as_widget, height=height, title=title, xaxis={"title": "ascent step"}, yaxis=yaxis)


def _clean_traces(eps: Mapping[str, float], t_max: int, t_mark: int, colors, show_mark: bool, text: bool = True):
    """``P(clean) = (1 - eps)^T`` for each ``{label: eps}``: lines over a log grid of T in ``[1, t_max]``, then one
    marker per label at ``T = t_mark`` (with its value as ``text``), then the vertical line ``T = t_mark``
    (markers and line visible with ``show_mark``)."""
    ts = np.unique(np.round(np.geomspace(1, t_max, 200)).astype(np.int64))
    lines, marks = [], []
    for label, e in eps.items():
        name, color, val = method_label(label), colors.get(label), float(dyn.clean_response_probability(e, t_mark)[0])
        line = {"color": color, "dash": "dot" if label == "start" else "solid"}
        y = dyn.clean_response_probability(e, ts)
        lines.append(go.Scatter(x=ts, y=y, mode="lines", name=f"{name} (ε = {e:.2g})", line=line))
        hover = f"{name}<br>ε = {e:.3g}<br>P = %{{y:.4g}}<extra></extra>"
        value = {"mode": "markers+text" if text else "markers", "text": [f"{val:.3g}"], "textposition": "middle right"}
        mark = go.Scatter(x=[t_mark], y=[val], marker={"size": 9, "color": color}, hovertemplate=hover, **value)
        marks.append(mark.update(name=f"{name}: P(clean, T={t_mark}) = {val:.3g}", showlegend=False, visible=show_mark))
    line = {"dash": "dot", "color": "#555"}
    rule = go.Scatter(x=[t_mark] * 2, y=[0, 1.05], mode="lines", line=line, name=f"T = {t_mark}", visible=show_mark)
    return [*lines, *marks, rule]


def clean_response_figure(
    eps: Mapping[str, float],
    *,
    t_max: int = 8192,
    mark_t: int | None = None,
    colors: Mapping[str, str] | None = None,
    height: int = 400,
    as_widget: bool = False,
) -> go.Figure:
    """``P(clean) = prod_t (1 - eps_t) = (1 - eps)^T`` against the horizon T (log x), one line per ``{label: eps}``.

    With ``mark_t`` a dotted vertical line and one marker per curve show the value at that T.
    Traces: one line per label, then one marker trace per label, then the vertical line.
    """
    if t_max < 1:
        raise ValueError(f"t_max must be >= 1; got {t_max}")
    t_mark = t_max if mark_t is None else int(mark_t)
    fig = go.Figure(_clean_traces(eps, t_max, t_mark, colors or {}, show_mark=mark_t is not None))
    title = "chance that a T-token response never samples a tail token: ∏(1 − ε_t)"
    xaxis, yaxis = {**LOG, "title": "response length T (tokens)"}, {"title": "P(clean response)", "range": [0, 1.05]}
    return finish(fig, as_widget, height=height, title=title, xaxis=xaxis, yaxis=yaxis)


def tail_dilution_figure(
    results: Mapping[str, dyn.AscentResult],
    *,
    horizon: int = 1024,
    t_max: int = 8192,
    coef: float | None = None,
    n_points: int = 250,
    height: int = 460,
    width: int | None = None,
    as_widget: bool = False,
) -> go.Figure:
    """Three panels for ``{method: AscentResult}`` runs from the same logits ``(V,)``: probability by rank at the
    start and the end of each run, the tail mass (outside the top ``tail_k``) over the steps, and
    ``P(clean) = (1 - eps)^T`` against T with ``eps`` = the final (and the start's) tail mass, marked at ``horizon``.

    Traces, in order: rank curves (start, then one per method), tail-mass lines (one per method),
    clean-response lines (start, then one per method), clean-response markers at ``horizon`` (same order),
    the ``T`` line.
    """
    if not results:
        raise ValueError("results must hold at least one AscentResult")
    if not 1 <= horizon <= t_max:
        raise ValueError(f"horizon must be in [1, t_max={t_max}]; got {horizon}")
    first = next(iter(results.values()))
    v, tail_k, n_steps = first.vocab_size, first.tail_k, int(first.steps[-1])
    titles = [f"probability by rank, V = {v:,}", f"mass outside the top {tail_k}"]
    titles.append(f"P(clean response of T tokens), T = {horizon:,}")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08, subplot_titles=titles)
    x, y = _rank_curve(first.initial_logits, n_points)
    fig.add_scatter(x=x, y=y, mode="lines", name="start", line={"color": COLORS["start"], "width": 3}, row=1, col=1)
    for m, res in results.items():
        x, y = _rank_curve(res.final_logits, n_points)
        line = {"color": COLORS.get(m), "dash": "dash" if m != "entropy" else "solid"}
        name = f"{method_label(m)} after {n_steps} steps"
        fig.add_scatter(x=x, y=y, mode="lines", name=name, line=line, row=1, col=1)
    for m, res in results.items():
        line = {"color": COLORS.get(m), "width": 2}
        fig.add_scatter(x=res.steps, y=res.tail_mass, mode="lines", line=line, showlegend=False, row=1, col=2)
    eps = {"start": float(first.tail_mass[0]), **{m: float(res.tail_mass[-1]) for m, res in results.items()}}
    for trace in _clean_traces(eps, t_max, horizon, COLORS, show_mark=True, text=False):
        fig.add_trace(trace.update(showlegend=False), row=1, col=3)
    summary = "  ·  ".join(
        f"{method_label(lbl)}: ε = {e:.2g}, P(clean) = {float(dyn.clean_response_probability(e, horizon)[0]):.3g}"
        for lbl, e in eps.items()
    )
    coef_txt = f"coef = {coef:g}, " if coef is not None else ""
    fig.update_xaxes(title_text="rank", col=1, **LOG)
    fig.update_xaxes(title_text="ascent step", col=2)
    fig.update_xaxes(title_text="T (tokens)", col=3, **LOG)
    fig.update_yaxes(col=1, **LOG)
    fig.update_yaxes(col=2, **LOG)
    fig.update_yaxes(range=[0, 1.05], col=3)
    title = f"{coef_txt}T = {horizon:,}<br>{summary}"
    return _three_panels(fig, as_widget, title, 12, -0.2, height=height, width=width)
