"""Exploration regularisers and the paper's baselines behind one config: the only place that asks "which method?".

A :class:`Regularizer` declares the per-token statistics it needs (:meth:`~Regularizer.request`), which the policy's
head computes without the ``(B, T, V)`` logits; given them, it returns the loss term and the policy-gradient mask that
:func:`tre_edu.ppo.ppo_loss` composes with the PPO loss::

    out = policy(ids, attn, R, request=reg.request())                     # logprobs, entropy / tre as declared
    r = reg(out, old_logprobs, advantages, mask, agg="token-mean")         # RegularizerOutput(loss, pg_mask, ...)

Kinds (everything ``(B, T)``; ``mask`` marks valid response tokens), one small function each below:

- ``none``: vanilla PPO. loss 0, pg_mask 1.
- ``entropy``: global entropy bonus, loss = -coef * agg(H(pi)). Pushes up every tail token (PAPER.md).
- ``tre-k`` / ``tre-p``: Trust Region Entropy, loss = -coef * agg(H_TRE), the entropy renormalised over the top-K
  tokens / the nucleus of mass p, rescaled by log V / log |A_TR|. Zero gradient outside the trust region.
- ``forking`` ("Beyond the 80/20 rule"): the policy gradient only on the ``forking_ratio`` highest-entropy tokens.
- ``kl-cov``: on the ``cov_ratio`` tokens with the largest Cov(A, log pi) add kl_cov_coef * |log pi - log pi_old| to
  the per-token loss (on top of the clipped PPO loss, as in the TRE paper's runs).
- ``clip-cov``: detach the policy gradient of a random subset of tokens whose Cov lies in a band (pg_mask 0).

Token-selecting kinds (forking, KL-Cov, Clip-Cov) rank the tokens of a micro-batch (``selection: microbatch``, the
paper's code) or of the whole mini-batch (``selection: minibatch``: :meth:`Regularizer.minibatch_selection` runs the
no-grad pre-pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Generator, Tensor

from tre_edu import entropy as ent
from tre_edu.config import KINDS, PRESETS, RegularizerConfig
from tre_edu.head import StatsRequest, TokenStats
from tre_edu.ppo import LOG_RATIO_CLAMP, _as_bool, _check_agg, _check_shapes, aggregate, masked_mean, masked_sum

__all__ = ["KINDS", "PRESETS", "Regularizer", "RegularizerOutput", "ENTROPY_KINDS", "KIND_SETTINGS", "NEEDS"]
__all__ += ["clip_cov_mask", "effective_coef", "forking_mask", "select_top_fraction", "token_covariance"]


@dataclass
class RegularizerOutput:
    """What a regulariser returns for one batch."""

    loss: Tensor  # a scalar to ADD to the total loss (a graph-connected zero for kinds without a loss term)
    pg_mask: Tensor  # (B, T) float, multiplied into the policy-loss mask
    metrics: dict[str, float] = field(default_factory=dict)  # "reg/..."
    dual_clip: bool = True  # whether the policy loss keeps PPO's dual clip (Clip-Cov's reference loss has none)


# ---- Token selection helpers (pure functions, usable on their own) ------------------------------------------------
def _n_selected(n_valid: int, ratio: float) -> int:
    """max(1, int(n_valid * ratio)) tokens (0 when there is no valid token): floor, but never nothing."""
    return 0 if n_valid == 0 else max(1, int(n_valid * ratio))


@torch.no_grad()
def select_top_fraction(scores: Tensor, mask: Tensor, ratio: float, group_rows: int | None = None) -> Tensor:
    """A ``(B, T)`` float mask with 1 on the top max(1, int(n * ratio)) valid tokens by ``scores``.

    n counts the valid tokens of a group: blocks of ``group_rows`` consecutive rows (None: the whole batch). Ties
    keep the earlier token (stable sort), so the count is exact and the result deterministic.
    """
    if scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and mask must both be (B, T); got scores {tuple(scores.shape)}, mask {tuple(mask.shape)}"
        )
    if group_rows is not None and (isinstance(group_rows, bool) or not isinstance(group_rows, int) or group_rows < 1):
        raise ValueError(f"group_rows must be None or an int >= 1; got {group_rows!r}")
    valid = _as_bool(mask)
    selected = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    B = scores.shape[0]
    step = B if group_rows is None else group_rows
    for start in range(0, B, max(step, 1)):
        idx = valid[start : start + step].reshape(-1).nonzero(as_tuple=True)[0]  # flat indices of valid tokens
        k = _n_selected(int(idx.numel()), ratio)
        if k == 0:
            continue
        vals = scores[start : start + step].reshape(-1)[idx].float()
        order = torch.sort(vals, descending=True, stable=True).indices[:k]
        selected[start : start + step].reshape(-1)[idx[order]] = 1.0  # a view: writes go into `selected`
    return selected


@torch.no_grad()
def forking_mask(entropy: Tensor, mask: Tensor, ratio: float = 0.2, microbatch_size: int | None = None) -> Tensor:
    """Forking tokens: 1 on the top ``ratio`` valid tokens by entropy, per group of ``microbatch_size`` rows (None:
    the whole batch; the official code selects within each micro-batch)."""
    return select_top_fraction(entropy, mask, ratio, group_rows=microbatch_size)


@torch.no_grad()
def token_covariance(advantages: Tensor, logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token centred product Cov_i = (A_i - mean A)(log pi_i - mean log pi), means over valid tokens.

    Float32, detached, 0 at padding. Its mean over valid tokens is the covariance between advantage and log-prob
    that drives entropy collapse (Cui et al. 2025).
    """
    a, lp = advantages.detach().float(), logprobs.detach().float()
    a_c, lp_c = a - masked_mean(a, mask), lp - masked_mean(lp, mask)
    return torch.where(_as_bool(mask), a_c * lp_c, torch.zeros_like(a_c))


@torch.no_grad()
def clip_cov_mask(
    cov: Tensor,
    mask: Tensor,
    ratio: float,
    lb: float,
    ub: float,
    generator: Generator | None = None,
    count_mask: Tensor | None = None,
) -> Tensor:
    """Clip-Cov: a ``(B, T)`` float mask, 0 on a random subset of the tokens of ``mask`` with lb <= Cov <= ub.

    The subset has min(max(1, int(N * ratio)), #candidates) tokens; N counts the valid tokens of ``count_mask``
    (default ``mask``; the regulariser passes the response mask there and leaves ratio-clipped tokens out of
    ``mask``, as verl). ``generator`` (a CPU ``torch.Generator``) makes the draw reproducible.
    """
    valid = _as_bool(mask)
    keep = torch.ones(cov.shape, dtype=torch.float32, device=cov.device)
    n_detach = _n_selected(int((valid if count_mask is None else _as_bool(count_mask)).sum()), ratio)
    candidates = (valid & (cov >= lb) & (cov <= ub)).reshape(-1).nonzero(as_tuple=True)[0]
    n = min(n_detach, int(candidates.numel()))
    if n > 0:
        perm = torch.randperm(int(candidates.numel()), generator=generator)[:n].to(candidates.device)
        keep.view(-1)[candidates[perm]] = 0.0
    return keep


# ---- What each kind needs, and its coefficient in common units ----------------------------------------------------
# the per-token statistics each kind reads besides the log-probs (see tre_edu.head.StatsRequest)
NEEDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "entropy": frozenset({"entropy"}),
    "tre-k": frozenset({"tre"}),
    "tre-p": frozenset({"tre"}),
    "forking": frozenset({"entropy"}),
    "kl-cov": frozenset(),
    "clip-cov": frozenset(),
}
# the RegularizerConfig fields each kind reads (the others are ignored for it)
KIND_SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "entropy": ("coef",),
    "tre-k": ("coef", "k", "rescale"),
    "tre-p": ("coef", "p", "rescale", "max_candidates"),
    "forking": ("forking_ratio", "selection"),
    "kl-cov": ("cov_ratio", "kl_cov_coef", "selection"),
    "clip-cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "selection", "seed"),
}
ENTROPY_KINDS = tuple(k for k in KINDS if "coef" in KIND_SETTINGS[k])  # coef weighs an entropy
SELECTING_KINDS = tuple(k for k in KINDS if "selection" in KIND_SETTINGS[k])


def effective_coef(config: RegularizerConfig, vocab_size: int, nucleus_size: int | None = None) -> float:
    """The entropy-type weight in un-rescaled units (per nat of entropy): coef for ``entropy`` (and TRE without
    rescale), coef * :func:`~tre_edu.entropy.tre_rescale` for TRE (tre-k: log V / log K, so 0.001 at V = 151,936,
    K = 2 weighs 0.017, and K = 1 is unscaled; tre-p: log V / log n for a nucleus of n tokens, default 2); 0 for the
    other kinds."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2; got {vocab_size!r}")
    if config.kind not in ENTROPY_KINDS:
        return 0.0
    if config.kind == "entropy" or not config.rescale:
        return config.coef
    if config.kind == "tre-k":
        return config.coef * ent.tre_rescale(vocab_size, top_k=config.k)
    return config.coef * ent.tre_rescale(vocab_size, nucleus_size=2 if nucleus_size is None else nucleus_size)


# ---- The kinds: one function each, (reg, stats, old_logprobs, advantages, mask, agg, selected) -> output -----------
def _none(reg, stats, old_logprobs, advantages, mask, agg, sel) -> RegularizerOutput:
    return RegularizerOutput(_zero_loss(stats.logprobs), _ones(mask, stats.logprobs), {"reg/loss": 0.0})


def _entropy_bonus(reg, stats, old_logprobs, advantages, mask, agg, sel) -> RegularizerOutput:
    """entropy / tre-k / tre-p: L_reg = -alpha * agg(H), H the global entropy or H_TRE."""
    h = stats.entropy if reg.kind == "entropy" else stats.tre
    loss = -reg.coef * aggregate(h, mask, agg)
    metrics = {
        "reg/loss": float(loss.detach()),
        "reg/entropy" if reg.kind == "entropy" else "reg/tre_entropy": float(masked_mean(h.detach(), mask)),
    }
    if reg.kind != "tre-p" and reg.vocab_size is not None:
        metrics["reg/effective_coef"] = reg.effective_coef(reg.vocab_size)
    return RegularizerOutput(loss, _ones(mask, h), metrics)


def _forking(reg, stats, old_logprobs, advantages, mask, agg, sel) -> RegularizerOutput:
    metrics = {"reg/loss": 0.0, "reg/selected_frac": _frac(sel, mask)}
    if stats.entropy is not None:
        h = stats.entropy.detach()
        metrics.update({"reg/entropy": float(masked_mean(h, mask)), "reg/entropy_selected": float(masked_mean(h, sel))})
    return RegularizerOutput(_zero_loss(stats.logprobs), reg.pg_mask(sel), metrics)


def _kl_cov(reg, stats, old_logprobs, advantages, mask, agg, sel) -> RegularizerOutput:
    """On the selected tokens only, the per-token penalty kl_cov_coef * |log pi - log pi_old|."""
    abs_kl = (stats.logprobs - old_logprobs.detach()).abs()
    loss = aggregate(torch.where(sel.bool(), reg.kl_cov_coef * abs_kl, torch.zeros_like(abs_kl)), mask, agg)
    metrics = {
        "reg/loss": float(loss.detach()),
        "reg/selected_frac": _frac(sel, mask),
        "reg/cov_mean": float(masked_mean(token_covariance(advantages, stats.logprobs, mask), mask)),
        "reg/abs_kl_selected": float(masked_mean(abs_kl.detach(), sel)),
    }
    return RegularizerOutput(loss, reg.pg_mask(sel), metrics)


def _clip_cov(reg, stats, old_logprobs, advantages, mask, agg, sel) -> RegularizerOutput:
    """pg_mask 0 on the drawn tokens (the same as detaching their gradient); as verl's Clip-Cov loss, no dual clip.
    Difference kept (documented): the masked tokens also leave the token-mean's denominator, a factor (N - n) / N
    with n ~ 0.02 % of N."""
    cov = token_covariance(advantages, stats.logprobs, mask)
    valid = _as_bool(mask)
    n_valid = max(int(valid.sum()), 1)
    in_band = valid & (cov >= reg.clip_cov_lb) & (cov <= reg.clip_cov_ub)
    metrics = {
        "reg/loss": 0.0,
        "reg/selected_frac": float(masked_sum(1.0 - sel, mask)) / n_valid,
        "reg/cov_mean": float(masked_mean(cov, mask)),
        "reg/candidate_frac": float(in_band.sum()) / n_valid,
    }
    return RegularizerOutput(_zero_loss(stats.logprobs), reg.pg_mask(sel), metrics, dual_clip=False)


_KIND_FN = {"none": _none, "entropy": _entropy_bonus, "tre-k": _entropy_bonus, "tre-p": _entropy_bonus,
            "forking": _forking, "kl-cov": _kl_cov, "clip-cov": _clip_cov}  # fmt: skip


def _frac(sel: Tensor, mask: Tensor) -> float:
    return float(masked_sum(sel, mask)) / max(int(_as_bool(mask).sum()), 1)


def _ones(mask: Tensor, like: Tensor) -> Tensor:  # an all-ones float32 pg_mask of mask's shape on like's device
    return torch.ones(mask.shape, dtype=torch.float32, device=like.device)


def _zero_loss(anchor: Tensor) -> Tensor:
    """A float32 scalar 0 on ``anchor``'s device, connected to its graph when it has one (so backward works).

    Built from one element through ``torch.where`` (not ``0 * x``) so an inf in ``anchor`` cannot make NaN.
    """
    one = anchor.reshape(-1)[:1]
    return torch.where(torch.zeros_like(one, dtype=torch.bool), one, torch.zeros_like(one)).sum().float()


# ---- The regulariser ----------------------------------------------------------------------------------------------
class Regularizer:
    """One regulariser / baseline: ``Regularizer(cfg.regularizer)``, ``Regularizer(kind="tre-k", coef=0.001)`` or
    ``Regularizer.preset("kl-cov")``.

    ``clip_low`` / ``clip_high``: PPO's ratio clip (Clip-Cov leaves tokens it already clips alone); ``vocab_size``
    lets the metrics report the effective coefficient. The Clip-Cov draw uses a generator seeded by ``config.seed``
    (torch's global RNG when None), saved by :meth:`state_dict` so a resumed run draws what an uninterrupted one would.
    """

    def __init__(
        self,
        config: RegularizerConfig | None = None,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        vocab_size: int | None = None,
        **fields,
    ):
        if config is None:
            config = RegularizerConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        config.validate()
        self.config = config
        self.clip_low, self.clip_high, self.vocab_size = clip_low, clip_high, vocab_size
        self.generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)

    def __getattr__(self, name: str) -> Any:  # the settings read as attributes: reg.kind, reg.k, reg.coef ...
        if name == "config":
            raise AttributeError(name)
        return getattr(self.config, name)

    def __repr__(self) -> str:
        return f"Regularizer({self.config!r})"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Regularizer:
        """A named setting of the papers (:data:`tre_edu.config.PRESETS`), e.g. ``"kl-cov"`` as run in the TRE paper
        (0.2 %, coef 1) or ``"kl-cov-original"`` (0.02 %, 0.1), optionally with overrides."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- facts about the setting --------------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:  # the per-token statistics this kind reads besides the log-probs
        return NEEDS[self.kind]

    @property
    def selects_tokens(self) -> bool:  # forking, KL-Cov, Clip-Cov: see select()
        return self.kind in SELECTING_KINDS

    def request(self, metrics: bool = False) -> StatsRequest:
        """What the policy's head must compute for this kind (``metrics``: also the tail metrics, no grad, with
        this setting's K and p)."""
        tre = "tre" in self.needs
        return StatsRequest(
            entropy="entropy" in self.needs,
            tre=tre,
            top_k=self.k if tre and self.kind == "tre-k" else None,
            top_p=self.p if tre and self.kind == "tre-p" else None,
            rescale=self.rescale,
            max_candidates=self.max_candidates,
            metrics=metrics,
            metrics_top_k=self.k,
            metrics_p=self.p,
        )

    def statistics(self, logits: Tensor | None, logprobs: Tensor) -> TokenStats:
        """The statistics of :meth:`request` from materialised ``(B, T, V)`` logits (tests, small models, your own
        loop); ``logprobs`` ``(B, T)`` are taken as given. ``logits`` may be None for kinds that need nothing else."""
        if logits is None:
            if self.needs:
                need = " and ".join(sorted(self.needs))
                raise ValueError(f"regularizer kind {self.kind!r} needs the per-token {need}: give logits (B, T, V)")
            return TokenStats(logprobs=logprobs)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != logprobs.shape:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be (B, T, V) with (B, T) = logprobs' {tuple(logprobs.shape)}; got {shape}")
        req = self.request()
        return TokenStats(
            logprobs=logprobs,
            entropy=ent.global_entropy(logits) if req.entropy else None,
            tre=ent.trust_region_entropy(logits, top_k=req.top_k, top_p=req.top_p, rescale=req.rescale,
                                         max_candidates=req.max_candidates) if req.tre else None,
        )  # fmt: skip

    def effective_coef(self, vocab_size: int, nucleus_size: int | None = None) -> float:
        """coef in units of an un-rescaled entropy (see :func:`effective_coef`)."""
        return effective_coef(self.config, vocab_size, nucleus_size)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])

    # ---- token selection ----------------------------------------------------------------------------------
    @torch.no_grad()
    def select(
        self, stats: Any, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, generator: Generator | None = None
    ) -> Tensor:
        """The ``(B, T)`` float token selection of forking / KL-Cov / Clip-Cov over the batch given.

        forking: 1 on the top ``forking_ratio`` tokens by entropy (they keep their policy gradient).
        kl-cov: 1 on the top ``cov_ratio`` tokens by Cov_i (:func:`token_covariance`; they are penalised).
        clip-cov: 0 on a random ``clip_cov_ratio`` of the tokens with lb <= Cov <= ub that the PPO ratio clip does
        not already clip (verl's candidates), 1 elsewhere. ``generator`` overrides the seeded one.
        """
        kind, logprobs = self.kind, stats.logprobs
        if kind == "forking":
            return forking_mask(stats.entropy.detach(), mask, self.forking_ratio)
        cov = token_covariance(advantages, logprobs, mask)
        if kind == "kl-cov":
            return select_top_fraction(cov, mask, self.cov_ratio)
        if kind == "clip-cov":
            ratio = torch.exp((logprobs.detach() - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
            a = advantages.detach()
            clipped = -a * ratio.clamp(1 - self.clip_low, 1 + self.clip_high) > -a * ratio
            gen = generator if generator is not None else self.generator
            return clip_cov_mask(cov, _as_bool(mask) & ~clipped, self.clip_cov_ratio, self.clip_cov_lb,
                                 self.clip_cov_ub, gen, mask)  # fmt: skip
        raise ValueError(f"regularizer kind {kind!r} selects no tokens")

    def pg_mask(self, selected: Tensor) -> Tensor:
        """The policy-gradient mask a :meth:`select` result implies: the selection itself for forking (the tokens
        that keep their gradient) and Clip-Cov (0 on the detached ones); all ones for KL-Cov (it adds a term)."""
        return torch.ones_like(selected) if self.kind == "kl-cov" else selected

    @torch.no_grad()
    def minibatch_selection(
        self, statistics: Callable[[StatsRequest], Any], old_logprobs: Tensor, advantages: Tensor, mask: Tensor
    ) -> Tensor | None:
        """``selection: minibatch``: :meth:`select` over the whole mini-batch before its micro-steps, from a no-grad
        pre-pass ``statistics(request)`` over all its rows at the current weights. None when the method selects
        nothing or selects per micro-batch (then :meth:`__call__` selects within each micro-batch)."""
        if not self.selects_tokens or self.selection != "minibatch":
            return None
        return self.select(statistics(self.request()), old_logprobs, advantages, mask)

    # ---- the batch computation ----------------------------------------------------------------------------
    def __call__(
        self,
        stats: Any,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        agg: str = "token-mean",
        *,
        selected: Tensor | None = None,
        generator: Generator | None = None,
    ) -> RegularizerOutput:
        """Loss term, policy-gradient mask and metrics for one batch.

        ``stats``: ``logprobs`` under the current policy (with grad) and ``entropy`` / ``tre`` as :attr:`needs` says
        (a :class:`~tre_edu.head.TokenStats`, the policy's output or :meth:`statistics`). ``selected``: a precomputed
        :meth:`select` result for these rows; None selects within this batch."""
        inputs = {"logprobs": stats.logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask}
        inputs.update({name: getattr(stats, name, None) for name in sorted(self.needs)})
        for name, t in inputs.items():
            if t is None:
                raise ValueError(f"regularizer kind {self.kind!r} needs the per-token {name}; got None")
            if not isinstance(t, Tensor) or t.dim() != 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (B, T) tensor; got {shape}")
        _check_shapes("regularizer inputs", **inputs)
        _check_agg(agg)
        if self.selects_tokens and selected is None:
            selected = self.select(stats, old_logprobs, advantages, mask, generator=generator)
        sel = None if selected is None else selected.to(device=stats.logprobs.device, dtype=torch.float32)
        return _KIND_FN[self.kind](self, stats, old_logprobs, advantages, mask, agg, sel)
