"""Plotly figures and ipywidgets panels for the notebooks (no training logic lives here).

- :mod:`tre_edu.viz.figures`: functions from numbers to ``plotly.graph_objects.Figure`` (or ``FigureWidget``).
- :mod:`tre_edu.viz.panels`: sliders that recompute with :mod:`tre_edu.dynamics` and update a ``FigureWidget``
  in place (``batch_update``), so the plot changes without being redrawn from scratch.

Set ``TRE_EDU_FAST=1`` to make the notebooks use small sizes (see :func:`fast_mode`).
"""

from __future__ import annotations

import os

_FALSE = ("", "0", "false", "no", "off")


def fast_mode() -> bool:
    """True when the environment variable ``TRE_EDU_FAST`` is set to something other than 0/false/no/off.

    The notebooks read it to shrink vocabularies, step counts and horizons so that they run in seconds
    (tests, CI); unset, they use the real sizes (e.g. V = 151,936 as Qwen2.5).
    """
    return os.environ.get("TRE_EDU_FAST", "").strip().lower() not in _FALSE


def pick(default, fast):
    """``fast`` in fast mode (see :func:`fast_mode`), else ``default``: ``V = pick(151_936, 8_192)``."""
    return fast if fast_mode() else default


from tre_edu.viz.figures import (  # noqa: E402
    clean_response_figure,
    effective_coef_figure,
    gradient_figure,
    rank_curves_figure,
    tail_dilution_figure,
    tail_mass_figure,
    trust_region_figure,
)
from tre_edu.viz.panels import TailDilutionPanel, TrustRegionPanel, sync_figure  # noqa: E402
from tre_edu.viz.training import (  # noqa: E402
    FAST_OVERRIDES,
    LiveDashboard,
    RecordedRun,
    RunLauncher,
    comparison_figure,
    comparison_table,
    load_recorded_runs,
)

__all__ = [
    "fast_mode",
    "pick",
    "trust_region_figure",
    "gradient_figure",
    "rank_curves_figure",
    "tail_mass_figure",
    "tail_dilution_figure",
    "clean_response_figure",
    "effective_coef_figure",
    "TrustRegionPanel",
    "TailDilutionPanel",
    "sync_figure",
    "LiveDashboard",
    "RunLauncher",
    "RecordedRun",
    "comparison_figure",
    "comparison_table",
    "load_recorded_runs",
    "FAST_OVERRIDES",
]
