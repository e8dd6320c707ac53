"""Sampling loop: masks at EOS, left padding, KV cache, log-prob consistency with ActorCritic.forward,
filters."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import EOS, PAD, V, tiny_lm
from torch import nn
from transformers import PreTrainedTokenizerFast

from tre_edu.policy import ActorCritic, response_logits
from tre_edu.rollout import (
    Rollout,
    SamplingConfig,
    decode_responses,
    filter_logits,
    generate,
    pad_prompts,
    sample_tokens,
)

tiny_gpt2 = functools.partial(tiny_lm, "gpt2")
tiny_qwen2 = functools.partial(tiny_lm, "qwen2")
MODELS = {"gpt2": tiny_gpt2, "qwen2": tiny_qwen2}


def with_eos_bias(model: nn.Module, eos_bias: float) -> nn.Module:
    """Give the LM head a bias that makes EOS more (or, large, always) likely: an easy way to force stops."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    return model


def prompts(seed: int = 0, lengths=(5, 2, 7, 1)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]


def run(model, ps, **cfg_kw):
    seed = cfg_kw.pop("seed", 0)
    cfg = SamplingConfig(**cfg_kw)
    return generate(model, ps, cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator().manual_seed(seed))


def check_mask_invariants(ro: Rollout, eos: int = EOS) -> None:
    B, R = ro.response.shape
    assert ro.input_ids.shape == ro.attention_mask.shape == (B, ro.prompt_len + R)
    assert torch.equal(ro.input_ids[:, ro.prompt_len :], ro.response)
    assert torch.equal(ro.attention_mask[:, ro.prompt_len :].bool(), ro.response_mask)
    for row, m in zip(ro.response.tolist(), ro.response_mask.tolist()):
        n = sum(m)
        assert m == [True] * n + [False] * (R - n)  # a prefix
        assert all(tok == PAD for tok in row[n:])
        eos_at = [i for i, tok in enumerate(row[:n]) if tok == eos]
        if eos_at:  # EOS is the last valid token, included
            assert eos_at == [n - 1]
        else:
            assert n == R
    assert torch.all(ro.logprobs[~ro.response_mask] == 0)
    assert not ro.outside_topk[~ro.response_mask].any()
    assert torch.all(ro.logprobs[ro.response_mask] <= 0)


# ---- helpers -----------------------------------------------------------------------------------------------
def test_pad_prompts():
    ids, mask = pad_prompts([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="prompts"):
        pad_prompts([], 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []], 0)
    with pytest.raises(ValueError, match="pad_id"):
        pad_prompts([[1]], None)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
    ],
)
def test_bad_sampling_config(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_filters_on_a_hand_distribution():
    p = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # ranks: 1, 3, 4, 2, 0
    z = p.log()[None]
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert kept(filter_logits(z, top_k=2)) == [1, 3]
    assert kept(filter_logits(z, top_k=0)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(z, top_p=0.45)) == [1]  # the top token is always kept
    assert kept(filter_logits(z, top_p=0.55)) == [1, 3]  # 0.5 before rank 1 < 0.55: kept (it crosses p)
    assert kept(filter_logits(z, top_p=0.75)) == [1, 3, 4]
    assert kept(filter_logits(z, top_p=1.0)) == [0, 1, 2, 3, 4]
    # order: temperature, then top-k, then top-p (on the tempered, top-k renormalised distribution)
    assert kept(filter_logits(z, top_k=3, top_p=0.6)) == [1, 3]  # top-3 renormalised: 0.59, 0.24, 0.18
    torch.testing.assert_close(filter_logits(z, temperature=2.0), z / 2)
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(z, temperature=0.0)


def test_sampling_frequencies_and_determinism():
    p = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])
    z = p.log()[None].expand(20000, 5)
    cfg = SamplingConfig(top_k=3)
    toks = sample_tokens(z, cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=5).float() / len(toks)
    expected = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    again = sample_tokens(z, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(toks, again)
    # temperature 0.5 sharpens: p^2 renormalised
    toks = sample_tokens(z, SamplingConfig(temperature=0.5), torch.Generator().manual_seed(1))
    freq = torch.bincount(toks, minlength=5).float() / len(toks)
    torch.testing.assert_close(freq, p**2 / (p**2).sum(), atol=0.015, rtol=0)
    greedy = sample_tokens(z[:3], SamplingConfig(temperature=0.0, top_k=2))
    assert greedy.tolist() == [1, 1, 1]


# ---- the loop ----------------------------------------------------------------------------------------------
def test_all_rows_stop_at_once_and_early_exit():
    model = with_eos_bias(tiny_gpt2(), 1e4)  # EOS is the argmax at every step
    ro = run(model, prompts(), max_new_tokens=8, temperature=0.0)
    assert ro.response.shape == (4, 1)  # the loop stopped after one step
    assert ro.response.flatten().tolist() == [EOS] * 4
    assert ro.response_mask.all()
    check_mask_invariants(ro)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_masks_with_sampling(use_cache):
    # a moderate EOS bias: rows stop at different steps, some never
    model = with_eos_bias(tiny_gpt2(), 3.0)
    ro = run(model, prompts(lengths=(3, 6, 2, 4, 5, 1, 7, 3)), max_new_tokens=10, seed=3, use_cache=use_cache)
    check_mask_invariants(ro)
    lengths = ro.lengths.tolist()
    assert len(set(lengths)) > 2, lengths  # various stopping points
    assert max(lengths) == ro.response_len


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_and_no_cache_same_greedy_output(name):
    model = MODELS[name]()
    ps = prompts()
    a = run(model, ps, max_new_tokens=12, temperature=0.0, use_cache=True)
    b = run(model, ps, max_new_tokens=12, temperature=0.0, use_cache=False)
    assert torch.equal(a.response, b.response)
    assert torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padding_invariance(name):
    model = with_eos_bias(MODELS[name](), 2.0)
    ps = prompts(lengths=(3, 9, 1, 6))
    batch = run(model, ps, max_new_tokens=10, temperature=0.0)
    check_mask_invariants(batch)
    for i, p in enumerate(ps):
        alone = run(model, [p], max_new_tokens=10, temperature=0.0)
        n = int(alone.lengths[0])
        assert int(batch.lengths[i]) == n
        assert torch.equal(alone.response[0, :n], batch.response[i, :n])
        torch.testing.assert_close(alone.logprobs[0, :n], batch.logprobs[i, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "cfg_kw", [{}, {"top_p": 0.7, "temperature": 1.3}, {"temperature": 0.7}, {"top_k": 5, "use_cache": False}]
)
def test_logprobs_match_training_forward(name, cfg_kw):
    model = with_eos_bias(MODELS[name](), 2.5)
    policy = ActorCritic(model)
    ro = run(model, prompts(lengths=(4, 1, 8, 3, 6)), max_new_tokens=9, seed=1, **cfg_kw)
    check_mask_invariants(ro)
    out = policy(ro.input_ids, ro.attention_mask, ro.response_len, temperature=cfg_kw.get("temperature", 1.0))
    m = ro.response_mask
    # the sampler's log-probs are those of softmax(z / T), the training forward's at the same T (top-k / top-p
    # only shape the sampling)
    assert (out.logprobs[m] - ro.logprobs[m]).abs().max() < 1e-5
    with torch.no_grad():  # the policy's forward keeps statistics, not logits: the one response forward gives them
        logits, _ = response_logits(model, ro.input_ids, ro.attention_mask, ro.response_len)
    top2 = logits.topk(2, -1).indices
    recomputed_outside = ~(top2 == ro.response[..., None]).any(-1) & m
    assert torch.equal(recomputed_outside, ro.outside_topk)


def test_seeded_sampling_is_reproducible_and_restores_mode():
    model = tiny_qwen2()
    model.train()
    a = run(model, prompts(), max_new_tokens=6, seed=11)
    assert model.training  # the training flag is restored
    b = run(model, prompts(), max_new_tokens=6, seed=11)
    c = run(model, prompts(), max_new_tokens=6, seed=12)
    assert torch.equal(a.response, b.response)
    assert not torch.equal(a.response, c.response)
    assert torch.isfinite(a.logprobs).all()


def test_no_eos_token_runs_to_max_and_bf16():
    model = with_eos_bias(tiny_qwen2(), 1e4).to(torch.bfloat16)
    ro = generate(model, prompts(), SamplingConfig(max_new_tokens=5), eos_token_id=None, pad_token_id=PAD)
    assert ro.response.shape == (4, 5) and ro.response_mask.all()
    assert ro.logprobs.dtype == torch.float32 and torch.isfinite(ro.logprobs).all()
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompts(), SamplingConfig(), eos_token_id="</s>", pad_token_id=PAD)
    with pytest.raises(ValueError, match="SamplingConfig"):
        generate(model, prompts(), {"max_new_tokens": 3}, eos_token_id=EOS, pad_token_id=PAD)


def test_several_eos_ids_and_non_finite_logits():
    model = with_eos_bias(tiny_gpt2(), 3.0)
    ro = generate(model, prompts(), SamplingConfig(max_new_tokens=8), eos_token_id=[7, EOS], pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    check_mask_invariants(ro)  # stops at EOS (the biased id) although it is the second of the list
    with torch.no_grad():
        model.lm_head.bias[5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        generate(
            model, prompts(), SamplingConfig(max_new_tokens=3, temperature=0.0), eos_token_id=EOS, pad_token_id=PAD
        )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_of_all_minus_inf_logits_is_refused(temperature):
    """A row in which every token is impossible has no distribution: before, sampling returned the last id, argmax
    id 0, and the log-probs were NaN, with no error."""
    model = with_eos_bias(tiny_gpt2(), 0.0)
    with torch.no_grad():
        model.lm_head.bias[:] = float("-inf")
    cfg = SamplingConfig(max_new_tokens=3, temperature=temperature)
    with pytest.raises(ValueError, match=r"-inf for every token in row\(s\) \[0, 1, 2, 3\] at response step 0"):
        generate(model, prompts(), cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator())
    with torch.no_grad():  # some -inf in a row is a distribution (e.g. a masked vocabulary): it samples
        model.lm_head.bias[:] = 0.0
        model.lm_head.bias[EOS + 1 :] = float("-inf")
    ro = generate(model, prompts(), cfg, eos_token_id=EOS, pad_token_id=PAD, generator=torch.Generator())
    assert bool((ro.response[ro.response_mask] <= EOS).all()) and torch.isfinite(ro.logprobs).all()


def test_decode_responses():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"w{i}": i for i in range(2, V)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    response = torch.tensor([[5, 6, EOS, PAD], [7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ro = Rollout(
        input_ids=response, attention_mask=mask.long(), prompt_len=0, response=response, response_mask=mask,
        logprobs=torch.zeros(2, 4), outside_topk=torch.zeros(2, 4, dtype=torch.bool),
    )  # fmt: skip
    assert decode_responses(tokenizer, ro) == ["w5 w6", "w7 w8 w9 w10"]


def test_concat_rollouts_pads_to_common_lengths():
    from tre_edu.rollout import Rollout, concat_rollouts

    def part(P, R, fill):
        B = 2
        return Rollout(
            input_ids=torch.full((B, P + R), fill),
            attention_mask=torch.ones(B, P + R, dtype=torch.long),
            prompt_len=P,
            response=torch.full((B, R), fill),
            response_mask=torch.ones(B, R, dtype=torch.bool),
            logprobs=torch.full((B, R), -0.5),
            outside_topk=torch.zeros(B, R, dtype=torch.bool),
        )

    ro = concat_rollouts([part(3, 2, 7), part(5, 4, 8)], pad_token_id=0)
    assert ro.prompt_len == 5 and ro.input_ids.shape == (4, 9) and ro.response.shape == (4, 4)
    # the first part's prompts are left-padded by 2 and its responses right-padded by 2
    assert ro.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert ro.response_mask[0].tolist() == [True, True, False, False]
    assert ro.logprobs[0].tolist() == [-0.5, -0.5, 0.0, 0.0]
    assert ro.input_ids[2].tolist() == [8] * 9


def _full_sort_top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook nucleus filter (sort the whole vocabulary) as a reference."""
    sorted_z, order = torch.sort(z, dim=-1, descending=True)
    probs = torch.softmax(sorted_z, dim=-1)
    drop = (torch.cumsum(probs, -1) - probs) >= top_p
    drop[..., 0] = False
    return z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked (nucleus within the top 256) and flat (it is not)
def test_top_p_searches_only_what_it_needs_and_equals_a_full_sort(scale):
    z = torch.randn(16, 20_000, generator=torch.Generator().manual_seed(0)) * scale
    got = filter_logits(z, top_p=0.7)
    want = _full_sort_top_p(z, 0.7)
    kept, ref = torch.isfinite(got), torch.isfinite(want)
    assert torch.equal(kept, ref) or (kept ^ ref).sum() <= 2  # round-off may move a cut exactly at 0.7 by a token
    if scale < 1:
        assert int(kept.sum(-1).min()) > 256
    # the inverse-CDF draw never picks a filtered token
    tokens = sample_tokens(z, SamplingConfig(top_p=0.7), torch.Generator().manual_seed(1))
    assert kept.gather(-1, tokens[:, None]).all()
