"""The ``tre-edu`` command (train, sft, eval, bench, train-rm, study run / report; ``tre-edu CMD --help``).

Every setting of :mod:`tre_edu.config` has a flag ``--section.field VALUE`` (a few a short one: ``--steps``,
``--k``); ``--set section.field=value`` also reaches inside ``task.options``. Values are converted by the field's
type, never re-read as YAML (``--output-dir "runs/a #b"`` is that directory). A user error prints one line
``tre-edu: error: ...`` and exits 2; a bug raises (exit 1, with its traceback). Warnings print as one line
``tre-edu: warning: ...`` (the offline data fallback once per dataset, as ``tre-edu: offline: ...``); ``train``
ends with a short summary and keeps the full one in ``<output_dir>/summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import runpy
import sys
import warnings
from pathlib import Path

from tre_edu import pipeline, preflight, study
from tre_edu.config import ConfigError, RewardModelConfig, TrainConfig, allowed, iter_fields, load_config, parse_value
from tre_edu.memory import estimate_memory


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations whose errors become one line (printed by :func:`main`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _typed(tp, key: str):
    def convert(raw: str):
        try:
            return parse_value(tp, raw, key)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def _add_fields(p: argparse.ArgumentParser, cls: type, title: str, dashed: bool = False) -> None:
    """One flag per field of ``cls`` (``--ppo.steps``; ``--n-train`` when ``dashed``) plus its declared short flag."""
    group = p.add_argument_group(title)
    for key, tp, f in iter_fields(cls):
        md = f.metadata
        flags = dict.fromkeys(["--" + (key.replace("_", "-") if dashed else key), md.get("flag") or "--" + key])
        extra = {"nargs": "?", "const": True} if tp is bool else {}
        help = f"{md['help']}; {allowed(tp, md)}".replace("%", "%%")
        group.add_argument(
            *flags, dest=key, type=_typed(tp, key), default=argparse.SUPPRESS, help=help, metavar="V", **extra
        )


def _config(args: argparse.Namespace) -> TrainConfig:
    typed = [(k, v) for k, v in vars(args).items() if k in _TRAIN_KEYS]  # flags after --set: flags win
    return load_config(args.config, [*args.set, *typed])


_TRAIN_KEYS = {key for key, _, _ in iter_fields(TrainConfig)}
_RM_KEYS = {key for key, _, _ in iter_fields(RewardModelConfig)}


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.dry_run:
        print(cfg.to_yaml())
        print(estimate_memory(cfg, processes=args.processes, fsdp=False if args.no_fsdp else None).report())
        return
    if args.allow_config_change and not args.resume:
        raise ConfigError(f"{preflight.ALLOW_FLAG} goes with --resume (it continues a run with changed settings)")
    extra = {"allow_config_change": True} if args.allow_config_change else {}
    result = pipeline.run_training(cfg, resume=args.resume, overwrite=args.overwrite, **extra)
    print(train_report(result["summary"]))


def _num(x, percent: bool = False) -> str:
    if not isinstance(x, int | float) or not math.isfinite(x):
        return "–"
    return f"{100 * x:.1f} %" if percent else f"{x:.3g}"


# (label, key in the evaluation records, as a percentage) of the lines "start -> end" of train_report
_REPORT_ROWS = (
    ("greedy accuracy", "eval/greedy_accuracy", True),
    ("sampled pass@1 (eval.top_p)", "eval/sampled_accuracy", True),
    ("responses with a tail token", "eval/tail_response_frac", True),
    ("mass outside the top 10", "eval/mass_outside_top10", False),
    ("mass outside the 0.99 nucleus", "eval/mass_outside_nucleus", False),
    ("entropy (global, nats)", "eval/entropy_global", False),
)


def train_report(summary: dict) -> str:
    """A few lines for a person: held-out accuracies and tail metrics at the start and the end, the training
    batches' tail, and where the metrics, checkpoints and model are, and how to plot them (the full summary is
    ``summary.json`` in the output directory)."""
    out = Path(str(summary.get("output_dir", ".")))
    start, end = summary.get("eval_start") or {}, summary.get("eval_final") or {}
    method, coef, secs = summary.get("regularizer", "?"), summary.get("coef"), summary.get("seconds_total")
    if coef and method in ("entropy", "tre-k", "tre-p"):
        method += f" (coef {coef:g})"
    if isinstance(secs, int | float):
        method += f" in {secs:.0f} s" if secs < 120 else f" in {secs / 60:.1f} min"
    lines = [f"tre-edu: trained {summary.get('steps', '?')} PPO steps with {method}"]
    rows = list(_REPORT_ROWS)
    ks = sorted(int(k[len("eval/pass@") :]) for k in {*start, *end} if k.startswith("eval/pass@"))
    if ks:
        rows.insert(2, (f"pass@{ks[-1]}", f"eval/pass@{ks[-1]}", True))
    shown = [(label, key, pct) for label, key, pct in rows if key in start or key in end]
    if shown:
        lines.append(f"  held-out, step {start.get('step', 0)} -> step {end.get('step', '?')}:")
        lines += [f"    {label:<31} {_num(start.get(k), pct):>9} -> {_num(end.get(k), pct)}" for label, k, pct in shown]
    train = summary.get("train_last10pct") or {}
    if train:
        lines.append(
            f"  training batches, last 10 % of steps: reward {_num(train.get('reward/mean'))}, mass outside the top "
            f"10 {_num(train.get('tail/mass_outside_top10'))}, top-1 probability {_num(train.get('tail/top1_prob'))}"
        )
    if summary.get("skipped_updates"):
        lines.append(f"  skipped optimiser steps (non-finite gradients): {summary['skipped_updates']}")
    if summary.get("data_source") in ("generated", "bundled"):
        lines.append(f"  data: {summary['data_source']} (offline), not comparable with the paper's numbers")
    lines += [
        f"  metrics:     {out / 'metrics.jsonl'} (one JSON line per step and per evaluation)",
        f"  summary:     {out / 'summary.json'}",
        f"  checkpoints: {out / 'checkpoints'} (continue with --resume)",
        f"  model:       {out / 'final'} (tre-edu eval --model-dir {out / 'final'})",
        f"  plot:        tre-edu plot {out} (writes {out / 'figures.html'}; or notebooks/04_countdown.ipynb)",
    ]
    return "\n".join(lines)


def cmd_plot(args: argparse.Namespace) -> None:
    from tre_edu.viz import comparison_figure, load_recorded_runs

    runs = load_recorded_runs(args.path)
    if not runs:
        raise ConfigError(f"no finished run under {args.path} (no summary.json); give a tre-edu train --output-dir")
    target = Path(args.out or Path(args.path) / "figures.html")
    fig = comparison_figure(runs, title=f"{args.path}: accuracy and tail mass")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".png":
        fig.write_image(target, width=1200, height=450)
    else:
        fig.write_html(target, include_plotlyjs=True)  # self-contained: opens offline
    print(f"tre-edu: wrote {target} ({len(runs)} run(s): final accuracy, accuracy and tail mass per step)")


def cmd_sft(args: argparse.Namespace) -> None:
    cfg = _config(args)
    out = pipeline.run_warm_start(cfg, output_dir=getattr(args, "output_dir", None) or f"{cfg.output_dir}/warm_start")
    print(json.dumps(out["summary"], indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if not Path(args.model_dir).is_dir():
        raise ConfigError(f"not found: {args.model_dir} (a model directory, e.g. <output_dir>/final of tre-edu train)")
    preflight.check_model_dir(args.model_dir)
    print(json.dumps(pipeline.run_eval(cfg, model_dir=args.model_dir, n=args.n), indent=2))


def cmd_bench(args: argparse.Namespace) -> None:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"bench_{args.which.replace('-', '_')}.py"
    if not script.is_file():
        raise ConfigError(f"not found: {script} (the benchmarks live in the source checkout)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def cmd_train_rm(args: argparse.Namespace) -> None:
    cfg = RewardModelConfig(**{k: v for k, v in vars(args).items() if k in _RM_KEYS})
    with contextlib.redirect_stdout(sys.stderr):  # TRL logs to stdout; the result alone goes there, as JSON
        result = pipeline.train_reward_model(cfg)
    print(json.dumps(result, indent=2, default=str))


def cmd_study(args: argparse.Namespace) -> int:
    if args.action == "run":
        only: dict[str, list[str]] = {}
        for item in args.only or []:
            axis, sep, values = item.partition("=")
            if not sep or not axis or not values:
                raise ValueError(f"--only takes AXIS=VALUE[,VALUE...] (e.g. seed=0 or tail=20000); got {item!r}")
            only.setdefault(axis, []).extend(values.split(","))
        out = study.run_study(args.path, workers=args.workers, only=only or None)
        print(json.dumps(out, indent=2, default=str))
        if out.get("failed"):  # finished cells are kept; the study can be run again for the failed ones
            print(f"tre-edu: {len(out['failed'])} study job(s) failed: {', '.join(out['failed'])}", file=sys.stderr)
            return 1
        return 0
    print(study.report(args.path, figures_dir=args.figures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tre-edu", description="PPO for language models with Trust Region Entropy")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_command(name: str, help: str, func) -> argparse.ArgumentParser:
        usage = f"tre-edu {name} [-c FILE]... [--section.field VALUE]... [--set KEY=VALUE]... [options]"
        p = sub.add_parser(name, help=help, description=help, usage=usage)
        p.add_argument("--config", "-c", action="append", help="YAML config; repeat to merge files left to right")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
        _add_fields(p, TrainConfig, "settings (any field of tre_edu/config.py)")
        p.set_defaults(func=func)
        return p

    p = config_command("train", "PPO training (after the warm start when sft.enabled)", cmd_train)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    again.add_argument("--overwrite", action="store_true", help="replace what a non-empty output_dir holds")
    p.add_argument(
        preflight.ALLOW_FLAG,
        action="store_true",
        help="with --resume: continue even though training settings changed (the old config.yaml is kept in "
        "config_history.yaml); without it such a resume is refused, naming the settings",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and a memory estimate")
    p.add_argument("--processes", type=int, default=1, help="dry run: N GPUs (FSDP if N > 1)")
    p.add_argument("--no-fsdp", action="store_true", help="dry run: DDP, no sharding")
    config_command("sft", "supervised warm start of the tiny model on solver-made solutions", cmd_sft)
    p = config_command("eval", "held-out accuracy of a saved model (greedy and sampled pass@1)", cmd_eval)
    p.add_argument("--model-dir", required=True, help="a directory written by save_pretrained")
    p.add_argument("--n", type=int, default=None, help="held-out examples (default: task.eval_size)")

    p = sub.add_parser("plot", help="plot a run's (or a folder of runs') accuracy and tail mass to an HTML file")
    p.add_argument("path", metavar="OUTPUT_DIR", help="the --output-dir of tre-edu train (or a folder of runs)")
    p.add_argument("--out", metavar="FILE", help="where to write (default OUTPUT_DIR/figures.html; .png: an image)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("bench", help="run a benchmark script (entropy, sampling, ppo-step)")
    p.add_argument("which", choices=["entropy", "sampling", "ppo-step"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("train-rm", help="train a scalar reward model on preference pairs (HH / UltraFeedback)")
    _add_fields(p, RewardModelConfig, "reward-model settings", dashed=True)
    p.set_defaults(func=cmd_train_rm)

    p = sub.add_parser("study", help="a study: many runs from one file, and its report")
    studies = p.add_subparsers(dest="action", required=True)
    p = studies.add_parser("run", help="run (or continue) every run of a study file")
    p.add_argument("path", metavar="CONFIG")
    p.add_argument("--workers", type=int, default=1, help="runs at once")
    p.add_argument(
        "--only", action="append", metavar="AXIS=V[,V]", help="run just these cells first (repeatable), e.g. seed=2"
    )
    p.set_defaults(func=cmd_study)
    p = studies.add_parser("report", help="print a study's markdown report")
    p.add_argument("path", metavar="DIR")
    p.add_argument("--figures", metavar="OUTDIR", help="also write its figures here")
    p.set_defaults(func=cmd_study)
    return parser


_OFFLINE = re.compile(r"could not load (.+?) \((?:\w+Error: )?(.*?)\); offline: falling back to (.+), NOT comparable")


def _one_line_warnings():
    """A ``warnings.showwarning`` that prints ``tre-edu: warning: <message>`` (no source line, which reads like a
    crash), and the offline data fallback once per dataset as ``tre-edu: offline: ...``."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        if m := _OFFLINE.search(text):
            what = re.sub(r" split '\w+'", "", m.group(1))
            instead = re.sub(r"\(\d+ for split '\w+', ", "(", m.group(3))
            text = f"offline: {what} is not available ({m.group(2)}); using {instead}, NOT comparable with the paper"
            prefix = "tre-edu: "
        else:
            prefix = f"tre-edu: warning: {'' if category is UserWarning else category.__name__ + ': '}"
        if text not in seen:
            seen.add(text)
            print(prefix + text, file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run ``tre-edu``; a user error (bad file, value or path) prints one line and returns 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings()
        try:
            args = build_parser().parse_args(argv)
            return args.func(args) or 0  # a command returns None (success) or its exit status
        except (ValueError, OSError) as err:
            from tqdm import tqdm

            for bar in list(getattr(tqdm, "_instances", ())):  # the error goes on a line of its own, not after a bar
                with contextlib.suppress(Exception):
                    bar.close()
            print(f"tre-edu: error: {err}".replace("\n", " "), file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
