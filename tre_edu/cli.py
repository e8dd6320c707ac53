"""The ``tre-edu`` command.

    tre-edu train --config configs/countdown_tiny.yaml [--kind tre-k --coef 0.001 --steps 50 --seed 1 ...]
                  [--set ppo.actor_lr=3e-5 --set task.options.think=true] [--resume] [--dry-run]
    tre-edu sft   --config configs/countdown_tiny.yaml --output-dir runs/warm
    tre-edu eval  --model runs/x/final --config configs/countdown_tiny.yaml [--n 500]
    tre-edu bench entropy|sampling|ppo-step
    tre-edu train-rm --source ultrafeedback --model <id or path> --output-dir runs/rm

Any config field can be overridden with ``--set section.field=value``; the common ones have short flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHORT_FLAGS = {
    # flag: (config key, type)
    "kind": ("regularizer.kind", str),
    "coef": ("regularizer.coef", float),
    "k": ("regularizer.k", int),
    "p": ("regularizer.p", float),
    "tail_tokens": ("model.tail_tokens", int),
    "steps": ("ppo.steps", int),
    "seed": ("seed", int),
    "output_dir": ("output_dir", str),
    "init_from": ("init_from", str),
    "device": ("device", str),
    "model": ("model.name", str),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        action="append",
        help="YAML config (see configs/); repeat to merge files left to right",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, repeatable")
    p.add_argument("--kind", help="regularizer: none, entropy, tre-k, tre-p, forking, kl-cov, clip-cov")
    p.add_argument("--coef", type=float, help="regularizer coefficient (paper units: 0.001 for TRE)")
    p.add_argument("--k", type=int, help="TRE-K trust-region size K")
    p.add_argument("--p", type=float, help="TRE-P nucleus mass p")
    p.add_argument("--tail-tokens", dest="tail_tokens", type=int, help="tiny model: vocabulary tail size")
    p.add_argument("--steps", type=int, help="PPO steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--init-from", dest="init_from", help="start from this saved model directory")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--model", help="model.name: tiny, a hub id or a local path")


def resolve_config(args: argparse.Namespace):
    from tre_edu.config import load_config

    overrides = [
        f"{key}={getattr(args, flag)}"
        for flag, (key, _t) in SHORT_FLAGS.items()
        if getattr(args, flag, None) is not None
    ]
    return load_config(args.config, list(args.set) + overrides)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.dry_run:
        import yaml

        from tre_edu.memory import estimate_memory

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(estimate_memory(cfg, processes=args.processes, fsdp=False if args.no_fsdp else None).report())
        return 0
    from tre_edu.pipeline import run_training

    result = run_training(cfg, resume=args.resume)
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from tre_edu.pipeline import run_warm_start

    out = run_warm_start(cfg, output_dir=args.output_dir or str(Path(cfg.output_dir) / "warm_start"))
    print(json.dumps(out["summary"], indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from tre_edu.pipeline import run_eval

    out = run_eval(cfg, model_dir=args.model_dir, n=args.n)
    print(json.dumps(out, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"bench_{args.which.replace('-', '_')}.py"
    if not script.is_file():
        raise SystemExit(f"benchmark script not found: {script} (benchmarks live in the source checkout)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    from tre_edu.reward_model import train_rm_main

    opts = {k: v for k, v in vars(args).items() if k not in ("func", "command") and v is not None}
    out = train_rm_main(opts)
    print(json.dumps(out, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tre-edu", description="PPO for language models with Trust Region Entropy")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="PPO training (with the warm start first when sft.enabled)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and a memory estimate")
    p.add_argument("--processes", type=int, default=1, help="dry run: N GPUs (FSDP if N > 1)")
    p.add_argument("--no-fsdp", dest="no_fsdp", action="store_true", help="dry run: DDP, no sharding")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="supervised warm start of the tiny model on solver-made solutions")
    _add_config_args(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("eval", help="held-out accuracy of a saved model (greedy and sampled pass@1)")
    _add_config_args(p)
    p.add_argument("--model-dir", dest="model_dir", required=True, help="a directory written by save_pretrained")
    p.add_argument("--n", type=int, default=None, help="number of held-out examples (default: eval.eval_size)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="run a benchmark script (entropy, sampling, ppo-step)")
    p.add_argument("which", choices=["entropy", "sampling", "ppo-step"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-rm", help="train a scalar reward model on preference pairs (HH / UltraFeedback)")
    p.add_argument("--source", choices=["ultrafeedback", "hh-rlhf"], default="ultrafeedback")
    p.add_argument("--model", default="tiny", help="hub id or local path of the base model ('tiny': a CPU toy)")
    p.add_argument("--output-dir", dest="output_dir")
    p.add_argument("--n-train", dest="n_train", type=int, help="pairs to train on (default: the whole split)")
    p.add_argument("--n-test", dest="n_test", type=int)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--backend", choices=["trl", "torch"], default="trl")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_train_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"tre-edu: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
