"""Reward model: formatting, batched scoring, Bradley-Terry training (torch and TRL backends), save / load."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from tre_edu import reward_model as R
from tre_edu.tasks import hh

PAIRS = hh.bundled_examples("hh-rlhf", "train")
# Swapped preferences: the random model starts below chance on them, so a rise is learning, not a length bias.
SWAPPED = [dict(e, chosen=e["rejected"], rejected=e["chosen"]) for e in PAIRS]


@pytest.fixture()
def tiny():
    return R.build_tiny_reward_model(max_length=64, seed=0)


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


def test_encode_appends_eos_and_truncates_left(tiny):
    ids = tiny.encode("hello there", "thank you")
    assert ids[-1] == tiny.tokenizer.eos_token_id
    long_response = " ".join(["thank you"] * 100)
    ids = tiny.encode("hello", long_response)
    assert len(ids) == tiny.max_length and ids[-1] == tiny.tokenizer.eos_token_id  # the end survives


def test_constructor_checks(tiny):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    cfg.num_labels = 2
    with pytest.raises(ValueError, match="num_labels"):
        R.RewardModel(LlamaForSequenceClassification(cfg), tiny.tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        R.RewardModel(tiny.model, tiny.tokenizer, max_length=1)
    with pytest.raises(ValueError, match="truncation_side"):
        R.RewardModel(tiny.model, tiny.tokenizer, truncation_side="middle")


def test_bradley_terry_loss():
    zero = torch.zeros(3)
    assert R.bradley_terry_loss(zero, zero).item() == pytest.approx(math.log(2))
    rc, rr = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    bt = -torch.nn.functional.logsigmoid(rc - rr).mean()
    centre = ((rc + rr) ** 2).mean()
    assert R.bradley_terry_loss(rc, rr, 0.01).item() == pytest.approx((bt + 0.01 * centre).item())


def test_train_argument_checks(tiny):
    with pytest.raises(ValueError, match="backend"):
        R.train_reward_model(PAIRS, tiny, backend="jax")
    with pytest.raises(ValueError, match="missing"):
        R.train_reward_model([{"prompt": "q", "chosen": "a"}], tiny, backend="torch")
    with pytest.raises(ValueError, match="non-empty"):
        R.train_reward_model([], tiny, backend="torch")
    with pytest.raises(ValueError, match="lr"):
        R.train_reward_model(PAIRS, tiny, lr=-1.0, backend="torch")
    with pytest.raises(ValueError, match="warmup_ratio"):
        R.train_reward_model(PAIRS, tiny, warmup_ratio=1.5, backend="torch")
    with pytest.raises(ValueError, match="tokenizer"):
        R.train_reward_model(PAIRS, tiny.model, backend="torch")


def test_trl_missing_gives_install_hint(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(ImportError, match=r"pip install tre_edu\[rm\]"):
        R.train_reward_model(PAIRS, tiny, backend="trl")


def test_torch_backend_learns_preferences(tiny, tmp_path):
    before = R.pair_accuracy(tiny, SWAPPED)
    assert before < 0.5
    rm = R.train_reward_model(
        SWAPPED, tiny, epochs=3, lr=1e-2, warmup_ratio=0.1, batch_size=8, max_length=64, backend="torch",
        progress=False, output_dir=str(tmp_path / "rm"),
    )  # fmt: skip
    after = R.pair_accuracy(rm, SWAPPED)
    assert after >= 0.9 > before
    first, last = rm.history[0]["loss"], rm.history[-1]["loss"]
    assert last < 0.5 * first and all(math.isfinite(h["loss"]) for h in rm.history)
    # the saved model loads back with the same scores
    loaded = R.RewardModel.from_pretrained(str(tmp_path / "rm"), max_length=64)
    prompts, responses = [e["prompt"] for e in PAIRS[:4]], [e["chosen"] for e in PAIRS[:4]]
    assert loaded.score(prompts, responses) == pytest.approx(rm.score(prompts, responses), abs=1e-5)


def test_trl_backend_learns_preferences():
    trl = pytest.importorskip("trl")
    rm = R.build_tiny_reward_model(max_length=64, seed=0)
    before = R.pair_accuracy(rm, SWAPPED)
    rm = R.train_reward_model(
        SWAPPED, rm, epochs=3, lr=1e-2, batch_size=8, max_length=64, backend="trl", progress=False
    )
    after = R.pair_accuracy(rm, SWAPPED)
    assert after >= 0.9 > before, f"trl {trl.__version__}"
    assert len(rm.history) >= 3 and rm.history[-1]["loss"] < rm.history[0]["loss"]


def test_train_rm_main_tiny(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.warns(UserWarning, match="bundled"):
        out = R.train_rm_main(
            {
                "source": "hh-rlhf",
                "backend": "torch",
                "epochs": 2,
                "lr": 3e-3,
                "max_length": 64,
                "progress": False,
            }
        )
    assert out["dataset"] == "hh-rlhf" and out["source"] == "bundled"
    assert out["n_train"] >= 15 and out["n_test"] >= 5
    assert 0.0 <= out["test_accuracy"] <= 1.0 and math.isfinite(out["final_loss"])
    with pytest.raises(ValueError, match="unknown option"):
        R.train_rm_main(model_name="x")
