"""KV-cached vs uncached sampling, measured side by side in one run.

    python benchmarks/bench_sampling.py            # width 128, 4 layers, vocab 2k and 20k, batch 32
    python benchmarks/bench_sampling.py --new-tokens 32 64 128 --vocab 2000 --threads 1

With the cache each step feeds one token per row and attends to the stored keys / values (O(T) work per step);
without it every step recomputes the whole prefix (O(T^2) over a response). The speed-up grows with the number
of new tokens. Both variants sample the same number of tokens (no EOS), in alternating order, after a warm-up,
and the median of the repeats is reported. ``measure_sampling`` / ``compare_cache`` are importable
(bench_ppo_step.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tre_edu.rollout import SamplingConfig, generate


def tiny_causal_lm(vocab_size: int, n_embd: int = 128, n_layer: int = 4, n_head: int = 4, n_positions: int = 256):
    """A randomly initialised GPT-2-style causal LM (no hub), tied embeddings, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_sampling(
    model: torch.nn.Module,
    *,
    batch_size: int = 32,
    prompt_len: int = 16,
    new_tokens: int = 64,
    use_cache: bool = True,
    repeats: int = 3,
    seed: int = 0,
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of :func:`tre_edu.rollout.generate` (temperature 1, no EOS, so
    exactly ``new_tokens`` tokens per row) on random prompts of ``prompt_len`` tokens (a few rows shorter, so
    left padding is exercised)."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    g = torch.Generator().manual_seed(seed)
    lengths = [prompt_len - (i % 4) for i in range(batch_size)]
    prompts = [torch.randint(1, vocab, (max(1, n),), generator=g).tolist() for n in lengths]
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, use_cache=use_cache)
    times = []
    for r in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        ro = generate(
            model, prompts, cfg, eos_token_id=None, pad_token_id=0, generator=torch.Generator().manual_seed(r)
        )
        _sync(device)
        times.append(time.perf_counter() - t0)
        assert ro.response.shape == (batch_size, new_tokens)
    return times


def compare_cache(model: torch.nn.Module, *, repeats: int = 3, **kw) -> dict[str, float]:
    """Median seconds with and without the KV cache (alternating, after one warm-up each) and their ratio."""
    for use_cache in (True, False):
        measure_sampling(model, use_cache=use_cache, repeats=1, **{**kw, "new_tokens": 4})
    cached, uncached = [], []
    for r in range(repeats):
        cached += measure_sampling(model, use_cache=True, repeats=1, seed=r, **kw)
        uncached += measure_sampling(model, use_cache=False, repeats=1, seed=r, **kw)
    c, u = statistics.median(cached), statistics.median(uncached)
    return {"cached_s": c, "uncached_s": u, "speedup": u / c}


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[64])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(
        f"device={args.device} torch_threads={torch.get_num_threads()} batch={args.batch} "
        f"prompt_len={args.prompt_len} width={args.width} layers={args.layers} (median of {args.repeats})"
    )
    print(f"{'vocab':>7} {'new_tokens':>10} {'cached_s':>9} {'uncached_s':>10} {'speedup':>8}")
    rows = []
    for vocab in args.vocab:
        n_pos = args.prompt_len + max(args.new_tokens) + 8
        model = tiny_causal_lm(vocab, n_embd=args.width, n_layer=args.layers, n_positions=n_pos).to(args.device)
        for new_tokens in args.new_tokens:
            res = compare_cache(
                model,
                batch_size=args.batch,
                prompt_len=args.prompt_len,
                new_tokens=new_tokens,
                repeats=args.repeats,
            )
            rows.append({"vocab": vocab, "new_tokens": new_tokens, **res})
            print(
                f"{vocab:>7} {new_tokens:>10} {res['cached_s']:>9.3f} {res['uncached_s']:>10.3f} "
                f"{res['speedup']:>7.2f}x"
            )
    return rows


if __name__ == "__main__":
    main()
