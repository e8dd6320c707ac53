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

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from tre_edu import entropy as ent
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

KINDS = ("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov", "clip-cov")

# Named settings from the papers. Coefficients of the entropy-type kinds are in the paper's units (see
# Regularizer.effective_coef). The global-entropy coefficient was not published: no "entropy" preset.
PRESETS: dict[str, dict[str, Any]] = {
    "ppo": {"kind": "none"},
    "tre-k": {"kind": "tre-k", "coef": 0.001, "k": 2},  # TRE paper: alpha = 0.001, K = 2
    "tre-p": {
        "kind": "tre-p",
        "coef": 0.001,
        "p": 0.99,
        "max_candidates": 256,
    },  # TRE paper: p = 0.99, top 256
    "forking": {
        "kind": "forking",
        "forking_ratio": 0.2,
        "forking_per_microbatch": True,
    },  # top 20 %, per micro-batch
    # KL-Cov as run in the TRE paper: top 0.2 % tokens by Cov, coef 1, added on top of the clipped PPO loss.
    "kl-cov": {"kind": "kl-cov", "cov_ratio": 0.002, "kl_cov_coef": 1.0},
    # KL-Cov's own paper (verl recipe): top 0.02 %, coef 0.1. (That paper swaps the clipped loss of the
    # selected tokens for the unclipped one; here the term is always added on top of the clipped loss.)
    "kl-cov-original": {"kind": "kl-cov", "cov_ratio": 0.0002, "kl_cov_coef": 0.1},
    "clip-cov": {"kind": "clip-cov", "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
}


@dataclass
class RegularizerOutput:
    """What a regulariser returns for one batch.

    loss: scalar tensor to ADD to the total loss (a graph-connected zero for kinds without a loss term).
    pg_mask: ``(B, T)`` float, to multiply into the policy-loss mask (ones unless forking / clip-cov).
    metrics: floats for logging, keys ``"reg/..."``.
    """

    loss: Tensor
    pg_mask: Tensor
    metrics: dict[str, float] = field(default_factory=dict)


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
) -> Tensor:
    """Clip-Cov: a ``(B, T)`` float mask, 0 on a random subset of valid tokens with lb <= Cov <= ub.

    The subset has min(max(1, int(N * ratio)), #candidates) tokens, N = valid tokens. ``generator`` (a CPU
    ``torch.Generator``) makes the draw reproducible.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    keep = torch.ones(cov.shape, dtype=torch.float32, device=cov.device)
    n_detach = _n_selected(int(valid.sum()), ratio)
    candidates = (valid & (cov >= lb) & (cov <= ub)).reshape(-1).nonzero(as_tuple=True)[0]
    n = min(n_detach, int(candidates.numel()))
    if n > 0:
        perm = torch.randperm(int(candidates.numel()), generator=generator)[:n].to(candidates.device)
        keep.view(-1)[candidates[perm]] = 0.0
    return keep


# ------------------------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------------------------
def _fail(name: str, allowed: str, value: Any) -> None:
    raise ValueError(f"regularizer.{name} must be {allowed}; got {value!r}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


@dataclass
class Regularizer:
    """One regulariser / baseline and its settings, validated on construction (errors name the field).

    Fields:
        kind: one of :data:`KINDS`.
        coef: weight alpha of the entropy-type term (entropy, tre-k, tre-p), in the paper's units
            (TRE: 0.001). For TRE with ``rescale`` the effective weight is larger, see
            :meth:`effective_coef`.
        k: TRE-K trust-region size (paper: 2; 1 = min-entropy, unscaled).
        p: TRE-P nucleus mass in (0, 1] (paper: 0.99).
        rescale: multiply H_TR by log V / log |A_TR| (official code: on).
        max_candidates: TRE-P searches only the top this many tokens (official code: 256; None = all).
        forking_ratio: fraction of valid tokens that keep their policy gradient (paper: 0.2).
        forking_per_microbatch: select forking tokens within blocks of ``microbatch_size`` rows (the
            official code's behaviour). When the trainer already calls the regulariser once per
            micro-batch, the batch it sees *is* the micro-batch and both settings agree.
        microbatch_size: rows per selection block for ``forking_per_microbatch`` (None: the whole
            batch given).
        cov_ratio: KL-Cov fraction of valid tokens penalised (0.002 = 0.2 %: the TRE paper's runs;
            0.0002: the original paper).
        kl_cov_coef: KL-Cov penalty weight (1.0 in the TRE runs; 0.1 in the original paper).
        clip_cov_ratio: Clip-Cov fraction of valid tokens detached (0.0002).
        clip_cov_lb, clip_cov_ub: Clip-Cov band of Cov values eligible for detaching ([1, 5]).
        seed: seed of the Clip-Cov draw (None: torch's global RNG unless the call gets a generator).

    Use :meth:`preset` for the papers' settings and :meth:`from_dict` for configs.
    """

    kind: str = "none"
    coef: float = 0.0
    k: int = 2
    p: float = 0.99
    rescale: bool = True
    max_candidates: int | None = 256
    forking_ratio: float = 0.2
    forking_per_microbatch: bool = False
    microbatch_size: int | None = None
    cov_ratio: float = 0.002
    kl_cov_coef: float = 1.0
    clip_cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            _fail("kind", f"one of {', '.join(KINDS)}", self.kind)
        for name in ("coef", "kl_cov_coef"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                _fail(name, "a finite number >= 0", value)
            setattr(self, name, float(value))
        if not _is_int(self.k) or self.k < 1:
            _fail("k", "an int >= 1", self.k)
        for name in ("p", "forking_ratio", "cov_ratio", "clip_cov_ratio"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value <= 1.0:
                _fail(name, "a number in (0, 1]", value)
            setattr(self, name, float(value))
        for name in ("rescale", "forking_per_microbatch"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "true or false", getattr(self, name))
        for name in ("max_candidates", "microbatch_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                _fail(name, "None or an int >= 1", value)
        for name in ("clip_cov_lb", "clip_cov_ub"):
            value = getattr(self, name)
            if not _is_real(value):
                _fail(name, "a finite number", value)
            setattr(self, name, float(value))
        if self.clip_cov_lb > self.clip_cov_ub:
            _fail("clip_cov_lb", f"<= clip_cov_ub ({self.clip_cov_ub})", self.clip_cov_lb)
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _fail("seed", "None or an int >= 0", self.seed)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Regularizer:
        """Build from a mapping (the ``regularizer:`` section of a config); unknown keys are an error."""
        d = dict(d or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown regularizer field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Regularizer:
        """A named setting from the papers (:data:`PRESETS`), optionally with overrides.

        ``"kl-cov"`` is KL-Cov as run in the TRE paper (cov_ratio 0.002 = 0.2 %, kl_cov_coef 1.0);
        ``"kl-cov-original"`` is the KL-Cov paper's (0.0002 = 0.02 %, 0.1).
        ``"tre-k"`` / ``"tre-p"``: alpha 0.001.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
        return cls.from_dict({**PRESETS[name], **overrides})

    # ---- facts about the setting --------------------------------------------------------------------------
    @property
    def needs_logits(self) -> bool:
        """Whether ``__call__`` reads the ``(B, T, V)`` logits (the other kinds accept ``logits=None``)."""
        return self.kind in ("entropy", "tre-k", "tre-p", "forking")

    def effective_coef(self, vocab_size: int, nucleus_size: int | None = None) -> float:
        """The weight the entropy-type term really has, in units of an un-rescaled entropy.

        - ``entropy``: coef.
        - ``tre-k`` with rescale and K >= 2: coef * log V / log K, since H_TRE = H_TR * log V / log K.
          The paper's alpha = 0.001 at Qwen2.5's V = 152,064 and K = 2 is 0.001 * 11.93 / 0.693 = 0.017
          effective; at a tiny model's V = 20,000 it is 0.014. K = 1 (min-entropy) or rescale=False: coef.
        - ``tre-p`` with rescale: the factor log V / log |A_TR| varies per position; this returns it for
          ``nucleus_size`` tokens (default 2, the largest factor, an upper bound).
        - kinds without an entropy term (none, forking, kl-cov, clip-cov): 0.0.
        """
        if not _is_int(vocab_size) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2; got {vocab_size!r}")
        if self.kind == "entropy":
            return self.coef
        if self.kind == "tre-k":
            if not self.rescale or self.k < 2:
                return self.coef
            return self.coef * math.log(vocab_size) / math.log(self.k)
        if self.kind == "tre-p":
            if not self.rescale:
                return self.coef
            size = 2 if nucleus_size is None else nucleus_size
            if not _is_int(size) or size < 1:
                raise ValueError(f"nucleus_size must be None or an int >= 1; got {nucleus_size!r}")
            return self.coef * math.log(vocab_size) / math.log(max(size, 2))
        return 0.0

    # ---- the batch computation ----------------------------------------------------------------------------
    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        gen = self.__dict__.get("_gen")  # instance state outside the dataclass fields (asdict ignores it)
        if gen is None or self.__dict__.get("_gen_seed") != self.seed:
            gen = torch.Generator().manual_seed(self.seed)
            self.__dict__["_gen"] = gen
            self.__dict__["_gen_seed"] = self.seed
        return gen

    def __call__(
        self,
        logits: Tensor | None,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        agg: str = "token-mean",
        *,
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
            generator: CPU generator for the Clip-Cov draw (overrides ``seed``).
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
            if self.needs_logits:
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
            bonus = aggregate(h, mask, agg)
            loss = -self.coef * bonus  # L_reg = -alpha * agg(H)
            metrics = {
                "reg/loss": float(loss.detach()),
                "reg/entropy" if kind == "entropy" else "reg/tre_entropy": float(masked_mean(h.detach(), mask)),
            }
            if kind != "tre-p":
                metrics["reg/effective_coef"] = self.effective_coef(int(logits.shape[-1]))
            return RegularizerOutput(loss, ones, metrics)

        valid = mask if mask.dtype == torch.bool else mask != 0
        n_valid = max(int(valid.sum()), 1)

        if kind == "forking":
            with torch.no_grad():
                h = ent.global_entropy(logits.detach())
            rows = self.microbatch_size if self.forking_per_microbatch else None
            sel = forking_mask(h, mask, self.forking_ratio, microbatch_size=rows).to(anchor.device)
            metrics = {
                "reg/loss": 0.0,
                "reg/selected_frac": float(sel.sum()) / n_valid,
                "reg/entropy": float(masked_mean(h, mask)),
                "reg/entropy_selected": float(masked_mean(h, sel)),
            }
            return RegularizerOutput(_zero_loss(anchor), sel, metrics)

        cov = token_covariance(advantages, logprobs, mask)
        if kind == "kl-cov":
            sel = select_top_fraction(cov, mask, self.cov_ratio)
            abs_kl = (logprobs - old_logprobs.detach()).abs()
            # per-token penalty kl_cov_coef * |log pi - log pi_old| on the selected tokens only
            per_token = torch.where(sel.bool(), self.kl_cov_coef * abs_kl, torch.zeros_like(abs_kl))
            loss = aggregate(per_token, mask, agg)
            metrics = {
                "reg/loss": float(loss.detach()),
                "reg/selected_frac": float(sel.sum()) / n_valid,
                "reg/cov_mean": float(masked_mean(cov, mask)),
                "reg/abs_kl_selected": float(masked_mean(abs_kl.detach(), sel)),
            }
            return RegularizerOutput(loss, ones, metrics)

        # clip-cov: pg_mask 0 on the drawn tokens. Their PPO loss term drops out of the sum, exactly like
        # detaching its gradient; the only difference from the official code (which multiplies the loss
        # by 0) is that the masked tokens also leave the token-mean's denominator (a factor (N - n) / N,
        # n ~ 0.02 % of N).
        gen = generator if generator is not None else self._generator()
        keep = clip_cov_mask(cov, mask, self.clip_cov_ratio, self.clip_cov_lb, self.clip_cov_ub, gen)
        in_band = valid & (cov >= self.clip_cov_lb) & (cov <= self.clip_cov_ub)
        metrics = {
            "reg/loss": 0.0,
            "reg/selected_frac": float(masked_sum(1.0 - keep, mask)) / n_valid,
            "reg/candidate_frac": float(in_band.sum()) / n_valid,
            "reg/cov_mean": float(masked_mean(cov, mask)),
        }
        return RegularizerOutput(_zero_loss(anchor), keep.to(anchor.device), metrics)


def _zero_loss(anchor: Tensor) -> Tensor:
    """A float32 scalar 0 on ``anchor``'s device, connected to its graph when it has one (so backward works).

    Built from one element through ``torch.where`` (not ``0 * x``) so an inf in ``anchor`` cannot make NaN.
    """
    one = anchor.reshape(-1)[:1]
    return torch.where(torch.zeros_like(one, dtype=torch.bool), one, torch.zeros_like(one)).sum().float()
