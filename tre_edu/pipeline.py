"""The composition root: a config in, objects and whole jobs out (``tre-edu``, the notebooks and the study use it).

    cfg -> build_components(cfg) -> Components(task, tokenizer, policy, train/eval examples, regularizer, sampler)
        -> PPOTrainer(cfg, **components) -> train()

This is the only module that reads a :class:`~tre_edu.config.TrainConfig` to decide *which* objects to build; the
trainer, the warm start and the evaluation receive objects.
"""

from __future__ import annotations

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

from tre_edu import checkpoint
from tre_edu.config import TrainConfig
from tre_edu.evaluation import evaluate
from tre_edu.models import hub, tiny
from tre_edu.policy import ActorCritic
from tre_edu.regularizers import Regularizer
from tre_edu.sft import warm_start
from tre_edu.tasks import Task, get_task
from tre_edu.trainer import PPOTrainer, summarize
from tre_edu.vllm_rollout import VLLMRollout

# what a run writes into its output_dir (``overwrite`` removes exactly these)
RUN_FILES = ("metrics.jsonl", "summary.json", "config.yaml", "checkpoints", "final", "warm_start", "tensorboard")


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
    """The actor plus a value head, or the paper's separate critic initialised from the same weights."""
    critic = copy.deepcopy(actor) if cfg.model.critic == "separate" else None
    policy = ActorCritic(actor, critic=critic, value_head=True)
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
    p = cfg.ppo
    return Components(
        policy=build_policy(cfg, model),
        tokenizer=tokenizer,
        task=task,
        train_examples=task.load("train", n=cfg.task.train_size, seed=cfg.seed),
        eval_examples=task.load("test", n=cfg.task.eval_size, seed=cfg.seed),
        regularizer=Regularizer(cfg.regularizer, clip_low=p.clip_low, clip_high=p.clip_high),
        sampler=build_sampler(cfg, tokenizer, model),
    )


def build_trainer(cfg: TrainConfig, *, task: Task | None = None, actor=None, **trainer_kwargs) -> PPOTrainer:
    """Builds the components and returns a ready :class:`~tre_edu.trainer.PPOTrainer`; seeds (and sets threads) first
    when it builds the model itself (``actor`` None), so a given ``actor`` (a warm start of this job) is seeded once."""
    if actor is None:
        setup_runtime(cfg)
    c = build_components(cfg, task, actor)
    return PPOTrainer(cfg, c.policy, c.tokenizer, c.task, c.train_examples, c.eval_examples, c.regularizer,
                      sampler=c.sampler, **trainer_kwargs)  # fmt: skip


def _warm_start(cfg: TrainConfig, task: Task, output_dir: Path, progress: bool, callback) -> tuple[Any, Any, dict]:
    tokenizer, actor = build_actor(cfg)
    s = cfg.sft
    t0 = time.perf_counter()
    history = warm_start(
        actor,
        tokenizer,
        task,
        task.load("train", n=s.examples, seed=cfg.seed),
        eval_cfg=cfg.eval,
        steps=s.steps,
        seconds=s.seconds,
        batch_size=s.batch_size,
        lr=s.lr,
        style=cfg.task.style,
        seed=cfg.seed,
        eval_examples=task.load("test", n=cfg.task.eval_size, seed=cfg.seed),
        eval_every=s.eval_every,
        progress=progress,
        callback=callback,
    )
    actor.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    final = history[-1] if history else {}
    summary = {"output_dir": str(output_dir), "seconds": round(time.perf_counter() - t0, 1), "final": final}
    (output_dir / "sft_history.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
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
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise ValueError(
            f"output_dir {out} is not empty (it holds {', '.join(sorted(p.name for p in out.iterdir())[:4])}); "
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
    cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks=None, progress: bool = True
) -> dict[str, Any]:
    """The main job: a warm start (when ``sft.enabled`` and no ``init_from``), then PPO; returns a summary.

    ``resume`` continues from the newest complete checkpoint in ``output_dir`` (or from the start when there is
    none); a non-empty ``output_dir`` needs ``resume`` or ``overwrite``.
    """
    out = Path(cfg.output_dir)
    prepare_output_dir(out, resume, overwrite)
    t0 = time.perf_counter()
    task, actor, sft_summary = build_task(cfg), None, None
    warm_dir = out / "warm_start"
    if cfg.sft.enabled and cfg.init_from is None:  # seeded once here; build_trainer then reuses the actor
        setup_runtime(cfg)
        if (warm_dir / "config.json").is_file():
            actor = build_actor(cfg, str(warm_dir))
        else:
            tokenizer, model, res = _warm_start(cfg, task, warm_dir, progress, None)
            actor, sft_summary = (tokenizer, model), res["summary"]
    (out / "config.yaml").write_text(cfg.to_yaml())
    trainer = build_trainer(cfg, task=task, actor=actor, callbacks=callbacks, progress=progress)
    has_checkpoint = bool(checkpoint.complete_checkpoints(out))
    if resume and not has_checkpoint:
        checkpoint.truncate_jsonl(trainer.metrics_file, -1)  # nothing to continue from: start the log afresh
    t1 = time.perf_counter()
    history = trainer.train(resume_from="latest" if resume and has_checkpoint else None)
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
        "train_last10pct": summarize(
            history, ["reward/mean", "tail/mass_outside_top10", "tail/top1_prob", "entropy/global"]
        ),
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
    res = evaluate(model, tokenizer, task, examples, cfg.eval, style=cfg.task.style,
                   max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed)  # fmt: skip
    return {"model_dir": str(model_dir), "n": len(examples), "data_source": data_source(examples), **res}
