"""ActorCritic: shapes, log-prob / value alignment, temperature, left-padding invariance, separate critic, the lean
head (same statistics and gradients as the materialised logits; generate / state dict / tying unchanged)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import V, tiny_lm

from tre_edu.head import LeanHead, StatsRequest
from tre_edu.policy import ActorCritic, PolicyOutput, position_ids_from_mask, response_logprobs, response_stats

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
    assert policy.use_lean_head and isinstance(actor.get_output_embeddings(), LeanHead)
    ids, mask, R = batch()
    out = policy(ids, mask, R, return_logits=True)
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
    lean = policy(ids, mask, R)  # through the head: no logits, the same log-probs
    assert lean.logits is None
    torch.testing.assert_close(lean.logprobs, out.logprobs, atol=1e-6, rtol=1e-6)


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
    out = policy(ids, mask, R, temperature=temperature, return_logits=True)
    plain = policy(ids, mask, R, return_logits=True)
    torch.testing.assert_close(out.logits, plain.logits / temperature)
    torch.testing.assert_close(policy(ids, mask, R, temperature=temperature).logprobs, out.logprobs)
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


REQUESTS = [
    None,
    StatsRequest(entropy=True, metrics=True),
    StatsRequest(tre=True, top_k=2),
    StatsRequest(tre=True, top_k=1, entropy=True),
    StatsRequest(tre=True, top_p=0.9, metrics=True, metrics_p=0.5),
]


def _run(policy: ActorCritic, request, lean: bool, temperature: float = 1.0):
    policy.use_lean_head = lean
    policy.zero_grad(set_to_none=True)
    ids, mask, R = batch()
    m = mask[:, -R:].float()
    out = policy(ids, mask, R, request=request, mask=m, temperature=temperature)
    g = torch.Generator().manual_seed(3)
    loss = (out.logprobs * torch.randn(out.logprobs.shape, generator=g)).sum() + out.values.sum()
    for t in (out.entropy, out.tre):
        loss = loss + (0 if t is None else (t * torch.randn(t.shape, generator=g)).sum())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: "logprobs" if r is None else "+".join(r.channels))
def test_lean_head_equals_materialised_logits(name, request_):
    actor = tiny_lm(name)
    if name == "qwen2":  # an output layer with a bias, untied
        actor.lm_head = torch.nn.Linear(actor.lm_head.in_features, actor.lm_head.out_features, bias=True)
    policy = ActorCritic(actor)
    randomize_head(policy)
    assert policy.use_lean_head
    temperature = 0.8 if name == "gpt2" else 1.0
    lean, g_lean = _run(policy, request_, True, temperature)
    ref, g_ref = _run(policy, request_, False, temperature)
    for key in ("logprobs", "values", "entropy", "tre"):
        a, b = getattr(lean, key), getattr(ref, key)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert lean.metrics.keys() == ref.metrics.keys()
    for k in ref.metrics:
        assert lean.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-6, abs=1e-9), k
    assert lean.metrics_weight == ref.metrics_weight
    assert g_lean.keys() == g_ref.keys()
    for n in g_ref:
        scale = float(g_ref[n].abs().max()) or 1.0
        assert float((g_lean[n] - g_ref[n]).abs().max()) <= 1e-5 * scale, n


def test_lean_head_keeps_parameters_tying_generate_and_state_dict():
    actor = tiny_gpt2()
    plain = tiny_gpt2()
    keys = set(actor.state_dict())
    assert ActorCritic(actor).use_lean_head
    head = actor.get_output_embeddings()
    assert isinstance(head, LeanHead) and head.weight is actor.transformer.wte.weight  # tied: one Parameter
    assert set(actor.state_dict()) == keys
    ids = torch.randint(2, V, (2, 5))
    torch.testing.assert_close(actor(ids).logits, plain(ids).logits)  # no context: the plain linear layer
    a = actor.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    b = plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    assert ActorCritic(actor).actor.get_output_embeddings() is head  # installing twice keeps the one head
    assert not ActorCritic(tiny_gpt2(), lean_head=False).use_lean_head


def test_response_stats_any_model_and_errors():
    ids, mask, R = batch()
    req = StatsRequest(entropy=True, tre=True, top_k=2, metrics=True)
    bare = tiny_gpt2()  # no head installed: materialised
    a = response_stats(bare, ids, mask, R, req, mask=mask[:, -R:])
    policy = ActorCritic(tiny_gpt2())
    b = response_stats(policy.actor, ids, mask, R, req, mask=mask[:, -R:])  # through the installed head
    for key in ("logprobs", "entropy", "tre"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=1e-6, rtol=1e-6)
    assert a.metrics == pytest.approx(b.metrics, rel=1e-6)
    with pytest.raises(ValueError, match="lean=True needs a LeanHead"):
        response_stats(bare, ids, mask, R, lean=True)
    with pytest.raises(ValueError, match="mask must have shape"):
        response_stats(bare, ids, mask, R, mask=mask)
    with pytest.raises(ValueError, match="StatsRequest with tre=True needs exactly one"):
        StatsRequest(tre=True)
