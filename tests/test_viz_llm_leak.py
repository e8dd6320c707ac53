"""tre_edu.viz.llm_leak (the recorded SmolLM2 leak cells, read back and drawn) and the recorder's settings."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest

from tre_edu.env import repo_root
from tre_edu.regularizers import Regularizer
from tre_edu.viz import llm_leak
from tre_edu.viz.panels import sync_figure


def _cell(method: str, seed: int, tail: list[float], sampled: list[float]) -> list[dict]:
    """A header (update 0: tail[0]) and one step per later value (the rollout of step i: sampled[i - 1])."""
    probe = [{"tail/mass_outside_top10": t, "tail/mass_outside_nucleus_p99": t / 4, "entropy/global": 2 + t,
              "entropy/tre_k": 7 + t} for t in tail]  # fmt: skip
    header = {"kind": "header", "method": method, "seed": seed, "effective_coef": 0.1 if method != "none" else 0.0,
              "probe": probe[0]}  # fmt: skip
    steps = [
        {"kind": "step", "step": i, "probe": probe[i], "responses": [f"{method} {i}"],
         "metrics": {"tail/sampled_outside_top2": sampled[i - 1], "reward/mean": 0.0}}
        for i in range(1, len(tail))
    ]  # fmt: skip
    return [header, *steps[::-1]]  # out of order on purpose: steps are sorted by "step"


def _write(folder, name, lines):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_cells_load_sorted_and_skip_unfinished(tmp_path):
    _write(tmp_path, "entropy_s0.jsonl", _cell("entropy", 0, [0.2, 0.3, 0.4], [0.4, 0.5]))
    _write(tmp_path, "tre-k_s0.jsonl", _cell("tre-k", 0, [0.2, 0.21, 0.22], [0.4, 0.41]))
    _write(tmp_path, "none_s0.jsonl.tmp", _cell("none", 0, [0.2, 0.2], [0.4]))  # being written: not a cell yet
    cells = llm_leak.load_leak_cells(tmp_path)
    assert sorted(cells) == [("entropy", 0), ("tre-k", 0)]
    ent = cells[("entropy", 0)]
    assert [s["step"] for s in ent.steps] == [1, 2]
    assert ent.probe("tail/mass_outside_top10") == ([0, 1, 2], [0.2, 0.3, 0.4])  # update 0 = the header
    assert ent.rollout("tail/sampled_outside_top2") == ([0, 1], [0.4, 0.5])  # step i sampled after i - 1 updates
    assert ent.label == "global entropy, effective weight 0.1"
    assert llm_leak.load_leak_cells(tmp_path / "missing") == {}


def test_a_file_without_header_is_an_error(tmp_path):
    _write(tmp_path, "x_s0.jsonl", _cell("entropy", 0, [0.2, 0.3], [0.4])[1:])
    with pytest.raises(ValueError, match="no header"):
        llm_leak.load_leak_cells(tmp_path)


def test_figure_keeps_its_traces_while_cells_arrive():
    """A live figure: same traces in the same order before, during and after the runs (sync_figure needs that)."""
    methods = ("none", "entropy", "tre-k")
    empty = llm_leak.leak_figure([], methods=methods, as_widget=True)
    per_panel = len(methods)
    assert len(empty.data) == len(llm_leak.PANELS) * per_panel + per_panel  # + the dotted H_TRE-K lines
    partial = [llm_leak.cell_from_lines(_cell("entropy", 0, [0.2, 0.3], [0.4]))]
    full = [*partial, llm_leak.cell_from_lines(_cell("tre-k", 0, [0.2, 0.21, 0.22], [0.4, 0.41]))]
    for cells in (partial, full):
        sync_figure(empty, llm_leak.leak_figure(cells, methods=methods))
    entropy_top10 = empty.data[1]
    assert list(entropy_top10.y) == [0.2, 0.3] and entropy_top10.name.startswith("global entropy")
    assert list(empty.data[2].x) == [0, 1, 2]  # TRE-K: updates 0..2
    assert len(empty.data[0].x or ()) == 0  # no bonus: not run, an empty trace


def test_several_seeds_draw_a_mean_and_thin_lines_and_the_table_reads_the_ends():
    cells = [llm_leak.cell_from_lines(_cell("entropy", s, [0.2, 0.2 + 0.1 * (s + 1)], [0.4])) for s in range(3)]
    fig = llm_leak.leak_figure(cells, methods=("entropy",))
    mean = fig.data[0]
    assert "mean of 3 seeds" in mean.name and list(mean.y) == pytest.approx([0.2, 0.4])
    assert [len(t.y) for t in fig.data[1:4]] == [2, 2, 2]  # one thin line per seed
    (row,) = llm_leak.leak_table(cells, methods=("entropy", "tre-k"))  # no TRE-K cells: no row
    top10 = row["tail/mass_outside_top10"]
    assert row["seeds"] == 3 and top10["start"] == pytest.approx(0.2) and top10["end"] == pytest.approx(0.4)
    assert (top10["end_min"], top10["end_max"], top10["updates"]) == pytest.approx((0.3, 0.5, 1))


def _recorder():
    path = repo_root() / "scripts" / "record_smollm2_leak.py"
    spec = importlib.util.spec_from_file_location("record_smollm2_leak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recorder_gives_tre_k_the_same_effective_weight_and_checks_its_setting():
    rec = _recorder()
    assert rec.method_coef("entropy", 0.1) == 0.1 and rec.method_coef("none", 0.1) == 0.0
    assert rec.method_coef("tre-k", 0.1) == pytest.approx(0.1 * math.log(2) / math.log(49_152))
    with pytest.raises(ValueError, match="method must be one of"):
        rec.method_coef("tre-p", 0.1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        rec.Setting(steps=0)
    with pytest.raises(ValueError, match="advantage must be one of"):
        rec.Setting(advantage="ppo")
    cfg = rec.cell_config("tre-k", 3, rec.Setting(prompts=2, samples=3, tokens=16), "/tmp/x")
    assert cfg.seed == 3 and cfg.model.name == "smollm2-135m-instruct" and cfg.regularizer.kind == "tre-k"
    assert cfg.ppo.minibatch_size == 6 and cfg.ppo.max_new_tokens == 16 and cfg.threads == 1
    assert Regularizer(cfg.regularizer).effective_coef(49_152) == pytest.approx(0.1)
