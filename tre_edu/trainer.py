"""PPOTrainer: collect -> advantages -> update epochs -> metrics / checkpoints. It orchestrates; the algorithm lives
in :mod:`tre_edu.ppo` (advantages, the one micro-batch loss), :mod:`tre_edu.regularizers` (which method, and the
per-token statistics it needs) and :mod:`tre_edu.policy` / :mod:`tre_edu.head` (those statistics, from the hidden
states, without the ``(B, T, V)`` logits). One PPO step, top to bottom::

    examples  = next prompts_per_step examples of the task              (data order seeded, resumable)
    rollout   = sample(actor, prompts x samples_per_prompt)              (KV cache, temperature T, stop at EOS)
    R         = task.reward(responses)                                   (scalar, put on the last response token)
    logp_old, V_old = policy(rollout) at temperature T, no grad          (the update's own forward and precision)
    A, G      = ppo.compute_advantages("gae" | "grpo", ...)              (then whitened over the batch)
    for each PPO epoch, each mini-batch (gradient accumulation over micro-batches):
        stats, V  = policy(micro-batch, request=regularizer.request())   (log-probs, entropy / H_TRE as declared)
        reg       = regularizer(stats, logp_old, A, mask)                (none | entropy | TRE | forking | KL-Cov)
        L         = ppo.ppo_loss(...)  =  L_clip + reg.loss + c_V L_V (+ c_KL KL)
        step (grad clip for actor and critic separately; a non-finite gradient skips the step)
    metrics   = rewards, PPO set (approx_kl, clipfrac, explained variance, ...) and the tail set
                (global / TRE entropy, top-1 probability, mass outside top-2 / top-10, nucleus size, ...)

The old log-probs are recomputed with the training forward (as the paper's code), so with one mini-batch and one
epoch the ratio is exactly 1 in every precision; the sampler's own log-probs are only a diagnostic. Multi-GPU: under
Accelerate each process samples its share of the prompts, DDP / FSDP average the gradients, and metrics are averaged.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm.auto import tqdm

from tre_edu import checkpoint, distributed, ppo
from tre_edu.config import TrainConfig
from tre_edu.evaluation import evaluate
from tre_edu.optim import PPOOptimizers
from tre_edu.policy import ActorCritic
from tre_edu.regularizers import Regularizer
from tre_edu.rollout import Rollout, SamplingConfig, decode_responses, eos_token_ids, generate


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
    """One PPO step's data, ``(B, R)`` tensors on the CPU (``B`` responses, ``R`` response columns); advantages
    whitened when ``ppo.whiten_advantages``; ref_logprobs only with ``ppo.kl_coef > 0``."""

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

    def rows(self, idx: Tensor, device: Any) -> dict[str, Tensor | None]:
        """The per-token tensors of rows ``idx`` on ``device`` (None for what this batch lacks)."""
        names = ("input_ids", "attention_mask", "mask", "old_logprobs", "old_values", "advantages", "returns")
        tensors = {n: getattr(self, n) for n in (*names, "ref_logprobs")}
        return {n: None if t is None else t[idx].to(device) for n, t in tensors.items()}


_PER_TOKEN = ("logprobs", "values", "entropy", "tre")  # the (B, R) outputs of a policy forward


class PPOTrainer:
    """PPO for a causal LM with a chosen exploration regulariser; :func:`tre_edu.pipeline.build_trainer` builds it.

    ``policy``: an :class:`~tre_edu.policy.ActorCritic`, with a value head for ``ppo.advantage: gae``, without for
    ``grpo``; ``sampler``: None (the library's sampler) or an object with ``sync_weights(actor)`` and
    ``generate(prompt_ids, SamplingConfig) -> Rollout`` (vLLM); ``tail_start``: the first tail-token id of the
    tokenizer (the tiny model's vocabulary tail), for evaluation's tail-token counts.
    """

    def __init__(
        self,
        config: TrainConfig,
        policy: Any,
        tokenizer: Any,
        task: Any,
        train_examples: list[dict],
        eval_examples: list[dict],
        regularizer: Regularizer,
        *,
        sampler: Any = None,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        accelerator: Accelerator | None = None,
        tail_start: int | None = None,
    ):
        self.config, cfg, p = config, config, config.ppo
        self.accelerator = accelerator or distributed.make_accelerator(p.mixed_precision, cpu=cfg.device == "cpu")
        self.device = self.accelerator.device
        if cfg.device.startswith("cuda:") and self.accelerator.num_processes == 1:
            self.device = torch.device(cfg.device)
        n_proc = self.accelerator.num_processes
        if n_proc > 1 and (p.prompts_per_step % n_proc or p.minibatch_size % n_proc):
            raise ValueError(
                f"ppo.prompts_per_step ({p.prompts_per_step}) and ppo.minibatch_size ({p.minibatch_size}) must be "
                f"divisible by the number of processes ({n_proc})"
            )
        if (p.advantage == "gae") != (policy.value_head is not None):
            need = "with" if p.advantage == "gae" else "without"
            raise ValueError(f"ppo.advantage {p.advantage!r} needs a policy {need} a value head")
        self.task, self.tokenizer, self.regularizer, self.sampler = task, tokenizer, regularizer, sampler
        self.train_examples, self.eval_examples, self.tail_start = train_examples, eval_examples, tail_start
        self.stream = PromptStream(len(train_examples), cfg.seed)
        self.eos_token_ids = eos_token_ids(tokenizer, policy.actor)

        policy = policy.to(self.device)
        self.ref = None  # the reference policy of the KL term: a frozen copy of the initial actor
        if p.kl_coef > 0:
            ref = copy.deepcopy(policy.actor).eval().requires_grad_(False)
            self.ref = ActorCritic(ref, value_head=False, lean_head=p.lean_head)
        self.optim = PPOOptimizers(*policy.parameter_groups(), p, self.optimizer_steps_per_ppo_step() * p.steps)
        self.policy = self.optim.prepare(self.accelerator, policy)  # DDP / FSDP wrapping

        self.sampling_generator = torch.Generator().manual_seed(cfg.seed + 12345)
        self.step, self._synced_step, self.last_batch = 0, -1, {}
        self.history: list[dict[str, float]] = []  # one dict of metrics per PPO step
        self.eval_history: list[dict[str, float]] = []
        self.callbacks, self.progress = list(callbacks or []), progress and self.accelerator.is_main_process
        self.output_dir = Path(cfg.output_dir)
        self.metrics_file = self.output_dir / "metrics.jsonl"  # JSONLLogger's file, cut back on resume

    # ---- helpers ------------------------------------------------------------------------------------------------
    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    @property
    def actor(self):
        return self.unwrapped.actor

    @property
    def skipped_updates(self) -> int:  # optimiser steps skipped for a non-finite gradient norm so far
        return self.optim.skipped

    def optimizer_steps_per_ppo_step(self) -> int:
        """``ppo.minibatch_size`` counts responses over all processes (verl's ppo_mini_batch_size)."""
        p = self.config.ppo
        return p.ppo_epochs * p.prompts_per_step * p.samples_per_prompt // p.minibatch_size

    def _rollout_context(self):
        """Whole parameters for sampling and evaluation (FSDP gathers its shards; a no-op otherwise)."""
        return distributed.full_parameters(self.policy, "actor")

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        return distributed.mean_over_processes(self.accelerator, metrics)

    # ---- one PPO step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> RolloutBatch:
        """Sample responses for the next prompts, score them, and compute old log-probs, values and advantages."""
        p, acc, timer = self.config.ppo, self.accelerator, _Timer()
        n_local = p.prompts_per_step // acc.num_processes
        idx = self.stream.take(p.prompts_per_step)[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        examples = [self.train_examples[i] for i in idx for _ in range(p.samples_per_prompt)]
        texts = [self.task.prompt(e, self.tokenizer, self.config.task.style) for e in examples]
        ro = self._generate(encode_prompts(self.tokenizer, texts))
        timer.lap("time/rollout")
        responses = decode_responses(self.tokenizer, ro)
        scores = torch.tensor(self.task.reward(responses, examples), dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise ValueError("the task returned a non-finite reward; rewards must be finite floats")
        timer.lap("time/reward")

        mask, critic = ro.response_mask.float().cpu(), self.unwrapped.value_head is not None
        old = self._no_grad_pass(self.unwrapped, ro.input_ids, ro.attention_mask, mask.shape[1], values=critic)
        old_logprobs, values = old.logprobs.cpu() * mask, None if old.values is None else old.values.cpu() * mask
        rewards, metrics, ref_lp = ppo.terminal_rewards(scores, mask), {}, None
        if self.ref is not None:
            ref_lp = self._no_grad_pass(self.ref, ro.input_ids, ro.attention_mask, mask.shape[1]).logprobs.cpu()
            kl = ppo.kl_estimate(old_logprobs, ref_lp, p.kl_kind)
            metrics["kl/ref"] = float(ppo.masked_mean(kl, mask))
            if p.kl_in_reward:
                rewards = ppo.add_kl_to_rewards(rewards, kl, p.kl_coef, mask)
        adv, returns = ppo.compute_advantages(p.advantage, scores=scores, rewards=rewards, values=values, mask=mask,
                                              gamma=p.gamma, lam=p.lam, group_size=p.samples_per_prompt)  # fmt: skip
        if p.whiten_advantages:
            adv = ppo.masked_whiten(adv, mask)
        timer.lap("time/values")
        lengths = mask.sum(1)
        metrics.update({
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            "response/length_mean": float(lengths.mean()),
            "response/truncated_frac": float((lengths >= p.max_new_tokens).float().mean()),
            "tail/sampled_outside_top2": float(ppo.masked_mean(ro.outside_topk.float().cpu(), mask)),
            # the sampler's log-probs against the training forward's: 0 up to kernel round-off in fp32
            "rollout/logprob_gap": float(((ro.logprobs.float().cpu() - old_logprobs).abs() * mask).max()),
            **self.task.last_reward_stats, **timer.laps,
        })  # fmt: skip
        if self.task.success_threshold is not None:
            metrics["reward/accuracy"] = float((scores >= self.task.success_threshold).float().mean())
        values = torch.zeros_like(mask) if values is None else values
        return RolloutBatch(ro.input_ids.cpu(), ro.attention_mask.cpu(), mask, old_logprobs, values, adv, returns,
                            ref_lp, responses, scores, metrics)  # fmt: skip

    @torch.no_grad()
    def _no_grad_pass(self, model, input_ids, attention_mask, R, request=None, values=False) -> SimpleNamespace:
        """``model``'s (an ActorCritic) per-token statistics of whole rows, micro-batch by micro-batch, at the rollout
        temperature and in the update's precision: ``logprobs``, ``values``, ``entropy``, ``tre`` (B, R) or None."""
        p, parts = self.config.ppo, defaultdict(list)
        for s in range(0, len(input_ids), p.micro_batch_size):
            ids, attn = (x[s : s + p.micro_batch_size].to(self.device) for x in (input_ids, attention_mask))
            with self.accelerator.autocast():
                out = model(ids, attn, R, request=request, compute_values=values, temperature=p.temperature)
            for name in _PER_TOKEN:
                if getattr(out, name) is not None:
                    parts[name].append(getattr(out, name).float())
        return SimpleNamespace(**{k: torch.cat(parts[k]) if k in parts else None for k in _PER_TOKEN})

    def _generate(self, prompt_ids: list[list[int]]) -> Rollout:
        """Sample one response per prompt: with ``sampler`` (vLLM; weights synced whenever they changed), or with the
        library's sampler, ``ppo.rollout_batch_size`` rows at a time (0: all at once) to bound the KV cache."""
        p = self.config.ppo
        sampling = SamplingConfig(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p,
                                  top_k=p.top_k)  # fmt: skip
        if self.sampler is not None:
            if self._synced_step != self.step:
                with self._rollout_context():
                    self.sampler.sync_weights(self.actor)
                self._synced_step = self.step
            return self.sampler.generate(prompt_ids, sampling)
        with self._rollout_context():
            return generate(self.actor, prompt_ids, sampling, eos_token_id=self.eos_token_ids,
                            pad_token_id=self.tokenizer.pad_token_id, generator=self.sampling_generator,
                            chunk_size=p.rollout_batch_size)  # fmt: skip

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """PPO epochs over the collected batch, one optimiser step per mini-batch; returns averaged metrics."""
        p, reg, mean = self.config.ppo, self.regularizer, _MeanOf()
        self.policy.train()
        (B, R), n = batch.mask.shape, max(1, p.minibatch_size // max(1, self.accelerator.num_processes))
        g = torch.Generator().manual_seed(self.config.seed * 7919 + self.step)
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=g)
            for mb in (order[s : s + n] for s in range(0, B, n)):
                self.optim.zero_grad()
                t = batch.rows(mb, self.device)
                stats = functools.partial(
                    self._no_grad_pass, self.unwrapped, batch.input_ids[mb], batch.attention_mask[mb], R
                )
                selected = reg.minibatch_selection(stats, t["old_logprobs"], t["advantages"], t["mask"])
                pg_mask = None if selected is None else reg.pg_mask(selected).cpu()
                for part, w, w_pg in ppo.micro_batches(batch.mask[mb], p.micro_batch_size, p.agg, pg_mask):
                    sel = None if selected is None else selected[part]
                    mean.add(self._micro_step(batch.rows(mb[part], self.device), w, w_pg, sel))
                mean.add(self.optim.step(self.accelerator.clip_grad_norm_, f"PPO step {self.step + 1}"))
        return mean.result()

    def _micro_step(self, t: dict[str, Tensor | None], weight: float, pg_weight: float, selected) -> dict[str, float]:
        """Forward, loss and backward of one micro-batch (``t``: its rows, from :meth:`RolloutBatch.rows`)."""
        p, reg, critic = self.config.ppo, self.regularizer, self.unwrapped.value_head is not None
        with self.accelerator.autocast():
            request = reg.request(metrics=True)
            out = self.policy(t["input_ids"], t["attention_mask"], t["mask"].shape[1], mask=t["mask"],
                              request=request, compute_values=critic, temperature=p.temperature)  # fmt: skip
            r = reg(out, t["old_logprobs"], t["advantages"], t["mask"], p.agg, selected=selected)
            loss, metrics = ppo.ppo_loss(
                logprobs=out.logprobs, old_logprobs=t["old_logprobs"], advantages=t["advantages"], mask=t["mask"],
                pg_mask=r.pg_mask, reg_loss=r.loss, settings=p, dual_clip=r.dual_clip, weight=weight,
                pg_weight=pg_weight, values=out.values, old_values=t["old_values"], returns=t["returns"],
                ref_logprobs=None if p.kl_in_reward else t["ref_logprobs"],
            )  # fmt: skip
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite PPO loss at step {self.step} ({metrics}); lower the learning rate or the coefficient"
            )
        self.accelerator.backward(loss)
        return {**metrics, **r.metrics, **out.metrics}

    def train_step(self) -> dict[str, float]:
        timer = _Timer()
        batch = self.collect()
        timer.lap("time/collect")
        upd = self.update(batch)
        timer.lap("time/update")
        metrics = {**batch.metrics, **upd, **timer.laps, "time/step": timer.total, "lr/actor": self.optim.actor_lr}
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
            res = evaluate(self.actor, self.tokenizer, self.task, self.eval_examples if examples is None else examples,
                           cfg.eval, style=cfg.task.style, max_new_tokens=cfg.ppo.max_new_tokens,
                           seed=cfg.seed * 31 + self.step, tail_start=self.tail_start)  # fmt: skip
        out = self._reduce({f"eval/{k}": float(v) for k, v in res.items()})
        self.eval_history.append({"step": self.step, **out})
        self._emit("on_evaluate", self.step, out)
        return out

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, resume_from: str | Path | None = None) -> list[dict[str, float]]:
        """Run PPO until ``steps`` (default ``config.ppo.steps``) steps are done; evaluate and checkpoint on the way.
        ``resume_from``: a checkpoint folder, or ``"latest"`` for the newest complete one under ``output_dir``."""
        cfg = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        total = cfg.ppo.steps if steps is None else steps
        self._emit("on_train_begin")
        if self.step == 0 and not self.eval_history and cfg.eval.at_start:
            self.evaluate()
        bar = tqdm(total=total, initial=self.step, desc="PPO", disable=not self.progress, dynamic_ncols=True)
        while self.step < total:
            metrics = self.train_step()
            self._emit("on_step_end", self.step, metrics)
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
        self._emit("on_train_end", self.history)
        return self.history

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int | None = None) -> Path:
        return self.output_dir / "checkpoints" / f"step_{self.step if step is None else step:06d}"

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Everything needed to continue exactly (:func:`tre_edu.checkpoint.save_trainer`), atomically."""
        return checkpoint.save_trainer(self, Path(path) if path is not None else self.checkpoint_dir())

    def load_checkpoint(self, path: str | Path) -> Path:
        """Restore a checkpoint (``"latest"``: the newest complete one): :func:`tre_edu.checkpoint.load_trainer`."""
        return checkpoint.load_trainer(self, path)

    def save_pretrained(self, path: str | Path) -> Path:
        """The actor and tokenizer in Hugging Face format (load with ``from_pretrained`` or ``tre-edu eval``)."""
        path = Path(path)
        checkpoint.check_finite(self.unwrapped, f"the model at step {self.step}")
        self.accelerator.wait_for_everyone()
        weights = distributed.full_state_dict(self.policy, "actor")  # FSDP: gathered on rank 0; else None
        if self.accelerator.is_main_process:
            self.actor.save_pretrained(path, state_dict=weights)
            self.tokenizer.save_pretrained(path)
            summary = {"step": self.step, "eval": self.eval_history[-1] if self.eval_history else {}}
            (path / "tre_edu_run.json").write_text(json.dumps(summary, indent=2))
        return path


class _MeanOf:
    """Means of metric dicts (a key's mean over the dicts that have it)."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.values[k].append(v)

    def result(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.values.items()}


class _Timer:
    """Wall-clock laps: ``lap(name)`` records the seconds since the previous lap."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def summarize(history: list[dict[str, float]], keys: list[str] | None = None) -> dict[str, float]:
    """Mean of the last 10% of steps for each key (a robust 'final' value)."""
    if not history:
        return {}
    tail = history[-max(1, math.ceil(len(history) / 10)) :]
    keys = keys or sorted(tail[-1])
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}
