"""The tiny tokenizer and model: round trips, the tail never encoded, shapes, parameter counts, save /
load."""

from __future__ import annotations

import pytest
import torch

from tre_edu.models.tiny import (
    EOS,
    alphabet,
    build_tiny_model,
    build_tokenizer,
    count_parameters,
    tail_token_ids,
)
from tre_edu.tasks import countdown as cd

TEXTS = [
    "3 7 20->41:<think></think><answer>3*7+20</answer>",
    "12 5 3 4->47:<think>12+5=17 17*3=51 51-4=47</think><answer>(12+5)*3-4</answer>",
    "<think> 1, 2. [3] </think> <answer> (1 + 2) / 3 </answer>\n",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tail_tokens=50)


def test_vocabulary_layout(tok):
    assert len(tok) == len(alphabet()) + 50
    assert tok.convert_ids_to_tokens(tail_token_ids(tok))[:2] == ["<tail_00000>", "<tail_00001>"]
    assert tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert len(build_tokenizer(0)) == len(alphabet())
    with pytest.raises(ValueError, match="tail_tokens"):
        build_tokenizer(-1)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert not set(ids) & set(tail_token_ids(tok))


def test_tags_and_arrow_are_single_tokens(tok):
    for piece in ("<think>", "</think>", "<answer>", "</answer>", "->"):
        assert len(tok(piece, add_special_tokens=False)["input_ids"]) == 1
    assert tok(TEXTS[0])["input_ids"] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]  # nothing added


def test_tail_tokens_never_produced_by_encoding(tok):
    tail = set(tail_token_ids(tok))
    for text in ["<tail_00001>", "<tail_00049> <eos>", "hello world ٣ 🙂"] + [
        cd.make_task(think=True).reference_response(e) for e in cd.generate(20, seed=0)
    ]:
        assert not set(tok(text, add_special_tokens=False)["input_ids"]) & tail
    # decoding a tail token yields text the checker rejects; special tokens are skipped
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    prompt_len = len(tok("3 7 20->41:", add_special_tokens=False)["input_ids"])
    response = ids[prompt_len:]
    assert cd.score(
        tok.decode(response + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True), [3, 7, 20], 41
    )
    assert cd.score(tok.decode(response[:-1] + [tail_token_ids(tok)[0]] + response[-1:]), [3, 7, 20], 41) == 0.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_shapes(tok, arch):
    model = build_tiny_model(tok, n_embd=32, n_layer=2, n_head=2, n_positions=64, arch=arch)
    ids = torch.randint(0, len(alphabet()), (3, 10))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (3, 10, len(tok))  # (B, T, V)
    assert model(input_ids=ids, logits_to_keep=4).logits.shape == (3, 4, len(tok))
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_parameter_counts_match_design():
    small = count_parameters(build_tiny_model(build_tokenizer(0)))
    big = count_parameters(build_tiny_model(build_tokenizer(20000)))
    assert 0.75e6 < small < 0.85e6  # DESIGN: 0.8M without tail
    assert 3.3e6 < big < 3.5e6  # DESIGN: 3.4M with a 20k tail
    assert big - small == 20000 * 128  # each tail token adds one (tied) embedding row


def test_seeded_init_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_model(tok, n_embd=32, n_layer=1, n_head=2, seed=7)
    assert torch.equal(torch.rand(1), expected)
    b = build_tiny_model(tok, n_embd=32, n_layer=1, n_head=2, seed=7)
    c = build_tiny_model(tok, n_embd=32, n_layer=1, n_head=2, seed=8)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_bad_shapes():
    tok = build_tokenizer(0)
    with pytest.raises(ValueError, match="n_embd"):
        build_tiny_model(tok, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tok, arch="mamba")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_and_load_round_trip(tok, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny_model(tok, n_embd=32, n_layer=2, n_head=2, arch=arch).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for text in TEXTS:
        assert tok2(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert tok2.decode(tok2(text)["input_ids"]) == text
    assert (tok2.eos_token_id, tok2.pad_token_id, tok2.padding_side) == (
        tok.eos_token_id,
        tok.pad_token_id,
        "left",
    )
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, model(ids).logits)
