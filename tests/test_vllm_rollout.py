"""The optional vLLM backend: a clear error without vLLM, and the pure parts (outputs -> Rollout, weight sync)
checked with stand-ins (vLLM itself needs a CUDA GPU and is not installed here)."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from tre_edu.vllm_rollout import VLLM_MISSING, VLLMRollout, load_weights_into, outputs_to_rollout

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(HAS_VLLM, reason="vLLM and a GPU are present: the error path cannot be reached")
def test_missing_vllm_gives_a_clear_import_error():
    with pytest.raises(ImportError, match=r"pip install tre_edu\[vllm\]"):
        VLLMRollout("Qwen/Qwen2.5-0.5B-Instruct", pad_token_id=0)
    assert "CUDA GPU" in VLLM_MISSING


def _lp(logprob, rank=None):
    return SimpleNamespace(logprob=logprob, rank=rank)


def _output(tokens, steps):
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=steps)])


def test_outputs_to_rollout_pads_like_the_library_sampler():
    prompts = [[5, 6, 7], [8]]
    outputs = [
        _output([1, 2], [{1: _lp(-0.1, 1), 3: _lp(-2.5, 2)}, {2: _lp(-4.0, 7), 1: _lp(-0.2, 1), 3: _lp(-1.9, 2)}]),
        _output([4, 9, 0], [{4: _lp(-0.5)}, {9: _lp(-0.7), 1: _lp(-0.3), 2: _lp(-0.6)}, {0: _lp(-0.05)}]),
    ]
    ro = outputs_to_rollout(prompts, outputs, pad_token_id=0)
    assert ro.prompt_len == 3 and ro.response_len == 3
    assert ro.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 4, 9, 0]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert ro.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert torch.allclose(ro.logprobs, torch.tensor([[-0.1, -4.0, 0.0], [-0.5, -0.7, -0.05]]))
    # rank 7 > 2 -> outside; without ranks: token 9 (-0.7) is below the top-2 (-0.3, -0.6) -> outside
    assert ro.outside_topk.tolist() == [[False, True, False], [False, True, False]]


def test_outputs_to_rollout_rejects_a_count_mismatch():
    with pytest.raises(ValueError, match="outputs"):
        outputs_to_rollout([[1], [2]], [_output([1], None)], pad_token_id=0)


class _Model:
    def __init__(self):
        self.loaded = None

    def load_weights(self, weights):
        self.loaded = dict(weights)


def test_weight_sync_uses_collective_rpc_and_resets_the_prefix_cache():
    model = _Model()
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
    calls = []

    class LLM:
        def collective_rpc(self, fn, args=()):
            return [fn(worker, *args)]

        def reset_prefix_cache(self):
            calls.append("reset")

    w = [("model.embed_tokens.weight", torch.ones(2, 2))]
    assert load_weights_into(LLM(), w) == "collective_rpc"
    assert torch.equal(model.loaded["model.embed_tokens.weight"], torch.ones(2, 2)) and calls == ["reset"]


def test_weight_sync_falls_back_to_the_v0_driver_worker():
    model = _Model()
    llm = SimpleNamespace(
        llm_engine=SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )
    )
    assert load_weights_into(llm, [("lm_head.weight", torch.zeros(1))]) == "driver_worker"
    assert "lm_head.weight" in model.loaded
