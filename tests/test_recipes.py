"""The paper's GPU recipes (configs/paper): every task x model x method resolves to the paper's settings, and
`tre-edu train --dry-run` works offline for each (the Qwen2.5 shapes are known without the hub)."""

import itertools
from pathlib import Path

import pytest
import yaml

from tre_edu.cli import main
from tre_edu.config import load_config
from tre_edu.regularizers import effective_coef

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"
# PAPER.md: max response tokens and epochs over the 7,500 training prompts, 512 prompts per step; the scripts drop the
# last partial batch, so a step count is 7,500 // 512 = 14 steps per epoch times the epochs: 420 / 406 / 2,800.
TASKS = {"math": (8192, 420, 30), "countdown": (512, 406, 29), "hh": (1024, 2800, 200)}
TRAIN_PROMPTS, PROMPTS_PER_STEP = 7500, 512
# The paper's scripts' actor micro-batch per GPU (issue 10), by task and model; Qwen2.5-0.5B (ours) takes the 1.5B one.
MICRO = {
    ("math", "qwen2.5-1.5b"): 8,
    ("math", "qwen2.5-7b"): 4,
    ("countdown", "qwen2.5-1.5b"): 16,
    ("countdown", "qwen2.5-7b"): 16,
    ("countdown", "qwen2.5-0.5b"): 16,
    ("hh", "qwen2.5-1.5b"): 16,
    ("hh", "qwen2.5-7b"): 8,
}
MODELS = {
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
}
METHODS = {
    "ppo": {"kind": "none"},
    "entropy": {"kind": "entropy", "coef": 0.001},
    "forking": {"kind": "forking", "forking_ratio": 0.2, "selection": "microbatch"},
    "kl-cov": {"kind": "kl-cov", "cov_ratio": 0.002, "kl_cov_coef": 1.0, "selection": "microbatch"},
    "tre-k": {"kind": "tre-k", "coef": 0.001, "k": 2, "rescale": True},
    "tre-p": {"kind": "tre-p", "coef": 0.001, "p": 0.99, "max_candidates": 256, "rescale": True},
}
# The paper's models on every task; Qwen2.5-0.5B is our extra, cheaper Countdown recipe.
COMBOS = [(t, m, k) for t, m, k in itertools.product(TASKS, MODELS, METHODS) if m != "qwen2.5-0.5b" or t == "countdown"]


def _files(task, model, method):
    return [
        str(PAPER / f"{task}.yaml"),
        str(PAPER / "methods" / f"{method}.yaml"),
        str(PAPER / "models" / f"{model}.yaml"),
    ]


def test_the_recipe_files_exist():
    assert sorted(p.stem for p in (PAPER / "methods").glob("*.yaml")) == sorted(METHODS)
    # smollm2-135m is the CPU-sized real model of issue 12 (tests/test_smollm2.py), not a paper recipe
    assert sorted(p.stem for p in (PAPER / "models").glob("*.yaml")) == sorted([*MODELS, "smollm2-135m"])
    for name in ("ddp_8gpu", "fsdp_8gpu"):
        acc = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())
        assert acc["num_processes"] == 8 and acc["mixed_precision"] == "bf16"
    assert acc["distributed_type"] == "FSDP" and acc["fsdp_config"]["fsdp_version"] == 2  # what test_fsdp.py runs
    for name in ("forking", "kl-cov"):  # the selection pool is explicit where the method selects tokens
        text = yaml.safe_load((PAPER / "methods" / f"{name}.yaml").read_text())
        assert text["regularizer"]["selection"] == "microbatch"


@pytest.mark.parametrize("task,model,method", COMBOS)
def test_recipe_has_the_paper_settings(task, model, method):
    cfg = load_config(_files(task, model, method))
    max_new, steps, epochs = TASKS[task]
    p = cfg.ppo
    assert cfg.task.name == task and cfg.task.style == "chat"
    assert cfg.model.name == MODELS[model]
    assert cfg.model.critic == "separate" and cfg.model.gradient_checkpointing and not cfg.sft.enabled
    assert (p.prompts_per_step, p.samples_per_prompt) == (512, 8)
    assert p.minibatch_size == 512 and p.ppo_epochs == 1  # 64 prompts x 8 -> 8 optimiser steps per PPO step
    assert (p.actor_lr, p.critic_lr, p.critic_warmup_ratio, p.weight_decay) == (1e-6, 1e-5, 0.05, 0.01)
    assert (p.clip_low, p.clip_high, p.dual_clip, p.grad_clip, p.value_clip) == (0.2, 0.2, 3.0, 1.0, 0.5)
    assert (p.gamma, p.lam, p.advantage, p.whiten_advantages, p.agg) == (1.0, 1.0, "gae", True, "token-mean")
    assert p.kl_coef == 0.0 and not p.kl_in_reward
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)
    assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.sampled) == (1.0, 0.7, True)
    assert p.mixed_precision == "bf16"
    assert p.max_new_tokens == max_new
    assert p.steps == (TRAIN_PROMPTS // PROMPTS_PER_STEP) * epochs == steps
    assert p.micro_batch_size == MICRO[task, model]
    assert p.minibatch_size % p.micro_batch_size == 0 and (p.minibatch_size // 8) % p.micro_batch_size == 0
    reg = cfg.regularizer
    for key, value in METHODS[method].items():
        assert getattr(reg, key) == value, key
    if method in ("tre-k", "tre-p"):
        assert effective_coef(reg, 151936) == pytest.approx(0.001 * 11.931 / 0.6931, rel=1e-3)  # ~0.017
    if task == "hh":
        assert cfg.task.options["source"] == "ultrafeedback" and cfg.task.options["reward_model"]


@pytest.mark.parametrize("task,model,method", COMBOS)
def test_dry_run_works_offline(task, model, method, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["train"] + [a for f in _files(task, model, method) for a in ("-c", f)] + ["--dry-run", "--processes", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("memory estimate")[0])
    assert resolved["model"]["name"] == MODELS[model] and resolved["ppo"]["max_new_tokens"] == TASKS[task][0]
    assert "FSDP full shard over 8" in out and "peak GPU" in out


def test_hh_comment_names_real_train_rm_flags():
    from tre_edu.cli import build_parser

    text = (PAPER / "hh.yaml").read_text()
    assert "--data" not in text and "tre-edu train-rm --source ultrafeedback" in text
    line = " ".join(ln.strip("# \\") for ln in text.splitlines() if "train-rm" in ln or "--output-dir runs/rew" in ln)
    args = build_parser().parse_args(line[line.index("train-rm") :].split())
    assert args.source == "ultrafeedback" and args.output_dir.startswith("runs/reward_model/")


def test_methods_compose_with_overrides():
    cfg = load_config(_files("math", "qwen2.5-7b", "entropy"), ["regularizer.coef=0.01", "ppo.steps=3"])
    assert cfg.regularizer.coef == 0.01 and cfg.ppo.steps == 3 and cfg.ppo.max_new_tokens == 8192


def test_python_dash_m_cli_runs():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "tre_edu.cli", "train", "-c", str(PAPER / "countdown.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "memory estimate per process (1 process(es), no sharding" in out.stdout


def test_gpu_check_cpu_smoke():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASS (a)") == 4 and "FAIL" not in out.stdout
