"""Back-of-the-envelope GPU memory arithmetic for a run (``tre-edu train --dry-run``).

The estimate counts the big items only and says so; it is meant to choose GPUs, micro-batch sizes and whether to
shard (FSDP) or offload, not to predict the allocator's peak to the megabyte.

Per process, for a model of P parameters trained with AdamW in mixed precision and sharded over N processes (FSDP
full shard; N = 1 means no sharding):

    weights (bf16 compute copy)       2 P          (whole during forward of a layer; sharded at rest: 2 P / N)
    fp32 master weights               4 P / N
    gradients (fp32)                  4 P / N
    Adam moments (fp32, two)          8 P / N
    logits of one micro-batch         b T V x 4 bytes x ~3 (logits, log-softmax pieces, their gradient)
    activations (checkpointed)        L b T h x 2 bytes x ~2, plus one layer's full activations
    KV cache while sampling           2 L T b_roll d_kv x 2 bytes

The actor and a separate critic (the paper's set-up) each pay the parameter items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Shapes of the models the paper's recipes use (from their public configs), so that a dry run works offline.
KNOWN_SHAPES: dict[str, dict[str, int | bool]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden=896, layers=24, inter=4864, heads=14, kv_heads=2, vocab=151936, tied=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden=1536, layers=28, inter=8960, heads=12, kv_heads=2, vocab=151936, tied=True),
    "Qwen/Qwen2.5-3B-Instruct": dict(hidden=2048, layers=36, inter=11008, heads=16, kv_heads=2, vocab=151936, tied=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(hidden=3584, layers=28, inter=18944, heads=28, kv_heads=4, vocab=152064, tied=False),
}
GIB = 1024**3


def shape_of(cfg: Any) -> dict[str, int | bool]:
    """Model shape for a :class:`~tre_edu.config.TrainConfig`: the tiny model, a known id, or a local config."""
    m = cfg.model
    if m.name == "tiny" and cfg.init_from is None:
        vocab = 32 + m.tail_tokens  # the Countdown alphabet and specials are a few dozen tokens
        return dict(hidden=m.n_embd, layers=m.n_layer, inter=4 * m.n_embd, heads=m.n_head, kv_heads=m.n_head,
                    vocab=vocab, tied=True, gpt2=True)  # fmt: skip
    name = cfg.init_from or m.name
    for key, shape in KNOWN_SHAPES.items():
        if name == key or name == key.split("/")[-1]:
            return dict(shape)
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(name)
    except Exception as err:  # offline and not cached, or not a model directory
        raise ValueError(
            f"cannot estimate memory for model {name!r}: not one of {', '.join(KNOWN_SHAPES)} and its config "
            f"could not be read ({type(err).__name__}); pass a local model directory"
        ) from err
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    return dict(
        hidden=hidden,
        layers=getattr(c, "num_hidden_layers", None) or c.n_layer,
        inter=getattr(c, "intermediate_size", None) or 4 * hidden,
        heads=getattr(c, "num_attention_heads", None) or c.n_head,
        kv_heads=getattr(c, "num_key_value_heads", None) or getattr(c, "num_attention_heads", None) or c.n_head,
        vocab=c.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", True)),
    )


def count_params(s: dict[str, int | bool]) -> int:
    h, L, inter, V = int(s["hidden"]), int(s["layers"]), int(s["inter"]), int(s["vocab"])
    d_kv = h // int(s["heads"]) * int(s["kv_heads"])
    if s.get("gpt2"):
        per_layer = 4 * h * h + 2 * h * inter + 9 * h  # qkv + proj, two MLP matrices, biases and norms
    else:
        per_layer = 2 * h * h + 2 * h * d_kv + h + 2 * d_kv + 3 * h * inter + 2 * h  # Qwen2: q/k/v biases, SwiGLU
    return V * h * (1 if s["tied"] else 2) + L * per_layer + h


@dataclass
class MemoryEstimate:
    params: int
    processes: int
    rows: dict[str, float] = field(default_factory=dict)  # GiB per process

    @property
    def total_gib(self) -> float:
        return sum(self.rows.values())

    def report(self) -> str:
        lines = [f"memory estimate per process ({self.processes} process(es), {self.params / 1e9:.3f} B params/model):"]
        lines += [f"  {k:<44s} {v:8.2f} GiB" for k, v in self.rows.items()]
        lines.append(f"  {'total (big items only)':<44s} {self.total_gib:8.2f} GiB")
        return "\n".join(lines)


def estimate_memory(cfg: Any, processes: int = 1, fsdp: bool | None = None) -> MemoryEstimate:
    """Estimate the per-process memory of PPO training for ``cfg`` (see the module docstring for the formulas)."""
    s = shape_of(cfg)
    P = count_params(s)
    n = max(1, int(processes))
    shard = n if (fsdp if fsdp is not None else n > 1) else 1
    p = cfg.ppo
    half = 2 if p.mixed_precision != "no" or cfg.model.dtype != "float32" else 4
    models = 2 if cfg.model.critic == "separate" else 1
    prompt_len = 256 if cfg.model.name != "tiny" else 16
    T = prompt_len + p.max_new_tokens
    b = p.micro_batch_size
    h, L, V = int(s["hidden"]), int(s["layers"]), int(s["vocab"])
    d_kv = h // int(s["heads"]) * int(s["kv_heads"])
    rows = {
        "weights (compute copy)": models * P * half / shard / GIB,
        "fp32 master weights": (models * P * 4 / shard / GIB) if half == 2 else 0.0,
        "gradients (fp32)": models * P * 4 / shard / GIB,
        "AdamW moments (fp32 x2)": models * P * 8 / shard / GIB,
        f"logits of a micro-batch ({b} x {p.max_new_tokens} x {V})": b * p.max_new_tokens * V * 4 * 3 / GIB,
        "activations (checkpointed)" if cfg.model.gradient_checkpointing else "activations": (
            (L * b * T * h * 2 * 2 + 16 * b * T * h * 2)
            if cfg.model.gradient_checkpointing
            else L * 16 * b * T * h * 2
        )
        / GIB,
        "KV cache while sampling (one rollout batch)": 2 * L * T * d_kv * 2
        * (p.prompts_per_step * p.samples_per_prompt // n) / GIB,
    }  # fmt: skip
    return MemoryEstimate(params=P, processes=n, rows=rows)
