"""PPOTrainer: prompts -> rollout -> reward -> values -> GAE -> PPO epochs -> metrics.

One PPO step, top to bottom (every piece lives in its own module; this file only composes them)::

    examples  = next prompts_per_step examples of the task              (data order seeded, resumable)
    rollout   = rollout.generate(actor, prompts x samples_per_prompt)     (KV cache, stop at EOS)
    R         = task.reward(responses)                                   (scalar, put on the last response token)
    V_old     = critic values of the rollout                             (no grad)
    A, G      = ppo.compute_gae(r, V_old, mask, gamma, lambda)           (then whitened over the batch)
    for each PPO epoch, each mini-batch (gradient accumulation over micro-batches):
        logits, logp, V = policy(mini-batch)
        reg       = regularizer(logits, logp, logp_old, A, mask)         (none | entropy | TRE | forking | KL-Cov)
        L         = policy_loss(logp, logp_old, A, mask * reg.pg_mask)   (clip + dual clip)
                    + reg.loss + value_coef * value_loss(V, V_old, G)
        step (grad clip for actor and critic separately)
    metrics   = rewards, PPO set (approx_kl, clipfrac, explained variance, ...) and the tail set
                (global / TRE entropy, top-1 probability, mass outside top-2 / top-10, nucleus size, ...)

Multi-GPU: the trainer runs under Accelerate (``accelerate launch``); each process samples its share of the prompts,
DDP / FSDP average the gradients, and metrics are averaged over processes.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tre_edu.config import TrainConfig
from tre_edu.entropy import tail_metrics
from tre_edu.ppo import compute_gae, kl_estimate, masked_mean, masked_whiten, policy_loss, value_loss
from tre_edu.rollout import Rollout, SamplingConfig, concat_rollouts, decode_responses, generate


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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


def _lr_lambda(warmup_steps: int) -> Callable[[int], float]:
    return lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class PPOTrainer:
    """PPO for a causal LM with a chosen exploration regulariser.

    Args:
        config: the run's :class:`~tre_edu.config.TrainConfig`.
        policy, tokenizer: an :class:`~tre_edu.policy.ActorCritic` and its tokenizer; built from ``config.model``
            (and ``config.init_from``) when omitted.
        task: a :class:`~tre_edu.tasks.Task`; built from ``config.task`` when omitted.
        train_examples, eval_examples: the data; loaded from the task when omitted.
        callbacks: :class:`Callback` objects (live plots, loggers). A JSONL log goes to ``output_dir/metrics.jsonl``.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        config: TrainConfig,
        policy: Any = None,
        tokenizer: Any = None,
        task: Any = None,
        train_examples: list[dict] | None = None,
        eval_examples: list[dict] | None = None,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        accelerator: Any = None,
        log_jsonl: bool = True,
    ):
        from accelerate import Accelerator

        self.config = cfg = config.validate()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)
        if accelerator is None:
            accelerator = Accelerator(mixed_precision=cfg.ppo.mixed_precision, cpu=cfg.device == "cpu")
        self.accelerator = accelerator
        self.device = accelerator.device
        if cfg.device.startswith("cuda:") and accelerator.num_processes == 1:
            self.device = torch.device(cfg.device)

        if task is None:
            from tre_edu.tasks import get_task

            task = get_task(cfg.task.name, **cfg.task.options)
        self.task = task
        if policy is None or tokenizer is None:
            from tre_edu.models.hub import build_policy

            tokenizer, policy = build_policy(cfg.model, cfg.init_from, seed=cfg.seed)
        self.tokenizer = tokenizer
        if train_examples is None:
            train_examples = task.load("train", n=cfg.task.train_size, seed=cfg.seed)
        if eval_examples is None:
            eval_examples = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
        self.train_examples, self.eval_examples = train_examples, eval_examples
        self.stream = PromptStream(len(train_examples), cfg.seed)
        self.regularizer = cfg.regularizer

        policy = policy.to(self.device)
        self.ref_actor = None
        if cfg.ppo.kl_coef > 0:
            self.ref_actor = copy.deepcopy(policy.actor).eval().requires_grad_(False)

        actor_params = list(policy.actor.parameters())
        actor_ids = {id(p) for p in actor_params}
        critic_params = [p for p in policy.parameters() if id(p) not in actor_ids]
        self._actor_params, self._critic_params = actor_params, critic_params
        self.optimizer = torch.optim.AdamW(
            [
                {"params": actor_params, "lr": cfg.ppo.actor_lr, "name": "actor"},
                {"params": critic_params, "lr": cfg.ppo.critic_lr, "name": "critic"},
            ],
            weight_decay=cfg.ppo.weight_decay,
        )
        opt_steps = self.optimizer_steps_per_ppo_step() * cfg.ppo.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            [
                _lr_lambda(int(cfg.ppo.warmup_ratio * opt_steps)),
                _lr_lambda(int(cfg.ppo.critic_warmup_ratio * opt_steps)),
            ],
        )
        self.policy, self.optimizer = accelerator.prepare(policy, self.optimizer)
        n_proc = accelerator.num_processes
        if n_proc > 1 and (cfg.ppo.prompts_per_step % n_proc or cfg.ppo.minibatch_size % n_proc):
            raise ValueError(
                f"ppo.prompts_per_step ({cfg.ppo.prompts_per_step}) and ppo.minibatch_size "
                f"({cfg.ppo.minibatch_size}) must be divisible by the number of processes ({n_proc})"
            )
        self._vllm: Any = None  # the vLLM engine (ppo.rollout_backend: vllm), built on first use
        self._vllm_synced_step = -1
        self.sampling_generator = torch.Generator().manual_seed(cfg.seed + 12345)

        self.step = 0
        self.history: list[dict[str, float]] = []
        self.eval_history: list[dict[str, float]] = []
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(cfg.output_dir)
        if accelerator.is_main_process and log_jsonl:
            self.callbacks.append(JSONLLogger(self.output_dir / "metrics.jsonl"))
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
        p = self.config.ppo
        return p.ppo_epochs * (self._local_batch() // self._local_minibatch())

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

    def _prompt_texts(self, examples: list[dict]) -> list[str]:
        return [self.task.prompt(e, self.tokenizer, self.config.task.style) for e in examples]

    def _rollout_context(self):
        """FSDP shards parameters; sampling needs them whole."""
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if isinstance(self.policy, FSDP):
                return FSDP.summon_full_params(self.policy, writeback=False, recurse=True)
        except ImportError:  # pragma: no cover
            pass
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
    def collect(self) -> dict[str, Any]:
        """Sample responses for the next prompts, score them and compute old log-probs, values and advantages."""
        p = self.config.ppo
        acc = self.accelerator
        n_local = p.prompts_per_step // acc.num_processes if acc.num_processes > 1 else p.prompts_per_step
        idx = self.stream.take(p.prompts_per_step)
        idx = idx[acc.process_index * n_local : (acc.process_index + 1) * n_local]
        examples = [self.train_examples[i] for i in idx]
        examples = [e for e in examples for _ in range(p.samples_per_prompt)]
        prompt_ids = encode_prompts(self.tokenizer, self._prompt_texts(examples))

        t0 = time.perf_counter()
        ro = self._generate(prompt_ids)
        t1 = time.perf_counter()
        responses = decode_responses(self.tokenizer, ro)
        scores = torch.tensor(self.task.reward(responses, examples), dtype=torch.float32)
        if not torch.isfinite(scores).all():
            raise ValueError("the task returned a non-finite reward; rewards must be finite floats")
        t2 = time.perf_counter()

        mask = ro.response_mask.to(torch.float32)
        lengths = mask.sum(1).long()
        B, R = mask.shape
        token_rewards = torch.zeros(B, R)
        rows = torch.arange(B)
        has_tokens = lengths > 0
        token_rewards[rows[has_tokens], (lengths[has_tokens] - 1)] = scores[has_tokens]

        policy = self.unwrapped
        input_ids, attn = ro.input_ids.to(self.device), ro.attention_mask.to(self.device)
        values = torch.zeros(B, R)
        old_logprobs = ro.logprobs.float().cpu()
        mb = p.micro_batch_size
        ref_lp = torch.zeros(B, R) if self.ref_actor is not None else None
        for s in range(0, B, mb):
            sl = slice(s, s + mb)
            with self.accelerator.autocast():
                if p.rollout_backend == "vllm":  # vLLM's log-probs come from other kernels: recompute them
                    out = policy(input_ids[sl], attn[sl], R, compute_values=p.advantage == "gae")
                    old_logprobs[sl] = (out.logprobs.float().cpu() * mask[sl]).to(old_logprobs.dtype)
                    if p.advantage == "gae":
                        values[sl] = out.values.float().cpu()
                elif p.advantage == "gae":
                    values[sl] = policy.values_only(input_ids[sl], attn[sl], R).float().cpu()
                if self.ref_actor is not None:
                    ref = self._ref_logprobs(input_ids[sl], attn[sl], R)
                    ref_lp[sl] = ref.float().cpu()
        kl_metrics = {}
        if ref_lp is not None:
            kl = kl_estimate(old_logprobs, ref_lp, p.kl_kind)
            kl_metrics["kl/ref"] = float(masked_mean(kl, mask))
            if p.kl_in_reward:
                token_rewards = token_rewards - p.kl_coef * kl * mask

        if p.advantage == "gae":
            adv, returns = compute_gae(token_rewards, values * mask, mask, p.gamma, p.lam)
        else:  # grpo: each response's reward minus the mean reward of its group, on every token
            group = scores.view(-1, p.samples_per_prompt)
            centred = (group - group.mean(1, keepdim=True)).view(-1)
            adv = centred[:, None].expand(B, R) * mask
            returns = torch.zeros_like(adv)
        if p.whiten_advantages:
            adv = masked_whiten(adv, mask)
        t3 = time.perf_counter()

        acc_frac = float((scores >= 1.0).float().mean())
        metrics = {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if B > 1 else 0.0,
            "reward/accuracy": acc_frac,
            "response/length_mean": float(lengths.float().mean()),
            "response/truncated_frac": float((lengths >= R).float().mean()) if R == p.max_new_tokens else 0.0,
            "tail/sampled_outside_top2": float(masked_mean(ro.outside_topk.float(), mask)),
            "time/rollout": t1 - t0,
            "time/reward": t2 - t1,
            "time/values": t3 - t2,
            **kl_metrics,
        }
        return {
            "input_ids": ro.input_ids,
            "attention_mask": ro.attention_mask,
            "mask": mask,
            "old_logprobs": old_logprobs,
            "old_values": values,
            "advantages": adv,
            "returns": returns,
            "ref_logprobs": ref_lp,
            "R": R,
            "metrics": metrics,
            "responses": responses,
            "scores": scores,
        }

    def _generate(self, prompt_ids: list[list[int]]) -> Rollout:
        """Sample one response per prompt with ``ppo.rollout_backend``.

        hf: the library's sampler, ``ppo.rollout_batch_size`` rows at a time (0: all at once) to bound the KV
        cache; the chunks are padded to a common prompt / response length and concatenated. vllm: the whole
        batch goes to the vLLM engine (it schedules its own memory); the actor's weights are synced into it
        first whenever they changed.
        """
        p = self.config.ppo
        if p.rollout_backend == "vllm":
            from tre_edu.vllm_rollout import VLLMRollout

            if self._vllm is None:
                self._vllm = VLLMRollout.for_trainer(self)
            if self._vllm_synced_step != self.step:
                with self._rollout_context():
                    self._vllm.sync_weights(self.actor)
                self._vllm_synced_step = self.step
            return self._vllm.generate(prompt_ids, self._sampling())
        chunk = p.rollout_batch_size or len(prompt_ids)
        parts = []
        with self._rollout_context():
            for s in range(0, len(prompt_ids), chunk):
                parts.append(
                    generate(
                        self.actor,
                        prompt_ids[s : s + chunk],
                        self._sampling(),
                        eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=self.tokenizer.pad_token_id,
                        generator=self.sampling_generator,
                    )
                )
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.tokenizer.pad_token_id)

    def _ref_logprobs(self, input_ids, attn, R):
        from tre_edu.entropy import token_logprobs
        from tre_edu.policy import position_ids_from_mask

        out = self.ref_actor(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids_from_mask(attn),
            logits_to_keep=R + 1,
        )
        return token_logprobs(out.logits[:, :-1], input_ids[:, -R:])

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """PPO epochs over the collected batch; returns averaged metrics."""
        p = self.config.ppo
        B, R = batch["mask"].shape
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        self.policy.train()
        g = torch.Generator().manual_seed(self.config.seed * 7919 + self.step)
        for _epoch in range(p.ppo_epochs):
            order = torch.randperm(B, generator=g)
            mb_size = self._local_minibatch()
            for s in range(0, B, mb_size):
                mb_idx = order[s : s + mb_size]
                mini_tokens = float(batch["mask"][mb_idx].sum().clamp(min=1.0))
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(0, len(mb_idx), p.micro_batch_size):
                    idx = mb_idx[m : m + p.micro_batch_size]
                    if p.agg == "token-mean":
                        weight = float(batch["mask"][idx].sum()) / mini_tokens
                    else:
                        weight = len(idx) / len(mb_idx)
                    metrics = self._micro_step(batch, idx, R, weight)
                    for k, v in metrics.items():
                        sums[k] += v
                        counts[k] += 1
                grad_metrics = self._clip_and_step()
                for k, v in grad_metrics.items():
                    sums[k] += v
                    counts[k] += 1
        return {k: sums[k] / counts[k] for k in sums}

    def _micro_step(self, batch, idx, R, weight) -> dict[str, float]:
        p = self.config.ppo
        dev = self.device
        ids = batch["input_ids"][idx].to(dev)
        attn = batch["attention_mask"][idx].to(dev)
        mask = batch["mask"][idx].to(dev)
        old_lp = batch["old_logprobs"][idx].to(dev)
        adv = batch["advantages"][idx].to(dev)
        with self.accelerator.autocast():
            out = self.policy(ids, attn, R, compute_values=p.advantage == "gae")
            logits, logprobs = out.logits, out.logprobs.float()
            reg = self.regularizer(logits, logprobs, old_lp, adv, mask, agg=p.agg)
            pg_loss, pg_m = policy_loss(
                logprobs,
                old_lp,
                adv,
                mask * reg.pg_mask.to(mask.dtype),
                clip_low=p.clip_low,
                clip_high=p.clip_high,
                dual_clip=p.dual_clip,
                agg=p.agg,
            )
            loss = pg_loss + reg.loss
            metrics = {**pg_m, **reg.metrics}
            if p.advantage == "gae":
                v_loss, v_m = value_loss(
                    out.values.float(),
                    batch["old_values"][idx].to(dev),
                    batch["returns"][idx].to(dev),
                    mask,
                    clip=p.value_clip,
                    agg=p.agg,
                )
                loss = loss + p.value_coef * v_loss
                metrics.update(v_m)
            if self.ref_actor is not None and not p.kl_in_reward:
                from tre_edu.ppo import aggregate

                kl = kl_estimate(logprobs, batch["ref_logprobs"][idx].to(dev), p.kl_kind)
                kl_loss = aggregate(kl, mask, p.agg)
                loss = loss + p.kl_coef * kl_loss
                metrics["kl/loss"] = float(kl_loss.detach())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite PPO loss at step {self.step} ({metrics}); lower the learning rate or the coefficient"
            )
        self.accelerator.backward(loss * weight)
        metrics["loss/total"] = float(loss.detach())
        metrics.update(tail_metrics(logits.detach().float(), mask, p=self.regularizer.p, top_k=self.regularizer.k))
        return metrics

    def _clip_and_step(self) -> dict[str, float]:
        clip = self.config.ppo.grad_clip
        out = {}
        for name, params in (("actor", self._actor_params), ("critic", self._critic_params)):
            params = [q for q in params if q.grad is not None]
            if params:
                norm = self.accelerator.clip_grad_norm_(params, clip)
                out[f"grad/{name}_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        return out

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self.collect()
        t1 = time.perf_counter()
        upd = self.update(batch)
        metrics = {**batch["metrics"], **upd, "time/update": time.perf_counter() - t1}
        metrics["time/step"] = time.perf_counter() - t0
        metrics["lr/actor"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        metrics = self._reduce(metrics)
        self.history.append(metrics)
        self.last_batch = {"responses": batch["responses"][:8], "scores": batch["scores"][:8].tolist()}
        return metrics

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, examples: list[dict] | None = None) -> dict[str, float]:
        from tre_edu.evaluation import evaluate

        cfg = self.config
        examples = self.eval_examples if examples is None else examples
        out: dict[str, float] = {}
        runs = []
        if cfg.eval.greedy:
            runs.append(("greedy", 0.0, 1.0))
        if cfg.eval.sampled:
            runs.append(("sampled", cfg.eval.temperature, cfg.eval.top_p))
        for name, temperature, top_p in runs:
            g = torch.Generator().manual_seed(cfg.seed * 31 + self.step)
            with self._rollout_context():
                res = evaluate(
                    self.actor,
                    self.tokenizer,
                    self.task,
                    examples,
                    style=cfg.task.style,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=cfg.ppo.max_new_tokens,
                    batch_size=cfg.eval.batch_size,
                    generator=g,
                )
            out[f"eval/{name}_accuracy"] = float(res["accuracy"])
            out[f"eval/{name}_reward"] = float(res["mean_reward"])
        out = self._reduce(out)
        self.eval_history.append({"step": self.step, **out})
        for cb in self.callbacks:
            cb.on_evaluate(self, self.step, out)
        return out

    # ---- the loop -----------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None, resume_from: str | Path | None = None) -> list[dict[str, float]]:
        """Run PPO until ``steps`` (default ``config.ppo.steps``) steps are done; evaluate and checkpoint on the way."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        total = cfg.ppo.steps if steps is None else steps
        for cb in self.callbacks:
            cb.on_train_begin(self)
        if self.step == 0 and cfg.eval.every >= 0 and not self.eval_history:
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

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Everything needed to continue exactly: weights, optimiser, scheduler, RNGs, data position, history."""
        path = Path(path) if path is not None else self.checkpoint_dir()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            state = {
                "policy": self.unwrapped.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
                "sampling_generator": self.sampling_generator.get_state(),
                "stream": self.stream.state_dict(),
                "step": self.step,
                "history": self.history,
                "eval_history": self.eval_history,
            }
            torch.save(state, path / "trainer_state.pt")
            self.config.save(path / "config.yaml")
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        if path.name == "latest" or path == self.output_dir:
            path = latest_checkpoint(self.output_dir)
        file = path / "trainer_state.pt"
        if not file.is_file():
            raise FileNotFoundError(f"no checkpoint at {path} (expected {file.name})")
        state = torch.load(file, map_location="cpu", weights_only=False)
        self.unwrapped.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.sampling_generator.set_state(state["sampling_generator"])
        self.stream.load_state_dict(state["stream"])
        self.step = state["step"]
        self.history = state["history"]
        self.eval_history = state["eval_history"]

    def save_pretrained(self, path: str | Path) -> Path:
        """The actor and tokenizer in Hugging Face format (load with ``from_pretrained`` or ``tre-edu eval``)."""
        path = Path(path)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.actor.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            summary = {"step": self.step, "eval": self.eval_history[-1] if self.eval_history else {}}
            (path / "tre_edu_run.json").write_text(json.dumps(summary, indent=2))
        return path


def latest_checkpoint(output_dir: str | Path) -> Path:
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("step_*"))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints under {output_dir}/checkpoints")
    return ckpts[-1]


def summarize(history: list[dict[str, float]], keys: list[str] | None = None) -> dict[str, float]:
    """Mean of the last 10% of steps for each key (a robust 'final' value)."""
    if not history:
        return {}
    tail = history[-max(1, math.ceil(len(history) / 10)) :]
    keys = keys or sorted(tail[-1])
    return {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}
