"""Run configuration: dataclasses, YAML load / save, command-line overrides and validation.

A run is described by one :class:`TrainConfig` made of small sections::

    task:        which task, which data, which prompt style
    model:       the tiny CPU model or a Hugging Face model (name or local path), critic layout, precision
    sft:         the supervised warm start (tiny model recipes)
    ppo:         rollout sizes, PPO optimisation, GAE, clipping, sampling
    regularizer: none | entropy | tre-k | tre-p | forking | kl-cov | clip-cov and their settings
    eval:        held-out evaluation (greedy and the paper's sampled pass@1)

YAML files may ``base:`` another YAML file (a path relative to the file); the child's keys override the base's,
section by section. Overrides from the command line use dotted keys: ``ppo.steps=50 regularizer.kind=tre-k``.
Every value is validated; an error names the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tre_edu.regularizers import Regularizer

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
ADVANTAGES = ("gae", "grpo")
KL_KINDS = ("k1", "k2", "k3")
DTYPES = ("float32", "bfloat16", "float16")
PROMPT_STYLES = ("compact", "plain", "chat")


def _check(cond: bool, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _in(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, "one of " + ", ".join(map(str, choices)), value)


def _pos_int(name: str, value: Any, minimum: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    _check(ok, name, f"an integer >= {minimum}", value)


def _num(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    lo_s = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    hi_s = "" if hi is None else f"<= {hi}"
    _check(ok, name, "a finite number " + " and ".join(s for s in (lo_s, hi_s) if s), value)


@dataclass
class TaskConfig:
    """Which task and data. ``options`` go to the task's ``make_task`` (e.g. ``num_count``, ``think``)."""

    name: str = "countdown"
    style: str = "compact"  # compact (tiny model) | plain (paper prompt, raw) | chat (paper prompt, chat template)
    train_size: int | None = None  # None: the whole training split
    eval_size: int = 200
    options: dict = field(default_factory=dict)

    def validate(self) -> None:
        from tre_edu.tasks import TASK_NAMES

        _in("task.name", self.name, TASK_NAMES)
        _in("task.style", self.style, PROMPT_STYLES)
        if self.train_size is not None:
            _pos_int("task.train_size", self.train_size)
        _pos_int("task.eval_size", self.eval_size)
        _check(isinstance(self.options, dict), "task.options", "a mapping", self.options)


@dataclass
class ModelConfig:
    """The policy. ``name: tiny`` builds the CPU model of :mod:`tre_edu.models.tiny`; anything else is a Hugging
    Face model id or a local directory (a saved tiny model, a warm start, a Qwen2.5 checkpoint)."""

    name: str = "tiny"
    tail_tokens: int = 2000  # tiny model only: extra vocabulary entries that never occur in the data
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128
    critic: str = "value-head"  # value-head (shared trunk) | separate (the paper: critic initialised from the actor)
    dtype: str = "float32"  # parameters; bf16 autocast is `ppo.mixed_precision`
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        _check(
            isinstance(self.name, str) and self.name != "",
            "model.name",
            "'tiny', a hub id or a path",
            self.name,
        )
        _pos_int("model.tail_tokens", self.tail_tokens, 0)
        for n in ("n_embd", "n_layer", "n_head", "n_positions"):
            _pos_int(f"model.{n}", getattr(self, n))
        _check(self.n_embd % self.n_head == 0, "model.n_embd", "a multiple of model.n_head", self.n_embd)
        _in("model.critic", self.critic, ("value-head", "separate"))
        _in("model.dtype", self.dtype, DTYPES)


@dataclass
class SFTConfig:
    """Supervised warm start on solver-made solutions (only used when ``enabled``)."""

    enabled: bool = False
    steps: int = 600
    seconds: float | None = None  # optional time budget; stops at whichever comes first
    batch_size: int = 128
    lr: float = 2e-3
    examples: int = 20000
    eval_every: int = 100

    def validate(self) -> None:
        _pos_int("sft.steps", self.steps, 0)
        if self.seconds is not None:
            _num("sft.seconds", self.seconds, 0, lo_open=True)
        _pos_int("sft.batch_size", self.batch_size)
        _num("sft.lr", self.lr, 0, lo_open=True)
        _pos_int("sft.examples", self.examples)
        _pos_int("sft.eval_every", self.eval_every)


@dataclass
class PPOConfig:
    """PPO with a GAE critic, as in the paper (verl). Sizes count *responses* unless they say prompts."""

    steps: int = 100  # PPO iterations (rollout + update)
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    ppo_epochs: int = 1
    minibatch_size: int = 64  # responses per optimiser step
    micro_batch_size: int = 64  # responses per forward/backward (gradient accumulation inside a mini-batch)
    actor_lr: float = 1e-6
    critic_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.0  # actor learning-rate warm-up (fraction of all optimiser steps)
    critic_warmup_ratio: float = 0.05
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    value_clip: float | None = 0.5
    value_coef: float = 1.0  # weight of the value loss (separate critic: only scales its gradient)
    gamma: float = 1.0
    lam: float = 1.0
    advantage: str = "gae"  # gae (critic) | grpo (reward minus the group mean; no critic needed)
    whiten_advantages: bool = True
    agg: str = "token-mean"
    kl_coef: float = 0.0  # KL to the initial policy as a loss term (off in the paper)
    kl_kind: str = "k3"
    kl_in_reward: bool = False  # fold the KL into the per-token reward instead of the loss
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast)
    rollout_batch_size: int = 0  # responses sampled at once (0: the whole batch); bounds the KV cache
    rollout_backend: str = (
        "hf"  # hf (the library's KV-cached sampler) | vllm (optional extra: pip install tre_edu[vllm])
    )
    vllm_gpu_memory_utilization: float = 0.4

    def validate(self) -> None:
        for n in ("steps", "prompts_per_step", "samples_per_prompt", "ppo_epochs", "minibatch_size"):
            _pos_int(f"ppo.{n}", getattr(self, n))
        _pos_int("ppo.micro_batch_size", self.micro_batch_size)
        _pos_int("ppo.max_new_tokens", self.max_new_tokens)
        _pos_int("ppo.top_k", self.top_k, 0)
        for n in ("actor_lr", "critic_lr"):
            _num(f"ppo.{n}", getattr(self, n), 0)
        _num("ppo.weight_decay", self.weight_decay, 0)
        _num("ppo.warmup_ratio", self.warmup_ratio, 0, 1)
        _num("ppo.critic_warmup_ratio", self.critic_warmup_ratio, 0, 1)
        _num("ppo.grad_clip", self.grad_clip, 0, lo_open=True)
        _num("ppo.clip_low", self.clip_low, 0, 1, lo_open=True)
        _num("ppo.clip_high", self.clip_high, 0, lo_open=True)
        if self.dual_clip is not None:
            _num("ppo.dual_clip", self.dual_clip, 1, lo_open=True)
        if self.value_clip is not None:
            _num("ppo.value_clip", self.value_clip, 0, lo_open=True)
        _num("ppo.value_coef", self.value_coef, 0)
        _num("ppo.gamma", self.gamma, 0, 1)
        _num("ppo.lam", self.lam, 0, 1)
        _in("ppo.advantage", self.advantage, ADVANTAGES)
        _in("ppo.agg", self.agg, AGG_MODES)
        _num("ppo.kl_coef", self.kl_coef, 0)
        _in("ppo.kl_kind", self.kl_kind, KL_KINDS)
        _num("ppo.temperature", self.temperature, 0, lo_open=True)
        _num("ppo.top_p", self.top_p, 0, 1, lo_open=True)
        _in("ppo.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _pos_int("ppo.rollout_batch_size", self.rollout_batch_size, 0)
        _in("ppo.rollout_backend", self.rollout_backend, ("hf", "vllm"))
        _num("ppo.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0, 1, lo_open=True)
        batch = self.prompts_per_step * self.samples_per_prompt
        _check(
            self.minibatch_size <= batch and batch % self.minibatch_size == 0,
            "ppo.minibatch_size",
            f"a divisor of prompts_per_step * samples_per_prompt = {batch}",
            self.minibatch_size,
        )
        _check(
            self.micro_batch_size <= self.minibatch_size and self.minibatch_size % self.micro_batch_size == 0,
            "ppo.micro_batch_size",
            f"a divisor of ppo.minibatch_size = {self.minibatch_size}",
            self.micro_batch_size,
        )
        if self.advantage == "grpo":
            _check(self.samples_per_prompt >= 2, "ppo.samples_per_prompt", ">= 2 with advantage: grpo", 1)


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy accuracy and the paper's validation (one sample, temperature 1.0, top_p 0.7)."""

    every: int = 25  # PPO steps between evaluations (0: only at the start and the end)
    greedy: bool = True
    sampled: bool = True
    temperature: float = 1.0
    top_p: float = 0.7
    batch_size: int = 128

    def validate(self) -> None:
        _pos_int("eval.every", self.every, 0)
        _num("eval.temperature", self.temperature, 0, lo_open=True)
        _num("eval.top_p", self.top_p, 0, 1, lo_open=True)
        _pos_int("eval.batch_size", self.batch_size)


@dataclass
class TrainConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    regularizer: Regularizer = field(default_factory=Regularizer)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    init_from: str | None = None  # a checkpoint / warm-start directory to start PPO from
    checkpoint_every: int = 0  # PPO steps between checkpoints (0: only at the end)
    tensorboard: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N (with `accelerate launch` the launcher decides)
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    notes: str = ""

    def validate(self) -> TrainConfig:
        for sec in (self.task, self.model, self.sft, self.ppo, self.eval):
            sec.validate()
        self.regularizer.__post_init__()
        _pos_int("seed", self.seed, 0)
        _pos_int("checkpoint_every", self.checkpoint_every, 0)
        _pos_int("threads", self.threads, 0)
        _check(
            isinstance(self.output_dir, str) and self.output_dir != "",
            "output_dir",
            "a path",
            self.output_dir,
        )
        ok = self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")
        _check(ok, "device", "auto, cpu, cuda or cuda:N", self.device)
        return self

    # ---- conversion -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return _build(cls, data or {}, "").validate()

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, overrides: list[str] | dict | None) -> TrainConfig:
        """A copy with dotted overrides applied: ``["ppo.steps=10", "regularizer.kind=tre-k"]`` or a dict."""
        data = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides or [])
        for key, value in items:
            _set_dotted(data, key, value)
        return TrainConfig.from_dict(data)


def _split(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ValueError(f"an override must look like section.field=value (e.g. ppo.steps=50); got {override!r}")
    key, raw = override.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() != "" else None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {key!r}")
        node = node[part]
        if node is None:
            node = {}
    if not isinstance(node, dict):
        raise ValueError(f"config key {key!r} does not name a field")
    leaf = parts[-1]
    # `task.options` is free-form; everywhere else the key must exist.
    if leaf not in node and not (len(parts) >= 2 and parts[-2] == "options"):
        raise ValueError(f"unknown config key {key!r}; allowed here: {', '.join(sorted(node))}")
    node[leaf] = value


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Light type coercion for YAML / command-line values (ints given for floats, strings of numbers)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        if origin is typing.Union or type(None) in typing.get_args(tp):
            return None
        raise ValueError(f"{name} must not be empty (null)")
    target = args[0] if args else tp
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number; got {value!r}") from None
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if target is bool and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")
    if target is str and isinstance(value, bool):
        # YAML 1.1 reads a bare `no` / `yes` as a boolean (e.g. `ppo.mixed_precision: no`): give the word back.
        return "yes" if value else "no"
    if target is str and not isinstance(value, str):
        return str(value)
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
            f"allowed{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, tp, value)
    return cls(**kwargs)


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options" else v
        if k == "options" and isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = {**base[k], **v}
    return out


def load_yaml_dict(path: str | Path) -> dict:
    """Read a YAML config, following ``base:`` chains (relative to each file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(load_yaml_dict(path.parent / base), data)
    return data


def load_config(
    path: str | Path | list[str | Path] | None = None, overrides: list[str] | dict | None = None
) -> TrainConfig:
    """Load YAML config(s) and apply dotted overrides.

    ``path`` may be one file, a list of files merged left to right (e.g. a task base, a method, a model:
    ``["configs/paper/math.yaml", "configs/paper/methods/tre-k.yaml", "configs/paper/models/qwen2.5-7b.yaml"]``),
    or None for the defaults.
    """
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data: dict = {}
    for p in paths:
        data = _merge(data, load_yaml_dict(p))
    cfg = TrainConfig.from_dict(data)
    return cfg.replace(overrides) if overrides else cfg
