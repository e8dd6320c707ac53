"""A launcher panel: sliders for one short PPO run and a "Train" button that calls :mod:`tre_edu.pipeline`."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from tre_edu.config import KINDS
from tre_edu.models.tiny import alphabet
from tre_edu.pipeline import run_training, run_warm_start
from tre_edu.regularizers import ENTROPY_KINDS, KIND_SETTINGS, Regularizer
from tre_edu.viz.dashboard import LiveDashboard
from tre_edu.viz.records import finite

# The methods of the paper's comparison (clip-cov is a sibling of KL-Cov, available in the library).
METHODS = tuple(k for k in KINDS if k != "clip-cov")

_NOTES = {
    "forking": "Forking tokens: the policy-gradient loss only on the 20% highest-entropy tokens.",
    "kl-cov": "KL-Cov: |log π − log π_old| penalty (coef 1) on the top 0.2% tokens by Cov(A, log π).",
    "none": "Vanilla PPO: no exploration term.",
}


class RunLauncher:
    """Widgets for a short PPO run from ``base_config`` and a "Train" button; drawn live into ``dashboard``.

    ``coef`` is in the paper's units (the info line shows the effective coefficient); ``tail_slider``: the tiny
    model's tail tokens, choices ``tails`` plus the warm starts'. "Train" runs :func:`tre_edu.pipeline.run_training`
    (blocking) from the tail size's warm start (``warm_starts``: tail -> directory; a missing one is made first and
    cached), under ``output_root`` (default: a new temporary directory). ``results[label]``: its outputs.
    """

    def __init__(
        self,
        base_config: Any,
        *,
        warm_starts: Mapping[int, str] | None = None,
        tails: Sequence[int] | None = None,
        dashboard: LiveDashboard | None = None,
        output_root: str | Path | None = None,
        max_steps: int = 200,
        progress: bool = False,
    ) -> None:
        self.base_config = base_config
        self.warm_starts: dict[int, str] = {int(k): str(v) for k, v in (warm_starts or {}).items()}
        self.output_root = Path(output_root or tempfile.mkdtemp(prefix="tre_edu_launcher_"))
        self.dashboard = dashboard if dashboard is not None else LiveDashboard(title="launcher runs")
        self.progress = progress
        self.results: dict[str, dict[str, Any]] = {}
        self.last_error: BaseException | None = None
        reg, tail0 = base_config.regularizer, int(base_config.model.tail_tokens)
        style = {"description_width": "4em"}
        slider = {"continuous_update": False, "style": style}
        kind = reg.kind if reg.kind in METHODS else "none"
        self.method = widgets.Dropdown(options=list(METHODS), value=kind, description="method", style=style)
        coef = reg.coef if reg.coef > 0 else 1e-3
        self.coef = widgets.FloatLogSlider(
            value=coef, base=10, min=-5, max=-0.5, step=0.25, description="coef", readout_format=".1e", **slider
        )
        self.k_slider = widgets.IntSlider(value=reg.k, min=1, max=16, description="K", **slider)
        self.p_slider = widgets.FloatSlider(
            value=reg.p, min=0.5, max=0.999, step=0.001, readout_format=".3f", description="p", **slider
        )
        tails = sorted({tail0, *self.warm_starts, *(tails or ())})
        self.tail_slider = widgets.SelectionSlider(options=tails, value=tail0, description="tail", **slider)
        steps = min(int(base_config.ppo.steps), max_steps)
        self.steps_slider = widgets.IntSlider(value=steps, min=1, max=max_steps, description="steps", **slider)
        self.button = widgets.Button(description="Train", button_style="primary", icon="play")
        self.info = widgets.HTML()
        self.status = widgets.HTML(value="ready")
        self._settings = {"coef": self.coef, "k": self.k_slider, "p": self.p_slider}  # regularizer.<name>
        for w in (self.method, self.coef, self.k_slider, self.p_slider, self.tail_slider):
            w.observe(self._on_change, names="value")
        self.button.on_click(self._on_click)
        self._on_change()
        rows = [[self.method, self.coef, self.k_slider], [self.p_slider, self.tail_slider, self.steps_slider]]
        rows = [widgets.HBox(r) for r in (*rows, [self.button, self.status])]
        self.widget = widgets.VBox([*rows, self.info, self.dashboard.widget])

    # ---- settings ------------------------------------------------------------------------------------------
    def regularizer_overrides(self) -> dict[str, Any]:
        """The ``regularizer.*`` overrides of the current widget values."""
        kind = self.method.value
        chosen = {f"regularizer.{n}": w.value for n, w in self._settings.items() if n in KIND_SETTINGS[kind]}
        return {"regularizer.kind": kind, **chosen}

    def label(self) -> str:
        """A run name from the settings, e.g. ``"tre-k α=1.0e-03 K=2 tail=2000"``."""
        short = {"regularizer.coef": "α={:.1e}", "regularizer.k": "K={}", "regularizer.p": "p={:.3f}"}
        over = self.regularizer_overrides()
        parts = [over.pop("regularizer.kind"), *(short[k].format(v) for k, v in over.items())]
        return " ".join([*parts, f"tail={self.tail_slider.value}"])

    def _on_change(self, _change=None) -> None:
        kind, k, tail = self.method.value, int(self.k_slider.value), int(self.tail_slider.value)
        for name, widget in self._settings.items():
            widget.disabled = name not in KIND_SETTINGS[kind]
        V = len(alphabet()) + tail if self.base_config.model.name == "tiny" else None
        text = f"V = {V:,} tokens ({len(alphabet())} useful + {tail:,} tail). " if V else ""
        if kind in ENTROPY_KINDS and V:
            eff = Regularizer(kind=kind, coef=float(self.coef.value), k=k).effective_coef(V)
            how = {
                "entropy": "no rescaling, on all V tokens",
                "tre-k": "α · log V / log K" if k >= 2 else "K = 1: min-entropy, unscaled",
                "tre-p": "α · log V / log 2 at |A_TR| = 2 (an upper bound; per position)",
            }[kind]
            text += f"Effective coefficient {eff:.4f} ({how})."
        else:
            text += _NOTES.get(kind, "")
        if tail not in self.warm_starts:
            text += " <i>(this tail size has no warm start yet: one is trained first)</i>"
        self.info.value = text

    def config(self) -> Any:
        """The :class:`~tre_edu.config.TrainConfig` of the next run (without ``init_from``)."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label())
        run_dir = self.output_root / f"run{len(self.results) + 1:02d}_{slug}"
        sizes = {"model.tail_tokens": int(self.tail_slider.value), "ppo.steps": int(self.steps_slider.value)}
        return self.base_config.replace(
            {**self.regularizer_overrides(), **sizes, "output_dir": str(run_dir), "sft.enabled": False}
        )

    def _warm_start(self, tail: int) -> str:
        if tail not in self.warm_starts:
            self.status.value = f"warm start for tail = {tail:,} ..."
            cfg = self.base_config.replace({"model.tail_tokens": tail, "init_from": None})
            out = self.output_root / f"warm_start_tail{tail}"
            run_warm_start(cfg, out, progress=self.progress)
            self.warm_starts[tail] = str(out)
        return self.warm_starts[tail]

    # ---- running -------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run PPO with the current settings (blocking); return ``{"summary", "history", "eval_history"}``."""
        label = self.label()
        cfg = self.config().replace({"init_from": self._warm_start(int(self.tail_slider.value))})
        self.status.value = f"training <b>{label}</b> ..."
        self.dashboard.start_run(label)
        t0 = time.perf_counter()
        result = run_training(cfg, callbacks=[self.dashboard], progress=self.progress)
        trainer = result["trainer"]
        out = {"summary": result["summary"], "history": result["history"], "eval_history": trainer.eval_history}
        self.results[label] = out
        final = result["summary"].get("eval_final", {}).get("eval/greedy_accuracy")
        acc = f", greedy accuracy {final:.3f}" if finite(final) else ""
        self.status.value = f"done: <b>{label}</b>, {trainer.step} steps in {time.perf_counter() - t0:.0f} s{acc}"
        return out

    def _on_click(self, _button=None) -> None:
        self.button.disabled, self.button.description = True, "Training..."
        try:
            self.train()
            self.last_error = None
        except Exception as err:  # shown in the panel: a widget callback has no cell to raise into
            self.last_error = err
            self.status.value = f"<span style='color:#d62728'>failed: {type(err).__name__}: {err}</span>"
        finally:
            self.button.disabled, self.button.description = False, "Train"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
