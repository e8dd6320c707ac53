"""End-to-end PPO on the tiny Countdown model: every regulariser runs, metrics are complete, ratios are consistent,
selections follow the config, faults never lose or corrupt a run, and resume is exact."""

import json
import math
import os
import pickle

import pytest
import torch
from conftest import CONFIG, SMALL, small_config

from tre_edu import checkpoint
from tre_edu.cli import main
from tre_edu.config import KINDS
from tre_edu.pipeline import build_trainer, run_training
from tre_edu.tasks.countdown import CountdownTask

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
    "rollout/logprob_gap",
    "train/skipped_updates",
}


class DenseRewardTask(CountdownTask):
    """Countdown prompts with a dense reward (the share of digits in the response), so that a freshly initialised
    model gets a learning signal at once: the actor really moves in a few steps."""

    def reward(self, responses, examples):
        return [sum(c.isdigit() for c in r) / max(len(r), 1) for r in responses]


def _trainer(tmp_path, *extra, task=None, **kw):
    return build_trainer(small_config(tmp_path, *extra), task=task, progress=False, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_each_regularizer_trains(tmp_path, kind):
    trainer = _trainer(tmp_path, f"regularizer.kind={kind}", "ppo.steps=2", "regularizer.coef=0.01")
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
    history = _trainer(tmp_path, "ppo.advantage=grpo", "ppo.steps=1").train()
    assert math.isfinite(history[0]["policy/loss"])


def test_kl_to_reference(tmp_path):
    history = _trainer(tmp_path, "ppo.kl_coef=0.1", "ppo.steps=2").train()
    assert "kl/loss" in history[-1] and history[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)


# ---- ratios: the old log-probs are the update's own forward -----------------------------------------------------
@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_minibatch_ratio_is_exactly_one(tmp_path, precision, temperature):
    """One mini-batch, one epoch: the update sees the weights the old log-probs came from, in the same precision
    and at the same temperature, so approx_kl and clipfrac are exactly 0 (issue: bf16 gave 8e-7)."""
    trainer = _trainer(
        tmp_path,
        f"ppo.mixed_precision={precision}",
        f"ppo.temperature={temperature}",
        "ppo.minibatch_size=16",
        "ppo.micro_batch_size=8",
        "ppo.steps=1",
        task=DenseRewardTask(),
    )
    m = trainer.train_step()
    assert m["policy/approx_kl"] == 0.0 and m["policy/clipfrac"] == 0.0
    assert m["rollout/logprob_gap"] < (1e-4 if precision == "no" else 0.1)


# ---- selections: micro-batch (the paper's code) or the whole mini-batch -----------------------------------------
def _second_gradient(tmp_path, *extra):
    """The actor's gradient at the second optimiser step of a PPO step (Adam's normalised step would hide small
    differences; at the first, log pi = log pi_old, so KL-Cov's |log pi - log pi_old| has no gradient yet)."""
    trainer = _trainer(tmp_path, "ppo.steps=1", "ppo.minibatch_size=8", *extra, task=DenseRewardTask())
    grads, step = [], trainer.optim.step

    def record(*args):
        grads.append(torch.cat([p.grad.flatten() for p in trainer.optim.params["actor"]]))
        return step(*args)

    trainer.optim.step = record
    trainer.train_step()
    return grads[1]


@pytest.mark.parametrize("kind", ["forking", "kl-cov"])
def test_minibatch_selection_equals_one_big_micro_batch(tmp_path, kind):
    reg = [f"regularizer.kind={kind}", "regularizer.cov_ratio=0.05", "regularizer.kl_cov_coef=10"]
    whole = _second_gradient(tmp_path / "a", *reg, "ppo.micro_batch_size=8")
    pre_pass = _second_gradient(tmp_path / "b", *reg, "ppo.micro_batch_size=2", "regularizer.selection=minibatch")
    per_micro = _second_gradient(tmp_path / "c", *reg, "ppo.micro_batch_size=2", "regularizer.selection=microbatch")
    scale = whole.abs().max()
    assert (pre_pass - whole).abs().max() < 1e-4 * scale
    assert (per_micro - whole).abs().max() > 1e-2 * scale  # selecting per micro-batch picks other tokens


# ---- faults -----------------------------------------------------------------------------------------------------
def test_non_finite_gradient_skips_the_step_and_never_saves_nan(tmp_path):
    trainer = _trainer(tmp_path, "ppo.steps=2", "ppo.minibatch_size=16", task=DenseRewardTask())
    poisoned = {"left": 1}

    def hook(grad):
        if poisoned["left"]:
            poisoned["left"] -= 1
            return torch.full_like(grad, float("nan"))
        return grad

    weight = next(trainer.actor.parameters())
    weight.register_hook(hook)
    with pytest.warns(RuntimeWarning, match="non-finite gradient norm"):
        history = trainer.train()
    assert [h["train/skipped_updates"] for h in history] == [1.0, 0.0] and trainer.skipped_updates == 1
    assert all(bool(torch.isfinite(p).all()) for p in trainer.unwrapped.parameters())
    assert (tmp_path / "final" / "config.json").is_file()
    with torch.no_grad():
        weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="refusing to save"):
        trainer.save_checkpoint(tmp_path / "nan_ckpt")
    assert not (tmp_path / "nan_ckpt").exists()


def test_a_second_run_never_replaces_the_first(tmp_path):
    cfg = small_config(tmp_path, "ppo.steps=1")
    run_training(cfg, progress=False)
    first = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="--resume.*--overwrite"):
        run_training(small_config(tmp_path, "ppo.steps=1", "seed=2"), progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == first  # untouched
    run_training(small_config(tmp_path, "ppo.steps=1", "seed=2"), overwrite=True, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("kind") != "eval"] == [1]  # one run's lines only
    assert "seed: 2" in (tmp_path / "config.yaml").read_text()


def test_resume_logs_each_step_once_and_skips_a_cut_checkpoint(tmp_path):
    cfg = small_config(tmp_path, "ppo.steps=4", "checkpoint_every=2")
    run_training(cfg, progress=False)
    # the run died after step 4's log line, before its final checkpoint: keep only step 2's checkpoint ...
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    (ckpts / "step_000004" / checkpoint.MARKER).unlink()  # ... whose save was cut short (no marker)
    state = ckpts / "step_000003"  # and a folder with a truncated state file
    state.mkdir()
    (state / checkpoint.STATE_FILE).write_bytes((ckpts / "step_000002" / checkpoint.STATE_FILE).read_bytes()[:1000])
    (state / checkpoint.MARKER).write_text("{}")
    with pytest.warns(UserWarning, match="skipping"):
        run_training(cfg, resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, x in zip(steps, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "eval" not in x]
    assert train_steps == [1, 2, 3, 4]


def test_a_hostile_checkpoint_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "checkpoints" / "step_999999"
    folder.mkdir(parents=True)
    with (folder / checkpoint.STATE_FILE).open("wb") as f:
        pickle.dump({"step": Boom()}, f)
    (folder / checkpoint.MARKER).write_text("{}")
    trainer = _trainer(tmp_path, "ppo.steps=1")
    with pytest.raises(ValueError, match="refusing to load"):
        trainer.load_checkpoint("latest")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_exact_while_the_actor_learns(tmp_path, kind):
    reg = [f"regularizer.kind={kind}", "regularizer.coef=0.01", "regularizer.seed=3", "regularizer.clip_cov_ratio=0.05"]
    task = DenseRewardTask()
    full = _trainer(tmp_path / "a", "ppo.steps=4", *reg, task=task)
    h_full = full.train()
    assert all(h["grad/actor_norm"] > 0 for h in h_full)  # the actor learns: rewards are not all 0
    first = _trainer(tmp_path / "b", "ppo.steps=4", *reg, task=task)
    first.train(steps=2)
    ckpt = first.save_checkpoint()
    second = _trainer(tmp_path / "b", "ppo.steps=4", *reg, task=task)
    h_resumed = second.train(resume_from=ckpt)
    assert len(h_resumed) == 4
    for a, b in zip(h_full, h_resumed):
        for k in a:
            if not k.startswith("time/"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    for pa, pb in zip(full.unwrapped.parameters(), second.unwrapped.parameters()):
        assert torch.equal(pa, pb)


# ---- the command line -------------------------------------------------------------------------------------------
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


def test_separate_critic_with_gradient_checkpointing(tmp_path):
    trainer = _trainer(tmp_path, "model.critic=separate", "model.gradient_checkpointing=true", "ppo.steps=1")
    assert trainer.unwrapped.critic is not None
    history = trainer.train()
    # a fresh model earns no reward, so the (zero-initialised) value head may get a zero gradient: check it is tracked
    assert math.isfinite(history[0]["value/loss"]) and math.isfinite(history[0]["grad/critic_norm"])
    actor_ids = {id(p) for p in trainer.actor.parameters()}
    assert not any(id(p) in actor_ids for p in trainer.unwrapped.critic.parameters())


# ---- the memory-lean head ---------------------------------------------------------------------------------------
def test_lean_head_and_materialised_logits_train_the_same(tmp_path):
    """The tiny recipe for 10 PPO steps with the head (no (N, V) logits) and with materialised logits: the same
    metrics to float tolerance (the head is exact; only the order of float32 sums differs)."""
    runs = {}
    for lean in (True, False):
        trainer = _trainer(tmp_path / str(lean), "regularizer.kind=tre-p", "regularizer.coef=0.01", "ppo.steps=10",
                           f"ppo.lean_head={str(lean).lower()}", task=DenseRewardTask())  # fmt: skip
        assert trainer.unwrapped.use_lean_head is lean
        runs[lean] = trainer.train()
    compared = 0
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in a:
            if key.startswith("time/"):
                continue
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key  # losses: sums that cancel to ~1e-3
            compared += 1
    assert compared > 300
