"""The FSDP path of the 8-GPU config, executed: two CPU processes (gloo) launched with ``accelerate launch
--config_file configs/accelerate/fsdp_8gpu.yaml --num_processes 2`` (the shipped file, only the process count
changed) train the tiny Countdown recipe at test size with sharded parameters.

One launch runs three trainers one after the other in the same two processes:

1. data parallel (DDP, the same launch with FSDP switched off): 2 PPO steps, the reference;
2. FSDP: 2 PPO steps with a sharded checkpoint after each; evaluation before the first step and at the end;
3. FSDP resumed from the step-1 checkpoint of run 2 in fresh trainers, trained to step 2.

The test checks that run 2 really is sharded (FSDP2 units per decoder layer, each rank holds half of every
parameter), that sampling ran on whole parameters and training on shards, that run 2's weights and metrics equal the
DDP run's to float tolerance, that the checkpoint is sharded (one file per rank, no whole weights) and resumes to
bit-identical weights, and that ``final/`` holds the whole weights.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import SMALL

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "countdown_tiny.yaml"
ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "fsdp_8gpu.yaml"
N_LAYER = 1  # SMALL's model.n_layer
OVERRIDES = [*SMALL, "ppo.steps=2", "regularizer.kind=tre-k", "regularizer.coef=0.001", "device=cpu", "threads=1"]

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from accelerate.state import AcceleratorState
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from tre_edu import distributed
    from tre_edu.config import load_config
    from tre_edu.head import find_lean_head
    from tre_edu.pipeline import build_trainer

    out, config, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])


    def build(name, *extra):
        return build_trainer(load_config(config, [*overrides, f"output_dir={out}/{name}", *extra]), progress=False)


    def whole_weights(trainer):  # every rank calls; rank 0 gets the whole weights
        full = distributed.full_state_dict(trainer.policy)
        if full is None:
            full = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
        return full


    def shard_info(trainer):
        params = list(trainer.unwrapped.parameters())
        return {
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "full_numel": sum(p.numel() for p in params),
        }


    record, weights = {}, {}
    # 1. the reference: the same launch, data parallel
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    ddp = build("ddp")
    record["ddp"] = {"type": str(ddp.accelerator.distributed_type), "history": ddp.train()}
    weights["ddp"] = whole_weights(ddp)
    del ddp
    AcceleratorState._reset_state()  # the process group stays; the next Accelerator reads the FSDP plugin again
    os.environ["ACCELERATE_USE_FSDP"] = "true"

    # 2. FSDP, uninterrupted, a sharded checkpoint after every step
    fsdp = build("fsdp", "checkpoint_every=1")
    calls, gathered = [], []  # per call of the actor: [inside full_parameters?, KV-cached?, every parameter whole?]
    full_parameters = distributed.full_parameters

    def watched(*args, **kwargs):
        inner = full_parameters(*args, **kwargs)

        class Watch:
            def __enter__(self):
                inner.__enter__()
                gathered.append(1)

            def __exit__(self, *exc):
                gathered.pop()
                return inner.__exit__(*exc)

        return Watch()

    distributed.full_parameters = watched

    def pre_forward(module, args, kwargs):
        whole = not any(isinstance(p, DTensor) for p in module.parameters())
        calls.append([bool(gathered), bool(kwargs.get("use_cache")), whole])

    fsdp.actor.register_forward_pre_hook(pre_forward, with_kwargs=True)
    head, head_calls = find_lean_head(fsdp.actor), []  # per call: [statistics (not logits)?, its weight whole?]
    if head is not None:
        vocab = head.weight.shape[0]
        head.register_forward_hook(
            lambda m, args, out: head_calls.append([out.shape[-1] < vocab, not isinstance(m.weight, DTensor)])
        )
    before = shard_info(fsdp)
    units = [type(m).__name__ for m in fsdp.unwrapped.modules() if isinstance(m, FSDPModule)]
    history = fsdp.train()
    record["fsdp"] = {
        "type": str(fsdp.accelerator.distributed_type),
        "version": distributed.fsdp_version(fsdp.policy),
        "units": units,
        "before": before,
        "after": shard_info(fsdp),
        "calls": calls,
        "head": head is not None,
        "head_calls": head_calls,
        "history": history,
        "eval_steps": [e["step"] for e in fsdp.eval_history],
    }
    weights["fsdp"] = whole_weights(fsdp)
    del fsdp

    # 3. FSDP resumed from the step-1 checkpoint, in fresh trainers
    resumed = build("resumed", "checkpoint_every=1")
    history = resumed.train(resume_from=f"{out}/fsdp/checkpoints/step_000001")
    record["resumed"] = {"history": history, "type": str(resumed.accelerator.distributed_type)}
    weights["resumed"] = whole_weights(resumed)

    rank = resumed.accelerator.process_index
    record["rank"], record["world"] = rank, resumed.accelerator.num_processes
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(record, f)
    if rank == 0:
        torch.save(weights, f"{out}/weights.pt")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_fsdp_two_cpu_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
        "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(script), str(tmp_path), str(CONFIG), json.dumps(OVERRIDES),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"two FSDP processes: {time.perf_counter() - t0:.1f} s")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    w = torch.load(tmp_path / "weights.pt", weights_only=True)

    # the launch ran the shipped config: 2 processes, FSDP2, one unit per decoder layer plus the root
    assert r0["world"] == r1["world"] == 2
    assert "MULTI_CPU" in r0["ddp"]["type"]
    for r in (r0, r1):
        f = r["fsdp"]
        assert "FSDP" in f["type"] and "FSDP" in r["resumed"]["type"] and f["version"] == 2
        assert len(f["units"]) == 1 + N_LAYER and f["units"][0] == "FSDPActorCritic"
        # every parameter is a DTensor and each rank holds about half of the elements, before and after training
        for info in (f["before"], f["after"]):
            assert info["all_dtensor"] and info["local_numel"] < 0.6 * info["full_numel"]
        # sampling and evaluation ran inside full_parameters on whole parameters, the training forwards on shards
        inside = [(cached, whole) for gathered, cached, whole in f["calls"] if gathered]
        outside = [(cached, whole) for gathered, cached, whole in f["calls"] if not gathered]
        assert inside and all(whole for _, whole in inside), "a call under full_parameters saw sharded parameters"
        assert any(cached for cached, _ in inside) and not any(cached for cached, _ in outside), "sampled on shards"
        assert outside and not any(whole for _, whole in outside), "a training forward saw whole decoder layers"
        # the memory-lean head (in the LM head's place) computed the training statistics, on its whole weight
        assert f["head"] and any(stats for stats, _ in f["head_calls"])
        assert all(whole for _, whole in f["head_calls"]), "the lean head ran on a sharded weight"
        assert f["eval_steps"] == [0, 2]  # evaluation before the first step (no forward yet) and at the end
    assert (
        r0["fsdp"]["before"]["local_numel"] + r1["fsdp"]["before"]["local_numel"]
        == (r0["fsdp"]["before"]["full_numel"])
    )

    # FSDP trains as DDP does: the same samples and rewards, metrics and weights equal to float tolerance
    ddp, fsdp = r0["ddp"]["history"], r0["fsdp"]["history"]
    assert len(ddp) == len(fsdp) == 2
    for d, f in zip(ddp, fsdp):
        for k in ("reward/mean", "response/length_mean"):
            assert f[k] == d[k], k
        for k in ("policy/loss", "grad/actor_norm", "grad/critic_norm", "loss/total"):
            assert f[k] == pytest.approx(d[k], rel=1e-4, abs=1e-6), k
    assert w["fsdp"].keys() == w["ddp"].keys()
    for k in w["ddp"]:
        assert w["fsdp"][k].shape == w["ddp"][k].shape, k
        torch.testing.assert_close(w["fsdp"][k], w["ddp"][k], rtol=1e-5, atol=1e-6, msg=k)
    moved = max(float((w["fsdp"][k] - w["ddp"][k]).abs().max()) for k in w["ddp"])
    print(f"max |FSDP - DDP| over all weights after 2 steps: {moved:.2e}")

    # the checkpoint is sharded: one file per rank plus DCP's metadata, and no whole weights in trainer_state.pt
    from tre_edu import checkpoint

    folder = tmp_path / "fsdp" / "checkpoints" / "step_000001"
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (folder / "rank_0.pt").is_file() and (folder / "rank_1.pt").is_file()
    state = checkpoint.load(folder)
    assert "policy" not in state and "optimizers" not in state
    # ... and resuming from it reproduces the uninterrupted run exactly
    resumed, uninterrupted = r0["resumed"]["history"][-1], r0["fsdp"]["history"][-1]
    assert resumed.keys() == uninterrupted.keys()
    assert {k: v for k, v in resumed.items() if not k.startswith("time/")} == {
        k: v for k, v in uninterrupted.items() if not k.startswith("time/")
    }
    for k in w["fsdp"]:
        assert torch.equal(w["resumed"][k], w["fsdp"][k]), k

    # final/ holds the whole actor (Hugging Face format), equal to the gathered weights
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert saved
    for k, v in saved.items():
        assert torch.equal(v, w["fsdp"]["actor." + k]), k


class _RankZeroOfTwo:
    """An accelerator stand-in for the file logic of a checkpoint: rank 0 of 2 processes, nothing to wait for."""

    num_processes, process_index, is_main_process = 2, 0, True

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model


def test_checkpoint_killed_before_its_rank_files_moved_in_is_completed_on_load(tmp_path):
    from tre_edu import checkpoint, distributed

    acc, path = _RankZeroOfTwo(), tmp_path / "checkpoints" / "step_000001"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    own = {"sampling_generator": torch.Generator().manual_seed(7).get_state()}
    weights = distributed.save_weights(acc, path, model, {"actor": opt}, own)
    checkpoint.save(path, weights)  # rank 0's folder is complete; the run dies before finish_save
    assert not (path / "rank_0.pt").exists()

    with torch.no_grad():
        model.weight.zero_()
    state = checkpoint.load(path)
    got = distributed.load_weights(acc, path, state, model, {"actor": opt})
    assert torch.equal(got["sampling_generator"], own["sampling_generator"])
    assert (path / "rank_0.pt").is_file() and not distributed._staging(path).exists()
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k

    # a rank the checkpoint has no file for (saved by fewer processes) continues from rank 0's RNG states
    (path / "rank_0.pt").unlink()
    with pytest.warns(UserWarning, match="rank_0.pt"):
        assert distributed.load_weights(acc, path, state, model, {"actor": opt}) == {}
