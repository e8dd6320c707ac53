"""Trust Region Entropy for TRL's ``GRPOTrainer``: five lines switch a GRPO run from the global entropy bonus to TRE.

    from tre_edu.integrations.trl import TREGRPOConfig, TREGRPOTrainer

    args = TREGRPOConfig(output_dir="out", entropy_coef=0.001, tre_kind="tre-k", tre_k=2)
    trainer = TREGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset)
    trainer.train()

TRL adds its entropy bonus in ``GRPOTrainer._compute_loss`` as ``loss - entropy_coef * mean(H)``, ``H`` coming from
``_get_per_token_logps_and_entropies(..., compute_entropy=True)``. :class:`TREGRPOTrainer` overrides only that call
(TRL's other calls, e.g. the old / reference log-probs, keep its fused LM head) and returns ``H_TRE`` (or the global
``H``) from :mod:`tre_edu.entropy`, so TRL's coefficient (paper units), adaptive controller, gradient accumulation
and logging work unchanged:

    H_TR  = -sum_{a in A_TR} q_a log q_a,   q = softmax(z / temperature) renormalised on the trust region A_TR
    H_TRE = H_TR * log V / log |A_TR|       (tre_rescale; V = the LM head's width)
    loss  = L_GRPO - entropy_coef * mean_tokens(H_TRE)          dloss/dz_a = 0 for every a outside A_TR

TRE-K: A_TR = the ``tre_k`` largest logits; TRE-P: the nucleus of mass ``tre_p`` among the top
``tre_max_candidates``; ``tre_kind="entropy"``: TRL's global entropy through the same path (a control run that logs
the same tail metrics). The tail metrics (token means, tre_edu's names, through TRL's logger), the cost of the
default path (the ``(B, T, V)`` completion logits) and ``tre_lean_head``: README.md, "Use TRE in TRL".
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("tre_edu.integrations.trl needs TRL: pip install -e '.[trl]' (tested with trl 1.16)") from exc

from tre_edu import entropy as ent
from tre_edu.entropy import global_entropy, tail_metrics, token_logprobs, tre_rescale, trust_region_entropy
from tre_edu.head import LeanHead, StatsRequest, install_lean_head

__all__ = ["TREGRPOConfig", "TREGRPOTrainer", "check_trl_compatibility", "task_reward", "training_history"]
__all__ += ["quiet_progress", "TRE_KINDS"]

TRE_KINDS = ("tre-k", "tre-p", "entropy")
TESTED_TRL = ">=1.16,<1.17"  # the pyproject extra `trl` pins this range

# The TRL method this adapter overrides, and the parameters it had in every tested TRL version. A change here means
# TRL moved the extension point: check_trl_compatibility() then fails loudly instead of silently training without TRE.
OVERRIDDEN_METHOD = "_get_per_token_logps_and_entropies"
EXPECTED_PARAMETERS = (
    "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
    "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
# What _compute_loss must still do with the returned entropies for the override to mean "the bonus is H_TRE".
EXPECTED_LOSS_SOURCE = ("compute_entropy=True", "loss = loss - apply_coef * entropy_loss")


def check_trl_compatibility(trainer_cls: type = GRPOTrainer) -> None:
    """Raise ``RuntimeError`` if TRL's ``GRPOTrainer`` no longer has the extension point this adapter overrides:
    ``_get_per_token_logps_and_entropies`` with :data:`EXPECTED_PARAMETERS`, called with ``compute_entropy=True``
    from ``_compute_loss``, whose bonus is ``loss - apply_coef * entropy_loss``."""
    method = getattr(trainer_cls, OVERRIDDEN_METHOD, None)
    where = f"trl {trl.__version__} ({trainer_cls.__module__}.{trainer_cls.__name__})"
    if method is None:
        raise RuntimeError(f"{where} has no {OVERRIDDEN_METHOD}: TREGRPOTrainer supports trl {TESTED_TRL}")
    got = tuple(inspect.signature(method).parameters)
    if got != EXPECTED_PARAMETERS:
        missing = [p for p in EXPECTED_PARAMETERS if p not in got]
        added = [p for p in got if p not in EXPECTED_PARAMETERS]
        raise RuntimeError(
            f"{where}.{OVERRIDDEN_METHOD} changed its signature (missing {missing}, new {added}, or a new order): "
            f"TREGRPOTrainer was written against trl {TESTED_TRL}; update tre_edu/integrations/trl.py"
        )
    source = inspect.getsource(trainer_cls._compute_loss)
    for needle in EXPECTED_LOSS_SOURCE:
        if needle not in source:
            raise RuntimeError(
                f"{where}._compute_loss no longer contains {needle!r}: the entropy bonus may not use the entropies "
                f"TREGRPOTrainer returns; it supports trl {TESTED_TRL}; update tre_edu/integrations/trl.py"
            )


@dataclass
class TREGRPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the trust-region settings. TRL's ``entropy_coef`` is the coefficient (paper units:
    TRE's paper uses 0.001 with K = 2 or p = 0.99); :meth:`effective_coef` converts it to un-rescaled units."""

    tre_kind: str = field(default="tre-k", metadata={"help": "tre-k (top-K region), tre-p (nucleus), entropy (global)"})
    tre_k: int = field(default=2, metadata={"help": "TRE-K: trust-region size K (1: min-entropy -log max pi)"})
    tre_p: float = field(default=0.99, metadata={"help": "TRE-P: nucleus mass p in (0, 1]"})
    tre_max_candidates: int | None = field(default=256, metadata={"help": "TRE-P: top tokens searched (None: all)"})
    tre_rescale: bool = field(default=True, metadata={"help": "multiply H_TR by log V / log |A_TR| (paper: on)"})
    tre_log_metrics: bool = field(default=True, metadata={"help": "log the entropies and the tail metrics"})
    tre_lean_head: bool = field(
        default=False,
        metadata={"help": "compute log-probs, H_TRE and the metrics with tre_edu's memory-lean LM head (chunks "
                  "of tokens, never the (B, T, V) logits); the sampled-outside-the-trust-region metric is not logged"},
    )  # fmt: skip

    def __post_init__(self):
        if self.tre_kind not in TRE_KINDS:
            raise ValueError(f"tre_kind must be one of {', '.join(TRE_KINDS)}; got {self.tre_kind!r}")
        ent._check_int(self.tre_k, "tre_k", 1)
        ent._check_p(self.tre_p, "tre_p")
        mc = self.tre_max_candidates
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise ValueError(f"tre_max_candidates must be None or an integer >= 1; got {mc!r}")
        for name in ("tre_rescale", "tre_log_metrics", "tre_lean_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        super().__post_init__()

    def effective_coef(self, vocab_size: int, nucleus_size: int | None = None) -> float:
        """``entropy_coef`` per nat of un-rescaled entropy: ``coef * log V / log K`` for TRE-K (e.g. 0.001 at
        V = 151,936, K = 2: 0.017; K = 1 is never rescaled), ``coef * log V / log n`` for TRE-P with a nucleus of
        ``nucleus_size`` = n tokens (default 2), ``coef`` for the global entropy or without rescaling."""
        coef = float(self.entropy_coef)
        if self.tre_kind == "entropy" or not self.tre_rescale:
            return coef
        if self.tre_kind == "tre-k":
            return coef * tre_rescale(vocab_size, top_k=self.tre_k)
        return coef * tre_rescale(vocab_size, nucleus_size=2 if nucleus_size is None else nucleus_size)


class TREGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose entropy bonus is Trust Region Entropy (see the module docstring). Takes a
    :class:`TREGRPOConfig`; everything else is TRL's."""

    def __init__(self, *args: Any, **kwargs: Any):
        check_trl_compatibility()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, TREGRPOConfig):
            raise ValueError(f"TREGRPOTrainer needs args=TREGRPOConfig(...); got {type(self.args).__name__}")
        self._lean_head = None
        if self.args.tre_lean_head:  # the same weight Parameter: TRL's fused head and generation are unchanged
            self._lean_head = install_lean_head(self.model)
            if self._lean_head is None:
                raise ValueError(
                    "tre_lean_head=True needs a model whose logits are its nn.Linear output layer applied to the "
                    "hidden states (no logit soft-capping or scaling); set tre_lean_head=False for this model"
                )

    # --- the one overridden TRL method -------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        """``(log pi(token), entropy, aux_loss)`` of the ``logits_to_keep`` completion tokens, each ``(B, T)``.
        With ``compute_entropy=False``: TRL's own path. Otherwise the entropy is the configured one (H_TRE for
        ``tre-k`` / ``tre-p``) and the tail metrics are logged."""
        if not compute_entropy:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        if given := sorted(k for k, v in multimodal.items() if v is not None):
            raise ValueError(f"TREGRPOTrainer supports text-only models; got vision inputs {given}")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, attn = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            inputs = {"input_ids": ids, "attention_mask": attn, "logits_to_keep": logits_to_keep + 1}
            if compute_aux_loss:
                inputs["output_router_logits"] = True
            targets = ids[:, -logits_to_keep:]
            if self._lean_head is not None:  # tre_edu's head: the statistics in chunks of tokens, no logits
                with self._lean_head.computing(targets, self._stats_request(), temperature=self.temperature,
                                               weights=attn[:, -logits_to_keep:].float()) as call:  # fmt: skip
                    with self.accelerator.autocast():
                        out = model(**inputs, use_cache=False)
                stats = LeanHead.unpack(out.logits, call)
                logps.append(stats.logprobs)
                entropies.append(stats.entropy if self.args.tre_kind == "entropy" else stats.tre)
                if self.args.tre_log_metrics:
                    self._add_metrics(stats.metrics, stats.metrics_weight)
            else:  # the completion tokens' logits, then tre_edu.entropy
                with self.accelerator.autocast():
                    out = model(**inputs, use_cache=False)
                logits = out.logits[:, :-1, :]  # position t predicts completion token t: (b, T, V)
                if self.temperature != 1.0:
                    logits = logits / self.temperature
                logps.append(token_logprobs(logits, targets))
                entropies.append(self._bonus_entropy(logits))
                if self.args.tre_log_metrics:
                    self._accumulate_metrics(logits, targets, attn[:, -logits_to_keep:])
            if compute_aux_loss:
                aux_losses.append(out.aux_loss)
        if self.args.tre_log_metrics:
            self._log_accumulated()
        aux = torch.stack(aux_losses).mean() if compute_aux_loss else None
        return torch.cat(logps), torch.cat(entropies).to(logps[0].dtype), aux

    def _bonus_entropy(self, logits: Tensor) -> Tensor:
        a = self.args
        if a.tre_kind == "entropy":
            return global_entropy(logits)
        if a.tre_kind == "tre-k":
            return trust_region_entropy(logits, top_k=min(a.tre_k, logits.shape[-1]), rescale=a.tre_rescale)
        return trust_region_entropy(logits, top_p=a.tre_p, max_candidates=a.tre_max_candidates, rescale=a.tre_rescale)

    def _stats_request(self) -> StatsRequest:
        """What the lean head computes: log-probs, the bonus entropy and (if logged) tre_edu's tail metrics."""
        a = self.args
        V = self._lean_head.weight.shape[0]
        K = min(a.tre_k, V)
        tre = a.tre_kind != "entropy"
        return StatsRequest(
            entropy=not tre, tre=tre, top_k=K if a.tre_kind == "tre-k" else None,
            top_p=a.tre_p if a.tre_kind == "tre-p" else None, rescale=a.tre_rescale,
            max_candidates=a.tre_max_candidates, metrics=a.tre_log_metrics, metrics_top_k=K, metrics_p=a.tre_p,
            metrics_ks=tuple(sorted({1, K, min(10, V)})),
        )  # fmt: skip

    # --- metrics, through TRL's own logging ---------------------------------------------------------------------
    def _add_metrics(self, stats: dict[str, float], n: float) -> None:
        """Add masked means ``stats`` over ``n`` tokens to this call's token-weighted sums."""
        buf = getattr(self, "_tre_metric_sums", None) or {}
        for key, value in stats.items():
            s, c = buf.get(key, (0.0, 0.0))
            buf[key] = (s + value * n, c + n)
        self._tre_metric_sums = buf

    def _accumulate_metrics(self, logits: Tensor, targets: Tensor, mask: Tensor) -> None:
        """Token-weighted sums of tre_edu's tail metrics for one chunk of completions (no grad)."""
        a = self.args
        V = logits.shape[-1]
        K = min(a.tre_k, V)
        with torch.no_grad():
            z = logits.detach()
            w = mask.to(torch.float64)
            n = float(w.sum())
            stats = tail_metrics(
                z, mask, ks=sorted({1, K, min(10, V)}), p=a.tre_p, top_k=K, rescale=a.tre_rescale,
                max_candidates=a.tre_max_candidates,
            )  # fmt: skip
            # the sampled (target) token is outside the trust region: K or more tokens are strictly more likely
            # (TRE-K), or the tokens strictly more likely hold p or more of the mass (TRE-P)
            above = z > z.gather(-1, targets.unsqueeze(-1))  # (b, T, V): tokens strictly more likely than the sampled
            outside = {f"tail/sampled_outside_top{K}": above.sum(-1) >= K}
            if a.tre_kind == "tre-p":
                mass_above = (torch.softmax(z.float(), -1) * above).sum(-1)
                outside[f"tail/sampled_outside_nucleus_{ent._metric_name_p(a.tre_p)}"] = mass_above >= a.tre_p
            for key, flag in outside.items():
                stats[key] = float((flag.to(torch.float64) * w).sum()) / max(n, 1.0)
        self._add_metrics(stats, n)

    def _log_accumulated(self) -> None:
        """Token-weighted means over this call's completions and every process, appended to TRL's metrics."""
        buf, self._tre_metric_sums = getattr(self, "_tre_metric_sums", None), None
        if not buf:
            return
        local = torch.tensor(list(buf.values()), dtype=torch.float64, device=self.accelerator.device)  # (keys, 2)
        total = self.accelerator.reduce(local, reduction="sum")
        mode = "train" if self.model.training else "eval"
        for key, (s, c) in zip(buf, total.tolist()):
            self._metrics[mode][key].append(s / c if c > 0 else math.nan)


def quiet_progress(trainer: Any, bar: bool = True) -> Any:
    """Keep a ``transformers`` trainer from printing every log dict (its progress / printer callbacks do, once per
    step with ``logging_steps=1``); ``bar``: keep a tqdm progress bar without the dicts. Returns the trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class _BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # the bar advances in on_step_end
            pass

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if bar:
        trainer.add_callback(_BarOnly)
    return trainer


def training_history(log_history: list[dict], steps_per_generation: int = 1) -> list[dict]:
    """TRL's ``trainer.state.log_history`` (``logging_steps=1``) as a tre_edu training history: one dict per
    generation (= one tre_edu PPO step: a rollout and ``steps_per_generation`` optimiser steps) with ``"step"``,
    each metric the mean over that generation's optimiser steps that logged it, and ``"reward/mean"`` = TRL's
    ``reward``. For :func:`tre_edu.viz.comparison_figure` and the other history readers."""
    if isinstance(steps_per_generation, bool) or not isinstance(steps_per_generation, int) or steps_per_generation < 1:
        raise ValueError(f"steps_per_generation must be an integer >= 1; got {steps_per_generation!r}")
    groups: dict[int, dict[str, list[float]]] = {}
    for h in log_history:
        if "loss" not in h or "step" not in h:  # the summary line at the end of training has no "loss"
            continue
        g = groups.setdefault((int(h["step"]) - 1) // steps_per_generation + 1, {})
        for k, v in h.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                g.setdefault(k, []).append(float(v))
    rows = []
    for step, metrics in sorted(groups.items()):
        row = {"step": step, **{k: sum(v) / len(v) for k, v in metrics.items()}}
        if "reward" in row:
            row["reward/mean"] = row["reward"]
        rows.append(row)
    return rows


def task_reward(task: Any, tokenizer: Any) -> Any:
    """A TRL reward function for a :mod:`tre_edu.tasks` task: ``task.score(completion, example)`` per completion,
    the example being the dataset row's other columns (e.g. Countdown's ``numbers`` and ``target``). For the tiny
    model's tokenizer it also logs ``tail/response_frac``: the fraction of completions holding a tail token."""
    from tre_edu.models.tiny import tail_start

    first_tail = tail_start(tokenizer)
    skip = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}

    def reward(prompts, completions, completion_ids=None, log_metric=None, **columns):
        n = len(completions)
        examples = [{k: v[i] for k, v in columns.items() if k not in skip} for i in range(n)]
        if log_metric is not None and first_tail is not None and completion_ids is not None:
            log_metric("tail/response_frac", sum(any(t >= first_tail for t in ids) for ids in completion_ids) / n)
        return [float(task.score(c, e)) for c, e in zip(completions, examples)]

    reward.__name__ = f"{task.name}_reward"
    return reward
