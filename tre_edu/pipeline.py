"""The composition root: a config in, objects and whole jobs out (``tre-edu``, the notebooks and the study use it).

    cfg -> build_components(cfg) -> Components(task, tokenizer, policy, train/eval examples, regularizer, sampler)
        -> PPOTrainer(cfg, **components) -> train()

This is the only module that reads a :class:`~tre_edu.config.TrainConfig` to decide *which* objects to build; the
trainer, the warm start and the evaluation receive objects.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

from tre_edu import checkpoint, preflight
from tre_edu.config import RewardModelConfig, TrainConfig
from tre_edu.evaluation import evaluate
from tre_edu.models import hub, tiny
from tre_edu.policy import ActorCritic
from tre_edu.regularizers import Regularizer
from tre_edu.reward_model import build_tiny_reward_model, fit, pair_accuracy
from tre_edu.sft import warm_start
from tre_edu.tasks import Task, get_task
from tre_edu.tasks.hh import HHTask, corpus
from tre_edu.trainer import JSONLLogger, PPOTrainer, TensorBoardLogger, summarize
from tre_edu.vllm_rollout import VLLMRollout

# what a run writes into its output_dir (``overwrite`` removes exactly these)
RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "config_history.yaml", "checkpoints", "final",
             "warm_start", "tensorboard")  # fmt: skip


@dataclass
class Components:
    """Everything a :class:`~tre_edu.trainer.PPOTrainer` is made of."""

    policy: ActorCritic
    tokenizer: Any
    task: Task
    train_examples: list[dict]
    eval_examples: list[dict]
    regularizer: Regularizer
    sampler: Any = None


def setup_runtime(cfg: TrainConfig) -> None:
    """Threads and seeds (Python, NumPy, torch), once per job."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)


def build_task(cfg: TrainConfig) -> Task:
    return get_task(cfg.task.name, **cfg.task.options)


def build_actor(cfg: TrainConfig, source: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, causal LM): from ``source`` (a saved directory), else ``cfg.init_from``, else ``cfg.model.name``
    (``tiny``: a freshly initialised tiny model with ``model.tail_tokens`` tail tokens)."""
    m = cfg.model
    source = source or cfg.init_from or (None if m.name == "tiny" else m.name)
    if source is None:
        tokenizer = tiny.build_tokenizer(tail_tokens=m.tail_tokens)
        actor = tiny.build_tiny_model(
            tokenizer, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, n_positions=m.n_positions, seed=cfg.seed
        )
        return tokenizer, actor.to(hub.torch_dtype(m.dtype))
    return hub.load_pretrained(source, m.dtype)


def build_policy(cfg: TrainConfig, actor: Any) -> ActorCritic:
    """The actor plus a value head, or the paper's separate critic initialised from the same weights; the actor alone
    for ``ppo.advantage: grpo`` (no critic)."""
    critic = copy.deepcopy(actor) if cfg.model.critic == "separate" and cfg.ppo.advantage == "gae" else None
    policy = ActorCritic(actor, critic=critic, value_head=cfg.ppo.advantage == "gae", lean_head=cfg.ppo.lean_head)
    if cfg.model.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy


def build_sampler(cfg: TrainConfig, tokenizer: Any, actor: Any) -> VLLMRollout | None:
    """The vLLM engine for ``ppo.rollout_backend: vllm`` (None: the library's own sampler)."""
    if cfg.ppo.rollout_backend != "vllm":
        return None
    state = PartialState()
    source = cfg.init_from or (None if cfg.model.name == "tiny" else hub.resolve(cfg.model.name))
    if source is None:  # a freshly built tiny model: vLLM loads from a directory
        source = str(Path(cfg.output_dir) / f"vllm_init_rank{state.process_index}")
        actor.save_pretrained(source)
        tokenizer.save_pretrained(source)
    mp, dt = cfg.ppo.mixed_precision, cfg.model.dtype
    dtype = "bfloat16" if "bf16" in (mp, dt) or dt == "bfloat16" else "float16" if "fp16" in (mp, dt) else dt
    return VLLMRollout(
        source,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype=dtype,
        gpu_memory_utilization=cfg.ppo.vllm_gpu_memory_utilization,
        seed=cfg.seed * 1000 + state.process_index,
        distributed=state.num_processes > 1,
    )


def build_components(cfg: TrainConfig, task: Task | None = None, actor: tuple[Any, Any] | None = None) -> Components:
    """Turn a config into the trainer's objects. ``task`` / ``actor`` = (tokenizer, model) reuse objects built
    already (e.g. by the warm start of the same job)."""
    task = task or build_task(cfg)
    tokenizer, model = actor or build_actor(cfg)
    vocab, p = model.get_output_embeddings().weight.shape[0], cfg.ppo
    return Components(
        policy=build_policy(cfg, model),
        tokenizer=tokenizer,
        task=task,
        train_examples=task.load("train", n=cfg.task.train_size, seed=cfg.seed),
        eval_examples=task.load("test", n=cfg.task.eval_size, seed=cfg.seed),
        regularizer=Regularizer(cfg.regularizer, clip_low=p.clip_low, clip_high=p.clip_high, vocab_size=vocab),
        sampler=build_sampler(cfg, tokenizer, model),
    )


def build_trainer(
    cfg: TrainConfig, *, task: Task | None = None, actor=None, log_jsonl: bool = True, callbacks=None, **trainer_kwargs
) -> PPOTrainer:
    """Builds the components and returns a ready :class:`~tre_edu.trainer.PPOTrainer`; seeds (and sets threads) first
    when it builds the model itself (``actor`` None), so a given ``actor`` (a warm start of this job) is seeded once.
    The main process logs every step to ``output_dir/metrics.jsonl`` (``log_jsonl``) and, with ``cfg.tensorboard``,
    to TensorBoard, besides the given ``callbacks``."""
    if actor is None:
        setup_runtime(cfg)
    c = build_components(cfg, task, actor)
    callbacks = list(callbacks or [])
    if PartialState(cpu=cfg.device == "cpu").is_main_process:  # cpu: as the trainer's Accelerator (gloo processes)
        callbacks += [JSONLLogger(Path(cfg.output_dir) / "metrics.jsonl")] if log_jsonl else []
        callbacks += [TensorBoardLogger(Path(cfg.output_dir) / "tensorboard")] if cfg.tensorboard else []
    return PPOTrainer(cfg, c.policy, c.tokenizer, c.task, c.train_examples, c.eval_examples, c.regularizer,
                      sampler=c.sampler, callbacks=callbacks, tail_start=tiny.tail_start(c.tokenizer),
                      **trainer_kwargs)  # fmt: skip


def _warm_start(cfg: TrainConfig, task: Task, output_dir: Path, progress: bool, callback) -> tuple[Any, Any, dict]:
    tokenizer, actor = build_actor(cfg)
    t0 = time.perf_counter()
    train = task.load("train", n=cfg.sft.examples, seed=cfg.seed)
    held_out = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    kw = {k: getattr(cfg.sft, k) for k in ("steps", "seconds", "batch_size", "lr", "eval_every")}
    kw.update(style=cfg.task.style, seed=cfg.seed, progress=progress, callback=callback)
    history = warm_start(actor, tokenizer, task, train, eval_cfg=cfg.eval, eval_examples=held_out, **kw)
    final = history[-1] if history else {}
    summary = {"output_dir": str(output_dir), "seconds": round(time.perf_counter() - t0, 1), "final": final}
    with checkpoint.atomic_folder(output_dir, "warm start") as tmp:  # complete (marked) or absent, never half
        actor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sft_history.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return tokenizer, actor, {"summary": summary, "history": history}


def run_warm_start(cfg: TrainConfig, output_dir: str | Path, progress: bool = True, callback=None) -> dict[str, Any]:
    """Supervised warm start of ``cfg.model`` on solver-made solutions, saved to ``output_dir``.

    Returns ``{"summary": ..., "history": [...]}``; the summary records the held-out greedy accuracy reached.
    """
    setup_runtime(cfg)
    return _warm_start(cfg, build_task(cfg), Path(output_dir), progress, callback)[2]


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder: a non-empty ``out`` needs ``resume`` (continue it) or ``overwrite``
    (remove what a run wrote there: :data:`RUN_FILES`)."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run in output_dir, or replace it")
    held = sorted(p.name for p in out.iterdir() if p.name != checkpoint.LOCK_FILE) if out.is_dir() else []
    if held and not (resume or overwrite):
        raise ValueError(
            f"output_dir {out} is not empty (it holds {', '.join(held[:4])}); "
            "pass --resume to continue that run or --overwrite to replace it, or choose another --output-dir"
        )
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    callbacks=None,
    progress: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """The main job: a warm start (when ``sft.enabled`` and no ``init_from``), then PPO; returns a summary.

    ``resume`` continues from the newest complete checkpoint in ``output_dir`` (or from the start when there is
    none) with the settings it was trained with, other ones only with ``allow_config_change``
    (:func:`~tre_edu.preflight.check_resume`); a non-empty ``output_dir`` needs ``resume`` or ``overwrite``. The
    ``output_dir`` is locked for the run (a second run into it is refused, naming this one's pid), and what the
    config, task and model can tell is checked before any work (:mod:`tre_edu.preflight`).
    """
    out = Path(cfg.output_dir)
    lock = checkpoint.DirectoryLock(out, "output_dir")
    with lock if PartialState(cpu=cfg.device == "cpu").is_main_process else contextlib.nullcontext():
        prepare_output_dir(out, resume, overwrite)
        t0 = time.perf_counter()
        task, actor, sft_summary = build_task(cfg), None, None
        warm_dir = out / "warm_start"
        changes = preflight.check_resume(cfg, out, allow_config_change) if resume else []
        warm = cfg.sft.enabled and cfg.init_from is None
        checked = preflight.check_run(cfg, task, warm_start=warm and not checkpoint.warm_start_complete(warm_dir))
        if warm:  # seeded once here; build_trainer then reuses the actor
            setup_runtime(cfg)
            if checkpoint.warm_start_complete(warm_dir):  # one cut short (no marker) is done again, never trusted
                actor = build_actor(cfg, str(warm_dir))
            else:
                tokenizer, model, res = _warm_start(cfg, task, warm_dir, progress, None)
                actor, sft_summary = (tokenizer, model), res["summary"]
        note = f"resumed with other settings: {'; '.join(changes)}" if changes else ""
        checkpoint.write_config(out, cfg.to_yaml(), note)
        trainer = build_trainer(cfg, task=task, actor=actor, callbacks=callbacks, progress=progress)
        if not checked:  # a hub model: checked now that it is loaded, before the first step
            examples = trainer.train_examples + trainer.eval_examples
            preflight.check_built(cfg, task, trainer.tokenizer, trainer.actor, examples)
        has_checkpoint = bool(checkpoint.complete_checkpoints(out))
        if resume and not has_checkpoint:
            checkpoint.truncate_jsonl(trainer.metrics_file, -1)  # nothing to continue from: start the log afresh
        t1 = time.perf_counter()
        history = trainer.train(resume_from="latest" if resume and has_checkpoint else None)
        train_keys = ["reward/mean", "tail/mass_outside_top10", "tail/top1_prob", "entropy/global"]
        summary = {
            "output_dir": str(out),
            "regularizer": cfg.regularizer.kind,
            "coef": cfg.regularizer.coef,
            "steps": trainer.step,
            "skipped_updates": trainer.skipped_updates,
            "seconds_total": round(time.perf_counter() - t0, 1),
            "seconds_ppo": round(time.perf_counter() - t1, 1),
            "eval_start": trainer.eval_history[0] if trainer.eval_history else {},
            "eval_final": trainer.eval_history[-1] if trainer.eval_history else {},
            "train_last10pct": summarize(history, train_keys),
            "data_source": data_source(trainer.train_examples),
        }
        if sft_summary is not None:
            summary["warm_start"] = sft_summary
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary, "trainer": trainer, "history": history}


def data_source(examples: list[dict]) -> str:
    """Which data the examples came from (a hub dataset, the bundled sample, generated puzzles)."""
    return ",".join(sorted({str(e.get("source", "?")) for e in examples}))


def run_eval(cfg: TrainConfig, model_dir: str | Path, n: int | None = None) -> dict[str, Any]:
    """Greedy accuracy and the paper's sampled pass@1 (and whatever ``cfg.eval`` enables) of a saved model."""
    setup_runtime(cfg)
    task = build_task(cfg)
    tokenizer, model = build_actor(cfg, str(model_dir))
    examples = task.load("test", n=n or cfg.task.eval_size, seed=cfg.seed)
    preflight.check_built(cfg, task, tokenizer, model, examples, source=str(model_dir))
    res = evaluate(model, tokenizer, task, examples, cfg.eval, style=cfg.task.style,
                   max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed)  # fmt: skip
    return {"model_dir": str(model_dir), "n": len(examples), "data_source": data_source(examples), **res}


def train_reward_model(cfg: RewardModelConfig, offline_ok: bool = True) -> dict[str, Any]:
    """``tre-edu train-rm``: train ``cfg.model`` on the ``cfg.source`` pairs of the HH task
    (:func:`tre_edu.reward_model.fit`) and report the pair accuracy (r_chosen > r_rejected)."""
    task = HHTask(source=cfg.source)
    train = task.load("train", n=cfg.n_train, seed=cfg.seed, offline_ok=offline_ok)
    test = task.load("test", n=cfg.n_test, seed=cfg.seed, offline_ok=offline_ok)
    model = None
    if cfg.model == "tiny":  # the vocabulary covers the test pairs' words too
        model = build_tiny_reward_model(corpus(train + test), max_length=min(cfg.max_length, 1024), seed=cfg.seed)
    rm = fit(train, cfg, model)
    return {
        "source": train[0]["source"],
        "dataset": train[0]["dataset"],
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": pair_accuracy(rm, train),
        "test_accuracy": pair_accuracy(rm, test),
        "final_loss": rm.history[-1]["loss"] if rm.history else float("nan"),
        "output_dir": cfg.output_dir,
    }
