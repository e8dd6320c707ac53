"""Back-of-the-envelope GPU memory of a run (``tre-edu train --dry-run [--processes N]``): the big items only, to
choose GPUs, micro-batch sizes, sharding and offload. Per process, P parameters, AdamW, S = N with FSDP else 1::

    weights (compute copy)            2 P / S   (bf16: mixed precision or bf16 parameters; 4 P / S in fp32)
    fp32 master weights               4 P / S   (only with fp32 parameters + bf16 / fp16 autocast)
    gradients                         4 P / S   (dtype of the parameters: 2 P / S for bf16 parameters)
    AdamW moments (two)               8 P / S   (dtype of the parameters: 4 P / S for bf16 parameters)
    LM head, lean (ppo.lean_head)     c V x (4 x 3 + m)     one chunk of c tokens of fp32 logits and two scratch
                                                            buffers (+ the chunk in the autocast dtype, m = 2 bytes),
                                      + V h x 2 bytes       the bf16 copy of the head's weight under autocast,
                                      + b R C x 12 bytes    TRE's trust regions (C = K, or the 256 TRE-P candidates)
    logits of one micro-batch         b R V x 4 bytes x 3   (ppo.lean_head false: fp32 logits, log-softmax pieces,
                                                            their gradient)
    activations, checkpointed         L b T h x 2 bytes x 2 + one layer's (16 b T h x 2 bytes)
    activations, not checkpointed     L x 16 b T h x 2 bytes
    KV cache while sampling (hf)      2 L T d_kv x 2 bytes x rollout rows      (d_kv = h / heads x kv_heads)

with b = ``ppo.micro_batch_size``, R = ``ppo.max_new_tokens``, T = prompt + R, V the vocabulary, L the layers, h
the width, c = ``tre_edu.head.default_chunk_tokens(V, "cuda")`` (441 at V = 152,064). A separate critic pays the
parameter items too (no logits). ``offload=True`` moves master weights, gradients and moments to CPU rows; with
``rollout_backend: vllm`` the KV cache row is vLLM's pool, ``vllm_gpu_memory_utilization`` x ``gpu_gib``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig

from tre_edu.head import StatsRequest, default_chunk_tokens, head_buffer_bytes

# Shapes of the recipes' models (from their public configs), so that a dry run works offline.
_COLUMNS = ("hidden", "layers", "inter", "heads", "kv_heads", "vocab", "tied")
KNOWN_SHAPES: dict[str, dict[str, int | bool]] = {
    name: dict(zip(_COLUMNS, row, strict=True))
    for name, row in {
        "HuggingFaceTB/SmolLM2-135M-Instruct": (576, 30, 1536, 9, 3, 49152, True),  # the CPU stand-in
        "Qwen/Qwen2.5-0.5B-Instruct": (896, 24, 4864, 14, 2, 151936, True),
        "Qwen/Qwen2.5-1.5B-Instruct": (1536, 28, 8960, 12, 2, 151936, True),
        "Qwen/Qwen2.5-3B-Instruct": (2048, 36, 11008, 16, 2, 151936, True),
        "Qwen/Qwen2.5-7B-Instruct": (3584, 28, 18944, 28, 4, 152064, False),
    }.items()
}
GIB = 1024**3
# Typical prompt lengths (tokens, chat template included) for T = prompt + response (tiny model: 16).
PROMPT_TOKENS = {"math": 256, "countdown": 160, "hh": 512}
CPU_TAG = " (CPU)"


def shape_of(cfg: Any) -> dict[str, int | bool]:
    """Model shape for a :class:`~tre_edu.config.TrainConfig`: the tiny model, a known id, or a local config."""
    m = cfg.model
    if m.name == "tiny" and cfg.init_from is None:
        vocab = 32 + m.tail_tokens  # the Countdown alphabet and specials are a few dozen tokens
        return dict(hidden=m.n_embd, layers=m.n_layer, inter=4 * m.n_embd, heads=m.n_head, kv_heads=m.n_head,
                    vocab=vocab, tied=True, gpt2=True)  # fmt: skip
    name = cfg.init_from or m.name
    for key, shape in KNOWN_SHAPES.items():
        if name.lower() in (key.lower(), key.split("/")[-1].lower()):
            return dict(shape)
    try:
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
        gpt2=getattr(c, "model_type", "") == "gpt2",
    )


def count_params(s: dict[str, int | bool]) -> int:
    """Parameters of a decoder of shape ``s`` (Qwen2 layout, or GPT-2 with ``gpt2=True``)."""
    h, L, inter, V = int(s["hidden"]), int(s["layers"]), int(s["inter"]), int(s["vocab"])
    d_kv = h // int(s["heads"]) * int(s["kv_heads"])
    if s.get("gpt2"):
        per_layer = 4 * h * h + 2 * h * inter + 9 * h  # qkv + proj, two MLP matrices, biases and norms
    else:
        per_layer = 2 * h * h + 2 * h * d_kv + h + 2 * d_kv + 3 * h * inter + 2 * h  # Qwen2: q/k/v biases, SwiGLU
    return V * h * (1 if s["tied"] else 2) + L * per_layer + h


@dataclass
class MemoryEstimate:
    """Per-process memory rows in GiB; rows whose name ends with " (CPU)" are host memory (offload)."""

    params: int
    processes: int
    rows: dict[str, float] = field(default_factory=dict)  # GiB per process
    sharded: bool = False
    notes: list[str] = field(default_factory=list)
    phase: dict[str, str] = field(default_factory=dict)  # row -> "train" | "sample" (absent: held throughout)

    def _gpu(self, phase: str | None) -> float:
        return sum(v for k, v in self.rows.items() if not k.endswith(CPU_TAG) and self.phase.get(k) == phase)

    @property
    def total_gib(self) -> float:
        """Peak GPU GiB per process: what is held throughout + max(training phase, sampling phase)."""
        return self._gpu(None) + max(self._gpu("train"), self._gpu("sample"))

    @property
    def cpu_gib(self) -> float:
        return sum(v for k, v in self.rows.items() if k.endswith(CPU_TAG))

    def fits(self, gpu_gib: float, margin: float = 0.9) -> bool:
        """Whether the estimate stays below ``margin`` x ``gpu_gib`` (allocator overhead, CUDA context)."""
        return self.total_gib <= margin * gpu_gib

    def report(self) -> str:
        n = self.processes
        layout = f"FSDP full shard over {n}" if self.sharded else f"{n} process(es), no sharding"
        lines = [f"memory estimate per process ({layout}, {self.params / 1e9:.3f} B params/model):"]
        tags = {"train": " [train]", "sample": " [sample]"}
        lines += [f"  {k + tags.get(self.phase.get(k, ''), ''):<64s} {v:9.2f} GiB" for k, v in self.rows.items()]
        lines.append(f"  {'peak GPU = held + max([train], [sample])':<64s} {self.total_gib:9.2f} GiB")
        if self.cpu_gib:
            lines.append(f"  {'total CPU (offloaded)':<64s} {self.cpu_gib:9.2f} GiB")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_memory(
    cfg: Any,
    processes: int = 1,
    fsdp: bool | None = None,
    offload: bool = False,
    gpu_gib: float = 80.0,
    *,
    _advise: bool = True,
) -> MemoryEstimate:
    """Per-process memory of PPO training for ``cfg`` on ``processes`` GPUs (formulas: module docstring). ``fsdp``:
    shard parameters, gradients and optimiser state (default ``processes > 1``; False = DDP); ``offload``: FSDP CPU
    offload of master weights, gradients and AdamW state; ``gpu_gib``: one GPU's memory (vLLM's pool)."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an int >= 1; got {processes!r}")
    if not isinstance(gpu_gib, (int, float)) or gpu_gib <= 0:
        raise ValueError(f"gpu_gib must be a number > 0; got {gpu_gib!r}")
    s, n, p = shape_of(cfg), processes, cfg.ppo
    P = count_params(s)
    sharded = bool(fsdp if fsdp is not None else n > 1)
    shard = n if sharded else 1
    param_bytes = 4 if cfg.model.dtype == "float32" else 2
    autocast = p.mixed_precision != "no"
    compute_bytes = 2 if (autocast or param_bytes == 2) else 4
    models = 2 if cfg.model.critic == "separate" else 1
    prompt_len = 16 if cfg.model.name == "tiny" else PROMPT_TOKENS.get(cfg.task.name, 256)
    R, b = p.max_new_tokens, p.micro_batch_size
    T = prompt_len + R
    h, L, V = int(s["hidden"]), int(s["layers"]), int(s["vocab"])
    d_kv = h // int(s["heads"]) * int(s["kv_heads"])
    cpu = CPU_TAG if offload else ""

    rows: dict[str, float] = {}
    phase: dict[str, str] = {}

    def add(key: str, nbytes: float, when: str | None = None) -> None:
        rows[key] = nbytes / GIB
        if when is not None:
            phase[key] = when

    add("weights (compute copy)", models * P * compute_bytes / shard)
    if param_bytes == 4 and autocast:
        add("fp32 master weights" + cpu, models * P * 4 / shard)
    add(f"gradients ({'fp32' if param_bytes == 4 else 'bf16'})" + cpu, models * P * param_bytes / shard)
    add("AdamW moments (x2)" + cpu, models * P * 2 * param_bytes / shard)
    if getattr(p, "lean_head", False):
        # the head's chunk buffers (tre_edu.head.head_buffer_bytes), never the (b R, V) logits
        c = min(b * R, default_chunk_tokens(V, "cuda"))
        nbytes = head_buffer_bytes(c, V, StatsRequest(), matmul_bytes=2 if autocast else 4)
        add(f"LM head, one chunk ({c} x {V}, ppo.lean_head)", nbytes, "train")
        if autocast and compute_bytes == 2 and param_bytes == 4:
            add(f"LM head weight in the autocast dtype ({V} x {h})", V * h * 2, "train")
        region = {"tre-k": cfg.regularizer.k, "tre-p": cfg.regularizer.max_candidates or 256}.get(cfg.regularizer.kind)
        if region and region > 1:
            add(f"TRE trust regions ({b} x {R} x {region})", b * R * region * 12, "train")
    else:
        add(f"logits of a micro-batch ({b} x {R} x {V})", b * R * V * 4 * 3, "train")
    act_rows = models * b * T * h * 2
    if cfg.model.gradient_checkpointing:
        add("activations (checkpointed)", act_rows * L * 2 + act_rows * 16, "train")
    else:
        add("activations", act_rows * L * 16, "train")
    local = p.prompts_per_step * p.samples_per_prompt // n
    notes = []
    if p.rollout_backend == "vllm":
        rows["vLLM engine (weights + KV pool)"] = p.vllm_gpu_memory_utilization * gpu_gib
        notes.append(f"vLLM takes vllm_gpu_memory_utilization x {gpu_gib:g} GiB; training must fit in the rest")
    else:
        rows_at_once = min(local, p.rollout_batch_size) if p.rollout_batch_size > 0 else local
        add(
            f"KV cache while sampling ({rows_at_once} rows x {T} tokens)", 2 * L * T * d_kv * 2 * rows_at_once, "sample"
        )
        if sharded:
            add("whole actor gathered to sample (FSDP: distributed.full_parameters)", P * param_bytes, "sample")
    if sharded:
        notes.append("FSDP gathers one wrapped layer at a time while training")
    est = MemoryEstimate(params=P, processes=n, rows=rows, sharded=sharded, notes=notes, phase=phase)
    if _advise and not est.fits(gpu_gib):
        notes.append(_advice(cfg, est, processes, fsdp, offload, gpu_gib))
    return est


def _advice(cfg: Any, est: MemoryEstimate, processes: int, fsdp: bool | None, offload: bool, gpu_gib: float) -> str:
    """The settings to change (as ``key=value`` overrides) so that the estimate fits 90 % of ``gpu_gib``: the lean
    head, then the largest fitting ``ppo.micro_batch_size`` (training) / ``ppo.rollout_batch_size`` (sampling)."""
    budget = 0.9 * gpu_gib
    c = copy.deepcopy(cfg)
    tips: list[str] = []

    def again() -> MemoryEstimate:
        return estimate_memory(c, processes, fsdp, offload, gpu_gib, _advise=False)

    def over(e: MemoryEstimate, phase: str) -> bool:
        return e._gpu(None) + e._gpu(phase) > budget

    e = est
    if over(e, "train") and not getattr(c.ppo, "lean_head", True):
        c.ppo.lean_head = True
        tips.append("ppo.lean_head=true")
        e = again()
    mb = c.ppo.micro_batch_size
    while over(e, "train") and c.ppo.micro_batch_size > 1:
        c.ppo.micro_batch_size //= 2  # halving keeps a divisor of ppo.minibatch_size (a power of two times it)
        e = again()
    if c.ppo.micro_batch_size != mb:
        tips.append(f"ppo.micro_batch_size={c.ppo.micro_batch_size}")
    rb = c.ppo.rollout_batch_size or c.ppo.prompts_per_step * c.ppo.samples_per_prompt // processes
    while over(e, "sample") and rb > 1:
        rb //= 2
        c.ppo.rollout_batch_size = rb
        e = again()
    if c.ppo.rollout_batch_size != cfg.ppo.rollout_batch_size:
        tips.append(f"ppo.rollout_batch_size={rb}")
    head = f"does not fit {budget:.0f} GiB (90 % of {gpu_gib:g} GiB)"
    if not e.fits(gpu_gib):
        more = "more processes" if offload else "offload (FSDP CPU offload of the optimiser state) or more processes"
        return f"{head}: even with {', '.join(tips) or 'these settings'} ({e.total_gib:.1f} GiB); try {more}"
    return f"{head}: set {' '.join(tips)} ({e.total_gib:.1f} GiB)"
