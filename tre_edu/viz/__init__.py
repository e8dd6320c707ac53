"""Plotly figures and ipywidgets panels for the notebooks; viz draws and never trains.

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

__all__ = ["METHODS", "LiveDashboard", "RecordedRun", "RunLauncher", "TailDilutionPanel", "TrustRegionPanel"]
__all__ += ["clean_response_figure", "comparison_figure", "comparison_table", "effective_coef_figure", "fast_mode"]
__all__ += ["gradient_figure", "load_recorded_runs", "pick", "rank_curves_figure", "sync_figure"]
__all__ += ["tail_dilution_figure", "tail_mass_figure", "trust_region_figure"]
