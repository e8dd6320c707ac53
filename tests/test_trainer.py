"""End-to-end PPO on the tiny Countdown model: every regulariser runs, metrics are complete, resume is exact."""

import json
import math
from pathlib import Path

import pytest
import torch

from tre_edu.cli import main
from tre_edu.config import load_config
from tre_edu.regularizers import KINDS
from tre_edu.trainer import PPOTrainer

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "countdown_tiny.yaml")

SMALL = [
    "model.tail_tokens=300",
    "model.n_embd=32",
    "model.n_layer=1",
    "model.n_head=2",
    "ppo.prompts_per_step=4",
    "ppo.samples_per_prompt=4",
    "ppo.minibatch_size=8",
    "ppo.micro_batch_size=4",
    "ppo.max_new_tokens=12",
    "ppo.actor_lr=1e-3",
    "ppo.critic_lr=1e-3",
    "task.eval_size=8",
    "task.train_size=64",
    "eval.every=0",
    "eval.sampled=false",
    "sft.enabled=false",
]

EXPECTED_KEYS = {
    "reward/mean",
    "reward/accuracy",
    "policy/clipfrac",
    "policy/approx_kl",
    "value/loss",
    "value/explained_variance",
    "entropy/global",
    "entropy/tre_k",
    "tail/top1_prob",
    "tail/mass_outside_top2",
    "tail/mass_outside_top10",
    "tail/nucleus_size_p99",
    "tail/sampled_outside_top2",
    "grad/actor_norm",
}


def _cfg(tmp_path, *extra):
    return load_config(CONFIG, [*SMALL, f"output_dir={tmp_path}", *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_each_regularizer_trains(tmp_path, kind):
    cfg = _cfg(tmp_path, f"regularizer.kind={kind}", "ppo.steps=2", "regularizer.coef=0.01")
    trainer = PPOTrainer(cfg, progress=False)
    before = [p.detach().clone() for p in trainer.actor.parameters()]
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        assert EXPECTED_KEYS <= set(m), EXPECTED_KEYS - set(m)
        assert all(math.isfinite(v) for v in m.values()), m
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.actor.parameters()))
    assert changed
    assert (tmp_path / "final" / "config.json").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(x).get("kind") == "eval" for x in lines)


def test_grpo_advantage_needs_no_critic(tmp_path):
    cfg = _cfg(tmp_path, "ppo.advantage=grpo", "ppo.steps=1")
    history = PPOTrainer(cfg, progress=False).train()
    assert math.isfinite(history[0]["policy/loss"])


def test_kl_to_reference(tmp_path):
    cfg = _cfg(tmp_path, "ppo.kl_coef=0.1", "ppo.steps=2")
    history = PPOTrainer(cfg, progress=False).train()
    assert "kl/loss" in history[-1] and history[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)


def test_resume_is_exact(tmp_path):
    full = PPOTrainer(_cfg(tmp_path / "a", "ppo.steps=4"), progress=False)
    h_full = full.train()

    first = PPOTrainer(_cfg(tmp_path / "b", "ppo.steps=4", "checkpoint_every=2"), progress=False)
    first.train(steps=2)
    ckpt = first.save_checkpoint()
    second = PPOTrainer(_cfg(tmp_path / "b", "ppo.steps=4"), progress=False)
    h_resumed = second.train(resume_from=ckpt)

    assert len(h_resumed) == 4
    for a, b in zip(h_full, h_resumed):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    for pa, pb in zip(full.actor.parameters(), second.actor.parameters()):
        assert torch.allclose(pa, pb)


def test_cli_train_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "-c", CONFIG, "--steps", "1", "--output-dir", str(out), "--kind", "tre-p"]
    for s in SMALL:
        args += ["--set", s]
    args += ["--set", "sft.enabled=true", "--set", "sft.steps=3", "--set", "sft.examples=64"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regularizer"] == "tre-p" and summary["steps"] == 1
    assert (out / "warm_start" / "config.json").is_file()
    capsys.readouterr()
    ev = ["eval", "-c", CONFIG, "--model-dir", str(out / "final"), "--n", "4"]
    assert main(ev + ["--set", "ppo.max_new_tokens=12"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["greedy_accuracy"] <= 1.0 and res["n"] == 4


def test_cli_dry_run_and_bad_override(capsys):
    assert main(["train", "-c", CONFIG, "--dry-run"]) == 0
    assert "memory estimate" in capsys.readouterr().out
    assert main(["train", "-c", CONFIG, "--set", "ppo.clip_low=7", "--dry-run"]) == 2
    assert "ppo.clip_low" in capsys.readouterr().err


def test_cli_train_rm_tiny(tmp_path, capsys):
    args = [
        "train-rm",
        "--backend",
        "torch",
        "--epochs",
        "1",
        "--lr",
        "1e-3",
        "--n-train",
        "8",
        "--n-test",
        "4",
    ]
    assert main(args + ["--output-dir", str(tmp_path / "rm")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] and 0.0 <= res["test_accuracy"] <= 1.0


def test_separate_critic_with_gradient_checkpointing(tmp_path):
    cfg = _cfg(tmp_path, "model.critic=separate", "model.gradient_checkpointing=true", "ppo.steps=1")
    trainer = PPOTrainer(cfg, progress=False)
    assert trainer.unwrapped.critic is not None
    history = trainer.train()
    # a fresh model earns no reward, so the (zero-initialised) value head may get a zero gradient: check it is tracked
    assert math.isfinite(history[0]["value/loss"]) and math.isfinite(history[0]["grad/critic_norm"])
    actor_ids = {id(p) for p in trainer.actor.parameters()}
    assert not any(id(p) in actor_ids for p in trainer.unwrapped.critic.parameters())
