"""Exploration regularisers and the paper's baselines behind one config.

This is the only place that asks "which method?". A :class:`Regularizer` turns one (micro-)batch into three
things the trainer combines with the PPO loss::

    out = reg(logits, logprobs, old_logprobs, advantages, mask, agg="token-mean")
    loss = policy_loss(logprobs, old_logprobs, advantages, mask * out.pg_mask, ...)[0] + out.loss

Kinds (shapes: logits ``(B, T, V)``, everything else ``(B, T)``; ``mask`` marks valid response tokens):

- ``none``: vanilla PPO. loss 0, pg_mask 1.
- ``entropy``: global entropy bonus, loss = -coef * agg(H(pi)). Pushes up every tail token (PAPER.md).
- ``tre-k`` / ``tre-p``: Trust Region Entropy, loss = -coef * agg(H_TRE), the entropy of the
  distribution renormalised over the top-K tokens / the nucleus of mass p, rescaled by
  log V / log |A_TR|. Zero gradient outside the trust region.
- ``forking``: "Beyond the 80/20 rule": the policy gradient only on the ``forking_ratio``
  highest-entropy tokens (pg_mask), token-mean over them; loss 0.
- ``kl-cov``: KL-Cov: on the ``cov_ratio`` tokens with the largest Cov(A, log pi) add
  kl_cov_coef * |log pi - log pi_old| to the per-token loss (on top of the clipped PPO loss, as in the
  TRE paper's runs).
- ``clip-cov``: Clip-Cov: detach the policy gradient of a random subset of tokens whose Cov lies in a
  band (pg_mask 0).

The entropy functions live in :mod:`tre_edu.entropy`; this module only selects, weighs and aggregates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tre_edu import entropy as ent
from tre_edu.config import KINDS, PRESETS, RegularizerConfig
from tre_edu.ppo import aggregate, masked_mean, masked_sum

__all__ = [
    "KINDS",
    "PRESETS",
    "Regularizer",
    "RegularizerOutput",
    "clip_cov_mask",
    "forking_mask",
    "select_top_fraction",
    "token_covariance",
]


@dataclass
class RegularizerOutput:
    """What a regulariser returns for one batch.

    loss: scalar tensor to ADD to the total loss (a graph-connected zero for kinds without a loss term).
    pg_mask: ``(B, T)`` float, to multiply into the policy-loss mask (ones unless forking / clip-cov).
    metrics: floats for logging, keys ``"reg/..."``.
    dual_clip: whether the policy loss keeps PPO's dual clip (Clip-Cov's reference loss has none).
    """

    loss: Tensor
    pg_mask: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    dual_clip: bool = True


# ------------------------------------------------------------------------------------------------------------
# Token selection helpers (pure functions, usable on their own, e.g. to select over a whole mini-batch)
# ------------------------------------------------------------------------------------------------------------
def _n_selected(n_valid: int, ratio: float) -> int:
    """max(1, int(n_valid * ratio)) tokens (0 when there is no valid token): floor, but never nothing."""
    return 0 if n_valid == 0 else max(1, int(n_valid * ratio))


@torch.no_grad()
def select_top_fraction(scores: Tensor, mask: Tensor, ratio: float, group_rows: int | None = None) -> Tensor:
    """A ``(B, T)`` float mask with 1 on the top max(1, int(n * ratio)) valid tokens by ``scores``.

    ``scores``, ``mask``: ``(B, T)``. n counts the valid tokens of a group; groups are blocks of
    ``group_rows`` consecutive rows (None: the whole batch is one group). Ties keep the earlier token
    (stable sort), so the count is exact and the result deterministic.
    """
    if scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and mask must both be (B, T); got scores {tuple(scores.shape)}, mask {tuple(mask.shape)}"
        )
    if group_rows is not None and (isinstance(group_rows, bool) or not isinstance(group_rows, int) or group_rows < 1):
        raise ValueError(f"group_rows must be None or an int >= 1; got {group_rows!r}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    selected = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    B = scores.shape[0]
    step = B if group_rows is None else group_rows
    for start in range(0, B, max(step, 1)):
        block_valid = valid[start : start + step].reshape(-1)
        idx = block_valid.nonzero(as_tuple=True)[0]  # flat indices of valid tokens in this block
        k = _n_selected(int(idx.numel()), ratio)
        if k == 0:
            continue
        vals = scores[start : start + step].reshape(-1)[idx].float()
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        block = selected[start : start + step].reshape(-1)  # a view: writes go into `selected`
        block[idx[order]] = 1.0
    return selected


@torch.no_grad()
def forking_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.2, microbatch_size: int | None = None) -> Tensor:
    """Forking tokens: 1 on the top ``ratio`` valid tokens by entropy, ``(B, T)`` float.

    Counts are max(1, int(n * ratio)) per group: the whole batch when ``microbatch_size`` is None,
    else blocks of ``microbatch_size`` rows (the official code selects within each micro-batch).
    """
    return select_top_fraction(entropy, mask, ratio, group_rows=microbatch_size)


@torch.no_grad()
def token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token centred product Cov_i = (A_i - mean A)(log pi_i - mean log pi), means over valid tokens.

    Inputs ``(B, T)``; output ``(B, T)`` float32, detached, 0 at padding. Its mean over valid tokens is the
    covariance between advantage and log-prob that drives entropy collapse (Cui et al. 2025).
    """
    a = advantages.detach().float()
    lp = logprobs.detach().float()
    a_c = a - masked_mean(a, mask)
    lp_c = lp - masked_mean(lp, mask)
    valid = mask if mask.dtype == torch.bool else mask != 0
    return torch.where(valid, a_c * lp_c, torch.zeros_like(a_c))


@torch.no_grad()
def clip_cov_mask(
    cov: Tensor,
    mask: Tensor,
    ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator | None = None,
    count_mask: Tensor | None = None,
) -> Tensor:
    """Clip-Cov: a ``(B, T)`` float mask, 0 on a random subset of the tokens of ``mask`` with lb <= Cov <= ub.

    The subset has min(max(1, int(N * ratio)), #candidates) tokens; N counts the valid tokens of ``count_mask``
    (default ``mask``; the regulariser passes the response mask there and leaves ratio-clipped tokens out of
    ``mask``, as verl). ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    counted = valid if count_mask is None else (count_mask if count_mask.dtype == torch.bool else count_mask != 0)
    keep = torch.ones(cov.shape, dtype=torch.float32, device=cov.device)
    n_detach = _n_selected(int(counted.sum()), ratio)
    candidates = (valid & (cov >= lb) & (cov <= ub)).reshape(-1).nonzero(as_tuple=True)[0]
    n = min(n_detach, int(candidates.numel()))
    if n > 0:
        perm = torch.randperm(int(candidates.numel()), generator=generator)[:n].to(candidates.device)
        keep.view(-1)[candidates[perm]] = 0.0
    return keep


# ------------------------------------------------------------------------------------------------------------
# The regulariser
# ------------------------------------------------------------------------------------------------------------
class Regularizer:
    """One regulariser / baseline, built from a :class:`~tre_edu.config.RegularizerConfig` (plain settings).

    ``Regularizer(cfg.regularizer)``, ``Regularizer(kind="tre-k", coef=0.001)`` or ``Regularizer.preset("kl-cov")``.
    ``clip_low`` / ``clip_high`` are PPO's ratio clip (Clip-Cov leaves tokens the ratio already clipped alone).
    The Clip-Cov draw uses a generator seeded by ``config.seed`` (or torch's global RNG when None); its state is
    part of :meth:`state_dict` so a resumed run draws what an uninterrupted one would.
    """

    def __init__(
        self, config: RegularizerConfig | None = None, *, clip_low: float = 0.2, clip_high: float = 0.2, **fields
    ):
        if config is None:
            config = RegularizerConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        config.validate()
        self.config = config
        self.clip_low, self.clip_high = clip_low, clip_high
        self.generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)

    def __getattr__(self, name: str) -> Any:  # the settings read as attributes: reg.kind, reg.k, reg.coef ...
        if name == "config":
            raise AttributeError(name)
        return getattr(self.config, name)

    def __repr__(self) -> str:
        return f"Regularizer({self.config!r})"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Regularizer:
        """A named setting of the papers (:data:`tre_edu.config.PRESETS`), optionally with overrides.

        ``"kl-cov"``: KL-Cov as run in the TRE paper (0.2 %, coef 1); ``"kl-cov-original"``: the KL-Cov paper's
        (0.02 %, 0.1); ``"tre-k"`` / ``"tre-p"``: alpha 0.001, K = 2 / p = 0.99.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- facts about the setting --------------------------------------------------------------------------
    @property
    def needs_logits(self) -> bool:
        """Whether ``__call__`` reads the ``(B, T, V)`` logits (the other kinds accept ``logits=None``)."""
        return self.kind in ("entropy", "tre-k", "tre-p", "forking")

    @property
    def selects_tokens(self) -> bool:
        """Whether the method selects tokens (forking, KL-Cov, Clip-Cov): see :meth:`select`."""
        return self.kind in ("forking", "kl-cov", "clip-cov")

    def effective_coef(self, vocab_size: int, nucleus_size: int | None = None) -> float:
        """coef in units of an un-rescaled entropy: coef * log V / log K for TRE-K (see RegularizerConfig)."""
        return self.config.effective_coef(vocab_size, nucleus_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    # ---- token selection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def select(
        self,
        logits: Tensor | None,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        entropy: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The ``(B, T)`` float token selection of forking / KL-Cov / Clip-Cov over the batch given.

        forking: 1 on the top ``forking_ratio`` tokens by entropy (they keep their policy gradient).
        kl-cov: 1 on the top ``cov_ratio`` tokens by Cov_i = (A_i - mean A)(log pi_i - mean log pi) (penalised).
        clip-cov: 0 on a random ``clip_cov_ratio`` of the tokens with lb <= Cov <= ub that the PPO ratio clip does
        not already clip (verl's candidates), 1 elsewhere.

        The trainer calls it once per micro-batch (``selection: microbatch``, the paper's code) or once over the
        whole mini-batch with no-grad log-probs and entropies (``selection: minibatch``) and passes the result
        to :meth:`__call__` as ``selected``. ``entropy``: precomputed ``(B, T)`` entropies for forking (then
        ``logits`` may be None).
        """
        kind = self.kind
        if kind == "forking":
            h = ent.global_entropy(logits.detach()) if entropy is None else entropy
            return forking_mask(h, mask, self.forking_ratio)
        cov = token_covariance(advantages, logprobs, mask)
        if kind == "kl-cov":
            return select_top_fraction(cov, mask, self.cov_ratio)
        if kind == "clip-cov":
            ratio = torch.exp((logprobs.detach() - old_logprobs).clamp(-20.0, 20.0))
            a = advantages.detach()
            clipped = -a * ratio.clamp(1 - self.clip_low, 1 + self.clip_high) > -a * ratio
            valid = (mask if mask.dtype == torch.bool else mask != 0) & ~clipped
            gen = generator if generator is not None else self.generator
            return clip_cov_mask(cov, valid, self.clip_cov_ratio, self.clip_cov_lb, self.clip_cov_ub, gen, mask)
        raise ValueError(f"regularizer kind {kind!r} selects no tokens")

    def pg_mask(self, selected: Tensor) -> Tensor:
        """The policy-gradient mask a :meth:`select` result implies: the selection itself for forking (the tokens
        that keep their gradient) and Clip-Cov (0 on the detached ones); all ones for KL-Cov (it adds a term)."""
        return torch.ones_like(selected) if self.kind == "kl-cov" else selected

    # ---- the batch computation ----------------------------------------------------------------------------
    def __call__(
        self,
        logits: Tensor | None,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        agg: str = "token-mean",
        *,
        selected: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> RegularizerOutput:
        """Loss term, policy-gradient mask and metrics for one batch.

        Args:
            logits: ``(B, T, V)`` policy logits at the response positions (may be None when
                :attr:`needs_logits` is False).
            logprobs: ``(B, T)`` log pi(a_t) of the taken tokens under the current policy (with grad).
            old_logprobs: ``(B, T)`` rollout-time log-probs. advantages: ``(B, T)``.
            mask: ``(B, T)`` valid tokens.
            agg: loss aggregation (see :func:`tre_edu.ppo.aggregate`), the same as the policy loss's.
            selected: a precomputed :meth:`select` result for these rows (whole-mini-batch selection);
                None selects within this batch.
            generator: CPU generator for the Clip-Cov draw (overrides the seeded one).
        """
        shapes = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask}
        for name, t in shapes.items():
            if not isinstance(t, Tensor) or t.dim() != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (B, T) tensor; got {shape}")
        if len({tuple(t.shape) for t in shapes.values()}) > 1:
            listed = ", ".join(f"{n} {tuple(t.shape)}" for n, t in shapes.items())
            raise ValueError(f"regularizer inputs must share the shape (B, T); got {listed}")
        if logits is None:
            if self.needs_logits and not (self.kind == "forking" and selected is not None):
                raise ValueError(f"regularizer kind {self.kind!r} needs logits (B, T, V); got None")
        elif not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(mask.shape):
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be (B, T, V) with (B, T) = mask's {tuple(mask.shape)}; got {shape}")

        anchor = logits if logits is not None else logprobs
        ones = torch.ones(mask.shape, dtype=torch.float32, device=anchor.device)
        kind = self.kind

        if kind == "none":
            return RegularizerOutput(_zero_loss(anchor), ones, {"reg/loss": 0.0})

        if kind in ("entropy", "tre-k", "tre-p"):
            if kind == "entropy":
                h = ent.global_entropy(logits)
            elif kind == "tre-k":
                h = ent.trust_region_entropy(logits, top_k=self.k, rescale=self.rescale)
            else:
                h = ent.trust_region_entropy(
                    logits, top_p=self.p, rescale=self.rescale, max_candidates=self.max_candidates
                )
            loss = -self.coef * aggregate(h, mask, agg)  # L_reg = -alpha * agg(H)
            metrics = {
                "reg/loss": float(loss.detach()),
                "reg/entropy" if kind == "entropy" else "reg/tre_entropy": float(masked_mean(h.detach(), mask)),
            }
            if kind != "tre-p":
                metrics["reg/effective_coef"] = self.effective_coef(int(logits.shape[-1]))
            return RegularizerOutput(loss, ones, metrics)

        valid = mask if mask.dtype == torch.bool else mask != 0
        n_valid = max(int(valid.sum()), 1)
        if selected is None:
            selected = self.select(logits, logprobs, old_logprobs, advantages, mask, generator=generator)
        sel = selected.to(device=anchor.device, dtype=torch.float32)
        metrics = {"reg/loss": 0.0, "reg/selected_frac": float(masked_sum(sel, mask)) / n_valid}

        if kind == "forking":
            if logits is not None:
                with torch.no_grad():
                    h = ent.global_entropy(logits.detach())
                metrics.update(
                    {"reg/entropy": float(masked_mean(h, mask)), "reg/entropy_selected": float(masked_mean(h, sel))}
                )
            return RegularizerOutput(_zero_loss(anchor), self.pg_mask(sel), metrics)

        cov = token_covariance(advantages, logprobs, mask)
        metrics["reg/cov_mean"] = float(masked_mean(cov, mask))
        if kind == "kl-cov":
            abs_kl = (logprobs - old_logprobs.detach()).abs()
            # per-token penalty kl_cov_coef * |log pi - log pi_old| on the selected tokens only
            per_token = torch.where(sel.bool(), self.kl_cov_coef * abs_kl, torch.zeros_like(abs_kl))
            loss = aggregate(per_token, mask, agg)
            metrics.update(
                {"reg/loss": float(loss.detach()), "reg/abs_kl_selected": float(masked_mean(abs_kl.detach(), sel))}
            )
            return RegularizerOutput(loss, self.pg_mask(sel), metrics)

        # clip-cov: pg_mask 0 on the drawn tokens, which is the same as detaching their gradient. As verl's
        # clip-cov loss: no dual clip. Difference kept (documented): the masked tokens also leave the token-mean's
        # denominator, a factor (N - n) / N with n ~ 0.02 % of N.
        in_band = valid & (cov >= self.clip_cov_lb) & (cov <= self.clip_cov_ub)
        metrics["reg/selected_frac"] = float(masked_sum(1.0 - sel, mask)) / n_valid
        metrics["reg/candidate_frac"] = float(in_band.sum()) / n_valid
        return RegularizerOutput(_zero_loss(anchor), self.pg_mask(sel), metrics, dual_clip=False)


def _zero_loss(anchor: Tensor) -> Tensor:
    """A float32 scalar 0 on ``anchor``'s device, connected to its graph when it has one (so backward works).

    Built from one element through ``torch.where`` (not ``0 * x``) so an inf in ``anchor`` cannot make NaN.
    """
    one = anchor.reshape(-1)[:1]
    return torch.where(torch.zeros_like(one, dtype=torch.bool), one, torch.zeros_like(one)).sum().float()
