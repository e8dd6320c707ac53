"""The tail leak reproduced by a second trainer: TRL's GRPOTrainer (through tre_edu.integrations.trl) on the tiny
Countdown model with a 20,000-token vocabulary tail, warm-started as tre_edu's tail_leak study does, with no bonus,
the global entropy bonus (0.01) and TRE-K at the same effective weight (0.0007 * log V / log 2 = 0.01), 3 seeds, the
same puzzles for every method of a seed. One JSON-lines file per (method, seed) under ``data/trl_leak/``:

- ``{"kind": "header", ...}``: the method, coefficients, TRL settings, versions, the warm start's sha256 and its
  held-out evaluation (computed once per seed, the same for every method);
- ``{"kind": "log", "step": ..., "metrics": {...}}``: TRL's log of every optimiser step (its own metrics plus the
  adapter's entropy / tail metrics and ``tail/response_frac`` of the sampled completions);
- ``{"kind": "final", "eval": {...}, "seconds": ...}``: the held-out evaluation after training.

A cell is written to ``<cell>.jsonl.part`` and renamed when complete; finished cells are skipped, so the script can
be stopped and started again (warm starts are kept in the git-ignored ``runs/trl_leak/``).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python scripts/record_trl_leak.py            # the recorded comparison
    .venv/bin/python scripts/record_trl_leak.py --report                              # the table of data/trl_leak
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # no network: hub calls would hang
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs/studies/tail_leak.yaml"
TAIL, HORIZON = 20_000, "think"
GLOBAL_COEF = 0.01  # tre_edu's study: the global bonus at 0.01 leaked in 3 of 3 seeds at tail 20,000 / think
LEAK_FRAC = 0.5  # tre_edu.study.LEAK_FRAC: a run leaked when >= half its sampled held-out responses hold a tail token


def method_settings(method: str, vocab_size: int) -> tuple[str, float]:
    """(tre_kind, entropy_coef) of a method; TRE-K (K = 2, rescaled) gets the global bonus's effective weight."""
    if method == "none":
        return "entropy", 0.0  # plain GRPO (the adapter still logs the tail metrics; the bonus is off)
    if method == "entropy":
        return "entropy", GLOBAL_COEF
    if method == "tre-k":
        return "tre-k", round(GLOBAL_COEF * math.log(2) / math.log(vocab_size), 5)  # 0.0007 at V = 20,033
    raise ValueError(f"method must be none, entropy or tre-k; got {method!r}")


def warm_start(seed: int, runs: Path):
    """The study's warm start for (tail 20,000, think, seed): trained once, kept in ``runs``; returns (cfg, dir)."""
    from tre_edu.pipeline import run_warm_start
    from tre_edu.study import cell_config, load_study

    cell = {"tail": TAIL, "horizon": HORIZON, "method": "none", "seed": seed}
    # the warm start's own greedy check runs on 100 held-out puzzles (the study: 500); it does not change the weights
    cfg = cell_config(load_study(STUDY), cell).replace({"task.eval_size": 100})
    out = runs / "warm" / f"seed-{seed}"
    if not (out / "config.json").is_file():  # run_warm_start writes the folder atomically (complete or absent)
        t0 = time.perf_counter()
        res = run_warm_start(cfg, out, progress=False)
        print(f"warm start seed {seed}: {time.perf_counter() - t0:.0f} s, {res['summary']['final']}", flush=True)
    return cfg, out


def evaluate_model(model, tokenizer, cfg, n_eval: int, pass_k: int) -> dict:
    """tre_edu's held-out evaluation (greedy; ``pass_k`` samples at T = 1 for pass@k and the tail metrics) on the
    first ``n_eval`` test puzzles of the seed."""
    from tre_edu.evaluation import evaluate
    from tre_edu.models.tiny import tail_start
    from tre_edu.pipeline import build_task

    task = build_task(cfg)
    examples = task.load("test", n=n_eval, seed=cfg.seed)
    ev = cfg.replace({"eval.sampled": False, "eval.pass_k": pass_k}).eval
    return evaluate(model, tokenizer, task, examples, ev, style=cfg.task.style, max_new_tokens=cfg.ppo.max_new_tokens,
                    seed=cfg.seed, tail_start=tail_start(tokenizer))  # fmt: skip


def warm_eval(cfg, warm_dir: Path, n_eval: int, pass_k: int) -> dict:
    f = warm_dir / f"trl_leak_eval_{n_eval}_{pass_k}.json"
    if not f.is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(warm_dir)
        res = evaluate_model(model, AutoTokenizer.from_pretrained(warm_dir), cfg, n_eval, pass_k)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # two processes of one seed may evaluate at once
        tmp.write_text(json.dumps(res))
        tmp.replace(f)
    return json.loads(f.read_text())


def run_cell(method: str, seed: int, args: argparse.Namespace) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from tre_edu.integrations.trl import TREGRPOConfig, TREGRPOTrainer, task_reward
    from tre_edu.pipeline import build_task
    from tre_edu.study import code_version, warm_fingerprint

    out = args.out / f"method-{method}_seed-{seed}.jsonl"
    if out.is_file():
        print(f"skip {out.name} (recorded)", flush=True)
        return
    part = out.with_name(out.name + ".part")
    if part.is_file() and time.time() - part.stat().st_mtime < 900:
        print(f"skip {out.name} (another process is writing {part.name})", flush=True)
        return
    torch.set_num_threads(1)
    cfg, warm_dir = warm_start(seed, args.runs)
    start_eval = warm_eval(cfg, warm_dir, args.eval_size, args.pass_k)
    tokenizer = AutoTokenizer.from_pretrained(warm_dir)
    model = AutoModelForCausalLM.from_pretrained(warm_dir)
    V = model.get_output_embeddings().weight.shape[0]
    kind, coef = method_settings(method, V)
    task = build_task(cfg)
    p = cfg.ppo
    prompts_per_step = p.prompts_per_step
    puzzles = task.load("train", n=args.steps * prompts_per_step, seed=seed)  # the same puzzles for every method
    rows = [{"prompt": task.prompt(e, tokenizer, cfg.task.style), "numbers": e["numbers"], "target": e["target"]}
            for e in puzzles]  # fmt: skip
    steps_per_generation = p.prompts_per_step * p.samples_per_prompt // p.minibatch_size  # 2 optimiser steps
    targs = TREGRPOConfig(
        output_dir=str(args.runs / "cells" / out.stem),
        # what this comparison sets (the study's recipe): batch, horizon, steps, learning rate and its schedule
        per_device_train_batch_size=p.minibatch_size,  # 32 completions per optimiser step
        steps_per_generation=steps_per_generation,  # 8 puzzles x 8 samples per generation: 2 optimiser steps
        num_generations=p.samples_per_prompt,
        max_completion_length=p.max_new_tokens,  # 48 (think)
        max_steps=args.steps * steps_per_generation,
        learning_rate=p.actor_lr,  # 1e-4 (TRL's 1e-6 would barely move the tiny model in 60 steps)
        lr_scheduler_type="constant",  # the study's constant rate (TRL: linear decay)
        temperature=p.temperature,
        seed=seed,
        data_seed=seed,
        # CPU: TRL's bf16 default needs a GPU; float32 keeps the log-probs exact
        bf16=False,
        use_cpu=True,
        # kept TRL defaults: loss_type="dapo" (token-level mean, as the study's token-mean), scale_rewards="group"
        # (advantages divided by the group's std; the study: group mean only), beta=0.0 (no KL, as the study),
        # epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0 (study: 0.01)
        entropy_coef=coef,
        tre_kind=kind,
        tre_k=cfg.regularizer.k,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    meta = {
        "method": method, "seed": seed, "tail": TAIL, "horizon": HORIZON, "vocab_size": V, "tre_kind": kind,
        "entropy_coef": coef, "effective_coef": targs.effective_coef(V), "steps": args.steps,
        "trl": {k: str(getattr(targs, k)) for k in ("loss_type", "scale_rewards", "beta", "epsilon", "learning_rate",
                "lr_scheduler_type", "weight_decay", "max_grad_norm", "per_device_train_batch_size",
                "steps_per_generation", "num_generations", "max_completion_length", "max_steps", "bf16")},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "tre_edu": code_version(ROOT), "python": platform.python_version()},
        "warm_start": {"sha256": warm_fingerprint(warm_dir), "eval": start_eval},
        "eval_size": args.eval_size, "pass_k": args.pass_k,
    }  # fmt: skip
    part.unlink(missing_ok=True)
    with part.open("w") as f:
        f.write(json.dumps({"kind": "header", **meta}) + "\n")

    class Lines(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                with part.open("a") as f:
                    f.write(json.dumps({"kind": "log", "step": state.global_step, "metrics": logs}) + "\n")

    t0, c0 = time.perf_counter(), time.process_time()
    trainer = TREGRPOTrainer(model=model, reward_funcs=task_reward(task, tokenizer), args=targs,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[Lines()])  # fmt: skip
    trainer.train()
    train_s = time.perf_counter() - t0
    final = evaluate_model(trainer.model, tokenizer, cfg, args.eval_size, args.pass_k)
    with part.open("a") as f:
        line = {
            "kind": "final",
            "eval": final,
            "seconds_train": round(train_s, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        }
        f.write(json.dumps(line) + "\n")
    part.rename(out)
    shutil.rmtree(targs.output_dir, ignore_errors=True)
    print(f"{out.name}: {line['seconds']} s, greedy {final.get('greedy_accuracy')}, "
          f"tail responses {final.get('tail_response_frac')}", flush=True)  # fmt: skip


def load_cells(path: Path) -> list[dict]:
    """One dict per finished cell: the header, the step logs and the final evaluation."""
    cells = []
    for f in sorted(path.glob("*.jsonl")):
        lines = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        head = next(x for x in lines if x["kind"] == "header")
        cells.append({**head, "logs": [x for x in lines if x["kind"] == "log"],
                      "final": next((x for x in lines if x["kind"] == "final"), None)})  # fmt: skip
    return cells


def rollout_tail(logs: list[dict], generations: int = 5) -> float:
    """Mean ``tail/response_frac`` of the sampled training completions over the last ``generations`` generations
    (TRL logs rollout metrics on the first optimiser step of each generation); NaN if none was logged."""
    vals = [x["metrics"]["tail/response_frac"] for x in logs if "tail/response_frac" in x["metrics"]]
    return sum(vals[-generations:]) / len(vals[-generations:]) if vals else float("nan")


def report(path: Path) -> str:
    """Markdown: one row per cell (held-out greedy accuracy, sampled responses holding a tail token and mass outside
    the top 10, each at the warm start -> after training; the training rollouts' tail fraction; leaked?) and the
    number of seeds that leaked per method."""
    cells = load_cells(path)
    out = ["| method | entropy_coef | eff. coef | seed | greedy % | sampled responses with a tail token % | "
           "mass outside top-10 | rollouts with a tail token, last 5 generations % | leaked | CPU min |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    leaks: dict[str, list[bool]] = {}
    order = {"none": 0, "entropy": 1, "tre-k": 2}
    for c in sorted(cells, key=lambda c: (order.get(c["method"], 9), c["seed"])):
        ev, st = c["final"]["eval"], c["warm_start"]["eval"]
        leaked = ev.get("tail_response_frac", 0.0) >= LEAK_FRAC
        leaks.setdefault(c["method"], []).append(leaked)
        out.append(
            f"| {c['method']} | {c['entropy_coef']:g} | {c['effective_coef']:.3g} | {c['seed']} | "
            f"{100 * st['greedy_accuracy']:.1f} -> {100 * ev['greedy_accuracy']:.1f} | "
            f"{100 * st['tail_response_frac']:.1f} -> {100 * ev['tail_response_frac']:.1f} | "
            f"{st['mass_outside_top10']:.2e} -> {ev['mass_outside_top10']:.2e} | {100 * rollout_tail(c['logs']):.1f} | "
            f"{'yes' if leaked else 'no'} | {c['final'].get('cpu_seconds', float('nan')) / 60:.1f} |"
        )
    out.append("")
    out += [f"- {m}: leaked in {sum(v)} of {len(v)} seeds" for m, v in leaks.items()]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["entropy", "tre-k", "none"], choices=["none", "entropy", "tre-k"])
    ap.add_argument("--steps", type=int, default=60, help="generation steps (8 puzzles x 8 samples, 2 optimiser steps)")
    ap.add_argument("--eval-size", type=int, default=100, help="held-out puzzles per evaluation")
    ap.add_argument("--pass-k", type=int, default=2, help="samples per held-out puzzle (T = 1): pass@k, tail metrics")
    ap.add_argument("--out", type=Path, default=ROOT / "data/trl_leak")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs/trl_leak")
    ap.add_argument("--report", action="store_true", help="print the table of the recorded cells and exit")
    args = ap.parse_args()
    if args.report:
        print(report(args.out))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major: each finished seed is a complete comparison
        for method in args.methods:
            run_cell(method, seed, args)
    print(report(args.out))


if __name__ == "__main__":
    main()
