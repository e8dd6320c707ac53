"""Tests for tre_edu.ppo: hand-computed losses, GAE against a plain loop, masking edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from tre_edu.ppo import (
    AGG_MODES,
    add_kl_to_rewards,
    aggregate,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    terminal_rewards,
    value_loss,
)

# ------------------------------------------------------------------------------------------------------------
# masked statistics and aggregation
# ------------------------------------------------------------------------------------------------------------
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_mean_hand():
    # valid entries 1, 2, 4: sum 7, mean 7/3; per row: sums (3, 4), means (1.5, 4)
    assert masked_sum(X, M).item() == pytest.approx(7.0)
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    assert masked_sum(X, M, dim=-1).tolist() == pytest.approx([3.0, 4.0])
    assert masked_mean(X, M, dim=-1).tolist() == pytest.approx([1.5, 4.0])
    assert masked_mean(X, M.bool()).item() == pytest.approx(7.0 / 3.0)  # bool masks work the same


def test_masked_mean_ignores_inf_nan_in_padding():
    x = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]], requires_grad=True)
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = masked_mean(x, m)
    assert out.item() == pytest.approx(2.0)
    out.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.tolist() == [[0.5, 0.0], [0.5, 0.0]]


def test_masked_mean_empty_rows_are_zero():
    m = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_mean(X, m, dim=-1).tolist() == [1.5, 0.0]


def test_masked_var_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5: biased 5/4, unbiased 5/3
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(1.25)
    assert masked_var(x, m).item() == pytest.approx(5.0 / 3.0)
    assert masked_var(x, torch.zeros_like(m)).item() == 0.0


def test_masked_whiten():
    torch.manual_seed(0)
    x = torch.randn(4, 6) * 3 + 2
    m = torch.ones(4, 6)
    m[1, 3:] = 0
    m[3, 1:] = 0
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[m == 0] == 0).all()
    w2 = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w2, m).item() == pytest.approx(masked_mean(x, m).item(), abs=1e-5)
    assert torch.isfinite(masked_whiten(x, torch.zeros_like(m))).all()
    with pytest.raises(ValueError, match="eps"):
        masked_whiten(x, m, eps=0.0)


def test_aggregate_modes_hand():
    # token-mean: (1 + 2 + 4) / 3;  seq-mean-token-mean: mean(1.5, 4) = 2.75;
    # seq-mean-token-sum: mean(3, 4) = 3.5
    assert aggregate(X, M, "token-mean").item() == pytest.approx(7.0 / 3.0)
    assert aggregate(X, M, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(X, M, "seq-mean-token-sum").item() == pytest.approx(3.5)
    # an all-padding row is not a response: it changes none of the three
    x3 = torch.cat([X, torch.tensor([[7.0, 8.0, 9.0]])])
    m3 = torch.cat([M, torch.zeros(1, 3)])
    assert aggregate(x3, m3, "token-mean").item() == pytest.approx(7.0 / 3.0)
    assert aggregate(x3, m3, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(x3, m3, "seq-mean-token-sum").item() == pytest.approx(3.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_all_padding_is_finite_zero_with_grad(mode):
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 2.0]], requires_grad=True)
    out = aggregate(x, torch.zeros(2, 2), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 2))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum"):
        aggregate(X, M, "mean")
    with pytest.raises(ValueError, match=r"loss_mat \(2, 3\), mask \(2, 2\)"):
        aggregate(X, M[:, :2], "token-mean")
    with pytest.raises(ValueError, match="2-D"):
        aggregate(X.reshape(-1), M.reshape(-1), "token-mean")


# ------------------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------------------
def _gae_loop(rewards, values, lengths, gamma, lam):
    """Reference: plain Python over each response's valid prefix."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.7)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    expected = _gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, (adv + values) * mask, atol=1e-12)


def test_gae_hand():
    # gamma = lam = 0.5, r = (0, 0, 1), V = (0.5, 0.5, 0.5):
    # t=2: delta = 1 + 0 - 0.5 = 0.5,            A2 = 0.5
    # t=1: delta = 0 + 0.5*0.5 - 0.5 = -0.25,   A1 = -0.25 + 0.25*0.5 = -0.125
    # t=0: delta = -0.25,                        A0 = -0.25 + 0.25*(-0.125) = -0.28125
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.full((1, 3), 0.5)
    adv, ret = compute_gae(r, v, torch.ones(1, 3), 0.5, 0.5)
    assert adv.tolist()[0] == pytest.approx([-0.28125, -0.125, 0.5])
    assert ret.tolist()[0] == pytest.approx([0.21875, 0.375, 1.0])


def test_gae_gamma_lambda_one_is_reward_minus_value():
    torch.manual_seed(0)
    B, T = 3, 6
    lengths = [6, 4, 2]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    R = torch.tensor([1.0, -0.5, 2.0])
    rewards = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        rewards[b, n - 1] = R[b]  # scalar reward on the last response token
    values = torch.randn(B, T)
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, (R[:, None] - values) * mask, atol=1e-6)
    assert torch.allclose(ret, R[:, None] * mask, atol=1e-6)  # returns = R on every valid token


def test_gae_padding_garbage_is_ignored_and_detached():
    r = torch.tensor([[0.0, 1.0, float("nan")]])
    v = torch.tensor([[0.2, 0.4, float("inf")]], requires_grad=True)
    adv, ret = compute_gae(r, v, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0)
    # A = R - V = (0.8, 0.6), 0 at padding
    assert adv.tolist()[0] == pytest.approx([0.8, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rewards \(2, 3\), values \(2, 4\)"):
        compute_gae(x, torch.zeros(2, 4), x, 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, x, 1.5, 1.0)
    with pytest.raises(ValueError, match="lam"):
        compute_gae(x, x, x, 1.0, -0.1)


# ------------------------------------------------------------------------------------------------------------
# policy loss
# ------------------------------------------------------------------------------------------------------------
def _policy_case():
    # four tokens (ratio, A): (1.5, +1), (0.5, -1), (5, -1), (1, +2)
    ratios = torch.tensor([[1.5, 0.5, 5.0, 1.0]])
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0, -0.5]])
    logp = (old + ratios.log()).requires_grad_(True)
    return logp, old, adv, torch.ones(1, 4)


def test_policy_loss_hand_dual_clip():
    logp, old, adv, mask = _policy_case()
    loss, m = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    # tok1: L1 = -1.5, L2 = -1.2 -> -1.2 (clipped, no grad)
    # tok2: L1 = 0.5, L2 = 0.8 -> 0.8 (clipped, no grad)
    # tok3: L1 = 5, L2 = 1.2 -> 5; A < 0: min(5, 3 * |A|) = 3 (dual clip, no grad)
    # tok4: L1 = L2 = -2
    # token-mean: (-1.2 + 0.8 + 3 - 2) / 4 = 0.15
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert m["policy/loss"] == pytest.approx(0.15, abs=1e-6)
    assert m["policy/clipfrac"] == pytest.approx(0.5)  # tok1, tok2 (L2 > L1)
    assert m["policy/dual_clipfrac"] == pytest.approx(0.25)  # tok3
    assert m["policy/ratio_mean"] == pytest.approx(2.0, abs=1e-6)  # (1.5 + 0.5 + 5 + 1) / 4
    # approx_kl = mean((r - 1) - log r) = (0.094535 + 0.193147 + 2.390562 + 0) / 4
    assert m["policy/approx_kl"] == pytest.approx(0.669561, abs=1e-5)
    loss.backward()
    # only tok4 is unclipped: dL/dlogp = -A r / 4 = -2 / 4
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 0.0, -0.5], abs=1e-6)


def test_policy_loss_without_dual_clip():
    logp, old, adv, mask = _policy_case()
    loss, m = policy_loss(logp, old, adv, mask, dual_clip=None)
    # tok3 keeps L = 5: (-1.2 + 0.8 + 5 - 2) / 4 = 0.65, and its gradient -A r / 4 = 5 / 4
    assert loss.item() == pytest.approx(0.65, abs=1e-6)
    assert m["policy/dual_clipfrac"] == 0.0
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1.25, -0.5], abs=1e-5)


def test_policy_loss_asymmetric_clip():
    # (ratio, A): (1.25, +1), (0.75, -1)
    old = torch.zeros(1, 2)
    logp = torch.tensor([[1.25, 0.75]]).log().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    # clip_high = 0.28 lets ratio 1.25 through (L = -1.25, grad -A r = -1.25);
    # clip_low = 0.2 clips ratio 0.75 at 0.8 (L = max(0.75, 0.8) = 0.8, no grad)
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2, abs=1e-6)
    assert m["policy/clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.25 / 2, 0.0], abs=1e-6)
    # symmetric 0.2 clips the first token too: (-1.2 + 0.8) / 2
    loss_sym, m_sym = policy_loss(logp, old, adv, torch.ones(1, 2), clip_low=0.2, clip_high=0.2)
    assert loss_sym.item() == pytest.approx(-0.2, abs=1e-6)
    assert m_sym["policy/clipfrac"] == pytest.approx(1.0)


def test_policy_loss_masking_and_aggregation():
    logp, old, adv, _ = _policy_case()
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # drop tok4
    loss, m = policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 3.0) / 3, abs=1e-6)
    assert m["policy/clipfrac"] == pytest.approx(2 / 3)
    loss_sum, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum")
    assert loss_sum.item() == pytest.approx(-1.2 + 0.8 + 3.0, abs=1e-5)


def test_policy_loss_extreme_ratio_is_finite():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[1000.0, -1000.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 3), dual_clip=None)
    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in m.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_all_padding():
    logp, old, adv, _ = _policy_case()
    logp = logp.detach().clone()
    logp[0, 0] = float("-inf")  # padding may hold anything
    logp.requires_grad_(True)
    for agg in AGG_MODES:
        loss, m = policy_loss(logp, old, adv, torch.zeros(1, 4), agg=agg)
        assert loss.item() == 0.0
        assert all(math.isfinite(v) for v in m.values())
        loss.backward()
        assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()


def test_policy_loss_errors():
    logp, old, adv, mask = _policy_case()
    with pytest.raises(ValueError, match=r"advantages \(1, 3\)"):
        policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="agg must be one of token-mean"):
        policy_loss(logp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        policy_loss(logp, old, adv, mask, clip_high=-0.1)


# ------------------------------------------------------------------------------------------------------------
# value loss and explained variance
# ------------------------------------------------------------------------------------------------------------
def test_value_loss_hand():
    values = torch.tensor([[1.0, 2.0, 1.0]], requires_grad=True)
    old = torch.tensor([[0.0, 2.0, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 2.0]])
    # tok1: (1-0)^2 = 1; V_clip = 0 + clip(1, +-0.5) = 0.5 -> 0.25; max 1 -> 0.5       (unclipped branch)
    # tok2: (2-3)^2 = 1; V_clip = 2 -> 1; max 1 -> 0.5                                  (unclipped branch)
    # tok3: (1-2)^2 = 1; V_clip = 0.5 -> (0.5-2)^2 = 2.25; max 2.25 -> 1.125            (clipped: no grad)
    loss, m = value_loss(values, old, returns, torch.ones(1, 3), clip=0.5)
    assert loss.item() == pytest.approx((0.5 + 0.5 + 1.125) / 3)
    assert m["value/loss"] == pytest.approx((0.5 + 0.5 + 1.125) / 3)
    assert m["value/clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # d/dV 0.5 (V - R)^2 = V - R, divided by 3 tokens
    assert values.grad.tolist()[0] == pytest.approx([1 / 3, -1 / 3, 0.0])
    # no clip: 0.5 * (1 + 1 + 1) / 3
    loss_nc, m_nc = value_loss(values, old, returns, torch.ones(1, 3), clip=None)
    assert loss_nc.item() == pytest.approx(0.5)
    assert m_nc["value/clipfrac"] == 0.0


def test_value_loss_all_padding_and_errors():
    v = torch.zeros(2, 3, requires_grad=True)
    loss, m = value_loss(v, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0 and all(math.isfinite(x) for x in m.values())
    loss.backward()
    with pytest.raises(ValueError, match=r"returns \(2, 2\)"):
        value_loss(v, torch.zeros(2, 3), torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3), clip=-1.0)


def test_explained_variance():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, 2.5), target, mask) == pytest.approx(0.0)
    # residual (0, 0, 0, 1): var 0.1875; var target 1.25 -> 1 - 0.15 = 0.85
    pred = torch.tensor([[1.0, 2.0, 3.0, 3.0, 0.0]])
    assert explained_variance(pred, target, mask) == pytest.approx(0.85)
    # undefined (constant target / no tokens): 0.0, not NaN
    assert explained_variance(pred, torch.ones_like(target), mask) == 0.0
    assert explained_variance(pred, target, torch.zeros_like(mask)) == 0.0


# ------------------------------------------------------------------------------------------------------------
# KL
# ------------------------------------------------------------------------------------------------------------
def test_kl_estimators_hand():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    # x = log 2 = 0.693147; k1 = x; k2 = x^2 / 2 = 0.240227; k3 = e^{-x} + x - 1 = 0.5 + 0.693147 - 1
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-6)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-6)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)
    assert kl_estimate(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_estimate(logp, torch.zeros(1, 2), "k1")


def test_kl_estimators_unbiased_monte_carlo():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())  # KL(p || q)
    a = torch.multinomial(p, 200_000, replacement=True, generator=g).reshape(1, -1)
    logp, logq = p.log()[a], q.log()[a]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (kl_estimate(logp, logq, "k3") >= 0).all() and (kl_estimate(logp, logq, "k2") >= 0).all()


def test_kl_k3_extreme_is_finite():
    out = kl_estimate(torch.tensor([[-500.0, 0.0]]), torch.tensor([[0.0, -500.0]]), "k3")
    assert torch.isfinite(out).all()


def test_add_kl_to_rewards():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    kl = torch.tensor([[0.5, -0.2, 0.1]], requires_grad=True)
    out = add_kl_to_rewards(rewards, kl, 0.1, mask=torch.tensor([[1.0, 1.0, 0.0]]))
    assert out.tolist()[0] == pytest.approx([-0.05, 0.02, 1.0])
    assert not out.requires_grad
    with pytest.raises(ValueError, match="coef"):
        add_kl_to_rewards(rewards, kl, -1.0)


def test_explained_variance_of_round_off_target_is_zero():
    # returns that are zero up to float round-off (all rewards 0) must not give a huge negative number
    target = torch.tensor([[1e-9, -1e-9, 2e-9]])
    pred = torch.tensor([[0.3, -0.2, 0.5]])
    assert explained_variance(pred, target, torch.ones_like(target)) == 0.0


# ------------------------------------------------------------------------------------------------------------
# advantage estimators by name, the one micro-batch loss, micro-batch weights
# ------------------------------------------------------------------------------------------------------------
def test_group_advantages_and_estimator_by_name():
    from tre_edu.ppo import compute_advantages, group_advantages

    scores = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = group_advantages(scores, mask, group_size=2)
    assert adv.tolist() == [[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert (ret == 0).all()
    same = compute_advantages("grpo", scores=scores, rewards=None, values=None, mask=mask, group_size=2)
    assert torch.equal(same[0], adv)
    rewards = terminal_rewards(scores, mask)
    values = torch.full_like(mask, 0.25)
    gae = compute_advantages("gae", scores=scores, rewards=rewards, values=values, mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(gae, compute_gae(rewards, values, mask, 1.0, 1.0)))
    with pytest.raises(ValueError, match="advantage must be one of gae, grpo"):
        compute_advantages("vtrace", scores=scores, rewards=rewards, values=values, mask=mask)
    with pytest.raises(ValueError, match="needs the critic's values"):
        compute_advantages("gae", scores=scores, rewards=rewards, values=None, mask=mask)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(scores, mask, group_size=3)


def test_ppo_loss_composes_every_term():
    from types import SimpleNamespace

    from tre_edu.ppo import ppo_loss

    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 4, generator=g).requires_grad_(True)
    old, adv, ref = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    values = torch.randn(3, 4, generator=g).requires_grad_(True)
    old_v, ret = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask, pg_mask = torch.ones(3, 4), torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 3)
    s = SimpleNamespace(clip_low=0.2, clip_high=0.2, dual_clip=3.0, value_clip=0.5, value_coef=0.5, kl_coef=0.1,
                        kl_kind="k3", agg="token-mean")  # fmt: skip
    reg = -0.01 * lp.mean()
    loss, m = ppo_loss(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, pg_mask=pg_mask, reg_loss=reg,
                       settings=s, values=values, old_values=old_v, returns=ret, ref_logprobs=ref, weight=0.5,
                       pg_weight=0.25)  # fmt: skip
    pg, _ = policy_loss(lp, old, adv, mask * pg_mask, dual_clip=3.0)
    vl, _ = value_loss(values, old_v, ret, mask, clip=0.5)
    kl = masked_mean(kl_estimate(lp, ref, "k3"), mask)
    expected = 0.25 * pg + 0.5 * (reg + 0.5 * vl + 0.1 * kl)
    assert torch.allclose(loss, expected)
    assert m["loss/total"] == pytest.approx(float(pg + reg + 0.5 * vl + 0.1 * kl), rel=1e-6)
    assert {"policy/loss", "value/loss", "kl/loss"} <= set(m)
    # no critic, no reference: those terms are absent; no dual clip when the regulariser says so (Clip-Cov)
    bare, m2 = ppo_loss(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, pg_mask=torch.ones(3, 4),
                        reg_loss=reg, settings=s, dual_clip=False)  # fmt: skip
    assert torch.allclose(bare, policy_loss(lp, old, adv, mask, dual_clip=None)[0] + reg)
    assert "value/loss" not in m2 and "kl/loss" not in m2


def test_micro_batch_weights_sum_to_one():
    from tre_edu.ppo import micro_batches

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    parts = micro_batches(mask, 2, "token-mean")
    assert [p[0] for p in parts] == [slice(0, 2), slice(2, 4)]
    assert [p[1] for p in parts] == pytest.approx([4 / 6, 2 / 6]) and [p[2] for p in parts] == [p[1] for p in parts]
    assert [p[1] for p in micro_batches(mask, 2, "seq-mean-token-mean")] == [0.5, 0.5]
    pg = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert [p[2] for p in micro_batches(mask, 2, "token-mean", pg)] == pytest.approx([1 / 3, 2 / 3])
