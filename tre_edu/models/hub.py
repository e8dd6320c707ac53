"""Pretrained Hugging Face models (Qwen2.5, any causal LM): the one loader, :func:`load_pretrained`, for a hub id, a
local directory or a named model (``smollm2-135m-instruct``: :mod:`.smollm2`). A missing path fails with "not found:
PATH"; with ``HF_HUB_OFFLINE=1`` (or no network) a hub id not in the local cache fails fast, saying how to point at a
local copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tre_edu.models import smollm2

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def resolve(name_or_path: str | os.PathLike) -> str:
    """A named model's local directory; a path (absolute, ``./``, ``~`` or with two ``/``), which must exist;
    else a hub id, returned as is."""
    name = str(name_or_path)
    if name == smollm2.NAME:
        return str(smollm2.local_dir())
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"not found: {name}")
    return name


def load_pretrained(name_or_path: str | os.PathLike, dtype: str = "float32") -> tuple[Any, Any]:
    """``(tokenizer, causal LM)`` in ``dtype``; a tokenizer without a pad token pads with its EOS token."""
    source, dtype = resolve(name_or_path), torch_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        where = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached"
        raise OSError(
            f"could not load {source!r}: {where} and it is not in the local cache. Download it on a machine with "
            f"network access (`huggingface-cli download {source}`) or pass a local directory as model.name. "
            f"Original error: {type(err).__name__}: {err}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
