"""Held-out evaluation: greedy accuracy and the paper's sampled pass@1.

The paper validates with one sample per prompt at temperature 1.0, top_p 0.7 (pass@1 of a sampled answer);
greedy decoding (temperature 0) is the low-noise number the CPU notebooks plot. Both go through the same
sampling loop as the PPO rollouts (:func:`tre_edu.rollout.generate`), so evaluation sees exactly what training
sees.
"""

from __future__ import annotations

from typing import Any

import torch


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: list[dict[str, Any]],
    *,
    style: str = "compact",
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    num_samples: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate one response per example and score it with ``task.reward``.

    Args:
        model: a Hugging Face causal LM (the actor); it is put in eval mode for the call and restored after.
        tokenizer: its tokenizer; prompts are encoded without special tokens, as in training.
        task: a :class:`~tre_edu.tasks.base.Task`; ``task.prompt(example, tokenizer, style)`` makes the
        prompts.
        examples: the puzzles / problems.
        temperature: 0.0 means greedy decoding; > 0 samples (the paper's validation: 1.0 with ``top_p=0.7``).
        batch_size: prompts per generation call.
        generator: the random generator for sampling (reproducible evaluations).
        num_samples: how many (prompt, response, reward) triples to return in ``"samples"``.

    Returns:
        ``{"accuracy": fraction of rewards >= 1 (for 0/1 rewards: the success rate), "mean_reward", "n",
        "rewards": list of per-example rewards, "samples": [{"prompt", "response", "reward"}, ...]}``.
    """
    from tre_edu.rollout import SamplingConfig, decode_responses, generate

    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    examples = list(examples)
    if not examples:
        return {"accuracy": 0.0, "mean_reward": 0.0, "n": 0, "rewards": [], "samples": []}

    prompts = [task.prompt(e, tokenizer, style) for e in examples]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p))
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        batches = range(0, len(prompts), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="evaluate", leave=False)
        for start in batches:
            ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
            with torch.no_grad():
                rollout = generate(
                    model,
                    ids,
                    cfg,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    generator=generator,
                )
            responses.extend(decode_responses(tokenizer, rollout))
    finally:
        model.train(was_training)

    rewards = [float(r) for r in task.reward(responses, examples)]
    n = len(rewards)
    samples = [
        {"prompt": p, "response": r, "reward": w} for p, r, w in list(zip(prompts, responses, rewards))[:num_samples]
    ]
    return {
        "accuracy": sum(r >= 1.0 for r in rewards) / n,
        "mean_reward": sum(rewards) / n,
        "n": n,
        "rewards": rewards,
        "samples": samples,
    }


__all__ = ["evaluate"]
