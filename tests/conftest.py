"""Shared test models and configs: tiny Hugging Face LMs (GPT-2, Llama, Qwen2 shapes) and the small tiny-recipe
config that trains in about a second per PPO step. Import the helpers (``from conftest import tiny_lm``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tre_edu.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "countdown_tiny.yaml")
V, PAD, EOS = 101, 0, 1

# the tiny recipe shrunk to about a second per PPO step (tests only)
SMALL = [
    "model.tail_tokens=300",
    "model.n_embd=32",
    "model.n_layer=1",
    "model.n_head=2",
    "ppo.prompts_per_step=4",
    "ppo.samples_per_prompt=4",
    "ppo.minibatch_size=8",
    "ppo.micro_batch_size=4",
    "ppo.max_new_tokens=12",
    "ppo.actor_lr=1e-3",
    "ppo.critic_lr=1e-3",
    "task.eval_size=8",
    "task.train_size=64",
    "eval.every=0",
    "eval.sampled=false",
    "sft.enabled=false",
]


def small_config(output_dir, *extra: str):
    """The tiny recipe at test size, writing to ``output_dir``; ``extra``: more ``key=value`` overrides."""
    return load_config(CONFIG, [*SMALL, f"output_dir={output_dir}", *extra])


def tiny_lm(kind: str = "gpt2", seed: int = 0, vocab: int = V, positions: int = 96):
    """A randomly initialised causal LM (eval mode, no dropout): ``gpt2``, ``llama`` or ``qwen2``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=EOS, eos_token_id=EOS)
    if kind == "gpt2":
        cfg = GPT2Config(**common, n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return GPT2LMHeadModel(cfg).eval()
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=positions, pad_token_id=PAD,
                      tie_word_embeddings=False)  # fmt: skip
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, **llama_like)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, **llama_like)).eval()
    raise ValueError(f"unknown tiny model kind {kind!r}")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state (its mixed precision is fixed once set): tests that build trainers
    with different precisions each start from a clean one."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_reward_model(max_length: int = 256, seed: int = 0):
    """An untrained CPU reward model whose vocabulary is the words of both bundled HH samples."""
    from tre_edu.reward_model import build_tiny_reward_model
    from tre_edu.tasks import hh

    examples = [e for source in hh.SOURCES for e in hh.bundled_examples(source)]
    return build_tiny_reward_model(hh.corpus(examples), max_length=max_length, seed=seed)
