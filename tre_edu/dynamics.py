"""Toy computations behind notebooks 01 and 02 on one next-token logit vector ``z`` of shape ``(V,)``: no model.

The entropies come from :mod:`tre_edu.entropy`; here they are used to show what they do to one distribution:
its gradients ``dH/dz``, gradient ascent of an entropy bonus, and ``P(clean) = prod_t (1 - eps_t)``, the chance
that a ``T``-token response never samples a tail token. :func:`realistic_logits` returns token ids sorted by
probability (id ``r`` has rank ``r + 1``), so plots "by rank" index the vector directly.
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
from tre_edu.entropy import tre_rescale
from tre_edu.regularizers import ENTROPY_KINDS

METHODS = ENTROPY_KINDS  # the regularisers' config kinds; plots label "entropy" as "global entropy"
OPTIMIZERS = ("sgd", "adam")
QWEN25_VOCAB = 151_936  # the width of Qwen2.5's LM head (its output vocabulary), the paper's models


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(x, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_method(method: str) -> str:
    _check(method in METHODS, f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return method


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    _check(isinstance(logits, Tensor), f"{name} must be a torch.Tensor of shape (V,); got {type(logits).__name__}")
    _check(logits.dim() == 1 and logits.numel() >= 2, f"{name} must have shape (V,) with V >= 2; got {logits.shape}")
    _check(bool(torch.isfinite(logits).all()), f"{name} must be finite (no NaN / inf)")
    return logits


def _normalised(log_w: Tensor, log_mass: float) -> Tensor:
    """``log_w`` sorted in decreasing order and shifted so that its probabilities sum to ``exp(log_mass)``."""
    log_w = log_w.sort(descending=True).values
    return log_w - torch.logsumexp(log_w, 0) + log_mass


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

    The ``n_plausible`` head tokens share ``1 - tail_mass`` as ``p_i ~ i**-head_decay * exp(0.2 N(0, 1))``; the
    other ``V - n_plausible`` share ``tail_mass`` as ``p_r ~ r**-zipf_exponent * exp(noise N(0, 1))`` (seeded by
    ``seed``). Returns float32 log-probabilities ``(V,)``, sorted, every head token above every tail token.
    """
    _check(_is_int(n_plausible, 1), f"n_plausible must be an int >= 1; got {n_plausible!r}")
    _check(_is_int(V, n_plausible + 1), f"V must be an int >= n_plausible + 1 = {n_plausible + 1}; got {V!r}")
    _check(0.0 < tail_mass < 1.0, f"tail_mass must be in (0, 1); got {tail_mass!r}")
    _check(min(head_decay, zipf_exponent, noise) >= 0, "head_decay, zipf_exponent and noise must be >= 0")
    g = torch.Generator().manual_seed(int(seed))

    def zipf(n: int, exponent: float, scatter: float) -> Tensor:
        ranks = torch.arange(1, n + 1, dtype=torch.float64)
        return -exponent * ranks.log() + scatter * torch.randn(n, generator=g, dtype=torch.float64)

    head_log = _normalised(zipf(n_plausible, head_decay, 0.2), math.log1p(-tail_mass))
    tail_log = _normalised(zipf(V - n_plausible, zipf_exponent, noise), math.log(tail_mass))
    if tail_log[0] >= head_log[-1]:  # keep the head above the tail
        tail_log = _normalised(tail_log - (float(tail_log[0] - head_log[-1]) + 0.5), math.log(tail_mass))
        tail_log = torch.minimum(tail_log, head_log[-1] - 0.5)
    logp = torch.cat([head_log, tail_log])
    return (logp - torch.logsumexp(logp, 0)).to(torch.float32)


def sorted_probs(logits: Tensor) -> np.ndarray:
    """Probabilities of ``logits`` (shape ``(V,)``) sorted in decreasing order, as float64 numpy ``(V,)``."""
    _check_logits(logits)
    return torch.softmax(logits.detach().double(), dim=-1).sort(descending=True).values.numpy()


def log_rank_grid(V: int, n: int = 400, dense_head: int = 64) -> np.ndarray:
    """Ranks ``1..V`` for plotting on a log axis: all of the first ``dense_head``, then ~``n`` log-spaced, and V."""
    _check(V >= 1, f"V must be >= 1; got {V}")
    head = np.arange(1, min(dense_head, V) + 1)
    rest = np.round(np.geomspace(1, V, num=max(n, 2))).astype(np.int64)
    return np.unique(np.concatenate([head, rest, [V]])).astype(np.int64)


def regularizer_value(
    logits: Tensor, method: str, *, k: int = 2, p: float = 0.99, rescale: bool = True, max_candidates: int | None = 256
) -> Tensor:
    """The entropy a regulariser maximises: ``H`` ("entropy"), or ``H_TRE`` of TRE-K / TRE-P; ``(..., V) -> (...)``."""
    if _check_method(method) == "entropy":
        return ent.global_entropy(logits)
    region = {"top_k": k} if method == "tre-k" else {"top_p": p}
    return ent.trust_region_entropy(logits, **region, rescale=rescale, max_candidates=max_candidates)


def entropy_gradient(
    logits: Tensor,
    method: str = "entropy",
    *,
    k: int = 2,
    p: float = 0.99,
    rescale: bool = True,
    max_candidates: int | None = 256,
) -> Tensor:
    """``dH/dz`` of the chosen entropy for every logit, ``(V,)`` float32 (autograd); TRE's is 0 outside ``A_TR``."""
    _check_logits(logits)
    z = logits.detach().to(torch.float32).clone().requires_grad_(True)
    h = regularizer_value(z, method, k=k, p=p, rescale=rescale, max_candidates=max_candidates)
    return torch.autograd.grad(h, z)[0].detach()


def global_entropy_gradient_closed_form(logits: Tensor) -> Tensor:
    """``dH/dz_a = -pi_a (log pi_a + H)`` in float64, shape ``(V,)``: positive for every ``log pi_a < -H``."""
    _check_logits(logits)
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    return -logp.exp() * (logp - (logp.exp() * logp).sum())


def sign_threshold(logits: Tensor) -> float:
    """``-H``: the global-entropy gradient is positive exactly for the tokens with ``log pi_a < -H``."""
    return -float(ent.global_entropy(logits.detach()))


def rescale_factor(vocab_size: int, region_size: int) -> float:
    """``log V / log |A_TR|`` (``|A_TR|`` clamped to >= 2): :func:`tre_edu.entropy.tre_rescale`."""
    return float(tre_rescale(vocab_size, nucleus_size=region_size))


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
    """Gradient ascent of ``coef * H_method(z)`` on the logits ``z`` (shape ``(V,)``): ``z <- z + lr coef dH/dz``.

    What the entropy term of ``L = L_PPO - coef * H`` alone does to one distribution. ``optimizer="adam"``
    normalises every logit's step, like AdamW on an LM head's rows. The toy has no model, so ``coef`` and ``lr``
    are not in the paper's units. Records every ``record_every`` steps and at the last step.
    """
    _check_logits(logits)
    _check_method(method)
    _check(optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    _check(_is_int(steps, 0), f"steps must be an int >= 0; got {steps!r}")
    _check(coef > 0 and lr > 0, f"coef and lr must be > 0; got coef={coef!r}, lr={lr!r}")
    _check(_is_int(tail_k, 1) and tail_k < logits.numel(), f"tail_k must be an int in [1, V); got {tail_k!r}")
    _check(_is_int(record_every, 1), f"record_every must be an int >= 1; got {record_every!r}")
    z = logits.detach().to(torch.float32).clone().requires_grad_(True)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([z], lr=lr, maximize=True)
    records: list[tuple[int, float, float, float, float]] = []
    for step in range(steps + 1):
        reg = regularizer_value(z, method, k=k, p=p, rescale=rescale, max_candidates=max_candidates)
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                tail, top1, h = ent.tail_mass(z, tail_k), ent.topk_mass(z, 1), ent.global_entropy(z)
                records.append((step, float(tail), float(top1), float(h), float(reg.detach())))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        (coef * reg).backward()
        opt.step()
        _check(bool(z.isfinite().all()), f"non-finite logits at step {step + 1}: lower lr * coef ({lr=}, {coef=})")
    rec_steps, *cols = (np.asarray(col) for col in zip(*records))  # step, tail mass, top-1, H, regulariser
    start, end = logits.detach().clone(), z.detach().clone()
    return AscentResult(method, logits.numel(), rec_steps.astype(np.int64), *cols, start, end, tail_k)


def ascent_sweep(
    vocab_sizes: Sequence[int],
    methods: Sequence[str] = METHODS,
    *,
    n_plausible: int = 5,
    seed: int = 0,
    progress: bool = False,
    **ascent_kwargs,
) -> dict[tuple[str, int], AscentResult]:
    """``{(method, V): entropy_ascent(realistic_logits(V, n_plausible, seed), method, **ascent_kwargs)}``: every V
    starts from the same head and tail mass, so only the tail's width differs (``tail_k``: n_plausible)."""
    for m in methods:
        _check_method(m)
    ascent_kwargs.setdefault("tail_k", n_plausible)
    starts = {int(v): realistic_logits(int(v), n_plausible, seed) for v in vocab_sizes}
    jobs = tqdm([(m, v) for v in starts for m in methods], "entropy ascent", disable=not progress)
    return {(m, v): entropy_ascent(starts[v], m, **ascent_kwargs) for m, v in jobs}


def clean_response_probability(eps, horizon) -> np.ndarray:
    """``P(clean) = prod_{t=1..T} (1 - eps_t)`` for ``T`` = ``horizon`` (int or ints): no tail token sampled.

    ``eps``: one number (``(1 - eps)^T``) or a 1-D sequence ``eps_1, eps_2, ...`` (``T <= len(eps)``). Returns
    float64 with the shape of ``np.atleast_1d(horizon)``. Computed as ``exp(sum_{t<=T} log1p(-eps_t))``: accurate
    for eps ~ 1e-6 and T ~ 1e4.
    """
    e = np.atleast_1d(np.asarray(eps, dtype=np.float64))
    t = np.atleast_1d(np.asarray(horizon))
    _check(e.ndim == 1 and e.size > 0, "eps must be a number or a 1-D sequence of per-step tail probabilities")
    _check(bool(np.all((e >= 0.0) & (e <= 1.0))), "eps must lie in [0, 1] (a probability per step)")
    _check(np.issubdtype(t.dtype, np.integer) and not np.any(t < 0), f"horizon must be int(s) >= 0; got {horizon!r}")
    _check(e.size == 1 or not np.any(t > e.size), f"horizon must be <= len(eps) = {e.size} when eps is a sequence")
    with np.errstate(divide="ignore"):
        if e.size == 1:
            return np.exp(t.astype(np.int64) * np.log1p(-e[0]))
        return np.exp(np.concatenate([[0.0], np.cumsum(np.log1p(-e))])[t])
