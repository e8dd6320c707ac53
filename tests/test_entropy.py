"""Tests of tre_edu.entropy: float64 references, invariances, gradients, masks, bad inputs, tail metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tre_edu import entropy as ent

# derandomize + no database: the same examples on every machine and every run (issue 10 item 8); the
# tolerances below are still derived bounds that hold for any input the strategies can draw.
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None)
EPS32 = 2.0**-23


def eval_tol(V: int, h: torch.Tensor, eps: float = EPS32) -> torch.Tensor:
    """Bound on the evaluation error of an entropy over V terms: exp (1 ulp), the shift, two pairwise sums
    (eps log2 V each): |H - H64| <= 4 eps (log2 V + 4) (1 + |H|)."""
    return 4 * eps * (math.log2(max(V, 2)) + 4) * (1 + h.double().abs())


def within(a: torch.Tensor, b: torch.Tensor, tol: torch.Tensor) -> None:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    err = (a - b).abs()
    assert bool((err <= tol).all()), float((err - tol).max())


def cut_margin(z: torch.Tensor, p: float) -> torch.Tensor:
    """Per row: min over ranks of |mass before the rank - p| (float64): how close the nucleus cut is to a tie."""
    sp = torch.softmax(z.double(), -1).sort(-1, descending=True).values
    return ((torch.cumsum(sp, -1) - sp) - p).abs().amin(-1)


# ---------------------------------------------------------------------------------- float64 references
def ref_global(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    lp = torch.log_softmax(z, -1)
    return -torch.where(lp > -math.inf, lp.exp() * lp, 0.0).sum(-1)


def ref_region(z: torch.Tensor, p: float | None = None, k: int | None = None, cap: int | None = 256):
    """(idx, keep) of the trust region, by a full float64 sort."""
    z = z.double()
    probs = torch.softmax(z, -1)
    sp, idx = torch.sort(probs, -1, descending=True)
    if k is not None:
        keep = torch.zeros_like(sp, dtype=torch.bool)
        keep[..., :k] = True
        return idx, keep & (sp > 0)
    before = torch.cumsum(sp, -1) - sp
    keep = (before < p) & (sp > 0)
    keep[..., 0] = True
    if cap is not None:
        keep[..., cap:] = False
    return idx, keep


def ref_tre(z: torch.Tensor, *, k=None, p=None, cap=256, rescale=True):
    """Naive float64 H_TRE, differentiable w.r.t. a float64 z."""
    V = z.shape[-1]
    idx, keep = ref_region(z.detach(), p=p, k=k, cap=cap)
    v = torch.gather(z.double(), -1, idx).masked_fill(~keep, -1e4)  # finite: no NaN gradients
    lq = torch.log_softmax(v, -1)
    h = -torch.where(keep, lq.exp() * lq, 0.0).sum(-1)
    if rescale:
        n = keep.sum(-1).clamp(min=2).double()
        h = h * math.log(V) / torch.log(n)
    return h


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """|a - b| <= tol * max(1, |b|): relative above 1, absolute below."""
    a, b = a.double(), b.double()
    err = (a - b).abs() / b.abs().clamp(min=1.0)
    assert torch.isfinite(a).all()
    assert float(err.max()) <= tol, float(err.max())


def logits_strategy(max_v: int = 3000):
    @st.composite
    def make(draw):
        n = draw(st.integers(1, 4))
        V = draw(st.integers(2, max_v))
        scale = draw(st.sampled_from([0.1, 1.0, 5.0, 20.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, V, generator=g) * scale
        if draw(st.booleans()):  # a peaked distribution
            z[:, 0] += draw(st.sampled_from([10.0, 30.0]))
        return z

    return make()


# ---------------------------------------------------------------------------------- values
@SETTINGS
@given(logits_strategy())
def test_global_entropy_matches_float64(z):
    r = ref_global(z)
    within(ent.global_entropy(z), r, eval_tol(z.shape[-1], r))
    close(ent.global_entropy(z), r)


@SETTINGS
@given(logits_strategy(), st.integers(2, 20))
def test_tre_k_matches_float64(z, k):
    k = min(k, z.shape[-1])
    close(ent.trust_region_entropy(z, top_k=k), ref_tre(z, k=k))
    close(ent.trust_region_entropy(z, top_k=k, rescale=False), ref_tre(z, k=k, rescale=False))


@SETTINGS
@given(logits_strategy(), st.sampled_from([0.5, 0.9, 0.99]))
def test_tre_p_matches_float64(z, p):
    ok = cut_margin(z, p) > 2e-6  # the documented cut tolerance: ties within it may go either way
    z = z[ok]
    close(ent.trust_region_entropy(z, top_p=p), ref_tre(z, p=p))
    close(
        ent.trust_region_entropy(z, top_p=p, max_candidates=None, rescale=False),
        ref_tre(z, p=p, cap=None, rescale=False),
    )


@SETTINGS
@given(logits_strategy(), st.floats(-100.0, 100.0))
def test_invariant_to_adding_a_constant(z, c):
    # z + c rounds each logit by <= eps/2 |z + c|, so logit differences move by <= delta = eps (max|z| + |c|),
    # log-probabilities by <= 2 delta, masses by <= 2 delta; |dH/dz|_1 = E|log pi + H| <= 2H, so H moves by
    # <= 4 delta H (first order) on top of the two evaluation errors. TRE-P rows whose cut is within
    # 2 delta (+ the cut tolerance) of a tie may legitimately change their nucleus: left out.
    delta = EPS32 * (float(z.abs().max()) + abs(c))
    V = z.shape[-1]
    ok = cut_margin(z, 0.9) > 4 * delta + 2e-6
    for f, rows in (
        (ent.global_entropy, slice(None)),
        (lambda x: ent.trust_region_entropy(x, top_k=2), slice(None)),
        (lambda x: ent.trust_region_entropy(x, top_p=0.9), ok),
    ):
        h = f(z[rows])
        scale = math.log(V) / math.log(2)  # the rescale factor amplifies the local entropy's error
        within(f(z[rows] + c), h, (4 * delta * (1 + h.double().abs()) + 2 * eval_tol(V, h)) * scale)


@SETTINGS
@given(logits_strategy(), st.integers(0, 2**31 - 1))
def test_invariant_to_permuting_the_vocabulary(z, seed):
    perm = torch.randperm(z.shape[-1], generator=torch.Generator().manual_seed(seed))
    # the same values summed in another order: the results differ by at most twice the evaluation bound
    ok = cut_margin(z, 0.9) > 2e-6
    V = z.shape[-1]
    for f, rows in (
        (ent.global_entropy, slice(None)),
        (lambda x: ent.trust_region_entropy(x, top_k=2), slice(None)),
        (lambda x: ent.trust_region_entropy(x, top_p=0.9), ok),
        (ent.min_entropy, slice(None)),
    ):
        h = f(z[rows])
        within(f(z[rows][:, perm]), h, 2 * eval_tol(V, h) * math.log(V) / math.log(2))


def test_peaked_logits_large_magnitude_and_full_vocab():
    V = 151_936
    g = torch.Generator().manual_seed(0)
    z = torch.rand(3, V, generator=g) * 100 - 50  # |z| up to 50
    z[0, 7] = 50.0  # peaked
    z[1, :3] = torch.tensor([49.9, 49.5, 49.0])
    close(ent.global_entropy(z), ref_global(z))
    close(ent.trust_region_entropy(z, top_k=2), ref_tre(z, k=2))
    close(ent.trust_region_entropy(z, top_p=0.99), ref_tre(z, p=0.99))
    close(ent.min_entropy(z), -torch.log_softmax(z.double(), -1).amax(-1))
    # extremely peaked: every entropy is ~0 but never negative / NaN
    zp = torch.full((2, 1000), -50.0)
    zp[:, 0] = 50.0
    for h in (
        ent.global_entropy(zp),
        ent.trust_region_entropy(zp, top_k=2),
        ent.trust_region_entropy(zp, top_p=0.99),
    ):
        assert torch.all(h >= 0) and torch.all(h < 1e-30)


def test_uniform_over_trust_region_gives_log_v():
    V = 1000
    z = torch.full((2, V), -5.0)
    z[0, :2] = 3.0
    z[1, :2] = 3.0
    h = ent.trust_region_entropy(z, top_k=2)
    torch.testing.assert_close(h, torch.full((2,), math.log(V)))
    z = torch.full((1, V), -math.inf)
    z[0, :7] = 1.0  # nucleus of p = 0.99 over 7 equal tokens = all 7
    torch.testing.assert_close(ent.trust_region_entropy(z, top_p=0.99), torch.tensor([math.log(V)]))
    torch.testing.assert_close(ent.trust_region_entropy(z, top_p=0.99, vocab_size=50), torch.tensor([math.log(50)]))
    # K = V is the global entropy
    z = torch.randn(3, 50)
    close(ent.trust_region_entropy(z, top_k=50), ent.global_entropy(z))


def test_k1_is_min_entropy_unscaled():
    z = torch.randn(4, 300) * 3
    expected = -torch.log_softmax(z.double(), -1).amax(-1)
    close(ent.trust_region_entropy(z, top_k=1), expected)
    close(ent.min_entropy(z), expected)


def test_tre_rescale_is_the_one_factor():
    V = 151_936
    assert ent.tre_rescale(V, top_k=1) == 1.0  # min-entropy is never rescaled
    assert ent.tre_rescale(V, top_k=2) == pytest.approx(math.log(V) / math.log(2))
    assert ent.tre_rescale(V, nucleus_size=1) == ent.tre_rescale(V, nucleus_size=2)  # |A_TR| clamped to >= 2
    n = torch.tensor([1, 2, 7])
    f = ent.tre_rescale(V, nucleus_size=n, dtype=torch.float64)
    torch.testing.assert_close(f, torch.tensor([math.log(V) / math.log(2)] * 2 + [math.log(V) / math.log(7)]).double())
    # trust_region_entropy and tail_metrics both use it, with V = vocab_size when the logits are sliced
    z = torch.randn(1, 5, 40)
    h = ent.trust_region_entropy(z, top_k=3, rescale=False)
    close(ent.trust_region_entropy(z, top_k=3, vocab_size=V), h * ent.tre_rescale(V, top_k=3))
    m = ent.tail_metrics(z, top_k=3, vocab_size=V)
    assert m["entropy/tre_k"] == pytest.approx(float(h.mean()) * ent.tre_rescale(V, top_k=3), rel=1e-5)


def test_tre_p_boundary_semantics():
    # probabilities 0.5, 0.3, 0.15, 0.05 (float32-rounded, so stay 1e-4 away from the exact boundaries):
    # p = 0.81 -> the token crossing p (rank 2: mass before 0.8 < p, after 0.95) is kept -> {0, 1, 2}
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)).float()
    assert int(ent.nucleus_size(z, 0.81)) == 3
    assert int(ent.nucleus_size(z, 0.7999)) == 2  # mass before rank 2 is 0.8, not < p
    assert int(ent.nucleus_size(z, 0.4999)) == 1  # mass before rank 1 is 0.5, not < p
    assert int(ent.nucleus_size(z, 0.5001)) == 2
    assert int(ent.nucleus_size(z, 1e-9)) == 1  # first token always
    assert int(ent.nucleus_size(z, 1.0)) == 4
    h = ent.trust_region_entropy(z, top_p=0.81, rescale=False)
    q = torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64) / 0.95
    close(h, -(q * q.log()).sum().view(1))
    # |A_TR| = 1 -> 0 (not NaN from log 1 in the divisor)
    assert float(ent.trust_region_entropy(z, top_p=0.4999)) == 0.0


def test_tre_p_cap_at_max_candidates():
    V = 5000
    z = torch.zeros(2, V)  # uniform: the nucleus of 0.99 has 4950 tokens
    assert int(ent.nucleus_size(z[:1], 0.99)) == 4950
    assert int(ent.nucleus_size(z[:1], 0.99, max_candidates=256)) == 256
    # capped: all 256 candidates are used (their mass 256/V < p); uniform over them -> log V after rescaling
    close(ent.trust_region_entropy(z, top_p=0.99), torch.full((2,), math.log(V)))
    close(ent.trust_region_entropy(z, top_p=0.99, rescale=False), torch.full((2,), math.log(256)))
    close(
        ent.trust_region_entropy(z, top_p=0.99, rescale=False, max_candidates=None),
        torch.full((2,), math.log(4950)),
    )
    close(
        ent.trust_region_entropy(z, top_p=0.99, rescale=False, max_candidates=10),
        torch.full((2,), math.log(10)),
    )


# ---------------------------------------------------------------------------------- gradients
def grad_of(f, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_()
    (f(z) * w.to(z.dtype)).sum().backward()
    return z.grad


@SETTINGS
@given(logits_strategy(2000), st.sampled_from(["global", "k2", "k5", "p"]))
def test_gradients_match_float64_autograd(z, kind):
    w = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(1))
    ours = {
        "global": ent.global_entropy,
        "k2": lambda x: ent.trust_region_entropy(x, top_k=min(2, x.shape[-1])),
        "k5": lambda x: ent.trust_region_entropy(x, top_k=min(5, x.shape[-1])),
        "p": lambda x: ent.trust_region_entropy(x, top_p=0.9),
    }[kind]
    if kind == "p":
        z = z[cut_margin(z, 0.9) > 2e-6]
        w = w[: z.shape[0]]
    ref = {
        "global": ref_global,
        "k2": lambda x: ref_tre(x, k=min(2, x.shape[-1])),
        "k5": lambda x: ref_tre(x, k=min(5, x.shape[-1])),
        "p": lambda x: ref_tre(x, p=0.9),
    }[kind]
    g = grad_of(ours, z, w)
    g64 = grad_of(ref, z.double(), w)
    assert g.dtype == torch.float32
    scale = float(g64.abs().max().clamp(min=1.0))
    assert float((g.double() - g64).abs().max()) <= 1e-5 * scale


def test_global_gradient_formula_pushes_tail_up():
    z = torch.randn(3, 500) * 2
    z[:, 0] += 8
    g = grad_of(ent.global_entropy, z, torch.ones(3))
    pi = torch.softmax(z.double(), -1)
    H = ref_global(z).unsqueeze(-1)
    torch.testing.assert_close(g.double(), -pi * (pi.log() + H), atol=1e-7, rtol=1e-5)
    assert bool((g[pi.log() < -H] > 0).all())  # every tail token is pushed up


def test_tre_gradient_zero_outside_trust_region():
    z = torch.randn(4, 800) * 3
    for kw, (idx, keep) in (
        ({"top_k": 2}, ref_region(z, k=2)),
        ({"top_k": 7}, ref_region(z, k=7)),
        ({"top_p": 0.9}, ref_region(z, p=0.9)),
    ):
        g = grad_of(lambda x, kw=kw: ent.trust_region_entropy(x, **kw), z, torch.ones(4))
        inside = torch.zeros_like(g, dtype=torch.bool).scatter(-1, idx, keep)
        assert bool((g[~inside] == 0).all())
        assert bool((g[inside] != 0).any())


def test_token_logprobs_values_and_gradient():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 700, generator=g) * 4
    t = torch.randint(0, 700, (2, 3), generator=g)
    ref = lambda x: torch.log_softmax(x.double(), -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    close(ent.token_logprobs(z, t), ref(z))
    w = torch.randn(2, 3, generator=g)
    torch.testing.assert_close(
        grad_of(lambda x: ent.token_logprobs(x, t), z, w).double(),
        grad_of(ref, z.double(), w),
        atol=1e-6,
        rtol=1e-5,
    )
    # strided input (like out.logits[:, :-1]) and bf16 input
    big = torch.randn(2, 5, 700, generator=g)
    sl = big[:, :-1]
    t2 = torch.randint(0, 700, (2, 4), generator=g)
    close(ent.token_logprobs(sl, t2), torch.log_softmax(sl.double(), -1).gather(-1, t2[..., None])[..., 0])
    zb = z.bfloat16().requires_grad_()
    out = ent.token_logprobs(zb, t)
    assert out.dtype == torch.float32
    close(out, ref(zb.detach().float()))
    out.sum().backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


def test_strided_and_bf16_inputs_global_and_tre():
    g = torch.Generator().manual_seed(3)
    big = (torch.randn(2, 6, 400, generator=g) * 3).requires_grad_()
    sl = big[:, 1:]
    h = ent.global_entropy(sl)
    close(h, ref_global(sl.detach()))
    h.sum().backward()
    ref = grad_of(ref_global, big.detach().double(), torch.ones(()))
    ref[:, 0] = 0
    torch.testing.assert_close(big.grad.double(), ref, atol=1e-6, rtol=1e-5)
    zb = torch.randn(3, 400, generator=g).bfloat16()
    zf = zb.float()
    for f in (
        ent.global_entropy,
        lambda x: ent.trust_region_entropy(x, top_k=2),
        lambda x: ent.trust_region_entropy(x, top_p=0.99),
    ):
        out = f(zb)
        assert out.dtype == torch.float32
        close(out, f(zf))
    zb.requires_grad_()
    ent.global_entropy(zb).sum().backward()
    assert zb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(zb.grad.float(), grad_of(ent.global_entropy, zf, torch.ones(3)), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------- masked vocabulary
def test_minus_inf_logits_are_valid():
    z = torch.randn(3, 300) * 2
    z[:, 100:] = -math.inf
    z[1, 1:] = -math.inf  # a single valid token
    zr = z.clone().requires_grad_()
    for f, ref in (
        (ent.global_entropy, ref_global),
        (lambda x: ent.trust_region_entropy(x, top_k=2), lambda x: ref_tre(x, k=2)),
        (lambda x: ent.trust_region_entropy(x, top_p=0.99), lambda x: ref_tre(x, p=0.99)),
    ):
        h = f(zr)
        close(h, ref(z))
        (g,) = torch.autograd.grad(h.sum(), zr)
        assert torch.isfinite(g).all()
        assert bool((g[:, 100:] == 0).all())
    assert float(ent.global_entropy(z)[1]) == 0.0
    t = torch.tensor([0, 0, 5])
    lp = ent.token_logprobs(zr, t)
    (g,) = torch.autograd.grad(lp.sum(), zr)
    assert torch.isfinite(lp).all() and torch.isfinite(g).all()
    assert torch.isfinite(ent.min_entropy(z)).all()
    assert int(ent.nucleus_size(z, 0.999999, max_candidates=None)[1]) == 1
    assert float(ent.tail_mass(z, 100).max()) == 0.0


# ---------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_posinf_logits_raise(bad):
    z = torch.randn(2, 50)
    z[1, 7] = bad
    for f in (
        ent.global_entropy,
        ent.min_entropy,
        lambda x: ent.trust_region_entropy(x, top_k=2),
        lambda x: ent.trust_region_entropy(x, top_p=0.9),
        lambda x: ent.token_logprobs(x, torch.zeros(2, dtype=torch.long)),
        lambda x: ent.tail_mass(x, 2),
        lambda x: ent.nucleus_size(x, 0.9),
        lambda x: ent.tail_metrics(x[None]),
    ):
        with pytest.raises(ValueError, match="logits"):
            f(z)


def test_all_minus_inf_row_raises():
    z = torch.randn(2, 50)
    z[0] = -math.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        ent.global_entropy(z)
    with pytest.raises(ValueError, match="entirely -inf"):
        ent.trust_region_entropy(z, top_k=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of top_k"),
        ({"top_k": 2, "top_p": 0.9}, "exactly one of top_k"),
        ({"top_k": 0}, r"top_k must be an integer in \[1, 50\]"),
        ({"top_k": 51}, r"top_k must be an integer in \[1, 50\]"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"top_p": 0.0}, r"top_p must be a float in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be a float in \(0, 1\]"),
        ({"top_p": -0.1}, r"top_p must be a float in \(0, 1\]"),
        ({"top_p": 0.9, "max_candidates": 0}, "max_candidates must be an integer >= 1"),
        ({"top_k": 2, "vocab_size": 1}, "vocab_size must be an integer >= 2"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ent.trust_region_entropy(torch.randn(3, 50), **kwargs)


def test_other_bad_inputs_raise():
    z = torch.randn(3, 50)
    with pytest.raises(ValueError, match="k must be an integer in"):
        ent.topk_mass(z, 0)
    with pytest.raises(ValueError, match="k must be an integer in"):
        ent.tail_mass(z, 51)
    with pytest.raises(ValueError, match=r"p must be a float in \(0, 1\]"):
        ent.nucleus_size(z, 0.0)
    with pytest.raises(ValueError, match=r"p must be a float in \(0, 1\]"):
        ent.tail_metrics(z, p=2.0)
    with pytest.raises(ValueError, match="give exactly one of top_k"):
        ent.tre_rescale(10)
    with pytest.raises(ValueError, match="vocab_size must be an integer"):
        ent.tre_rescale(1, top_k=2)
    with pytest.raises(ValueError, match="tokens must be in"):
        ent.token_logprobs(z, torch.tensor([0, 1, 50]))
    with pytest.raises(ValueError, match="tokens must have shape"):
        ent.token_logprobs(z, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="floating"):
        ent.global_entropy(torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be"):
        ent.tail_metrics(z[None], torch.ones(2, 3))


# ---------------------------------------------------------------------------------- masses & metrics
def test_topk_mass_tail_mass_nucleus_masses():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 1000, generator=g) * 3
    z[0, :3] += 40  # tail ~ 1e-15: 1 - topk_mass would be 0
    probs = torch.softmax(z.double(), -1)
    sp = probs.sort(-1, descending=True).values
    for k in (1, 3, 10):
        close(ent.topk_mass(z, k), sp[:, :k].sum(-1))
        tail = ent.tail_mass(z, k)
        rel = ((tail.double() - sp[:, k:].sum(-1)).abs() / sp[:, k:].sum(-1)).max()
        assert float(rel) < 1e-4
    idx, keep = ref_region(z, p=0.9, cap=None)
    out = (sp * ~keep).sum(-1)
    for i in range(z.shape[0]):  # mass outside the nucleus, as tail_metrics reports it
        m = ent.tail_metrics(z[i : i + 1], p=0.9, max_candidates=None)["tail/mass_outside_nucleus_p90"]
        assert abs(m - float(out[i])) / float(out[i]) < 1e-4
    assert torch.equal(ent.nucleus_size(z, 0.9), keep.sum(-1))
    # topk_mass is differentiable
    zr = z.clone().requires_grad_()
    ent.topk_mass(zr, 2).sum().backward()
    assert torch.isfinite(zr.grad).all()


def test_tail_metrics_hand_example():
    V = 10
    pr = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4), dtype=torch.float64)
    z1 = torch.where(pr > 0, pr.log(), torch.tensor(-math.inf, dtype=torch.float64)).float()
    z2 = torch.zeros(V)  # uniform
    logits = torch.stack([torch.stack([z1, z2, z2])])  # (1, 3, V)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = ent.tail_metrics(logits, mask, p=0.81)
    keys = {
        "entropy/global",
        "entropy/tre_k",
        "entropy/tre_p",
        "tail/top1_prob",
        "tail/mass_outside_top2",
        "tail/mass_outside_top10",
        "tail/nucleus_size_p81",
        "tail/mass_outside_nucleus_p81",
    }
    assert set(m) == keys
    h1 = -(pr[:4] * pr[:4].log()).sum().item()
    q = pr[:2] / 0.8
    tre_k1 = -(q * q.log()).sum().item() * math.log(V) / math.log(2)
    q3 = pr[:3] / 0.95
    tre_p1 = -(q3 * q3.log()).sum().item() * math.log(V) / math.log(3)
    # row 2 (uniform): nucleus of 0.81 = 9 tokens (mass before the 9th is 0.8 < 0.81)
    expected = {
        "entropy/global": (h1 + math.log(V)) / 2,
        "entropy/tre_k": (tre_k1 + math.log(V)) / 2,
        "entropy/tre_p": (tre_p1 + math.log(V)) / 2,
        "tail/top1_prob": (0.5 + 0.1) / 2,
        "tail/mass_outside_top2": (0.2 + 0.8) / 2,
        "tail/mass_outside_top10": 0.0,
        "tail/nucleus_size_p81": (3 + 9) / 2,
        "tail/mass_outside_nucleus_p81": (0.05 + 0.1) / 2,
    }
    for key, val in expected.items():
        assert m[key] == pytest.approx(val, rel=1e-5, abs=1e-6), key
    default = ent.tail_metrics(logits, mask)
    assert "tail/nucleus_size_p99" in default and "tail/mass_outside_nucleus_p99" in default
    # bool mask, no mask
    assert ent.tail_metrics(logits, mask.bool(), p=0.81) == pytest.approx(m)
    assert ent.tail_metrics(logits[:, :2], None, p=0.81) == pytest.approx(m)


def test_tail_metrics_all_masked_is_finite():
    logits = torch.randn(2, 3, 20)
    m = ent.tail_metrics(logits, torch.zeros(2, 3))
    assert len(m) == 8
    assert all(math.isfinite(v) and v == 0.0 for v in m.values())


# ---------------------------------------------------------------------------------- issue 10: exact numerics
V_FULL = 151_936


def spread_logits(n: int = 16, seed: int = 0) -> torch.Tensor:
    """N(0, 4^2) logits at the real vocabulary size, a few peaked rows and a few with -inf entries."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V_FULL, generator=g) * 4
    z[:2, :3] += 30.0
    z[2:4, 1000:5000] = -math.inf
    return z


def ref_global_grad(z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z64 = z.double().requires_grad_()
    lp = torch.log_softmax(z64, -1)
    h = -(lp.exp() * lp.masked_fill(z64 == -math.inf, 0.0)).sum(-1)
    (h * w.double()).sum().backward()
    return h.detach(), z64.grad


def test_global_entropy_float32_accurate_at_full_vocab():
    # item 1: the old non-pairwise row dot product was off by 8.8e-4 (H) and 6.3e-4 (gradient) here.
    # Pairwise sums: measured 4.8e-7 / 3.1e-7; the bound asserted is eval_tol (~2e-5 at H = 12) for H and
    # 2e-6 for the gradient (its entries are e_a / S times (s_a + c), each with a few eps of rounding).
    z = spread_logits()
    w = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(1))
    r, g64 = ref_global_grad(z, w)
    zr = z.clone().requires_grad_()
    h = ent.global_entropy(zr)
    (h * w).sum().backward()
    within(h.detach(), r, eval_tol(V_FULL, r))
    assert float((h.detach().double() - r).abs().max()) <= 5e-6
    assert float((zr.grad.double() - g64).abs().max()) <= 2e-6
    # summation order does not matter beyond the bound (the old code failed this at full V)
    perm = torch.randperm(V_FULL, generator=torch.Generator().manual_seed(2))
    hp = ent.global_entropy(z[:, perm])
    within(hp, h.detach(), 2 * eval_tol(V_FULL, r))


def test_float64_logits_are_computed_in_float64():
    # item 2: float64 in -> float64 arithmetic and results; gradients equal float64 autograd to ~1e-10
    g = torch.Generator().manual_seed(4)
    z = torch.randn(3, 20_000, generator=g, dtype=torch.float64) * 4
    z[0, :2] += 20
    z[1, 100:200] = -math.inf
    w = torch.randn(3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 100, (3,), generator=g)
    cases = [
        (ent.global_entropy, ref_global),
        (lambda x: ent.trust_region_entropy(x, top_k=3), lambda x: ref_tre(x, k=3)),
        (lambda x: ent.trust_region_entropy(x, top_p=0.9), lambda x: ref_tre(x, p=0.9)),
        (lambda x: ent.token_logprobs(x, t), lambda x: torch.log_softmax(x, -1).gather(-1, t[:, None])[:, 0]),
        (ent.min_entropy, lambda x: -torch.log_softmax(x, -1).amax(-1)),
    ]
    for f, ref in cases:
        out = f(z)
        assert out.dtype == torch.float64
        assert float((out - ref(z)).abs().max()) <= 1e-10
        g_ours = grad_of(f, z, w)
        g_ref = ref_global_grad(z, w)[1] if f is ent.global_entropy else grad_of(ref, z, w)
        assert g_ours.dtype == torch.float64
        assert float((g_ours - g_ref).abs().max()) <= 1e-10
    for f in (lambda x: ent.tail_mass(x, 2), lambda x: ent.topk_mass(x, 2)):
        assert f(z).dtype == torch.float64


def boundary_rows(p: float = 0.99) -> torch.Tensor:
    """Rows of h equal head tokens (total mass p - t/2) and a flat tail of t ~ 6.6e-8 per token: the mass before
    the first tail rank is p - t/2 (kept), before the second p + t/2 (not): exact nucleus sizes h + 1."""
    rows = []
    for h in (16, 3, 2, 1):
        t = (1 - p) / (V_FULL - h)
        M = p - 0.5 * t
        row = torch.zeros(V_FULL)
        row[:h] = math.log(M * (V_FULL - h) / (h * (1 - M)))
        rows.append(row)
    return torch.stack(rows)


def test_tre_p_cut_on_boundary_rows_equals_float64():
    # item 3: the float32 logsumexp moved these cuts (exact 17, 4, 3, 2 came out 38, 3, 16, 22)
    p = 0.99
    z = boundary_rows(p)
    idx, keep = ref_region(z, p=p, cap=None)
    assert keep.sum(-1).tolist() == [17, 4, 3, 2]
    # the rows are outside the documented cut tolerance, 2e-6 * (mass outside the 256 candidates ~ 0.01) + 1e-12
    assert float(cut_margin(z, p).min()) > 2e-6 * 0.0101 + 1e-12
    assert ent.nucleus_size(z, p).tolist() == [17, 4, 3, 2]
    assert ent.nucleus_size(z, p, max_candidates=256).tolist() == [17, 4, 3, 2]
    close(ent.trust_region_entropy(z, top_p=p), ref_tre(z, p=p))
    close(ent.trust_region_entropy(z.bfloat16().float(), top_p=p), ref_tre(z.bfloat16().float(), p=p))
    # tail_metrics uses the same cut
    m = ent.tail_metrics(z[None], p=p)
    assert m["tail/nucleus_size_p99"] == pytest.approx(sum([17, 4, 3, 2]) / 4)


def test_tail_metrics_one_pass_any_dtype(monkeypatch):
    # item 5 / issue 13 item 4: one pass over each chunk (a top-C search + one row pass), in the input dtype
    g = torch.Generator().manual_seed(6)
    z = torch.randn(2, 5, 3000, generator=g, dtype=torch.float64) * 3
    z[0, 0, :2] += 25
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    calls = []
    real = ent._row_pass

    def counting(x, **kw):
        calls.append(x.dtype)
        return real(x, **kw)

    monkeypatch.setattr(ent, "_row_pass", counting)
    m = ent.tail_metrics(z, mask, chunk_rows=4)
    assert calls == [torch.float64] * 2  # 8 valid rows in chunks of 4: one pass each, no float32 copy
    monkeypatch.setattr(ent, "_row_pass", real)
    v = mask.reshape(-1) > 0
    zf = z.reshape(-1, 3000)[v]
    probs = torch.softmax(zf, -1)
    sp = probs.sort(-1, descending=True).values
    idx, keep = ref_region(zf, p=0.99)
    expected = {
        "entropy/global": ref_global(zf),
        "entropy/tre_k": ref_tre(zf, k=2),
        "entropy/tre_p": ref_tre(zf, p=0.99),
        "tail/top1_prob": sp[:, 0],
        "tail/mass_outside_top2": sp[:, 2:].sum(-1),
        "tail/mass_outside_top10": sp[:, 10:].sum(-1),
        "tail/nucleus_size_p99": keep.sum(-1).double(),
        "tail/mass_outside_nucleus_p99": (sp * ~keep).sum(-1),
    }
    assert set(m) == set(expected)
    for key, val in expected.items():
        assert m[key] == pytest.approx(float(val.mean()), rel=1e-10, abs=1e-12), key
    # bf16 and float32 inputs agree with float32 logits of the same values
    zb = z.bfloat16()
    mb, m32 = ent.tail_metrics(zb, mask), ent.tail_metrics(zb.float(), mask)
    assert mb == pytest.approx(m32, rel=1e-6, abs=1e-9)


def test_compiled_kernels_match_the_eager_passes(monkeypatch):
    """Large CPU inputs go through torch.compile'd kernels (threshold lowered here): the same values and gradients
    as the eager chunked passes, -inf logits included, bad rows still raise."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 3000, generator=g) * 3
    z[1, :5] += 25.0
    z[2, 100:900] = -math.inf
    tok = torch.tensor([0, 1, 2, 3, 4, 5])
    fns = {
        "global": ent.global_entropy,
        "logprob": lambda x: ent.token_logprobs(x, tok),
        "tre_p": lambda x: ent.trust_region_entropy(x, top_p=0.9, max_candidates=None),
        "tail": lambda x: ent.tail_mass(x, 7),
    }
    w = torch.randn(6, generator=g)

    def run(f):
        x = z.clone().requires_grad_()
        out = f(x)
        if out.requires_grad:
            (out * w).sum().backward()
        return out.detach(), x.grad

    eager = {k: run(f) for k, f in fns.items()}
    monkeypatch.setattr(ent, "COMPILE_MIN_ELEMS", 0)
    for k, f in fns.items():
        (a, ga), (b, gb) = run(f), eager[k]
        close(a, b, 1e-5)
        if gb is not None:
            assert float((ga - gb).abs().max()) <= 1e-6 * float(gb.abs().max()) + 1e-7, k
    assert not ent._COMPILE["failed"] and ent._KERNELS  # really compiled
    with pytest.raises(ValueError, match="contain NaN"):
        bad = z.clone()
        bad[3, 7] = math.nan
        ent.global_entropy(bad)
