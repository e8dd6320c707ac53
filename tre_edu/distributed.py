"""Everything FSDP-specific in one place: the accelerator, whole parameters for sampling, sharded checkpoints.

tre_edu shards with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) through Accelerate
(``fsdp_version: 2`` in ``configs/accelerate/fsdp_8gpu.yaml``). FSDP2 shards each parameter in place as a
``DTensor``: the module tree, its parameter names and the optimiser's parameter groups stay what they were (two
learning rates, actor / critic clipping), and the forward hooks gather a unit's parameters just before it runs.
FSDP1 (``FullyShardedDataParallel``, flat parameters) is not supported: its unwrapped module cannot run a forward
(the trainer's no-grad passes call it), and FSDP2 is what both PyTorch and Accelerate develop.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SHARDS_DIR", "fsdp_version", "full_parameters", "full_state_dict", "load_weights", "make_accelerator"]
__all__ += ["mean_over_processes", "prepare", "save_weights"]

SHARDS_DIR = "shards"  # inside a checkpoint folder: the DCP shards of model + optimisers (FSDP only)
RANK_FILE = "rank_{}.pt"  # inside a checkpoint folder: one rank's own RNG states (several processes)


# ---- set-up ------------------------------------------------------------------------------------------------------
def make_accelerator(mixed_precision: str = "no", cpu: bool = False, **kwargs: Any):
    """``Accelerator(mixed_precision, cpu)`` that also shards on CPU processes when FSDP is asked for: Accelerate
    1.x honours ``ACCELERATE_USE_FSDP`` (set by ``accelerate launch`` with an FSDP config) only on accelerator
    devices and silently runs CPU processes (gloo) as DDP. Here the state is switched to FSDP before anything is
    prepared, so every later step is Accelerate's own FSDP2 code path. An FSDP1 config is refused on any device."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)
    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise ValueError(
                f"FSDP on CPU processes needs fsdp_version: 2 in the accelerate config (got {plugin.fsdp_version}); "
                "tre_edu supports FSDP2 only"
            )
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        for shared in (AcceleratorState._shared_state, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "tre_edu supports FSDP2 only: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp_8gpu.yaml is the tested one)"
        )
    return accelerator


def prepare(accelerator, policy: nn.Module, *optimizers: torch.optim.Optimizer) -> tuple:
    """``accelerator.prepare(policy, *optimizers)``. Under FSDP each decoder layer of the actor (and of a separate
    critic) becomes its own unit: the config's ``TRANSFORMER_BASED_WRAP`` (no class name) finds their classes through
    ``policy._no_split_modules``; the rest (embeddings, LM head, final norm, value head) is the root unit."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and getattr(policy, "_no_split_modules", None) is None:
        names = [
            n for sub in policy.children() for m in sub.modules() for n in getattr(m, "_no_split_modules", None) or []
        ]
        policy._no_split_modules = list(dict.fromkeys(names))  # first occurrences, in order
    out = accelerator.prepare(policy, *optimizers)
    return tuple(out) if isinstance(out, tuple | list) else (out,)  # FSDP2's prepare returns a list


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes (every process must pass the same keys); one process: unchanged."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="mean")
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def fsdp_version(model: nn.Module) -> int:
    """2 when ``model`` is sharded by FSDP2 (``fully_shard``), 1 for FSDP1 (``FullyShardedDataParallel``), else 0."""
    if not torch.distributed.is_available():
        return 0
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return 2 if isinstance(model, FSDPModule) else 1 if isinstance(model, FullyShardedDataParallel) else 0


# ---- whole parameters --------------------------------------------------------------------------------------------
@contextmanager
def full_parameters(model: nn.Module, submodule: str = "") -> Iterator[None]:
    """Inside: every parameter of ``model`` (or of its child ``submodule``, e.g. ``"actor"``: a separate critic's
    layers stay sharded) is whole, so the KV-cached sampler can call the actor token by token. All ranks must enter
    together. The units are gathered once on entry (no re-gather per token and layer) and resharded on exit, with
    their ``reshard_after_forward`` settings restored. Read-only: changes made inside are not written back, and a
    ``state_dict()`` taken inside is still sharded (use :func:`full_state_dict`)."""
    version = fsdp_version(model)
    if version == 1:
        raise ValueError("tre_edu supports FSDP2 only (fsdp_version: 2 in the accelerate config)")
    if version == 0 or getattr(model, "_tre_edu_gathered", False):  # nested: the outer context keeps them whole
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    scope = model.get_submodule(submodule) if submodule else model
    modules = [model] + [m for m in scope.modules() if isinstance(m, FSDPModule) and m is not model]
    # The root must be initialised first: FSDP2 treats the first unit that runs a forward as the root, and the
    # sampler calls the actor, not the root (e.g. evaluation before the first training step).
    model._get_fsdp_state()._lazy_init()
    saved = []
    for m in modules:
        groups = m._get_fsdp_state()._fsdp_param_groups
        saved.append((m, m._get_fsdp_state()._auto_reshard_after_forward, [g.post_forward_mesh_info for g in groups]))
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    model._tre_edu_gathered = True
    try:
        with torch.no_grad():
            yield
    finally:
        model._tre_edu_gathered = False
        for m, auto, infos in saved:
            state = m._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info
            m.reshard()


def full_state_dict(model: nn.Module, submodule: str = "") -> dict[str, torch.Tensor] | None:
    """FSDP2: the whole weights of ``model`` (or of its child ``submodule``, e.g. ``"actor"``, with that prefix
    removed from the names) gathered on CPU on rank 0 (other ranks get ``{}``); every rank must call it. Without
    FSDP: None (the module's own ``state_dict`` is whole). For ``save_pretrained(path, state_dict=...)``."""
    if fsdp_version(model) != 2:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = submodule + "."
    return {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)} if submodule else full


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.shards.tmp")


def _inner(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps the torch optimiser


def _dcp_state(policy: nn.Module, optimizers: dict[str, Any]) -> dict[str, Any]:
    """The sharded state dicts of the model and the optimisers, in the layout of the ``shards/`` folder."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(policy)}
    for name, opt in optimizers.items():
        state[f"optim.{name}"] = get_optimizer_state_dict(policy, _inner(opt))
    return state


def save_weights(
    accelerator, path: str | Path, policy: nn.Module, optimizers: dict[str, Any], rank_state: dict[str, Any]
) -> dict[str, Any]:
    """The weights part of a checkpoint about to be written to folder ``path`` (call on every rank): what goes into
    ``trainer_state.pt``, the state dicts without FSDP, a note under FSDP (every rank stages its shards beside
    ``path``). With several processes every rank also stages its ``rank_state`` (RNG states: the ranks draw different
    numbers). :func:`finish_save` moves the staged files into ``path`` after :func:`tre_edu.checkpoint.save`."""
    path = Path(path)
    sharded = fsdp_version(policy) == 2
    if not sharded:
        whole = {"policy": accelerator.unwrap_model(policy).state_dict()}
        whole["optimizers"] = {k: o.state_dict() for k, o in optimizers.items()}
        if accelerator.num_processes == 1:
            return whole
    staging = _staging(path)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rank_state, staging / RANK_FILE.format(accelerator.process_index))
    if not sharded:
        return {**whole, "per_rank": True}
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(policy, optimizers), checkpoint_id=str(staging / SHARDS_DIR))
    return {"sharded": SHARDS_DIR, "per_rank": True, "world_size": accelerator.num_processes}


def finish_save(accelerator, path: str | Path) -> None:
    """After rank 0 wrote the checkpoint folder ``path``: move the per-rank files and shards into it. Call on every
    rank. :func:`load_weights` calls it too: a run killed between the two steps (the staged files were complete
    before rank 0 wrote the folder) is completed on load; files the folder already has are kept."""
    path = Path(path)
    accelerator.wait_for_everyone()
    staging = _staging(path)
    if accelerator.is_main_process and staging.is_dir() and path.is_dir():
        for item in staging.iterdir():
            if not (path / item.name).exists():
                os.replace(item, path / item.name)
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()


def load_weights(
    accelerator, path: str | Path, state: dict[str, Any], policy: nn.Module, optimizers: dict[str, Any]
) -> dict[str, Any]:
    """Restore the model and optimisers from the checkpoint folder ``path`` (its ``trainer_state.pt`` already
    loaded as ``state``). Call on every rank. Returns this rank's own saved states (``rank_state`` of
    :func:`save_weights`; ``{}`` when the checkpoint has none)."""
    path = Path(path)
    sharded = fsdp_version(policy) == 2
    if state.get("per_rank"):
        finish_save(accelerator, path)
    if state.get("sharded"):
        if not sharded:
            raise ValueError(
                f"checkpoint {path} holds FSDP shards; resume it under FSDP (accelerate launch with an FSDP config)"
            )
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        shards = path / state["sharded"]
        if not (shards / ".metadata").is_file():
            raise ValueError(f"checkpoint {path} is incomplete: its FSDP shards ({shards}) are missing")
        target = _dcp_state(policy, optimizers)
        dcp.load(target, checkpoint_id=str(shards))
        set_model_state_dict(policy, target["model"])
        for name, opt in optimizers.items():
            set_optimizer_state_dict(policy, _inner(opt), target[f"optim.{name}"])
    else:
        if sharded:
            raise ValueError(f"checkpoint {path} was saved without FSDP; resume it without FSDP")
        accelerator.unwrap_model(policy).load_state_dict(state["policy"])
        for k, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
    if not state.get("per_rank"):
        return {}
    file = path / RANK_FILE.format(accelerator.process_index)
    if not file.is_file():
        warnings.warn(
            f"checkpoint {path} has no {file.name} (saved by fewer processes than this run's "
            f"{accelerator.num_processes}): this rank continues from rank 0's RNG states",
            stacklevel=2,
        )
        return {}
    return torch.load(file, map_location="cpu", weights_only=True)
