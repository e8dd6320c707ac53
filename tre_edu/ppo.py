"""PPO for language models: masked statistics, GAE, clipped losses and KL estimators.

Conventions
-----------
Every per-token tensor is ``(B, T)``: B responses, T response positions. Responses are right-padded:
a valid prefix followed by padding. ``mask`` is a ``(B, T)`` bool or float tensor, 1 (True) on valid
response tokens, 0 on padding. Nothing here knows about vocabularies; logits live in
:mod:`tre_edu.entropy` and :mod:`tre_edu.regularizers`.

Every reduction is *masked*: padding never contributes, whatever numbers it holds (even ``inf``/``nan``),
and a batch with no valid token gives a finite 0 that still carries a gradient, never NaN.

The PPO objective (Schulman et al. 2017) per valid token t, with ratio
r_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t)):

    L_clip_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    L_t      = min(L_clip_t, -A_t * c)  if A_t < 0 and dual clip c is set (Ye et al. 2020), else L_clip_t

and the loss is ``aggregate(L, mask, agg)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tre_edu.config import ADVANTAGES, AGG_MODES, KL_KINDS

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_KINDS",
    "add_kl_to_rewards",
    "aggregate",
    "compute_advantages",
    "compute_gae",
    "group_advantages",
    "explained_variance",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "micro_batches",
    "policy_loss",
    "ppo_loss",
    "value_loss",
]


# exp() of a log-ratio above ~88 overflows float32; +-20 (ratio 2e-9 .. 5e8) is far outside any clip
# range, so the clamp never changes a clipped loss, it only keeps inf (and then NaN = 0 * inf) out of
# the graph.
LOG_RATIO_CLAMP = 20.0


# ------------------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------------------
def _check_shapes(fn: str, **tensors: Tensor | None) -> None:
    """Raise ValueError naming every argument and its shape unless all given tensors have the same shape."""
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: shapes must match; got {listed}")


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {agg!r}")


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _as_weight(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as float weights in the dtype of ``like`` (float32 when ``like`` is an integer tensor)."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


# ------------------------------------------------------------------------------------------------------------
# Masked statistics
# ------------------------------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum_i mask_i * x_i over ``dim`` (all dims when None).

    ``x`` and ``mask`` have the same shape (typically ``(B, T)``); ``mask`` is bool or float (float masks
    act as weights). Values of ``x`` at masked-out positions are ignored even if they are inf/NaN
    (``torch.where``, not a product), so padding can never poison the sum or its gradient.
    """
    _check_shapes("masked_sum", x=x, mask=mask)
    weight = _as_weight(mask, x)
    kept = torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if mask.dtype != torch.bool:
        kept = kept * weight
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _count(mask: Tensor, like: Tensor, dim: int | tuple[int, ...] | None) -> Tensor:
    weight = _as_weight(mask, like)
    return weight.sum() if dim is None else weight.sum(dim=dim)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (num is 0 there for masked sums), keeping num's gradient path."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum(mask * x) / sum(mask) over ``dim`` (all dims when None); 0 where the mask sums to 0 (never NaN).

    Shapes as :func:`masked_sum`. The zero result of an empty mask is still connected to ``x``'s graph, so
    ``loss.backward()`` works and gives zero gradients.
    """
    return _safe_div(masked_sum(x, mask, dim), _count(mask, x, dim))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` (shape of ``mask``), over all dims; a scalar.

    var = sum(mask * (x - mean)^2) / n, times n / (n - 1) when ``unbiased`` and n > 1 (Bessel's correction);
    n = sum(mask). Returns 0 when n == 0 (and no correction when n <= 1).
    """
    mean = masked_mean(x, mask)
    centered = torch.where(_as_bool(mask), x - mean, torch.zeros_like(x))
    n = _count(mask, x, None)
    var = masked_mean(centered**2, mask)
    if unbiased:
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten the valid entries of ``x`` over the whole batch (all dims): the paper's advantage whitening.

    x_white = (x - mean) / sqrt(var + eps), mean and (unbiased) variance over valid tokens only. With
    ``shift_mean=False`` the mean is added back (only the scale changes). ``x``, ``mask``: same shape,
    e.g. (B, T).
    Masked-out positions of the result are 0.
    """
    _check_shapes("masked_whiten", x=x, mask=mask)
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"masked_whiten: eps must be a finite number > 0; got {eps!r}")
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(_as_bool(mask), white, torch.zeros_like(white))


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar.

    - ``"token-mean"``: sum_{b,t} m L / sum_{b,t} m (every valid token weighs the same; the paper's setting).
    - ``"seq-mean-token-mean"``: mean over sequences of (sum_t m L / sum_t m) (every response
      weighs the same).
    - ``"seq-mean-token-sum"``: mean over sequences of sum_t m L (Dr. GRPO style: long responses weigh more).

    The sequence means run over sequences with at least one valid token (an all-padding row is not
    a response). An all-zero mask gives 0.0, finite and connected to ``loss_mat``'s graph, never NaN.
    """
    _check_agg(mode)
    _check_shapes("aggregate", loss_mat=loss_mat, mask=mask)
    if loss_mat.dim() != 2:
        raise ValueError(f"aggregate: loss_mat must be 2-D (B, T); got shape {tuple(loss_mat.shape)}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(loss_mat, mask, dim=-1)  # (B,)
    else:  # seq-mean-token-sum
        per_seq = masked_sum(loss_mat, mask, dim=-1)  # (B,)
    has_tokens = _count(mask, loss_mat, -1) > 0  # (B,)
    return masked_mean(per_seq, has_tokens)


# ------------------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------------------
def _check_unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


@torch.no_grad()
def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards ``(B, T)`` with the scalar score of each response on its last valid token, 0 elsewhere.

    ``scores``: ``(B,)``; ``mask``: ``(B, T)`` valid response tokens (a valid prefix, then padding). A response
    with no valid token gets no reward (there is no token to put it on).
    """
    if scores.dim() != 1 or mask.dim() != 2 or scores.shape[0] != mask.shape[0]:
        raise ValueError(
            f"terminal_rewards: scores must be (B,) and mask (B, T); got {tuple(scores.shape)}, {tuple(mask.shape)}"
        )
    lengths = _as_bool(mask).sum(1)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = (lengths > 0).nonzero(as_tuple=True)[0]
    rewards[rows, lengths[rows] - 1] = scores[rows].to(rewards)
    return rewards


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    Args:
        rewards: ``(B, T)`` per-token rewards; for the paper's set-up the scalar task reward sits on the
            last valid response token and everything else is 0 (KL penalties, if any, are folded in).
        values: ``(B, T)`` critic values V_t = V(s_t) for the state before response token t.
        mask: ``(B, T)`` valid response tokens (right-padded: a valid prefix, then zeros).
        gamma: discount in [0, 1]. lam: GAE lambda in [0, 1]. The paper uses gamma = lam = 1.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, detached, 0 at masked positions, with

            delta_t = r_t + gamma * V_{t+1} - V_t
            A_t     = delta_t + gamma * lam * A_{t+1}
            R_t     = A_t + V_t            (the critic's regression target)

        where "t+1" is the next *valid* token and the value after the last valid token is 0 (the
        episode ends). Masked positions are skipped: they neither receive nor pass on anything. With
        gamma = lam = 1 and a single terminal reward R, A_t = R - V_t.
    """
    _check_shapes("compute_gae", rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"compute_gae: rewards must be 2-D (B, T); got shape {tuple(rewards.shape)}")
    gamma = _check_unit_interval("gamma", gamma)
    lam = _check_unit_interval("lam", lam)

    dtype = torch.promote_types(rewards.dtype, values.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    valid = _as_bool(mask)
    # Padding may hold anything; zero it so it can never leak through the arithmetic below.
    r = torch.where(valid, rewards.to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    v = torch.where(valid, values.to(dtype), torch.zeros((), dtype=dtype, device=values.device))

    B, T = r.shape
    advantages = torch.zeros_like(r)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)  # V_{t+1}: 0 after the last valid token
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)  # A_{t+1}
    for t in reversed(range(T)):  # vectorised over B
        delta = r[:, t] + gamma * next_value - v[:, t]  # delta_t = r_t + gamma V_{t+1} - V_t
        adv = delta + gamma * lam * next_adv  # A_t = delta_t + gamma lam A_{t+1}
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
        # A masked position is skipped: the carried V_{t+1} and A_{t+1} pass through it unchanged.
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(valid, advantages + v, torch.zeros_like(v))  # R_t = A_t + V_t
    return advantages, returns


@torch.no_grad()
def group_advantages(scores: Tensor, mask: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """GRPO's critic-free estimator: each response's score minus the mean score of its group of ``group_size``
    consecutive responses (the samples of one prompt), on every valid token.

        A_{i,t} = R_i - mean_{j in group(i)} R_j

    ``scores``: ``(B,)``, ``mask``: ``(B, T)``; returns ``(advantages, returns)``, ``(B, T)``, where the returns are 0
    (there is no critic to regress)."""
    B, T = mask.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or B % group_size:
        raise ValueError(f"group_size must be an int >= 1 that divides the batch ({B}); got {group_size!r}")
    group = scores.view(-1, group_size)
    adv = (group - group.mean(1, keepdim=True)).view(-1)[:, None].expand(B, T) * mask
    return adv, torch.zeros_like(adv)


@torch.no_grad()
def compute_advantages(
    estimator: str,
    *,
    scores: Tensor,
    rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    group_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """``(advantages, returns)`` by name (:data:`ADVANTAGES`): ``"gae"`` (:func:`compute_gae` on the per-token
    ``rewards`` and the critic's ``values``) or ``"grpo"`` (:func:`group_advantages` on the scalar ``scores``)."""
    if estimator == "gae":
        if values is None:
            raise ValueError("advantage estimator 'gae' needs the critic's values; got None")
        return compute_gae(rewards, values, mask, gamma, lam)
    if estimator == "grpo":
        return group_advantages(scores, mask, group_size)
    raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}; got {estimator!r}")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman's k1/k2/k3).

    With log-ratio x = log pi(a) - log pi_ref(a), ``(B, T)`` in and ``(B, T)`` out:

    - ``"k1"``: x (unbiased, can be negative, high variance)
    - ``"k2"``: 0.5 * x^2 (biased, >= 0, low variance)
    - ``"k3"``: exp(-x) - (-x) - 1 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0, low variance)

    x is clamped to [-20, 20] for k3 so exp() cannot overflow. Padding is not masked here: mask the result
    (e.g. with :func:`masked_mean`) or fold it into rewards with :func:`add_kl_to_rewards`.
    """
    _check_shapes("kl_estimate", logprobs=logprobs, ref_logprobs=ref_logprobs)
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(KL_KINDS)}; got {kind!r}")
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    neg = (-log_ratio).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # ref - logp
    return torch.exp(neg) - neg - 1.0


def add_kl_to_rewards(rewards: Tensor, kl: Tensor, coef: float, mask: Tensor | None = None) -> Tensor:
    """Per-token KL-shaped rewards r_t - coef * kl_t (classic RLHF "KL in reward"; off in the paper).

    ``rewards``, ``kl`` (from :func:`kl_estimate`) and ``mask``: ``(B, T)``. The KL is detached (it shapes the
    reward, it is not a loss) and applied only on valid tokens when ``mask`` is given.
    """
    _check_shapes("add_kl_to_rewards", rewards=rewards, kl=kl, mask=mask)
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"add_kl_to_rewards: coef must be a finite number >= 0; got {coef!r}")
    penalty = coef * kl.detach().to(rewards.dtype if rewards.is_floating_point() else torch.float32)
    if mask is not None:
        penalty = torch.where(_as_bool(mask), penalty, torch.zeros_like(penalty))
    return rewards - penalty


# ------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------
def _check_nonneg(fn: str, name: str, value: float, upper: float | None = None) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and value >= 0
    if ok and upper is not None:
        ok = value < upper
    if not ok:
        allowed = f"in [0, {upper})" if upper is not None else ">= 0 and finite"
        raise ValueError(f"{fn}: {name} must be a number {allowed}; got {value!r}")
    return float(value)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped PPO surrogate with asymmetric clip range and dual clip. All inputs ``(B, T)``.

    Per valid token (r = exp(logprobs - old_logprobs), log-ratio clamped to [-20, 20] before exp):

        L1 = -A r,  L2 = -A clip(r, 1 - clip_low, 1 + clip_high),  L_clip = max(L1, L2)
        L  = min(L_clip, -A * dual_clip)  for A < 0 (the loss is capped at dual_clip * |A|), else L_clip

    Dual clip stops a token with negative advantage and a huge ratio from dominating the batch. The result is
    ``aggregate(L, mask, agg)``. ``old_logprobs`` and ``advantages`` are treated as constants (detached).

    Metrics (floats, masked means over valid tokens):
        ``policy/clipfrac``: fraction where the clip is active (L2 > L1, so the gradient is cut);
        ``policy/dual_clipfrac``: fraction where A < 0 and the dual cap is active;
        ``policy/approx_kl``: k3 estimate of KL(pi_old || pi), mean of (r - 1) - log r (>= 0, unbiased
        for samples from pi_old, as in CleanRL); ``policy/ratio_mean``; ``policy/loss``.
    """
    _check_shapes("policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    _check_agg(agg)
    clip_low = _check_nonneg("policy_loss", "clip_low", clip_low, upper=1.0)
    clip_high = _check_nonneg("policy_loss", "clip_high", clip_high)
    if dual_clip is not None and (
        isinstance(dual_clip, bool)
        or not isinstance(dual_clip, int | float)
        or not math.isfinite(dual_clip)
        or dual_clip <= 1.0
    ):
        raise ValueError(f"policy_loss: dual_clip must be None or a finite number > 1; got {dual_clip!r}")

    adv = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio  # L1 = -A r
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # L2 = -A clip(r, 1-eps_low, 1+eps_high)
    clipped = torch.maximum(loss1, loss2)  # L_clip = max(L1, L2)
    if dual_clip is not None:
        cap = -adv * dual_clip  # = dual_clip * |A| where A < 0
        dual_active = (adv < 0) & (clipped > cap)
        per_token = torch.where(adv < 0, torch.minimum(clipped, cap), clipped)
    else:
        dual_active = torch.zeros_like(adv, dtype=torch.bool)
        per_token = clipped
    loss = aggregate(per_token, mask, agg)

    with torch.no_grad():
        m = mask.detach()
        approx_kl = (ratio - 1.0) - log_ratio  # k3 of KL(old || new)
        metrics = {
            "policy/loss": float(loss.detach()),
            "policy/clipfrac": float(masked_mean((loss2 > loss1).float(), m)),
            "policy/dual_clipfrac": float(masked_mean(dual_active.float(), m)),
            "policy/approx_kl": float(masked_mean(approx_kl.detach(), m)),
            "policy/ratio_mean": float(masked_mean(ratio.detach(), m)),
        }
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float | None = 0.5,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss. Inputs ``(B, T)``; ``old_values`` (rollout critic) and ``returns`` are constants.

        V_clip = old_V + clip(V - old_V, -clip, clip)
        L      = 0.5 * max((V - R)^2, (V_clip - R)^2)     (plain 0.5 (V - R)^2 when clip is None)

    The result is ``aggregate(L, mask, agg)``. Metrics: ``value/loss``, ``value/clipfrac`` (fraction where the
    clipped branch is the larger one), ``value/explained_variance`` (of the returns by the values),
    ``value/mean`` (mean predicted value).
    """
    _check_shapes("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    _check_agg(agg)
    if clip is not None:
        clip = _check_nonneg("value_loss", "clip", clip)
    old_values = old_values.detach()
    returns = returns.detach()
    loss_unclipped = (values - returns) ** 2
    if clip is not None:
        v_clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss_clipped = (v_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clip_active = loss_clipped > loss_unclipped
    else:
        per_token = 0.5 * loss_unclipped
        clip_active = torch.zeros_like(values, dtype=torch.bool)
    loss = aggregate(per_token, mask, agg)
    with torch.no_grad():
        m = mask.detach()
        metrics = {
            "value/loss": float(loss.detach()),
            "value/clipfrac": float(masked_mean(clip_active.float(), m)),
            "value/explained_variance": explained_variance(values.detach(), returns, m),
            "value/mean": float(masked_mean(values.detach(), m)),
        }
    return loss, metrics


@torch.no_grad()
def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """1 - Var[target - pred] / Var[target] over valid tokens (``(B, T)`` inputs), a float.

    1 is a perfect critic, 0 is no better than predicting the mean, negative is worse. Undefined when
    the target has (near) zero variance, below 1e-8 (or fewer than 2 valid tokens): then 0.0 is returned instead of NaN.
    """
    _check_shapes("explained_variance", pred=pred, target=target, mask=mask)
    pred = pred.float()
    target = target.float()
    n = float(_count(mask, target, None))
    var_target = float(masked_var(target, mask, unbiased=False))
    # A (numerically) constant target, e.g. a micro-batch whose rewards are all 0, leaves the ratio undefined:
    # round-off variance of ~1e-15 would otherwise give values like -1e13.
    if n < 2 or not var_target > 1e-8:
        return 0.0
    var_resid = float(masked_var(target - pred, mask, unbiased=False))
    return 1.0 - var_resid / var_target


def ppo_loss(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    pg_mask: Tensor,
    reg_loss: Tensor,
    settings: Any,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    dual_clip: bool = True,
    weight: float = 1.0,
    pg_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one micro-batch, every term in one expression (all tensors ``(B, T)``):

        L = w_pg * L_clip(log pi, log pi_old, A; mask * pg_mask)                 policy gradient
          + w * (L_reg + c_V * L_V(V, V_old, G) + c_KL * agg(KL(pi || pi_ref)))  regulariser, critic, KL

    ``reg_loss`` and ``pg_mask`` come from the regulariser (L_reg = -alpha agg(H) for the entropy kinds);
    ``settings``: the ``ppo`` section (clip_low / clip_high / dual_clip / value_clip / value_coef / kl_coef /
    kl_kind / agg). ``values`` None: no critic term; ``ref_logprobs`` None: no KL term. ``weight``: this
    micro-batch's share of its mini-batch (gradient accumulation); ``pg_weight`` (default ``weight``) the same for
    the policy-gradient tokens when a whole-mini-batch selection thinned them out. Returns the weighted loss to
    backpropagate and the metrics (``loss/total``: the unweighted sum)."""
    s = settings
    clip = {"clip_low": s.clip_low, "clip_high": s.clip_high, "agg": s.agg}
    l_pg, metrics = policy_loss(logprobs, old_logprobs, advantages, mask * pg_mask.to(mask.dtype), **clip,
                                dual_clip=s.dual_clip if dual_clip else None)  # fmt: skip
    l_v = l_kl = torch.zeros((), device=logprobs.device)
    if values is not None:
        l_v, v_metrics = value_loss(values, old_values, returns, mask, clip=s.value_clip, agg=s.agg)
        metrics.update(v_metrics)
    if ref_logprobs is not None:
        l_kl = aggregate(kl_estimate(logprobs, ref_logprobs, s.kl_kind), mask, s.agg)
        metrics["kl/loss"] = float(l_kl.detach())
    w_pg = weight if pg_weight is None else pg_weight
    metrics["loss/total"] = float((l_pg + (reg_loss + s.value_coef * l_v + s.kl_coef * l_kl)).detach())
    return w_pg * l_pg + weight * (reg_loss + s.value_coef * l_v + s.kl_coef * l_kl), metrics


def micro_batches(
    mask: Tensor, micro_batch_size: int, agg: str, pg_mask: Tensor | None = None
) -> list[tuple[slice, float, float]]:
    """Split a mini-batch (``mask`` / ``pg_mask``: its ``(M, T)`` masks) into micro-batches for gradient accumulation:
    ``(rows, weight, pg_weight)`` each, where ``rows`` is a slice of the mini-batch, ``weight`` the micro-batch's share
    of the mini-batch's loss (token-mean: its share of the valid tokens; otherwise of the responses) and ``pg_weight``
    the same over the policy-gradient tokens ``mask * pg_mask`` (a whole-mini-batch selection), so that the
    accumulated gradient equals one big micro-batch's."""
    M, token_mean = mask.shape[0], agg == "token-mean"
    total = float(mask.sum().clamp(min=1.0))
    pg_tokens = None if pg_mask is None else pg_mask.to(mask.dtype) * mask
    pg_total = None if pg_tokens is None else float(pg_tokens.sum().clamp(min=1.0))
    out = []
    for m in range(0, M, micro_batch_size):
        part = slice(m, min(m + micro_batch_size, M))
        weight = float(mask[part].sum()) / total if token_mean else (part.stop - part.start) / M
        pg_weight = float(pg_tokens[part].sum()) / pg_total if pg_tokens is not None and token_mean else weight
        out.append((part, weight, pg_weight))
    return out
