"""Optional vLLM rollout backend (``ppo.rollout_backend: vllm``; ``pip install tre_edu[vllm]``, CUDA only).

The paper sampled its rollouts with vLLM (verl, tensor parallel 2). A :class:`VLLMRollout` holds a copy of the actor
in a ``vllm.LLM`` and gives the trainer the same :class:`~tre_edu.rollout.Rollout` as
:func:`tre_edu.rollout.generate` (prompts left-padded, responses right-padded, the stop token included and masked
in); ``sync_weights(actor)`` copies the actor's weights into the engine after each PPO update. vLLM's log-probs come
from its own kernels and differ slightly from the training forward, so the trainer recomputes ``old_logprobs`` with
the actor when this backend is on (as verl does).

Status: written against vLLM's documented API (``LLM``, ``SamplingParams``, token-id prompts, ``LLM.collective_rpc``;
the V0 ``driver_worker`` path as a fallback) and NOT run here: vLLM cannot be installed on the CPU machines this
library is developed on; the pure parts are unit-tested with stand-ins. Known limits: tensor parallel 1 per
process; the engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so weights are handed over without
copies between processes; with several processes (``accelerate launch``) each holds its own engine on its own GPU
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
    """A CPU :class:`~tre_edu.rollout.Rollout` from vLLM ``RequestOutput`` objects (one per prompt, same order), of
    which the first completion's ``token_ids`` (stop token included) and ``logprobs`` (a dict per token, or None)
    are read; ``R`` = the longest response (at least 1)."""
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_token_id)
    completions = [o.outputs[0] for o in outputs]
    B, R = len(prompts), max([1] + [len(c.token_ids) for c in completions])
    response = torch.full((B, R), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.bool)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    outside = torch.zeros((B, R), dtype=torch.bool)
    for i, c in enumerate(completions):
        tokens = list(c.token_ids)
        if tokens:
            response[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            response_mask[i, : len(tokens)] = True
        for t, (tok, step) in enumerate(zip(tokens, c.logprobs or [])):
            logprobs[i, t], outside[i, t] = _token_logprob(step, tok)
    input_ids, attention_mask = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask, response_mask.long()], 1)
    return Rollout(input_ids, attention_mask, prompt_ids.shape[1], response, response_mask, logprobs, outside)


def _load_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker (``LLM.collective_rpc``): load ``weights`` into its model."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=weights)
    return len(weights)


def load_weights_into(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Load ``(name, tensor)`` pairs (Hugging Face names) into the model inside a ``vllm.LLM``, by
    ``llm.collective_rpc`` (V1 engine) or the V0 ``driver_worker``; returns which path was used. Then the prefix
    cache is reset: its keys / values were computed with the old weights."""
    weights = list(weights)
    if hasattr(llm, "collective_rpc"):
        llm.collective_rpc(_load_on_worker, args=(weights,))
        path = "collective_rpc"
    else:
        worker = llm.llm_engine.model_executor.driver_worker
        _load_on_worker(getattr(worker, "worker", worker), weights)  # WorkerWrapperBase -> Worker in some versions
        path = "driver_worker"
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    return path


class VLLMRollout:
    """A vLLM engine holding a copy of the actor (``model``: its hub id or directory), sampling
    :class:`~tre_edu.rollout.Rollout` batches.

    ``pad_token_id`` / ``eos_token_id``: the trainer's tokenizer's (padding; an extra stop token).
    ``gpu_memory_utilization``: the share of the GPU vLLM may take (weights + KV cache); the rest is training's.
    ``distributed``: several processes each hold an engine (``accelerate launch``). ``llm_kwargs`` go to
    ``vllm.LLM`` (e.g. ``max_model_len``, ``enforce_eager``).
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
        self._vllm = import_vllm()
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
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
        self.llm = self._vllm.LLM(**{**kwargs, **llm_kwargs})

    def sampling_params(self, cfg: SamplingConfig) -> Any:
        """``vllm.SamplingParams`` for a :class:`~tre_edu.rollout.SamplingConfig`: one sample per prompt,
        ``logprobs=2`` (the top-2 tokens and the sampled one), no per-request seed (repeated prompts differ)."""
        stop = {"stop_token_ids": [self.eos_token_id]} if self.eos_token_id is not None else {}
        return self._vllm.SamplingParams(
            n=1,
            temperature=float(cfg.temperature),  # 0 = greedy in vLLM too
            top_p=float(cfg.top_p),
            top_k=cfg.top_k if cfg.top_k > 0 else -1,  # -1 = off
            max_tokens=cfg.max_new_tokens,
            logprobs=TOP_K_OUTSIDE,
            **stop,
        )

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
        """Copy the actor's current weights (a model or a state dict) into the engine (the ``_orig_mod.`` prefixes of
        ``torch.compile`` and ``module.`` of DDP removed, leaving Hugging Face names)."""
        state = actor.state_dict() if hasattr(actor, "state_dict") else dict(actor)
        weights = [(name.removeprefix("_orig_mod.").removeprefix("module."), t.detach()) for name, t in state.items()]
        return load_weights_into(self.llm, weights)
