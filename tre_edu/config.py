"""Run configuration as plain data (no torch): dataclass sections of a :class:`TrainConfig` (task, model, sft, ppo,
regularizer, eval), each setting declared once (:func:`opt`: help, allowed values, optional short flag), validated
by :func:`check`; ``tre-edu`` derives its flags from the same fields.

YAML files may ``base:`` another file (relative path); several merge left to right, section by section, each followed
by its ``by_task: {<task>: {...}}`` block for the run's ``task.name``. Overrides are dotted keys: ``{"ppo.steps": 50}``
(typed values) or ``"ppo.steps=50"`` (converted by the field's type; ``task.options`` values are read as YAML).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tre_edu.tasks import TASK_NAMES, check_options  # torch-free validation; no task module imports the config
from tre_edu.tasks.base import PROMPT_STYLES

KINDS = ("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov", "clip-cov")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_KINDS = ("k1", "k2", "k3")
ADVANTAGES = ("gae", "grpo")
SELECTIONS = ("microbatch", "minibatch")
DTYPES = ("float32", "bfloat16", "float16")
CRITICS = ("value-head", "separate")

# Named regulariser settings from the papers (entropy-type coefficients in the paper's units, see
# tre_edu.regularizers.effective_coef). The global-entropy coefficient was not published: no "entropy" preset.
PRESETS: dict[str, dict[str, Any]] = {
    "ppo": {"kind": "none"},
    "tre-k": {"kind": "tre-k", "coef": 0.001, "k": 2},  # TRE paper: alpha = 0.001, K = 2
    "tre-p": {"kind": "tre-p", "coef": 0.001, "p": 0.99, "max_candidates": 256},  # p = 0.99 among the top 256
    "forking": {"kind": "forking", "forking_ratio": 0.2, "selection": "microbatch"},  # top 20 % per micro-batch
    # KL-Cov as run in the TRE paper (top 0.2 % by Cov, coef 1, on top of the clipped loss) and its own paper's.
    "kl-cov": {"kind": "kl-cov", "cov_ratio": 0.002, "kl_cov_coef": 1.0},
    "kl-cov-original": {"kind": "kl-cov", "cov_ratio": 0.0002, "kl_cov_coef": 0.1},
    "clip-cov": {"kind": "clip-cov", "clip_cov_ratio": 0.0002, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
}


class ConfigError(ValueError):
    """A bad config: names the file (and line), the field and the allowed values."""


def opt(default: Any, help: str, *, flag: str | None = None, choices=None, pattern=None, **bounds) -> Any:
    """A config field: its default, help, allowed ``choices`` / bounds (ge, gt, le, lt) / a regex ``pattern`` (then
    the help says what it allows), and an optional short command-line ``flag`` (e.g. ``"--steps"``)."""
    md = {"help": help, "flag": flag, "choices": choices, "pattern": pattern, **bounds}
    init = {"default_factory": dict} if isinstance(default, dict) else {"default": default}
    return field(**init, metadata=md)


_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", dict: "a mapping", Any: "a YAML value"}
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the base type, whether None is allowed) of an annotation such as ``int | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return (args[0], True) if args else (tp, False)


def allowed(tp: Any, md: dict) -> str:
    """The allowed values of a field in words: 'an integer >= 1', 'one of a, b', 'true or false', ..."""
    base, optional = _unwrap(tp)
    if md.get("choices"):
        text = "one of " + ", ".join(map(str, md["choices"]))
    else:
        text = _WORDS.get(base, md["help"] if md.get("pattern") else "a string")
        text += " " + " and ".join(f"{op} {md[key]}" for key, (op, _) in _BOUNDS.items() if md.get(key) is not None)
    return text.strip() + (" or null" if optional else "")


def _normal(value: Any, base: Any) -> Any:
    """Light coercion: ints for floats, integral floats for ints, YAML's bare yes / no / numbers for strings."""
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if base is str and isinstance(value, bool):  # YAML 1.1 reads a bare `no` (ppo.mixed_precision: no) as False
        return "yes" if value else "no"
    if base is str and isinstance(value, int | float):
        return str(value)
    return {} if base is dict and value is None else value  # an empty `options:` in YAML


def _ok(value: Any, base: Any, md: dict) -> bool:
    if base in (bool, str, dict):
        good = isinstance(value, base) and (not md.get("choices") or value in md["choices"])
        return good and (not md.get("pattern") or re.fullmatch(md["pattern"], value) is not None)
    if isinstance(value, bool) or not isinstance(value, int if base is int else int | float):
        return False
    return math.isfinite(value) and all(f(value, md[k]) for k, (_, f) in _BOUNDS.items() if md.get(k) is not None)


def check(section: Any, prefix: str) -> None:
    """The one validator: normalise and check each field of ``section`` against its declaration (recursively), then
    the section's cross-field ``_rules``. Raises ConfigError naming the field and the allowed values."""
    hints = _hints(type(section))
    for f in fields(section):
        value, tp, name = getattr(section, f.name), hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            check(value, name + ".")
            continue
        base, optional = _unwrap(tp)
        if value is None and optional:
            continue
        value = _normal(value, base)
        if not _ok(value, base, f.metadata):
            raise ConfigError(f"{name} must be {allowed(tp, f.metadata)}; got {value!r}")
        setattr(section, f.name, value)
    for rule_ok, name, text in section._rules():
        if not rule_ok:
            raise ConfigError(f"{prefix}{name} must be {text}; got {getattr(section, name)!r}")


class _Section:
    """A config section: validated on construction and by :meth:`validate` (errors name ``<section>.<field>``)."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self):
        """Check every field (again, e.g. after an edit in place); returns self."""
        check(self, self.section + "." if self.section else "")
        return self

    def _rules(self):  # cross-field rules: (holds, field name, allowed values in words)
        return ()


@dataclass
class TaskConfig(_Section):
    """Which task and data. ``options`` go to the task's ``make_task`` (e.g. ``num_count``, ``think``)."""

    section: ClassVar[str] = "task"
    name: str = opt("countdown", "task", choices=TASK_NAMES)
    style: str = opt("compact", "compact (tiny model) | plain | chat (the paper's prompt)", choices=PROMPT_STYLES)
    train_size: int | None = opt(None, "training examples (null: the whole training split)", ge=1)
    eval_size: int = opt(200, "held-out examples", ge=1)
    options: dict = opt({}, "task options, checked by tre_edu.tasks.check_options")

    def _rules(self):
        check_options(self.name, self.options)  # raises ValueError naming task.options.<key> and what it allows
        return ()


@dataclass
class ModelConfig(_Section):
    """The policy: ``tiny`` (the CPU model of :mod:`tre_edu.models.tiny`), a hub id or a local directory."""

    section: ClassVar[str] = "model"
    name: str = opt("tiny", "tiny, a hub id or a local path", flag="--model", pattern=r".+")
    tail_tokens: int = opt(2000, "tiny model: vocabulary tail never seen in the data", flag="--tail-tokens", ge=0)
    n_embd: int = opt(128, "tiny model: width (a multiple of n_head)", ge=1)
    n_layer: int = opt(4, "tiny model: layers", ge=1)
    n_head: int = opt(4, "tiny model: attention heads", ge=1)
    n_positions: int = opt(128, "tiny model: context length", ge=1)
    critic: str = opt("value-head", "value-head (shared trunk) | separate (a copy of the actor)", choices=CRITICS)
    dtype: str = opt("float32", "parameter dtype (bf16 autocast is ppo.mixed_precision)", choices=DTYPES)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass")

    def _rules(self):
        yield self.n_embd % self.n_head == 0, "n_embd", f"a multiple of model.n_head = {self.n_head}"


@dataclass
class SFTConfig(_Section):
    """Supervised warm start on solver-made solutions (only used when ``enabled``)."""

    section: ClassVar[str] = "sft"
    enabled: bool = opt(False, "run the warm start before PPO")
    steps: int = opt(600, "optimiser steps", ge=0)
    seconds: float | None = opt(None, "optional time budget; stops at whichever comes first", gt=0)
    batch_size: int = opt(128, "examples per step", ge=1)
    lr: float = opt(2e-3, "learning rate", gt=0, le=1)
    examples: int = opt(20000, "training examples", ge=1)
    eval_every: int = opt(100, "steps between held-out evaluations", ge=1)


@dataclass
class PPOConfig(_Section):
    """PPO with a GAE critic, as in the paper (verl). Sizes count *responses* unless they say prompts."""

    section: ClassVar[str] = "ppo"
    steps: int = opt(100, "PPO iterations (rollout + update)", flag="--steps", ge=1)
    prompts_per_step: int = opt(16, "prompts per PPO step", ge=1)
    samples_per_prompt: int = opt(8, "responses per prompt", ge=1)
    ppo_epochs: int = opt(1, "passes over the batch", ge=1)
    minibatch_size: int = opt(64, "responses per optimiser step", ge=1)
    micro_batch_size: int = opt(64, "responses per forward / backward (per process)", ge=1)
    actor_lr: float = opt(1e-6, "actor learning rate", ge=0, le=1)
    critic_lr: float = opt(1e-5, "critic learning rate", ge=0, le=1)
    weight_decay: float = opt(0.01, "AdamW weight decay", ge=0)
    warmup_ratio: float = opt(0.0, "actor lr warm-up, fraction of all optimiser steps", ge=0, le=1)
    critic_warmup_ratio: float = opt(0.05, "critic lr warm-up fraction", ge=0, le=1)
    grad_clip: float = opt(1.0, "gradient-norm clip", gt=0)
    clip_low: float = opt(0.2, "ratio clip below 1", gt=0, le=1)
    clip_high: float = opt(0.2, "ratio clip above 1", gt=0)
    dual_clip: float | None = opt(3.0, "dual-clip c for negative advantages (null: off)", gt=1)
    value_clip: float | None = opt(0.5, "value clip (null: off)", gt=0)
    value_coef: float = opt(1.0, "weight of the value loss", ge=0, le=1000)
    gamma: float = opt(1.0, "discount", ge=0, le=1)
    lam: float = opt(1.0, "GAE lambda", ge=0, le=1)
    advantage: str = opt("gae", "gae (critic) | grpo (reward minus the group mean)", choices=ADVANTAGES)
    whiten_advantages: bool = opt(True, "normalise advantages over the batch")
    agg: str = opt("token-mean", "loss aggregation", choices=AGG_MODES)
    kl_coef: float = opt(0.0, "KL to the initial policy (off in the paper)", ge=0, le=1000)
    kl_kind: str = opt("k3", "KL estimator", choices=KL_KINDS)
    kl_in_reward: bool = opt(False, "fold the KL into the per-token reward instead of the loss")
    temperature: float = opt(1.0, "rollout temperature", gt=0)
    top_p: float = opt(1.0, "rollout nucleus", gt=0, le=1)
    top_k: int = opt(0, "rollout top-k sampling (0: off; not TRE's K)", ge=0)
    max_new_tokens: int = opt(64, "response budget", ge=1)
    mixed_precision: str = opt("no", "autocast", choices=("no", "bf16", "fp16"))
    lean_head: bool = opt(True, "per-token log-probs / entropies / tail metrics from the hidden states in chunks "
                          "(tre_edu.head), never the (N, V) logits; false: materialise the logits")  # fmt: skip
    rollout_batch_size: int = opt(0, "responses sampled at once (0: all); bounds the KV cache", ge=0)
    rollout_backend: str = opt("hf", "hf | vllm (pip install tre_edu[vllm])", choices=("hf", "vllm"))
    vllm_gpu_memory_utilization: float = opt(0.4, "vLLM's share of GPU memory", gt=0, le=1)

    def _rules(self):
        batch = self.prompts_per_step * self.samples_per_prompt
        yield batch % self.minibatch_size == 0, "minibatch_size", f"a divisor of prompts_per_step x samples = {batch}"
        mini = self.minibatch_size
        yield mini % self.micro_batch_size == 0, "micro_batch_size", f"a divisor of ppo.minibatch_size = {mini}"
        yield self.advantage != "grpo" or self.samples_per_prompt >= 2, "samples_per_prompt", ">= 2 with grpo"


@dataclass
class RegularizerConfig(_Section):
    """The exploration term (or baseline), computed by ``tre_edu.regularizers.Regularizer``. ``selection``: forking /
    KL-Cov / Clip-Cov pick tokens per micro-batch (the paper's code) or over the mini-batch (a no-grad pre-pass)."""

    section: ClassVar[str] = "regularizer"
    kind: str = opt("none", "method", flag="--kind", choices=KINDS)
    coef: float = opt(0.0, "weight alpha of the entropy-type term, paper units (TRE: 0.001)", flag="--coef", ge=0,
                      le=1000)  # fmt: skip
    k: int = opt(2, "TRE-K trust-region size K (1: min-entropy, unscaled)", flag="--k", ge=1)
    p: float = opt(0.99, "TRE-P nucleus mass p", flag="--p", gt=0, le=1)
    rescale: bool = opt(True, "multiply H_TR by log V / log |A_TR| (official code: on)")
    max_candidates: int | None = opt(256, "TRE-P searches the top this many tokens (null: all)", ge=1)
    forking_ratio: float = opt(0.2, "forking: fraction of tokens that keep their policy gradient", gt=0, le=1)
    selection: str = opt("microbatch", "forking / KL-Cov / Clip-Cov rank the tokens of a", choices=SELECTIONS)
    cov_ratio: float = opt(0.002, "KL-Cov: fraction of tokens penalised (0.002: TRE runs)", gt=0, le=1)
    kl_cov_coef: float = opt(1.0, "KL-Cov: penalty weight", ge=0, le=1000)
    clip_cov_ratio: float = opt(0.0002, "Clip-Cov: fraction of tokens detached", gt=0, le=1)
    clip_cov_lb: float = opt(1.0, "Clip-Cov: lower end of the Cov band")
    clip_cov_ub: float = opt(5.0, "Clip-Cov: upper end of the Cov band")
    seed: int | None = opt(None, "Clip-Cov draw seed (null: torch's global RNG)", ge=0)

    def _rules(self):
        yield self.clip_cov_lb <= self.clip_cov_ub, "clip_cov_lb", f"<= clip_cov_ub ({self.clip_cov_ub})"


@dataclass
class EvalConfig(_Section):
    """Held-out evaluation: greedy accuracy, the paper's validation (one sample, T 1.0, top_p 0.7), pass@k, tails."""

    section: ClassVar[str] = "eval"
    every: int = opt(25, "PPO steps between evaluations (0: only at the start and the end)", ge=0)
    at_start: bool = opt(True, "evaluate before the first PPO step (a study evaluates its shared warm start once)")
    greedy: bool = opt(True, "greedy accuracy")
    sampled: bool = opt(True, "accuracy of one sampled answer at eval.temperature / eval.top_p")
    temperature: float = opt(1.0, "sampled evaluation temperature", gt=0)
    top_p: float = opt(0.7, "sampled evaluation nucleus", gt=0, le=1)
    batch_size: int = opt(128, "prompts per generation batch", ge=1)
    pass_k: int = opt(0, "pass@k: n samples per prompt at eval.temperature, top_p 1.0 (0: off)", ge=0)
    tail_metrics: bool = opt(True, "tail response fraction, mass outside the top 10 / the nucleus, entropies")


@dataclass
class TrainConfig(_Section):
    """One run: the sections above and a few run-level settings."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = opt(0, "seed of everything", flag="--seed", ge=0)
    output_dir: str = opt("runs/default", "the run directory (a path)", flag="--output-dir", pattern=r"(?s).+")
    init_from: str | None = opt(None, "a checkpoint / warm-start directory to start PPO from", flag="--init-from")
    checkpoint_every: int = opt(0, "PPO steps between checkpoints (0: only at the end)", ge=0)
    tensorboard: bool = opt(False, "also log to TensorBoard")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", flag="--device", pattern=r"auto|cpu|cuda(:\d+)?")
    threads: int = opt(0, "torch CPU threads (0: torch's default)", ge=0)
    notes: str = opt("", "free text kept with the run")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return _build(cls, data or {}, "")

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_yaml())

    def replace(self, overrides: list[str] | dict | None) -> TrainConfig:
        """A copy with dotted overrides: ``{"ppo.steps": 10}`` (typed values) or ``["ppo.steps=10"]``."""
        return _with_overrides(self.to_dict(), _pairs(overrides))


@dataclass
class RewardModelConfig(_Section):
    """``tre-edu train-rm``: a scalar reward model on preference pairs (the paper: TRL's RewardTrainer, 3 epochs,
    lr 1e-5, warm-up 0.1, center_rewards_coefficient 0.01)."""

    section: ClassVar[str] = "reward_model"
    source: str = opt("ultrafeedback", "preference data: ultrafeedback (the paper's code) or hh-rlhf")
    model: str = opt("tiny", "a hub id or local path of the base model (tiny: a CPU toy)", pattern=r".+")
    output_dir: str | None = opt(None, "where to save the model (null: not saved)")
    n_train: int | None = opt(None, "training pairs (null: the whole split)", ge=1)
    n_test: int | None = opt(None, "test pairs (null: the whole split)", ge=1)
    epochs: int = opt(3, "passes over the pairs", ge=1)
    lr: float = opt(1e-5, "learning rate", gt=0)
    warmup_ratio: float = opt(0.1, "lr warm-up fraction", ge=0, lt=1)
    center_rewards_coefficient: float | None = opt(0.01, "weight of the mean-reward-squared penalty", ge=0)
    batch_size: int = opt(8, "pairs per optimiser step", ge=1)
    max_length: int = opt(1024, "tokens per sequence (longer ones keep their last tokens)", ge=1)
    seed: int = opt(0, "seed", ge=0)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type = TrainConfig, prefix: str = ""):
    """(dotted key, annotation, dataclasses.Field) of every setting, sections flattened: ``("ppo.steps", int, f)``."""
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp, f


def field_type(key: str) -> Any:
    """The annotation of the setting ``key`` (``Any`` inside the free-form ``task.options``)."""
    cls, parts = TrainConfig, key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in fields(cls)}
        if part not in names:
            where = " in " + ".".join(parts[:i]) if i else ""
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}; allowed{where}: {', '.join(names)}")
        cls = _hints(cls)[part]
        if cls is dict and i < len(parts) - 1:
            return Any
        if not dataclasses.is_dataclass(cls):
            if i < len(parts) - 1:
                raise ConfigError(f"config key {key!r}: {'.'.join(parts[: i + 1])} is a setting, not a section")
            return cls
    raise ConfigError(f"config key {key!r} names a section, not a setting")


def parse_value(tp: Any, raw: str, name: str = "value") -> Any:
    """Command-line text as a value of type ``tp``: a string stays the exact text; int, float and bool (true / false,
    yes / no, on / off, 1 / 0) are converted; null / none give None where allowed; mappings and task options: YAML."""
    base, optional = _unwrap(tp)
    text = raw.strip().lower()
    if optional and text in ("null", "none", "~", ""):
        return None
    reason = ""
    try:
        if base is str or (base is bool and text in ("true", "yes", "on", "1", "false", "no", "off", "0")):
            return raw if base is str else text in ("true", "yes", "on", "1")
        if base in (int, float):
            return base(text)
        if base is dict or base is Any:
            return yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as err:
        reason = f" ({getattr(err, 'problem', err)})" if isinstance(err, yaml.YAMLError) else ""
    raise ConfigError(f"{name} must be {allowed(tp, {})}; got {raw!r}{reason}")


def _pairs(overrides: list[str] | dict | None) -> list[tuple[str, Any]]:
    """Overrides as (key, typed value): a dict or (key, value) pairs are taken as is; "key=value" strings are
    converted by the field's type."""
    if isinstance(overrides, dict):
        return list(overrides.items())
    out = []
    for item in overrides or []:
        if isinstance(item, str):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"an override must look like section.field=value (e.g. ppo.steps=50); got {item!r}")
            item = (key.strip(), parse_value(field_type(key.strip()), raw, key.strip()))
        out.append(tuple(item))
    return out


def _with_overrides(data: dict, pairs: list[tuple[str, Any]]) -> TrainConfig:
    """The config of ``data`` with each dotted (key, value) of ``pairs`` set."""
    for key, value in pairs:
        field_type(key)  # raises for an unknown key
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return TrainConfig.from_dict(data)


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'a config'} must be a mapping; got {data!r}")
    names, hints = [f.name for f in fields(cls)], _hints(cls)
    if unknown := sorted(set(data) - set(names)):
        keys, where = ", ".join(prefix + k for k in unknown), prefix.rstrip(".") or "a config"
        raise ConfigError(f"unknown config key(s) {keys}; allowed in {where}: {', '.join(names)}")
    sub = {k: _build(hints[k], v or {}, f"{prefix}{k}.") for k, v in data.items() if dataclasses.is_dataclass(hints[k])}
    return cls(**{**data, **sub})


def _merge(base: dict, child: dict) -> dict:
    """Child over base, section by section; ``options`` mappings merge one level (their values are replaced)."""
    out = dict(base)
    for k, v in child.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = ({**out[k], **v} if k == "options" else _merge(out[k], v)) if deep else v
    return out


def load_yaml_dict(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following ``base:`` chains (relative to each file). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _chain:
        raise ConfigError("base: cycle " + " -> ".join(str(p) for p in (*_chain, path.resolve())))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark, ctx = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        what = getattr(err, "problem", None) or " ".join(str(err).split())
        what += f" ({err.context} at line {ctx.line + 1})" if ctx and getattr(err, "context", None) else ""
        raise ConfigError(f"{path}{f', line {mark.line + 1}' if mark else ''}: malformed YAML: {what}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    if (base := data.pop("base", None)) is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name; got {base!r}")
    if base is not None:
        data = _merge(load_yaml_dict(path.parent / base, (*_chain, path.resolve())), data)
    for task, block in (data.get("by_task") or {}).items():
        if task not in TASK_NAMES or not isinstance(block, dict):
            raise ConfigError(f"{path}: by_task must map task names ({', '.join(TASK_NAMES)}) to mappings")
    return data


def load_config(
    path: str | Path | list[str | Path] | None = None, overrides: list[str] | dict | None = None
) -> TrainConfig:
    """Load one YAML file, a list merged left to right (task, method, model), or None (the defaults), and apply
    dotted overrides: ``{"ppo.steps": 3}`` (typed values, used unchanged) or ``["ppo.steps=3"]`` (converted)."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    files, pairs = [load_yaml_dict(p) for p in paths], _pairs(overrides)
    task = dict(pairs).get("task.name") or (_merge_files(files, None).get("task") or {}).get("name", "countdown")
    return _with_overrides(_merge_files(files, task), pairs)


def _merge_files(files: list[dict], task: str | None) -> dict:
    """The files merged left to right, each followed by its ``by_task[task]`` block (none when task is None)."""
    data: dict = {}
    for d in files:
        data = _merge(data, {k: v for k, v in d.items() if k != "by_task"})
        data = _merge(data, (d.get("by_task") or {}).get(task, {}))
    return data
