"""Pretrained Hugging Face models (Qwen2.5, any causal LM) and the one place that turns a model config into
(tokenizer, actor, critic).

Hub loads take a model id or a local directory. With ``HF_HUB_OFFLINE=1`` (or no network) a model that is not in
the local cache fails fast with a message that says so and how to point at a local copy.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def _offline_hint(name: str, err: Exception) -> OSError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    where = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached"
    return OSError(
        f"could not load {name!r}: {where} and it is not in the local cache. Download it on a machine with "
        f"network access (`huggingface-cli download {name}`) or pass a local directory as model.name. "
        f"Original error: {type(err).__name__}: {err}"
    )


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise _offline_hint(name_or_path, err) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise
        raise _offline_hint(name_or_path, err) from err


def is_local_model_dir(path: str | None) -> bool:
    return bool(path) and (Path(path) / "config.json").is_file()


def build_tokenizer_and_actor(model_cfg: Any, init_from: str | None = None, seed: int = 0):
    """(tokenizer, actor) for a :class:`~tre_edu.config.ModelConfig`.

    ``init_from`` (a directory written by ``save_pretrained``, e.g. a warm start) wins over ``model_cfg.name``.
    ``name: tiny`` without ``init_from`` builds a freshly initialised tiny model with ``tail_tokens`` tail tokens.
    """
    source = init_from or (None if model_cfg.name == "tiny" else model_cfg.name)
    if source is None:
        from tre_edu.models.tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer(tail_tokens=model_cfg.tail_tokens)
        actor = build_tiny_model(
            tokenizer,
            n_embd=model_cfg.n_embd,
            n_layer=model_cfg.n_layer,
            n_head=model_cfg.n_head,
            n_positions=model_cfg.n_positions,
            seed=seed,
        )
        return tokenizer, actor.to(torch_dtype(model_cfg.dtype))
    if init_from is not None and not Path(init_from).is_dir():
        raise FileNotFoundError(f"init_from must be a directory written by save_pretrained; got {init_from!r}")
    tokenizer = load_tokenizer(source)
    actor = load_causal_lm(source, model_cfg.dtype)
    return tokenizer, actor


def build_policy(model_cfg: Any, init_from: str | None = None, seed: int = 0):
    """(tokenizer, ActorCritic) for a model config: the actor plus a value head or a separate critic."""
    from tre_edu.policy import ActorCritic

    tokenizer, actor = build_tokenizer_and_actor(model_cfg, init_from, seed)
    critic = None
    if model_cfg.critic == "separate":
        # The paper initialises the critic from the same checkpoint as the actor.
        critic = copy.deepcopy(actor)
    policy = ActorCritic(actor, critic=critic, value_head=True)
    if model_cfg.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return tokenizer, policy
