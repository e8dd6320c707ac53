"""Supervised warm start: example format, batching / masking, loss on response tokens only, a short run
learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tre_edu.models.tiny import build_tiny_model, build_tokenizer
from tre_edu.policy import position_ids_from_mask
from tre_edu.sft import collate, encode_sft_example, make_sft_example, sft_loss, warm_start
from tre_edu.tasks import countdown as cd


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tail_tokens=20)


@pytest.fixture(scope="module")
def task():
    return cd.make_task()


def _model(tok):
    return build_tiny_model(tok, n_embd=32, n_layer=2, n_head=2, n_positions=64, seed=0)


@pytest.mark.parametrize("think", [False, True])
def test_make_sft_example_is_accepted_by_the_checker(tok, task, think):
    for ex in task.generate(10, seed=0):
        pair = make_sft_example(task, ex, tok, think=think)
        assert pair["prompt"] == task.prompt(ex, tok, "compact")
        assert task.score(pair["response"], ex) == 1.0
        prompt_ids, response_ids = encode_sft_example(tok, pair["prompt"], pair["response"])
        assert response_ids[-1] == tok.eos_token_id
        # what the model would generate decodes (special tokens skipped) to a response the checker accepts
        assert task.score(tok.decode(response_ids, skip_special_tokens=True), ex) == 1.0
        assert tok.decode(prompt_ids + response_ids[:-1]) == pair["prompt"] + pair["response"]


def test_hub_example_without_solution_is_solved(tok, task):
    ex = {"numbers": [3, 7, 20], "target": 41, "solution": None, "source": cd.HUB_ID}
    assert make_sft_example(task, ex, tok)["response"] == "<think></think><answer>3*7+20</answer>"


def test_collate_left_pads_and_masks_only_responses():
    pairs = [([5, 6, 7], [8, 9, 2]), ([5], [8, 2])]
    input_ids, attn, labels, mask = collate(pairs, pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8, 9, 2], [0, 0, 0, 5, 8, 2]]
    assert attn.tolist() == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    # positions come from the mask (0 at each first real token), as in the rollouts and PPO
    assert position_ids_from_mask(attn).tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]]
    assert labels.tolist() == [[8, 9, 2], [5, 8, 2]] and mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_sft_loss_matches_full_logits(tok, task):
    model = _model(tok)
    exs = task.generate(4, seed=1)
    pairs = [encode_sft_example(tok, **make_sft_example(task, e, tok)) for e in exs]
    batch = collate(pairs, tok.pad_token_id)
    loss = sft_loss(model, batch)
    # reference: full (B, L, V) logits, each sequence on its own (no padding), loss over its response tokens
    total, count = 0.0, 0
    for p, r in pairs:
        ids = torch.tensor([p + r])
        logits = model(ids).logits[0, len(p) - 1 : -1]
        total += F.cross_entropy(logits, torch.tensor(r), reduction="sum").item()
        count += len(r)
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_short_warm_start_reduces_loss(tok, task):
    model = _model(tok)
    records = []
    history = warm_start(
        model, tok, task, task.generate(16, seed=0), steps=20, batch_size=8, lr=1e-2, warmup_steps=2,
        log_every=5, progress=False, callback=records.append,
    )  # fmt: skip
    assert [h["step"] for h in history] == [5, 10, 15, 20] and records == history
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert all(h["seconds"] <= h["wall_seconds"] for h in history)


def test_time_budget_and_bad_arguments(tok, task):
    model = _model(tok)
    history = warm_start(model, tok, task, task.generate(8, seed=0), steps=None, seconds=0.05, batch_size=4,
                         progress=False)  # fmt: skip
    assert 1 <= history[-1]["step"] < 1000
    with pytest.raises(ValueError, match="steps and seconds"):
        warm_start(model, tok, task, [], steps=None, seconds=None)
    with pytest.raises(ValueError, match="lr"):
        warm_start(model, tok, task, task.generate(2, seed=0), steps=1, lr=-1.0)
    with pytest.raises(ValueError, match="at least one example"):
        warm_start(model, tok, task, [{"numbers": [1, 2, 3], "target": 100}], steps=1, progress=False)


def test_warm_start_evaluates_held_out_accuracy(tok, task):
    pytest.importorskip("tre_edu.rollout")
    model = _model(tok)
    train = task.generate(32, seed=0)
    history = warm_start(
        model, tok, task, train, steps=6, batch_size=8, eval_examples=train[:8], eval_every=3, log_every=3,
        progress=False,
    )  # fmt: skip
    evals = [h for h in history if "accuracy" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in evals)
