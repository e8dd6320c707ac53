"""Nothing lost, round two (issue 23): warm starts cut short, two jobs in one folder, incomplete study files, values
that pass validation but cannot run, a resume with other settings, messages that mislead. Each test failed before
its fix; a user error is one ``tre-edu: error:`` line (exit 2), and nothing recorded is lost."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tre_edu import checkpoint, cli, preflight, study
from tre_edu.config import ConfigError, load_config
from tre_edu.env import repo_root

ROOT = repo_root()
FAST = ["-c", str(ROOT / "configs" / "countdown_tiny.yaml"), "-c", str(ROOT / "configs" / "presets" / "fast.yaml")]
RUN = ["--steps", "2", "--checkpoint_every", "1", "--kind", "entropy", "--coef", "0.05", "--ppo.actor_lr", "1e-3"]
QUICK = ROOT / "configs" / "studies" / "quick.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip


def train(out: Path, *extra: str) -> int:
    return cli.main(["train", *FAST, *RUN, "--output-dir", str(out), *extra])


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [s for s in err.splitlines() if s.startswith("tre-edu: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def steps_logged(out: Path) -> list[int]:
    recs = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in recs if r.get("kind") != "eval"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One fast run (warm start, 2 PPO steps, a checkpoint per step), copied by the tests that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. the warm start is complete or absent, never trusted half-written ------------------------------------------
@pytest.mark.parametrize("cut", ["after config.json", "after the weights"])
def test_a_warm_start_cut_short_is_done_again(finished_run, tmp_path, capsys, cut):
    """Before: `--resume` trusted any warm_start/ with a config.json: 'no file named model.safetensors' or 'prompts
    must each have at least one token'. Now the folder has a COMPLETE marker; without it the warm start runs again."""
    out = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(out / "checkpoints")  # killed during the warm start: nothing after it exists
    (out / "metrics.jsonl").unlink()
    warm = out / "warm_start"
    for name in ("COMPLETE", "sft_history.json", "tokenizer.json", "tokenizer_config.json"):
        (warm / name).unlink()
    if cut == "after config.json":
        (warm / "model.safetensors").unlink()
    assert not checkpoint.warm_start_complete(warm)
    assert train(out, "--resume") == 0, capsys.readouterr().err
    assert checkpoint.is_complete(warm) and (warm / "tokenizer.json").is_file()
    assert steps_logged(out) == [1, 2]


def test_atomic_folder_leaves_the_old_folder_or_the_new_one(tmp_path):
    target = tmp_path / "warm_start"
    with checkpoint.atomic_folder(target, "warm start") as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), checkpoint.atomic_folder(target, "warm start") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old" and checkpoint.is_complete(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm_start"]  # no temporary folder left behind


def test_a_warm_start_from_before_the_marker_is_still_trusted(finished_run, tmp_path):
    """A warm start written by the earlier code (no marker; its sft_history.json was written last) is complete."""
    warm = copy_run(finished_run / "warm_start", tmp_path / "warm")
    (warm / "COMPLETE").unlink()
    assert checkpoint.warm_start_complete(warm)
    (warm / "sft_history.json").write_text('{"summary": {"cut')  # cut short: not complete
    assert not checkpoint.warm_start_complete(warm)


# ---- 2. one job per folder ----------------------------------------------------------------------------------------
def hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from tre_edu.checkpoint import lock_directory; "
        "lock = lock_directory(sys.argv[1], 'output_dir'); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path, capsys):
    """Before: two runs into one folder both 'succeeded' with every step logged twice. Now the second is refused,
    naming the folder and the first one's pid; a holder killed with SIGKILL leaves no stale lock."""
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        assert train(out) == 2
        one_error_line(capsys, f"output_dir {out} is in use", f"pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists() and not (out / "warm_start").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / checkpoint.LOCK_FILE).exists()  # left by the killed holder, but nobody holds it
    assert train(out) == 0
    assert steps_logged(out) == [1, 2] and not (out / checkpoint.LOCK_FILE).exists()
    assert train(out, "--resume", "--steps", "3") == 0 and steps_logged(out) == [1, 2, 3]  # the lock: no obstacle
    assert train(out, "--overwrite") == 0 and steps_logged(out) == [1, 2]


def test_two_real_runs_at_once_never_mix(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tre_edu.cli", "train", *FAST, *RUN, "--output-dir", str(out)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in "ab"]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "Traceback" not in err and ("is in use by another tre-edu process" in err or "is not empty" in err), err
    assert steps_logged(out) == [1, 2]


def test_a_busy_study_results_folder_is_refused(tmp_path):
    results = tmp_path / "results"
    holder = hold_lock(results)
    try:
        with pytest.raises(checkpoint.DirectoryInUse, match=f"pid {holder.pid}"):
            study.run_study(QUICK, results_dir=results, runs_dir=tmp_path / "runs", progress=False)
        assert not (tmp_path / "runs").exists() and os.listdir(results) == [checkpoint.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


# ---- 3. study files: name the file and line; an incomplete record is not done ------------------------------------
GOOD = {"cell": "c", "axes": {"method": "none"}, "method": "none", "kind": "none", "coefficient": None,
        "effective_coef": 0.0, "seed": 0, "tail": 0, "horizon": None, "eval": {"greedy_accuracy": 0.5},
        "code_version": "t", "config": {"ppo": {"steps": 2}}}  # fmt: skip
GOOD_TEXT = json.dumps({**GOOD, "step": 0}) + "\n" + json.dumps({**GOOD, "step": 2}) + "\n"
BAD = {
    "cut last line": (GOOD_TEXT[:-40], "line 2: cut short"),
    "0-byte file": ("", "empty (0 bytes)"),
    "{}": (GOOD_TEXT + "{}\n", "line 3: an incomplete record (without cell"),
    "[1,2,3]": ("[1,2,3]\n", "line 1: not a record (a JSON list"),
    "not JSON": (GOOD_TEXT.replace('"step": 2', '"step": 2,,'), "line 2: not valid JSON"),
    "final step missing": (GOOD_TEXT.split("\n")[0] + "\n", "the last record is step 0 of 2"),
}


@pytest.mark.parametrize("case", BAD)
def test_read_cell_names_the_file_and_line(tmp_path, case):
    text, needle = BAD[case]
    f = tmp_path / "c.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"{re.escape(str(f))}.*{re.escape(needle)}"):
        study.read_cell(f)
    f.write_text(GOOD_TEXT)
    assert [r["step"] for r in study.read_cell(f)] == [0, 2]


def test_report_names_and_skips_incomplete_cells(tmp_path, capsys):
    """Before: 'Unterminated string ... line 1 column 1486' (no file), a 0-byte file counted silently, KeyError."""
    recorded = next((ROOT / "data" / "results" / "tail_leak").glob("*.jsonl"))
    lines = [json.loads(s) for s in recorded.read_text().splitlines()]
    good = tmp_path / f"{lines[0]['cell']}.jsonl"
    good.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for case, (text, _) in BAD.items():
        (tmp_path / f"bad {case}.jsonl").write_text(text)
    with pytest.warns(UserWarning, match="skipped: "):
        text = study.report(tmp_path)
    assert "1 cells" in text and f"Skipped {len(BAD)} incomplete cell file(s)" in text
    assert all(f"bad {case}.jsonl" in text for case in BAD)
    for f in tmp_path.glob("*.jsonl"):  # only named, never touched
        assert f.is_file()
    good.unlink()
    assert cli.main(["study", "report", str(tmp_path)]) == 2
    one_error_line(capsys, "no finished cells", "bad 0-byte file.jsonl: empty")


def test_study_run_redoes_an_incomplete_cell_and_keeps_the_bad_file(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    out = study.run_study(QUICK, results_dir=results, runs_dir=runs, progress=False)
    assert len(out["done"]) == 2 and not out["failed"]
    f = sorted(results.glob("*.jsonl"))[1]
    good = f.read_text()
    for n, broken in enumerate([good[:-30], "", "{}\n", "[1,2,3]\n"]):
        f.write_text(broken)
        with pytest.warns(UserWarning, match=f"{f.name}"):
            out = study.run_study(QUICK, results_dir=results, runs_dir=runs, progress=False)
        assert out["done"] == [f.stem] and len(out["skipped"]) == 1 and not out["failed"], out
        assert f.stem in out["set_aside"]
        kept = f.with_name(f.name + (".bad" if n == 0 else f".bad.{n}"))
        assert kept.read_text() == broken  # set aside, never deleted
        assert [r["step"] for r in study.read_cell(f)] == [0, 2]


# ---- 4. everything a config can tell is checked before work starts ------------------------------------------------
PREFLIGHT = {
    "lr 1e300": (["--ppo.actor_lr", "1e300"], "ppo.actor_lr must be a finite number >= 0 and <= 1"),
    "critic lr": (["--ppo.critic_lr", "10"], "ppo.critic_lr"),
    "coef 1e308": (["--coef", "1e308"], "regularizer.coef must be a finite number >= 0 and <= 1000"),
    "n_positions 4": (["--model.n_positions", "4"], "model.n_positions = 4 positions cannot hold the longest prompt"),
    "max_new_tokens": (["--ppo.max_new_tokens", "100000"], "ppo.max_new_tokens = 100,000 does not fit"),
    "k > V": (["--kind", "tre-k", "--k", "1000000"], "regularizer.k (--k) must be <= the vocabulary size"),
}


@pytest.mark.parametrize("case", PREFLIGHT)
def test_values_that_cannot_run_are_refused_before_any_work(tmp_path, capsys, case):
    """Before: tracebacks (overflow, non-finite loss, IndexError inside sft / rollout), or `--k` refused after the
    warm start as 'top_k must be an integer in [1, 333]'."""
    flags, needle = PREFLIGHT[case]
    out = tmp_path / "run"
    assert train(out, *flags) == 2
    one_error_line(capsys, needle)
    assert not out.exists()  # nothing ran, nothing was written (not even an empty folder)


def test_a_cuda_device_that_does_not_exist_is_refused(tmp_path, capsys):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert train(tmp_path / "run", "--device", f"cuda:{n}") == 2
    one_error_line(capsys, f"device cuda:{n}:", "CUDA" if n == 0 else f"has {n} CUDA device(s)")
    if n == 0:
        assert train(tmp_path / "run2", "--device", "cuda") == 2
        one_error_line(capsys, "device cuda: CUDA is not available")


def test_the_warm_start_needs_room_for_its_reference_responses():
    cfg = load_config(FAST[1::2])
    from tre_edu.models import tiny
    from tre_edu.pipeline import build_task

    task, tok = build_task(cfg), tiny.build_tokenizer(cfg.model.tail_tokens)
    ex = task.load("train", n=32, seed=0)
    P = max(len(tok(task.prompt(e, tok, "compact"), add_special_tokens=False)["input_ids"]) for e in ex)
    cfg = cfg.replace({"ppo.max_new_tokens": 1})
    preflight.check_model(cfg, task, tok, P + 1, examples=ex)  # PPO fits: prompt + 1 token
    with pytest.raises(ConfigError, match="too small for the warm start"):
        preflight.check_model(cfg, task, tok, P + 1, examples=ex, sft_examples=ex)


# ---- 6. a resume with other settings is refused, or kept on record ------------------------------------------------
def test_resume_with_other_settings_is_refused_naming_them(finished_run, tmp_path, capsys):
    """Before: `--resume --kind tre-k` after `entropy` steps exited 0 and overwrote config.yaml."""
    out = copy_run(finished_run, tmp_path / "run")
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}
    assert train(out, "--resume", "--steps", "3", "--kind", "tre-k", "--coef", "0.001") == 2
    one_error_line(capsys, "regularizer.kind: 'entropy' -> 'tre-k'", "regularizer.coef: 0.05 -> 0.001",
                   "--allow-config-change")  # fmt: skip
    assert before == {f: (out / f).read_bytes() for f in before}  # nothing touched
    assert train(out, "--resume", "--steps", "3", "--kind", "tre-k", "--coef", "0.001", "--allow-config-change") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["regularizer"]["kind"] == "tre-k"
    history = (out / "config_history.yaml").read_text()
    old = [d for d in yaml.safe_load_all(history) if d]
    assert len(old) == 1 and old[0]["regularizer"]["kind"] == "entropy" and "regularizer.kind" in history
    assert steps_logged(out) == [1, 2, 3]
    assert train(out, "--resume", "--steps", "4", "--kind", "tre-k", "--coef", "0.001") == 0  # only more steps: fine
    assert len([d for d in yaml.safe_load_all((out / "config_history.yaml").read_text()) if d]) == 2
    assert train(out, "--resume", "--tail-tokens", "301", "--allow-config-change") == 2
    one_error_line(capsys, "another shape", "model.tail_tokens: 300 -> 301")
    assert cli.main(["train", *FAST, "--output-dir", str(out), "--allow-config-change"]) == 2
    one_error_line(capsys, "--allow-config-change goes with --resume")


# ---- 7. messages that say what happened -----------------------------------------------------------------------------
def test_eval_of_a_folder_without_tokenizer_files_says_so(finished_run, tmp_path, capsys):
    """Before: 'prompts must each have at least one token; prompt 0 is empty'."""
    model = copy_run(finished_run / "final", tmp_path / "model")
    for name in preflight.TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
    assert cli.main(["eval", *FAST, "--model-dir", str(model)]) == 2
    one_error_line(capsys, f"--model-dir {model} has no tokenizer files (tokenizer.json")
    assert cli.main(["eval", *FAST, "--model-dir", str(finished_run / "final"), "--n", "2"]) == 0


def test_a_full_disk_during_a_checkpoint_says_no_space_left(tmp_path, monkeypatch, capsys):
    """Before: 'RuntimeError: basic_ios::clear: iostream error'. /dev/full answers every write with ENOSPC."""
    if not (Path("/dev/full").exists() and stat.S_ISCHR(Path("/dev/full").stat().st_mode)):
        pytest.skip("needs the /dev/full device")
    monkeypatch.setattr(checkpoint, "_open_for_writing", lambda file: open("/dev/full", "wb"))  # noqa: SIM115
    with pytest.raises(OSError, match="no space left on device while writing checkpoint") as info:
        checkpoint.save(tmp_path / "step_000001", {"w": torch.zeros(1000, 1000), "step": 1})
    assert info.value.errno == errno.ENOSPC and "MiB free there" in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing partial, under any name
    out = tmp_path / "run"
    assert train(out) == 2
    one_error_line(capsys, "[Errno 28] no space left on device while writing checkpoint", "step_000001")
    assert not list((out / "checkpoints").glob("*")) and checkpoint.is_complete(out / "warm_start")


# ---- issue 24 item 4: the main command's output, as a newcomer meets it ----------------------------------------------
def test_train_prints_one_offline_line_and_a_short_summary(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "tre_edu.cli", "train", *FAST, *RUN, "--output-dir", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert time.perf_counter() - t0 > 0
    err = res.stderr
    offline = [s for s in err.splitlines() if s.startswith("tre-edu: offline:")]
    assert len(offline) == 1 and "generated puzzles" in offline[0] and "NOT comparable" in offline[0], err
    assert "UserWarning" not in err and "return load(" not in err
    text = res.stdout
    assert "greedy accuracy" in text and " -> " in text and "mass outside the top 10" in text
    for path in ("metrics.jsonl", "summary.json", "checkpoints", "final"):
        assert str(out / path) in text
    assert f"tre-edu plot {out}" in text and len(text.splitlines()) < 25
    assert json.loads((out / "summary.json").read_text())["steps"] == 2  # the JSON stays in the folder
    assert cli.main(["plot", str(out)]) == 0 and (out / "figures.html").stat().st_size > 1000


def test_resume_compares_with_an_older_record_fairly():
    """A setting added to the library since the run was recorded counts as its default; a removed one is ignored."""
    cfg = load_config(FAST[1::2])
    old = cfg.to_dict()
    del old["ppo"]["temperature"]  # recorded before the setting existed: the default (1.0) is what ran
    old["ppo"]["a_removed_setting"] = 3
    assert preflight.config_changes(old, cfg) == []
    old["task"]["options"]["think"] = True
    assert preflight.config_changes(old, cfg) == [("task.options.think", True, None)]
    assert preflight.config_changes(old, cfg.replace({"ppo.steps": 99, "threads": 2})) == [
        ("task.options.think", True, None)
    ]
