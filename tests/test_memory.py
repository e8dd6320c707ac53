"""The dry-run memory arithmetic: parameter counts of the Qwen2.5 shapes, sharding, offload, phases."""

from pathlib import Path

import pytest

from tre_edu.config import load_config
from tre_edu.memory import KNOWN_SHAPES, count_params, estimate_memory, shape_of

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"


def _cfg(task="math", model="qwen2.5-1.5b", overrides=None):
    return load_config([f"{PAPER}/{task}.yaml", f"{PAPER}/models/{model}.yaml"], overrides)


@pytest.mark.parametrize(
    "name,billions",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.494),  # the model cards: 0.49 B, 1.54 B, 3.09 B, 7.61 B
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.544),
        ("Qwen/Qwen2.5-3B-Instruct", 3.086),
        ("Qwen/Qwen2.5-7B-Instruct", 7.616),
    ],
)
def test_parameter_counts_match_the_model_cards(name, billions):
    assert count_params(KNOWN_SHAPES[name]) / 1e9 == pytest.approx(billions, rel=0.003)


def test_shape_lookup_accepts_short_names_and_the_tiny_model():
    cfg = load_config(None, ["model.name=Qwen2.5-7B-Instruct"])
    assert shape_of(cfg)["vocab"] == 152064
    tiny = load_config(None, ["model.tail_tokens=1000"])
    assert shape_of(tiny)["vocab"] == 1032 and shape_of(tiny)["gpt2"]


def test_unknown_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, [f"model.name={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="cannot estimate memory"):
        estimate_memory(cfg)


def test_sharding_divides_the_parameter_rows():
    cfg = _cfg(model="qwen2.5-7b")
    one, eight, ddp = (
        estimate_memory(cfg),
        estimate_memory(cfg, processes=8),
        estimate_memory(cfg, 8, fsdp=False),
    )
    P = one.params
    # actor + separate critic, fp32 master + fp32 grads + two fp32 Adam moments + a bf16 compute copy: 18
    # bytes
    state = ["weights (compute copy)", "fp32 master weights", "gradients (fp32)", "AdamW moments (x2)"]
    assert sum(one.rows[k] for k in state) == pytest.approx(2 * P * 18 / 1024**3)
    assert sum(eight.rows[k] for k in state) == pytest.approx(2 * P * 18 / 8 / 1024**3)
    assert ddp.rows["AdamW moments (x2)"] == one.rows["AdamW moments (x2)"]
    assert one.total_gib > 200  # 7B needs FSDP
    assert "FSDP full shard over 8" in eight.report() and "no sharding" in ddp.report()


def test_lean_head_counts_a_chunk_not_the_logits():
    lean = estimate_memory(_cfg(model="qwen2.5-7b", overrides=["regularizer.kind=tre-p"]), processes=8)
    fat = estimate_memory(_cfg(model="qwen2.5-7b", overrides=["ppo.lean_head=false"]), processes=8)
    # with the paper's actor micro-batch of 4 responses of 8,192 tokens the fp32 logits alone are ~56 GiB
    assert fat.rows["logits of a micro-batch (4 x 8192 x 152064)"] > 50
    assert not any(k.startswith("logits") for k in lean.rows)
    chunk = lean.rows["LM head, one chunk (441 x 152064, ppo.lean_head)"]
    assert chunk == pytest.approx(441 * 152064 * (2 + 12) / 1024**3)  # bf16 + 3 fp32 buffers
    assert lean.rows["LM head weight in the autocast dtype (152064 x 3584)"] == pytest.approx(
        152064 * 3584 * 2 / 1024**3
    )
    assert lean.rows["TRE trust regions (4 x 8192 x 256)"] == pytest.approx(4 * 8192 * 256 * 12 / 1024**3)
    assert lean.total_gib < fat.total_gib - 40
    # without the lean head the training phase does not fit, and the note says which setting to change
    (note,) = [n for n in fat.notes if "does not fit" in n]
    assert "set ppo.lean_head=true" in note


@pytest.mark.parametrize("task", ["math", "countdown", "hh"])
@pytest.mark.parametrize("model", ["qwen2.5-1.5b", "qwen2.5-7b"])
@pytest.mark.parametrize("method", ["tre-k", "tre-p"])
def test_paper_recipes_fit_80gb_or_name_the_setting(task, model, method):
    cfg = load_config([f"{PAPER}/{task}.yaml", f"{PAPER}/methods/{method}.yaml", f"{PAPER}/models/{model}.yaml"])
    est = estimate_memory(cfg, processes=8)
    if est.fits(80):
        assert not any("does not fit" in n for n in est.notes)
        return
    (note,) = [n for n in est.notes if "does not fit" in n]
    overrides = note.split(": set ")[1].split(" (")[0].split()  # key=value overrides, usable on the command line
    fixed = load_config(
        [f"{PAPER}/{task}.yaml", f"{PAPER}/methods/{method}.yaml", f"{PAPER}/models/{model}.yaml"], overrides
    )
    assert estimate_memory(fixed, processes=8).fits(80)


def test_offload_moves_state_to_cpu():
    cfg = _cfg(model="qwen2.5-7b")
    on, off = estimate_memory(cfg, 8, offload=True), estimate_memory(cfg, 8)
    assert on.cpu_gib > 0 and on.total_gib < off.total_gib
    assert "total CPU (offloaded)" in on.report()


def test_peak_is_held_plus_the_larger_phase():
    est = estimate_memory(_cfg())
    held = sum(v for k, v in est.rows.items() if k not in est.phase)
    train = sum(v for k, v in est.rows.items() if est.phase.get(k) == "train")
    sample = sum(v for k, v in est.rows.items() if est.phase.get(k) == "sample")
    assert est.total_gib == pytest.approx(held + max(train, sample))
    assert est.fits(1e6) and not est.fits(1.0)


def test_rollout_batch_size_bounds_the_kv_cache():
    small = estimate_memory(_cfg(overrides=["ppo.rollout_batch_size=8"]))
    large = estimate_memory(_cfg(overrides=["ppo.rollout_batch_size=64"]))
    kv = lambda e: next(v for k, v in e.rows.items() if k.startswith("KV cache"))  # noqa: E731
    assert kv(large) == pytest.approx(8 * kv(small))
    vllm = estimate_memory(_cfg(overrides=["ppo.rollout_backend=vllm"]), gpu_gib=80)
    assert vllm.rows["vLLM engine (weights + KV pool)"] == pytest.approx(0.4 * 80)


def test_logits_row_is_b_r_v_fp32_three_copies():
    est = estimate_memory(_cfg(overrides=["ppo.micro_batch_size=2", "ppo.lean_head=false"]))
    key = "logits of a micro-batch (2 x 8192 x 151936)"
    assert est.rows[key] == pytest.approx(2 * 8192 * 151936 * 4 * 3 / 1024**3)


def test_bad_processes_is_a_value_error():
    with pytest.raises(ValueError, match="processes"):
        estimate_memory(_cfg(), processes=0)
