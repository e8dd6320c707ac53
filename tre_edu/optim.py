"""The optimisers of PPO: the actor's and the critic's, each an AdamW with its own learning rate and warm-up (the
paper: actor 1e-6, critic 1e-5 with 5 % warm-up), gradients clipped separately, and a non-finite gradient norm skips
the optimiser step instead of writing NaN into the weights."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup

from tre_edu import distributed


class PPOOptimizers:
    """AdamW + constant-with-warm-up schedule for each non-empty parameter group (``"actor"``, ``"critic"``).

    ``settings``: the ``ppo`` section; ``total_steps``: optimiser steps of the whole run (the warm-up fractions
    refer to it)."""

    def __init__(self, actor: list[nn.Parameter], critic: list[nn.Parameter], settings: Any, total_steps: int):
        s = settings
        self.params = {"actor": actor, "critic": critic}
        self.grad_clip, self.skipped = s.grad_clip, 0
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        for name, lr, warmup in (("actor", s.actor_lr, s.warmup_ratio), ("critic", s.critic_lr, s.critic_warmup_ratio)):
            if self.params[name]:
                opt = torch.optim.AdamW(self.params[name], lr=lr, weight_decay=s.weight_decay)
                self.schedulers[name] = get_constant_schedule_with_warmup(opt, int(warmup * total_steps))
                self.optimizers[name] = opt

    def prepare(self, accelerator: Any, policy: nn.Module) -> nn.Module:
        """:func:`tre_edu.distributed.prepare` the policy with these optimisers; afterwards they and :attr:`params`
        refer to the prepared parameters (FSDP2 replaces them by their shards). Returns the prepared policy."""
        prepared, *opts = distributed.prepare(accelerator, policy, *self.optimizers.values())
        self.optimizers = dict(zip(self.optimizers, opts, strict=True))
        self.params = dict(zip(("actor", "critic"), accelerator.unwrap_model(prepared).parameter_groups(), strict=True))
        return prepared

    @property
    def actor_lr(self) -> float:
        return self.schedulers["actor"].get_last_lr()[0]

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step(self, clip_grad_norm: Callable[[list[nn.Parameter], float], Any], label: str = "") -> dict[str, float]:
        """Clip each group's gradient norm to ``grad_clip`` (``clip_grad_norm``: e.g. the accelerator's, which knows
        about sharded gradients), step every optimiser and schedule, and return ``grad/<group>_norm`` and
        ``train/skipped_updates``; with a non-finite norm nothing is stepped but the schedules (and a warning)."""
        norms: dict[str, float] = {}
        for name, params in self.params.items():
            params = [q for q in params if q.grad is not None]
            if params:
                norms[f"grad/{name}_norm"] = float(clip_grad_norm(params, self.grad_clip))
        finite = all(math.isfinite(v) for v in norms.values())
        if finite:
            for opt in self.optimizers.values():
                opt.step()
        else:
            self.skipped += 1
            warnings.warn(
                f"{label}: non-finite gradient norm ({norms}); this optimiser step is skipped ({self.skipped} so far)",
                RuntimeWarning,
                stacklevel=3,
            )
            norms = {}  # a NaN norm must not poison the step's averaged metrics
        self.zero_grad()
        for sched in self.schedulers.values():
            sched.step()
        return {**norms, "train/skipped_updates": float(not finite)}

    def state_dict(self) -> dict[str, Any]:  # the optimisers' own states go with the weights (sharded under FSDP)
        return {"schedulers": {k: s.state_dict() for k, s in self.schedulers.items()}, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.skipped = state["skipped"]
