"""The memory-lean head (tre_edu.head) against materialised logits and TRL's chunked log-prob function, side by side.

    python benchmarks/bench_head.py [--hidden 1536 3584] [--tokens 2048] [--vocab 152064] [--threads 1]
                                    [--repeats 1] [--err-rows 32] [--stats global tre_k tre_p] [--device cpu]
                                    [--paired N]

A Qwen2.5-shaped LM head (hidden 1,536 = 1.5B, 3,584 = 7B; V = 152,064), float32, ``--tokens`` response tokens.
For each statistic (log-probs + global entropy, log-probs + TRE-K (K = 2), log-probs + TRE-P (p = 0.99)), forward +
backward of ``sum(g1 * logprobs) + sum(g2 * statistic)`` (fixed random g) to the hidden states and the weight:

- "head": ``tre_edu.head.token_statistics`` (chunks of tokens, recomputed in backward);
- "materialised": ``F.linear`` -> the (N, V) logits -> ``tre_edu.head.statistics_from_logits`` (tre_edu.entropy);
- "TRL": the installed TRL's ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` (log-probs + global entropy
  only; its torch fallback on CPU), skipped with a note if TRL is not importable.

Each case runs in a fresh subprocess (repeats interleaved across cases, so load drifts hit all methods alike).
time: median wall time of forward + backward; cpu: the process's CPU time for it (user + system, all threads): on
a shared machine the wall time follows the load, the CPU time much less (it still counts cache and memory
contention). extra peak: the process's peak resident memory during forward +
backward (VmHWM, reset through /proc/self/clear_refs; on CUDA ``max_memory_allocated``) minus the memory in use
before it (inputs) and minus the gradients every method returns (w.r.t. hidden and weight): the method's own
working memory. err: max abs error of the values (log-probs and the statistic) on the first ``--err-rows`` tokens
against a float64 computation of the same statistics. ``--paired N``: also time the methods alternately N times in ONE
process per statistic and print the median of the per-round ratios to the materialised path ("paired"; load drift on a
shared machine cancels better than across processes). "dry run" prints ``tre_edu.head.head_buffer_bytes`` for the
chunk size used, the figure ``tre-edu train --dry-run`` counts for the head.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

import torch

STATS = {"global": "log-probs + global entropy", "tre_k": "log-probs + TRE-K (K=2)", "tre_p": "log-probs + TRE-P"}


def _request(stat: str):
    from tre_edu.head import StatsRequest

    return {
        "global": StatsRequest(entropy=True),
        "tre_k": StatsRequest(tre=True, top_k=2),
        "tre_p": StatsRequest(tre=True, top_p=0.99),
    }[stat]


def make_inputs(hidden: int, tokens: int, vocab: int, device: str, seed: int = 0):
    """Hidden states and a head whose logits look like an LM's (std ~3, eight tokens lifted by ~8)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    h[:, 0] = hidden**0.5
    W = torch.randn(vocab, hidden, generator=g).mul_(2.0 / hidden**0.5)
    W[:8, 0] += 8.0 / hidden**0.5
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[::2] = torch.randint(0, 8, (tokens // 2 + tokens % 2,), generator=g)
    gl = torch.randn(2, tokens, generator=g)
    return h.to(device), W.to(device), t.to(device), gl.to(device)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _values(method: str, stat: str, h, W, t):
    """(logprobs, statistic) of one method, differentiable w.r.t. h and W."""
    if method == "TRL":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        lp, H, *_ = ChunkedLogProbFunction.apply(h, W, None, t, 1.0, 32768, None, 1.0, ("entropy",))
        return lp, H
    from tre_edu.head import statistics_from_logits, token_statistics

    req = _request(stat)
    if method == "head":
        s = token_statistics(h, W, None, t, req)
    else:
        s = statistics_from_logits(torch.nn.functional.linear(h, W), t, req)
    return s.logprobs, s.entropy if stat == "global" else s.tre


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dev = args.device
    h, W, t, gl = make_inputs(args.hidden[0], args.tokens, args.vocab, dev)
    out: dict = {}
    if args.method == "ref64":  # float64 values of the first err-rows tokens (logits built in vocabulary slices)
        from tre_edu.head import statistics_from_logits

        n = args.err_rows
        hd = h[:n].double()
        z = torch.cat([hd @ W[i : i + 16384].double().t() for i in range(0, args.vocab, 16384)], 1)
        for stat in STATS:
            s = statistics_from_logits(z, t[:n], _request(stat))
            out[stat] = [s.logprobs.tolist(), (s.entropy if stat == "global" else s.tre).tolist()]
        print(json.dumps(out))
        return
    h.requires_grad_()
    W.requires_grad_()
    grad_bytes = (h.numel() + W.numel()) * 4
    if "TRL" in args.method:  # imports outside the timed region
        import trl.kernels.chunked_logprob  # noqa: F401
    import tre_edu.head  # noqa: F401

    gc.collect()
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kb("VmRSS") * 1024
    if args.method.startswith("paired:"):  # alternate the methods in this process, time only
        times: dict[str, list[float]] = {}
        methods = args.method.split(":")[1].split(",")
        for _ in range(args.repeats):
            for method in methods:
                h.grad = W.grad = None
                t0 = time.perf_counter()
                lp, s = _values(method, args.stat, h, W, t)
                ((lp * gl[0]).sum() + (s * gl[1]).sum()).backward()
                times.setdefault(method, []).append(time.perf_counter() - t0)
                del lp, s
        print(json.dumps({"times": times}))
        return
    t0, c0 = time.perf_counter(), time.process_time()
    lp, s = _values(args.method, args.stat, h, W, t)
    ((lp * gl[0]).sum() + (s * gl[1]).sum()).backward()
    out["cpu"] = time.process_time() - c0
    if dev == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kb("VmHWM") * 1024
    out["time"] = time.perf_counter() - t0
    out["extra"] = peak - base - grad_bytes
    n = args.err_rows
    out["values"] = [lp[:n].tolist(), s[:n].tolist()]
    print(json.dumps(out))


def _spawn(args, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--threads", str(args.threads), "--device", args.device,
           "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--err-rows", str(args.err_rows)]  # fmt: skip
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker {kw} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[1536, 3584])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=152_064)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--err-rows", type=int, default=32)
    ap.add_argument("--stats", nargs="+", default=list(STATS), choices=list(STATS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="head", help=argparse.SUPPRESS)
    ap.add_argument("--stat", default="global", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the results as JSON to this file")
    ap.add_argument("--paired", type=int, default=0, help="rounds of in-process alternating timing (0: off)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import trl.kernels.chunked_logprob  # noqa: F401

        trl_ok = True
    except Exception as err:  # noqa: BLE001
        trl_ok = False
        print(f"note: TRL's chunked_logprob is not importable ({type(err).__name__}: {err}); TRL column skipped")
    from tre_edu.head import default_chunk_tokens, head_buffer_bytes

    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"device={args.device} threads={args.threads} tokens={args.tokens} vocab={args.vocab} float32; "
          f"(N, V) logits = {logits_mib:.0f} MiB; repeats={args.repeats}; load: {os.getloadavg()}")  # fmt: skip
    chunk = min(args.tokens, default_chunk_tokens(args.vocab, args.device))
    results: list[dict] = []
    for hidden in args.hidden:
        ref = _spawn(args, hidden=hidden, method="ref64")
        cases = [(s, m) for s in args.stats for m in ("materialised", "head")]
        if trl_ok and "global" in args.stats:
            cases.append(("global", "TRL"))
        runs: dict = {c: [] for c in cases}
        for _ in range(args.repeats):
            for stat, method in cases:
                runs[(stat, method)].append(_spawn(args, hidden=hidden, method=method, stat=stat))
        paired: dict = {}
        for stat in args.stats if args.paired else []:
            methods = [m for s_, m in cases if s_ == stat]
            res = _spawn(args, hidden=hidden, method="paired:" + ",".join(methods), stat=stat, repeats=args.paired)
            tm = res["times"]
            for m in methods:
                ratios = [a / b for a, b in zip(tm[m], tm["materialised"], strict=True)]
                paired[(stat, m)] = (st.median(tm[m]), st.median(ratios), tm[m])
        print(f"\nhidden {hidden}: fwd+bwd, extra peak memory (MiB; the (N, V) logits are {logits_mib:.0f} MiB), "
              f"max |error| of the values vs float64 on {args.err_rows} tokens")  # fmt: skip
        print(f"{'statistic':<28} {'method':<13} {'time s':>8} {'x mat.':>7} {'cpu s':>8} {'x mat.':>7} "
              f"{'extra MiB':>10} {'x mat.':>7} {'err':>8} {'paired s':>9} {'x mat.':>7}")  # fmt: skip
        for stat in args.stats:
            base_t = base_m = base_c = None
            for method in ("materialised", "head", "TRL"):
                if (stat, method) not in runs:
                    continue
                rs = runs[(stat, method)]
                tm = st.median(r["time"] for r in rs)
                cpu = st.median(r["cpu"] for r in rs)
                mem = st.median(r["extra"] for r in rs) / 2**20
                r64 = torch.tensor(ref[stat])
                err = float((torch.tensor(rs[0]["values"]).double() - r64).abs().max())
                if method == "materialised":
                    base_t, base_m, base_c = tm, mem, cpu
                pt, pr, ptimes = paired.get((stat, method), (math.nan, math.nan, []))
                print(f"{STATS[stat]:<28} {method:<13} {tm:>8.2f} {tm / base_t:>6.2f}x {cpu:>8.2f} "
                      f"{cpu / base_c:>6.2f}x {mem:>10.0f} {mem / base_m:>6.3f}x {err:>8.1e} {pt:>9.2f} "
                      f"{pr:>6.2f}x")  # fmt: skip
                results.append(dict(hidden=hidden, stat=stat, method=method, time=tm, cpu=cpu, extra_mib=mem, err=err,
                                    times=[r["time"] for r in rs], paired_times=ptimes, paired_ratio=pr))  # fmt: skip
            dry = head_buffer_bytes(chunk, args.vocab, _request(stat)) / 2**20
            print(f"{'':<28} {'dry run':<13} {'':>8} {'':>7} {dry:>10.0f}   (head_buffer_bytes, {chunk} tokens/chunk)")
    print(f"\nload after: {os.getloadavg()}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
