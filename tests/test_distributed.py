"""Two CPU processes through Accelerate (MULTI_CPU, gloo; launched with torchrun): the PPO trainer
keeps the replicas identical and reduces metrics.

Each rank builds a PPOTrainer on the tiny Countdown recipe (tiny sizes, 2 PPO steps), samples its own share of
the prompts, and writes its parameter hash, the prompts it saw and its (reduced) metrics to a JSON file. The
test checks that the prompts differ, the parameters are bit-identical across ranks, the parameters moved, and
every reduced metric is equal on both ranks."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "countdown_tiny.yaml"

WORKER = textwrap.dedent(
    """
    import hashlib, json, sys
    import torch
    from tre_edu.config import load_config
    from tre_edu.pipeline import build_trainer

    out_dir, config = sys.argv[1], sys.argv[2]
    cfg = load_config(config, [
        "model.tail_tokens=200", "model.n_embd=32", "model.n_layer=1", "model.n_head=2",
        "ppo.prompts_per_step=4", "ppo.samples_per_prompt=4",
        "ppo.minibatch_size=8", "ppo.micro_batch_size=4",
        "ppo.max_new_tokens=10", "ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3", "ppo.steps=2",
        "task.eval_size=4", "task.train_size=64", "eval.every=0", "eval.sampled=false", "sft.enabled=false",
        "regularizer.kind=tre-k", "regularizer.coef=0.001", "device=cpu", "threads=1",
        f"output_dir={out_dir}/run",
    ])
    trainer = build_trainer(cfg, progress=False)
    acc = trainer.accelerator
    seen, local = [], []
    prompt, reduce, collect = trainer.task.prompt, trainer._reduce, trainer.collect
    collecting = []  # the training prompts only (evaluation prompts are the same on every rank)
    trainer.task.prompt = lambda *a: (collecting and seen.append(prompt(*a))) or prompt(*a)
    trainer.collect = lambda: collecting.append(1) or (collect(), collecting.clear())[0]
    trainer._reduce = lambda m: local.append(dict(m)) or reduce(m)
    before = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()]).clone()
    history = trainer.train()
    params = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    record = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "hash": hashlib.sha256(params.numpy().tobytes()).hexdigest(),
        "moved": float((params - before).abs().max()),
        "prompts": sorted(set(seen)),
        "history": history,
        "local": [m for m in local if "reward/mean" in m],
    }
    with open(f"{out_dir}/rank{acc.process_index}.json", "w") as f:
        json.dump(record, f)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed gloo missing")
def test_two_cpu_processes_stay_in_sync(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    # torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; Accelerator(cpu=True) then runs MULTI_CPU over gloo.
    # (`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is configured.)
    port = str(29500 + os.getpid() % 1000)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", port, str(script), str(tmp_path), str(CONFIG),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))

    assert r0["world"] == r1["world"] == 2 and "MULTI_CPU" in r0["distributed_type"]
    # each rank sampled its own prompts ...
    assert r0["prompts"] and r1["prompts"] and set(r0["prompts"]).isdisjoint(r1["prompts"])
    # ... yet DDP keeps the replicas bit-identical, and training moved them
    assert r0["hash"] == r1["hash"]
    assert r0["moved"] > 0 and r1["moved"] > 0
    # metrics are reduced: per-rank values differ, the reduced ones are equal on both ranks
    assert len(r0["history"]) == len(r1["history"]) == 2
    for h0, h1 in zip(r0["history"], r1["history"]):
        assert h0.keys() == h1.keys()
        for k in h0:
            assert h0[k] == pytest.approx(h1[k], rel=1e-9, abs=1e-12), k
    for l0, l1, h0 in zip(r0["local"], r1["local"], r0["history"]):
        for k in ("reward/mean", "response/length_mean", "policy/loss"):
            assert h0[k] == pytest.approx((l0[k] + l1[k]) / 2, rel=1e-6, abs=1e-9), k
