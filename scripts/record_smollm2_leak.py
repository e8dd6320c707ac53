"""Record a few PPO steps of SmolLM2-135M-Instruct (V = 49,152) on Countdown with no bonus, the global entropy bonus
and TRE-K at the same effective weight, one JSON-lines file per (method, seed) under ``data/smollm2_leak/``.

Each file: a header line (``{"kind": "header", ...}``: the config, the coefficients, the machine) and one line per
PPO step (``{"kind": "step", "step": i, "metrics": {...}, "responses": [...]}``; the metrics are those of
``trainer.history``: the tail metrics are measured on the sampled responses at the weights the step starts from,
so step 1 is the pretrained model). A cell is written to a temporary file and renamed into place when it is
complete; finished cells are skipped, so the script can be stopped and started again.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python scripts/record_smollm2_leak.py

The setting (learning rate, coefficient, batch, response length, steps) is recorded in each header and in
``data/smollm2_leak/README.md``; the defaults of this script are the setting recorded there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs/paper/countdown.yaml", None, ROOT / "configs/paper/models/smollm2-135m.yaml"]
METHOD_FILES = {"none": "ppo.yaml", "entropy": "entropy.yaml", "tre-k": "tre-k.yaml"}
VOCAB = 49_152  # SmolLM2's LM-head width (checked against the loaded model)
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # no network: hub calls would hang
    os.environ.setdefault(_var, "1")


def method_coef(method: str, global_coef: float, vocab_size: int = VOCAB) -> float:
    """The coefficient of ``method`` in the paper's units that gives the effective weight ``global_coef``: the global
    bonus takes it as is; TRE-K (K = 2, rescaled by log V / log 2) takes global_coef * log 2 / log V."""
    from tre_edu.config import RegularizerConfig

    if method == "none":
        return 0.0
    unit = RegularizerConfig(kind=method, coef=1.0, k=2).effective_coef(vocab_size)
    return global_coef / unit


def cell_config(method: str, seed: int, args: argparse.Namespace):
    """The run's config: the paper's Countdown recipe for SmolLM2 with this script's overrides."""
    from tre_edu.config import load_config

    if method not in METHOD_FILES:
        raise SystemExit(f"--methods: allowed values are {', '.join(METHOD_FILES)}; got {method!r}")
    files = [str(CONFIGS[0]), str(ROOT / "configs/paper/methods" / METHOD_FILES[method]), str(CONFIGS[2])]
    batch = args.prompts * args.samples
    overrides = {
        "seed": seed,
        "threads": args.threads,
        "regularizer.coef": method_coef(method, args.coef),
        "ppo.steps": args.steps,
        "ppo.actor_lr": args.lr,
        "ppo.critic_lr": args.lr,
        "ppo.critic_warmup_ratio": 0.0,
        "ppo.prompts_per_step": args.prompts,
        "ppo.samples_per_prompt": args.samples,
        "ppo.minibatch_size": batch,
        "ppo.micro_batch_size": batch,
        "ppo.rollout_batch_size": batch,
        "ppo.max_new_tokens": args.tokens,
        "ppo.advantage": args.advantage,
        "ppo.whiten_advantages": args.advantage == "gae",
        "model.critic": args.critic,
        "output_dir": str(Path(args.out) / ".runs" / f"{method}_s{seed}"),
    }
    return load_config(files, overrides)


def probe_contexts(trainer, cfg, n: int, tokens: int, seed: int):
    """``n`` held-out prompts with one response each, sampled once from the pretrained weights at temperature 1
    (the same for every method of a seed): the fixed contexts the tail is measured on after every update."""
    import torch

    from tre_edu.pipeline import build_task
    from tre_edu.rollout import SamplingConfig, decode_responses, eos_token_ids, generate

    task, tok = build_task(cfg), trainer.tokenizer
    examples = task.load("test", n=n, seed=seed)
    ids = [tok(task.prompt(e, tok, cfg.task.style), add_special_tokens=False)["input_ids"] for e in examples]
    gen = torch.Generator().manual_seed(10_000 + seed)
    eos = eos_token_ids(tok, trainer.actor)
    ro = generate(trainer.actor, ids, SamplingConfig(max_new_tokens=tokens), eos_token_id=eos,
                  pad_token_id=tok.pad_token_id, generator=gen)  # fmt: skip
    return ro, decode_responses(tok, ro)


def probe_metrics(actor, ro) -> dict[str, float]:
    """Tail metrics of the current weights on the fixed contexts (teacher-forced, no sampling noise)."""
    import torch

    from tre_edu.entropy import tail_metrics
    from tre_edu.policy import response_logits

    with torch.no_grad():
        logits, _ = response_logits(actor, ro.input_ids, ro.attention_mask, ro.response_len)
    return tail_metrics(logits, ro.response_mask.float(), p=0.99, top_k=2)


def run_cell(method: str, seed: int, args: argparse.Namespace) -> list[dict]:
    from tre_edu.pipeline import build_trainer

    cfg = cell_config(method, seed, args)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, log_jsonl=False, progress=False)
    vocab = trainer.actor.get_output_embeddings().weight.shape[0]
    if vocab != VOCAB:
        raise RuntimeError(f"expected SmolLM2's V = {VOCAB}; the loaded model has {vocab}")
    probe, probe_texts = probe_contexts(trainer, cfg, args.probe_prompts, args.tokens, seed)
    probe0 = probe_metrics(trainer.actor, probe)
    lines = [
        {
            "kind": "header",
            "method": method,
            "seed": seed,
            "coef": cfg.regularizer.coef,
            "effective_coef": cfg.regularizer.effective_coef(vocab),
            "vocab_size": vocab,
            "load_seconds": round(time.perf_counter() - t0, 1),
            "config": cfg.to_dict(),
            "argv": sys.argv[1:],
            "probe_responses": probe_texts,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
            "probe": probe0,
        }
    ]
    for _ in range(args.steps):
        metrics = trainer.train_step()
        resp = trainer.last_batch.get("responses", [])
        probe_m = probe_metrics(trainer.actor, probe)
        lines.append(
            {"kind": "step", "step": trainer.step, "metrics": metrics, "probe": probe_m, "responses": list(resp)}
        )
        m = metrics
        print(
            f"  {method} s{seed} step {trainer.step}: probe after the update: outside top-10 "
            f"{probe_m['tail/mass_outside_top10']:.3f}, outside nucleus {probe_m['tail/mass_outside_nucleus_p99']:.3f}, "
            f"H {probe_m['entropy/global']:.2f}, H_TRE-K {probe_m['entropy/tre_k']:.2f} | rollout: "
            f"outside top-10 {m['tail/mass_outside_top10']:.3f}, "
            f"outside nucleus {m['tail/mass_outside_nucleus_p99']:.3f}, sampled outside top-2 "
            f"{m['tail/sampled_outside_top2']:.3f}, H {m['entropy/global']:.2f}, H_TRE-K {m['entropy/tre_k']:.2f}, "
            f"reward {m['reward/mean']:.2f}, {m['time/step']:.0f} s",
            flush=True,
        )
        print("    " + repr(resp[0][:160]) if resp else "", flush=True)
    return lines


def write_atomic(path: Path, lines: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(line, default=float) + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["none", "entropy", "tre-k"], help="none, entropy, tre-k")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--coef", type=float, default=0.1, help="effective weight of the entropy term (global units)")
    ap.add_argument("--lr", type=float, default=1e-5, help="actor (and critic) learning rate")
    ap.add_argument("--steps", type=int, default=6, help="PPO steps per cell")
    ap.add_argument("--prompts", type=int, default=2, help="prompts per step")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=48, help="response budget (max_new_tokens)")
    ap.add_argument("--advantage", default="grpo", choices=("gae", "grpo"))
    ap.add_argument("--critic", default="value-head", choices=("value-head", "separate"))
    ap.add_argument("--probe-prompts", type=int, default=4, help="held-out prompts of the fixed probe contexts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "data/smollm2_leak"))
    args = ap.parse_args(argv)
    for name in ("coef", "lr"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            ap.error(f"--{name} must be a finite number >= 0")
    for name in ("steps", "prompts", "samples", "tokens", "threads", "probe_prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be an integer >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            path = out / f"{method}_s{seed}.jsonl"
            if path.is_file():
                print(f"{path.name}: done, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            print(f"{path.name}: running", flush=True)
            write_atomic(path, run_cell(method, seed, args))
            print(f"{path.name}: written ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
