"""Whole jobs behind the ``tre-edu`` command and the notebooks: warm start, PPO training, evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tre_edu.config import TrainConfig


def _task(cfg: TrainConfig):
    from tre_edu.tasks import get_task

    return get_task(cfg.task.name, **cfg.task.options)


def run_warm_start(cfg: TrainConfig, output_dir: str | Path, progress: bool = True, callback=None) -> dict[str, Any]:
    """Supervised warm start of the model in ``cfg.model`` on solver-made solutions; saves it to ``output_dir``.

    Returns ``{"summary": ..., "history": [...]}``; the summary records the held-out greedy accuracy reached.
    """
    import torch

    from tre_edu.models.hub import build_tokenizer_and_actor
    from tre_edu.sft import warm_start
    from tre_edu.trainer import set_seed

    cfg = cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    task = _task(cfg)
    tokenizer, actor = build_tokenizer_and_actor(cfg.model, None, seed=cfg.seed)
    train = task.load("train", n=cfg.sft.examples, seed=cfg.seed)
    evals = task.load("test", n=cfg.task.eval_size, seed=cfg.seed)
    t0 = time.perf_counter()
    history = warm_start(
        actor,
        tokenizer,
        task,
        train,
        steps=cfg.sft.steps,
        seconds=cfg.sft.seconds,
        batch_size=cfg.sft.batch_size,
        lr=cfg.sft.lr,
        style=cfg.task.style,
        seed=cfg.seed,
        eval_examples=evals,
        eval_every=cfg.sft.eval_every,
        progress=progress,
        callback=callback,
    )
    seconds = time.perf_counter() - t0
    output_dir = Path(output_dir)
    actor.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    final = history[-1] if isinstance(history, list) and history else {}
    summary = {"output_dir": str(output_dir), "seconds": round(seconds, 1), "final": final}
    (output_dir / "sft_history.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return {"summary": summary, "history": history}


def run_training(cfg: TrainConfig, resume: bool = False, callbacks=None, progress: bool = True) -> dict[str, Any]:
    """The main job: (warm start when ``sft.enabled`` and no ``init_from``) then PPO; returns a summary."""
    from tre_edu.trainer import PPOTrainer, latest_checkpoint, summarize

    cfg = cfg.validate()
    out = Path(cfg.output_dir)
    t0 = time.perf_counter()
    sft_summary = None
    if cfg.sft.enabled and cfg.init_from is None:
        warm_dir = out / "warm_start"
        if not (warm_dir / "config.json").is_file():
            sft_summary = run_warm_start(cfg, warm_dir, progress=progress)["summary"]
        cfg = cfg.replace({"init_from": str(warm_dir)})
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    trainer = PPOTrainer(cfg, callbacks=callbacks, progress=progress)
    resume_from = None
    if resume:
        try:
            resume_from = latest_checkpoint(out)
        except FileNotFoundError:
            resume_from = None
    t1 = time.perf_counter()
    history = trainer.train(resume_from=resume_from)
    summary = {
        "output_dir": str(out),
        "regularizer": cfg.regularizer.kind,
        "coef": cfg.regularizer.coef,
        "steps": trainer.step,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "seconds_ppo": round(time.perf_counter() - t1, 1),
        "eval_start": trainer.eval_history[0] if trainer.eval_history else {},
        "eval_final": trainer.eval_history[-1] if trainer.eval_history else {},
        "train_last10pct": summarize(
            history, ["reward/mean", "tail/mass_outside_top10", "tail/top1_prob", "entropy/global"]
        ),
        "data_source": _source(trainer.train_examples),
    }
    if sft_summary is not None:
        summary["warm_start"] = sft_summary
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary, "trainer": trainer, "history": history}


def _source(examples: list[dict]) -> str:
    return ",".join(sorted({str(e.get("source", "?")) for e in examples}))


def run_eval(cfg: TrainConfig, model_dir: str | Path, n: int | None = None) -> dict[str, Any]:
    """Greedy accuracy and the paper's sampled pass@1 of a saved model on held-out examples."""
    import torch

    from tre_edu.evaluation import evaluate
    from tre_edu.models.hub import load_causal_lm, load_tokenizer

    cfg = cfg.validate()
    task = _task(cfg)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), cfg.model.dtype)
    examples = task.load("test", n=n or cfg.task.eval_size, seed=cfg.seed)
    out: dict[str, Any] = {"model_dir": str(model_dir), "n": len(examples), "data_source": _source(examples)}
    for name, temperature, top_p in (("greedy", 0.0, 1.0), ("sampled", cfg.eval.temperature, cfg.eval.top_p)):
        res = evaluate(
            model,
            tokenizer,
            task,
            examples,
            style=cfg.task.style,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=cfg.ppo.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        out[f"{name}_accuracy"] = res["accuracy"]
        out[f"{name}_reward"] = res["mean_reward"]
    return out
