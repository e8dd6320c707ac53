"""ipywidgets panels: sliders that recompute with the library and update plotly ``FigureWidget``s in place.

A panel is an ``ipywidgets.VBox`` (display it as the last expression of a cell). Sliders use
``continuous_update=False``: the work runs once, when the handle is released.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ipywidgets as widgets
import plotly.graph_objects as go
from torch import Tensor

from tre_edu import dynamics as dyn
from tre_edu.viz import figures


def sync_figure(widget: go.FigureWidget, new: go.Figure) -> None:
    """Copy the traces, titles, annotations, shapes and axis ranges of ``new`` into ``widget`` in one
    ``batch_update`` (one message to the browser, no flicker); both must come from the same builder."""
    if len(widget.data) != len(new.data):
        raise ValueError(f"new must have the same traces as widget: {len(new.data)} != {len(widget.data)}")
    with widget.batch_update():
        for old_trace, new_trace in zip(widget.data, new.data):
            props = {k: v for k, v in new_trace.to_plotly_json().items() if k not in ("type", "uid")}
            old_trace.update(props, overwrite=True)
        widget.layout.title = new.layout.title
        widget.layout.annotations = new.layout.annotations
        widget.layout.shapes = new.layout.shapes
        for name in new.layout.to_plotly_json():
            if name.startswith(("xaxis", "yaxis")):
                widget.layout[name].range = new.layout[name].range


class TrustRegionPanel(widgets.VBox):
    """Sliders "K" and "p" over one distribution ``logits`` (shape ``(V,)``): ``figure`` (the trust region and
    the entropies, :func:`~tre_edu.viz.figures.trust_region_figure`) and ``gradient`` (the per-token gradients,
    :func:`~tre_edu.viz.figures.gradient_figure`; None with ``show_gradient=False``), updated in place."""

    def __init__(
        self,
        logits: Tensor,
        *,
        k: int = 2,
        p: float = 0.99,
        n_bars: int = 20,
        coef: float = 0.001,
        k_max: int = 16,
        show_gradient: bool = True,
        max_candidates: int | None = 256,
        width: int | None = 960,
    ) -> None:
        self.logits = dyn._check_logits(logits).detach()
        self.n_bars, self.coef, self.max_candidates, self.width = n_bars, coef, max_candidates, width
        slider = {"continuous_update": False, "style": {"description_width": "2em"}}
        k_max = min(k_max, self.logits.numel())
        self.k_slider = widgets.IntSlider(value=k, min=1, max=k_max, description="K", **slider)
        self.p_slider = widgets.FloatSlider(
            value=p, min=0.5, max=0.999, step=0.001, readout_format=".3f", description="p", **slider
        )
        main, grad = self._figures(show_gradient)
        self.figure, self.gradient = go.FigureWidget(main), None if grad is None else go.FigureWidget(grad)
        self.k_slider.observe(self.update, names="value")
        self.p_slider.observe(self.update, names="value")
        children = [widgets.HBox([self.k_slider, self.p_slider]), self.figure, self.gradient]
        super().__init__(children=[c for c in children if c is not None])

    def _figures(self, gradient: bool = True) -> tuple[go.Figure, go.Figure | None]:
        """Both figures for the current slider values (the gradient one only with ``gradient``)."""
        kw = {"k": int(self.k_slider.value), "p": float(self.p_slider.value), "max_candidates": self.max_candidates}
        main = figures.trust_region_figure(self.logits, n_bars=self.n_bars, coef=self.coef, width=self.width, **kw)
        return main, figures.gradient_figure(self.logits, width=self.width, **kw) if gradient else None

    def update(self, _change=None) -> None:
        """Recompute both figures for the current slider values (``_change``: the slider event, unused)."""
        main, grad = self._figures(self.gradient is not None)
        sync_figure(self.figure, main)
        if grad is not None:
            sync_figure(self.gradient, grad)


class TailDilutionPanel(widgets.VBox):
    """Sliders "V", "T" and "coef": entropy ascent of each method on ``realistic_logits(V)`` and the chance of a
    clean response of T tokens (:func:`~tre_edu.viz.figures.tail_dilution_figure`). V and coef rerun
    :func:`tre_edu.dynamics.entropy_ascent` for every method (cached); T only moves the markers."""

    def __init__(
        self,
        vocab_sizes: Sequence[int] = (1_000, 8_000, 32_000, 151_936),
        horizons: Sequence[int] = (16, 64, 256, 1024, 4096, 8192),
        *,
        vocab_size: int | None = None,
        horizon: int | None = None,
        coef: float = 1.0,
        coef_range: tuple[float, float] = (-1.5, 0.25),
        steps: int = 150,
        record_every: int = 5,
        n_plausible: int = 5,
        seed: int = 0,
        methods: Sequence[str] = dyn.METHODS,
        k: int = 2,
        p: float = 0.99,
        optimizer: str = "sgd",
        lr: float = 1.0,
        width: int | None = 960,
    ) -> None:
        vocab_sizes, horizons = [int(v) for v in vocab_sizes], [int(t) for t in horizons]
        dyn._check(bool(vocab_sizes and horizons), "vocab_sizes and horizons must not be empty")
        vocab_size = vocab_sizes[-1] if vocab_size is None else int(vocab_size)
        horizon = horizons[len(horizons) // 2] if horizon is None else int(horizon)
        dyn._check(vocab_size in vocab_sizes, f"vocab_size must be one of vocab_sizes {vocab_sizes}; got {vocab_size}")
        dyn._check(horizon in horizons, f"horizon must be one of horizons {horizons}; got {horizon}")
        self.methods = tuple(dyn._check_method(m) for m in methods)
        kw = {"k": k, "p": p, "optimizer": optimizer, "lr": lr, "record_every": record_every}
        self.ascent_kwargs = {"steps": steps, "tail_k": n_plausible, **kw}
        self.n_plausible, self.seed, self.width, self.t_max = n_plausible, seed, width, max(horizons)
        self._cache: dict[tuple[int, float], dict[str, dyn.AscentResult]] = {}
        slider = {"continuous_update": False, "style": {"description_width": "3em"}}
        v_options, t_options = [(f"{v:,}", v) for v in vocab_sizes], [(f"{t:,}", t) for t in horizons]
        self.v_slider = widgets.SelectionSlider(options=v_options, value=vocab_size, description="V", **slider)
        self.t_slider = widgets.SelectionSlider(options=t_options, value=horizon, description="T", **slider)
        log10 = {"base": 10, "min": coef_range[0], "max": coef_range[1], "step": 0.125, "readout_format": ".3g"}
        self.coef_slider = widgets.FloatLogSlider(value=coef, description="coef", **log10, **slider)
        self.status = widgets.HTML()
        self.figure = figures.tail_dilution_figure(self._results(), **self._fig_kwargs(), as_widget=True)
        for s in (self.v_slider, self.t_slider, self.coef_slider):
            s.observe(self.update, names="value")
        controls = widgets.HBox([self.v_slider, self.coef_slider, self.t_slider])
        super().__init__(children=[controls, self.status, self.figure])

    def _fig_kwargs(self) -> dict:
        horizon, coef = int(self.t_slider.value), float(self.coef_slider.value)
        return {"horizon": horizon, "t_max": self.t_max, "coef": coef, "width": self.width}

    def _results(self) -> dict[str, dyn.AscentResult]:
        key = (int(self.v_slider.value), round(float(self.coef_slider.value), 12))
        if key not in self._cache:
            t0 = time.perf_counter()
            start = dyn.realistic_logits(key[0], self.n_plausible, self.seed)
            self._cache[key] = {
                m: dyn.entropy_ascent(start, m, coef=key[1], **self.ascent_kwargs) for m in self.methods
            }
            self.status.value = (
                f"<small>{self.ascent_kwargs['steps']} ascent steps × {len(self.methods)} methods at "
                f"V = {key[0]:,}: {time.perf_counter() - t0:.2f} s</small>"
            )
        return self._cache[key]

    def update(self, _change=None) -> None:
        """Recompute (or fetch from the cache) the runs for the current V and coef; redraw for T."""
        sync_figure(self.figure, figures.tail_dilution_figure(self._results(), **self._fig_kwargs()))
