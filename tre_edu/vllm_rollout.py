"""Optional vLLM rollout backend (``ppo.rollout_backend: vllm``; ``pip install tre_edu[vllm]``, CUDA only).

The paper sampled its rollouts with vLLM (verl, tensor parallel 2). This module gives the trainer the same
:class:`~tre_edu.rollout.Rollout` as :func:`tre_edu.rollout.generate`, produced by a ``vllm.LLM`` that holds a
copy of the actor:

1. ``VLLMRollout(model_path, ...)`` starts an engine on the actor's checkpoint (a hub id or a directory).
2. ``generate(prompts, SamplingConfig)`` samples one response per token-id prompt with
   ``SamplingParams(temperature, top_p, top_k, max_tokens, logprobs=2)``; the response tokens, their log-probs
   and whether each sampled token lay outside the model's top 2 go into a ``Rollout`` (prompts left-padded,
   responses right-padded, the stop token included and masked in, exactly like the library's sampler).
3. ``sync_weights(actor)`` copies the actor's current weights into the engine after each PPO update (the
   model's own ``load_weights``, which takes Hugging Face parameter names) and clears vLLM's prefix cache,
   whose keys and values belong to the old weights.

vLLM computes log-probs with its own kernels; they differ slightly from the training forward, so the trainer
recomputes ``old_logprobs`` with the actor when this backend is on (as verl does).

Status: written against vLLM's documented API (``LLM``, ``SamplingParams``, token-id prompts
``{"prompt_token_ids": [...]}``, ``LLM.collective_rpc``; the V0 ``llm_engine.model_executor.driver_worker``
path as a fallback) and NOT run here: vLLM cannot be installed on the CPU machines this library is developed
on. The pure parts (converting outputs to a ``Rollout``, the weight-sync dispatch, the error without vLLM) are
unit-tested with stand-ins. Known limits: tensor parallel 1 per process; the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so weights are handed over without copies between processes; with
several processes (``accelerate launch``) each process holds its own engine on its own GPU
(``distributed_executor_backend="external_launcher"``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from tre_edu.rollout import Rollout, SamplingConfig, pad_prompts

VLLM_MISSING = "the vLLM backend needs `pip install tre_edu[vllm]` and a CUDA GPU"
TOP_K_OUTSIDE = 2  # Rollout.outside_topk: the sampled token is not among the model's 2 most likely tokens

__all__ = ["VLLM_MISSING", "VLLMRollout", "import_vllm", "load_weights_into", "outputs_to_rollout"]


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to get it (the package and a CUDA GPU)."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{VLLM_MISSING} (import failed: {err})") from err
    if not torch.cuda.is_available():
        raise ImportError(f"{VLLM_MISSING} (vllm is installed but no CUDA device is visible)")
    return vllm


def _token_logprob(step: dict, token: int) -> tuple[float, bool]:
    """(log-prob of the sampled ``token``, outside the top 2) from one step of vLLM's logprobs: a dict
    ``token id -> Logprob(logprob, rank, decoded_token)`` holding the top-2 tokens and the sampled one."""
    entry = step[token]
    lp = float(entry.logprob if hasattr(entry, "logprob") else entry)
    rank = getattr(entry, "rank", None)
    if rank is not None:  # 1-based rank of the sampled token in the model's distribution
        return lp, int(rank) > TOP_K_OUTSIDE
    best = sorted(step.items(), key=lambda kv: -float(getattr(kv[1], "logprob", kv[1])))[:TOP_K_OUTSIDE]
    return lp, token not in {k for k, _ in best}


def outputs_to_rollout(prompts: list[list[int]], outputs: list[Any], pad_token_id: int) -> Rollout:
    """Turn vLLM ``RequestOutput`` objects (one per prompt, same order) into a
    :class:`~tre_edu.rollout.Rollout`.

    Each output's first completion ``outputs[0]`` has ``token_ids`` (the response, stop token included) and
    ``logprobs`` (one dict per token, or None). Shapes: ``input_ids`` / ``attention_mask`` ``(B, P+R)``,
    ``response`` / ``response_mask`` / ``logprobs`` / ``outside_topk`` ``(B, R)``, ``R`` = the longest
    response (at least 1); tensors on CPU.
    """
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_token_id)
    completions = [o.outputs[0] for o in outputs]
    R = max([1] + [len(c.token_ids) for c in completions])
    B = len(prompts)
    response = torch.full((B, R), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.bool)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    outside = torch.zeros((B, R), dtype=torch.bool)
    for i, c in enumerate(completions):
        tokens = list(c.token_ids)
        n = len(tokens)
        if n == 0:
            continue
        response[i, :n] = torch.tensor(tokens, dtype=torch.long)
        response_mask[i, :n] = True
        if c.logprobs is not None:
            for t, (tok, step) in enumerate(zip(tokens, c.logprobs)):
                logprobs[i, t], outside[i, t] = _token_logprob(step, tok)
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_len=prompt_ids.shape[1],
        response=response,
        response_mask=response_mask,
        logprobs=logprobs,
        outside_topk=outside,
    )


def _hf_weights(actor_or_state: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs with Hugging Face names from a model or a state dict (the ``_orig_mod.``
    prefixes of ``torch.compile`` and ``module.`` prefixes of DDP removed)."""
    state = actor_or_state.state_dict() if hasattr(actor_or_state, "state_dict") else dict(actor_or_state)
    out = []
    for name, tensor in state.items():
        for prefix in ("_orig_mod.", "module."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out.append((name, tensor.detach()))
    return out


def _load_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker (``LLM.collective_rpc``): load ``weights`` into its model."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=weights)
    return len(weights)


def load_weights_into(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Load ``(name, tensor)`` pairs into the model inside a ``vllm.LLM``; returns which path was used.

    Newer vLLM (V1 engine): ``llm.collective_rpc(fn, args=...)`` runs ``fn(worker, ...)`` on each worker.
    Older vLLM (V0): ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)``.
    Afterwards the prefix cache is reset (its keys / values were computed with the old weights).
    """
    weights = list(weights)
    if hasattr(llm, "collective_rpc"):
        llm.collective_rpc(_load_on_worker, args=(weights,))
        path = "collective_rpc"
    else:
        worker = llm.llm_engine.model_executor.driver_worker
        worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> Worker in some versions
        _load_on_worker(worker, weights)
        path = "driver_worker"
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    return path


class VLLMRollout:
    """A vLLM engine holding a copy of the actor, sampling :class:`~tre_edu.rollout.Rollout` batches.

    Args:
        model: hub id or directory of the actor's checkpoint (architecture, tokenizer and initial weights).
        pad_token_id, eos_token_id: the trainer's tokenizer's ids (padding; an extra stop token).
        dtype: engine dtype ("bfloat16", "float16", "float32").
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache); the rest is
        training's.
        seed: engine seed (different per process).
        distributed: True when several processes each hold an engine (``accelerate launch``): uses vLLM's
            ``external_launcher`` executor, tensor parallel 1.
        llm_kwargs: passed to ``vllm.LLM`` (e.g. ``max_model_len``, ``enforce_eager``).
    """

    def __init__(
        self,
        model: str,
        *,
        pad_token_id: int,
        eos_token_id: int | None = None,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.4,
        seed: int = 0,
        distributed: bool = False,
        **llm_kwargs: Any,
    ):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {gpu_memory_utilization!r}")
        # In-process engine: the weights can be handed to the worker without a copy between processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        self._vllm = vllm
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        kwargs: dict[str, Any] = dict(
            model=str(model),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            tensor_parallel_size=1,
            enable_prefix_caching=True,
        )
        if distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)

    def sampling_params(self, cfg: SamplingConfig) -> Any:
        """``vllm.SamplingParams`` for a :class:`~tre_edu.rollout.SamplingConfig` (one sample per prompt;
        ``logprobs=2`` returns the top-2 tokens and the sampled one; no per-request seed, so the samples of
        repeated prompts differ)."""
        kwargs: dict[str, Any] = dict(
            n=1,
            temperature=float(cfg.temperature),  # 0 = greedy in vLLM too
            top_p=float(cfg.top_p),
            top_k=cfg.top_k if cfg.top_k > 0 else -1,  # -1 = off
            max_tokens=cfg.max_new_tokens,
            logprobs=TOP_K_OUTSIDE,
        )
        if self.eos_token_id is not None:
            kwargs["stop_token_ids"] = [self.eos_token_id]
        return self._vllm.SamplingParams(**kwargs)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: SamplingConfig) -> Rollout:
        """One response per token-id prompt (``B`` lists), as a CPU :class:`~tre_edu.rollout.Rollout`."""
        if not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, self.sampling_params(cfg), use_tqdm=False)
        return outputs_to_rollout(prompts, list(outputs), self.pad_token_id)

    @torch.no_grad()
    def sync_weights(self, actor: Any) -> str:
        """Copy the actor's current weights (a model or a state dict with Hugging Face names) into the
        engine."""
        return load_weights_into(self.llm, _hf_weights(actor))
