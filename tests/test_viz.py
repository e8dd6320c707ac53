"""Tests for tre_edu.viz: figures build with the expected traces; panels update their FigureWidgets."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from tre_edu import dynamics as dyn
from tre_edu import env, viz
from tre_edu.config import KINDS
from tre_edu.viz import figures, style


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return dyn.realistic_logits(3_000, n_plausible=5, seed=0)


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_fast_mode(monkeypatch, value, expected):
    monkeypatch.setenv("TRE_EDU_FAST", value)
    assert viz.fast_mode() is expected
    assert viz.pick("big", "small") == ("small" if expected else "big")


def test_fast_mode_unset(monkeypatch):
    monkeypatch.delenv("TRE_EDU_FAST", raising=False)
    assert viz.fast_mode() is False
    assert viz.fast_mode is env.fast_mode and viz.pick is env.pick  # one definition, in tre_edu.env


def test_one_name_and_one_colour_per_method():
    assert set(dyn.METHODS) <= set(KINDS) and set(viz.METHODS) <= set(KINDS)  # the config's regularizer.kind
    assert all(m in style.COLORS for m in KINDS)
    assert style.method_label("entropy") == "global entropy" and style.method_label("tre-k") == "TRE-K"
    used: dict[str, str] = {}
    assert style.run_color("entropy α=1e-3", used) == style.COLORS["entropy"]
    assert style.run_color("entropy s1", used) != style.COLORS["entropy"]  # taken: a spare colour
    assert style.run_color("entropy α=1e-3", used) == style.COLORS["entropy"]  # a run keeps its colour


@pytest.mark.parametrize("k", [1, 2, 5])
def test_trust_region_figure(z, k):
    fig = viz.trust_region_figure(z, k=k, p=0.99, n_bars=20)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert len(fig.data) == 9
    assert len(fig.data[0].x) == k and len(fig.data[1].x) == 20 - k  # highlighted + other bars
    assert fig.data[0].type == fig.data[6].type == fig.data[7].type == "bar"
    assert f"K = {k}" in fig.data[0].name
    assert f"|A_TR| = {k}" in fig.layout.title.text
    assert fig.layout.xaxis2.type == "log" and fig.layout.yaxis2.type == "log"
    raw, rescaled = fig.data[6].y, fig.data[7].y
    assert raw[0] == pytest.approx(rescaled[0])  # global entropy is not rescaled
    if k > 1:
        assert rescaled[1] == pytest.approx(raw[1] * dyn.rescale_factor(3_000, k), rel=1e-4)
    assert isinstance(viz.trust_region_figure(z, k=k, as_widget=True), go.FigureWidget)


def test_trust_region_figure_rejects_bad_k(z):
    with pytest.raises(ValueError):
        viz.trust_region_figure(z, k=0)
    with pytest.raises(ValueError):
        viz.trust_region_figure(z, p=1.5)


def test_gradient_figure_signs(z):
    fig = viz.gradient_figure(z, k=2, p=0.99)
    assert len(fig.data) == 9
    up, down, tre_k, tre_p = fig.data[:4]
    assert len(up.x) > 100 and min(up.x) > 1  # the global bonus raises the whole tail
    assert len(tre_k.x) == 2  # TRE-K: non-zero gradient only on the top 2
    assert all(r <= 5 for r in tre_p.x)
    assert "exactly 0 for the other 2,998 tokens" in tre_k.name
    plus, zero, minus = fig.data[4:7]
    assert set(zero.y) == {"TRE-K", "TRE-P"}  # only TRE has zero gradients
    assert "global entropy" in set(plus.y)
    assert (fig.layout.yaxis.title.text, fig.layout.yaxis2.title.text) == ("|dH/dz_a|", "method")  # both axes named


def test_small_figures(z):
    res = dyn.ascent_sweep([200, 400], ("entropy", "tre-k"), steps=5, coef=0.5)
    fig = viz.tail_mass_figure(res)
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"
    assert len(viz.rank_curves_figure({"a": z, "b": z * 0.5}).data) == 2
    fig = viz.clean_response_figure({"x": 0.01, "y": 0.001}, t_max=1000, mark_t=100)
    assert len(fig.data) == 5 and fig.data[2].x[0] == 100
    assert fig.data[2].y[0] == pytest.approx(0.99**100)
    assert len(viz.effective_coef_figure([1000, 151_936], ks=(2, 4)).data) == 2
    runs = {m: res[(m, 400)] for m in ("entropy", "tre-k")}
    fig = viz.tail_dilution_figure(runs, horizon=64, t_max=1024)
    assert len(fig.data) == 3 + 2 + 3 + 3 + 1
    with pytest.raises(ValueError):
        viz.tail_dilution_figure(runs, horizon=4096, t_max=1024)


def test_trust_region_panel_updates_in_place(z):
    panel = viz.TrustRegionPanel(z, k=2, p=0.99)
    assert panel.k_slider.description == "K" and panel.p_slider.description == "p"
    fig, grad = panel.figure, panel.gradient
    assert isinstance(fig, go.FigureWidget) and len(fig.data[0].x) == 2
    panel.k_slider.value = 4
    assert panel.figure is fig and len(fig.data[0].x) == 4  # same widget, new data
    assert "|A_TR| = 4" in fig.layout.title.text
    assert len(grad.data[2].x) == 4
    panel.p_slider.value = 0.5
    assert "p = 0.5" in fig.data[2].name


def test_tail_dilution_panel_updates_in_place():
    panel = viz.TailDilutionPanel(vocab_sizes=(200, 400), horizons=(16, 64, 256), steps=5, coef=0.5)
    assert [s.description for s in (panel.v_slider, panel.t_slider, panel.coef_slider)] == ["V", "T", "coef"]
    fig = panel.figure
    assert len(panel._cache) == 1
    panel.t_slider.value = 256
    assert len(panel._cache) == 1 and fig.data[-1].x[0] == 256  # T only moves the markers
    panel.v_slider.value = 200
    assert len(panel._cache) == 2 and "V = 200" in fig.layout.annotations[0].text
    with pytest.raises(ValueError):
        viz.TailDilutionPanel(vocab_sizes=(200,), vocab_size=300)


def test_sync_figure_rejects_other_traces(z):
    widget = viz.trust_region_figure(z, as_widget=True)
    with pytest.raises(ValueError):
        viz.sync_figure(widget, figures.rank_curves_figure({"a": z}))
