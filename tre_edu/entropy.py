"""Entropies and tail statistics of next-token distributions, memory-bounded and accurate at any V.

Functions take logits ``z`` (..., V), work along the last dimension (``pi = softmax(z)``) and compute in float64
for float64 logits, else float32. PAPER.md has the formulas: H(pi) (global), H_TRE = H(q) log V / log |A_TR| with
q = pi renormalised on the trust region A_TR (TRE-K: the K largest logits; TRE-P: the nucleus of mass p; K = 1:
min-entropy -log max pi), top-k / nucleus masses, log pi_token, and :func:`tail_metrics` (their masked means).

Numerics. With ``s = z - max z <= 0``, ``e = exp(s)``, ``S = sum e >= 1`` every entropy is computed as

    H = log S - (sum_a e_a s_a) / S,    dH/dz_a = -pi_a (s_a - (sum_b e_b s_b) / S)

(both terms >= 0: no cancellation, unlike ``logsumexp(z) - sum(pi z)``); float32 error ~1e-6 at V = 151,936.
Masses that decide a cut (TRE-P) or are tiny (tails) are never ``1 - inside``: the candidates' e are float64 and
only the tail sum comes from the float32 pass, so the nucleus cut is the float64 one unless a mass-before lies
within ``2e-6 * (mass outside the candidates) + 1e-12`` of p.

Memory. Nothing of size (N, V) is allocated except the gradient: global passes run over chunks of rows (autograd
Functions that recompute each chunk in backward); trust regions only touch the top-K (or top-``max_candidates``)
logits. ``-inf`` logits (masked tokens) are valid; NaN, ``+inf`` or an all ``-inf`` row raise ``ValueError``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["global_entropy", "trust_region_entropy", "min_entropy", "topk_mass", "tail_mass", "nucleus_size"]
__all__ += ["token_logprobs", "tail_metrics", "tail_metric_keys", "tre_rescale"]

# Elements per chunk of rows (>= 1 row). One CPU thread: small, cache-resident chunks; several threads or a GPU:
# fewer, larger ops (per-op barriers / kernel launches dominate).
_CHUNK_ELEMS_CPU_1THREAD = 1 << 19
_CHUNK_ELEMS_CPU = 1 << 24
_CHUNK_ELEMS_GPU = 1 << 24
_SAFE_MIN = -1e4  # stand-in for -inf in s = z - max z: exp(-1e4) = 0 in float32 and float64, no 0 * (-inf)


# --- compiled row kernels (CPU) ---
# Large float32 / bf16 / fp16 CPU inputs (>= COMPILE_MIN_ELEMS logits) go through torch.compile'd kernels: one fused
# pass per reduction or gradient, no scratch buffers, sums accumulated in float64 (more accurate than the eager
# chunked passes, and 2-3x faster: benchmarks/bench_entropy.py). Compiling costs ~15-60 s once per process, hence
# the size threshold. TRE_EDU_COMPILE=0 (or a failed compile: no C++ compiler) keeps the eager passes.
COMPILE_MIN_ELEMS = 1 << 26
_COMPILE = {"enabled": os.environ.get("TRE_EDU_COMPILE", "1") != "0", "failed": False}
_KERNELS: dict[str, Callable] = {}


def _k_sum(z: Tensor, mm: Tensor) -> Tensor:  # S = sum exp(z - m), float64 accumulation
    return torch.exp(z.float() - mm).double().sum(-1).float()


def _k_sum_d(z: Tensor, mm: Tensor) -> tuple[Tensor, Tensor]:  # S and d = sum e s (0 where e = 0: -inf logits)
    s = z.float() - mm
    e = torch.exp(s)
    d = torch.where(e > 0, e * s, 0.0).double().sum(-1).float()
    return e.double().sum(-1).float(), d


def _k_tail(z: Tensor, mm: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:  # sum of e below thr, count of z == thr
    zf = z.float()
    below = torch.where(zf < thr, torch.exp(zf - mm), 0.0).double().sum(-1)
    return below, (zf == thr).sum(-1)


def _k_entropy_grad(z: Tensor, mm: Tensor, a: Tensor, ca: Tensor) -> Tensor:  # (a s + a c) e, 0 where e = 0
    s = z.float() - mm
    e = torch.exp(s)
    return torch.where(e > 0, (s * a + ca) * e, 0.0).to(z.dtype)


def _k_softmax_scaled(z: Tensor, lse: Tensor, go: Tensor) -> Tensor:  # -g pi, pi = exp(z - lse)
    return (torch.exp(z.float() - lse) * go).to(z.dtype)


def _flat2d(x: Tensor) -> Tensor | None:
    """``x`` as a (N, V) view if the compiled kernels apply to it, else None."""
    on = _COMPILE["enabled"] and not _COMPILE["failed"] and x.device.type == "cpu" and x.numel() >= COMPILE_MIN_ELEMS
    if not on or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _compiled(name: str, fn: Callable, *args: Tensor):
    """Run kernel ``fn`` compiled (dynamic shapes); None (eager fallback) if compiling fails."""
    try:
        if name not in _KERNELS:
            _KERNELS[name] = torch.compile(fn, dynamic=True)
        with torch.no_grad():
            return _KERNELS[name](*args)
    except Exception as err:  # noqa: BLE001 - no compiler, unsupported platform: the eager passes still work
        _COMPILE["failed"] = True
        warnings.warn(f"tre_edu.entropy: torch.compile failed ({type(err).__name__}: {err}); using eager passes",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return None


# --- validation and chunking helpers ---
def _check_logits(logits: Tensor, name: str = "logits") -> int:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (..., V), got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32, float64, bf16, fp16), got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    return logits.shape[-1]


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value
    if not ok or (high is not None and value > high):
        allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _check_p(p: object, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < float(p) <= 1.0):
        raise ValueError(f"{name} must be a float in (0, 1], got {p!r}")
    return float(p)


def _check_max_candidates(max_candidates: object) -> int | None:
    return None if max_candidates is None else _check_int(max_candidates, "max_candidates", 1)


def _raise_bad_rows(m: Tensor, name: str = "logits") -> None:
    """``m`` holds per-row maxima (NaN propagates through max); raise a clear error if any row is unusable."""
    if bool(torch.isnan(m).any()):
        raise ValueError(f"{name} contain NaN; allowed values are finite numbers or -inf (masked tokens)")
    if bool((m == math.inf).any()):
        raise ValueError(f"{name} contain +inf; allowed values are finite numbers or -inf (masked tokens)")
    if bool((m == -math.inf).any()):
        raise ValueError(f"{name} have a row that is entirely -inf; at least one token per position must be finite")


def _cdtype(x: Tensor) -> torch.dtype:  # the compute dtype: float64 for float64 logits, float32 for the others
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_views(x: Tensor) -> list[Tensor]:
    """2-D views (r, V) covering the rows of ``x`` in order, no copy (a strided ``x`` is split until it views)."""
    V = x.shape[-1]
    if x.dim() <= 2:
        return [x.reshape(1, V) if x.dim() == 1 else x]
    try:
        return [x.view(-1, V)]
    except RuntimeError:
        return [v for i in range(x.shape[0]) for v in _row_views(x[i])]


def _chunk_rows(x: Tensor) -> int:
    cpu = _CHUNK_ELEMS_CPU_1THREAD if torch.get_num_threads() == 1 else _CHUNK_ELEMS_CPU
    return max(1, (_CHUNK_ELEMS_GPU if x.is_cuda else cpu) // max(1, x.shape[-1]))


def _chunks(views: list[Tensor]) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, chunk)`` with ``chunk`` a (r, V) view of consecutive rows and ``rows`` their slice."""
    offset = 0
    for v in views:
        rows = _chunk_rows(v)
        for r0 in range(0, v.shape[0], rows):
            c = v[r0 : r0 + rows]
            yield slice(offset + r0, offset + r0 + c.shape[0]), c
        offset += v.shape[0]


def _buffers(views: list[Tensor], n: int, dtype: torch.dtype) -> list[Tensor]:
    """``n`` scratch buffers of one chunk's size (re-used by every chunk)."""
    x = views[0]
    rows = min(_chunk_rows(x), max(v.shape[0] for v in views))
    return [torch.empty(rows, x.shape[-1], dtype=dtype, device=x.device) for _ in range(n)]


def _row_pass(logits: Tensor, *, entropy: bool = False, idx: Tensor | None = None, m: Tensor | None = None) -> tuple:
    """One chunked no-grad pass, per row: (m = max z (or given), S = sum e; with ``entropy`` d = sum e s and a
    has-(-inf) flag; with ``idx`` (N, C) T = sum of e outside idx (summed directly)), None where not computed."""
    flat = _flat2d(logits)
    if flat is not None:
        out = _row_pass_compiled(flat, entropy=entropy, idx=idx, m=m)
        if out is not None:
            return out
    views = _row_views(logits)
    N = sum(v.shape[0] for v in views)
    dt, dev = _cdtype(logits), logits.device
    check = m is None
    m_all = torch.empty(N, dtype=dt, device=dev) if m is None else m.to(dt)
    S_all = torch.empty(N, dtype=dt, device=dev) if entropy or idx is None else None
    d_all = torch.empty(N, dtype=dt, device=dev) if entropy else None
    ninf_all = torch.zeros(N, dtype=torch.bool, device=dev) if entropy else None
    T_all = torch.empty(N, dtype=dt, device=dev) if idx is not None else None
    if N == 0:
        return m_all, S_all, d_all, ninf_all, T_all
    b_s, b_e = _buffers(views, 2, dt)
    with torch.no_grad():
        for sl, c in _chunks(views):
            r = c.shape[0]
            if check:
                m_all[sl] = c.amax(-1)  # NaN propagates: checked once at the end
            mm = torch.where(torch.isfinite(m_all[sl]), m_all[sl], 0.0).unsqueeze(-1)
            s = torch.sub(c, mm, out=b_s[:r])  # s = z - m <= 0
            e = torch.exp(s, out=b_e[:r])  # e_max = 1
            if S_all is not None:
                S_all[sl] = e.sum(-1)
            if entropy:
                d_all[sl], ninf_all[sl] = _sum_es(c, mm, s, e)  # type: ignore[index]
            if idx is not None:
                T_all[sl] = e.scatter_(-1, idx[sl], 0.0).sum(-1)  # type: ignore[index]
    if check:
        _raise_bad_rows(m_all)
    return m_all, S_all, d_all, ninf_all, T_all


def _sum_es(z: Tensor, mm: Tensor, s: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """d = sum e s per row of a chunk (``s`` is overwritten) and its rows with a -inf logit, where 0 * (-inf) = NaN:
    those are recomputed with s clamped to _SAFE_MIN (``z``: the chunk, ``mm``: its (r, 1) maxima)."""
    d = s.mul_(e).sum(-1)
    bad = torch.isnan(d)
    if bool(bad.any()):
        s2 = torch.sub(z[bad], mm[bad]).clamp_(min=_SAFE_MIN)
        d[bad] = (s2.exp() * s2).sum(-1)
    return d, bad


def _row_pass_compiled(z: Tensor, *, entropy: bool, idx: Tensor | None, m: Tensor | None) -> tuple | None:
    """:func:`_row_pass` through the compiled kernels (same outputs; the has-(-inf) flag is None: the compiled
    gradient handles -inf itself). T = the e below the smallest candidate + the ties with it outside ``idx``."""
    check = m is None
    with torch.no_grad():
        m = z.amax(-1).float() if m is None else m.float()
    if check:
        _raise_bad_rows(m)
    mm = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1)
    S = d = T = None
    if entropy or idx is None:
        res = _compiled("sum_d", _k_sum_d, z, mm) if entropy else _compiled("sum", _k_sum, z, mm)
        if res is None:
            return None
        S, d = res if entropy else (res, None)
    if idx is not None:
        with torch.no_grad():
            cand = z.gather(-1, idx).float()
            thr = cand.amin(-1, keepdim=True)
            n_in = (cand == thr).sum(-1)
        res = _compiled("tail", _k_tail, z, mm, thr)
        if res is None:
            return None
        below, n_eq = res
        e_thr = torch.exp((thr - mm).double()).squeeze(-1)
        T = (below + (n_eq - n_in).double() * torch.where(thr.squeeze(-1) > -math.inf, e_thr, 0.0)).float()
    return m, S, d, None, T


# --- global entropy ---
class _GlobalEntropy(torch.autograd.Function):
    """H = log S + c with c = -(sum e s) / S (see module docstring), chunked; backward recomputes each chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor) -> Tensor:  # type: ignore[override]
        m, S, d, ninf, _ = _row_pass(logits, entropy=True)
        c = -d / S  # type: ignore[operator]
        ctx.save_for_backward(logits, m, S, c, ninf)
        return (torch.log(S) + c).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> Tensor:  # type: ignore[override]
        logits, m, S, c, ninf = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat = grad.view(-1, logits.shape[-1])
        if gflat.shape[0] == 0:
            return grad
        dt = m.dtype
        a = -grad_h.reshape(-1).to(dt) / S  # dH/dz_a * g = a e_a (s_a + c) with a = -g / S
        ca = (c * a).unsqueeze(-1)
        a = a.unsqueeze(-1)
        flat = _flat2d(logits)
        if flat is not None:
            mm = torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1)
            g = _compiled("entropy_grad", _k_entropy_grad, flat, mm, a, ca)
            if g is not None:
                return g.view(logits.shape)
        if ninf is None:  # forward went through the compiled kernels: clamp every chunk
            ninf = torch.ones_like(S, dtype=torch.bool)
        views = _row_views(logits)
        b_e, *b_s = _buffers(views, 1 if grad.dtype == dt else 2, dt)
        ninf_cpu = ninf.cpu()
        for sl, ch in _chunks(views):
            r = ch.shape[0]
            out = gflat[sl] if grad.dtype == dt else b_s[0][:r]
            s = torch.sub(ch, m[sl].unsqueeze(-1), out=out)
            if bool(ninf_cpu[sl].any()):
                s.clamp_(min=_SAFE_MIN)
            e = torch.exp(s, out=b_e[:r])
            torch.addcmul(ca[sl], s, a[sl], out=s).mul_(e)  # (a s + a c) e
            if out.data_ptr() != gflat[sl].data_ptr():
                gflat[sl].copy_(s)
        return grad


def global_entropy(logits: Tensor) -> Tensor:
    """``H = -sum_a pi_a log pi_a`` per position, in [0, log V]; dH/dz_a = -pi_a (log pi_a + H) is > 0 for every
    tail token with log pi_a < -H (the global bonus lifts the whole tail)."""
    _check_logits(logits)
    return _GlobalEntropy.apply(logits)


# --- token log-probs, min-entropy, log-sum-exp ---
class _TokenLogprob(torch.autograd.Function):
    """log pi_t = z_t - logsumexp(z), chunked; d/dz = onehot(t) - pi (chunked in backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:  # type: ignore[override]
        lse = _logsumexp(logits)
        zt = logits.gather(-1, tokens.unsqueeze(-1)).reshape(-1).to(lse.dtype)
        ctx.save_for_backward(logits, tokens, lse)
        return (zt - lse).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, tokens, lse = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        gflat = grad.view(-1, logits.shape[-1])
        go = -grad_out.reshape(-1, 1).to(lse.dtype)
        if gflat.shape[0] == 0:
            return grad, None
        flat = _flat2d(logits)
        g = None if flat is None else _compiled("softmax_scaled", _k_softmax_scaled, flat, lse.unsqueeze(-1), go)
        if g is not None:
            grad, gflat = g.view(logits.shape), g
        else:
            views = _row_views(logits)
            (b_p,) = _buffers(views, 1, lse.dtype)
            for sl, ch in _chunks(views):
                out = gflat[sl] if grad.dtype == lse.dtype else b_p[: ch.shape[0]]
                torch.sub(ch, lse[sl].unsqueeze(-1), out=out).exp_().mul_(go[sl])  # -g pi, pi = exp(z - lse)
                if out.data_ptr() != gflat[sl].data_ptr():
                    gflat[sl].copy_(out)
        gflat.scatter_add_(-1, tokens.reshape(-1, 1), grad_out.reshape(-1, 1).to(grad.dtype))  # + g onehot(t)
        return grad, None


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log pi_token = z_token - logsumexp(z)`` for ``tokens`` (...) in [0, V); gradient onehot(token) - pi. No
    (N, V) log-softmax copy is made in forward or backward (only the gradient itself)."""
    V = _check_logits(logits)
    if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError("tokens must be an integer tensor of shape logits.shape[:-1]")
    if (lead := tuple(logits.shape[:-1])) != tuple(tokens.shape):
        raise ValueError(f"tokens must have shape logits.shape[:-1] = {lead}, got {tuple(tokens.shape)}")
    tokens = tokens.long().to(logits.device)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(f"tokens must be in [0, {V - 1}] (V = logits.shape[-1]); got values outside")
    return _TokenLogprob.apply(logits, tokens)


def min_entropy(logits: Tensor) -> Tensor:
    """Min-entropy ``-log max_a pi_a``; gradient pi - onehot(argmax) on the whole vocabulary (TRE's K = 1)."""
    _check_logits(logits)
    with torch.no_grad():
        top = logits.argmax(-1)
    return -token_logprobs(logits, top)


def _logsumexp(logits: Tensor) -> Tensor:  # chunked, checked, no grad: (..., V) -> (N,) in the compute dtype
    m, S, _, _, _ = _row_pass(logits)
    return m + torch.log(S)


# --- trust regions ---
def _local_entropy(v: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entropy of softmax(v) restricted to ``keep`` (small (N, C)): H = log S + c, and the (q, s, c) of its gradient
    dH/dv_a = -q_a (s_a + c), 0 outside keep."""
    m = torch.where(keep, v, -math.inf).amax(-1, keepdim=True)
    s = torch.where(keep, v - m, 0.0)  # s <= 0 inside, 0 outside (no -inf anywhere)
    e = torch.where(keep, torch.exp(s), 0.0)
    S = e.sum(-1, keepdim=True)
    q = e / S
    c = -(q * s).sum(-1, keepdim=True)  # c = -(sum e s) / S >= 0
    return (torch.log(S) + c).squeeze(-1), q, s, c


class _LocalEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, keep: Tensor) -> Tensor:  # type: ignore[override]
        h, q, s, c = _local_entropy(v, keep)
        ctx.save_for_backward(q, s, c)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        q, s, c = ctx.saved_tensors
        return -q * (s + c) * grad_h.unsqueeze(-1), None


def _flat_topk_idx(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values (in the logits' dtype, sorted descending) and indices as (N, k), no grad; checks each row."""
    with torch.no_grad():
        vals, idx = torch.topk(logits, k, dim=-1, sorted=True)
    vals, idx = vals.reshape(-1, k), idx.reshape(-1, k)
    if vals.shape[0]:
        _raise_bad_rows(vals[:, 0])  # topk ranks NaN first, so NaN / +inf / all -inf all show in column 0
    return vals, idx


def _head(logits: Tensor, vals: Tensor, idx: Tensor, T: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (e = exp(z - max z) of the candidates ``idx`` (N, C), S = sum e + the float32 tail sum T of e
    outside them (given, or summed here), out = T / S), no grad: e / S is exact up to T's relative error (~eps
    log2 V) x the tail mass."""
    v = vals.double()
    e = torch.exp(v - v[:, :1])
    if T is None:
        T = _row_pass(logits, idx=idx, m=vals[:, 0])[4]
    S = e.sum(-1) + T.double()  # type: ignore[union-attr]
    return e, S, T.double() / S  # type: ignore[union-attr]


def _nucleus(
    logits: Tensor, p: float, max_candidates: int | None, head: tuple[Tensor, ...] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The nucleus of mass ``p`` per row, no grad: rank i is kept iff the mass strictly before it is < p (the
    first always, -inf never), among the top ``max_candidates`` (None: grown per row until enough). ``head`` =
    (vals, idx, e, S, out) if already computed. Returns idx, keep (N, C), float64 probs (N, C) and out (N,) =
    the mass outside the candidates."""
    V = logits.shape[-1]
    if head is None:
        vals, idx = _flat_topk_idx(logits, min(V, 256 if max_candidates is None else max_candidates))
        e, S, out = _head(logits, vals, idx)
    else:
        vals, idx, e, S, out = head
    C = idx.shape[-1]
    pS = p * S  # compare unnormalised: mass before rank i < p  <=>  sum_{j<i} e_j < p S
    need = e.sum(-1) < pS if max_candidates is None and C < V else None
    while need is not None and bool(need.any()) and C < V:
        # grow the candidates of rows whose top-C mass is still below p (exact, without a full sort)
        C_new, rows = min(V, 4 * C), need.nonzero().squeeze(-1)
        sub = logits.reshape(-1, V).index_select(0, rows)
        v2, i2 = torch.topk(sub, C_new, dim=-1, sorted=True)
        e2, _, out2 = _head(sub, v2, i2)  # S of these rows is unchanged
        idx = torch.cat([idx, idx[:, :1].expand(-1, C_new - C)], dim=-1)
        e = torch.cat([e, e.new_zeros(e.shape[0], C_new - C)], dim=-1)
        idx[rows], e[rows], out[rows], C = i2, e2, out2, C_new
        need = torch.zeros_like(need)
        need[rows] = e[rows].sum(-1) < pS[rows]
    before = torch.cumsum(e, -1) - e  # unnormalised mass strictly before rank i (exact for equal e)
    keep = (before < pS.unsqueeze(-1)) & (e > 0)
    keep[:, 0] = True
    probs = e / S.unsqueeze(-1)
    return idx, keep, probs, out


def tre_rescale(
    vocab_size: int,
    *,
    top_k: int | None = None,
    nucleus_size: int | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> float | Tensor:
    """TRE's rescale factor ``log V / log max(|A_TR|, 2)`` (PAPER.md), the one place it is computed.

    TRE-K: ``top_k`` = K, and K = 1 (min-entropy) is never rescaled (1.0). TRE-P: ``nucleus_size`` = |A_TR|, an int
    (a float result) or an integer tensor of per-position sizes (a tensor of ``dtype``)."""
    V = _check_int(vocab_size, "vocab_size", 2)
    if (top_k is None) == (nucleus_size is None):
        raise ValueError("give exactly one of top_k (an integer >= 1) or nucleus_size (an integer >= 1 or a tensor)")
    log_v = math.log(V)
    if top_k is not None:
        K = _check_int(top_k, "top_k", 1)
        return 1.0 if K == 1 else log_v / math.log(K)
    if isinstance(nucleus_size, Tensor):
        return log_v / torch.log(nucleus_size.clamp(min=2).to(dtype))
    return log_v / math.log(max(_check_int(nucleus_size, "nucleus_size", 1), 2))


def trust_region_entropy(
    logits: Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    rescale: bool = True,
    max_candidates: int | None = 256,
    vocab_size: int | None = None,
) -> Tensor:
    """Trust Region Entropy (TRE-K: A_TR = the ``top_k`` most likely tokens; TRE-P: the nucleus of mass ``top_p``
    among the top ``max_candidates``, None = no cap), per position, with q = pi renormalised on A_TR:

        H_TR  = -sum_{a in A_TR} q_a log q_a                       in [0, log |A_TR|]
        H_TRE = H_TR * log(V) / log(max(|A_TR|, 2))   (rescale)   in [0, log V]

    V = ``vocab_size`` (the LM head width, if the logits were sliced) or ``logits.shape[-1]``. ``top_k=1`` is
    min-entropy, never rescaled. The gradient outside A_TR is exactly zero."""
    V = _check_logits(logits)
    if (top_k is None) == (top_p is None):
        raise ValueError("give exactly one of top_k (an integer in [1, V]) or top_p (a float in (0, 1])")
    max_candidates = _check_max_candidates(max_candidates)
    width = V if vocab_size is None else _check_int(vocab_size, "vocab_size", 2)
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
    # differentiable part: the (N, C) selected logits (gather's backward scatters into a zero (..., V) tensor)
    v = logits.gather(-1, idx.view(*shape, idx.shape[-1])).to(_cdtype(logits)).reshape(idx.shape)
    h = _LocalEntropy.apply(v, keep)
    if rescale and width >= 2:  # V = 1: the only region is {the token}, H_TR = 0
        h = h * (tre_rescale(width, top_k=K) if n is None else tre_rescale(width, nucleus_size=n, dtype=h.dtype))
    return h.view(shape)


# --- tail statistics (metrics) ---
def topk_mass(logits: Tensor, k: int) -> Tensor:
    """Mass of the k most likely tokens, ``sum_{a in top-k} pi_a``, differentiable (k = 1: the top-1 prob)."""
    V = _check_logits(logits)
    k = _check_int(k, "k", 1, V)
    _, idx = _flat_topk_idx(logits, k)  # no grad
    shape = logits.shape[:-1]
    v = logits.gather(-1, idx.view(*shape, k)).to(_cdtype(logits))
    lse_k = torch.logsumexp(v, -1)
    if logits.requires_grad:
        lse = torch.logsumexp(logits.to(v.dtype), -1) if V <= 4096 else _lse_autograd(logits)
    else:
        lse = _logsumexp(logits).view(shape)
    return torch.exp(lse_k - lse)


def _lse_autograd(logits: Tensor) -> Tensor:
    """Differentiable chunked logsumexp: lse = z_t - log pi_t for any token t (here the argmax)."""
    with torch.no_grad():
        top = logits.argmax(-1)
    lp = token_logprobs(logits, top)
    return logits.gather(-1, top.unsqueeze(-1)).squeeze(-1).to(lp.dtype) - lp


def tail_mass(logits: Tensor, k: int) -> Tensor:
    """Mass outside the top-k, ``1 - topk_mass`` summed directly (no cancellation): (..., V) -> (...), no grad."""
    V = _check_logits(logits)
    k = _check_int(k, "k", 1, V)
    with torch.no_grad():
        vals, idx = _flat_topk_idx(logits, k)
        return _head(logits, vals, idx)[2].to(_cdtype(logits)).view(logits.shape[:-1])


def nucleus_size(logits: Tensor, p: float, max_candidates: int | None = None) -> Tensor:
    """|nucleus of mass p| (TRE-P's |A_TR|, see :func:`_nucleus`), int64, no grad; ``max_candidates`` None = exact."""
    _check_logits(logits)
    p, max_candidates = _check_p(p, "p"), _check_max_candidates(max_candidates)
    with torch.no_grad():
        return _nucleus(logits, p, max_candidates)[1].sum(-1).view(logits.shape[:-1])


def _metric_name_p(p: float) -> str:
    pct = p * 100
    return f"p{int(round(pct))}" if abs(pct - round(pct)) < 1e-9 else f"p{pct:g}"


def tail_metric_keys(ks: Sequence[int] = (1, 2, 10), p: float = 0.99) -> list[str]:
    """The keys of :func:`tail_metrics` (and of the head's metrics), in order."""
    pn = _metric_name_p(p)
    keys = ["entropy/global", "entropy/tre_k", "entropy/tre_p"]
    keys += ["tail/top1_prob" if k == 1 else f"tail/mass_outside_top{k}" for k in ks]
    return keys + [f"tail/nucleus_size_{pn}", f"tail/mass_outside_nucleus_{pn}"]


def _tail_rows(
    z: Tensor, *, ks: Sequence[int], p: float, top_k: int, rescale: bool, max_candidates: int | None, vocab_size: int
) -> Tensor:
    """Per-row tail statistics of the rows ``z`` (r, V) (checked arguments), no grad: a float64 (len(keys), r)
    tensor in the order of :func:`tail_metric_keys`. One top-C search and one pass over the rows."""
    V = z.shape[-1]
    C = min(V, max([*ks, top_k, 256 if max_candidates is None else max_candidates]))
    Cp = min(V, 256 if max_candidates is None else max_candidates)
    vals, idx = _flat_topk_idx(z, C)
    _, S, d, _, T = _row_pass(z, entropy=True, idx=idx, m=vals[:, 0])
    e = torch.exp(vals.double() - vals[:, :1].double())  # the candidates' e = exp(z - max z), float64
    T = T.double()  # type: ignore[union-attr]
    S64 = e.sum(-1) + T
    # outside[:, k] = mass outside the top-k, summed directly (smallest terms first)
    outside = (torch.cat([e.flip(-1).cumsum(-1).flip(-1), e[:, :1] * 0], -1) + T.unsqueeze(-1)) / S64[:, None]
    head = (vals[:, :Cp], idx[:, :Cp], e[:, :Cp], S64, outside[:, Cp])
    idx_n, keep, probs, out = _nucleus(z, p, max_candidates, head=head)
    n = keep.sum(-1)
    stats = [torch.log(S) - d / S]  # type: ignore[operator]
    if top_k == 1:
        stats.append(torch.log(S64))  # min-entropy -log max pi
    else:
        vk = vals[:, :top_k].double()
        hk = _LocalEntropy.apply(vk, vk > -math.inf)
        stats.append(hk * tre_rescale(vocab_size, top_k=top_k) if rescale and vocab_size >= 2 else hk)
    hp = _LocalEntropy.apply(z.gather(-1, idx_n).double(), keep)
    rescale_p = rescale and vocab_size >= 2
    stats.append(hp * tre_rescale(vocab_size, nucleus_size=n, dtype=torch.float64) if rescale_p else hp)
    stats += [1.0 / S64 if k == 1 else outside[:, k] for k in ks]
    stats += [n, out + (probs * ~keep).sum(-1)]
    return torch.stack([x.double() for x in stats])


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
    vocab_size: int | None = None,
) -> dict[str, float]:
    """Means over the positions where ``mask`` (logits.shape[:-1], None = all) is nonzero, weighted by it, of
    "entropy/global", "entropy/tre_k" (K = ``top_k``), "entropy/tre_p", "tail/top1_prob" (k = 1 in ``ks``),
    "tail/mass_outside_top{k}", "tail/nucleus_size_p{100p}", "tail/mass_outside_nucleus_p{100p}"; all 0.0 without
    a valid position. The TRE rows use :func:`tre_rescale` with V = ``vocab_size`` or the logits' width. No grad;
    per chunk of ``chunk_rows`` valid rows one top-C search and one pass over the rows."""
    V = _check_logits(logits)
    ks = [_check_int(k, "ks", 1, V) for k in ks]
    width = V if vocab_size is None else _check_int(vocab_size, "vocab_size", 2)
    p, top_k, max_candidates = _check_p(p, "p"), _check_int(top_k, "top_k", 1, V), _check_max_candidates(max_candidates)
    chunk_rows = _check_int(chunk_rows, "chunk_rows", 1)
    lead = logits.shape[:-1]
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(lead)):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of shape logits.shape[:-1] = {tuple(lead)}, got {got}")
    w = torch.ones(lead, dtype=torch.float64, device=logits.device) if mask is None else mask
    w = w.to(device=logits.device, dtype=torch.float64).reshape(-1)
    keys = tail_metric_keys(ks, p)
    rows = (w != 0).nonzero().squeeze(-1)
    total_w = float(w[rows].sum()) if rows.numel() else 0.0
    if total_w == 0.0:
        return dict.fromkeys(keys, 0.0)
    sums = torch.zeros(len(keys), dtype=torch.float64, device=logits.device)
    opts = dict(ks=ks, p=p, top_k=top_k, rescale=rescale, max_candidates=max_candidates, vocab_size=width)
    with torch.no_grad():
        flat = logits.detach().reshape(-1, V)  # a view unless the logits are strided
        for i in range(0, rows.numel(), chunk_rows):
            r = rows[i : i + chunk_rows]
            sums += _tail_rows(flat.index_select(0, r), **opts) @ w[r]  # one chunk of valid rows, in its dtype
    return {key: float(val) / total_w for key, val in zip(keys, sums, strict=True)}
