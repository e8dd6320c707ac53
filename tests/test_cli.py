"""The ``tre-edu`` command: flags derived from the config fields, typed values, subcommands and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tre_edu import cli, pipeline, study
from tre_edu.config import RewardModelConfig, TrainConfig, iter_fields

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper"


@pytest.fixture
def captured(monkeypatch):
    """Replace the jobs behind the subcommands; record what each received."""
    calls = {}

    def record(name, result):
        def fake(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result

        return fake

    monkeypatch.setattr(pipeline, "run_training", record("train", {"summary": {"ok": 1}}))
    monkeypatch.setattr(pipeline, "run_warm_start", record("sft", {"summary": {"ok": 1}}))
    monkeypatch.setattr(pipeline, "run_eval", record("eval", {"greedy_accuracy": 0.5}))
    monkeypatch.setattr(cli.pipeline, "train_reward_model", record("train-rm", {"test_accuracy": 0.5}))
    monkeypatch.setattr(study, "run_study", record("study run", {"cells": 0}))
    monkeypatch.setattr(study, "report", record("study report", "| table |"))
    return calls


def _train(captured, *argv) -> tuple[TrainConfig, dict]:
    assert cli.main(["train", *argv]) == 0
    (cfg,), kwargs = captured["train"]
    return cfg, kwargs


@pytest.mark.parametrize("value", ["runs/a #b", "on", "yes", "null", "1e3", "a: b"])
def test_output_dir_reaches_the_config_unchanged(captured, value):
    cfg, _ = _train(captured, "--output-dir", value)
    assert cfg.output_dir == value
    cfg, _ = _train(captured, "--set", f"output_dir={value}")
    assert cfg.output_dir == value


def test_tre_k_travels_typed_from_the_command_line(captured):
    cfg, _ = _train(captured, "--kind", "tre-k", "--coef", "0.001", "--k", "2", "--p", "0.9")
    reg = cfg.regularizer
    assert (reg.kind, reg.coef, reg.k, reg.p) == ("tre-k", 0.001, 2, 0.9) and type(reg.k) is int
    assert _train(captured, "--regularizer.k", "3")[0].regularizer.k == 3


def test_every_field_has_a_flag_and_the_short_aliases_exist():
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    assert {"--" + key for key, _, _ in iter_fields(TrainConfig)} <= flags
    short = ["--kind", "--coef", "--k", "--p", "--tail-tokens", "--steps", "--seed", "--output-dir", "--init-from"]
    assert (
        set(short + ["--device", "--model", "--resume", "--overwrite", "--dry-run", "--processes", "--no-fsdp"])
        <= flags
    )
    rm = parser._subparsers._group_actions[0].choices["train-rm"]
    rm_flags = {s for a in rm._actions for s in a.option_strings}
    assert {"--" + k.replace("_", "-") for k, _, _ in iter_fields(RewardModelConfig)} <= rm_flags


def test_flags_are_typed_and_win_over_set(captured):
    cfg, kwargs = _train(
        captured,
        *("-c", str(ROOT / "configs" / "countdown_tiny.yaml")),
        *("--set", "ppo.steps=3", "--steps", "5", "--set", "task.options.num_count=4"),
        *("--eval.greedy", "false", "--tensorboard", "--ppo.dual_clip", "null", "--ppo.actor_lr", "3e-5"),
        "--resume",
    )
    assert cfg.ppo.steps == 5 and cfg.task.options["num_count"] == 4 and cfg.ppo.actor_lr == 3e-5
    assert cfg.eval.greedy is False and cfg.tensorboard is True and cfg.ppo.dual_clip is None
    assert kwargs == {"resume": True, "overwrite": False}
    assert _train(captured, "--overwrite")[1] == {"resume": False, "overwrite": True}


def test_dry_run_of_a_paper_recipe(capsys):
    files = [PAPER / "hh.yaml", PAPER / "methods" / "tre-k.yaml", PAPER / "models" / "qwen2.5-7b.yaml"]
    argv = ["train", *(a for f in files for a in ("-c", str(f))), "--k", "3", "--output-dir", "runs/a #b"]
    assert cli.main([*argv, "--dry-run", "--processes", "8"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out.split("memory estimate")[0])
    assert resolved["regularizer"]["k"] == 3 and resolved["output_dir"] == "runs/a #b"
    assert resolved["ppo"]["micro_batch_size"] == 8 and resolved["ppo"]["steps"] == 2800
    assert "FSDP full shard over 8" in out


def test_sft_eval_train_rm_and_study(captured, tmp_path):
    assert cli.main(["sft", "--output-dir", "runs/w #1"]) == 0
    assert captured["sft"][1]["output_dir"] == "runs/w #1"
    assert cli.main(["sft", "--set", "output_dir=runs/x"]) == 0
    assert captured["sft"][1]["output_dir"] == "runs/x/warm_start"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # what save_pretrained writes
        (tmp_path / name).write_text("{}")
    assert cli.main(["eval", "--model-dir", str(tmp_path), "--n", "3"]) == 0
    assert captured["eval"][1] == {"model_dir": str(tmp_path), "n": 3}
    argv = [
        "train-rm",
        "--model",
        "tiny",
        "--n-train",
        "4",
        "--output-dir",
        "rm #1",
        "--lr",
        "2e-5",
    ]
    assert cli.main(argv) == 0
    (rm,), _ = captured["train-rm"]
    assert isinstance(rm, RewardModelConfig) and (rm.n_train, rm.output_dir, rm.lr) == (4, "rm #1", 2e-5)
    assert rm.epochs == 3 and rm.n_test is None
    assert cli.main(["study", "run", "configs/studies/x.yaml", "--workers", "2"]) == 0
    assert captured["study run"] == (("configs/studies/x.yaml",), {"workers": 2, "only": None})
    argv = ["study", "run", "configs/studies/x.yaml", "--only", "seed=2", "--only", "tail=0,2000"]
    assert cli.main(argv) == 0
    assert captured["study run"][1] == {"workers": 1, "only": {"seed": ["2"], "tail": ["0", "2000"]}}
    assert cli.main(["study", "report", "data/results/x", "--figures", "figs"]) == 0
    assert captured["study report"] == (("data/results/x",), {"figures_dir": "figs"})


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "malformed": "ppo:\n  steps: [1, 2\n",
        "self": "base: self.yaml\n",
        "a": "base: b.yaml\n",
        "b": "base: a.yaml\n",
        "num_count": "task:\n  name: countdown\n  options:\n    num_count: 7\n",
        "unknown_option": "task:\n  name: countdown\n  options:\n    no_such_option: 1\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return {name: tmp_path / f"{name}.yaml" for name in files}


ERRORS = {
    "malformed YAML file": (["train", "-c", "{malformed}", "--dry-run"], "malformed.yaml, line 3"),
    "malformed --set": (["train", "--set", "ppo.steps=[1", "--dry-run"], "ppo.steps"),
    "self base": (["train", "-c", "{self}", "--dry-run"], "cycle"),
    "base cycle": (["train", "-c", "{a}", "--dry-run"], "b.yaml -> "),
    "missing config": (["train", "-c", "/nope/x.yaml", "--dry-run"], "not found: /nope/x.yaml"),
    "num_count 7": (["train", "-c", "{num_count}", "--dry-run"], "task.options.num_count"),
    "unknown option": (["train", "-c", "{unknown_option}", "--dry-run"], "no_such_option"),
    "bad value": (["train", "--steps", "0", "--dry-run"], "ppo.steps must be an integer >= 1"),
    "bad type": (["train", "--steps", "x"], "ppo.steps must be an integer"),
    "bad choice": (["train", "--kind", "tre-x", "--dry-run"], "one of none, entropy"),
    "unknown key": (["train", "--set", "ppo.stepz=1"], "ppo.stepz"),
    "unknown flag": (["train", "--stepz", "1"], "--stepz"),
    "resume and overwrite": (["train", "--resume", "--overwrite"], "not allowed with"),
    "missing model dir": (["eval", "--model-dir", "/nope/model"], "not found: /nope/model"),
    "bad reward-model value": (["train-rm", "--epochs", "0"], "reward_model.epochs"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_exit_2_with_one_line(case, tmp_path, capsys, captured):
    argv, needle = ERRORS[case]
    argv = [a.format(**_bad_files(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tre-edu: error: ") and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err and not captured  # nothing ran


@pytest.mark.parametrize("case", ["malformed YAML file", "base cycle", "malformed --set", "missing model dir"])
def test_no_traceback_from_the_real_command(case, tmp_path):
    argv, needle = ERRORS[case]
    argv = [a.format(**_bad_files(tmp_path)) for a in argv]
    out = subprocess.run(
        [sys.executable, "-m", "tre_edu.cli", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and needle in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1


def test_a_bug_is_not_reported_as_a_user_error(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "run_training", broken)
    with pytest.raises(RuntimeError):  # uncaught: the interpreter prints the traceback and exits 1
        cli.main(["train"])


def test_train_rm_tiny_end_to_end(tmp_path, capsys):
    argv = ["train-rm", "--epochs", "1", "--lr", "1e-3", "--n-train", "8", "--n-test", "4"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "rm")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] and 0.0 <= res["test_accuracy"] <= 1.0


def test_study_run_exits_1_when_a_job_failed(captured, monkeypatch, capsys):
    """A study whose cells (or warm starts) failed says which and exits 1, so that scripts stop there."""
    out = {"done": ["a"], "skipped": [], "failed": {"method-none_seed-2": "RuntimeError: boom"}}
    monkeypatch.setattr(study, "run_study", lambda *a, **k: out)
    assert cli.main(["study", "run", "configs/studies/quick.yaml"]) == 1
    assert "1 study job(s) failed: method-none_seed-2" in capsys.readouterr().err
    monkeypatch.setattr(study, "run_study", lambda *a, **k: {**out, "failed": {}})
    assert cli.main(["study", "run", "configs/studies/quick.yaml"]) == 0


def test_warnings_print_as_one_line_and_the_offline_fallback_once(capsys):
    """`tre-edu train` printed the offline fallback as UserWarnings followed by a library source line, which reads
    like a crash (issue 24): now one line per dataset, and any other warning one line."""
    show = cli._one_line_warnings()
    for split, n in (("train", 256), ("test", 8), ("train", 64)):
        msg = (
            f"could not load MATH data 'x/y' split '{split}' (RuntimeError: HF_DATASETS_OFFLINE is set); offline: "
            f"falling back to the sample ({n} for split '{split}', level 5), NOT comparable with the paper"
        )
        show(UserWarning(msg), UserWarning, "tre_edu/tasks/base.py", 160)
    show(RuntimeWarning("skipping\nstep_3"), RuntimeWarning, "x.py", 1)
    assert capsys.readouterr().err.splitlines() == [
        "tre-edu: offline: MATH data 'x/y' is not available (HF_DATASETS_OFFLINE is set); using the sample "
        "(level 5), NOT comparable with the paper",
        "tre-edu: warning: RuntimeWarning: skipping step_3",
    ]


def test_train_report_reads_a_summary():
    summary = {"output_dir": "runs/x", "regularizer": "tre-k", "coef": 0.001, "steps": 200, "seconds_total": 132.0,
               "eval_start": {"step": 0, "eval/greedy_accuracy": 0.245, "eval/pass@8": 0.4},
               "eval_final": {"step": 200, "eval/greedy_accuracy": 0.3, "eval/pass@8": 0.5},
               "train_last10pct": {"reward/mean": 0.3, "tail/mass_outside_top10": 0.0012},
               "data_source": "generated"}  # fmt: skip
    text = cli.train_report(summary)
    assert text.splitlines()[0] == "tre-edu: trained 200 PPO steps with tre-k (coef 0.001) in 2.2 min"
    assert "greedy accuracy" in text and "24.5 % -> 30.0 %" in text and "pass@8" in text and "40.0 % -> 50.0 %" in text
    assert "runs/x/metrics.jsonl" in text and "tre-edu plot runs/x" in text and "not comparable" in text
    assert cli.train_report({"ok": 1})  # a summary without the usual keys still prints
