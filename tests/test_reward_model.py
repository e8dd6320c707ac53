"""Reward model: formatting, batched scoring, TRL RewardTrainer training (its loss, learning), save / load."""

from __future__ import annotations

import dataclasses
import math
import sys

import datasets
import pytest
import torch
from conftest import tiny_reward_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from tre_edu import pipeline
from tre_edu import reward_model as R
from tre_edu.config import RewardModelConfig
from tre_edu.tasks import hh

PAIRS = hh.bundled_examples("hh-rlhf", "train")
# Swapped preferences: the random model starts below chance on them, so a rise is learning, not a length bias.
SWAPPED = [dict(e, chosen=e["rejected"], rejected=e["chosen"]) for e in PAIRS]
CFG = RewardModelConfig(source="hh-rlhf", epochs=3, lr=1e-2, warmup_ratio=0.1, batch_size=8, max_length=64)


@pytest.fixture()
def tiny():
    return tiny_reward_model(max_length=64, seed=0)


def test_score_shapes_and_batch_invariance(tiny):
    prompts = [e["prompt"] for e in PAIRS[:9]]
    responses = [e["chosen"] for e in PAIRS[:9]]
    one = tiny.score(prompts, responses, batch_size=1)
    many = tiny.score(prompts, responses, batch_size=4)
    assert len(one) == 9 and all(isinstance(x, float) and math.isfinite(x) for x in one)
    assert many == pytest.approx(one, abs=1e-5)  # right padding does not change a score
    assert tiny(prompts[:2], responses[:2]) == pytest.approx(one[:2], abs=1e-5)
    with pytest.raises(ValueError, match="same length"):
        tiny.score(prompts, responses[:3])
    with pytest.raises(ValueError, match="batch_size"):
        tiny.score(prompts, responses, batch_size=0)


def test_format_text_plain_and_chat(tiny):
    tok = tiny.tokenizer
    assert R.format_text(tok, "What is 2+2?", "4") == "What is 2+2? 4"
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
    ]
    assert R.format_text(tok, msgs, "a") == "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: q\n\nAssistant: a"

    class ChatTok:
        chat_template = "fake"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

    assert R.format_text(ChatTok(), "q", "a") == "user:q|assistant:a"
    assert R.format_text(ChatTok(), msgs, "a") == "user:hi|assistant:yo|user:q|assistant:a"
    with pytest.raises(ValueError, match="prompt"):
        R.format_text(tok, 5, "a")
    with pytest.raises(ValueError, match="response"):
        R.format_text(tok, "q", None)


def test_lone_surrogate_scores_finite(tiny):
    # issue 11 item 14: "\ud800" made the tokenizer raise TypeError
    assert R.format_text(tiny.tokenizer, "q\udcff", "a\ud800b") == "q? a?b"
    assert math.isfinite(tiny.score(["hello"], ["bad \ud800 text"])[0])


def test_encode_appends_eos_and_truncates_left(tiny):
    ids = tiny.encode("hello there", "thank you")
    assert ids[-1] == tiny.tokenizer.eos_token_id
    long_response = " ".join(["thank you"] * 100)
    ids = tiny.encode("hello", long_response)
    assert len(ids) == tiny.max_length and ids[-1] == tiny.tokenizer.eos_token_id  # the end survives


def test_constructor_checks(tiny):
    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    cfg.num_labels = 2
    with pytest.raises(ValueError, match="num_labels"):
        R.RewardModel(LlamaForSequenceClassification(cfg), tiny.tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        R.RewardModel(tiny.model, tiny.tokenizer, max_length=1)
    with pytest.raises(ValueError, match="truncation_side"):
        R.RewardModel(tiny.model, tiny.tokenizer, truncation_side="middle")


def test_missing_reward_model_directory_says_how_to_make_it(tmp_path):
    # issue 11 item 11: was OSError "Repo id must be in the form ..." and four tracebacks
    path = "runs/reward_model/ultrafeedback-qwen2.5-1.5b"
    for where in (path, str(tmp_path / "nope"), "./rm"):
        with pytest.raises(
            FileNotFoundError, match=rf"reward model not found: {where}; make it with `tre-edu train-rm"
        ):
            R.RewardModel.from_pretrained(where)
    with pytest.raises(FileNotFoundError, match="--output-dir runs/reward_model"):
        hh.make_task(reward_model=path)


def test_trl_loss_is_bradley_terry_plus_centring(tiny, tmp_path):
    """TRL's loss = -mean log sigmoid(r_c - r_r) + c * mean((r_c + r_r)^2) (the paper's, c = 0.01)."""
    trainer = R.reward_trainer(tiny, PAIRS[:4], CFG, str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    tiny.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(tiny.model, dict(batch)).item()
    prompts = [e["prompt"] for e in PAIRS[:4]]
    rc = torch.tensor(tiny.score(prompts, [e["chosen"] for e in PAIRS[:4]]))
    rr = torch.tensor(tiny.score(prompts, [e["rejected"] for e in PAIRS[:4]]))
    want = -torch.nn.functional.logsigmoid(rc - rr).mean() + 0.01 * ((rc + rr) ** 2).mean()
    assert loss == pytest.approx(want.item(), abs=1e-4)
    same = [dict(e, rejected=e["chosen"]) for e in PAIRS[:4]]  # r_c == r_r: log 2 + c * mean((2 r)^2)
    trainer = R.reward_trainer(tiny, same, CFG, str(tmp_path))
    with torch.no_grad():
        loss = trainer.compute_loss(
            tiny.model, dict(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        )
    assert loss.item() == pytest.approx(math.log(2) + 0.01 * ((2 * rc) ** 2).mean().item(), abs=1e-4)


def test_fit_argument_checks(tiny):
    with pytest.raises(ValueError, match="missing"):
        R.fit([{"prompt": "q", "chosen": "a"}], CFG, tiny)
    with pytest.raises(ValueError, match="non-empty"):
        R.fit([], CFG, tiny)
    with pytest.raises(ValueError, match="lr"):
        R.fit(PAIRS, dataclasses.replace(CFG, lr=-1.0), tiny)
    with pytest.raises(ValueError, match="warmup_ratio"):
        R.fit(PAIRS, dataclasses.replace(CFG, warmup_ratio=1.5), tiny)


def test_trl_missing_gives_install_hint(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(ImportError, match=r"pip install tre_edu\[rm\]"):
        R.fit(PAIRS, CFG, tiny)


def test_trl_learns_preferences_and_saves(tiny, tmp_path):
    before = R.pair_accuracy(tiny, SWAPPED)
    assert before < 0.5
    rm = R.fit(SWAPPED, dataclasses.replace(CFG, output_dir=str(tmp_path / "rm")), tiny)
    after = R.pair_accuracy(rm, SWAPPED)
    assert after >= 0.9 > before
    first, last = rm.history[0]["loss"], rm.history[-1]["loss"]
    assert len(rm.history) >= 3 and last < 0.5 * first and all(math.isfinite(h["loss"]) for h in rm.history)
    # the saved model loads back with the same scores
    loaded = R.RewardModel.from_pretrained(str(tmp_path / "rm"), max_length=64)
    prompts, responses = [e["prompt"] for e in PAIRS[:4]], [e["chosen"] for e in PAIRS[:4]]
    assert loaded.score(prompts, responses) == pytest.approx(rm.score(prompts, responses), abs=1e-5)


def test_train_reward_model_tiny_offline(monkeypatch):
    def fail(*a, **k):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.warns(UserWarning, match="bundled"):
        out = pipeline.train_reward_model(dataclasses.replace(CFG, epochs=2, lr=3e-3))
    assert out["dataset"] == "hh-rlhf" and out["source"] == "bundled"
    assert out["n_train"] >= 15 and out["n_test"] >= 5
    assert 0.0 <= out["test_accuracy"] <= 1.0 and math.isfinite(out["final_loss"])
    with pytest.raises(TypeError, match="model_name"):
        RewardModelConfig(model_name="x")  # an unknown option
