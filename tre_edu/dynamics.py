"""Toy computations behind the notebooks: one next-token distribution, its entropies and their gradients.

Everything here works on a single logit vector ``z`` of shape ``(V,)`` (one position of a ``(B, T, V)``
batch): no model, no training loop. The entropies themselves come from :mod:`tre_edu.entropy`; this module
only *uses* them to show what they do:

- :func:`realistic_logits`: a next-token distribution with a few plausible tokens and a Zipf-like tail over a
  large vocabulary (the shape of a real LLM's next-token distribution).
- :func:`entropy_gradient`: ``dH/dz`` per token for the global entropy, TRE-K or TRE-P (autograd through
  :mod:`tre_edu.entropy`), and :func:`global_entropy_gradient_closed_form` ``-pi_a (log pi_a + H)``.
- :func:`entropy_ascent`: gradient ascent of ``coef * H`` on the logits for ``steps`` steps, recording the
  tail mass (mass outside the top-k), the top-1 probability and the global entropy at every step.
- :func:`clean_response_probability`: ``prod_t (1 - eps_t)``, the chance that a response of ``T`` tokens never
  samples a tail token; :func:`tail_hit_probability` is ``1 - prod_t (1 - eps_t)``.

Token ids returned by :func:`realistic_logits` are sorted by probability (token id ``r`` has rank ``r + 1``),
so plots "by rank" can index the vector directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tre_edu import entropy as ent
from tre_edu.regularizers import Regularizer

# The regularisers' config kinds (``regularizer.kind``); plots label "entropy" as "global entropy".
METHODS = ("entropy", "tre-k", "tre-p")
OPTIMIZERS = ("sgd", "adam")

#: The width of Qwen2.5's LM head (its output vocabulary), the paper's models.
QWEN25_VOCAB = 151_936


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (V,); got {type(logits).__name__}")
    if logits.dim() != 1 or logits.numel() < 2:
        raise ValueError(f"{name} must have shape (V,) with V >= 2; got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"{name} must be finite (no NaN / inf)")
    return logits


# ---------------------------------------------------------------------------------------------------------
# A realistic next-token distribution
# ---------------------------------------------------------------------------------------------------------


def realistic_logits(
    V: int = QWEN25_VOCAB,
    n_plausible: int = 5,
    seed: int = 0,
    *,
    tail_mass: float = 0.002,
    head_decay: float = 1.5,
    zipf_exponent: float = 1.1,
    noise: float = 0.5,
) -> Tensor:
    """A next-token distribution shaped like a real LLM's: a few plausible tokens and a long Zipf tail.

    Args:
        V: vocabulary size (>= n_plausible + 1). Qwen2.5's LM head has 151,936 outputs.
        n_plausible: number of plausible tokens (the "head"): they share ``1 - tail_mass`` with probabilities
            decaying like ``rank**-head_decay`` (times a little seeded noise).
        seed: seed of the noise, so the same arguments always give the same logits.
        tail_mass: total probability of the other ``V - n_plausible`` tokens (0 < tail_mass < 1).
        head_decay: decay exponent of the plausible tokens' probabilities.
        zipf_exponent: the tail probability of tail rank ``r`` is ``~ r**-zipf_exponent`` ...
        noise: ... times ``exp(noise * N(0, 1))`` (log-normal scatter, then re-sorted).

    Returns:
        float32 logits of shape ``(V,)`` equal to the log-probabilities (``logsumexp = 0``), sorted so that
        token id ``r`` is the ``(r + 1)``-th most likely token. Every plausible token is more likely than
        every tail token.
    """
    if not isinstance(n_plausible, int) or n_plausible < 1:
        raise ValueError(f"n_plausible must be an int >= 1; got {n_plausible!r}")
    if not isinstance(V, int) or V < n_plausible + 1:
        raise ValueError(f"V must be an int >= n_plausible + 1 = {n_plausible + 1}; got {V!r}")
    if not 0.0 < tail_mass < 1.0:
        raise ValueError(f"tail_mass must be in (0, 1); got {tail_mass!r}")
    if head_decay < 0 or zipf_exponent < 0 or noise < 0:
        raise ValueError("head_decay, zipf_exponent and noise must be >= 0")
    g = torch.Generator().manual_seed(int(seed))
    # head: p_i ~ i^-decay * exp(0.2 * N(0,1)), renormalised to 1 - tail_mass
    ranks = torch.arange(1, n_plausible + 1, dtype=torch.float64)
    head_log = -head_decay * ranks.log() + 0.2 * torch.randn(n_plausible, generator=g, dtype=torch.float64)
    head_log = head_log.sort(descending=True).values
    head_log = head_log - torch.logsumexp(head_log, 0) + math.log1p(-tail_mass)
    # tail: Zipf over the tail ranks with log-normal scatter, renormalised to tail_mass
    n_tail = V - n_plausible
    tranks = torch.arange(1, n_tail + 1, dtype=torch.float64)
    tail_log = -zipf_exponent * tranks.log() + noise * torch.randn(n_tail, generator=g, dtype=torch.float64)
    tail_log = tail_log.sort(descending=True).values
    tail_log = tail_log - torch.logsumexp(tail_log, 0) + math.log(tail_mass)
    # keep the head above the tail (a plausible token is never less likely than an implausible one)
    if tail_log[0] >= head_log[-1]:
        shift = float(tail_log[0] - head_log[-1]) + 0.5
        tail_log = tail_log - shift
        tail_log = tail_log - torch.logsumexp(tail_log, 0) + math.log(tail_mass)
        tail_log = torch.minimum(tail_log, head_log[-1] - 0.5)
    logp = torch.cat([head_log, tail_log])
    logp = logp - torch.logsumexp(logp, 0)
    return logp.to(torch.float32)


def sorted_probs(logits: Tensor) -> np.ndarray:
    """Probabilities of ``logits`` (shape ``(V,)``) sorted in decreasing order, as float64 numpy ``(V,)``."""
    _check_logits(logits)
    p = torch.softmax(logits.detach().double(), dim=-1)
    return p.sort(descending=True).values.numpy()


def log_rank_grid(V: int, n: int = 400, dense_head: int = 64) -> np.ndarray:
    """Ranks (1-based, int64, sorted, unique) spread evenly in log-space over ``1..V`` for plotting.

    The first ``dense_head`` ranks are all kept (the head is where the detail is); then about ``n`` more
    ranks evenly spaced in ``log(rank)``, always including ``V``. A 151,936-point curve drawn with a few
    hundred points looks the same on a log axis.
    """
    if V < 1:
        raise ValueError(f"V must be >= 1; got {V}")
    head = np.arange(1, min(dense_head, V) + 1)
    rest = np.unique(np.round(np.geomspace(1, V, num=max(n, 2))).astype(np.int64))
    return np.unique(np.concatenate([head, rest, [V]])).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Entropies and their gradients
# ---------------------------------------------------------------------------------------------------------


def regularizer_value(
    logits: Tensor,
    method: str,
    *,
    k: int = 2,
    p: float = 0.99,
    rescale: bool = True,
    max_candidates: int | None = 256,
) -> Tensor:
    """The entropy a regulariser maximises: ``H`` ("entropy": the global entropy), ``H_TRE`` with TRE-K or TRE-P.

    ``logits`` has shape ``(..., V)``; returns shape ``(...)``. Delegates to :mod:`tre_edu.entropy`.
    """
    _check_method(method)
    if method == "entropy":
        return ent.global_entropy(logits)
    if method == "tre-k":
        return ent.trust_region_entropy(logits, top_k=k, rescale=rescale, max_candidates=max_candidates)
    return ent.trust_region_entropy(logits, top_p=p, rescale=rescale, max_candidates=max_candidates)


def entropy_gradient(
    logits: Tensor,
    method: str = "entropy",
    *,
    k: int = 2,
    p: float = 0.99,
    rescale: bool = True,
    max_candidates: int | None = 256,
) -> Tensor:
    """``dH/dz``: the gradient of the chosen entropy w.r.t. every logit, shape ``(V,)`` float32 (autograd).

    For the global entropy this is ``-pi_a (log pi_a + H)`` (see :func:`global_entropy_gradient_closed_form`):
    positive, i.e. *pushed up*, for every token with ``log pi_a < -H`` -- the whole tail. For TRE it is
    exactly zero outside the trust region ``A_TR``.
    """
    _check_logits(logits)
    z = logits.detach().to(torch.float32).clone().requires_grad_(True)
    h = regularizer_value(z, method, k=k, p=p, rescale=rescale, max_candidates=max_candidates)
    (grad,) = torch.autograd.grad(h, z)
    return grad.detach()


def global_entropy_gradient_closed_form(logits: Tensor) -> Tensor:
    """``dH/dz_a = -pi_a (log pi_a + H)`` in float64, shape ``(V,)``.

    Derivation: ``H = -sum_a pi_a log pi_a`` and ``d pi_b / d z_a = pi_b (1[a=b] - pi_a)`` give
    ``dH/dz_a = -pi_a log pi_a - pi_a H``.
    """
    _check_logits(logits)
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    pi = logp.exp()
    h = -(pi * logp).sum()
    return -pi * (logp + h)


def sign_threshold(logits: Tensor) -> float:
    """``-H``: the global-entropy gradient is positive exactly for the tokens with ``log pi_a < -H``."""
    return -float(ent.global_entropy(logits.detach()))


def rescale_factor(vocab_size: int, region_size: int) -> float:
    """``log V / log |A_TR|`` (``|A_TR|`` clamped to >= 2): the factor that maps ``H_TR`` onto ``[0, log V]``.

    The effective coefficient of a TRE term is ``coef * rescale_factor``: with the paper's ``coef = 0.001``,
    K = 2 and V = 151,936 the local entropy is weighted ``0.001 * 17.2 = 0.017``. Computed by
    :meth:`tre_edu.regularizers.Regularizer.effective_coef` (the one place that knows the rescaling) at coef 1.
    """
    return Regularizer(kind="tre-p", coef=1.0).effective_coef(vocab_size, region_size)


# ---------------------------------------------------------------------------------------------------------
# Gradient ascent of an entropy bonus on the logits
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AscentResult:
    """Trajectories of :func:`entropy_ascent`; every array has shape ``(n_records,)``."""

    method: str
    vocab_size: int
    steps: np.ndarray
    tail_mass: np.ndarray  # mass outside the top-`tail_k` tokens
    top1_prob: np.ndarray
    entropy: np.ndarray  # global entropy H (nats)
    regularizer: np.ndarray  # the maximised quantity (H, or H_TRE)
    initial_logits: Tensor = field(repr=False)
    final_logits: Tensor = field(repr=False)
    tail_k: int = 5


def entropy_ascent(
    logits: Tensor,
    method: str = "entropy",
    *,
    steps: int = 200,
    coef: float = 1.0,
    lr: float = 1.0,
    optimizer: str = "sgd",
    k: int = 2,
    p: float = 0.99,
    rescale: bool = True,
    tail_k: int = 5,
    max_candidates: int | None = 256,
    record_every: int = 1,
) -> AscentResult:
    """Gradient ascent of ``coef * H_method(z)`` directly on the logits ``z`` (shape ``(V,)``).

    This isolates what the entropy term of the loss ``L = L_PPO - coef * H`` does on its own to one
    next-token distribution: ``z <- z + lr * coef * dH/dz`` (``optimizer="sgd"``), or Adam on ``z``
    (``optimizer="adam"``, which normalises every logit's step, like the per-row steps of an LM head trained
    with AdamW: then even a tail token with a tiny gradient moves at full speed in the direction of its sign).
    The toy has no model, so ``coef`` and ``lr`` are *not* in the paper's units; only their product matters
    for SGD.

    Args:
        logits: starting logits, shape ``(V,)``.
        method: "entropy" (global entropy) | "tre-k" | "tre-p".
        steps: number of ascent steps (>= 0).
        coef, lr: entropy coefficient and step size (both > 0).
        k, p, rescale, max_candidates: the trust region (see :func:`tre_edu.entropy.trust_region_entropy`).
        tail_k: the tail is the mass outside the top-``tail_k`` tokens (``tre_edu.entropy.tail_mass``).
        record_every: record the metrics every this many steps (the last step is always recorded).

    Returns:
        :class:`AscentResult` with the tail mass, top-1 probability, global entropy and regulariser value.
    """
    _check_logits(logits)
    _check_method(method)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0; got {steps!r}")
    if not coef > 0 or not lr > 0:
        raise ValueError(f"coef and lr must be > 0; got coef={coef!r}, lr={lr!r}")
    if not isinstance(tail_k, int) or not 1 <= tail_k < logits.numel():
        raise ValueError(f"tail_k must be an int in [1, V); got {tail_k!r}")
    if not isinstance(record_every, int) or record_every < 1:
        raise ValueError(f"record_every must be an int >= 1; got {record_every!r}")

    z = logits.detach().to(torch.float32).clone().requires_grad_(True)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([z], lr=lr, maximize=True)
    else:
        opt = torch.optim.Adam([z], lr=lr, maximize=True)
    rec_steps, tails, top1, hs, regs = [], [], [], [], []

    def record(step: int, reg_value: float) -> None:
        with torch.no_grad():
            rec_steps.append(step)
            tails.append(float(ent.tail_mass(z, tail_k)))
            top1.append(float(ent.topk_mass(z, 1)))
            hs.append(float(ent.global_entropy(z)))
            regs.append(reg_value)

    for step in range(steps + 1):
        reg = regularizer_value(z, method, k=k, p=p, rescale=rescale, max_candidates=max_candidates)
        if step % record_every == 0 or step == steps:
            record(step, float(reg.detach()))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        (coef * reg).backward()
        opt.step()
        if not torch.isfinite(z).all():
            raise ValueError(f"logits became non-finite at step {step + 1}: lower lr * coef (lr={lr}, coef={coef})")

    return AscentResult(
        method=method,
        vocab_size=logits.numel(),
        steps=np.asarray(rec_steps, dtype=np.int64),
        tail_mass=np.asarray(tails),
        top1_prob=np.asarray(top1),
        entropy=np.asarray(hs),
        regularizer=np.asarray(regs),
        initial_logits=logits.detach().clone(),
        final_logits=z.detach().clone(),
        tail_k=tail_k,
    )


def ascent_sweep(
    vocab_sizes: Sequence[int],
    methods: Sequence[str] = METHODS,
    *,
    n_plausible: int = 5,
    seed: int = 0,
    progress: bool = False,
    **ascent_kwargs,
) -> dict[tuple[str, int], AscentResult]:
    """Run :func:`entropy_ascent` for every (method, V) on ``realistic_logits(V, n_plausible, seed)``.

    Every V starts from the same head and the same total tail mass, so only the tail's width differs.
    ``ascent_kwargs`` go to :func:`entropy_ascent` (``tail_k`` defaults to ``n_plausible``).
    Returns ``{(method, V): AscentResult}``.
    """
    for m in methods:
        _check_method(m)
    ascent_kwargs.setdefault("tail_k", n_plausible)
    jobs = [(m, int(v)) for v in vocab_sizes for m in methods]
    out: dict[tuple[str, int], AscentResult] = {}
    starts: dict[int, Tensor] = {}
    for m, v in tqdm(jobs, desc="entropy ascent", disable=not progress):
        if v not in starts:
            starts[v] = realistic_logits(v, n_plausible, seed)
        out[(m, v)] = entropy_ascent(starts[v], m, **ascent_kwargs)
    return out


# ---------------------------------------------------------------------------------------------------------
# Sequence level: the chance that a whole response stays clean
# ---------------------------------------------------------------------------------------------------------


def _eps_and_horizons(eps, horizon) -> tuple[np.ndarray, np.ndarray]:
    e = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    if e.ndim != 1 or e.size == 0:
        raise ValueError("eps must be a number or a 1-D sequence of per-step tail probabilities")
    if not np.all((e >= 0.0) & (e <= 1.0)):
        raise ValueError("eps must lie in [0, 1] (a probability per step)")
    t = np.atleast_1d(np.asarray(horizon))
    if not np.issubdtype(t.dtype, np.integer) or np.any(t < 0):
        raise ValueError(f"horizon must be an int or ints >= 0; got {horizon!r}")
    if e.size > 1 and np.any(t > e.size):
        raise ValueError(f"horizon must be <= len(eps) = {e.size} when eps is a sequence")
    return e, t.astype(np.int64)


def _log_clean(eps, horizon) -> np.ndarray:
    e, t = _eps_and_horizons(eps, horizon)
    # log prod_{t<T} (1 - eps_t) = sum_{t<T} log1p(-eps_t); accurate for eps ~ 1e-6 and T ~ 1e4
    if e.size == 1:
        with np.errstate(divide="ignore"):
            return t * np.log1p(-e[0])
    with np.errstate(divide="ignore"):
        cum = np.concatenate([[0.0], np.cumsum(np.log1p(-e))])
    return cum[t]


def clean_response_probability(eps, horizon) -> np.ndarray:
    """``P(clean) = prod_{t=1..T} (1 - eps_t)``: no token of a ``T``-token response comes from the tail.

    Args:
        eps: per-step tail probability, a number (the same at every step: ``(1 - eps)^T``) or a 1-D sequence
            ``eps_1, eps_2, ...`` (then ``horizon <= len(eps)``).
        horizon: T, an int or an array of ints.

    Returns:
        float64 array with the shape of ``np.atleast_1d(horizon)``.
    """
    return np.exp(_log_clean(eps, horizon))


def tail_hit_probability(eps, horizon) -> np.ndarray:
    """``1 - prod_{t=1..T} (1 - eps_t)``: the chance that a ``T``-token response samples a tail token.

    Computed as ``-expm1(sum log1p(-eps_t))``, accurate even when the result is ~1e-9.
    """
    return -np.expm1(_log_clean(eps, horizon))


def per_step_tail_risk(logits: Tensor, k: int = 5) -> float:
    """``eps``: the probability that one sampled token (temperature 1) lies outside the top-``k`` tokens."""
    _check_logits(logits)
    return float(ent.tail_mass(logits.detach(), k))
