"""Tests for tre_edu.dynamics: the toy computations behind notebooks 01 and 02 (paper claims 1-3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tre_edu import dynamics as dyn
from tre_edu import entropy as ent
from tre_edu.entropy import tail_mass


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return dyn.realistic_logits(4_000, n_plausible=5, seed=0)


def test_realistic_logits_shape_and_structure(z):
    assert z.shape == (4_000,) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    assert abs(float(torch.logsumexp(z.double(), 0))) < 1e-5  # logits are log-probabilities
    assert torch.all(z[:-1] >= z[1:])  # token id r has rank r + 1
    assert float(ent.tail_mass(z, 5)) == pytest.approx(0.002, rel=1e-3)
    p = torch.softmax(z.double(), -1)
    assert p[0] > 0.3 and p[4] > 10 * p[5]  # a clear head above a thin tail
    assert torch.equal(z, dyn.realistic_logits(4_000, n_plausible=5, seed=0))
    assert not torch.equal(z, dyn.realistic_logits(4_000, n_plausible=5, seed=1))


@pytest.mark.parametrize(
    "kwargs",
    [{"V": 5, "n_plausible": 5}, {"V": 100, "n_plausible": 0}, {"V": 100, "tail_mass": 1.5}, {"V": 2.5}],
)
def test_realistic_logits_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        dyn.realistic_logits(**kwargs)


def test_global_gradient_closed_form_matches_autograd(z):
    auto = dyn.entropy_gradient(z, "entropy").double()
    closed = dyn.global_entropy_gradient_closed_form(z)
    assert torch.allclose(auto, closed, atol=1e-6, rtol=1e-3)
    assert abs(float(closed.sum())) < 1e-9  # softmax gradients sum to zero


def test_global_gradient_positive_exactly_below_minus_h(z):
    """Claim 1: dH/dz_a = -pi_a (log pi_a + H) > 0  <=>  log pi_a < -H (every tail token is pushed up)."""
    g = dyn.global_entropy_gradient_closed_form(z)
    logp = torch.log_softmax(z.double(), -1)
    thr = dyn.sign_threshold(z)
    assert thr == pytest.approx(-float(ent.global_entropy(z)))
    clear = (logp - thr).abs() > 1e-4  # ignore float ties at the boundary
    assert torch.equal((g > 0)[clear], (logp < thr)[clear])
    assert torch.all(g[5:] > 0)  # the whole tail
    auto = dyn.entropy_gradient(z, "entropy")
    assert torch.equal((auto > 0)[clear], (logp < thr)[clear])


@pytest.mark.parametrize(("method", "size"), [("tre-k", 2), ("tre-k", 4), ("tre-p", None)])
def test_tre_gradient_zero_outside_trust_region(z, method, size):
    k = size or 2
    g = dyn.entropy_gradient(z, method, k=k, p=0.99)
    n_region = k if method == "tre-k" else int(ent.nucleus_size(z, 0.99, max_candidates=256))
    assert torch.all(g[n_region:] == 0)
    assert torch.count_nonzero(g[:n_region]) >= 1


def test_rescale_factor():
    assert dyn.rescale_factor(dyn.QWEN25_VOCAB, 2) == pytest.approx(math.log(151_936) / math.log(2))
    assert dyn.rescale_factor(dyn.QWEN25_VOCAB, 2) == pytest.approx(17.21, abs=0.01)
    assert dyn.rescale_factor(1000, 1) == dyn.rescale_factor(1000, 2)  # |A_TR| clamped to >= 2
    with pytest.raises(ValueError):
        dyn.rescale_factor(1, 2)


def test_log_rank_grid():
    grid = dyn.log_rank_grid(151_936, n=300)
    assert grid[0] == 1 and grid[-1] == 151_936
    assert np.all(np.diff(grid) > 0) and grid.size < 500
    assert np.array_equal(grid[:64], np.arange(1, 65))


@pytest.fixture(scope="module")
def ascent():
    kw = {"steps": 150, "coef": 1.0, "record_every": 50}
    return dyn.ascent_sweep([300, 8_000], dyn.METHODS, n_plausible=5, **kw)


def test_global_ascent_grows_tail_more_for_larger_v(ascent):
    """Claim 2: under a global entropy bonus the mass outside the top-k grows, and grows more with V."""
    small, big = ascent[("entropy", 300)], ascent[("entropy", 8_000)]
    for r in (small, big):
        assert r.tail_mass[0] == pytest.approx(0.002, rel=1e-3)
        assert np.all(np.diff(r.tail_mass) > -1e-6)  # monotone growth
        assert np.all(np.diff(r.entropy) > -1e-5)  # ascent of H
    assert big.tail_mass[-1] > 5 * big.tail_mass[0]
    assert big.tail_mass[-1] > 2 * small.tail_mass[-1]


@pytest.mark.parametrize("method", ["tre-k", "tre-p"])
def test_tre_ascent_keeps_tail_near_start(ascent, method):
    """Claim 2: under TRE the tail mass stays near where it started (a little drift, far below global's)."""
    for v in (300, 8_000):
        r = ascent[(method, v)]
        assert r.tail_mass.max() < 2.5 * r.tail_mass[0]
        assert r.tail_mass[-1] < 0.3 * ascent[("entropy", v)].tail_mass[-1]
        assert r.final_logits.shape == (v,) and torch.isfinite(r.final_logits).all()


def test_ascent_result_fields_and_adam():
    z0 = dyn.realistic_logits(500, 5, 0)
    r = dyn.entropy_ascent(z0, "entropy", steps=20, coef=1.0, lr=0.05, optimizer="adam", record_every=7)
    assert r.steps.tolist() == [0, 7, 14, 20]
    assert r.tail_mass.shape == r.top1_prob.shape == r.entropy.shape == r.regularizer.shape == (4,)
    assert r.entropy[-1] > r.entropy[0] and r.regularizer[0] == pytest.approx(r.entropy[0])
    assert torch.equal(r.initial_logits, z0)
    r0 = dyn.entropy_ascent(z0, "tre-k", steps=0)
    assert r0.steps.tolist() == [0] and torch.equal(r0.final_logits, z0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "kl"},
        {"method": "global"},  # one name per method: the config kind "entropy"
        {"steps": -1},
        {"coef": 0.0},
        {"optimizer": "rmsprop"},
        {"tail_k": 0},
        {"record_every": 0},
    ],
)
def test_ascent_rejects_bad_input(kwargs):
    with pytest.raises(ValueError):
        dyn.entropy_ascent(dyn.realistic_logits(100, 5, 0), **kwargs)
    with pytest.raises(ValueError):
        dyn.entropy_ascent(torch.tensor([0.0, float("nan")]))


def test_clean_response_probability_closed_form():
    """Claim 3: P(clean) = prod_t (1 - eps_t) decreases with T; 1 - P(clean) is the tail-hit chance."""
    ts = np.array([0, 1, 10, 100, 1000, 8192])
    p = dyn.clean_response_probability(0.002, ts)
    np.testing.assert_allclose(p, (1 - 0.002) ** ts, rtol=1e-12)
    assert p[0] == 1.0 and np.all(np.diff(p) < 0)
    eps = np.array([0.1, 0.2, 0.0, 0.5])
    np.testing.assert_allclose(dyn.clean_response_probability(eps, [0, 1, 2, 3, 4]), [1, 0.9, 0.72, 0.72, 0.36])
    assert dyn.clean_response_probability(1.0, 3)[0] == 0.0
    # the toy distribution puts eps = 0.002 outside its top 5 (the per-step tail risk of the closed form)
    assert float(tail_mass(dyn.realistic_logits(1000, 5, 0), 5)) == pytest.approx(0.002, rel=1e-3)


@pytest.mark.parametrize(("eps", "horizon"), [(-0.1, 3), (1.5, 3), (0.1, -1), (0.1, 2.5), ([0.1, 0.2], 3), ([], 1)])
def test_clean_response_rejects_bad_input(eps, horizon):
    with pytest.raises(ValueError):
        dyn.clean_response_probability(eps, horizon)
