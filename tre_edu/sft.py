"""Supervised warm start on solver-made solutions (the tiny model's "pretraining").

PPO needs a policy that sometimes succeeds: a randomly initialised model never writes a valid equation, so
every reward is 0 and there is no signal. The warm start trains the model to imitate the task's reference
responses (for Countdown: the solver's simplest solution, in exactly the format the reward checker accepts),
with the cross-entropy on the response tokens only:

    loss = - (1 / N) * sum_{b, t: response token} log pi(y_{b,t} | prompt_b, y_{b,<t})      (token mean)

The held-out greedy accuracy, measured as it trains, lets a notebook stop at a policy with headroom for PPO.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tre_edu.config import EvalConfig
from tre_edu.evaluation import evaluate
from tre_edu.policy import response_logits


def make_sft_example(
    task: Any,
    example: dict[str, Any],
    tokenizer: Any = None,
    think: bool | None = None,
    style: str = "compact",
) -> dict[str, str]:
    """``{"prompt": text, "response": text}`` for one example: the task's prompt and its reference response, exactly
    what the reward checker accepts (Countdown: ``<think>[trace]</think><answer>EQ</answer>``; ``think`` None: the
    task's setting). The end of sequence is added at encoding time (:func:`encode_sft_example`), not in the text."""
    if not hasattr(task, "reference_response"):
        raise ValueError(f"task {getattr(task, 'name', task)!r} has no reference responses for a warm start")
    return {"prompt": task.prompt(example, tokenizer, style), "response": task.reference_response(example, think)}


def encode_sft_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + [eos]); no special tokens are added to the prompt (as in the PPO rollouts)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def collate(pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad ``prompt + response`` so that every response ends at the last position: ``input_ids`` (B, L),
    ``attention_mask`` (B, L), ``labels`` (B, R) = the last R tokens and ``label_mask`` (B, R) float, 1 on response
    tokens; R is the longest response, so the logits needed are the last R + 1 positions only (positions come from
    the mask, as in the rollouts and PPO)."""
    seqs = [p + r for p, r in pairs]
    length = max(len(s) for s in seqs)
    resp_len = max(len(r) for _, r in pairs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    label_mask = torch.zeros((len(seqs), resp_len))
    for i, ((_, r), s) in enumerate(zip(pairs, seqs)):
        input_ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, length - len(s) :] = 1
        label_mask[i, resp_len - len(r) :] = 1.0
    return input_ids, attention_mask, input_ids[:, length - resp_len :], label_mask


def sft_loss(model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Token-mean cross-entropy on the response tokens of a :func:`collate` batch:
    ``-(1/N) sum log softmax(z_t)[y_t]`` over response tokens (logits only where needed)."""
    input_ids, attention_mask, labels, label_mask = (t.to(model.device) for t in batch)
    logits, _ = response_logits(model, input_ids, attention_mask, labels.shape[1])
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return (nll.view_as(label_mask) * label_mask).sum() / label_mask.sum().clamp(min=1.0)


def warm_start(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: list[dict[str, Any]],
    *,
    eval_cfg: EvalConfig | None = None,
    steps: int | None = 600,
    seconds: float | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 20,
    grad_clip: float = 1.0,
    think: bool | None = None,
    style: str = "compact",
    seed: int = 0,
    eval_examples: list[dict[str, Any]] | None = None,
    eval_every: int = 100,
    log_every: int = 10,
    progress: bool = True,
    callback: Callable[[dict[str, Any]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on ``task``'s reference responses for ``examples``; return the history.

    Stops after ``steps`` optimiser steps or ``seconds`` of training time (evaluation excluded), whichever comes
    first; at least one must be given. AdamW with a linear warm-up over ``warmup_steps``, then a constant rate.
    With ``eval_examples``: the held-out greedy accuracy every ``eval_every`` steps and at the end (``eval_cfg``'s
    batch size). ``callback`` gets each history record as it is made (live plots).

    Returns records ``{"step", "seconds" (training time), "wall_seconds", "loss"}``; evaluation records also have
    ``"accuracy"`` and ``"mean_reward"``. The last record is the final state (with ``"accuracy"`` whenever
    ``eval_examples`` is given). The model is left in eval mode.
    """
    if steps is None and seconds is None:
        raise ValueError("steps and seconds must not both be None: give a step count, a time budget or both")
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be None or an integer >= 0; got {steps!r}")
    if seconds is not None and not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds must be None or a finite number > 0; got {seconds!r}")
    for name, value in (("batch_size", batch_size), ("eval_every", eval_every), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    pairs = []
    for example in examples:
        try:
            texts = make_sft_example(task, example, tokenizer, think, style)
        except ValueError:  # an unsolvable puzzle has no reference response
            continue
        pairs.append(encode_sft_example(tokenizer, texts["prompt"], texts["response"]))
    if not pairs:
        raise ValueError("examples must contain at least one example with a reference response; got none")
    max_new_tokens = max(len(r) for _, r in pairs) + 8  # evaluation budget: a little more than the longest answer
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    history: list[dict[str, Any]] = []
    model.train()
    order = torch.randperm(len(pairs), generator=gen).tolist()
    cursor, step, train_time, wall_start = 0, 0, 0.0, time.perf_counter()
    bar = tqdm(total=steps, desc="warm start", unit="step", disable=not progress)
    eval_cfg = eval_cfg or EvalConfig()

    def record(step: int, loss: float | None, evaluate_now: bool) -> None:
        wall = round(time.perf_counter() - wall_start, 3)
        rec: dict[str, Any] = {"step": step, "seconds": round(train_time, 3), "wall_seconds": wall, "loss": loss}
        if evaluate_now and eval_examples:
            res = evaluate(model, tokenizer, task, eval_examples, eval_cfg, style=style,
                           max_new_tokens=max_new_tokens, seed=seed, greedy=True, sampled=False)  # fmt: skip
            model.train()
            rec |= {"accuracy": res["greedy_accuracy"], "mean_reward": res["greedy_reward"]}
            rec["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
        history.append(rec)
        bar.set_postfix({k: rec[k] for k in ("loss", "accuracy") if rec.get(k) is not None})
        if callback is not None:
            callback(rec)

    loss_value: float | None = None  # None until the first step
    running: list[float] = []
    try:
        while (steps is None or step < steps) and (seconds is None or train_time < seconds):
            t0 = time.perf_counter()
            if cursor + batch_size > len(order):  # a new epoch: reshuffle
                order = torch.randperm(len(pairs), generator=gen).tolist()
                cursor = 0
            batch = collate([pairs[i] for i in order[cursor : cursor + batch_size]], tokenizer.pad_token_id)
            cursor += batch_size
            for group in optimizer.param_groups:  # linear warm-up, then constant
                group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
            loss = sft_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            running.append(loss.item())
            train_time += time.perf_counter() - t0
            bar.update(1)
            if step % log_every == 0 or step % eval_every == 0:
                loss_value = sum(running) / len(running)
                running = []
                record(step, loss_value, evaluate_now=step % eval_every == 0)
        if running:
            loss_value = sum(running) / len(running)
        if not history or history[-1]["step"] != step or (eval_examples and "accuracy" not in history[-1]):
            record(step, loss_value, evaluate_now=True)
    finally:
        bar.close()
    model.eval()
    return history


__all__ = ["collate", "encode_sft_example", "make_sft_example", "sft_loss", "warm_start"]
