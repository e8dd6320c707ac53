"""The memory-lean LM head: per-token statistics of ``softmax((hidden @ weight.T + bias) / T)`` without the logits.

PPO needs, per response token, a few numbers of the next-token distribution (the taken token's log-prob, maybe the
global or trust-region entropy, the tail metrics without gradient); a micro-batch's ``N x V`` logits (4 x 8,192
tokens x 152,064 = 19 GB in float32 for Qwen2.5-7B on MATH) are never needed whole. :func:`token_statistics` forms
each chunk of tokens' logits, reduces them and drops them; backward recomputes each chunk, forms the logits' gradient
in place, then ``d hidden = dz @ W``, ``d W += dz.T @ h`` (memory: a few chunk buffers, :func:`head_buffer_bytes`;
cost: one more matmul). The results are :mod:`tre_edu.entropy`'s exactly (the same operations on the same chunk of
logits); :func:`statistics_from_logits` computes them from materialised logits (the head off; the tests' reference).
The matmuls run in the weight's dtype, or the autocast dtype (as an ``nn.Linear``); the logits are divided by T in
it, then converted to the compute dtype; the weight's gradient is accumulated in float32. :class:`LeanHead` puts the
head inside a model, where FSDP has the weight whole.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tre_edu import entropy as ent

__all__ = ["LeanHead", "StatsRequest", "TokenStats", "default_chunk_tokens", "find_lean_head", "head_buffer_bytes"]
__all__ += ["install_lean_head", "lean_head_exact", "statistics_from_logits", "token_statistics"]

# Elements (tokens x V) per chunk of the head. CPU: 64 MiB float32 buffers; GPU: 256 MiB (fewer, larger kernels).
CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 26}
# Vocabulary columns per matmul call of a chunk's logits on CPU (measured: 110 x 3,584 @ 3,584 x 152,064, 1 thread,
# 12.0 ms / token in blocks of 1,024 columns, 14.6 ms in one call; a GPU makes one call).
CPU_MATMUL_COLUMNS = 1024


@dataclass(frozen=True)
class StatsRequest:
    """Which per-token statistics of the next-token distribution a consumer needs (log-probs always)."""

    entropy: bool = False  # global entropy H(pi) per token, differentiable
    tre: bool = False  # trust-region entropy H_TRE per token, differentiable
    top_k: int | None = None  # trust region of `tre`: exactly one of top_k / top_p when tre=True
    top_p: float | None = None
    rescale: bool = True
    max_candidates: int | None = 256
    metrics: bool = False  # tail metrics, no grad: the keys and meaning of entropy.tail_metrics
    metrics_top_k: int = 2  # tail_metrics(top_k=...)
    metrics_p: float = 0.99  # tail_metrics(p=...)
    metrics_ks: tuple[int, ...] = (1, 2, 10)  # tail_metrics(ks=...)

    def __post_init__(self) -> None:
        for name in ("entropy", "tre", "rescale", "metrics"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StatsRequest.{name} must be True or False, got {getattr(self, name)!r}")
        if self.tre and (self.top_k is None) == (self.top_p is None):
            raise ValueError("StatsRequest with tre=True needs exactly one of top_k (an integer >= 1) or top_p (a "
                             "float in (0, 1])")  # fmt: skip
        if self.tre and self.top_k is not None:
            ent._check_int(self.top_k, "StatsRequest.top_k", 1)
        elif self.tre:
            ent._check_p(self.top_p, "StatsRequest.top_p")
        if self.max_candidates is not None:
            ent._check_int(self.max_candidates, "StatsRequest.max_candidates", 1)
        ent._check_int(self.metrics_top_k, "StatsRequest.metrics_top_k", 1)
        ent._check_p(self.metrics_p, "StatsRequest.metrics_p")
        if not isinstance(self.metrics_ks, tuple) or not self.metrics_ks:
            raise ValueError(f"StatsRequest.metrics_ks must be a non-empty tuple of integers >= 1, got "
                             f"{self.metrics_ks!r}")  # fmt: skip
        for k in self.metrics_ks:
            ent._check_int(k, "StatsRequest.metrics_ks", 1)

    @property
    def channels(self) -> tuple[str, ...]:
        """The differentiable per-token statistics, in the order :class:`LeanHead` packs them."""
        return ("logprobs",) + (("entropy",) if self.entropy else ()) + (("tre",) if self.tre else ())

    def metric_keys(self) -> list[str]:
        return ent.tail_metric_keys(self.metrics_ks, self.metrics_p)


@dataclass
class TokenStats:
    """Per-token statistics (shape = the targets' shape, e.g. (B, R)); float32 (float64 for float64 inputs)."""

    logprobs: Tensor  # log softmax(z/T)[target], differentiable
    entropy: Tensor | None = None
    tre: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # masked means (weights = mask), {} unless metrics
    metrics_weight: float = 0.0  # the sum of the weights behind `metrics` (to combine micro-batches / processes)


# --------------------------------------------------------------------------------------------- checks / sizes
def default_chunk_tokens(vocab: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk of the head: ``CHUNK_ELEMS[device type] // V`` (>= 1)."""
    kind = torch.device(device).type
    return max(1, CHUNK_ELEMS.get(kind, CHUNK_ELEMS["cuda"]) // max(1, int(vocab)))


def head_buffer_bytes(tokens: int, vocab: int, request: StatsRequest, *, matmul_bytes: int = 4) -> int:
    """Peak bytes of the head's chunk buffers (allocated once per call) for ``tokens`` tokens per chunk, the larger
    of forward: the logits in the matmul dtype (if not float32) + float32 logits, s = z - max, e = exp s + (metrics)
    the tail pass's two row buffers (<= 2^24 elements each); backward: the matmul-dtype buffer, float32 dz and e."""
    elems = tokens * vocab
    low = matmul_bytes if matmul_bytes != 4 else 0
    fwd = elems * (low + 3 * 4) + (2 * min(elems, 1 << 24) * 4 if request.metrics else 0)
    bwd = elems * (low + 2 * 4)
    return max(fwd, bwd)


def _check_request(request: object) -> StatsRequest:
    if request is None:
        return StatsRequest()
    if not isinstance(request, StatsRequest):
        raise ValueError(f"request must be a tre_edu.head.StatsRequest or None, got {type(request).__name__}")
    return request


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_inputs(
    request: StatsRequest, targets: object, weights: object, shape: tuple[int, ...], V: int
) -> tuple[Tensor, Tensor | None]:
    """``targets`` (int64 token ids) and ``weights`` (the metrics' mask or None) of ``shape``, for a head of width V."""
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError("targets must be an integer tensor (the token ids)")
    if tuple(targets.shape) != shape:
        raise ValueError(f"targets must have shape {shape}, got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
        raise ValueError(f"targets must be token ids in [0, {V - 1}] (V = the LM head's width); got values outside")
    if weights is not None and (not isinstance(weights, Tensor) or tuple(weights.shape) != shape):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights (the metrics' mask) must be a tensor of shape {shape}, got {got}")
    if request.tre and request.top_k is not None and request.top_k > V:
        raise ValueError(f"StatsRequest.top_k must be an integer in [1, {V}] (V = the LM head's width), got "
                         f"{request.top_k}")  # fmt: skip
    if request.metrics:
        for name, k in [("metrics_top_k", request.metrics_top_k)] + [("metrics_ks", k) for k in request.metrics_ks]:
            if k > V:
                raise ValueError(f"StatsRequest.{name} must be <= V = {V}, got {k}")
    return targets.long(), weights  # type: ignore[return-value]


def _tail_options(request: StatsRequest, vocab_size: int | None) -> dict[str, Any]:
    """``request``'s keyword arguments of :func:`tre_edu.entropy.tail_metrics` (and of ``entropy._tail_rows``)."""
    opts = dict(ks=request.metrics_ks, p=request.metrics_p, top_k=request.metrics_top_k, rescale=request.rescale)
    return {**opts, "max_candidates": request.max_candidates, "vocab_size": vocab_size}


# --------------------------------------------------------------------------------------------- reference path
def statistics_from_logits(
    logits: Tensor,
    targets: Tensor,
    request: StatsRequest | None = None,
    *,
    weights: Tensor | None = None,
    vocab_size: int | None = None,
) -> TokenStats:
    """:func:`token_statistics` on materialised logits ``(..., V)`` (already divided by the temperature), from
    :mod:`tre_edu.entropy`'s functions: the path when the head is off, and the reference of its tests."""
    request = _check_request(request)
    V = ent._check_logits(logits)
    targets, weights = _check_inputs(request, targets, weights, tuple(logits.shape[:-1]), V)
    out = TokenStats(logprobs=ent.token_logprobs(logits, targets.to(logits.device)))
    if request.entropy:
        out.entropy = ent.global_entropy(logits)
    if request.tre:
        region = {k: getattr(request, k) for k in ("top_k", "top_p", "rescale", "max_candidates")}
        out.tre = ent.trust_region_entropy(logits, **region, vocab_size=vocab_size)
    if request.metrics:
        out.metrics = ent.tail_metrics(logits.detach(), weights, **_tail_options(request, vocab_size))
        out.metrics_weight = float(weights.double().sum()) if weights is not None else float(targets.numel())
    return out


# --------------------------------------------------------------------------------------------- the head
@dataclass
class _Plan:
    request: StatsRequest
    temperature: float
    width: int  # V of the rescale
    rows: int  # tokens per chunk
    mm_dtype: torch.dtype  # dtype of the matmuls
    weights: Tensor | None  # (N,) float64 metric weights (None: metrics off)


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    kind = weight.device.type
    if torch.is_autocast_enabled(kind) and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, plan: _Plan, bufs: dict[str, Tensor]) -> Tensor:
    """(c, V) logits / T of one chunk in the compute dtype, written into the re-used buffer ``bufs["z"]`` (and
    ``bufs["mm"]`` for a low-precision matmul): fresh large tensors per chunk would page-fault every time."""
    r, V = h.shape[0], w.shape[0]
    z = bufs["z"][:r]
    zm = z if "mm" not in bufs else bufs["mm"][:r]
    tile = CPU_MATMUL_COLUMNS if zm.device.type == "cpu" else V
    for v0 in range(0, V, tile):  # CPU: a few-row GEMM is ~20 % faster into cache-sized column blocks
        cols = slice(v0, v0 + tile)
        if b is None:
            torch.mm(h, w[cols].t(), out=zm[:, cols])
        else:
            torch.addmm(b[cols], h, w[cols].t(), out=zm[:, cols])
    if plan.temperature != 1.0:
        zm.div_(plan.temperature)  # in the matmul dtype, as model(...).logits / T
    if zm is not z:
        z.copy_(zm)
    return z


def _chunk_buffers(rows: int, V: int, cdt: torch.dtype, mm: torch.dtype, dev: torch.device, n: int) -> dict:
    """``n`` compute-dtype chunk buffers ("z", "a", "b") and, for a low-precision matmul, "mm"."""
    bufs = {k: torch.empty(rows, V, dtype=cdt, device=dev) for k in ("z", "a", "b")[:n]}
    if mm != cdt:
        bufs["mm"] = torch.empty(rows, V, dtype=mm, device=dev)
    return bufs


class _HeadFunction(torch.autograd.Function):
    """Chunked forward (statistics, saves per-token scalars and the small trust-region pieces); backward recomputes
    each chunk's logits and forms dz in place."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, plan: _Plan):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        req = plan.request
        N, V = hidden.shape[0], weight.shape[0]
        cdt = torch.float64 if plan.mm_dtype == torch.float64 else torch.float32
        dev = hidden.device
        w = weight.to(plan.mm_dtype)
        b = None if bias is None else bias.to(plan.mm_dtype)
        vec = functools.partial(torch.empty, N, dtype=cdt, device=dev)  # one number per token
        lp, m_all, S_all = vec(), vec(), vec()
        H, c_all = (vec(), vec()) if req.entropy else (None, None)
        ninf = torch.zeros(N, dtype=torch.bool, device=dev) if req.entropy else None
        tre = vec() if req.tre else None
        k1 = req.tre and req.top_k == 1
        top = torch.empty(N, dtype=torch.long, device=dev) if k1 else None
        regions: list[tuple[slice, Tensor, Tensor, Tensor | float]] = []  # (rows, idx, dv, rescale factor)
        metrics = None
        if plan.weights is not None:
            metrics = torch.zeros(len(req.metric_keys()), dtype=torch.float64, device=dev)
            tail_opts = _tail_options(req, plan.width)
        bufs = _chunk_buffers(min(N, plan.rows), V, cdt, plan.mm_dtype, dev, 3) if N else {}
        with _no_autocast(dev):
            for r0 in range(0, N, plan.rows):
                sl = slice(r0, min(N, r0 + plan.rows))
                z = _chunk_logits(hidden[sl].to(plan.mm_dtype), w, b, plan, bufs)
                m = z.amax(-1)
                ent._raise_bad_rows(m, "logits (hidden @ weight.T + bias)")
                m_all[sl] = m
                zt = z.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
                vals = idx = None
                if req.tre and not k1:
                    C = req.top_k if req.top_k is not None else min(V, 256 if req.max_candidates is None else
                                                                      req.max_candidates)  # fmt: skip
                    vals, idx = torch.topk(z, C, dim=-1, sorted=True)
                r = z.shape[0]
                s = torch.sub(z, m.unsqueeze(-1), out=bufs["a"][:r])
                e = torch.exp(s, out=bufs["b"][:r])
                S = e.sum(-1)
                S_all[sl] = S
                lse = m + torch.log(S)
                lp[sl] = zt - lse
                if k1:
                    top[sl] = z.argmax(-1)  # type: ignore[index]
                    tre[sl] = -(m - lse)  # type: ignore[index]  # -log max pi, as entropy.min_entropy
                if req.entropy:
                    d, ninf[sl] = ent._sum_es(z, m.unsqueeze(-1), s, e)  # type: ignore[index]
                    c = -d / S
                    c_all[sl] = c  # type: ignore[index]
                    H[sl] = torch.log(S) + c  # type: ignore[index]
                if req.tre and not k1:
                    if req.top_k is not None:
                        keep, factor = vals > -math.inf, ent.tre_rescale(plan.width, top_k=req.top_k)  # type: ignore[operator]
                        v = vals
                    else:
                        T = e.scatter_(-1, idx, 0.0).sum(-1)  # the tail, summed directly
                        head = (vals, idx, *ent._head(z, vals, idx, T))  # type: ignore[arg-type]
                        idx, keep, _, _ = ent._nucleus(z, float(req.top_p), req.max_candidates, head=head)  # type: ignore[arg-type]
                        v = z.gather(-1, idx)
                        factor = ent.tre_rescale(plan.width, nucleus_size=keep.sum(-1), dtype=cdt)
                    h, q, s_q, c_q = ent._local_entropy(v, keep)
                    dv = -q * (s_q + c_q)
                    if not req.rescale:
                        factor = 1.0
                    tre[sl] = h * factor  # type: ignore[index]
                    regions.append((sl, idx, dv, factor))  # type: ignore[arg-type]
                if metrics is not None:
                    wc = plan.weights[sl]  # type: ignore[index]
                    sel = (wc != 0).nonzero().squeeze(-1)
                    if sel.numel():
                        zs = z if sel.numel() == z.shape[0] else z.index_select(0, sel)
                        metrics += ent._tail_rows(zs, **tail_opts) @ wc[sel]
        ctx.plan, ctx.regions, ctx.k1 = plan, regions, k1
        ctx.save_for_backward(hidden, weight, bias, targets, m_all, S_all, c_all, ninf, top)
        outs = [lp, H, tre, metrics]
        ctx.mark_non_differentiable(*[x for x in outs[3:] if x is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_h: Tensor | None, g_t: Tensor | None, *_: Any):  # type: ignore[override]
        hidden, weight, bias, targets, m_all, S_all, c_all, ninf, top = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_h is None or c_all is None:
            g_h = None
        if not ctx.regions and not ctx.k1:
            g_t = None
        if g_lp is None and g_h is None and g_t is None:
            return None, None, None, None, None
        cdt, dev = m_all.dtype, hidden.device
        # dz = e (A + B s) + scatter terms, e = exp(z - max z), S = sum e (see tre_edu.entropy for the formulas)
        g_lp, g_h, g_t = (None if g is None else g.to(cdt) for g in (g_lp, g_h, g_t))
        A, B = torch.zeros_like(S_all), None
        if g_lp is not None:
            A -= g_lp / S_all
        if g_h is not None:
            A -= g_h * c_all / S_all
            B = -g_h / S_all
        if g_t is not None and ctx.k1:
            A += g_t / S_all
        mm = plan.mm_dtype
        w = weight.to(mm)
        b = None if bias is None else bias.to(mm)
        low = mm not in (torch.float32, torch.float64)
        gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
        acc_dt = torch.float32 if low else weight.dtype
        gw = torch.zeros(weight.shape, dtype=acc_dt, device=dev) if need_w else None
        gb = torch.zeros(bias.shape, dtype=torch.float32 if low else bias.dtype, device=dev) if need_b else None
        ninf_any = bool(ninf.any()) if (B is not None and ninf is not None) else False
        regions = {sl.start: (idx, dv, factor) for sl, idx, dv, factor in ctx.regions}
        N = hidden.shape[0]
        bufs = _chunk_buffers(min(N, plan.rows), weight.shape[0], cdt, mm, dev, 2)
        with _no_autocast(dev):
            for r0 in range(0, N, plan.rows):
                sl = slice(r0, min(N, r0 + plan.rows))
                h = hidden[sl].to(mm)
                s = _chunk_logits(h, w, b, plan, bufs)
                r = s.shape[0]
                s.sub_(m_all[sl].unsqueeze(-1))
                if ninf_any and bool(ninf[sl].any()):
                    s.clamp_(min=ent._SAFE_MIN)
                e = torch.exp(s, out=bufs["a"][:r])
                if B is None:
                    dz = e.mul_(A[sl].unsqueeze(-1))
                else:
                    dz = s.mul_(B[sl].unsqueeze(-1)).add_(A[sl].unsqueeze(-1)).mul_(e)
                if g_lp is not None:
                    dz.scatter_add_(-1, targets[sl].unsqueeze(-1), g_lp[sl].unsqueeze(-1))
                if g_t is not None and ctx.k1:
                    dz.scatter_add_(-1, top[sl].unsqueeze(-1), -g_t[sl].unsqueeze(-1))
                elif g_t is not None:
                    idx, dv, factor = regions[r0]
                    dz.scatter_add_(-1, idx, dv * (g_t[sl] * factor).unsqueeze(-1))
                if plan.temperature != 1.0:
                    dz.div_(plan.temperature)
                if gb is not None:
                    gb += dz.sum(0).to(gb.dtype)
                dzm = dz if dz.dtype == mm else bufs["mm"][:r].copy_(dz)
                if gh is not None:
                    _hidden_grad(dzm, w, gh[sl])
                if gw is not None:
                    _addmm_acc(gw, dzm.t(), h)
        return gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype), None, None


def _hidden_grad(dz: Tensor, w: Tensor, out: Tensor) -> None:
    """``out = dz @ w``, the gradient w.r.t. a chunk's hidden states: each element sums V products. On CPU in blocks
    of ``CPU_MATMUL_COLUMNS`` vocabulary rows whose results are added in float64: a GEMM of a few rows over all V
    may add the V products one by one (tests/test_head.py's nucleus-boundary rows, 2 threads: 2.8e-3 of the scale
    off float64 in one GEMM, 2e-5 blocked; its other rows, 1 to 8 threads: at most 6.5e-7 blocked, the materialised
    path's one GEMM up to 6.3e-5)."""
    if dz.device.type != "cpu" or dz.dtype != torch.float32:  # GPU GEMMs are blocked; bf16 products are rounded
        out.copy_(torch.mm(dz, w))
        return
    acc = torch.zeros(out.shape, dtype=torch.float64, device=out.device)
    part = torch.empty(out.shape, dtype=dz.dtype, device=out.device)
    for v0 in range(0, w.shape[0], CPU_MATMUL_COLUMNS):
        rows = slice(v0, v0 + CPU_MATMUL_COLUMNS)
        acc += torch.mm(dz[:, rows], w[rows], out=part)
    out.copy_(acc)


def _addmm_acc(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 (or the inputs' float dtype), without rounding ``a @ b`` to bf16 first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    on = torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, enabled=False) if on else contextlib.nullcontext()


def token_statistics(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    request: StatsRequest | None = None,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_tokens: int | None = None,
) -> TokenStats:
    """Per-token statistics of ``softmax((hidden @ weight.T + bias) / temperature)`` for ``targets`` (N,), in chunks
    of ``chunk_tokens`` tokens (default :func:`default_chunk_tokens`), never holding the ``(N, V)`` logits.

    ``hidden`` (N, H): the final hidden states (after the final norm) of the positions that predict ``targets``;
    ``weight`` (V, H) / ``bias`` (V,): the LM head's (tied embeddings: the embedding matrix); ``request``: None =
    log-probs only; ``weights`` (N,): the tail metrics' weights (the response mask; None = all tokens);
    ``vocab_size``: V of TRE's rescale (default ``weight.shape[0]``). Gradients reach hidden, weight and bias."""
    request = _check_request(request)
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 2-D floating tensor ({'N, H' if name == 'hidden' else 'V, H'}), "
                             f"got {got}")  # fmt: skip
    N, Hd = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != Hd or weight.device != hidden.device:
        raise ValueError(f"weight must have shape (V, {Hd}) on {hidden.device} to match hidden; got "
                         f"{tuple(weight.shape)} on {weight.device}")  # fmt: skip
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(f"bias must be None or a tensor of shape ({V},)")
    targets, weights = _check_inputs(request, targets, weights, (N,), V)
    targets = targets.to(hidden.device)
    width = V if vocab_size is None else ent._check_int(vocab_size, "vocab_size", 2)
    T = _check_temperature(temperature)
    rows = default_chunk_tokens(V, hidden.device) if chunk_tokens is None else ent._check_int(
        chunk_tokens, "chunk_tokens", 1)  # fmt: skip
    rows = -(-N // -(-N // rows)) if N else 1  # balanced: chunks of equal size (no 1-row remainder)
    w64 = None
    if request.metrics:
        w64 = torch.ones(N, dtype=torch.float64, device=hidden.device) if weights is None else weights
        w64 = w64.detach().to(device=hidden.device, dtype=torch.float64)
    plan = _Plan(request, T, width, rows, _matmul_dtype(weight), w64)
    lp, H, tre, sums = _HeadFunction.apply(hidden, weight, bias, targets, plan)
    out = TokenStats(logprobs=lp, entropy=H, tre=tre)
    if w64 is not None:
        total = float(w64[w64 != 0].sum())
        keys = request.metric_keys()
        out.metrics = dict.fromkeys(keys, 0.0) if total == 0.0 else {
            k: float(v) / total for k, v in zip(keys, sums.tolist(), strict=True)}  # fmt: skip
        out.metrics_weight = total
    return out


# --------------------------------------------------------------------------------------------- in a model
@dataclass
class _HeadCall:
    """The per-call context of a :class:`LeanHead`: what to compute for the positions that predict ``targets``."""

    targets: Tensor  # (B, R)
    request: StatsRequest
    temperature: float
    weights: Tensor | None
    vocab_size: int | None
    chunk_tokens: int | None
    stats: TokenStats | None = None  # filled by the forward (metrics; the tensors are returned packed)


class LeanHead(nn.Linear):
    """A causal LM's output layer that can return per-token statistics instead of logits.

    It holds the SAME ``weight`` (and ``bias``) Parameter objects as the layer it replaces (see
    :func:`install_lean_head`), so tied embeddings, state dict keys, checkpoints and ``generate`` are unchanged.
    Outside a :meth:`computing` context it is the plain linear layer. Inside one, its input ``(B, L, H)`` hidden
    states are those of the last L positions; the ones at ``L - R - 1 .. L - 2`` predict the R targets, and the
    forward returns ``(B, L, k)`` float32 with the k = ``len(request.channels)`` statistics at those positions
    (zeros elsewhere) - the causal LM passes it through as ``.logits``; :meth:`unpack` splits it."""

    def __init__(self, linear: nn.Module):
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"the LM head must have a 2-D weight (an nn.Linear), got {type(linear).__name__}")
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = weight  # type: ignore[assignment]  # the same Parameter: tying and FSDP see one tensor
        self.bias = getattr(linear, "bias", None)  # type: ignore[assignment]
        self._call: _HeadCall | None = None

    @contextlib.contextmanager
    def computing(
        self,
        targets: Tensor,
        request: StatsRequest | None = None,
        *,
        temperature: float = 1.0,
        weights: Tensor | None = None,
        vocab_size: int | None = None,
        chunk_tokens: int | None = None,
    ) -> Iterator[_HeadCall]:
        """While open, a forward computes the statistics of ``targets`` (B, R) instead of the logits."""
        if self._call is not None:
            raise RuntimeError("LeanHead.computing is already open (one model call at a time)")
        if not isinstance(targets, Tensor) or targets.dim() != 2:
            raise ValueError("targets must be a (B, R) tensor of token ids")
        call = _HeadCall(targets, _check_request(request), _check_temperature(temperature), weights, vocab_size,
                         chunk_tokens)  # fmt: skip
        self._call = call
        try:
            yield call
        finally:
            self._call = None

    def forward(self, hidden: Tensor) -> Tensor:  # type: ignore[override]
        call = self._call
        if call is None:
            return F.linear(hidden, self.weight, self.bias)
        B, R = call.targets.shape
        if hidden.dim() != 3 or hidden.shape[0] != B or hidden.shape[1] < R + 1:
            raise ValueError(f"LeanHead got hidden states of shape {tuple(hidden.shape)}; expected (B={B}, >= R+1 = "
                             f"{R + 1}, H) (ask the model for logits_to_keep = R + 1)")  # fmt: skip
        L = hidden.shape[1]
        h = hidden[:, L - R - 1 : L - 1].reshape(B * R, hidden.shape[-1])
        w = None if call.weights is None else call.weights.reshape(B * R)
        targets = call.targets.reshape(B * R).to(hidden.device)
        opts = dict(temperature=call.temperature, vocab_size=call.vocab_size, chunk_tokens=call.chunk_tokens)
        call.stats = stats = token_statistics(h, self.weight, self.bias, targets, call.request, weights=w, **opts)
        packed = torch.stack([getattr(stats, name).reshape(B, R) for name in call.request.channels], -1)
        return F.pad(packed, (0, 0, L - R - 1, 1))  # zeros at the positions that predict no target

    @staticmethod
    def unpack(packed: Tensor, call: _HeadCall) -> TokenStats:
        """``(B, >= R+1, k)`` packed output -> :class:`TokenStats` with ``(B, R)`` tensors and the call's metrics."""
        R = call.targets.shape[1]
        cols = packed[:, -(R + 1) : -1]
        out = TokenStats(logprobs=cols[..., 0])
        for i, name in enumerate(call.request.channels[1:], start=1):
            setattr(out, name, cols[..., i])
        if call.stats is not None:
            out.metrics, out.metrics_weight = call.stats.metrics, call.stats.metrics_weight
        return out


# Config attributes of models whose logits are NOT lm_head(hidden) (a scale or soft-cap applied after the head).
_POST_HEAD_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def lean_head_exact(model: nn.Module) -> bool:
    """Whether ``model(...).logits`` is exactly its output layer applied to the hidden states (a plain
    ``nn.Linear`` output layer, no post-head scale or soft-cap in the config), so that the head is exact."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if not isinstance(out, nn.Linear):
        return False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    values = [getattr(config, name, None) for name in _POST_HEAD_ATTRS]
    return all(value is None or value == 1 or isinstance(value, bool) for value in values)


def find_lean_head(model: nn.Module) -> LeanHead | None:
    """The installed :class:`LeanHead` of a causal LM (through DDP / FSDP / compile wrappers), or None."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        get = getattr(m, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if isinstance(out, LeanHead):
            return out
    return None


def install_lean_head(model: nn.Module) -> LeanHead | None:
    """Put a :class:`LeanHead` in place of ``model``'s output layer (same Parameters) if the head is exact for
    it (:func:`lean_head_exact`); returns the head (the existing one if already installed), or None. Install
    before wrapping the model in FSDP / DDP."""
    if (found := find_lean_head(model)) is not None or not lean_head_exact(model):
        return found
    head = LeanHead(model.get_output_embeddings())  # type: ignore[operator]
    model.set_output_embeddings(head)  # type: ignore[operator]
    return head
