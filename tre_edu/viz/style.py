"""One colour and one label per method, shared by every figure (names are the config's ``regularizer.kind``)."""

from __future__ import annotations

import plotly.graph_objects as go

TEMPLATE = "plotly_white"

COLORS = {
    "none": "#444444",  # vanilla PPO: dark grey
    "entropy": "#d62728",  # red: the global entropy bonus
    "tre-k": "#1f77b4",  # blue
    "tre-p": "#2ca02c",  # green
    "forking": "#9467bd",  # purple
    "kl-cov": "#ff7f0e",  # orange
    "clip-cov": "#8c564b",  # brown
    "start": "#444444",  # the distribution / policy before any update
    "outside": "#c7c7c7",  # tokens outside a trust region, zero gradients
    "down": "#1f77b4",  # a negative gradient sign
}
LABELS = {"none": "no bonus", "entropy": "global entropy", "tre-k": "TRE-K", "tre-p": "TRE-P", "start": "start"}
_SPARE = ("#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39")


def method_label(method: str) -> str:
    """The plot label of a method: ``"entropy"`` -> ``"global entropy"``; unknown names unchanged."""
    return LABELS.get(method, method)


def run_color(name: str, used: dict[str, str]) -> str:
    """The colour of a run called ``name`` (``used``: name -> colour so far, updated).

    A run named after a method (its first word, e.g. ``"tre-k α=1e-3"``) gets that method's colour unless another
    run already has it; otherwise the first spare colour.
    """
    if name not in used:
        color = COLORS.get((name.split() or [""])[0].split("·")[0])
        if color is None or color in used.values():
            free = [c for c in _SPARE if c not in used.values()]
            color = free[0] if free else _SPARE[len(used) % len(_SPARE)]
        used[name] = color
    return used[name]


def finish(fig: go.Figure, as_widget: bool, margin: dict[str, int] | None = None, **layout) -> go.Figure:
    """Apply the template, ``margin`` (over l=60, r=20, t=50, b=40) and ``layout``; a ``FigureWidget`` with
    ``as_widget``."""
    fig.update_layout(template=TEMPLATE, margin={"l": 60, "r": 20, "t": 50, "b": 40, **(margin or {})}, **layout)
    return go.FigureWidget(fig) if as_widget else fig
