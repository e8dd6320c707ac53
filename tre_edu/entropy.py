"""Entropies and tail statistics of next-token distributions, memory-bounded and float32-accurate.

Every function takes logits ``z`` of shape ``(..., V)`` (usually ``(B, T, V)``) and works along the last
dimension; ``pi = softmax(z)``. Results are float32 for any floating input (bf16 / fp16 are computed in
float32).

Functions (PAPER.md has the formulas):

- :func:`global_entropy`        H(pi) = -sum_a pi_a log pi_a (the classical bonus)
- :func:`trust_region_entropy`  H_TRE = H(q) * log V / log |A_TR|, q = pi renormalised on the trust region
                                A_TR (TRE-K: the K largest logits; TRE-P: the nucleus of mass p;
                                K = 1: min-entropy)
- :func:`min_entropy`           -log max_a pi_a
- :func:`topk_mass`, :func:`tail_mass`                mass inside / outside the top-k
- :func:`nucleus_size`, :func:`nucleus_tail_mass`     |nucleus of mass p| and the mass outside it
- :func:`token_logprobs`        log pi_token = z_token - logsumexp(z)
- :func:`tail_metrics`          a dict of masked means of the above, for logging

Numerics. The textbook float32 formula ``logsumexp(z) - sum(softmax(z) * z)`` subtracts two numbers of size
~|z| to get an entropy that can be far smaller (a peaked distribution): catastrophic cancellation. Here every
entropy uses shifted logits ``s = z - max z <= 0``, ``e = exp(s)``, ``S = sum e >= 1``:

    H = log S - (sum_a e_a s_a) / S          both terms are >= 0, so there is no cancellation,

and its gradient in the equally cancellation-free form

    dH/dz_a = -pi_a (log pi_a + H) = -pi_a (s_a - (sum_b e_b s_b) / S).

Memory. Nothing of size (N, V) is allocated except the gradient itself: the global passes run over chunks of
rows (custom ``torch.autograd.Function``s that save only the logits reference and a few numbers per row and
recompute the chunk in backward), and trust-region entropies only touch the top-K (or top-``max_candidates``)
logits, whose gradient is scattered into a zero tensor.

Masked vocabulary entries (``-inf`` logits) are valid everywhere. NaN or ``+inf`` logits, or a row whose
logits are all ``-inf``, raise ``ValueError`` (detected on per-row reductions, so the check costs no extra
pass).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "global_entropy",
    "trust_region_entropy",
    "min_entropy",
    "topk_mass",
    "tail_mass",
    "nucleus_size",
    "nucleus_tail_mass",
    "token_logprobs",
    "tail_metrics",
]

# Elements per chunk of rows in the chunked passes (at least one row per chunk). On one CPU thread small
# chunks whose float32 temporaries stay in cache are fastest; with several threads every op ends in a barrier,
# which is costly on a loaded machine, so fewer, larger ops win (measured: 2^22 is 3-10x faster than 2^18 on 2
# busy cores). On a GPU, kernel-launch cost dominates. Scratch memory: 1-2 chunk buffers (16-32 MiB on a CPU).
_CHUNK_ELEMS_CPU_1THREAD = 1 << 19
_CHUNK_ELEMS_CPU = 1 << 22
_CHUNK_ELEMS_GPU = 1 << 24
_FMIN = torch.finfo(torch.float32).min  # finite stand-in for -inf so that 0 * (-inf) never happens


# ----------------------------------------------------------------------------------------------------
# validation and chunking helpers
# ----------------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, name: str = "logits") -> int:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (..., V), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32, float64, bf16, fp16), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    return logits.shape[-1]


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def _check_p(p: object, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"{name} must be a float in (0, 1], got {p!r}")
    return float(p)


def _check_max_candidates(max_candidates: object) -> int | None:
    if max_candidates is None:
        return None
    return _check_int(max_candidates, "max_candidates", 1)


def _raise_bad_rows(m: Tensor, name: str = "logits") -> None:
    """``m`` holds per-row maxima (NaN propagates through max); raise a clear error if any row is unusable."""
    if bool(torch.isnan(m).any()):
        raise ValueError(f"{name} contain NaN; allowed values are finite numbers or -inf (masked tokens)")
    if bool((m == math.inf).any()):
        raise ValueError(f"{name} contain +inf; allowed values are finite numbers or -inf (masked tokens)")
    if bool((m == -math.inf).any()):
        raise ValueError(f"{name} have a row that is entirely -inf; at least one token per position must be finite")


def _row_views(x: Tensor) -> list[Tensor]:
    """2-D views ``(r, V)`` covering the rows of ``x`` (..., V) in row-major order, without copying.

    A strided input (e.g. ``out.logits[:, :-1]``) cannot be viewed as one (N, V) matrix; it is split along its
    leading dimensions until each piece can.
    """
    V = x.shape[-1]
    if x.dim() <= 2:
        return [x.reshape(1, V) if x.dim() == 1 else x]
    try:
        return [x.view(-1, V)]
    except RuntimeError:
        return [v for i in range(x.shape[0]) for v in _row_views(x[i])]


def _chunk_elems(x: Tensor) -> int:
    if x.is_cuda:
        return _CHUNK_ELEMS_GPU
    return _CHUNK_ELEMS_CPU_1THREAD if torch.get_num_threads() == 1 else _CHUNK_ELEMS_CPU


def _chunks(views: list[Tensor]) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(row_offset, chunk)`` with ``chunk`` a (r, V) view of consecutive rows."""
    offset = 0
    for v in views:
        rows = max(1, _chunk_elems(v) // max(1, v.shape[-1]))
        for r0 in range(0, v.shape[0], rows):
            c = v[r0 : r0 + rows]
            yield offset + r0, c
        offset += v.shape[0]


def _buffers(views: list[Tensor], n: int) -> list[Tensor]:
    """``n`` float32 scratch buffers of one chunk's size (re-used by every chunk)."""
    x = views[0]
    V = x.shape[-1]
    rows = min(max(1, _chunk_elems(x) // max(1, V)), max(v.shape[0] for v in views))
    return [torch.empty(rows, V, dtype=torch.float32, device=x.device) for _ in range(n)]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[r, v] * b[r, v] for 2-D (r, V) tensors, without an (r, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def _shifted(c: Tensor, m: Tensor, out: Tensor) -> Tensor:
    """s = z - m (float32) written into ``out``."""
    return torch.sub(c, m, out=out) if c.dtype == torch.float32 else torch.sub(c.float(), m, out=out)


def _stats_pass(logits: Tensor, *, entropy: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One chunked pass over the rows of ``logits`` (..., V), no autograd.

    Returns per-row float32 vectors of length N = numel / V: ``m = max z``, ``log S`` with
    ``S = sum exp(z - m)``, and, when ``entropy``: ``c = -(sum e s) / S >= 0`` (so that H = log S + c) and
    a bool flag ``ninf`` for rows with -inf logits (their 0 * (-inf) products need the safe path).
    """
    views = _row_views(logits)
    N = sum(v.shape[0] for v in views)
    dev = logits.device
    m_all = torch.empty(N, dtype=torch.float32, device=dev)
    logs_all = torch.empty(N, dtype=torch.float32, device=dev)
    c_all = torch.empty(N, dtype=torch.float32, device=dev) if entropy else None
    ninf_all = torch.zeros(N, dtype=torch.bool, device=dev) if entropy else None
    if N == 0:
        return m_all, logs_all, c_all, ninf_all
    b_s, b_e = _buffers(views, 2)
    with torch.no_grad():
        for r0, c in _chunks(views):
            r = c.shape[0]
            m = c.amax(-1).float()  # NaN propagates: checked once at the end
            m_all[r0 : r0 + r] = m
            mm = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1)
            s = _shifted(c, mm, b_s[:r])  # s = z - m <= 0
            e = torch.exp(s, out=b_e[:r])  # e = exp(s), e_max = 1
            S = e.sum(-1)  # S in [1, V]
            logs_all[r0 : r0 + r] = torch.log(S)
            if entropy:
                d = _rowdot(e, s)  # sum e s <= 0; NaN only from 0 * (-inf)
                bad = torch.isnan(d)
                if bool(bad.any()):
                    ninf_all[r0 : r0 + r] = bad  # type: ignore[index]
                    s.clamp_(min=_FMIN)  # -inf -> most negative float: e = 0 there, 0 * finite = 0
                    d = torch.where(bad, _rowdot(e, s), d)
                c_all[r0 : r0 + r] = -d / S  # type: ignore[index]
    _raise_bad_rows(m_all)
    return m_all, logs_all, c_all, ninf_all


# ----------------------------------------------------------------------------------------------------
# global entropy
# ----------------------------------------------------------------------------------------------------


class _GlobalEntropy(torch.autograd.Function):
    """H = log S + c (see module docstring), chunked; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        m, logs, c, ninf = _stats_pass(logits, entropy=True)
        ctx.save_for_backward(logits, m, logs, c, ninf)
        return (logs + c).view(logits.shape[:-1])  # H = log S - (sum e s) / S

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> Tensor:  # type: ignore[override]
        logits, m, logs, c, ninf = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat = grad.view(-1, logits.shape[-1])
        go = grad_h.reshape(-1).float()
        views = _row_views(logits)
        if gflat.shape[0] == 0:
            return grad
        b_s, b_p = _buffers(views, 2)
        ninf_cpu = ninf.cpu()
        for r0, ch in _chunks(views):
            r = ch.shape[0]
            sl = slice(r0, r0 + r)
            out = gflat[sl] if grad.dtype == torch.float32 else b_s[:r]
            s = _shifted(ch, m[sl].unsqueeze(-1), out)  # s = z - m
            if bool(ninf_cpu[sl].any()):
                s.clamp_(min=_FMIN)
            p = torch.exp(s, out=b_p[:r]).mul_((-go[sl] * torch.exp(-logs[sl])).unsqueeze(-1))  # -g pi = -g e / S
            s.add_(c[sl].unsqueeze(-1)).mul_(p)  # dH/dz_a = -pi_a (s_a + c) = -pi_a (log pi_a + H)
            if out.data_ptr() != gflat[sl].data_ptr():
                gflat[sl].copy_(s)
        return grad


def global_entropy(logits: Tensor) -> Tensor:
    """Entropy of the full softmax, ``H = -sum_a pi_a log pi_a``, per position.

    Args:
        logits: (..., V) float tensor, e.g. (B, T, V). -inf entries are masked tokens.

    Returns:
        (...) float32, in [0, log V]. Differentiable: dH/dz_a = -pi_a (log pi_a + H), which is positive for
        every tail token with log pi_a < -H (the global bonus pushes the whole tail up).
    """
    _check_logits(logits)
    return _GlobalEntropy.apply(logits)


# ----------------------------------------------------------------------------------------------------
# token log-probs, min-entropy, log-sum-exp
# ----------------------------------------------------------------------------------------------------


class _TokenLogprob(torch.autograd.Function):
    """log pi_t = z_t - logsumexp(z), chunked; d/dz = onehot(t) - pi (chunked in backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:  # type: ignore[override]
        m, logs, _, _ = _stats_pass(logits, entropy=False)
        lse = m + logs  # logsumexp(z) = m + log S
        zt = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float().reshape(-1)
        ctx.save_for_backward(logits, tokens, lse)
        return (zt - lse).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat = grad.view(-1, logits.shape[-1])
        go = grad_out.reshape(-1).float()
        if gflat.shape[0] == 0:
            return grad, None
        views = _row_views(logits)
        (b_p,) = _buffers(views, 1)
        for r0, ch in _chunks(views):
            r = ch.shape[0]
            sl = slice(r0, r0 + r)
            out = gflat[sl] if grad.dtype == torch.float32 else b_p[:r]
            p = _shifted(ch, lse[sl].unsqueeze(-1), out).exp_()  # pi = exp(z - lse)
            p.mul_(-go[sl].unsqueeze(-1))  # -g * pi
            if out.data_ptr() != gflat[sl].data_ptr():
                gflat[sl].copy_(p)
        # + g * onehot(t)
        gflat.scatter_add_(-1, tokens.reshape(-1, 1), grad_out.reshape(-1, 1).to(grad.dtype))
        return grad, None


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of the given tokens, ``log softmax(z)[token] = z_token - logsumexp(z)``.

    Memory-bounded: no (N, V) log-softmax copy is made in forward or backward (only the gradient itself).

    Args:
        logits: (..., V) float tensor, e.g. (B, T, V).
        tokens: (...) integer tensor of token ids in [0, V), e.g. (B, T).

    Returns:
        (...) float32, differentiable w.r.t. ``logits`` (gradient onehot(token) - pi).
    """
    V = _check_logits(logits)
    if not isinstance(tokens, Tensor) or tokens.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
    ):
        raise ValueError("tokens must be an integer tensor of shape logits.shape[:-1]")
    if tuple(tokens.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"tokens must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(tokens.shape)}"
        )
    tokens = tokens.long().to(logits.device)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(f"tokens must be in [0, {V - 1}] (V = logits.shape[-1]); got values outside")
    return _TokenLogprob.apply(logits, tokens)


def min_entropy(logits: Tensor) -> Tensor:
    """Min-entropy ``-log max_a pi_a`` per position: (..., V) -> (...) float32, differentiable.

    Its gradient is pi - onehot(argmax) on the whole vocabulary (the official code's K = 1 case of TRE).
    """
    _check_logits(logits)
    with torch.no_grad():
        top = logits.argmax(-1)
    return -token_logprobs(logits, top)


def _logsumexp(logits: Tensor) -> Tensor:
    """Chunked, checked logsumexp over the last dim, no grad: (..., V) -> (N,) float32."""
    m, logs, _, _ = _stats_pass(logits, entropy=False)
    return m + logs


# ----------------------------------------------------------------------------------------------------
# trust regions
# ----------------------------------------------------------------------------------------------------


class _LocalEntropy(torch.autograd.Function):
    """Entropy of softmax(v) restricted to ``keep`` along the last dim of a small (N, C) tensor.

    Same cancellation-free forms as the global entropy: H = log S + c and dH/dv_a = -q_a (s_a + c),
    exactly 0 outside keep.
    """

    @staticmethod
    def forward(ctx, v: Tensor, keep: Tensor) -> Tensor:  # type: ignore[override]
        m = torch.where(keep, v, -math.inf).amax(-1, keepdim=True)
        s = torch.where(keep, v - m, 0.0)  # s <= 0 inside, 0 outside (no -inf anywhere)
        e = torch.where(keep, torch.exp(s), 0.0)
        S = e.sum(-1, keepdim=True)
        q = e / S
        c = -(q * s).sum(-1, keepdim=True)  # c = -(sum e s) / S >= 0
        ctx.save_for_backward(q, s, c)
        return (torch.log(S) + c).squeeze(-1)

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        q, s, c = ctx.saved_tensors
        return -q * (s + c) * grad_h.unsqueeze(-1), None


def _flat_topk_idx(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values (float32, sorted descending) and indices as (N, k), no grad; checks each row's top."""
    with torch.no_grad():
        vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
    vals = vals.reshape(-1, k).float()
    idx = idx.reshape(-1, k)
    if vals.shape[0]:
        _raise_bad_rows(vals[:, 0])  # topk ranks NaN first, so NaN / +inf / all -inf all show in column 0
    return vals, idx


def _nucleus(
    logits: Tensor, p: float, max_candidates: int | None, lse: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Select the nucleus of mass ``p`` per row, no grad.

    Rank i (by probability, descending) is kept iff the mass strictly before it is < p; the first token
    always; tokens with -inf logits never. Only the top ``max_candidates`` tokens are searched (all of them
    are kept if their mass is < p); ``None`` searches as many as needed (growing the candidate set only for
    the rows that need it).

    Returns (idx (N, C) long, keep (N, C) bool, lse (N,) float32, probs (N, C) float64 of the candidates).
    """
    V = logits.shape[-1]
    if lse is None:
        lse = _logsumexp(logits)
    C = V if max_candidates is None else min(max_candidates, V)
    if max_candidates is None:
        C = min(V, 256)
    vals, idx = _flat_topk_idx(logits, C)
    with torch.no_grad():
        probs = torch.exp(vals.double() - lse.double().unsqueeze(-1))  # pi of the candidates, float64
        if max_candidates is None and C < V:
            # grow the candidates of rows whose top-C mass is still below p (exact, without a full sort)
            need = probs.sum(-1) < p
            flat = None
            while bool(need.any()) and C < V:
                C_new = min(V, 4 * C)
                rows = need.nonzero().squeeze(-1)
                if flat is None:
                    flat = logits.reshape(-1, V)
                v2, i2 = torch.topk(flat.index_select(0, rows), C_new, dim=-1, sorted=True)
                pad = C_new - C
                idx = torch.cat([idx, idx[:, :1].expand(-1, pad)], dim=-1)
                probs = torch.cat([probs, probs.new_zeros(probs.shape[0], pad)], dim=-1)
                idx[rows] = i2
                probs[rows] = torch.exp(v2.double() - lse.double()[rows].unsqueeze(-1))
                C = C_new
                need = torch.zeros_like(need)
                need[rows] = probs[rows].sum(-1) < p
        before = torch.cumsum(probs, -1) - probs  # mass strictly before rank i
        keep = (before < p) & (probs > 0)
        keep[:, 0] = True
    return idx, keep, lse, probs


def trust_region_entropy(
    logits: Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    rescale: bool = True,
    max_candidates: int | None = 256,
    vocab_size: int | None = None,
) -> Tensor:
    """Trust Region Entropy H_TRE (the paper's TRE-K / TRE-P), per position.

    The trust region A_TR is the ``top_k`` most likely tokens (TRE-K) or the nucleus of mass ``top_p`` (TRE-P:
    rank i is kept iff the mass strictly before it is < p; the first token always; only the top
    ``max_candidates`` tokens are searched, all of them if their mass is < p; ``None`` = no cap). With q the
    softmax renormalised on A_TR,

        H_TR  = -sum_{a in A_TR} q_a log q_a                       in [0, log |A_TR|]
        H_TRE = H_TR * log(V) / log(max(|A_TR|, 2))   (rescale)   in [0, log V], 0 where |A_TR| = 1

    with V = ``vocab_size`` or ``logits.shape[-1]``. ``top_k=1`` is the official special case: min-entropy
    ``-log max pi``, never rescaled (its gradient is not confined to the trust region).

    Args:
        logits: (..., V) float tensor, e.g. (B, T, V).
        top_k: K in [1, V] (exactly one of top_k / top_p).
        top_p: p in (0, 1].
        rescale: multiply by log V / log |A_TR| (official code) so one coefficient means the same as for H.
        max_candidates: TRE-P search cap (official: 256), an integer >= 1 or None. Ignored for TRE-K.
        vocab_size: V used in the rescale factor (the LM head width) if the logits were sliced; integer >= 2.

    Returns:
        (...) float32, differentiable; the gradient w.r.t. every logit outside A_TR is exactly zero.
    """
    V = _check_logits(logits)
    if (top_k is None) == (top_p is None):
        raise ValueError("give exactly one of top_k (an integer in [1, V]) or top_p (a float in (0, 1])")
    max_candidates = _check_max_candidates(max_candidates)
    if vocab_size is not None:
        vocab_size = _check_int(vocab_size, "vocab_size", 2)
    log_v = math.log(vocab_size if vocab_size is not None else V)
    shape = logits.shape[:-1]
    if top_k is not None:
        K = _check_int(top_k, "top_k", 1, V)
        if K == 1:
            return min_entropy(logits)
        vals, idx = _flat_topk_idx(logits, K)
        keep = vals > -math.inf
        n = None
    else:
        p = _check_p(top_p, "top_p")
        idx, keep, _, _ = _nucleus(logits, p, max_candidates)
        n = keep.sum(-1)
    # differentiable part: only the (N, C) selected logits;
    # gather's backward scatters their gradient into a zero (..., V) tensor
    v = logits.gather(-1, idx.view(*shape, idx.shape[-1])).float().reshape(idx.shape)
    h = _LocalEntropy.apply(v, keep)
    if rescale:
        if n is None:
            h = h * (log_v / math.log(K))
        else:
            h = h * (log_v / torch.log(n.clamp(min=2).float()))  # H_TR = 0 where |A_TR| = 1
    return h.view(shape)


# ----------------------------------------------------------------------------------------------------
# tail statistics (metrics)
# ----------------------------------------------------------------------------------------------------


def _mass_outside(logits: Tensor, lse: Tensor, idx: Tensor, keep: Tensor) -> Tensor:
    """sum of pi outside the kept candidates, summed directly (not 1 - mass inside): (N,) float32, no grad.

    Per chunk: e = exp(z - lse) (= pi), the kept candidates are zeroed in the scratch buffer and the rest
    is summed (in float64), so tails far below float32's 1e-7 resolution of "1 - mass inside" keep their
    relative accuracy.
    """
    views = _row_views(logits)
    N = lse.shape[0]
    out = torch.empty(N, dtype=torch.float64, device=logits.device)
    if N == 0:
        return out.float()
    (b,) = _buffers(views, 1)
    with torch.no_grad():
        for r0, c in _chunks(views):
            r = c.shape[0]
            sl = slice(r0, r0 + r)
            e = _shifted(c, lse[sl].unsqueeze(-1), b[:r]).exp_()  # pi in float32
            total = e.sum(-1, dtype=torch.float64)  # = 1 up to rounding
            ic = idx[sl]
            e.scatter_(-1, ic, torch.where(keep[sl], 0.0, e.gather(-1, ic)))  # drop the kept tokens
            out[sl] = e.sum(-1, dtype=torch.float64) / total
    return out.float()


def topk_mass(logits: Tensor, k: int) -> Tensor:
    """Probability mass of the k most likely tokens, ``sum_{a in top-k} pi_a``: (..., V) -> (...) float32.

    Differentiable (through the k selected logits and the global logsumexp). ``k=1`` is the top-1 probability.
    """
    V = _check_logits(logits)
    k = _check_int(k, "k", 1, V)
    with torch.no_grad():
        _, idx = _flat_topk_idx(logits, k)
    shape = logits.shape[:-1]
    v = logits.gather(-1, idx.view(*shape, k)).float()
    lse_k = torch.logsumexp(v, -1)
    if logits.requires_grad:
        lse = torch.logsumexp(logits.float(), -1) if V <= 4096 else _lse_autograd(logits)
    else:
        lse = _logsumexp(logits).view(shape)
    return torch.exp(lse_k - lse)


def _lse_autograd(logits: Tensor) -> Tensor:
    """Differentiable chunked logsumexp: lse = z_t - log pi_t for any token t (here the argmax)."""
    with torch.no_grad():
        top = logits.argmax(-1)
    zt = logits.gather(-1, top.unsqueeze(-1)).squeeze(-1).float()
    return zt - token_logprobs(logits, top)


def tail_mass(logits: Tensor, k: int) -> Tensor:
    """Mass outside the top-k, ``1 - topk_mass`` without cancellation: (..., V) -> (...) float32, no grad."""
    V = _check_logits(logits)
    k = _check_int(k, "k", 1, V)
    with torch.no_grad():
        lse = _logsumexp(logits)
        _, idx = _flat_topk_idx(logits, k)
        return _mass_outside(logits, lse, idx, torch.ones_like(idx, dtype=torch.bool)).view(logits.shape[:-1])


def nucleus_size(logits: Tensor, p: float, max_candidates: int | None = None) -> Tensor:
    """Number of tokens in the nucleus of mass p (TRE-P's |A_TR|): (..., V) -> (...) int64, no grad.

    Rank i is kept iff the mass strictly before it is < p (the token that crosses p is kept; the first
    always). ``max_candidates`` caps the search (TRE-P's official 256); None = exact.
    """
    _check_logits(logits)
    p = _check_p(p, "p")
    max_candidates = _check_max_candidates(max_candidates)
    with torch.no_grad():
        _, keep, _, _ = _nucleus(logits, p, max_candidates)
        return keep.sum(-1).view(logits.shape[:-1])


def nucleus_tail_mass(logits: Tensor, p: float, max_candidates: int | None = None) -> Tensor:
    """Mass outside the nucleus of mass p (see :func:`nucleus_size`): (..., V) -> (...) float32, no grad."""
    _check_logits(logits)
    p = _check_p(p, "p")
    max_candidates = _check_max_candidates(max_candidates)
    with torch.no_grad():
        idx, keep, lse, _ = _nucleus(logits, p, max_candidates)
        return _mass_outside(logits, lse, idx, keep).view(logits.shape[:-1])


def _pct_name(p: float) -> str:
    pct = p * 100
    return f"p{int(round(pct))}" if abs(pct - round(pct)) < 1e-9 else f"p{pct:g}"


def tail_metrics(
    logits: Tensor,
    mask: Tensor | None = None,
    *,
    ks: Sequence[int] = (1, 2, 10),
    p: float = 0.99,
    top_k: int = 2,
    rescale: bool = True,
    max_candidates: int | None = 256,
    chunk_rows: int = 64,
) -> dict[str, float]:
    """Masked means over valid positions of entropy and vocabulary-tail statistics, for logging (no grad).

    Args:
        logits: (B, T, V) (any (..., V) works) float tensor.
        mask: (B, T) float or bool, 1 for valid tokens; None = all valid.
        ks: top-k sizes; k = 1 gives "tail/top1_prob", k > 1 gives "tail/mass_outside_top{k}".
        p: nucleus mass for "entropy/tre_p", "tail/nucleus_size_p{100p}" and
        "tail/mass_outside_nucleus_p{100p}".
        top_k: K of "entropy/tre_k".
        rescale, max_candidates: as in :func:`trust_region_entropy` (the nucleus statistics use the same cap).
        chunk_rows: positions processed at once (bounds the memory).

    Returns:
        dict with "entropy/global", "entropy/tre_k", "entropy/tre_p", "tail/top1_prob",
        "tail/mass_outside_top2", "tail/mass_outside_top10", "tail/nucleus_size_p99",
        "tail/mass_outside_nucleus_p99" (for the defaults). All values are finite; with no valid position
        they are all 0.0.
    """
    V = _check_logits(logits)
    p = _check_p(p, "p")
    top_k = _check_int(top_k, "top_k", 1, V)
    ks = [_check_int(k, "ks", 1, V) for k in ks]
    chunk_rows = _check_int(chunk_rows, "chunk_rows", 1)
    lead = logits.shape[:-1]
    if mask is None:
        w = torch.ones(lead, dtype=torch.float32, device=logits.device)
    else:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(lead):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor of shape logits.shape[:-1] = {tuple(lead)}, got {got}")
        w = mask.to(device=logits.device, dtype=torch.float32)
    w = w.reshape(-1)
    pn = _pct_name(p)
    keys = ["entropy/global", "entropy/tre_k", "entropy/tre_p"]
    keys += ["tail/top1_prob" if k == 1 else f"tail/mass_outside_top{k}" for k in ks]
    keys += [f"tail/nucleus_size_{pn}", f"tail/mass_outside_nucleus_{pn}"]
    sums = dict.fromkeys(keys, 0.0)
    rows = (w != 0).nonzero().squeeze(-1)
    total_w = float(w[rows].sum()) if rows.numel() else 0.0
    if total_w == 0.0:
        return sums
    with torch.no_grad():
        flat = logits.detach().reshape(-1, V)
        for i in range(0, rows.numel(), chunk_rows):
            r = rows[i : i + chunk_rows]
            z = flat.index_select(0, r)  # (r, V) copy of one chunk of valid rows only
            wr = w[r]
            stats = {
                "entropy/global": global_entropy(z),
                "entropy/tre_k": trust_region_entropy(
                    z, top_k=top_k, rescale=rescale, vocab_size=V, max_candidates=max_candidates
                ),
            }
            lse = _logsumexp(z)
            idx, keep, _, probs = _nucleus(z, p, max_candidates, lse=lse)
            n = keep.sum(-1)
            vv = z.gather(-1, idx).float()
            h = _LocalEntropy.apply(vv, keep)
            if rescale:
                h = h * (math.log(V) / torch.log(n.clamp(min=2).float()))
            stats["entropy/tre_p"] = h
            for k in ks:
                if k == 1:
                    stats["tail/top1_prob"] = torch.exp(z.amax(-1).float() - lse)
                else:
                    _, ik = _flat_topk_idx(z, k)
                    stats[f"tail/mass_outside_top{k}"] = _mass_outside(
                        z, lse, ik, torch.ones_like(ik, dtype=torch.bool)
                    )
            stats[f"tail/nucleus_size_{pn}"] = n.float()
            stats[f"tail/mass_outside_nucleus_{pn}"] = _mass_outside(z, lse, idx, keep)
            for key, val in stats.items():
                sums[key] += float((val.float().reshape(-1) * wr).sum())
    return {key: val / total_w for key, val in sums.items()}
