"""The evaluation loop: keys, pass@k estimator, tail detection, NaN guard, reproducibility."""

from __future__ import annotations

import math
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch

from tre_edu.evaluation import evaluate, pass_at_k
from tre_edu.models.tiny import build_tiny_model, build_tokenizer, tail_start
from tre_edu.tasks import get_task


def _cfg(**kw):
    base = dict(greedy=True, sampled=True, temperature=1.0, top_p=0.7, batch_size=16, pass_k=0, tail_metrics=True)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def setup():
    tok = build_tokenizer(tail_tokens=50)
    model = build_tiny_model(tok, n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=0)
    task = get_task("countdown")
    exs = task.generate(6, seed=3)
    return tok, model, task, exs


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(4, 0, 1), (4, 4, 2), (5, 2, 1), (6, 2, 3), (8, 1, 8), (8, 3, 4)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, abs_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_tail_start(setup):
    tok = setup[0]
    assert tail_start(tok) == len(tok) - 50
    assert tail_start(build_tokenizer(tail_tokens=0)) is None


def test_keys_and_ranges(setup):
    tok, model, task, exs = setup
    first = tail_start(tok)
    out = evaluate(model, tok, task, exs, _cfg(pass_k=4), style="compact", max_new_tokens=8, seed=1, tail_start=first)
    expected = {
        "greedy_accuracy",
        "greedy_reward",
        "sampled_accuracy",
        "sampled_reward",
        "pass@1",
        "pass@2",
        "pass@4",
        "distinct_correct",
        "tail_response_frac",
        "mass_outside_top10",
        "mass_outside_nucleus",
        "entropy_global",
        "entropy_tre",
    }
    assert expected <= set(out)
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    # a fresh model spreads its mass over all 83 tokens: most sampled responses contain a tail token
    assert out["tail_response_frac"] > 0.5
    assert 0 < out["mass_outside_top10"] < 1
    assert out["pass@1"] <= out["pass@2"] <= out["pass@4"]
    again = evaluate(model, tok, task, exs, _cfg(pass_k=4), style="compact", max_new_tokens=8, seed=1, tail_start=first)
    assert again == out
    assert model.training is False or model.training is True  # the flag is restored, whatever it was


def test_tail_pass_without_pass_k_and_switches(setup):
    tok, model, task, exs = setup
    out = evaluate(model, tok, task, exs, _cfg(), style="compact", max_new_tokens=8, greedy=False,
                   tail_start=tail_start(tok))  # fmt: skip
    assert "greedy_accuracy" not in out and "pass@1" not in out and "tail_response_frac" in out
    # the tail is measured at top_p 1 (where rollouts come from), not on the top_p 0.7 validation sample
    only_tail = evaluate(model, tok, task, exs, _cfg(top_p=0.01), style="compact", max_new_tokens=8, greedy=False,
                         sampled=False, tail_start=tail_start(tok))  # fmt: skip
    assert only_tail["tail_response_frac"] == out["tail_response_frac"] > 0.5
    out = evaluate(model, tok, task, exs, _cfg(tail_metrics=False), style="compact", max_new_tokens=8, sampled=False)
    assert set(out) == {"greedy_accuracy", "greedy_reward"}
    assert evaluate(model, tok, task, [], _cfg(), style="compact", max_new_tokens=8) == {}


def test_no_success_threshold_reports_rewards_only(setup):
    tok, model, task, exs = setup
    no_success = SimpleNamespace(
        name="rm", success_threshold=None, prompt=task.prompt, reward=lambda rs, es: [0.5 for _ in rs]
    )
    out = evaluate(model, tok, no_success, exs, _cfg(pass_k=2), style="compact", max_new_tokens=4)
    assert out["greedy_reward"] == 0.5 and out["sampled_reward"] == 0.5
    assert not any(k.endswith("accuracy") or k.startswith("pass@") or k == "distinct_correct" for k in out)


def test_non_finite_logits_raise(setup):
    tok, _, task, exs = setup
    model = build_tiny_model(tok, n_embd=32, n_layer=1, n_head=2, n_positions=64, seed=0)
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # tied: one embedding / output row
    for kw in ({"sampled": False}, {"greedy": False}):
        with pytest.raises(ValueError, match="NaN"):
            evaluate(model, tok, task, exs, _cfg(), style="compact", max_new_tokens=4, **kw)


def test_distinct_correct_counts_per_solved_example():
    texts = [f"<think></think><answer>{eq}</answer>" for eq in ("1+2", "1 + 2", "2+1")] + ["x", "y", "z"]
    rewards = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    metrics = get_task("countdown").sample_metrics(texts, rewards, 3)
    assert metrics == {"distinct_correct": 2.0}  # second example unsolved: not counted
