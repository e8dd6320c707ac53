"""The live dashboard, run comparison, recorded-run loader and launcher panel of tre_edu.viz."""

import json
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import yaml

from tre_edu.config import load_config
from tre_edu.pipeline import run_training
from tre_edu.viz import LiveDashboard, RunLauncher, comparison_figure, comparison_table, load_recorded_runs
from tre_edu.viz.dashboard import DASHBOARD_PANELS
from tre_edu.viz.records import group_runs, normalize_run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = [str(CONFIGS / "countdown_tiny.yaml"), str(CONFIGS / "presets" / "fast.yaml")]  # the recipe in fast mode
N_SERIES = sum(len(p.series) for p in DASHBOARD_PANELS)


def _fake_history(n=6, tail0=1e-3, growth=1.5, reward=0.2):
    return [
        {
            "reward/mean": reward + 0.01 * i,
            "reward/accuracy": reward + 0.01 * i,
            "entropy/global": 0.5,
            "entropy/tre_k": 1.0,
            "entropy/tre_p": 0.8,
            "tail/mass_outside_top10": tail0 * growth**i,
            "tail/top1_prob": 0.9,
            "policy/approx_kl": 0.01,
            "policy/clipfrac": 0.05,
            "response/length_mean": 12.0,
        }
        for i in range(n)
    ]


def _trace(dash, run, key):
    j = 0
    for panel in dash.panels:
        for s in panel.series:
            if s.key == key:
                return dash.figure.data[dash._traces[run][j]]
            j += 1
    raise KeyError(key)


def _feed(dash, history, evals=(), run="run"):
    """A run's records through the callback hooks, as a trainer sends them."""
    dash.start_run(run)
    for step, rec in enumerate(history, 1):
        dash.on_step_end(None, step, rec)
    for e in evals:
        dash.on_evaluate(None, e["step"], {k: v for k, v in e.items() if k != "step"})


def test_dashboard_from_fake_history():
    dash = LiveDashboard(live=False)
    evals = [{"step": 0, "eval/greedy_accuracy": 0.2}, {"step": 6, "eval/greedy_accuracy": 0.3}]
    _feed(dash, _fake_history(), evals, run="tre-k")
    _feed(dash, _fake_history(growth=3.0), run="entropy")
    assert list(dash.runs) == ["tre-k", "entropy"]
    assert len(dash.figure.data) == 2 * N_SERIES
    rew = _trace(dash, "tre-k", "reward/mean")
    assert list(rew.x) == [1, 2, 3, 4, 5, 6]  # trainer.history has no "step": 1-based positions
    assert list(_trace(dash, "tre-k", "eval/greedy_accuracy").y) == [0.2, 0.3]
    assert len(_trace(dash, "entropy", "eval/greedy_accuracy").x) == 0
    assert _trace(dash, "entropy", "tail/mass_outside_top10").line.color == "#d62728"
    runs = dash.runs
    assert set(runs) == {"tre-k", "entropy"} and len(runs["tre-k"]["eval_history"]) == 2
    assert "tre-k" not in dash.status_text() and "entropy" in dash.status_text()


def test_dashboard_callbacks_throttle_and_widget():
    dash = LiveDashboard(every=2)
    assert isinstance(dash.figure, go.FigureWidget)
    trainer = SimpleNamespace(
        config=SimpleNamespace(regularizer=SimpleNamespace(kind="none"), ppo=SimpleNamespace(steps=4))
    )
    dash.on_train_begin(trainer)
    dash.on_evaluate(trainer, 0, {"eval/greedy_accuracy": 0.1})
    n0 = dash.n_refresh
    for step, rec in enumerate(_fake_history(4), 1):
        dash.on_step_end(trainer, step, rec)
    assert dash.n_refresh == n0 + 2  # steps 2 and 4 only
    assert len(_trace(dash, "none", "reward/mean").x) == 4
    dash.on_train_begin(trainer)  # the same trainer again: continues its run
    assert len(dash.runs["none"]["history"]) == 4
    box = dash.widget
    assert "step 4 / 4" in box.children[0].value and box.children[1] is dash.figure
    with pytest.raises(ValueError, match="every"):
        LiveDashboard(every=0)


def test_dashboard_on_a_one_step_real_run(tmp_path):
    cfg = load_config(FAST, ["threads=0", "sft.enabled=false", "ppo.steps=1", f"output_dir={tmp_path}"])
    dash = LiveDashboard(live=False)
    dash.start_run("tiny tre-k")
    run_training(cfg.replace({"regularizer.kind": "tre-k"}), callbacks=[dash], progress=False)
    assert list(dash.runs) == ["tiny tre-k"]
    assert list(_trace(dash, "tiny tre-k", "reward/mean").x) == [1]
    assert list(_trace(dash, "tiny tre-k", "eval/greedy_accuracy").x) == [0, 1]
    tail = _trace(dash, "tiny tre-k", "tail/mass_outside_top10").y
    assert len(tail) == 1 and (tail[0] is None or 0 < tail[0] < 1)


def test_fast_preset_is_a_config_file():
    cfg = load_config(FAST)
    assert (cfg.model.tail_tokens, cfg.model.n_embd, cfg.model.n_layer, cfg.threads) == (300, 32, 1, 1)
    assert (cfg.sft.steps, cfg.ppo.steps, cfg.ppo.max_new_tokens, cfg.task.eval_size) == (5, 2, 16, 8)
    assert cfg.eval.every == 0 and cfg.eval.sampled is False and cfg.device == "cpu"
    assert cfg.regularizer.coef == load_config(FAST[:1]).regularizer.coef  # the recipe's other settings stay


def _write_run(root, name, kind, seed, final, growth, coef=0.001):
    d = root / name
    d.mkdir(parents=True)
    lines = [{"step": 0, "kind": "eval", "eval/greedy_accuracy": 0.2}]
    lines += [{"step": i + 1, **r} for i, r in enumerate(_fake_history(5, growth=growth))]
    lines.append({"step": 5, "kind": "eval", "eval/greedy_accuracy": final})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {"regularizer": kind, "coef": coef, "steps": 5, "eval_final": {"eval/greedy_accuracy": final}}
    (d / "summary.json").write_text(json.dumps(summary))
    config = {"seed": seed, "regularizer": {"kind": kind, "coef": coef}, "model": {"tail_tokens": 2000}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def recorded(tmp_path):
    root = tmp_path / "countdown_runs"
    _write_run(root, "entropy_s0", "entropy", 0, 0.05, 3.0)
    _write_run(root, "entropy_s1", "entropy", 1, 0.10, 2.5)
    _write_run(root, "tre-k_s0", "tre-k", 0, 0.30, 1.0)
    _write_run(root, "tre-k_s1", "tre-k", 1, 0.34, 1.1)
    (root / "README.md").write_text("# runs\n\n```bash\ntre-edu train --config configs/countdown_tiny.yaml\n```\n")
    return root


def test_load_recorded_runs(recorded, tmp_path):
    runs = load_recorded_runs(recorded)
    assert sorted(runs) == ["entropy_s0", "entropy_s1", "tre-k_s0", "tre-k_s1"]
    r = runs["tre-k_s1"]
    assert r.method == "tre-k" and r.seed == 1 and r.final_eval() == pytest.approx(0.34)
    assert len(r.history) == 5 and [e["step"] for e in r.eval_history] == [0, 5]
    assert runs.commands == ["tre-edu train --config configs/countdown_tiny.yaml\n"]
    assert set(group_runs(runs)) == {"entropy", "tre-k"}  # only the seed differs

    empty = load_recorded_runs(tmp_path / "nothing_here")
    assert len(empty) == 0 and empty.readme is None and empty.commands == []

    with (recorded / "tre-k_s0" / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.warns(UserWarning, match="not a JSON line"):
        again = load_recorded_runs(recorded)
    assert len(again["tre-k_s0"].history) == 5


def test_comparison_figure_on_recorded_runs(recorded):
    runs = load_recorded_runs(recorded)
    fig = comparison_figure(runs)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert [b.x[0] for b in bars] == ["entropy", "tre-k"]
    assert bars[1].y[0] == pytest.approx(0.32)
    assert bars[1].error_y.array[0] == pytest.approx(0.0283, abs=1e-3)  # std over the two seeds
    tails = [t for t in fig.data if t.xaxis == "x3" and t.fill != "toself"]
    assert len(tails) == 2 and tails[0].y[-1] > tails[1].y[-1]  # entropy's tail grows faster
    table = comparison_table(runs)
    assert "tre-k" in table and "0.320 ± 0.028" in table

    # histories and dashboard runs are accepted too; a list of runs is a list of seeds
    fig2 = comparison_figure({"a": _fake_history(), "b": [_fake_history(), _fake_history(growth=2.0)]})
    assert len([t for t in fig2.data if isinstance(t, go.Bar)]) == 2
    with pytest.raises(ValueError, match="runs"):
        comparison_figure({})
    with pytest.raises(ValueError, match=r"runs\['x'\]"):
        normalize_run(42, "x")


def test_launcher_builds_and_trains(tmp_path):
    cfg = load_config(FAST, ["threads=0", "ppo.steps=1", f"output_dir={tmp_path / 'unused'}"])
    launcher = RunLauncher(cfg, output_root=tmp_path, dashboard=LiveDashboard(live=False), max_steps=5)
    assert [w.description for w in (launcher.coef, launcher.k_slider, launcher.p_slider)] == [
        "coef",
        "K",
        "p",
    ]
    assert launcher.tail_slider.description == "tail" and launcher.steps_slider.description == "steps"
    launcher.method.value = "tre-k"
    assert not launcher.k_slider.disabled and launcher.p_slider.disabled
    assert "Effective coefficient" in launcher.info.value and "no warm start yet" in launcher.info.value
    launcher.steps_slider.value = 1
    launcher.button.click()
    assert launcher.last_error is None, launcher.last_error
    (label,) = launcher.results
    assert label.startswith("tre-k") and "tail=300" in label
    assert launcher.results[label]["summary"]["regularizer"] == "tre-k"
    assert list(launcher.dashboard.runs) == [label]
    assert 300 in launcher.warm_starts and "done" in launcher.status.value
    assert load_recorded_runs(tmp_path)  # the launcher's runs are recorded runs too
