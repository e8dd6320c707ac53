"""PPO for language models: masked statistics, GAE, clipped losses and KL estimators.

Every per-token tensor is ``(B, T)``: B responses, T response positions, right-padded. ``mask`` (bool or float,
``(B, T)``) is 1 on valid response tokens. Every reduction is *masked*: padding never contributes, whatever it holds
(even ``inf``/``nan``), and a batch with no valid token gives a finite 0 that still carries a gradient, never NaN.

The PPO objective (Schulman et al. 2017) per valid token t, with r_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t)):

    L_clip_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    L_t      = min(L_clip_t, -A_t * c)  if A_t < 0 and dual clip c is set (Ye et al. 2020), else L_clip_t

and the loss is ``aggregate(L, mask, agg)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tre_edu.config import ADVANTAGES, AGG_MODES, KL_KINDS

__all__ = ["ADVANTAGES", "AGG_MODES", "KL_KINDS", "add_kl_to_rewards", "aggregate", "compute_advantages"]
__all__ += ["compute_gae", "group_advantages", "explained_variance", "kl_estimate", "masked_mean", "masked_sum"]
__all__ += ["masked_var", "masked_whiten", "micro_batches", "policy_loss", "ppo_loss", "value_loss"]


# exp() of a log-ratio above ~88 overflows float32; +-20 (ratio 2e-9 .. 5e8) is far outside any clip range, so the
# clamp never changes a clipped loss, it only keeps inf (and then NaN = 0 * inf) out of the graph.
LOG_RATIO_CLAMP = 20.0


# ---- Input checks ------------------------------------------------------------------------------------------------
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


def _check_number(what: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float when it is a finite int / float (not a bool) with ``ok(value)``; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{what} must be {allowed}; got {value!r}")
    return float(value)


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}; got {agg!r}")


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _as_weight(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as float weights in the dtype of ``like`` (float32 when ``like`` is an integer tensor)."""
    return mask.to(like.dtype if like.is_floating_point() else torch.float32)


# ---- Masked statistics -------------------------------------------------------------------------------------------
def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum_i mask_i * x_i over ``dim`` (all dims when None); float masks act as weights. Masked-out values are
    dropped with ``torch.where`` (not a product), so inf/NaN in padding can never poison the sum or its gradient."""
    _check_shapes("masked_sum", x=x, mask=mask)
    kept = torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if mask.dtype != torch.bool:
        kept = kept * _as_weight(mask, x)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _count(mask: Tensor, like: Tensor, dim: int | tuple[int, ...] | None) -> Tensor:
    weight = _as_weight(mask, like)
    return weight.sum() if dim is None else weight.sum(dim=dim)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 where den == 0 (num is 0 there for masked sums), keeping num's gradient path."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """sum(mask * x) / sum(mask) over ``dim`` (all dims when None); 0 where the mask sums to 0 (never NaN), still
    connected to ``x``'s graph, so ``loss.backward()`` works and gives zero gradients."""
    return _safe_div(masked_sum(x, mask, dim), _count(mask, x, dim))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the valid entries of ``x`` over all dims: var = sum(mask * (x - mean)^2) / n, times n / (n - 1)
    when ``unbiased`` and n > 1 (Bessel's correction); n = sum(mask). 0 when n == 0."""
    mean = masked_mean(x, mask)
    centered = torch.where(_as_bool(mask), x - mean, torch.zeros_like(x))
    n = _count(mask, x, None)
    var = masked_mean(centered**2, mask)
    if unbiased:
        var = torch.where(n > 1, var * n / torch.clamp(n - 1, min=1), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """The paper's advantage whitening over the whole batch: x_white = (x - mean) / sqrt(var + eps), mean and
    unbiased variance over valid tokens only (``shift_mean=False`` adds the mean back); 0 at masked positions."""
    _check_shapes("masked_whiten", x=x, mask=mask)
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"masked_whiten: eps must be a finite number > 0; got {eps!r}")
    mean = masked_mean(x, mask)
    white = (x - mean) * torch.rsqrt(masked_var(x, mask, unbiased=True) + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(_as_bool(mask), white, torch.zeros_like(white))


def aggregate(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean") -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar.

    - ``"token-mean"``: sum_{b,t} m L / sum_{b,t} m (every valid token weighs the same; the paper's setting).
    - ``"seq-mean-token-mean"``: mean over sequences of (sum_t m L / sum_t m) (every response weighs the same).
    - ``"seq-mean-token-sum"``: mean over sequences of sum_t m L (Dr. GRPO style: long responses weigh more).

    The sequence means run over sequences with at least one valid token (an all-padding row is not a response).
    """
    _check_agg(mode)
    _check_shapes("aggregate", loss_mat=loss_mat, mask=mask)
    if loss_mat.dim() != 2:
        raise ValueError(f"aggregate: loss_mat must be 2-D (B, T); got shape {tuple(loss_mat.shape)}")
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    per_seq = (masked_mean if mode == "seq-mean-token-mean" else masked_sum)(loss_mat, mask, dim=-1)  # (B,)
    return masked_mean(per_seq, _count(mask, loss_mat, -1) > 0)


# ---- Advantages --------------------------------------------------------------------------------------------------
@torch.no_grad()
def terminal_rewards(scores: Tensor, mask: Tensor) -> Tensor:
    """Per-token rewards ``(B, T)`` with the score ``(B,)`` of each response on its last valid token, 0 elsewhere
    (a response with no valid token gets no reward: there is no token to put it on)."""
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

    ``values``: the critic's V_t = V(s_t) for the state before token t; gamma, lam in [0, 1] (the paper: both 1).
    Returns ``(advantages, returns)``, detached, 0 at masked positions, with

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t            (the critic's regression target)

    where "t+1" is the next *valid* token and the value after the last valid token is 0 (the episode ends). With
    gamma = lam = 1 and a single terminal reward R, A_t = R - V_t.
    """
    _check_shapes("compute_gae", rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"compute_gae: rewards must be 2-D (B, T); got shape {tuple(rewards.shape)}")
    gamma = _check_number("gamma", gamma, "a number in [0, 1]", lambda v: 0 <= v <= 1)
    lam = _check_number("lam", lam, "a number in [0, 1]", lambda v: 0 <= v <= 1)

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
    consecutive responses (the samples of one prompt), on every valid token; the returns are 0 (no critic).

        A_{i,t} = R_i - mean_{j in group(i)} R_j
    """
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
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi (Schulman's k1/k2/k3), with
    log-ratio x = log pi(a) - log pi_ref(a) (clamped to [-20, 20] for k3); padding is not masked here:

    - ``"k1"``: x (unbiased, can be negative, high variance)
    - ``"k2"``: 0.5 * x^2 (biased, >= 0, low variance)
    - ``"k3"``: exp(-x) - (-x) - 1 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0, low variance)
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
    """Per-token KL-shaped rewards r_t - coef * kl_t (classic RLHF "KL in reward"; off in the paper), on valid tokens
    when ``mask`` is given; the KL is detached (it shapes the reward, it is not a loss)."""
    _check_shapes("add_kl_to_rewards", rewards=rewards, kl=kl, mask=mask)
    _check_number("add_kl_to_rewards: coef", coef, "a finite number >= 0", lambda v: v >= 0)
    penalty = coef * kl.detach().to(rewards.dtype if rewards.is_floating_point() else torch.float32)
    if mask is not None:
        penalty = torch.where(_as_bool(mask), penalty, torch.zeros_like(penalty))
    return rewards - penalty


# ---- Losses ------------------------------------------------------------------------------------------------------
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
    """Clipped PPO surrogate with asymmetric clip range and dual clip (the module's L_t), ``aggregate(L, mask, agg)``.

    Dual clip caps the loss of a token with A < 0 at dual_clip * |A|, so a huge ratio cannot dominate the batch.
    ``old_logprobs`` and ``advantages`` are constants. Metrics (masked means): ``policy/clipfrac`` (L2 > L1: the
    gradient is cut), ``policy/dual_clipfrac``, ``policy/approx_kl`` (k3 of KL(pi_old || pi), as in CleanRL), ...
    """
    _check_shapes("policy_loss", logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    _check_agg(agg)
    clip_low = _check_number("policy_loss: clip_low", clip_low, "a number in [0, 1.0)", lambda v: 0 <= v < 1)
    clip_high = _check_number("policy_loss: clip_high", clip_high, "a number >= 0 and finite", lambda v: v >= 0)
    if dual_clip is not None:
        _check_number("policy_loss: dual_clip", dual_clip, "None or a finite number > 1", lambda v: v > 1)

    adv = advantages.detach()
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss1 = -adv * ratio  # L1 = -A r
    loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # L2 = -A clip(r, 1-eps_low, 1+eps_high)
    per_token = clipped = torch.maximum(loss1, loss2)  # L_clip = max(L1, L2)
    dual_active = torch.zeros_like(adv, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip  # = dual_clip * |A| where A < 0
        dual_active = (adv < 0) & (clipped > cap)
        per_token = torch.where(adv < 0, torch.minimum(clipped, cap), clipped)
    loss = aggregate(per_token, mask, agg)

    with torch.no_grad():
        m = mask.detach()
        metrics = {
            "policy/loss": float(loss.detach()),
            "policy/clipfrac": float(masked_mean((loss2 > loss1).float(), m)),
            "policy/dual_clipfrac": float(masked_mean(dual_active.float(), m)),
            "policy/approx_kl": float(masked_mean((ratio - 1.0) - log_ratio, m)),  # k3 of KL(old || new)
            "policy/ratio_mean": float(masked_mean(ratio, m)),
        }
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = 0.5, agg: str = "token-mean"
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss, ``aggregate(L, mask, agg)``; ``old_values`` (rollout critic) and ``returns`` are constants.

        V_clip = old_V + clip(V - old_V, -clip, clip)
        L      = 0.5 * max((V - R)^2, (V_clip - R)^2)     (plain 0.5 (V - R)^2 when clip is None)

    Metrics: ``value/loss``, ``value/clipfrac``, ``value/explained_variance``, ``value/mean`` (predicted).
    """
    _check_shapes("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    _check_agg(agg)
    old_values, returns = old_values.detach(), returns.detach()
    loss_unclipped = (values - returns) ** 2
    per_token, clip_active = 0.5 * loss_unclipped, torch.zeros_like(values, dtype=torch.bool)
    if clip is not None:
        clip = _check_number("value_loss: clip", clip, "a number >= 0 and finite", lambda v: v >= 0)
        loss_clipped = (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2
        per_token = 0.5 * torch.maximum(loss_unclipped, loss_clipped)
        clip_active = loss_clipped > loss_unclipped
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
    """1 - Var[target - pred] / Var[target] over valid tokens, a float: 1 is a perfect critic, 0 no better than
    predicting the mean, negative worse. 0.0 (not NaN) when the target's variance is below 1e-8 or fewer than 2
    tokens are valid."""
    _check_shapes("explained_variance", pred=pred, target=target, mask=mask)
    pred, target = pred.float(), target.float()
    n = float(_count(mask, target, None))
    var_target = float(masked_var(target, mask, unbiased=False))
    # A (numerically) constant target, e.g. a micro-batch whose rewards are all 0, leaves the ratio undefined:
    # round-off variance of ~1e-15 would otherwise give values like -1e13.
    if n < 2 or not var_target > 1e-8:
        return 0.0
    return 1.0 - float(masked_var(target - pred, mask, unbiased=False)) / var_target


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
    ``settings``: the ``ppo`` section. ``values`` None: no critic term; ``ref_logprobs`` None: no KL term.
    ``weight``: this micro-batch's share of its mini-batch (gradient accumulation); ``pg_weight`` (default
    ``weight``) the same for the policy-gradient tokens when a whole-mini-batch selection thinned them out. Returns
    the weighted loss to backpropagate and the metrics (``loss/total``: the unweighted sum)."""
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
    """Split a mini-batch (its ``(M, T)`` masks) into micro-batches ``(rows, weight, pg_weight)``: a slice of rows,
    its share of the mini-batch's loss (token-mean: of the valid tokens; otherwise of the responses) and the same
    over the policy-gradient tokens ``mask * pg_mask``, so the accumulated gradient equals one big micro-batch's."""
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
