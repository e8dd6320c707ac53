"""The study runner on the quick study (2 cells, 2 PPO steps, one warm start): run, resume, report."""

from __future__ import annotations

import json
import math

import pytest

from tre_edu import study
from tre_edu.env import repo_root

QUICK = repo_root() / "configs" / "studies" / "quick.yaml"


def test_grid_expansion_and_ids(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        f"name: s\nconfigs: [{QUICK.parent.parent / 'countdown_tiny.yaml'}]\n"
        "horizons: {short: {ppo.max_new_tokens: 16}}\n"
        "grids:\n"
        "  - axes: {method: [none, tre-k], coefficient: [0.001, 0.01], horizon: [short], seed: [0]}\n"
        "  - axes: {method: [tre-k], coefficient: [0.01], horizon: [short], seed: [0], ppo.actor_lr: [0.0003]}\n"
    )
    spec = study.load_study(spec_file)
    ids = [study.cell_id(c) for c in spec["cells"]]
    # none ignores the coefficient axis (one cell, not two); the dotted axis makes a new cell
    assert ids == [
        "method-none_horizon-short_seed-0",
        "method-tre-k_coefficient-0.001_horizon-short_seed-0",
        "method-tre-k_coefficient-0.01_horizon-short_seed-0",
        "method-tre-k_coefficient-0.01_horizon-short_seed-0_ppo.actor_lr-0.0003",
    ]
    cfgs = [study.cell_config(spec, c) for c in spec["cells"]]
    assert cfgs[2].regularizer.kind == "tre-k" and cfgs[2].regularizer.coef == 0.01 and cfgs[2].regularizer.k == 2
    assert cfgs[3].ppo.actor_lr == 0.0003 and cfgs[0].ppo.max_new_tokens == 16
    assert len({study.warm_key(c) for c in cfgs}) == 1  # PPO settings do not change the warm start
    spec_file.write_text(spec_file.read_text().replace("horizon: [short]", "horizon: [long]", 1))
    with pytest.raises(ValueError, match="horizon 'long'"):
        study.load_study(spec_file)


def test_t_interval():
    mean, hw = study.t_interval([0.1, 0.2, 0.3])
    assert math.isclose(mean, 0.2) and math.isclose(hw, 4.303 * 0.1 / math.sqrt(3), rel_tol=1e-6)
    assert math.isnan(study.t_interval([0.5])[1])


def test_quick_study_runs_resumes_and_reports(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    out = study.run_study(QUICK, workers=1, results_dir=results, runs_dir=runs, progress=False)
    assert not out["failed"], out["failed"]
    assert len(out["done"]) == 2 and not out["skipped"]
    files = sorted(results.glob("*.jsonl"))
    assert len(files) == 2
    lines = [json.loads(s) for s in files[0].read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2]
    first = lines[-1]
    for key in ("method", "coefficient", "effective_coef", "seed", "config", "code_version", "eval", "train_curve"):
        assert key in first
    assert {"greedy_accuracy", "sampled_accuracy", "pass@2", "tail_response_frac"} <= set(first["eval"])
    assert first["config"]["model"]["tail_tokens"] == 300
    assert len(list((runs / "warm").iterdir())) == 1  # one warm start shared by both cells
    assert len(list((runs / "warm").glob("*/eval_*.json"))) == 1  # ... and evaluated once, not once per cell
    assert lines[0]["eval"] == json.loads(files[1].read_text().splitlines()[0])["eval"]

    # resume: finished cells are skipped; a half-finished cell (.part) is rerun from the start
    files[1].rename(files[1].with_name(files[1].name + ".part"))
    out = study.run_study(QUICK, workers=1, results_dir=results, runs_dir=runs, progress=False)
    assert len(out["skipped"]) == 1 and len(out["done"]) == 1 and not out["failed"]
    assert not list(results.glob("*.part"))
    assert len(files[1].read_text().splitlines()) == 2

    # every line names the weights it started from; a retrained warm start that differs is refused, never mixed in
    sha = study.warm_fingerprint(next((runs / "warm").iterdir()))
    assert all(json.loads(s)["warm_start"]["sha256"] == sha for f in files for s in f.read_text().splitlines())
    keep = files[0].read_text()
    for legacy in (False, True):
        first, *rest = keep.splitlines()
        line = json.loads(first)
        if legacy:  # an older line without a fingerprint: compared by its step-0 evaluation
            del line["warm_start"]
            line["eval"]["greedy_accuracy"] += 0.5
        else:
            line["warm_start"]["sha256"] = "0" * 16
        files[0].write_text("\n".join([json.dumps(line), *rest]) + "\n")
        files[1].unlink(missing_ok=True)
        out = study.run_study(QUICK, workers=1, results_dir=results, runs_dir=runs, progress=False)
        assert not out["done"] and "is not the one recorded cell" in out["failed"][files[1].stem]
        assert not files[1].exists()
    files[0].write_text(keep)  # the true line again: the cell runs
    out = study.run_study(QUICK, workers=1, results_dir=results, runs_dir=runs, progress=False)
    assert out["done"] == [files[1].stem] and not out["failed"]

    text = study.report(results, figures_dir=tmp_path / "figs")
    rows = [r for r in text.splitlines() if r.startswith("| 300 ")]
    assert len(rows) == 2 and "entropy" in rows[1] and "0.01" in rows[1]
    assert "2 cells" in text


def _line(method, coef, tail, seed, step, acc):
    axes = {"method": method, "coefficient": coef, "tail": tail, "horizon": "think", "seed": seed}
    cell = study.cell_id(axes)
    return {"cell": cell, "axes": axes, "method": method, "kind": method, "coefficient": coef, "effective_coef": coef,
            "tail": tail, "vocab_size": 33 + tail, "horizon": "think", "seed": seed, "step": step,
            "code_version": "test", "eval": {"greedy_accuracy": acc, "tail_response_frac": 1 - acc},
            "train_curve": [{"step": s, "tail/mass_outside_top10": 1 - acc} for s in range(1, step + 1)]}  # fmt: skip


def test_aggregate_table_and_figures(tmp_path):
    lines = []
    for seed in (0, 1, 2):
        for tail in (0, 20000):
            lines += [_line("none", None, tail, seed, s, 0.2 + 0.01 * seed) for s in (0, 60)]
            for coef in (0.001, 0.03):
                for m in ("entropy", "tre-k"):
                    final = 0.0 if (m, coef, tail) == ("entropy", 0.03, 20000) else 0.25 + 0.01 * seed
                    lines += [_line(m, coef, tail, seed, 0, 0.2), _line(m, coef, tail, seed, 60, final)]
    rows = study.aggregate(lines)
    assert len(rows) == 10 and all(r["seeds"] == [0, 1, 2] for r in rows)
    leak = next(r for r in rows if (r["method"], r["coefficient"], r["tail"]) == ("entropy", 0.03, 20000))
    assert leak["final"]["greedy_accuracy"] == (0.0, 0.0) and math.isclose(leak["start"]["greedy_accuracy"][0], 0.2)
    # paired by seed: entropy 0.03 at tail 20,000 ends 0.2 + 0.01 * seed below none in every seed
    assert leak["delta"]["greedy_accuracy"][0] == pytest.approx(-0.21)
    assert leak["delta"]["greedy_accuracy"][1] == pytest.approx(4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    assert study.leaked_seeds(leak) == (3, 3)  # every seed ends with all sampled responses holding a tail token
    tre = next(r for r in rows if (r["method"], r["coefficient"], r["tail"]) == ("tre-k", 0.001, 0))
    assert tre["delta"]["greedy_accuracy"] == pytest.approx((0.05, 0.0))  # the same +5 points in every seed
    text = study.table(rows)
    assert text.count("\n") == len(rows) + 1 and "0.0 ± 0.0" in text and "| -21.0 ± 2.5 |" in text
    sentences = study.against_baseline(rows)
    assert any(
        "entropy 0.03 (tail 20,000" in s and "below none" in s and s.endswith("; 3 of 3 seeds leaked")
        for s in sentences
    )
    assert any("tre-k 0.001 (tail 0" in s and "above none" in s for s in sentences)  # paired: +5 in each seed
    figs = study.figures(rows)
    assert {
        "coef_greedy_accuracy_tail20000_think",
        "coef_tail_response_frac_tail0_think",
        "tail_greedy_think",
        "tail_tail_response_frac_think",
        "train_tail_tail0_think",
    } <= set(figs)
    assert list(figs["tail_greedy_think"].data[0].x) == [33, 20033]  # plotted against V, smallest first
    (path,) = study.save_figures({"one": figs["tail_greedy_think"]}, tmp_path)
    assert path.suffix in (".png", ".html") and path.stat().st_size > 0


def test_figures_fall_back_to_html_with_a_warning(tmp_path, monkeypatch):
    """Without kaleido (or a Chromium) the figures are written as HTML, and the user is told, never silently."""
    import plotly.graph_objects as go

    def no_export(self, *args, **kwargs):
        raise ValueError("Image export requires the Kaleido package")

    monkeypatch.setattr(go.Figure, "write_image", no_export)
    figs = {"a": go.Figure(go.Scatter(x=[1], y=[1])), "b": go.Figure()}
    with pytest.warns(UserWarning, match=r"static PNG export failed .*Kaleido.*tre_edu\[figures\]"):
        paths = study.save_figures(figs, tmp_path)
    assert [p.name for p in paths] == ["a.html", "b.html"] and all(p.stat().st_size > 0 for p in paths)


def test_tail_figure_joins_cells_of_one_effective_weight():
    """TRE-K set per tail to one effective weight (different paper coefficients) is drawn as one line over V."""
    lines = []
    for tail, coef in ((0, 0.00198), (2000, 0.00091), (20000, 0.0007)):
        v = 33 + tail
        for seed in (0, 1):
            for line in (_line("tre-k", coef, tail, seed, s, 0.3) for s in (0, 60)):
                line["effective_coef"] = coef * math.log(v) / math.log(2)
                lines.append(line)
            lines += [_line("none", None, tail, seed, s, 0.3) for s in (0, 60)]
    fig = study.figures(study.aggregate(lines))["tail_greedy_think"]
    names = {t.name: list(t.x) for t in fig.data}
    assert names == {"none": [33, 2033, 20033], "tre-k eff 0.01": [33, 2033, 20033]}


def test_only_runs_the_chosen_cells_and_rejects_unknown_axes(tmp_path, capsys):
    from tre_edu.cli import main

    results, runs = tmp_path / "res", tmp_path / "runs"
    out = study.run_study(QUICK, only={"seed": [99]}, results_dir=results, runs_dir=runs, progress=False)
    assert not out["done"] and not out["skipped"] and not out["failed"]  # no cell has seed 99
    assert not list(runs.glob("warm/*"))  # ... so no warm start was trained
    cells = study.load_study(QUICK)["cells"]
    assert study._select(cells, {"method": ["entropy"]}) == [c for c in cells if c["method"] == "entropy"] != []
    with pytest.raises(ValueError, match="only: unknown axis 'nope'"):
        study.run_study(QUICK, only={"nope": [1]}, results_dir=results, runs_dir=runs, progress=False)
    assert main(["study", "run", str(QUICK), "--only", "seed"]) == 2
    assert "--only takes AXIS=VALUE" in capsys.readouterr().err


def test_readme_study_table_is_the_report_of_the_recorded_lines():
    """README's table between the study-table markers is exactly what `tre-edu study report` prints for the
    recorded study (regenerate with scripts/readme_evidence.py after recording cells)."""
    root = repo_root()
    results = root / "data" / "results" / "tail_leak"
    if not list(results.glob("*.jsonl")):
        pytest.skip("no recorded study in this checkout")
    readme = (root / "README.md").read_text()
    table = readme.split("<!-- study-table:start -->\n", 1)[1].split("\n<!-- study-table:end -->", 1)[0]
    assert table == study.report(results)


def _readme_evidence():
    """scripts/readme_evidence.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_evidence", repo_root() / "scripts" / "readme_evidence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_claims_are_the_template_filled_from_the_recorded_lines(tmp_path, monkeypatch):
    """The claims block holds the numbers of the recorded study, and the template's qualitative statements hold for
    them: scripts/readme_evidence.py on a copy of README.md changes nothing."""
    root = repo_root()
    results = root / "data" / "results" / "tail_leak"
    if not list(results.glob("*.jsonl")):
        pytest.skip("no recorded study in this checkout")
    copy = tmp_path / "README.md"
    copy.write_text((root / "README.md").read_text())
    monkeypatch.setattr("sys.argv", ["readme_evidence.py", str(results), "--readme", str(copy)])
    _readme_evidence().main()
    assert copy.read_text() == (root / "README.md").read_text()


def test_readme_evidence_refuses_numbers_that_contradict_the_template():
    module = _readme_evidence()
    results = repo_root() / "data" / "results" / "tail_leak"
    if not list(results.glob("*.jsonl")):
        pytest.skip("no recorded study in this checkout")
    rows = study.aggregate(study.load_results(results))
    assert module._checks(rows) == []
    # a regulariser whose paired interval lies above 0, and a global bonus that no longer leaks
    kl = next(r for r in rows if r["method"] == "kl-cov")
    kl["delta"]["greedy_accuracy"] = (0.05, 0.01)
    leak = next(
        r for r in rows if (r["method"], r["coefficient"], r["tail"], r["horizon"]) == ("entropy", 0.01, 20000, "think")
    )
    for values in leak["per_seed"].values():
        values["tail_response_frac"] = 0.3
    failed = module._checks(rows)
    assert len(failed) == 4, failed
    assert any("no regulariser beats PPO" in f for f in failed)
    assert any("KL-Cov is not distinguishable" in f for f in failed)
    assert any("every seed leaked at 20,000, think" in f for f in failed)
    assert any("far on either side of the leak line" in f for f in failed)  # 30 % is neither a leak nor PPO's level


def test_leaked_seeds_counts_runs_at_or_above_the_leak_line():
    row = {
        "per_seed": {0: {"tail_response_frac": 0.96}, 1: {"tail_response_frac": 0.49}, 2: {"tail_response_frac": 0.5}}
    }
    assert study.LEAK_FRAC == 0.5 and study.leaked_seeds(row) == (2, 3)
    assert study.leaked_seeds({"per_seed": {0: {"greedy_accuracy": 0.3}}}) == (0, 0)  # tail 0: nothing to count
