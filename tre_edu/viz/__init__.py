"""Plotly figures and ipywidgets panels for the notebooks; viz draws and never trains.

- :mod:`~tre_edu.viz.figures`: numbers in, ``go.Figure`` out (one distribution, its entropies, tail dilution).
- :mod:`~tre_edu.viz.panels`: sliders that recompute with :mod:`tre_edu.dynamics` and update a ``FigureWidget``.
- :mod:`~tre_edu.viz.records`: run histories in one form; the recorded runs on disk.
- :mod:`~tre_edu.viz.dashboard`: :class:`LiveDashboard`, a trainer callback that plots metrics as they arrive.
- :mod:`~tre_edu.viz.compare`: methods side by side (figure and table, means over seeds).
- :mod:`~tre_edu.viz.launcher`: :class:`RunLauncher`, widgets around :func:`tre_edu.pipeline.run_training`.
- :mod:`~tre_edu.viz.style`: one colour and one label per method.

``fast_mode`` / ``pick`` are :mod:`tre_edu.env`'s (``TRE_EDU_FAST=1``: small sizes for tests and CI).
"""

from tre_edu.env import fast_mode, pick
from tre_edu.viz.compare import comparison_figure, comparison_table
from tre_edu.viz.dashboard import LiveDashboard
from tre_edu.viz.figures import (
    clean_response_figure,
    effective_coef_figure,
    gradient_figure,
    rank_curves_figure,
    tail_dilution_figure,
    tail_mass_figure,
    trust_region_figure,
)
from tre_edu.viz.launcher import METHODS, RunLauncher
from tre_edu.viz.panels import TailDilutionPanel, TrustRegionPanel, sync_figure
from tre_edu.viz.records import RecordedRun, load_recorded_runs

__all__ = [
    "METHODS",
    "LiveDashboard",
    "RecordedRun",
    "RunLauncher",
    "TailDilutionPanel",
    "TrustRegionPanel",
    "clean_response_figure",
    "comparison_figure",
    "comparison_table",
    "effective_coef_figure",
    "fast_mode",
    "gradient_figure",
    "load_recorded_runs",
    "pick",
    "rank_curves_figure",
    "sync_figure",
    "tail_dilution_figure",
    "tail_mass_figure",
    "trust_region_figure",
]
