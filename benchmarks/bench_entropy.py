"""Speed, memory and accuracy of tre_edu.entropy against its peers, measured side by side in one run.

    python benchmarks/bench_entropy.py [--device cpu|cuda] [--tokens 1024] [--vocab 151936] [--repeats 7]
                                       [--threads 2] [--err-rows 64]

For each method, forward + backward (sum of the per-position values, backward to the logits) on float32
logits of shape (tokens, vocab) is timed; the time is printed as a ratio to ONE forward ``torch.logsumexp``
pass over the same logits (the cheapest thing that has to read every logit once). Each repeat times the
baseline right before the method, and the printed ratio is the median over repeats of these paired ratios,
so that load from other processes on a shared machine mostly cancels.

Memory: "extra memory" is the peak memory during forward + backward above what was in use before (the
logits), as a multiple of the logits' size; it INCLUDES the gradient w.r.t. the logits (1.0x by itself) and
any (N, V) temporaries. Measured with
- CUDA: ``torch.cuda.max_memory_allocated`` (reset before each method), exact for the caching allocator;
- CPU (Linux): the process's peak resident set size (VmHWM in /proc/self/status), reset before each method
  by writing "5" to /proc/self/clear_refs. PyTorch's CPU allocator gets large blocks from the OS (mmap) and
  returns them on free, so the peak RSS sees every tensor, including temporaries inside opaque C++ kernels
  (which a Python dispatch-mode tracker would miss). Small allocations (< ~1 % of the logits) are noise.
  Prints "n/a" elsewhere.

"tre_edu" is the default path: logits of at least ``tre_edu.entropy.COMPILE_MIN_ELEMS`` elements on a CPU go through
torch.compile'd kernels (compiled once, before timing); "tre_edu eager" is the same function with them switched off
(the chunked eager passes, as with ``TRE_EDU_COMPILE=0``). The load average of the machine is printed before and after.

Peers, written anew from their published formulas and timed in the same run:
- "paper": the TRE paper's formulas as written (log_softmax / softmax / sum; top-k then log_softmax; softmax +
  top-k + cumsum for the nucleus; log_softmax + gather);
- "TRL chunked": the full-vocabulary entropy of TRL-style trainers, chunks of 128 rows,
  H = logsumexp(z) - sum softmax(z) z.
"err" is the max abs error of the forward values against a float64 log-softmax reference on the first
``--err-rows`` rows (the same logits).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from tre_edu import entropy as ent


# ----------------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------------
def naive_global(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z, -1)
    return -(lp.exp() * lp).sum(-1)


def naive_tre_k(z: torch.Tensor, k: int) -> torch.Tensor:
    v = torch.topk(z, k, -1).values
    lq = torch.log_softmax(v, -1)
    return -(lq.exp() * lq).sum(-1) * (math.log(z.shape[-1]) / math.log(k))


def naive_tre_p(z: torch.Tensor, p: float, cap: int = 256) -> torch.Tensor:
    probs = torch.softmax(z, -1)
    top, idx = torch.topk(probs, min(cap, z.shape[-1]), -1)
    keep = (torch.cumsum(top, -1) - top) < p
    v = torch.gather(z, -1, idx).masked_fill(~keep, -torch.inf)
    lq = torch.log_softmax(v, -1)
    h = -torch.where(keep, lq.exp() * lq, 0.0).sum(-1)
    n = keep.sum(-1).clamp(min=2).float()
    return h * math.log(z.shape[-1]) / torch.log(n)


def trl_chunked_global(z: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    out = []
    for c in z.split(chunk, 0):
        out.append(torch.logsumexp(c, -1) - (torch.softmax(c, -1) * c).sum(-1))
    return torch.cat(out)


def ref64(z: torch.Tensor, kind: str, k: int, p: float, tok: torch.Tensor) -> torch.Tensor:
    """float64 references (full sort for the nucleus)."""
    z = z.double()
    lp = torch.log_softmax(z, -1)
    if kind == "global":
        return -(lp.exp() * lp).sum(-1)
    if kind == "logprob":
        return lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    sp, idx = torch.sort(lp.exp(), -1, descending=True)
    if kind == "tre_k":
        n = torch.full(sp.shape[:-1], k)
        keep = torch.arange(sp.shape[-1]) < k
    else:
        keep = ((torch.cumsum(sp, -1) - sp) < p) & (torch.arange(sp.shape[-1]) < 256)
        keep[:, 0] = True
        n = keep.sum(-1)
    lq = torch.log_softmax(torch.gather(z, -1, idx).masked_fill(~keep, -torch.inf), -1)
    h = -torch.where(keep, lq.exp() * lq, 0.0).sum(-1)
    return h * math.log(z.shape[-1]) / torch.log(n.clamp(min=2).double())


def naive_token_logprobs(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, -1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_extra_bytes(fn: Callable[[], object], device: str) -> float | None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kb("VmRSS")
    fn()
    peak = _rss_kb("VmHWM")
    if base is None or peak is None:
        return None
    return float(peak - base) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--p", type=float, default=0.99)
    ap.add_argument("--err-rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    dev = args.device
    g = torch.Generator().manual_seed(0)
    # logits like an LM's: a few plausible tokens, a long tail
    z0 = (torch.randn(args.tokens, args.vocab, generator=g) * 2.0).to(dev)
    z0[:, :8] += 8.0
    tok = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(dev)
    logits_bytes = z0.numel() * z0.element_size()

    def fwd_bwd(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            z = z0.detach().requires_grad_()
            f(z).sum().backward()
            del z

        return run

    tre_k, tre_p = (
        (lambda z: ent.trust_region_entropy(z, top_k=args.k)),
        (lambda z: ent.trust_region_entropy(z, top_p=args.p)),
    )

    def eager(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(z: torch.Tensor) -> torch.Tensor:
            was = ent._COMPILE["enabled"]
            ent._COMPILE["enabled"] = False
            try:
                return f(z)
            finally:
                ent._COMPILE["enabled"] = was

        return run

    lp = lambda z: ent.token_logprobs(z, tok)  # noqa: E731
    methods = [
        (
            "global entropy",
            "global",
            [("tre_edu", ent.global_entropy), ("tre_edu eager", eager(ent.global_entropy)), ("paper", naive_global),
             ("TRL chunked", trl_chunked_global)],
        ),
        (f"TRE-K (K={args.k})", "tre_k", [("tre_edu", tre_k), ("tre_edu eager", eager(tre_k)),
                                          ("paper", lambda z: naive_tre_k(z, args.k))]),
        (f"TRE-P (p={args.p})", "tre_p", [("tre_edu", tre_p), ("tre_edu eager", eager(tre_p)),
                                          ("paper", lambda z: naive_tre_p(z, args.p))]),
        (
            "token_logprobs",
            "logprob",
            [("tre_edu", lp), ("tre_edu eager", eager(lp)), ("paper", lambda z: naive_token_logprobs(z, tok))],
        ),
    ]  # fmt: skip
    base = lambda: torch.logsumexp(z0, -1)  # noqa: E731
    for _ in range(2):  # warm-up
        base()
    print(
        f"device={dev} tokens={args.tokens} vocab={args.vocab} float32, "
        f"logits {logits_bytes / 2**20:.0f} MiB, "
        f"threads={torch.get_num_threads()}, repeats={args.repeats}, load average {os.getloadavg()}"
    )
    print("time: forward+backward / one torch.logsumexp forward (median of paired ratios);")
    print("mem: peak extra memory during forward+backward / logits size (includes the 1.0x gradient);")
    print(f"err: max abs error of the values (of the timed call) against float64 on the first {args.err_rows} rows\n")
    print(f"{'method':<18} {'implementation':<14} {'time':>7} {'mem':>7} {'err':>9}")
    ze = z0[: args.err_rows]
    for name, kind, impls in methods:
        r64 = ref64(ze.cpu(), kind, args.k, args.p, tok[: args.err_rows].cpu())
        for impl, f in impls:
            run = fwd_bwd(f)
            run()  # warm-up
            ratios = []
            for _ in range(args.repeats):
                tb = _timeit(base, dev)
                tm = _timeit(run, dev)
                ratios.append(tm / tb)
            mem = _peak_extra_bytes(run, dev)
            with torch.no_grad():  # values of the whole input (the path that was timed), first rows compared
                out = f(z0)[: args.err_rows]
            err = float((out.double().cpu() - r64).abs().max())
            fmt_m = "n/a" if mem is None else f"{mem / logits_bytes:.2f}x"
            print(f"{name:<18} {impl:<14} {statistics.median(ratios):>6.2f}x {fmt_m:>7} {err:>9.1e}")
            name = ""
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
