"""Held-out evaluation: the one loop behind the trainer, the warm start and ``tre-edu eval``.

Up to three generation passes over the same examples, through the sampler of the PPO rollouts
(:func:`tre_edu.rollout.generate`), so evaluation sees exactly what training sees:

- greedy (temperature 0): ``greedy_accuracy``, ``greedy_reward``;
- sampled, the paper's validation (one sample at ``eval.temperature`` = 1, ``eval.top_p`` = 0.7): ``sampled_accuracy``
  (pass@1 of a sampled answer), ``sampled_reward``;
- exploration (``eval.pass_k`` = n > 0 samples per example at ``eval.temperature``, top_p 1): ``pass@k`` for k = 1,
  2, 4, ..., n with the unbiased estimator of Chen et al. (2021) ``pass@k = mean_i [1 - C(n - c_i, k) / C(n, k)]``
  (c_i correct samples of example i), and the task's :meth:`~tre_edu.tasks.base.Task.sample_metrics` (Countdown:
  ``distinct_correct``, the mean number of distinct correct equations per solved example).

Tail metrics (``eval.tail_metrics``) are measured where the rollouts come from, at top_p 1 (a top_p 0.7 sample
would cut the very tail they measure): on the exploration samples, or with ``pass_k`` = 0 on one extra sample per
example. ``tail_response_frac``: the fraction of those responses with a tail token (only with a known tail); at
every sampled position of one response per example, from the model's temperature-1 distribution,
``mass_outside_top10``, ``mass_outside_nucleus`` (p = 0.99), ``entropy_global`` (H = -sum pi log pi) and
``entropy_tre`` (TRE-K, K = 2, rescaled by log V / log 2).

A response succeeds when its score is ``>= task.success_threshold``; a task whose threshold is None (e.g. a reward
model) gets rewards only. NaN / +inf logits raise ValueError (in the sampler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from tre_edu.head import StatsRequest
from tre_edu.policy import response_stats
from tre_edu.rollout import SamplingConfig, decode_responses, generate

_TAIL_REQUEST = StatsRequest(metrics=True, metrics_top_k=2, metrics_p=0.99)
# tre_edu.entropy.tail_metrics key -> evaluation key
_TAIL_KEYS = {
    "tail/mass_outside_top10": "mass_outside_top10",
    "tail/mass_outside_nucleus_p99": "mass_outside_nucleus",
    "entropy/global": "entropy_global",
    "entropy/tre_k": "entropy_tre",
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n - c, k) / C(n, k)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _sample(model, tokenizer, prompts, sampling, batch_size, generator, progress, desc, tail=0, first=None):
    """Generate for every prompt; returns (texts, tail flag per response or None, tail metrics). The tail
    metrics (``tail`` = s > 0) come from a teacher-forced forward over every s-th response (s = n for n samples per
    prompt: one per prompt, the cost of one sample): the model's temperature-1 distribution at each of its sampled
    positions, averaged over tokens. ``first``: the first tail-token id (None: no tail-token counts)."""
    texts: list[str] = []
    has_tail: list[bool] = []
    sums: dict[str, float] = {}
    tokens = 0
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=not progress):
        ids = tokenizer(prompts[s : s + batch_size], add_special_tokens=False)["input_ids"]
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        ro = generate(model, ids, sampling, eos_token_id=eos, pad_token_id=pad, generator=generator)
        texts += decode_responses(tokenizer, ro)
        if first is not None:
            has_tail += ((ro.response >= first) & ro.response_mask).any(-1).tolist()
        rows = [i for i in range(len(ids)) if (s + i) % tail == 0] if tail else []
        if rows:
            ro_ids, ro_attn, ro_mask = ro.input_ids[rows], ro.attention_mask[rows], ro.response_mask[rows]
            stats = response_stats(model, ro_ids, ro_attn, ro.response_len, _TAIL_REQUEST, mask=ro_mask)
            n = int(ro_mask.sum())
            for k, v in stats.metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n
            tokens += n
    metrics = {_TAIL_KEYS[k]: v / tokens for k, v in sums.items() if k in _TAIL_KEYS} if tokens else {}
    return texts, (has_tail if first is not None else None), metrics


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Any,
    examples: list[dict[str, Any]],
    eval_cfg: Any,
    *,
    style: str,
    max_new_tokens: int,
    seed: int = 0,
    greedy: bool | None = None,
    sampled: bool | None = None,
    progress: bool = False,
    tail_start: int | None = None,
) -> dict[str, float]:
    """Evaluate ``model`` on ``examples`` (see the module docstring for the passes and the keys).

    ``eval_cfg``: a :class:`~tre_edu.config.EvalConfig` or any object with its attributes (``greedy``, ``sampled``,
    ``temperature``, ``top_p``, ``batch_size``, ``pass_k``, ``tail_metrics``); ``greedy`` / ``sampled`` None: its
    setting. ``seed`` seeds the sampled and exploration passes (same seed, same samples). ``tail_start``: the first
    id of the vocabulary tail (the tiny model's :func:`~tre_edu.models.tiny.tail_start`), for
    ``tail_response_frac``; None: not counted. Each key is present when its pass ran (accuracies, pass@k and
    distinct_correct only when the task has a success threshold). No examples: ``{}``.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    greedy = eval_cfg.greedy if greedy is None else greedy
    sampled = eval_cfg.sampled if sampled is None else sampled
    n_pass, want_tail, bs = eval_cfg.pass_k, eval_cfg.tail_metrics, eval_cfg.batch_size
    threshold = task.success_threshold
    examples = list(examples)
    if not examples:
        return {}
    prompts = [task.prompt(e, tokenizer, style) for e in examples]
    out: dict[str, float] = {}

    def run(desc: str, prompts: list[str], temperature: float, top_p=1.0, offset=None, tail=0) -> list[str]:
        """One pass (seeded by ``seed + offset``; None: greedy); with ``tail`` > 0 it records the tail metrics."""
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        g = None if offset is None else torch.Generator().manual_seed(seed + offset)
        first = tail_start if tail else None
        texts, has_tail, metrics = _sample(model, tokenizer, prompts, cfg, bs, g, progress, desc, tail, first)
        out.update(metrics)
        if has_tail is not None:
            out["tail_response_frac"] = sum(has_tail) / len(has_tail)
        return texts

    def score(name: str, texts: list[str]) -> None:
        rewards = [float(r) for r in task.reward(texts, examples)]
        out[f"{name}_reward"] = sum(rewards) / len(rewards)
        if threshold is not None:
            out[f"{name}_accuracy"] = sum(r >= threshold for r in rewards) / len(rewards)

    with torch.no_grad():
        if greedy:
            score("greedy", run("eval greedy", prompts, 0.0))
        if sampled:
            score("sampled", run("eval sampled", prompts, eval_cfg.temperature, eval_cfg.top_p, offset=0))
        if want_tail and n_pass == 0:  # one sample per example where the rollouts come from (top_p 1)
            run("eval tail", prompts, eval_cfg.temperature, offset=2, tail=1)
        if n_pass > 0:
            reps = [p for p in prompts for _ in range(n_pass)]
            texts = run(f"eval pass@{n_pass}", reps, eval_cfg.temperature, offset=1, tail=n_pass if want_tail else 0)
            rewards = [float(r) for r in task.reward(texts, [e for e in examples for _ in range(n_pass)])]
            if threshold is not None:
                correct = [sum(r >= threshold for r in rewards[i : i + n_pass]) for i in range(0, len(rewards), n_pass)]
                for k in sorted({2**i for i in range(n_pass.bit_length()) if 2**i <= n_pass} | {n_pass}):
                    out[f"pass@{k}"] = sum(pass_at_k(n_pass, c, k) for c in correct) / len(correct)
                out.update(task.sample_metrics(texts, rewards, n_pass))
    return out


__all__ = ["evaluate", "pass_at_k"]
