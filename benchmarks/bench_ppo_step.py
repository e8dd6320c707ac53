"""Where the time of one PPO step goes, and what the KV cache buys.

    python benchmarks/bench_ppo_step.py [--steps 5] [--tail-tokens 20000] [--horizon long] [--threads N]
    python benchmarks/bench_ppo_step.py -c configs/studies/recipe.yaml --init-from runs/warm --set ppo.steps=5

Part 1 runs a few PPO steps of the recipe (default ``configs/countdown_tiny.yaml``: 16 prompts x 8 samples, at
most 32 new tokens) and prints the median time of each phase — rollout (sampling), reward (the verifier), values
(log-probs and critic values of the batch), update (PPO epochs) — in seconds and as a share of the step. A fresh
model (no ``--init-from``) never emits EOS, so every response has exactly ``max_new_tokens`` tokens: the
``--horizon`` presets fix that budget (compact: 32, long: 64 with think traces); a warm start gives the lengths of
real training. Part 2 (skip with ``--no-cache``) samples 64 new tokens with and without the KV cache on the same
model, side by side, and prints the speed-up (goal: >= 3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

HORIZONS = {
    "compact": ["ppo.max_new_tokens=32"],
    "long": ["ppo.max_new_tokens=64", "task.options.think=true"],
}
PHASES = ["time/rollout", "time/reward", "time/values", "time/update"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--config", action="append", help="config file(s) (default: configs/countdown_tiny.yaml)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tail-tokens", type=int, default=None, help="model.tail_tokens (default: the config's)")
    ap.add_argument("--horizon", choices=sorted(HORIZONS), default=None, help="response budget preset")
    ap.add_argument("--init-from", default=None, help="start from this saved model (a warm start)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config override")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cache", action="store_true", help="skip part 2 (KV cache vs none)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import warnings

    from bench_sampling import compare_cache

    from tre_edu.config import load_config
    from tre_edu.pipeline import build_trainer

    warnings.filterwarnings("ignore", message=".*falling back to generated puzzles.*")
    overrides = ["sft.enabled=false", "eval.every=0", "task.eval_size=8", f"ppo.steps={args.steps}"]
    overrides += HORIZONS.get(args.horizon, [])
    if args.tail_tokens is not None:
        overrides.append(f"model.tail_tokens={args.tail_tokens}")
    if args.init_from:
        overrides.append(f"init_from={args.init_from}")
    if args.threads:
        overrides.append(f"threads={args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.config or [ROOT / "configs" / "countdown_tiny.yaml"], overrides + args.set + [f"output_dir={tmp}"]
        )
        trainer = build_trainer(cfg, progress=False, log_jsonl=False)
        rows = [trainer.train_step() for _ in range(args.steps)]
        actor = trainer.actor

    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in PHASES + ["time/step"]}
    tokens = statistics.median(r["response/length_mean"] for r in rows)
    p, width = cfg.ppo, actor.get_input_embeddings().embedding_dim
    print(
        f"one PPO step: {p.prompts_per_step} prompts x {p.samples_per_prompt} samples, {tokens:.1f} response tokens "
        f"on average (max {p.max_new_tokens}), vocab {actor.config.vocab_size:,}, width {width}, "
        f"advantage {p.advantage}, {trainer.optimizer_steps_per_ppo_step()} optimiser steps, "
        f"threads {torch.get_num_threads()}, median of {args.steps} steps, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  {'phase':<10s} {'seconds':>8s} {'share':>7s}")
    for k in PHASES:
        print(f"  {k.split('/')[1]:<10s} {med[k]:8.3f} {med[k] / med['time/step']:7.1%}")
    print(f"  {'step':<10s} {med['time/step']:8.3f} {1:7.1%}")
    if args.no_cache:
        return med
    res = compare_cache(actor, repeats=args.repeats, batch_size=32, prompt_len=16, new_tokens=64)
    print(
        f"KV cache, batch 32, 64 new tokens: cached {res['cached_s']:.3f} s, uncached {res['uncached_s']:.3f} s, "
        f"speed-up {res['speedup']:.2f}x (goal >= 3x)"
    )
    return {**med, **res}


if __name__ == "__main__":
    main()
