"""Checks before work starts: what a config, its task and its model's shape can tell, refused in the words of the
setting the user typed (one ``ConfigError``: ``tre-edu: error: ...``, exit 2) before a warm start or a PPO step has
spent any time: the device exists, the vocabulary holds ``regularizer.k`` tokens, the model's positions hold prompt
plus response, ``--resume`` keeps the run's settings, a model folder is complete. Numeric bounds of single settings
are declared with the setting in :mod:`tre_edu.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tre_edu import checkpoint
from tre_edu.config import ConfigError, TrainConfig

# Settings that may differ when a run is resumed: how long it runs, where and how it logs, what hardware runs it.
RESUMABLE_CHANGES = ("output_dir", "ppo.steps", "checkpoint_every", "tensorboard", "threads", "device", "notes")
RESUMABLE_CHANGES += ("eval.every", "eval.at_start", "eval.batch_size")
# Settings that shape the weights a checkpoint holds: no resume can change them.
SHAPE = tuple(f"model.{k}" for k in ("name", "tail_tokens", "n_embd", "n_layer", "n_head", "n_positions", "critic"))
SHAPE += ("ppo.advantage",)  # grpo has no value head
ALLOW_FLAG = "--allow-config-change"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")


def check_device(device: str) -> None:
    """``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) exists on this machine."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device}: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            "use --device cpu or --device auto"
        )
    n = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= n:
        raise ConfigError(f"device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")


def _positions(model_config: Any, tiny: bool = False) -> int | None:
    """The positions a Hugging Face model cannot go beyond: a learned position table (GPT-2's ``n_positions``; an
    index past it is an IndexError). A rotary model (``rope_*``) only degrades past ``max_position_embeddings``: None
    (not refused), except for the ``tiny`` model, whose ``model.n_positions`` is the user's own setting."""
    rotary = any(getattr(model_config, a, None) is not None for a in ("rope_theta", "rope_parameters", "rope_scaling"))
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0 and (tiny or not rotary):
            return value
    return None


def _lengths(tokenizer: Any, texts: list[str]) -> int:
    return max((len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]), default=0)


def check_model(
    cfg: TrainConfig,
    task: Any,
    tokenizer: Any,
    positions: int | None,
    *,
    examples: list[dict] | None = None,
    sft_examples: list[dict] | None = None,
    model_name: str | None = None,
) -> None:
    """ConfigError when ``regularizer.k`` exceeds the vocabulary of ``tokenizer`` (TRE-K) or the model's
    ``positions`` cannot hold the longest prompt of ``examples`` plus ``ppo.max_new_tokens``, or the longest prompt
    plus reference response of ``sft_examples`` (the warm start's). ``model_name``: how to name a model whose
    positions are not a setting (None: the tiny model, ``model.n_positions``)."""
    V, r = len(tokenizer), cfg.regularizer
    if r.kind == "tre-k" and r.k > V:
        raise ConfigError(
            f"regularizer.k (--k) must be <= the vocabulary size of the model, V = {V:,}; got {r.k:,} (TRE-K keeps "
            "the k most likely tokens)"
        )
    if positions is None:
        return
    where = "model.n_positions" if model_name is None else f"the position table of {model_name}"
    fix = "raise model.n_positions (--model.n_positions)" if model_name is None else "use a model with more positions"
    style, R = cfg.task.style, cfg.ppo.max_new_tokens
    if examples:
        P = _lengths(tokenizer, [task.prompt(e, tokenizer, style) for e in examples])
        if P >= positions:
            raise ConfigError(
                f"{where} = {positions:,} positions cannot hold the longest prompt ({P} tokens) and a response; "
                f"{fix} to >= {P + R:,} (prompt + ppo.max_new_tokens = {R:,})"
            )
        if P + R > positions:
            raise ConfigError(
                f"ppo.max_new_tokens = {R:,} does not fit {where} = {positions:,} positions: the longest prompt has "
                f"{P} tokens, so prompt + response need up to {P + R:,}; lower ppo.max_new_tokens (--ppo.max_new_tokens"
                f" <= {max(positions - P, 0)}) or {fix}"
            )
    if sft_examples and hasattr(task, "reference_response"):  # encoded as the warm start does (sft.py)
        prompts = tokenizer([task.prompt(e, tokenizer, style) for e in sft_examples], add_special_tokens=False)
        answers = tokenizer([task.reference_response(e, None) for e in sft_examples], add_special_tokens=False)
        L = max(len(p) + len(a) for p, a in zip(prompts["input_ids"], answers["input_ids"])) + 1  # + EOS
        if L > positions:
            raise ConfigError(
                f"{where} = {positions:,} positions is too small for the warm start: its longest prompt + reference "
                f"response has {L} tokens; {fix} to >= {L}"
            )


def _model_facts(cfg: TrainConfig) -> tuple[Any, int | None, str | None] | None:
    """(tokenizer, positions, name) of the model a run builds, without building it; None when that needs the
    network or the weights (then :func:`check_model` runs on the built model)."""
    m = cfg.model
    source = cfg.init_from or (None if m.name == "tiny" else m.name)
    if source is None:
        from tre_edu.models import tiny

        return tiny.build_tokenizer(tail_tokens=m.tail_tokens), m.n_positions, None
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError):
        return None  # the loader names the problem when it builds the model
    tiny = m.name == "tiny" and _positions(config, tiny=True) == m.n_positions  # a saved tiny model (warm start)
    return tokenizer, _positions(config, tiny), None if tiny else source


def check_run(cfg: TrainConfig, task: Any, *, warm_start: bool) -> bool:
    """Everything knowable before a run starts (:func:`check_device`, :func:`check_model` on the train and eval
    examples, and on the warm start's when ``warm_start``). Returns False when the model is only known once loaded
    (a hub id): then :func:`check_built` checks it before the first step."""
    check_device(cfg.device)
    facts = _model_facts(cfg)
    if facts is None:
        return False
    tokenizer, positions, name = facts
    train, n_sft = task.load("train", n=cfg.task.train_size, seed=cfg.seed), cfg.sft.examples
    examples = train + task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    sft = None
    if warm_start:  # the warm start's examples; when they are the same rows as PPO's, loaded once
        same = n_sft == cfg.task.train_size or (cfg.task.train_size is None and n_sft >= len(train))
        sft = train if same else task.load("train", n=n_sft, seed=cfg.seed)
    check_model(cfg, task, tokenizer, positions, examples=examples, sft_examples=sft, model_name=name)
    return True


def check_built(
    cfg: TrainConfig, task: Any, tokenizer: Any, model: Any, examples: list[dict], source: str | None = None
) -> None:
    """:func:`check_model` on a loaded model and its tokenizer (``examples``: the prompts it will be given;
    ``source``: where the model came from, when not ``cfg``'s model, e.g. ``tre-edu eval --model-dir``)."""
    config = getattr(model, "config", None)
    tiny = source is None and cfg.model.name == "tiny" and _positions(config, tiny=True) == cfg.model.n_positions
    positions, name = _positions(config, tiny), None if tiny else str(source or cfg.init_from or cfg.model.name)
    check_model(cfg, task, tokenizer, positions, examples=examples, model_name=name)


# ---- resuming ------------------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):  # task.options: one entry per option, not flattened further
            out.update(_flat(v, key + ".") if k != "options" else {f"{key}.{o}": x for o, x in v.items()})
        else:
            out[key] = v
    return out


def recorded_config(output_dir: str | Path) -> tuple[dict, Path] | None:
    """(config as a dict, the file) a run in ``output_dir`` was trained with: its newest complete checkpoint's
    ``config.yaml``, else the run's ``config.yaml``; None when there is neither."""
    out = Path(output_dir)
    candidates = [c / checkpoint.CONFIG_FILE for c in checkpoint.complete_checkpoints(out)[:1]]
    for f in [*candidates, out / checkpoint.CONFIG_FILE]:
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text())
            except yaml.YAMLError as err:
                raise ConfigError(f"{f}: not readable as YAML ({err}); cannot compare the settings to resume") from err
            if isinstance(data, dict):
                return data, f
    return None


def config_changes(old: dict, new: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(setting, old value, new value) of every training setting that differs (not :data:`RESUMABLE_CHANGES`). A
    setting the old record lacks (added to the library since) counts as its default; one the library no longer has
    is not compared."""
    defaults, b = _flat(TrainConfig().to_dict()), _flat(new.to_dict())
    a = {k: old_value for k, old_value in _flat(old).items() if k in b or k.startswith("task.options.")}
    a = {**{k: v for k, v in defaults.items() if not k.startswith("task.options.")}, **a}
    keys = [*b, *(k for k in a if k not in b)]
    return [(k, a.get(k), b.get(k)) for k in keys if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]


def check_resume(cfg: TrainConfig, output_dir: str | Path, allow_config_change: bool = False) -> list[str]:
    """Before ``--resume``: ConfigError when the run in ``output_dir`` was trained with other settings than ``cfg``
    (naming each), unless ``allow_config_change``; settings in :data:`SHAPE` can never change. Returns the changes
    as ``"setting: old -> new"`` (empty: same settings, or nothing recorded)."""
    found = recorded_config(output_dir)
    if found is None:
        return []
    old, file = found
    changes = config_changes(old, cfg)
    text = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes]
    fixed = [t for (k, _, _), t in zip(changes, text) if k in SHAPE]
    if fixed:
        raise ConfigError(
            f"--resume: the checkpoints in {output_dir} hold a model of another shape ({'; '.join(fixed)}; recorded "
            f"in {file}); resume with that model, or choose another --output-dir"
        )
    if changes and not allow_config_change:
        raise ConfigError(
            f"--resume: the run in {output_dir} was trained with other settings ({'; '.join(text)}; recorded in "
            f"{file}). Resume with the same settings, pass {ALLOW_FLAG} to continue it with the new ones (the old "
            f"config.yaml is kept in {checkpoint.CONFIG_HISTORY}), or choose another --output-dir"
        )
    return text


# ---- model folders -------------------------------------------------------------------------------------------
def check_model_dir(folder: str | Path, flag: str = "--model-dir") -> None:
    """ConfigError unless ``folder`` is a directory with a model config, weights and tokenizer files (what
    ``save_pretrained`` of the model and of its tokenizer write, e.g. ``<output_dir>/final`` of ``tre-edu train``)."""
    folder = Path(folder)
    hint = "(a folder written by save_pretrained, e.g. <output_dir>/final or <output_dir>/warm_start of tre-edu train)"
    if not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: not found {hint}")
    has = {
        "the model config (config.json)": (folder / "config.json").is_file(),
        "weights (*.safetensors / pytorch_model.bin)": any(any(folder.glob(g)) for g in WEIGHT_GLOBS),
        f"tokenizer files ({' / '.join(TOKENIZER_FILES[:2])})": any((folder / f).is_file() for f in TOKENIZER_FILES),
    }
    if missing := [what for what, ok in has.items() if not ok]:
        raise ConfigError(f"{flag} {folder} has no {' and no '.join(missing)} {hint}")
