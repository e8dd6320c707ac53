"""Where the time of one PPO iteration goes on the default tiny recipe, and what the KV cache buys.

    python benchmarks/bench_ppo_step.py [--steps 5] [--tail-tokens 2000] [--threads N]

Part 1 runs a few PPO steps of ``configs/countdown_tiny.yaml`` (fresh tiny model, no warm start: the split of the
time does not depend on the accuracy much) and prints the median time of each phase — rollout (sampling),
reward (scoring with the Countdown verifier), values (critic forward), update (PPO epochs) — as seconds and as a
share of the step.
Part 2 samples 64 new tokens with and without the KV cache on the same model, side by side in one run, and prints
the speed-up (goal: >= 3x).
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tail-tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import warnings

    from bench_sampling import compare_cache

    from tre_edu.config import load_config
    from tre_edu.trainer import PPOTrainer

    warnings.filterwarnings("ignore", message=".*falling back to generated puzzles.*")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            ROOT / "configs" / "countdown_tiny.yaml",
            [
                "sft.enabled=false",
                f"model.tail_tokens={args.tail_tokens}",
                f"ppo.steps={args.steps}",
                "eval.every=0",
                f"output_dir={tmp}",
                "task.eval_size=8",
            ],
        )
        trainer = PPOTrainer(cfg, progress=False, log_jsonl=False)
        rows = [trainer.train_step() for _ in range(args.steps)]
        actor = trainer.actor

    phases = ["time/rollout", "time/reward", "time/values", "time/update"]
    med = {k: statistics.median(r[k] for r in rows) for k in phases + ["time/step"]}
    p = cfg.ppo
    print(
        f"one PPO step, tiny recipe: {p.prompts_per_step} prompts x {p.samples_per_prompt} samples, "
        f"max {p.max_new_tokens} new tokens, vocab {actor.config.vocab_size}, threads {torch.get_num_threads()}, "
        f"median of {args.steps} steps"
    )
    print(f"  {'phase':<10s} {'seconds':>8s} {'share':>7s}")
    for k in phases:
        print(f"  {k.split('/')[1]:<10s} {med[k]:8.3f} {med[k] / med['time/step']:7.1%}")
    print(f"  {'step':<10s} {med['time/step']:8.3f} {1:7.1%}")

    res = compare_cache(actor, repeats=args.repeats, batch_size=32, prompt_len=16, new_tokens=64)
    print(
        f"KV cache, batch 32, 64 new tokens: cached {res['cached_s']:.3f} s, uncached {res['uncached_s']:.3f} s, "
        f"speed-up {res['speedup']:.2f}x (goal >= 3x)"
    )
    return {**med, **res}


if __name__ == "__main__":
    main()
