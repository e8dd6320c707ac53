"""Tests for tre_edu.regularizers: validation, selection rules, loss terms and their gradients."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tre_edu.config import RegularizerConfig
from tre_edu.ppo import policy_loss
from tre_edu.regularizers import (
    KINDS,
    PRESETS,
    Regularizer,
    clip_cov_mask,
    forking_mask,
    select_top_fraction,
    token_covariance,
)


def _call(reg, logits, logprobs, *rest, **kw):
    """The regulariser on statistics computed from materialised logits (its :meth:`Regularizer.statistics`)."""
    return reg(reg.statistics(logits, logprobs), *rest, **kw)


def _batch(B=2, T=5, V=6, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).requires_grad_(requires_grad)
    logprobs = torch.randn(B, T, generator=g).requires_grad_(requires_grad)
    old = logprobs.detach() + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    return logits, logprobs, old, adv, mask


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
BAD_FIELDS = [
    ("kind", "tre", "one of none, entropy, tre-k"),
    ("kind", None, "one of none"),
    ("coef", -0.1, "a finite number >= 0"),
    ("coef", float("nan"), "a finite number >= 0"),
    ("coef", float("inf"), "a finite number >= 0"),
    ("coef", True, "a finite number >= 0"),
    ("coef", "0.1", "a finite number >= 0"),
    ("k", 0, "an integer >= 1"),
    ("k", 2.5, "an integer >= 1"),
    ("k", True, "an integer >= 1"),
    ("p", 0.0, "a finite number > 0 and <= 1"),
    ("p", 1.5, "a finite number > 0 and <= 1"),
    ("rescale", 1, "true or false"),
    ("max_candidates", 0, "an integer >= 1 or null"),
    ("max_candidates", 2.5, "an integer >= 1 or null"),
    ("forking_ratio", 0.0, "a finite number > 0 and <= 1"),
    ("forking_ratio", 1.2, "a finite number > 0 and <= 1"),
    ("selection", "batch", "one of microbatch, minibatch"),
    ("cov_ratio", 0.0, "a finite number > 0 and <= 1"),
    ("cov_ratio", 2.0, "a finite number > 0 and <= 1"),
    ("kl_cov_coef", -1.0, "a finite number >= 0"),
    ("clip_cov_ratio", 0.0, "a finite number > 0 and <= 1"),
    ("clip_cov_lb", float("nan"), "a finite number"),
    ("clip_cov_ub", float("-inf"), "a finite number"),
    ("seed", -1, "an integer >= 0 or null"),
]


@pytest.mark.parametrize("name,value,allowed", BAD_FIELDS)
def test_validation_errors_name_field_and_allowed(name, value, allowed):
    with pytest.raises(ValueError, match=rf"regularizer\.{name} must be {re.escape(allowed)}"):
        Regularizer(**{name: value})


def test_validation_clip_cov_band_order():
    with pytest.raises(ValueError, match=r"regularizer\.clip_cov_lb must be <= clip_cov_ub"):
        Regularizer(kind="clip-cov", clip_cov_lb=5.0, clip_cov_ub=1.0)


def test_validation_runs_again_after_mutation():
    reg = Regularizer(kind="tre-k", coef=0.001)
    reg.config.k = 0
    with pytest.raises(ValueError, match=r"regularizer\.k"):
        Regularizer(reg.config)


def test_defaults_and_coercion():
    reg = Regularizer()
    assert reg.kind == "none" and reg.coef == 0.0 and reg.k == 2 and reg.p == 0.99
    assert reg.cov_ratio == 0.002 and reg.kl_cov_coef == 1.0 and reg.clip_cov_ratio == 0.0002
    assert isinstance(Regularizer(coef=1).coef, float)
    for kind in KINDS:
        Regularizer(kind=kind)


def test_config_and_presets():
    reg = Regularizer(RegularizerConfig(kind="tre-p", coef=0.001, p=0.9))
    assert reg.config == Regularizer(kind="tre-p", coef=0.001, p=0.9).config
    assert Regularizer(reg.config, p=0.5).p == 0.5 and reg.p == 0.9  # fields override a config copy
    with pytest.raises(TypeError, match="topk"):
        Regularizer(kind="tre-k", topk=2)
    for name in PRESETS:
        Regularizer.preset(name)
    tre_runs, original = Regularizer.preset("kl-cov"), Regularizer.preset("kl-cov-original")
    assert (tre_runs.cov_ratio, tre_runs.kl_cov_coef) == (0.002, 1.0)
    assert (original.cov_ratio, original.kl_cov_coef) == (0.0002, 0.1)
    assert Regularizer.preset("tre-k", coef=0.01).coef == 0.01
    with pytest.raises(ValueError, match="preset must be one of ppo"):
        Regularizer.preset("grpo")


def test_effective_coef():
    # paper: alpha = 0.001 at V = 152,064, K = 2: 0.001 * log(152064) / log(2) = 0.0172
    reg = Regularizer(kind="tre-k", coef=0.001, k=2)
    assert reg.effective_coef(152_064) == pytest.approx(0.001 * math.log(152_064) / math.log(2))
    assert reg.effective_coef(152_064) == pytest.approx(0.0172, abs=1e-4)
    assert Regularizer(kind="tre-k", coef=0.001, k=1).effective_coef(1000) == 0.001
    assert Regularizer(kind="tre-k", coef=0.001, rescale=False).effective_coef(1000) == 0.001
    assert Regularizer(kind="entropy", coef=0.01).effective_coef(1000) == 0.01
    tre_p = Regularizer(kind="tre-p", coef=0.001)
    assert tre_p.effective_coef(1000) == pytest.approx(0.001 * math.log(1000) / math.log(2))
    assert tre_p.effective_coef(1000, nucleus_size=10) == pytest.approx(0.001 * 3.0)
    assert Regularizer(kind="forking").effective_coef(1000) == 0.0
    with pytest.raises(ValueError, match="vocab_size"):
        reg.effective_coef(1)


# ------------------------------------------------------------------------------------------------------------
# call: shapes, none
# ------------------------------------------------------------------------------------------------------------
def test_call_shape_errors():
    logits, logprobs, old, adv, mask = _batch()
    reg = Regularizer(kind="kl-cov")
    with pytest.raises(ValueError, match=r"advantages \(2, 4\)"):
        _call(reg, logits, logprobs, old, adv[:, :4], mask)
    with pytest.raises(ValueError, match="logits must be"):
        _call(reg, logits[:, :4], logprobs, old, adv, mask)
    with pytest.raises(ValueError, match="mask must be a"):
        _call(reg, logits, logprobs, old, adv, mask[0])
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        _call(Regularizer(kind="forking"), None, logprobs, old, adv, mask)
    with pytest.raises(ValueError, match="agg must be one of"):
        _call(reg, logits, logprobs, old, adv, mask, agg="mean")


def test_none_is_zero_and_backward_works():
    logits, logprobs, old, adv, mask = _batch()
    out = _call(Regularizer(), logits, logprobs, old, adv, mask)
    assert out.loss.item() == 0.0 and out.loss.dim() == 0
    assert out.loss.device == logits.device
    assert torch.equal(out.pg_mask, torch.ones(2, 5))
    out.loss.backward()  # connected to the log-probs' graph (the only statistic "none" reads)
    assert (logprobs.grad == 0).all()
    # works with kinds that need no logits, and with inf in the anchor
    lp = logprobs.detach().clone()
    lp[0, 0] = float("-inf")
    lp.requires_grad_(True)
    out2 = _call(Regularizer(), None, lp, old, adv, mask)
    out2.loss.backward()
    assert torch.isfinite(lp.grad).all()


# ------------------------------------------------------------------------------------------------------------
# forking tokens
# ------------------------------------------------------------------------------------------------------------
def test_select_top_fraction_counts_and_ties():
    scores = torch.tensor([[5.0, 1.0, 5.0, 0.0], [2.0, 9.0, 3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])  # 9.0 is padding: never selected
    # 6 valid tokens: int(6 * 0.5) = 3 -> 5, 5, 4
    sel = select_top_fraction(scores, mask, 0.5)
    assert sel.tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]
    # int(6 * 0.1) = 0 -> at least 1; a tie keeps the earlier token
    assert select_top_fraction(scores, mask, 0.1).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]
    assert select_top_fraction(scores, torch.zeros_like(mask), 0.5).sum() == 0


def test_forking_mask_top20_and_per_microbatch():
    # 2 rows x 5 tokens; the two largest entropies both sit in row 0
    h = torch.tensor([[3.0, 2.9, 0.5, 0.4, 0.3], [1.0, 0.9, 0.8, 0.7, 0.6]])
    mask = torch.ones(2, 5)
    # whole batch: int(10 * 0.2) = 2 -> both in row 0
    assert forking_mask(h, mask, 0.2).tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    # micro-batches of 1 row: int(5 * 0.2) = 1 per row -> the top of each row
    assert forking_mask(h, mask, 0.2, microbatch_size=1).tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def _logits_with_entropy_order(B=2, T=5, V=8):
    """Logits c * onehot: entropy decreases with c; c chosen so the ranking is known."""
    c = torch.tensor([[0.0, 0.5, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    logits = torch.zeros(B, T, V)
    logits[..., 0] = c
    return logits.requires_grad_(True)


def test_forking_regularizer():
    logits = _logits_with_entropy_order()
    _, logprobs, old, adv, mask = _batch()
    out = _call(Regularizer(kind="forking", forking_ratio=0.2), logits, logprobs, old, adv, mask)
    # highest entropy = smallest c: 0.0 and 0.5, both in row 0
    assert out.pg_mask.tolist() == [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert out.loss.item() == 0.0
    assert out.metrics["reg/selected_frac"] == pytest.approx(0.2)
    # per micro-batch of one row each (what the trainer does with selection: microbatch and micro-batches of 1)
    reg = Regularizer(kind="forking")
    rows = [
        _call(reg, logits[i : i + 1], logprobs[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1])
        for i in (0, 1)
    ]
    assert torch.cat([r.pg_mask for r in rows]).tolist() == [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
    # a precomputed (whole-mini-batch) selection is used as given
    given = _call(reg, logits[:1], logprobs[:1], old[:1], adv[:1], mask[:1], selected=out.pg_mask[:1])
    assert given.pg_mask.tolist() == [[1, 1, 0, 0, 0]]
    # the policy gradient then reaches only the selected tokens (token-mean over them)
    loss, _ = policy_loss(logprobs, old, adv, mask * out.pg_mask)
    (loss + out.loss).backward()
    assert (logprobs.grad[out.pg_mask == 0] == 0).all()
    assert (logprobs.grad[out.pg_mask == 1] != 0).all()


# ------------------------------------------------------------------------------------------------------------
# KL-Cov and Clip-Cov
# ------------------------------------------------------------------------------------------------------------
def _cov_case():
    # A:  row0 (2, 0, 0, 0, 0), row1 (0, 0, 0, 0, -2)  -> mean A = 0
    # lp: row0 (-0.1, -1, -1, -1, -1), row1 (-1, -1, -1, -1, -3) -> mean lp = -11.1 / 10 = -1.11
    # Cov = (A - 0)(lp + 1.11): (0,0) = 2 * 1.01 = 2.02, (1,4) = -2 * -1.89 = 3.78, every other token 0
    adv = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, -2.0]])
    logprobs = torch.tensor([[-0.1, -1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0, -3.0]], requires_grad=True)
    old = logprobs.detach() - 0.1  # |log pi - log pi_old| = 0.1 everywhere
    return logprobs, old, adv, torch.ones(2, 5)


def test_token_covariance_hand():
    logprobs, old, adv, mask = _cov_case()
    cov = token_covariance(adv, logprobs, mask)
    expected = torch.zeros(2, 5)
    expected[0, 0], expected[1, 4] = 2.02, 3.78
    assert torch.allclose(cov, expected, atol=1e-5)
    assert not cov.requires_grad


def test_kl_cov_selects_top_cov_and_grad_only_there():
    logprobs, old, adv, mask = _cov_case()
    # cov_ratio 0.2: int(10 * 0.2) = 2 tokens -> (1,4) and (0,0)
    reg = Regularizer(kind="kl-cov", cov_ratio=0.2, kl_cov_coef=1.0)
    out = _call(reg, None, logprobs, old, adv, mask)
    # loss = token-mean of 1.0 * 0.1 on 2 of 10 tokens = 0.02
    assert out.loss.item() == pytest.approx(0.02, abs=1e-6)
    assert torch.equal(out.pg_mask, torch.ones(2, 5))
    assert out.metrics["reg/selected_frac"] == pytest.approx(0.2)
    out.loss.backward()
    # d/dlp coef * |lp - old| / N = sign(0.1) / 10 on the selected tokens, 0 elsewhere
    expected = torch.zeros(2, 5)
    expected[0, 0] = expected[1, 4] = 0.1
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_kl_cov_default_ratio_selects_at_least_one():
    logprobs, old, adv, mask = _cov_case()
    # the TRE runs' 0.2 %: int(10 * 0.002) = 0 -> max(1, .) = 1 token, the largest Cov (1,4);
    # coef 0.1 -> loss 0.1 * 0.1 / 10
    out = _call(Regularizer.preset("kl-cov-original", cov_ratio=0.002), None, logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx(0.001, abs=1e-7)
    out.loss.backward()
    assert logprobs.grad.nonzero().tolist() == [[1, 4]]


def test_kl_cov_ignores_padding_and_seq_agg():
    logprobs, old, adv, _ = _cov_case()
    mask = torch.ones(2, 5)
    mask[1, 4] = 0  # the top-Cov token is padding now: never selected
    out = _call(Regularizer(kind="kl-cov", cov_ratio=0.1), None, logprobs, old, adv, mask)
    out.loss.backward()
    assert logprobs.grad[1, 4] == 0
    assert logprobs.grad.nonzero().tolist() == [[0, 0]]


def test_clip_cov_mask_band_and_determinism():
    logprobs, old, adv, mask = _cov_case()
    cov = token_covariance(adv, logprobs, mask)
    # band [1, 5] holds (0,0) = 2.02 and (1,4) = 3.78; ratio 0.1 -> max(1, int(1.0)) = 1 of them detached
    masks = set()
    for seed in range(20):
        keep = clip_cov_mask(cov, mask, 0.1, 1.0, 5.0, torch.Generator().manual_seed(seed))
        assert keep.sum() == 9
        zeros = tuple(map(tuple, (keep == 0).nonzero().tolist()))
        assert zeros[0] in {(0, 0), (1, 4)}
        masks.add(zeros)
    assert len(masks) == 2  # the draw is random among the candidates
    k1 = clip_cov_mask(cov, mask, 0.1, 1.0, 5.0, torch.Generator().manual_seed(3))
    k2 = clip_cov_mask(cov, mask, 0.1, 1.0, 5.0, torch.Generator().manual_seed(3))
    assert torch.equal(k1, k2)
    # more budget than candidates: all candidates, nothing else
    keep = clip_cov_mask(cov, mask, 0.5, 1.0, 5.0)
    assert (keep == 0).nonzero().tolist() == [[0, 0], [1, 4]]
    # band [3, 5]: only (1,4); empty band: nothing
    assert (clip_cov_mask(cov, mask, 0.5, 3.0, 5.0) == 0).nonzero().tolist() == [[1, 4]]
    assert clip_cov_mask(cov, mask, 0.5, 10.0, 20.0).sum() == 10


def test_clip_cov_regularizer_detaches_policy_gradient():
    logprobs, old, adv, mask = _cov_case()
    reg = Regularizer(kind="clip-cov", clip_cov_ratio=0.1, seed=0)
    out = _call(reg, None, logprobs, old, adv, mask)
    assert out.loss.item() == 0.0
    detached = (out.pg_mask == 0).nonzero().tolist()
    assert len(detached) == 1 and detached[0] in ([0, 0], [1, 4])
    assert out.metrics["reg/selected_frac"] == pytest.approx(0.1)
    assert out.metrics["reg/candidate_frac"] == pytest.approx(0.2)
    # same seed -> same draw (a fresh regulariser), explicit generator overrides the seed
    again = _call(Regularizer(kind="clip-cov", clip_cov_ratio=0.1, seed=0), None, logprobs, old, adv, mask)
    assert torch.equal(again.pg_mask, out.pg_mask)
    loss, _ = policy_loss(logprobs, old, adv, mask * out.pg_mask)
    (loss + out.loss).backward()
    b, t = detached[0]
    assert logprobs.grad[b, t] == 0
    other = (1, 4) if (b, t) == (0, 0) else (0, 0)
    assert logprobs.grad[other] != 0  # the other high-advantage token keeps its gradient


def test_regularizer_output_on_all_padding():
    logits, logprobs, old, adv, _ = _batch()
    mask = torch.zeros(2, 5)
    for kind in ("none", "kl-cov", "clip-cov"):
        out = _call(Regularizer(kind=kind), logits, logprobs, old, adv, mask)
        assert out.loss.item() == 0.0
        assert all(math.isfinite(v) for v in out.metrics.values())


# ------------------------------------------------------------------------------------------------------------
# entropy kinds (need tre_edu.entropy)
# ------------------------------------------------------------------------------------------------------------
def test_entropy_kinds_hand_values():
    # logits (2, 2, 0, 0): global H = -sum p log p with p = (e^2, e^2, 1, 1) / (2 e^2 + 2)
    logits = torch.tensor([2.0, 2.0, 0.0, 0.0]).expand(1, 3, 4).clone().requires_grad_(True)
    _, logprobs, old, adv, _ = _batch(B=1, T=3)
    mask = torch.ones(1, 3)
    p = torch.tensor([math.e**2, math.e**2, 1.0, 1.0]) / (2 * math.e**2 + 2)
    h_global = float(-(p * p.log()).sum())
    out = _call(Regularizer(kind="entropy", coef=0.01), logits, logprobs, old, adv, mask)
    assert out.loss.item() == pytest.approx(-0.01 * h_global, rel=1e-5)
    assert out.metrics["reg/entropy"] == pytest.approx(h_global, rel=1e-5)
    # TRE-K, K = 2: uniform over the top 2 -> H_TR = log 2, rescaled by log 4 / log 2 -> log 4
    out_k = _call(Regularizer(kind="tre-k", coef=0.01, k=2), logits, logprobs, old, adv, mask)
    assert out_k.loss.item() == pytest.approx(-0.01 * math.log(4), rel=1e-5)
    out_k_raw = _call(Regularizer(kind="tre-k", coef=0.01, k=2, rescale=False), logits, logprobs, old, adv, mask)
    assert out_k_raw.loss.item() == pytest.approx(-0.01 * math.log(2), rel=1e-5)
    assert torch.equal(out_k.pg_mask, torch.ones(1, 3))


def test_tre_k_gradient_zero_outside_top_k_but_entropy_not():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 50, generator=g)
    _, logprobs, old, adv, mask = _batch(B=2, T=3)
    top2 = torch.zeros_like(base, dtype=torch.bool).scatter_(-1, base.topk(2, dim=-1).indices, True)

    logits = base.clone().requires_grad_(True)
    _call(Regularizer(kind="tre-k", coef=1.0, k=2), logits, logprobs, old, adv, mask).loss.backward()
    assert (logits.grad[~top2] == 0).all()
    assert (logits.grad[top2].abs() > 0).any()

    logits_e = base.clone().requires_grad_(True)
    _call(Regularizer(kind="entropy", coef=1.0), logits_e, logprobs, old, adv, mask).loss.backward()
    assert (logits_e.grad[~top2].abs() > 0).all()
    # the bonus pushes up tail logits: d(-H)/dz_a = pi_a (log pi_a + H) < 0 for log pi_a < -H
    p = base.softmax(-1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    tail = p.log() < -h
    assert (logits_e.grad[tail] < 0).all()


def test_tre_p_gradient_zero_outside_nucleus():
    # one position: p = (0.6, 0.3, 0.05, 0.05): nucleus of mass 0.8 = first two tokens
    logits = torch.tensor([0.6, 0.3, 0.05, 0.05]).log().reshape(1, 1, 4).requires_grad_(True)
    _, logprobs, old, adv, mask = _batch(B=1, T=1)
    out = _call(Regularizer(kind="tre-p", coef=1.0, p=0.8), logits, logprobs, old, adv, mask)
    out.loss.backward()
    assert logits.grad[0, 0, 2:].abs().max() == 0
    assert logits.grad[0, 0, :2].abs().max() > 0
    assert math.isfinite(out.metrics["reg/tre_entropy"])


def test_clip_cov_leaves_ratio_clipped_tokens_alone_and_has_no_dual_clip():
    """As verl's Clip-Cov: a token the PPO ratio clip already clips is no candidate; the loss has no dual clip."""
    logprobs, old, adv, mask = _cov_case()
    # token (0, 0) has A > 0 and ratio e^1 > 1 + 0.2: clipped by PPO, so only (1, 4) remains in the band [1, 5]
    old = old.clone()
    old[0, 0] = logprobs[0, 0].detach() - 1.0
    for seed in range(5):
        out = _call(Regularizer(kind="clip-cov", clip_cov_ratio=0.5, seed=seed), None, logprobs, old, adv, mask)
        assert (out.pg_mask == 0).nonzero().tolist() == [[1, 4]]
        assert out.dual_clip is False
    assert _call(Regularizer(kind="kl-cov"), None, logprobs, old, adv, mask).dual_clip is True


def test_clip_cov_generator_state_round_trip():
    logprobs, old, adv, mask = _cov_case()
    a = Regularizer(kind="clip-cov", clip_cov_ratio=0.1, seed=3)
    _call(a, None, logprobs, old, adv, mask)
    state = a.state_dict()
    b = Regularizer(kind="clip-cov", clip_cov_ratio=0.1, seed=3)
    b.load_state_dict(state)
    draws_a = [_call(a, None, logprobs, old, adv, mask).pg_mask for _ in range(4)]
    draws_b = [_call(b, None, logprobs, old, adv, mask).pg_mask for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(draws_a, draws_b))
