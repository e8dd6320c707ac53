"""Record a few PPO steps of SmolLM2-135M-Instruct (V = 49,152) on Countdown with the global entropy bonus, TRE-K at
the same effective weight and no bonus, one JSON-lines file per (method, seed) under ``data/smollm2_leak/``.

Each file: a header line (``{"kind": "header", ...}``: the config, the coefficients, the fixed contexts and their
tail metrics at the pretrained weights, the machine) and one line per PPO step (``{"kind": "step", "step": i,
"metrics": {...}, "probe": {...}, "responses": [...]}``). ``metrics`` are the trainer's (``trainer.history``),
measured on the responses the step sampled at the weights it started from (step 1: the pretrained model);
``probe`` holds the tail metrics of the weights after the step's update on the fixed contexts (held-out prompts with
one response each, sampled once from the pretrained weights, the same for every method of a seed), which have no
sampling noise. :mod:`tre_edu.viz.llm_leak` reads and draws the files. A cell is written to a temporary file and
renamed into place when it is complete; finished cells are skipped, so the script can be stopped and restarted.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python scripts/record_smollm2_leak.py

The defaults are the recorded setting (data/smollm2_leak/README.md). Notebook 01 imports :func:`run_cell` and
:class:`Setting` to run the same cells live at smaller sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # no network: hub calls would hang
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
METHOD_FILES = {"none": "ppo.yaml", "entropy": "entropy.yaml", "tre-k": "tre-k.yaml"}
VOCAB = 49_152  # SmolLM2's LM-head width (checked against the loaded model)


@dataclass
class Setting:
    """What a cell runs: the paper's Countdown recipe for SmolLM2 (configs/paper/models/smollm2-135m.yaml) with
    these sizes. ``coef`` is the *effective* weight of the entropy term (global-entropy units): the global bonus
    takes it as is, TRE-K gets ``coef * log 2 / log V`` in the paper's units (:func:`method_coef`)."""

    coef: float = 0.1
    lr: float = 3e-5
    steps: int = 5
    prompts: int = 2
    samples: int = 2
    tokens: int = 48
    probe_prompts: int = 4
    advantage: str = "grpo"
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("coef", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("steps", "prompts", "samples", "tokens", "probe_prompts", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.advantage not in ("gae", "grpo"):
            raise ValueError(f"advantage must be one of gae, grpo; got {self.advantage!r}")


def method_coef(method: str, effective: float, vocab_size: int = VOCAB) -> float:
    """The coefficient of ``method`` in the paper's units whose effective weight is ``effective``
    (:meth:`tre_edu.regularizers.Regularizer.effective_coef`): the global bonus takes it as is, TRE-K (K = 2,
    rescaled by log V / log 2) takes effective * log 2 / log V; no bonus: 0."""
    from tre_edu.regularizers import Regularizer

    if method not in METHOD_FILES:
        raise ValueError(f"method must be one of {', '.join(METHOD_FILES)}; got {method!r}")
    if method == "none":
        return 0.0
    return effective / Regularizer(kind=method, coef=1.0, k=2).effective_coef(vocab_size)


def cell_config(method: str, seed: int, setting: Setting, output_dir: str | Path):
    """The run's config: configs/paper/{countdown, methods/<method>, models/smollm2-135m}.yaml with the setting."""
    from tre_edu.config import load_config

    files = [PAPER / "countdown.yaml", PAPER / "methods" / METHOD_FILES[method], PAPER / "models/smollm2-135m.yaml"]
    s, batch = setting, setting.prompts * setting.samples
    overrides = {
        "seed": seed,
        "threads": s.threads,
        "regularizer.coef": method_coef(method, s.coef),
        "ppo.steps": s.steps,
        "ppo.actor_lr": s.lr,
        "ppo.critic_lr": s.lr,
        "ppo.critic_warmup_ratio": 0.0,
        "ppo.prompts_per_step": s.prompts,
        "ppo.samples_per_prompt": s.samples,
        "ppo.minibatch_size": batch,  # one optimiser step per PPO step
        "ppo.micro_batch_size": batch,
        "ppo.rollout_batch_size": batch,
        "ppo.max_new_tokens": s.tokens,
        "ppo.advantage": s.advantage,
        "ppo.whiten_advantages": s.advantage == "gae",
        "model.critic": "value-head",  # grpo needs no critic; gae: a value head on the actor (no second model)
        "output_dir": str(output_dir),
    }
    return load_config([str(f) for f in files], overrides)


def probe_contexts(trainer, cfg, n: int, tokens: int, seed: int):
    """``n`` held-out prompts with one response each, sampled once from the current (pretrained) weights at
    temperature 1 with a fixed generator: the contexts the tail is measured on after every update. Returns
    (the rollout, the decoded responses, where the prompts came from)."""
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
    return ro, decode_responses(tok, ro), examples[0].get("source") if examples else None


def probe_metrics(actor, ro) -> dict[str, float]:
    """Tail metrics of the current weights on the fixed contexts (teacher-forced, no sampling noise)."""
    import torch

    from tre_edu.entropy import tail_metrics
    from tre_edu.policy import response_logits

    with torch.no_grad():
        logits, _ = response_logits(actor, ro.input_ids, ro.attention_mask, ro.response_len)
    return tail_metrics(logits, ro.response_mask.float(), p=0.99, top_k=2)


def run_cell(
    method: str,
    seed: int,
    setting: Setting,
    output_dir: str | Path,
    on_step: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Build the trainer from the pretrained weights, measure the fixed contexts, then ``setting.steps`` PPO steps;
    returns the cell's records (header first). ``on_step(records so far)`` is called after the header and after
    every step (a notebook redraws there). ``output_dir``: the trainer's run folder (nothing is saved there unless
    the trainer checkpoints; the caller deletes it)."""
    import warnings

    import tre_edu
    from tre_edu.pipeline import build_trainer
    from tre_edu.regularizers import Regularizer

    cfg = cell_config(method, seed, setting, output_dir)
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # offline, Countdown falls back to generated puzzles: said once in the header
        warnings.filterwarnings("ignore", message="could not load", category=UserWarning)
        trainer = build_trainer(cfg, log_jsonl=False, progress=False)
        probe, probe_texts, source = probe_contexts(trainer, cfg, setting.probe_prompts, setting.tokens, seed)
    vocab = trainer.actor.get_output_embeddings().weight.shape[0]
    if vocab != VOCAB:
        raise RuntimeError(f"expected SmolLM2's V = {VOCAB}; the loaded model has {vocab}")
    records = [
        {
            "kind": "header",
            "method": method,
            "seed": seed,
            "coef": cfg.regularizer.coef,
            "effective_coef": Regularizer(cfg.regularizer).effective_coef(vocab),
            "vocab_size": vocab,
            "setting": dataclasses.asdict(setting),
            "data_source": source,  # offline: generated puzzles, the paper's prompt
            "probe_responses": probe_texts,
            "probe": probe_metrics(trainer.actor, probe),
            "load_seconds": round(time.perf_counter() - t0, 1),
            "config": cfg.to_dict(),
            "tre_edu": str(Path(tre_edu.__file__).parent),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        }
    ]
    if on_step:
        on_step(records)
    for _ in range(setting.steps):
        metrics = trainer.train_step()
        responses = list(trainer.last_batch.get("responses", []))
        step = {"kind": "step", "step": trainer.step, "metrics": metrics, "responses": responses}
        step["probe"] = probe_metrics(trainer.actor, probe)
        records.append(step)
        if on_step:
            on_step(records)
    return records


def describe_step(method: str, seed: int, record: dict) -> str:
    """One line per step for a log: the fixed-context tail after the update, the rollout's, a sample."""
    p, m = record["probe"], record["metrics"]
    return (
        f"  {method} s{seed} step {record['step']}: after the update, outside top-10 "
        f"{p['tail/mass_outside_top10']:.3f}, outside nucleus {p['tail/mass_outside_nucleus_p99']:.3f}, "
        f"H {p['entropy/global']:.2f}, H_TRE-K {p['entropy/tre_k']:.2f} | its rollout: sampled outside top-2 "
        f"{m['tail/sampled_outside_top2']:.3f}, reward {m['reward/mean']:.2f}, {m['time/step']:.0f} s\n"
        f"    {(record['responses'] or [''])[0][:160]!r}"
    )


def write_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    d = Setting()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["entropy", "tre-k", "none"], choices=list(METHOD_FILES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--coef", type=float, default=d.coef, help="effective weight of the entropy term (global units)")
    ap.add_argument("--lr", type=float, default=d.lr, help="actor learning rate (AdamW)")
    ap.add_argument("--steps", type=int, default=d.steps, help="PPO steps per cell")
    ap.add_argument("--prompts", type=int, default=d.prompts, help="prompts per step")
    ap.add_argument("--samples", type=int, default=d.samples, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=d.tokens, help="response budget (max_new_tokens)")
    ap.add_argument("--probe-prompts", type=int, default=d.probe_prompts, help="held-out prompts of the fixed contexts")
    ap.add_argument("--advantage", default=d.advantage, choices=("gae", "grpo"))
    ap.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    ap.add_argument("--out", default=str(ROOT / "data" / "smollm2_leak"), help="folder of the cells")
    args = ap.parse_args(argv)
    try:
        setting = Setting(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Setting)})
    except ValueError as err:
        ap.error(f"--{str(err).replace('_', '-')}")
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
            n_logged = 1

            def log(records: list[dict], method=method, seed=seed) -> None:
                nonlocal n_logged
                for r in records[n_logged:]:
                    print(describe_step(method, seed, r), flush=True)
                n_logged = len(records)

            records = run_cell(method, seed, setting, out / ".runs" / f"{method}_s{seed}", on_step=log)
            records[0]["argv"] = sys.argv[1:]
            write_atomic(path, records)
            shutil.rmtree(out / ".runs", ignore_errors=True)
            print(f"{path.name}: written ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
