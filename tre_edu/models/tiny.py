"""A tiny causal LM and tokenizer for Countdown on a CPU, with a configurable vocabulary *tail*.

The tokenizer is character level over the Countdown alphabet (digits, ``+ - * / ( ) =``, space, ``:``), with
the compact-prompt arrow ``->`` and the four tags ``<think> </think> <answer> </answer>`` as single tokens,
the special tokens ``<pad> <bos> <eos> <unk>``, and ``tail_tokens`` extra entries (``<tail_00000>``, ...)
that no text ever encodes to: the stand-in for the tens of thousands of tokens of a real LLM vocabulary that
are irrelevant to the task. The output layer covers them, so a policy can (and under a global entropy bonus
does) move probability onto them; decoding one gives text the Countdown checker rejects.

Characters rather than whole numbers as tokens: ~30 symbols spell every number of any size, nothing is out of
vocabulary, and the tiny model still reaches ~20% greedy accuracy on 3-number puzzles after ~150 warm-start
steps of batch 128 (see :mod:`tre_edu.sft`).

    >>> tok = build_tokenizer(tail_tokens=100)
    >>> tok.decode(tok("3 7 20->41:<think></think><answer>3*7+20</answer>")["input_ids"])
    '3 7 20->41:<think></think><answer>3*7+20</answer>'
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Single characters of the Countdown alphabet (and a few harmless extras for plain-text prompts).
CHARS = tuple("0123456789") + tuple("+-*/()= :") + tuple(",.[]\n")
MULTI_CHAR = ("->",)
TAIL_FORMAT = "<tail_{:05d}>"
# Tags and "->" first, then any single character: a text never produces a tail token (its "<" is split off).
_SPLIT_PATTERN = r"</?think>|</?answer>|->|[\s\S]"


def alphabet() -> list[str]:
    """The vocabulary in id order, without the tail: special tokens, characters, "->", tags."""
    return list(SPECIAL_TOKENS) + list(CHARS) + list(MULTI_CHAR) + list(TAGS)


def build_tokenizer(tail_tokens: int = 2000):
    """A :class:`~transformers.PreTrainedTokenizerFast` for the tiny model (built locally, no hub): :func:`alphabet`
    (33 entries), then ``tail_tokens`` tail entries (:data:`TAIL_FORMAT`). Encoding adds no special tokens; decoding
    concatenates tokens, so ``decode(encode(text)) == text`` over the alphabet. Unknown characters map to ``<unk>``;
    padding is on the left (for generation)."""
    if not isinstance(tail_tokens, int) or isinstance(tail_tokens, bool) or not 0 <= tail_tokens <= 1_000_000:
        raise ValueError(f"tail_tokens must be an integer in [0, 1000000]; got {tail_tokens!r}")
    vocab_list = alphabet() + [TAIL_FORMAT.format(i) for i in range(tail_tokens)]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated")
    core.decoder = decoders.Fuse()
    specials = dict(pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials, padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=4096)  # fmt: skip


def tail_token_ids(tokenizer) -> list[int]:
    """Ids of the tail tokens (the entries after :func:`alphabet`) of a tiny tokenizer."""
    return list(range(len(alphabet()), len(tokenizer)))


def build_tiny_model(tokenizer, n_embd: int = 128, n_layer: int = 4, n_head: int = 4, n_positions: int = 128,
                     seed: int = 0, arch: str = "gpt2"):  # fmt: skip
    """A freshly initialised causal LM for ``tokenizer`` (no hub): GPT-2 style (learned positions, GELU MLP) or Llama
    style (RoPE, RMSNorm, SwiGLU); tied embeddings; no dropout (PPO needs the same log-probs in rollout and training);
    vocab size ``len(tokenizer)``, so the LM head covers the tail. Seeded by ``seed``; the global RNG is untouched."""
    shape = dict(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, arch=arch)
    for name, value in list(shape.items())[:4]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"arch must be one of gpt2, llama; got {arch!r}")
    if n_embd % n_head or (arch == "llama" and (n_embd // n_head) % 2):
        raise ValueError(f"n_embd must be a multiple of n_head ({n_head}) with an even head size; got {n_embd}")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    V = len(tokenizer)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=V, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                            **ids)  # fmt: skip
        cls = GPT2LMHeadModel
    else:
        inter = int(8 * n_embd / 3 + 63) // 64 * 64  # SwiGLU width ~ 8/3 d (4 d of GELU's params)
        config = LlamaConfig(vocab_size=V, hidden_size=n_embd, intermediate_size=inter, num_hidden_layers=n_layer,
                             num_attention_heads=n_head, num_key_value_heads=n_head,
                             max_position_embeddings=n_positions, attention_dropout=0.0, tie_word_embeddings=True,
                             **ids)  # fmt: skip
        cls = LlamaForCausalLM
    config.tiny = shape  # recorded in config.json for reference
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config = GenerationConfig(**ids)
    return model


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of (unique) parameters; tied embeddings count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def tail_start(tokenizer: Any) -> int | None:
    """First id of the tiny tokenizer's tail (every id from it on is a tail token); None for other tokenizers."""
    first = tokenizer.convert_tokens_to_ids(TAIL_FORMAT.format(0))
    return first if isinstance(first, int) and first != tokenizer.unk_token_id else None
