"""ActorCritic: shapes, log-prob / value alignment, temperature, left-padding invariance, separate critic."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import V, tiny_lm

from tre_edu.policy import ActorCritic, PolicyOutput, position_ids_from_mask, response_logprobs

tiny_gpt2 = functools.partial(tiny_lm, "gpt2")
tiny_llama = functools.partial(tiny_lm, "llama")


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def batch(seed: int = 0, B: int = 3, P: int = 6, R: int = 5):
    """[left-padded prompt | right-padded response] with different padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, P + R), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[1, :2] = 0  # shorter prompt
    mask[2, :4] = 0
    mask[2, P + 3 :] = 0  # response ended early
    ids[mask == 0] = 0
    return ids, mask, R


def randomize_head(policy: ActorCritic, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        policy.value_head.weight.copy_(torch.randn(policy.value_head.weight.shape, generator=g))
        policy.value_head.bias.fill_(0.3)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    assert torch.equal(position_ids_from_mask(mask.bool()), expected)
    assert position_ids_from_mask(mask.float()).dtype == torch.long
    with pytest.raises(ValueError, match="attention_mask"):
        position_ids_from_mask(torch.ones(3))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_alignment(name):
    actor = MODELS[name]()
    policy = ActorCritic(actor)
    ids, mask, R = batch()
    out = policy(ids, mask, R)
    assert isinstance(out, PolicyOutput)
    B = ids.shape[0]
    assert out.logits.shape == (B, R, V)
    assert out.logprobs.shape == (B, R) and out.logprobs.dtype == torch.float32
    assert out.values.shape == (B, R) and out.values.dtype == torch.float32
    assert torch.all(out.values == 0)  # zero-initialised head
    # logits of response token t come from position P + t - 1 of a full forward
    full = actor(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    torch.testing.assert_close(out.logits, full[:, -R - 1 : -1], atol=1e-5, rtol=1e-5)
    ref = torch.log_softmax(full[:, -R - 1 : -1].float(), -1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.logprobs).all()
    assert policy(ids, mask, R, compute_values=False).values is None


@pytest.mark.parametrize("separate", [False, True])
def test_values_are_the_head_on_the_logits_position(separate):
    actor = tiny_gpt2()
    critic = tiny_gpt2(seed=5) if separate else None
    policy = ActorCritic(actor, critic=critic)
    randomize_head(policy)
    ids, mask, R = batch()
    out = policy(ids, mask, R)
    # V(s_t) = w . h_{P+t-1} + b, the same position as the logits of token t
    trunk = policy.critic if separate else actor.transformer
    h = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    expected = (h[:, -R - 1 : -1] @ policy.value_head.weight[0]) + policy.value_head.bias
    torch.testing.assert_close(out.values, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_temperature_divides_the_logits_everywhere(temperature):
    policy = ActorCritic(tiny_gpt2())
    ids, mask, R = batch()
    out = policy(ids, mask, R, temperature=temperature)
    plain = policy(ids, mask, R)
    torch.testing.assert_close(out.logits, plain.logits / temperature)
    ref = torch.log_softmax(plain.logits / temperature, -1).gather(-1, ids[:, -R:, None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs, ref, atol=1e-5, rtol=1e-5)
    logits, lp = response_logprobs(policy.actor, ids, mask, R, temperature=temperature)
    torch.testing.assert_close(lp, out.logprobs)
    with pytest.raises(ValueError, match="temperature"):
        policy(ids, mask, R, temperature=0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padding_invariance(name):
    policy = ActorCritic(MODELS[name]())
    randomize_head(policy)
    ids, mask, R = batch()
    pads = torch.zeros(ids.shape[0], 3, dtype=torch.long)  # three more columns of left padding on every row
    padded_ids, padded_mask = torch.cat([pads, ids], 1), torch.cat([pads, mask], 1)
    a, b = policy(ids, mask, R), policy(padded_ids, padded_mask, R)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_separate_critic_structure_and_gradients():
    actor, critic_lm = tiny_gpt2(), tiny_gpt2()
    policy = ActorCritic(actor, critic=critic_lm)
    assert policy.separate_critic and policy.critic is critic_lm.transformer  # LM head dropped
    actor_params, critic_params = policy.parameter_groups()
    actor_ids, critic_ids = {id(p) for p in actor_params}, {id(p) for p in critic_params}
    assert not actor_ids & critic_ids
    assert actor_ids | critic_ids == {id(p) for p in policy.parameters()}
    # a value loss trains the critic only; a policy loss trains the actor only
    policy.train()
    ids, mask, R = batch()
    out = policy(ids, mask, R)
    (out.values - 1.0).pow(2).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in actor_params)
    assert policy.value_head.weight.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)
    out = policy(ids, mask, R)
    out.logprobs.mean().backward()
    assert all(p.grad is None for p in critic_params)
    assert actor.transformer.wte.weight.grad.abs().sum() > 0


def test_shared_head_groups_and_no_value_head():
    policy = ActorCritic(tiny_gpt2())
    actor_params, critic_params = policy.parameter_groups()
    assert len(critic_params) == 2  # weight, bias of the value head
    bare = ActorCritic(tiny_gpt2(), value_head=False)
    assert bare.parameter_groups()[1] == []
    ids, mask, R = batch()
    assert bare(ids, mask, R).values is None


def test_bad_inputs():
    policy = ActorCritic(tiny_gpt2())
    ids, mask, R = batch()
    with pytest.raises(ValueError, match="response_len"):
        policy(ids, mask, ids.shape[1])
    with pytest.raises(ValueError, match="response_len"):
        policy(ids, mask, 0)
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, mask[:, 1:], R)


def test_gradient_checkpointing_same_gradients():
    ids, mask, R = batch()
    grads = []
    for checkpointing in (False, True):
        policy = ActorCritic(tiny_llama(), critic=tiny_llama(seed=3))
        randomize_head(policy)
        if checkpointing:
            policy.enable_gradient_checkpointing()
            assert policy.is_gradient_checkpointing
        policy.train()
        out = policy(ids, mask, R)
        (out.logprobs.mean() + out.values.pow(2).mean()).backward()
        grads.append([p.grad.clone() for p in policy.parameters() if p.grad is not None])
        policy.disable_gradient_checkpointing()
        assert not policy.is_gradient_checkpointing
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
