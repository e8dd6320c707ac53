"""PPOTrainer: prompts -> rollout -> reward -> values -> GAE -> PPO epochs -> metrics.

One PPO step, top to bottom (every piece lives in its own module; this file only composes them)::

    examples  = next prompts_per_step examples of the task              (data order seeded, resumable)
    rollout   = sample(actor, prompts x samples_per_prompt)              (KV cache, temperature T, stop at EOS)
    R         = task.reward(responses)                                   (scalar, put on the last response token)
    logp_old, V_old = policy(rollout) at temperature T, no grad          (the update's own forward and precision)
    A, G      = ppo.compute_gae(r, V_old, mask, gamma, lambda)           (then whitened over the batch)
    for each PPO epoch, each mini-batch (gradient accumulation over micro-batches):
        logits, logp, V = policy(micro-batch) at temperature T
        reg       = regularizer(logits, logp, logp_old, A, mask)         (none | entropy | TRE | forking | KL-Cov)
        L         = policy_loss(logp, logp_old, A, mask * reg.pg_mask)   (clip + dual clip)
                    + reg.loss + value_coef * value_loss(V, V_old, G)
        step (grad clip for actor and critic separately; a non-finite gradient skips the step)
    metrics   = rewards, PPO set (approx_kl, clipfrac, explained variance, ...) and the tail set
                (global / TRE entropy, top-1 probability, mass outside top-2 / top-10, nucleus size, ...)

The old log-probs are recomputed with the training forward (as the paper's code), so with one mini-batch and one
epoch the ratio is exactly 1 in every precision; the sampler's own log-probs are kept only as a diagnostic.

Multi-GPU: the trainer runs under Accelerate (``accelerate launch``); each process samples its share of the prompts,
DDP / FSDP average the gradients, and metrics are averaged over processes.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup

from tre_edu import checkpoint
from tre_edu.config import TrainConfig
from tre_edu.entropy import global_entropy, tail_metrics
from tre_edu.evaluation import evaluate
from tre_edu.policy import response_logprobs
from tre_edu.ppo import (
    add_kl_to_rewards,
    aggregate,
    compute_gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    terminal_rewards,
    value_loss,
)
from tre_edu.regularizers import Regularizer
from tre_edu.rollout import Rollout, SamplingConfig, concat_rollouts, decode_responses, eos_token_ids, generate

try:  # FSDP shards parameters; sampling needs them whole
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
except ImportError:  # pragma: no cover - torch built without distributed
    FSDP = None


class Callback:
    """Hooks for progress displays, live plots and loggers. Override what you need."""

    def on_train_begin(self, trainer: PPOTrainer) -> None: ...

    def on_step_end(self, trainer: PPOTrainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_evaluate(self, trainer: PPOTrainer, step: int, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: PPOTrainer, history: list[dict[str, float]]) -> None: ...


class JSONLLogger(Callback):
    """Appends one JSON object per PPO step (and per evaluation) to ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_step_end(self, trainer, step, metrics):
        self._write({"step": step, **metrics})

    def on_evaluate(self, trainer, step, metrics):
        self._write({"step": step, "kind": "eval", **metrics})


class TensorBoardLogger(Callback):
    """Scalars to TensorBoard (needs the ``tensorboard`` package: ``pip install tre_edu[tensorboard]``)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on an optional package
            raise ImportError("tensorboard logging needs `pip install tensorboard`") from err
        self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def on_evaluate(self, trainer, step, metrics):
        self.on_step_end(trainer, step, metrics)

    def on_train_end(self, trainer, history):
        self.writer.close()


class PromptStream:
    """An endless, seeded, resumable stream of training examples (a new permutation every pass)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("the training set is empty: task.train_size must be >= 1 and the task must load data")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            take = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos : self.pos + take]
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()


def encode_prompts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, exactly as the warm start encodes them (no special tokens added: a prompt that
    needs a BOS carries it in its text or chat template)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@dataclass
class RolloutBatch:
    """One PPO step's data, ``(B, R)`` tensors on the CPU (``B`` responses, ``R`` response columns).

    mask: float, 1 on valid response tokens. old_logprobs / old_values: the training forward's, no grad.
    advantages: GAE (or group-mean) advantages, whitened when ``ppo.whiten_advantages``; returns: the critic's
    targets. ref_logprobs: the reference policy's (only with ``ppo.kl_coef > 0``).
    """

    input_ids: Tensor
    attention_mask: Tensor
    mask: Tensor
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    ref_logprobs: Tensor | None
    responses: list[str]
    scores: Tensor
    metrics: dict[str, float]

    @property
    def response_len(self) -> int:
        return self.mask.shape[1]


class PPOTrainer:
    """PPO for a causal LM with a chosen exploration regulariser.

    Args:
        config: the run's :class:`~tre_edu.config.TrainConfig` (the ``ppo``, ``eval`` and run-level settings).
        policy, tokenizer: an :class:`~tre_edu.policy.ActorCritic` and its tokenizer.
        task: a :class:`~tre_edu.tasks.Task`; train_examples, eval_examples: its data.
        regularizer: the :class:`~tre_edu.regularizers.Regularizer` (default: built from ``config.regularizer``).
        sampler: an object with ``sync_weights(actor)`` and ``generate(prompt_ids, SamplingConfig) -> Rollout``
            (the vLLM engine); None samples with :func:`tre_edu.rollout.generate`.
        callbacks: :class:`Callback` objects (live plots, loggers). A JSONL log goes to ``output_dir/metrics.jsonl``.
        progress: show a tqdm progress bar.

    :func:`tre_edu.pipeline.build_components` builds all of these from a config.
    """

    def __init__(
        self,
        config: TrainConfig,
        policy: Any,
        tokenizer: Any,
        task: Any,
        train_examples: list[dict],
        eval_examples: list[dict],
        regularizer: Regularizer | None = None,
        *,
        sampler: Any = None,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        accelerator: Accelerator | None = None,
        log_jsonl: bool = True,
    ):
        self.config = cfg = config
        p = cfg.ppo
        if accelerator is None:
            accelerator = Accelerator(mixed_precision=p.mixed_precision, cpu=cfg.device == "cpu")
        self.accelerator = accelerator
        self.device = accelerator.device
        if cfg.device.startswith("cuda:") and accelerator.num_processes == 1:
            self.device = torch.device(cfg.device)
        n_proc = accelerator.num_processes
        if n_proc > 1 and (p.prompts_per_step % n_proc or p.minibatch_size % n_proc):
            raise ValueError(
                f"ppo.prompts_per_step ({p.prompts_per_step}) and ppo.minibatch_size ({p.minibatch_size}) must be "
                f"divisible by the number of processes ({n_proc})"
            )

        self.task, self.tokenizer = task, tokenizer
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.stream = PromptStream(len(train_examples), cfg.seed)
        self.regularizer = regularizer or Regularizer(cfg.regularizer, clip_low=p.clip_low, clip_high=p.clip_high)
        self.sampler = sampler
        self.eos_token_ids = eos_token_ids(tokenizer, policy.actor)

        policy = policy.to(self.device)
        self.ref_actor = copy.deepcopy(policy.actor).eval().requires_grad_(False) if p.kl_coef > 0 else None
        self._actor_params, self._critic_params = policy.parameter_groups()
        opt_steps = self.optimizer_steps_per_ppo_step() * p.steps
        self.optimizers, self.schedulers = {}, {}
        for name, params, lr, warmup in (
            ("actor", self._actor_params, p.actor_lr, p.warmup_ratio),
            ("critic", self._critic_params, p.critic_lr, p.critic_warmup_ratio),
        ):
            if params:
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=p.weight_decay)
                self.schedulers[name] = get_constant_schedule_with_warmup(opt, int(warmup * opt_steps))
                self.optimizers[name] = opt
        self.policy, *opts = accelerator.prepare(policy, *self.optimizers.values())
        self.optimizers = dict(zip(self.optimizers, opts))

        self.sampling_generator = torch.Generator().manual_seed(cfg.seed + 12345)
        self._synced_step = -1
        self.step = 0
        self.skipped_updates = 0
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self.last_batch: dict[str, list] = {}
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(cfg.output_dir)
        self.metrics_file = self.output_dir / "metrics.jsonl"
        if accelerator.is_main_process and log_jsonl:
            self.callbacks.append(JSONLLogger(self.metrics_file))
        if accelerator.is_main_process and cfg.tensorboard:
            self.callbacks.append(TensorBoardLogger(self.output_dir / "tensorboard"))
        self.progress = progress and accelerator.is_main_process

    # ---- helpers ------------------------------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    @property
    def actor(self):
        return self.unwrapped.actor

    def optimizer_steps_per_ppo_step(self) -> int:
        return self.config.ppo.ppo_epochs * (self._local_batch() // self._local_minibatch())

    def _local_minibatch(self) -> int:
        """ppo.minibatch_size counts responses over all processes (as verl's ppo_mini_batch_size); each
        process takes its share, DDP / FSDP average the gradients."""
        return max(1, self.config.ppo.minibatch_size // max(1, self.accelerator.num_processes))

    def _local_batch(self) -> int:
        p = self.config.ppo
        return p.prompts_per_step * p.samples_per_prompt // max(1, self.accelerator.num_processes)

    def _sampling(self) -> SamplingConfig:
        p = self.config.ppo
        return SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)

    def _rollout_context(self):
        if FSDP is not None and isinstance(self.policy, FSDP):
            return FSDP.summon_full_params(self.policy, writeback=False, recurse=True)
        return nullcontext()

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    # ---- one PPO step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> RolloutBatch:
        """Sample responses for the next prompts, score them, and compute old log-probs, values and advantages."""
        p = self.config.ppo
        acc = self.accelerator
        n_local = p.prompts_per_step // acc.num_processes
        idx = self.stream.take(p.prompts_per_step)[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        examples = [self.train_examples[i] for i in idx for _ in range(p.samples_per_prompt)]
        texts = [self.task.prompt(e, self.tokenizer, self.config.task.style) for e in examples]

        timer = _Timer()
        ro = self._generate(encode_prompts(self.tokenizer, texts))
        timer.lap("time/rollout")
        responses = decode_responses(self.tokenizer, ro)
        scores = torch.tensor(self.task.reward(responses, examples), dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise ValueError("the task returned a non-finite reward; rewards must be finite floats")
        timer.lap("time/reward")

        mask = ro.response_mask.float().cpu()
        B, R = mask.shape
        rewards = terminal_rewards(scores, mask)
        old_logprobs, values = torch.zeros(B, R), torch.zeros(B, R)
        ref_lp = torch.zeros(B, R) if self.ref_actor is not None else None
        policy, gae = self.unwrapped, p.advantage == "gae"
        ids, attn = ro.input_ids.to(self.device), ro.attention_mask.to(self.device)
        for s in range(0, B, p.micro_batch_size):
            sl = slice(s, s + p.micro_batch_size)
            with self.accelerator.autocast():
                out = policy(ids[sl], attn[sl], R, compute_values=gae, temperature=p.temperature)
                old_logprobs[sl] = out.logprobs.float().cpu()
                if gae:
                    values[sl] = out.values.float().cpu()
                if ref_lp is not None:
                    ref_lp[sl] = response_logprobs(self.ref_actor, ids[sl], attn[sl], R, temperature=p.temperature)[
                        1
                    ].float()
        old_logprobs, values = old_logprobs * mask, values * mask
        metrics: dict[str, float] = {}
        if ref_lp is not None:
            kl = kl_estimate(old_logprobs, ref_lp, p.kl_kind)
            metrics["kl/ref"] = float(masked_mean(kl, mask))
            if p.kl_in_reward:
                rewards = add_kl_to_rewards(rewards, kl, p.kl_coef, mask)

        if gae:
            adv, returns = compute_gae(rewards, values, mask, p.gamma, p.lam)
        else:  # grpo: each response's reward minus the mean reward of its group, on every token
            group = scores.view(-1, p.samples_per_prompt)
            adv = (group - group.mean(1, keepdim=True)).view(-1)[:, None].expand(B, R) * mask
            returns = torch.zeros_like(adv)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask)
        timer.lap("time/values")

        lengths = mask.sum(1)
        metrics.update(
            {
                "reward/mean": float(scores.mean()),
                "reward/std": float(scores.std()) if B > 1 else 0.0,
                "response/length_mean": float(lengths.mean()),
                "response/truncated_frac": float((lengths >= p.max_new_tokens).float().mean()),
                "tail/sampled_outside_top2": float(masked_mean(ro.outside_topk.float().cpu(), mask)),
                # the sampler's log-probs against the training forward's: 0 up to kernel round-off in fp32
                "rollout/logprob_gap": float(((ro.logprobs.float().cpu() - old_logprobs).abs() * mask).max()),
                **self.task.last_reward_stats,
                **timer.laps,
            }
        )
        if self.task.success_threshold is not None:
            metrics["reward/accuracy"] = float((scores >= self.task.success_threshold).float().mean())
        return RolloutBatch(
            ro.input_ids.cpu(), ro.attention_mask.cpu(), mask, old_logprobs, values, adv, returns, ref_lp,
            responses, scores, metrics,
        )  # fmt: skip

    def _generate(self, prompt_ids: list[list[int]]) -> Rollout:
        """Sample one response per prompt: with ``sampler`` (vLLM; its weights synced whenever they changed), or
        with the library's sampler, ``ppo.rollout_batch_size`` rows at a time (0: all at once) to bound the KV
        cache; the chunks are padded to a common prompt / response length and concatenated."""
        if self.sampler is not None:
            if self._synced_step != self.step:
                with self._rollout_context():
                    self.sampler.sync_weights(self.actor)
                self._synced_step = self.step
            return self.sampler.generate(prompt_ids, self._sampling())
        chunk = self.config.ppo.rollout_batch_size or len(prompt_ids)
        with self._rollout_context():
            parts = [
                generate(
                    self.actor,
                    prompt_ids[s : s + chunk],
                    self._sampling(),
                    eos_token_id=self.eos_token_ids,
                    pad_token_id=self.tokenizer.pad_token_id,
                    generator=self.sampling_generator,
                )
                for s in range(0, len(prompt_ids), chunk)
            ]
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.tokenizer.pad_token_id)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """PPO epochs over the collected batch; returns averaged metrics."""
        p = self.config.ppo
        B, R = batch.mask.shape
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)

        def add(metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                sums[k] += v
                counts[k] += 1

        self.policy.train()
        g = torch.Generator().manual_seed(self.config.seed * 7919 + self.step)
        mb_size = self._local_minibatch()
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=g)
            for s in range(0, B, mb_size):
                mb_idx = order[s : s + mb_size]
                mini_tokens = float(batch.mask[mb_idx].sum().clamp(min=1.0))
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                selected = self._select_minibatch(batch, mb_idx, R)
                if selected is not None:  # token-mean over the policy-gradient tokens of the whole mini-batch
                    pg_tokens = self.regularizer.pg_mask(selected).cpu() * batch.mask[mb_idx]
                    pg_total = float(pg_tokens.sum().clamp(min=1.0))
                for m in range(0, len(mb_idx), p.micro_batch_size):
                    idx = mb_idx[m : m + p.micro_batch_size]
                    if p.agg == "token-mean":
                        weight = float(batch.mask[idx].sum()) / mini_tokens
                    else:
                        weight = len(idx) / len(mb_idx)
                    sel, pg_weight = None, weight
                    if selected is not None:
                        sel = selected[m : m + p.micro_batch_size]
                        if p.agg == "token-mean":
                            pg_weight = float(pg_tokens[m : m + p.micro_batch_size].sum()) / pg_total
                    add(self._micro_step(batch, idx, R, weight, pg_weight, sel))
                add(self._clip_and_step())
        return {k: sums[k] / counts[k] for k in sums}

    @torch.no_grad()
    def _select_minibatch(self, batch: RolloutBatch, mb_idx: Tensor, R: int) -> Tensor | None:
        """``regularizer.selection: minibatch``: forking / KL-Cov / Clip-Cov select over the whole mini-batch, from
        a no-grad pre-pass (log-probs and entropies at the current weights, which the micro-steps share)."""
        reg, p = self.regularizer, self.config.ppo
        if not reg.selects_tokens or reg.selection != "minibatch":
            return None
        logprobs, entropies = [], []
        for m in range(0, len(mb_idx), p.micro_batch_size):
            idx = mb_idx[m : m + p.micro_batch_size]
            ids, attn = batch.input_ids[idx].to(self.device), batch.attention_mask[idx].to(self.device)
            with self.accelerator.autocast():
                out = self.unwrapped(ids, attn, R, compute_values=False, temperature=p.temperature)
                logprobs.append(out.logprobs.float())
                if reg.kind == "forking":
                    entropies.append(global_entropy(out.logits))
        return reg.select(
            None,
            torch.cat(logprobs),
            batch.old_logprobs[mb_idx].to(self.device),
            batch.advantages[mb_idx].to(self.device),
            batch.mask[mb_idx].to(self.device),
            entropy=torch.cat(entropies) if entropies else None,
        )

    def _micro_step(self, batch: RolloutBatch, idx: Tensor, R: int, weight: float, pg_weight: float, selected):
        """Forward, loss and backward of one micro-batch. ``weight``: its share of the mini-batch's loss
        (token-mean: its share of the valid tokens); ``pg_weight``: the same for the policy-gradient term, whose
        tokens a whole-mini-batch selection may have thinned out."""
        p = self.config.ppo
        dev = self.device
        ids, attn = batch.input_ids[idx].to(dev), batch.attention_mask[idx].to(dev)
        mask, old_lp, adv = batch.mask[idx].to(dev), batch.old_logprobs[idx].to(dev), batch.advantages[idx].to(dev)
        gae = p.advantage == "gae"
        with self.accelerator.autocast():
            out = self.policy(ids, attn, R, compute_values=gae, temperature=p.temperature)
            logits, logprobs = out.logits, out.logprobs.float()
            reg = self.regularizer(logits, logprobs, old_lp, adv, mask, agg=p.agg, selected=selected)
            pg_loss, pg_m = policy_loss(
                logprobs,
                old_lp,
                adv,
                mask * reg.pg_mask.to(mask.dtype),
                clip_low=p.clip_low,
                clip_high=p.clip_high,
                dual_clip=p.dual_clip if reg.dual_clip else None,
                agg=p.agg,
            )
            loss = reg.loss
            metrics = {**pg_m, **reg.metrics}
            if gae:
                old_v, ret = batch.old_values[idx].to(dev), batch.returns[idx].to(dev)
                v_loss, v_m = value_loss(out.values.float(), old_v, ret, mask, clip=p.value_clip, agg=p.agg)
                loss = loss + p.value_coef * v_loss
                metrics.update(v_m)
            if self.ref_actor is not None and not p.kl_in_reward:
                kl_loss = aggregate(kl_estimate(logprobs, batch.ref_logprobs[idx].to(dev), p.kl_kind), mask, p.agg)
                loss = loss + p.kl_coef * kl_loss
                metrics["kl/loss"] = float(kl_loss.detach())
        if not torch.isfinite(pg_loss + loss):
            raise FloatingPointError(
                f"non-finite PPO loss at step {self.step} ({metrics}); lower the learning rate or the coefficient"
            )
        self.accelerator.backward(pg_loss * pg_weight + loss * weight)
        metrics["loss/total"] = float((pg_loss + loss).detach())
        reg_cfg = self.regularizer.config
        metrics.update(tail_metrics(logits.detach(), mask, p=reg_cfg.p, top_k=reg_cfg.k))
        return metrics

    def _clip_and_step(self) -> dict[str, float]:
        """Clip actor and critic gradients separately and step; a non-finite gradient norm skips the step."""
        out: dict[str, float] = {}
        for name, params in (("actor", self._actor_params), ("critic", self._critic_params)):
            params = [q for q in params if q.grad is not None]
            if params:
                out[f"grad/{name}_norm"] = float(self.accelerator.clip_grad_norm_(params, self.config.ppo.grad_clip))
        finite = all(math.isfinite(v) for v in out.values())
        if finite:
            for opt in self.optimizers.values():
                opt.step()
        else:
            self.skipped_updates += 1
            warnings.warn(
                f"PPO step {self.step + 1}: non-finite gradient norm ({out}); this optimiser step is skipped "
                f"({self.skipped_updates} so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            out = {}  # a NaN norm must not poison the step's averaged metrics
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers.values():
            sched.step()
        return {**out, "train/skipped_updates": float(not finite)}

    def train_step(self) -> dict[str, float]:
        timer = _Timer()
        batch = self.collect()
        timer.lap("time/collect")
        upd = self.update(batch)
        timer.lap("time/update")
        metrics = {**batch.metrics, **upd, **timer.laps, "time/step": timer.total}
        metrics["lr/actor"] = self.schedulers["actor"].get_last_lr()[0]
        self.step += 1
        metrics = self._reduce(metrics)
        self.history.append(metrics)
        self.last_batch = {"responses": batch.responses[:8], "scores": batch.scores[:8].tolist()}
        return metrics

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        """Held-out greedy accuracy, the paper's sampled pass@1 and the tail metrics (see :mod:`tre_edu.evaluation`)."""
        cfg = self.config
        with self._rollout_context():
            res = evaluate(
                self.actor,
                self.tokenizer,
                self.task,
                self.eval_examples if examples is None else examples,
                cfg.eval,
                style=cfg.task.style,
                max_new_tokens=cfg.ppo.max_new_tokens,
                seed=cfg.seed * 31 + self.step,
            )
        out = self._reduce({f"eval/{k}": float(v) for k, v in res.items()})
        self.eval_history.append({"step": self.step, **out})
        for cb in self.callbacks:
            cb.on_evaluate(self, self.step, out)
        return out

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, resume_from: str | Path | None = None) -> list[dict[str, float]]:
        """Run PPO until ``steps`` (default ``config.ppo.steps``) steps are done; evaluate and checkpoint on the way.

        ``resume_from``: a checkpoint folder, or ``"latest"`` for the newest complete one under ``output_dir``.
        """
        cfg = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        total = cfg.ppo.steps if steps is None else steps
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if self.step == 0 and not self.eval_history and cfg.eval.at_start:
            self.evaluate()
        bar = tqdm(total=total, initial=self.step, desc="PPO", disable=not self.progress, dynamic_ncols=True)
        while self.step < total:
            metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", tail=f"{metrics['tail/mass_outside_top10']:.2e}")
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total:
                self.evaluate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < total:
                self.save_checkpoint()
        bar.close()
        if not self.eval_history or self.eval_history[-1]["step"] != self.step:
            self.evaluate()
        self.save_checkpoint()
        self.save_pretrained(self.output_dir / "final")
        for cb in self.callbacks:
            cb.on_train_end(self, self.history)
        return self.history

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int | None = None) -> Path:
        return self.output_dir / "checkpoints" / f"step_{self.step if step is None else step:06d}"

    def _check_finite_weights(self, what: str) -> None:
        bad = [n for n, q in self.unwrapped.named_parameters() if not bool(torch.isfinite(q).all())]
        if bad:
            raise FloatingPointError(
                f"refusing to save {what} at step {self.step}: {len(bad)} parameter(s) hold NaN / inf "
                f"(first: {bad[0]}); the run diverged — lower the learning rate or the coefficient"
            )

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Everything needed to continue exactly: weights, optimisers, schedules, RNGs, data position, history.
        Written atomically (see :mod:`tre_edu.checkpoint`); never with non-finite weights."""
        path = Path(path) if path is not None else self.checkpoint_dir()
        self._check_finite_weights("a checkpoint")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state = {
                "policy": self.unwrapped.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "rng": checkpoint.rng_state(),
                "sampling_generator": self.sampling_generator.get_state(),
                "regularizer": self.regularizer.state_dict(),
                "stream": self.stream.state_dict(),
                "step": self.step,
                "skipped_updates": self.skipped_updates,
                "history": self.history,
                "eval_history": self.eval_history,
            }
            checkpoint.save(path, state, {"config.yaml": self.config.to_yaml()})
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore a checkpoint folder (``"latest"``: the newest complete one; incomplete ones are skipped with a
        warning) and cut ``metrics.jsonl`` back to its step, so every step is logged once. Returns the folder."""
        if str(path) == "latest":
            path, state = checkpoint.load_latest(self.output_dir)
        else:
            path, state = Path(path), checkpoint.load(path)
        self.unwrapped.load_state_dict(state["policy"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        checkpoint.set_rng_state(state["rng"])
        self.sampling_generator.set_state(state["sampling_generator"])
        self.regularizer.load_state_dict(state["regularizer"])
        self.stream.load_state_dict(state["stream"])
        self.step, self.skipped_updates = state["step"], state["skipped_updates"]
        self.history, self.eval_history = state["history"], state["eval_history"]
        if self.accelerator.is_main_process:
            checkpoint.truncate_jsonl(self.metrics_file, self.step)
        return path

    def save_pretrained(self, path: str | Path) -> Path:
        """The actor and tokenizer in Hugging Face format (load with ``from_pretrained`` or ``tre-edu eval``)."""
        path = Path(path)
        self._check_finite_weights("the model")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.actor.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            summary = {"step": self.step, "eval": self.eval_history[-1] if self.eval_history else {}}
            (path / "tre_edu_run.json").write_text(json.dumps(summary, indent=2))
        return path


class _Timer:
    """Wall-clock laps: ``lap(name)`` records the seconds since the previous lap."""

    def __init__(self):
        self._clock = time.perf_counter
        self.start = self.last = self._clock()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._clock()
        self.laps[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self._clock() - self.start


def summarize(history: list[dict[str, float]], keys: list[str] | None = None) -> dict[str, float]:
    """Mean of the last 10% of steps for each key (a robust 'final' value)."""
    if not history:
        return {}
    tail = history[-max(1, math.ceil(len(history) / 10)) :]
    keys = keys or sorted(tail[-1])
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}
