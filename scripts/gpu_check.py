"""GPU sanity check for tre_edu, under 5 minutes on one GPU.

    python scripts/gpu_check.py               # all checks on CUDA
    python scripts/gpu_check.py --cpu-smoke   # check (a) only, on the CPU (what CI without a GPU can run)

(a) entropy functions on CUDA equal their CPU results (global entropy, TRE-K, TRE-P, token log-probs;
    values and gradients w.r.t. the logits); on the CPU, float32 inputs are compared with float64 ones;
(b) 20 PPO steps of the tiny Countdown recipe on CUDA with bf16 autocast (no warm start; rollouts in chunks of
    ``ppo.rollout_batch_size``), metrics printed, all finite, parameters moved;
(c) forward + backward of a Qwen2.5-1.5B-shaped model with random weights (bf16, gradient checkpointing,
    4 x 1,024 tokens), peak memory next to tre_edu.memory's estimate of the same items.

Prints one PASS / FAIL line per check and exits 1 if any failed. Without CUDA it says so, runs (a) on the CPU
and exits 0."""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, bool, str]] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def _entropy_outputs(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> dict[str, tuple]:
    """Each function's value and gradient w.r.t. the logits (of sum(value * weights))."""
    from tre_edu.entropy import global_entropy, token_logprobs, trust_region_entropy

    fns = {
        "global_entropy": lambda z: global_entropy(z),
        "tre_k2": lambda z: trust_region_entropy(z, top_k=2),
        "tre_p0.99": lambda z: trust_region_entropy(z, top_p=0.99),
        "token_logprobs": lambda z: token_logprobs(z, tokens.to(z.device)),
    }
    out = {}
    for name, fn in fns.items():
        z = logits.detach().clone().requires_grad_(True)
        value = fn(z)
        (value.float() * weights.to(value.device)).sum().backward()
        out[name] = (value.detach().double().cpu(), z.grad.detach().double().cpu())
    return out


def check_entropy(device: str) -> None:
    """(a): the same random logits on ``device`` and on the CPU (or float32 vs float64 on the CPU)."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 17, 4099  # odd sizes on purpose
    logits = torch.randn(B, T, V, generator=g) * 3.0
    logits[0, :5, :3] += 12.0  # a few peaked rows (trust regions of 1-3 tokens)
    tokens = torch.randint(0, V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g)
    if device == "cpu":
        ref = _entropy_outputs(logits.double(), tokens, weights.double())
        got = _entropy_outputs(logits, tokens, weights)
        what = "float32 vs float64 on CPU"
    else:
        ref = _entropy_outputs(logits, tokens, weights)
        got = _entropy_outputs(logits.to(device), tokens, weights)
        what = f"{device} vs CPU"
    for name in ref:
        (v0, g0), (v1, g1) = ref[name], got[name]
        dv, dg = float((v0 - v1).abs().max()), float((g0 - g1).abs().max())
        ok = (
            torch.isfinite(v1).all().item()
            and torch.isfinite(g1).all().item()
            and torch.allclose(v0, v1, rtol=1e-4, atol=1e-4)
            and torch.allclose(g0, g1, rtol=1e-4, atol=1e-5)
        )
        report(f"(a) {name} {what}", bool(ok), f"max |dvalue| {dv:.2e}, max |dgrad| {dg:.2e}")


def check_ppo(device: str, steps: int) -> None:
    """(b): the tiny Countdown recipe, bf16 autocast, ``steps`` PPO steps on ``device``."""
    from tre_edu.config import load_config
    from tre_edu.pipeline import build_trainer

    out = tempfile.mkdtemp(prefix="tre_edu_gpu_check_")
    cfg = load_config(
        ROOT / "configs" / "countdown_tiny.yaml",
        [
            f"device={device}",
            "ppo.mixed_precision=bf16",
            f"ppo.steps={steps}",
            "ppo.rollout_batch_size=64",  # 128 responses in two chunks: exercises the padding / concatenation
            "sft.enabled=false",
            "regularizer.kind=tre-k",
            "eval.every=0",
            "eval.sampled=false",
            "task.eval_size=64",
            f"output_dir={out}",
        ],
    )
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, progress=True)
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    history = trainer.train()
    seconds = time.perf_counter() - t0
    keys = [
        "reward/mean",
        "policy/approx_kl",
        "value/loss",
        "entropy/global",
        "entropy/tre_k",
        "tail/mass_outside_top10",
    ]
    for i in (0, len(history) // 2, len(history) - 1):
        print(f"  step {i + 1:3d}: " + ", ".join(f"{k}={history[i].get(k, float('nan')):.4g}" for k in keys))
    finite = all(math.isfinite(v) for m in history for v in m.values())
    moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.actor.parameters()))
    on_device = next(trainer.actor.parameters()).device.type == torch.device(device).type
    ok = len(history) == steps and finite and moved and on_device
    report(f"(b) {steps} PPO steps, tiny Countdown, bf16 on {device}", ok, f"{seconds:.1f} s, finite={finite}")


def check_qwen_shape(device: str, batch: int = 4, tokens: int = 1024) -> None:
    """(c): Qwen2.5-1.5B-shaped model, random weights, bf16, gradient checkpointing: fwd + bwd, peak
    memory."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tre_edu.config import load_config
    from tre_edu.entropy import token_logprobs, trust_region_entropy
    from tre_edu.memory import KNOWN_SHAPES, estimate_memory

    s = KNOWN_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"]
    config = Qwen2Config(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=s["vocab"],
        tie_word_embeddings=s["tied"],
        max_position_embeddings=32768,
        use_cache=False,
    )
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, s["vocab"], (batch, tokens), device=device)
    t0 = time.perf_counter()
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    lp = token_logprobs(logits, ids[:, 1:])
    loss = -lp.mean() - 0.001 * trust_region_entropy(logits, top_k=2).mean()
    loss.backward()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1024**3
    grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    cfg = load_config(
        None,
        [
            "model.name=Qwen/Qwen2.5-1.5B-Instruct",
            "model.dtype=bfloat16",
            "model.gradient_checkpointing=true",
            "model.critic=value-head",
            f"ppo.micro_batch_size={batch}",
            f"ppo.minibatch_size={batch}",
            f"ppo.max_new_tokens={tokens}",
            "task.name=countdown",
        ],
    )
    est = estimate_memory(cfg)
    # the items this check allocates: bf16 weights, bf16 gradients, logits, activations (no optimiser state)
    rows = [k for k in est.rows if k.startswith(("weights", "gradients", "logits", "activations"))]
    expected = sum(est.rows[k] for k in rows)
    ratio = peak / expected
    ok = math.isfinite(float(loss)) and grads_ok and 0.25 < ratio < 1.5
    report(
        f"(c) Qwen2.5-1.5B shape, bf16, checkpointing, {batch} x {tokens} tokens fwd+bwd",
        ok,
        f"{seconds:.1f} s, peak {peak:.2f} GiB vs estimate {expected:.2f} GiB ({ratio:.2f}x; rows: {', '.join(rows)})",
    )
    del model, logits, lp, loss
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run check (a) on the CPU only, even with a GPU")
    parser.add_argument("--steps", type=int, default=20, help="PPO steps of check (b)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda:
        why = "--cpu-smoke" if args.cpu_smoke else "no CUDA device is visible"
        print(f"gpu_check: {why}: running check (a) on the CPU only; (b) and (c) need a GPU", flush=True)
        check_entropy("cpu")
        failed = [r for r in RESULTS if not r[1]]
        print(f"gpu_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} CPU checks passed")
        return 1 if failed else 0
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    for name, fn in (
        ("(a) entropy", lambda: check_entropy("cuda")),
        ("(b) PPO", lambda: check_ppo("cuda", args.steps)),
        ("(c) Qwen shape", lambda: check_qwen_shape("cuda")),
    ):
        try:
            fn()
        except Exception as err:  # a crash is a FAIL line, and the other checks still run
            report(name, False, f"{type(err).__name__}: {err}")
    failed = [r for r in RESULTS if not r[1]]
    print(f"gpu_check: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
