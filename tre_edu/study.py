"""Studies: a grid of PPO runs over named axes, run by several worker processes, resumable, and its report.

A study file (``configs/studies/<name>.yaml``)::

    name: leak                        # results go to data/results/<name>/
    configs: [../countdown_tiny.yaml] # the base config files (relative to the study file), merged left to right
    set: {threads: 1, ppo.steps: 60}  # dotted overrides for every run
    horizons:                         # named sets of overrides for the "horizon" axis
      think: {task.options.think: true, ppo.max_new_tokens: 64}
    grids:                            # each grid is the product of its axes; cells repeated across grids run once
      - axes: {method: [entropy, tre-k], coefficient: [0.001, 0.01], tail: [20000], horizon: [think], seed: [0, 1, 2]}
      - axes: {method: [none, forking, kl-cov], tail: [20000], horizon: [think], seed: [0, 1, 2]}

Axes: ``method`` (a regularizer kind or preset name), ``coefficient`` (``regularizer.coef``, paper units; ignored by
methods without an entropy term), ``tail`` (``model.tail_tokens``), ``horizon``, ``seed``, and any dotted config
field (``ppo.actor_lr: [1e-4, 3e-4]``). Runs that share ``model``, ``sft``, ``task`` and the seed share a warm start.

Resumption: a finished cell is a complete ``<cell>.jsonl`` (:func:`read_cell`) and is skipped; a cell stopped midway
left ``<cell>.jsonl.part`` and reruns; an incomplete cell file is set aside as ``<cell>.jsonl.bad`` (never deleted)
and the cell reruns. One ``study run`` at a time holds the results folder (a lock naming its pid). Each evaluation
is one JSON line: axes, coefficients, seed, step, eval and training-batch metrics, resolved config, code version.

The report gives, for every cell without its seed, the mean over seeds and a 95 % Student-t interval,
``mean +- t_{0.975, n-1} * s / sqrt(n)``, of the final evaluation, as a markdown table and plotly figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import time
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
import yaml
from tqdm.auto import tqdm

from tre_edu import checkpoint
from tre_edu.config import KINDS, PRESETS, TrainConfig, load_config
from tre_edu.env import repo_root
from tre_edu.pipeline import run_eval, run_training, run_warm_start
from tre_edu.regularizers import ENTROPY_KINDS
from tre_edu.trainer import Callback

NAMED_AXES = ("method", "coefficient", "tail", "horizon", "seed")
# training-batch metrics copied into each evaluation line
TRAIN_KEYS = ("reward/mean", "tail/mass_outside_top10", "entropy/global", "response/length_mean", "time/step")
# report columns: (eval key, header, scale)
COLUMNS = (
    ("greedy_accuracy", "greedy %", 100),
    ("sampled_accuracy", "sampled pass@1 %", 100),
    ("pass@8", "pass@8 %", 100),
    ("tail_response_frac", "responses with a tail token %", 100),
    ("mass_outside_top10", "mass outside top-10", 1),
)
# A run *leaked* when at least this fraction of its sampled evaluation responses hold a tail token. Leaks are tipping
# events: in the recorded tail_leak study the leaked runs end at 94.8-100 % and all others at <= 10.6 %.
LEAK_FRAC = 0.5
# two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (above 30: the normal 1.96 plus a small correction)
_T975 = [
    float(t)
    for t in """12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145
    2.131 2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042""".split()
]


# ---- the grid ---------------------------------------------------------------------------------------------------
def load_study(path: str | Path) -> dict[str, Any]:
    """The study file as a dict, with ``configs`` made absolute and ``cells`` = the list of cells (each a dict of
    axis values, in grid order, duplicates removed)."""
    path = Path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    if unknown := set(spec) - {"name", "configs", "set", "horizons", "methods", "grids", "description"}:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}")
    spec.setdefault("name", path.stem)
    spec["configs"] = [str((path.parent / c).resolve()) for c in spec.get("configs", [])]
    for key in ("set", "horizons", "methods"):
        spec.setdefault(key, {})
    if not spec.get("grids"):
        raise ValueError(f"{path}: a study needs `grids:` (a list of {{axes: {{name: [values]}}}})")
    cells: list[dict] = []
    for i, grid in enumerate(spec["grids"]):
        axes = grid.get("axes") or {}
        if not axes or not all(isinstance(v, list) and v for v in axes.values()):
            raise ValueError(f"{path}: grids[{i}].axes must map axis names to non-empty lists")
        for bad in [a for a in axes if a not in NAMED_AXES and "." not in a]:
            raise ValueError(
                f"{path}: grids[{i}]: unknown axis {bad!r} (use {', '.join(NAMED_AXES)} or a dotted field)"
            )
        for h in [h for h in axes.get("horizon", []) if h not in spec["horizons"]]:
            raise ValueError(f"{path}: horizon {h!r} is not defined under `horizons:`")
        for values in itertools.product(*axes.values()):
            cell = dict(zip(axes, values))
            if "coefficient" in cell and _method(cell) not in ENTROPY_KINDS:
                del cell["coefficient"]  # no entropy term: the coefficient axis does not apply
            order = [a for a in NAMED_AXES if a in cell] + sorted(a for a in cell if a not in NAMED_AXES)
            cell = {a: cell[a] for a in order}  # one order for every grid: the same cell has the same id
            if cell not in cells:
                cells.append(cell)
    spec["cells"] = cells
    return spec


def _method(cell: dict) -> str:
    m = cell.get("method", "none")
    return PRESETS[m].get("kind", m) if m in PRESETS else m


def cell_id(cell: dict) -> str:
    """A file-name-safe id from the axis values: ``method-entropy_coefficient-0.01_tail-20000_seed-0``."""
    return "_".join(f"{k}-{v}" for k, v in cell.items()).replace("/", "-").replace(" ", "")


def cell_config(spec: dict, cell: dict) -> TrainConfig:
    """The resolved config of one cell: base files, then ``set``, then the horizon, method and other axes."""
    over: dict[str, Any] = dict(spec["set"])
    if "horizon" in cell:
        over.update(spec["horizons"][cell["horizon"]])
    if "method" in cell:
        m = cell["method"]
        if m in spec["methods"]:
            over.update(spec["methods"][m])
        elif m in PRESETS:
            over.update({f"regularizer.{k}": v for k, v in PRESETS[m].items()})
        elif m in KINDS:
            over["regularizer.kind"] = m
        else:
            raise ValueError(f"method {m!r} is neither a regularizer kind ({', '.join(KINDS)}) nor a preset")
    if cell.get("coefficient") is not None:
        over["regularizer.coef"] = float(cell["coefficient"])
    over.update({field: int(cell[a]) for a, field in (("tail", "model.tail_tokens"), ("seed", "seed")) if a in cell})
    over.update({k: v for k, v in cell.items() if "." in k})
    return load_config(spec["configs"], over)


def warm_key(cfg: TrainConfig) -> str:
    """Runs with the same model, warm start, task and seed share one warm start: a hash of those settings."""
    d = cfg.to_dict()
    blob = json.dumps({k: d[k] for k in ("model", "sft", "task", "seed")}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def code_version(root: str | Path | None = None) -> str:
    """``git describe --always --dirty`` of the checkout, "unknown" outside git."""
    try:
        cmd = ["git", "describe", "--always", "--dirty"]
        out = subprocess.run(cmd, cwd=root or repo_root(), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):  # FileNotFoundError (no checkout, no git) is an OSError
        return "unknown"


# ---- running --------------------------------------------------------------------------------------------------
class _Recorder(Callback):
    """Writes one JSON line per evaluation of a cell to ``path``; each line carries the training-batch metrics
    (:data:`TRAIN_KEYS`) of every step since the previous evaluation as ``train_curve``."""

    def __init__(self, path: Path, meta: dict, start_eval: dict | None = None):
        self.path, self.meta, self.curve, self.t0 = path, meta, [], time.perf_counter()
        self.start_eval = start_eval  # the warm start's evaluation, when the trainer skips its own at step 0

    def on_train_begin(self, trainer):
        self.meta["vocab_size"] = V = len(trainer.tokenizer)
        self.meta["effective_coef"] = trainer.regularizer.effective_coef(V)
        if self.start_eval is not None:
            self.on_evaluate(trainer, 0, self.start_eval)

    def on_step_end(self, trainer, step, metrics):
        self.curve.append({"step": step, **{k: float(f"{metrics[k]:.5g}") for k in TRAIN_KEYS if k in metrics}})

    def on_evaluate(self, trainer, step, metrics):
        ev = {k.removeprefix("eval/"): float(v) for k, v in metrics.items()}
        line = {**self.meta, "step": step, "seconds": round(time.perf_counter() - self.t0, 1), "eval": ev}
        line["train_curve"], self.curve = self.curve, []
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def _init_worker() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _warm_job(cfg_dict: dict, out: str) -> dict:
    cfg, out_p = TrainConfig.from_dict(cfg_dict), Path(out)
    part = out_p.with_name(out_p.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    res = run_warm_start(cfg, part, progress=False)
    part.rename(out_p)
    return res["summary"]


def _warm_eval(cfg: TrainConfig) -> dict:
    """The evaluation of the warm start ``cfg.init_from`` with the cell's eval settings, computed once and kept
    next to it (the same for every method that starts there)."""
    d = cfg.to_dict()
    blob = json.dumps({"eval": d["eval"], "task": d["task"], "R": cfg.ppo.max_new_tokens}, sort_keys=True, default=str)
    f = Path(cfg.init_from) / f"eval_{hashlib.sha1(blob.encode()).hexdigest()[:12]}.json"
    if not f.is_file():
        res = run_eval(cfg, cfg.init_from)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v for k, v in res.items() if k not in ("model_dir", "n", "data_source")}))
        tmp.replace(f)
    return {f"eval/{k}": v for k, v in json.loads(f.read_text()).items()}


def warm_fingerprint(warm_dir: str | Path) -> str:
    """sha256 (first 16 hex digits) of a warm start's weights: recorded in every line of a cell that starts there."""
    h = hashlib.sha256()
    with (Path(warm_dir) / "model.safetensors").open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _warm_mismatch(warm_dir: Path, recorded: list[tuple[str, dict]], cfg: TrainConfig) -> str | None:
    """Why the warm start in ``warm_dir`` is not the one the ``recorded`` cells (cell id, first line) started from,
    or None. Lines with a ``warm_start`` fingerprint are compared by it; older lines by their step-0 evaluation
    (the warm start's, the same for every cell that starts there; evaluated here once, cached for the cells)."""
    now, ev = warm_fingerprint(warm_dir), None
    for cid, line in recorded:
        then = (line.get("warm_start") or {}).get("sha256")
        if then is not None:
            same = then == now
        elif line.get("step") == 0:
            if ev is None:
                over = {"init_from": str(warm_dir), "sft.enabled": False, "eval.at_start": False}
                ev = {k.removeprefix("eval/"): v for k, v in _warm_eval(cfg.replace(over)).items()}
            same = all(ev.get(k) == v for k, v in line["eval"].items())
        else:
            continue  # a line without a fingerprint or a step-0 evaluation: nothing to compare
        if not same:
            return (
                f"warm start {warm_dir.name} is not the one recorded cell {cid} started from (retrained since, e.g. "
                "on another machine: 200 supervised steps do not reproduce bit for bit across CPUs), so this "
                "cell's paired differences would be meaningless. Restore that warm start, or move the recorded "
                "cells of this (tail, horizon, seed) aside and run them all again"
            )
    return None


def _cell_job(cfg_dict: dict, result: str, meta: dict) -> dict:
    cfg, result_p = TrainConfig.from_dict(cfg_dict), Path(result)
    part = result_p.with_name(result_p.name + ".part")
    part.unlink(missing_ok=True)
    t0, start = time.perf_counter(), None
    if cfg.init_from and getattr(cfg.eval, "at_start", True) is False:
        start = _warm_eval(cfg)
        meta = {**meta, "warm_start": {"key": Path(cfg.init_from).name, "sha256": warm_fingerprint(cfg.init_from)}}
    run_training(cfg, overwrite=True, callbacks=[_Recorder(part, meta, start)], progress=False)
    part.rename(result_p)
    return {"cell": meta["cell"], "seconds": round(time.perf_counter() - t0, 1)}


def _select(cells: list[dict], only: dict[str, list] | None) -> list[dict]:
    if not only:
        return cells
    axes = {k for c in cells for k in c}
    for axis in [a for a in only if a not in axes]:
        raise ValueError(f"only: unknown axis {axis!r}; this study's axes: {', '.join(sorted(axes))}")
    want = {axis: {str(v) for v in values} for axis, values in only.items()}
    return [c for c in cells if all(str(c.get(a)) in vs for a, vs in want.items())]


def run_study(
    path: str | Path,
    workers: int = 1,
    results_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    progress: bool = True,
    only: dict[str, list] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell of the study at ``path`` (warm starts first), ``workers`` processes at a time (1:
    in this process). ``only`` = ``{axis: [values]}`` runs just the cells whose axes take one of those values (e.g.
    one seed first); the others are left for a later call. Results: ``results_dir`` (default ``data/results/<name>/``);
    models and logs: ``runs_dir`` (default ``runs/studies/<name>/``, git-ignored).
    Returns ``{"done": [...], "skipped": [...], "failed": {cell: error}}`` (and ``"set_aside"`` when any).

    Every method of a seed must start from the same warm start, or the paired differences mean nothing. A warm start
    retrained later (a fresh machine) need not match bit for bit, so a cell runs only when its warm start is the one
    its recorded siblings started from (their ``warm_start.sha256``, or for older lines their step-0 evaluation,
    which errs on the safe side: on another CPU even the same weights may score differently); else it fails.
    """
    spec = load_study(path)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1; got {workers!r}")
    root = repo_root(Path(path).resolve().parent)
    results = Path(results_dir or root / "data" / "results" / spec["name"])
    runs = Path(runs_dir or root / "runs" / "studies" / spec["name"])
    with checkpoint.lock_directory(results, "the study's results folder"):
        return _run_study(spec, workers, results, runs, root, progress, only)


def _run_study(spec, workers, results: Path, runs: Path, root: Path, progress: bool, only) -> dict[str, Any]:
    version = code_version(root)
    todo, skipped, warm, recorded, set_aside = [], [], {}, {}, {}
    finished: dict[str, list[dict]] = {}
    for cell in spec["cells"]:  # the finished cells of every warm start, to check that a resumed one is the same
        cid = cell_id(cell)
        if (results / f"{cid}.jsonl").is_file():
            try:
                finished[cid] = read_cell(results / f"{cid}.jsonl")
            except ValueError as err:  # not complete: the cell is not done (set aside below when selected)
                set_aside[cid] = str(err)
            else:
                recorded.setdefault(warm_key(cell_config(spec, cell)), []).append((cid, finished[cid][0]))
    for cell in _select(spec["cells"], only):
        cid = cell_id(cell)
        if cid in finished:
            skipped.append(cid)
            continue
        if cid in set_aside:
            kept = _set_aside(results / f"{cid}.jsonl")
            set_aside[cid] = f"{set_aside[cid]}; kept as {kept.name}, the cell runs again"
            warnings.warn(f"study cell {set_aside[cid]}", stacklevel=2)
        cfg = cell_config(spec, cell)
        warm_dir = runs / "warm" / warm_key(cfg) if cfg.sft.enabled else None
        if warm_dir is not None:
            warm.setdefault(warm_dir.name, (cfg, warm_dir))
        todo.append((cell, cid, cfg, warm_dir))
    failed: dict[str, str] = {}
    done: list[str] = []
    spawn = get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker) if workers > 1 else None

    def run_all(jobs: list[tuple[str, Any, tuple]], desc: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        futures = {name: pool.submit(fn, *args) for name, fn, args in jobs} if pool else {}
        for name, fn, args in tqdm(jobs, desc=desc, disable=not progress or not jobs):
            try:
                out[name] = futures[name].result() if pool else fn(*args)
            except Exception as err:  # one broken cell must not stop the study
                failed[name] = f"{type(err).__name__}: {err}"
        return out

    try:
        # seed-major: every cell of the first seed (its warm starts, then its cells) before the next seed, so that a
        # study stopped early leaves complete seeds behind
        for seed in sorted({cfg.seed for _, _, cfg, _ in todo}):
            mine = {k: (c, d) for k, (c, d) in warm.items() if c.seed == seed}
            jobs = [(f"warm/{k}", _warm_job, (c.to_dict(), str(d))) for k, (c, d) in mine.items() if not d.is_dir()]
            run_all(jobs, f"warm starts, seed {seed}")
            mismatch = {
                k: _warm_mismatch(d, recorded[k], c) for k, (c, d) in mine.items() if k in recorded and d.is_dir()
            }
            jobs = []
            for cell, cid, cfg, warm_dir in (t for t in todo if t[2].seed == seed):
                name = warm_dir and warm_dir.name
                if name and (f"warm/{name}" in failed or mismatch.get(name)):
                    failed[cid] = f"warm start {name} failed" if f"warm/{name}" in failed else mismatch[name]
                    continue
                over = {"output_dir": str(runs / "cells" / cid)}
                if warm_dir is not None:  # evaluate the shared warm start once, not once per cell
                    over.update({"init_from": str(warm_dir), "sft.enabled": False, "eval.at_start": False})
                cfg = cfg.replace(over)
                kind = cfg.regularizer.kind
                meta = {"study": spec["name"], "cell": cid, "axes": cell, "method": cell.get("method", kind)}
                meta |= {"kind": kind, "coefficient": cell.get("coefficient"), "seed": cfg.seed}
                meta |= {"tail": cfg.model.tail_tokens, "horizon": cell.get("horizon"), "code_version": version}
                meta["config"] = cfg.to_dict()
                jobs.append((cid, _cell_job, (cfg.to_dict(), str(results / f"{cid}.jsonl"), meta)))
            done += list(run_all(jobs, f"study {spec['name']}, seed {seed}"))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    out: dict[str, Any] = {"done": done, "skipped": skipped, "failed": failed}
    if set_aside := {c: why for c, why in set_aside.items() if "runs again" in why}:
        out["set_aside"] = set_aside
    return out


def _set_aside(f: Path) -> Path:
    """Rename the incomplete cell file ``f`` to ``f.bad`` (``.bad.1``, ... when taken); returns the new path."""
    target, i = f.with_name(f.name + ".bad"), 0
    while target.exists():
        i += 1
        target = f.with_name(f"{f.name}.bad.{i}")
    os.replace(f, target)
    return target


# ---- the report -----------------------------------------------------------------------------------------------
# the keys of an evaluation line that the report reads (written by _Recorder)
RECORD_KEYS = ("cell", "axes", "method", "kind", "coefficient", "effective_coef", "seed", "tail", "horizon", "step",
               "eval")  # fmt: skip


def read_cell(f: str | Path) -> list[dict]:
    """The evaluation lines of one finished cell file, in step order. ValueError naming the file and the line when
    the record is not complete: an empty file, a line cut short (no newline at the end: the write was interrupted),
    a line that is not JSON or not a record of this cell (:data:`RECORD_KEYS`), steps repeated or out of order, or
    a last line before the cell's final step (``config.ppo.steps``)."""
    f = Path(f)
    data = f.read_bytes()
    if not data.strip():
        raise ValueError(f"{f}: empty ({len(data)} bytes): the cell's record is incomplete")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{f}, line {line}: not UTF-8 ({err.reason})") from None
    rows = text.split("\n")
    if rows[-1].strip():
        raise ValueError(f"{f}, line {len(rows)}: cut short (no newline at its end: the write was interrupted)")
    lines: list[dict] = []
    for no, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            line = json.loads(row)
        except json.JSONDecodeError as err:
            raise ValueError(f"{f}, line {no}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(line, dict):
            raise ValueError(f"{f}, line {no}: not a record (a JSON {type(line).__name__}, not an object)")
        if missing := [k for k in RECORD_KEYS if k not in line]:
            raise ValueError(f"{f}, line {no}: an incomplete record (without {', '.join(missing)})")
        if not isinstance(line["eval"], dict) or not isinstance(line["axes"], dict) or type(line["step"]) is not int:
            raise ValueError(f"{f}, line {no}: a malformed record (eval / axes must be objects, step an integer)")
        if line["cell"] != f.stem:
            raise ValueError(f"{f}, line {no}: a record of cell {line['cell']!r}, not of {f.stem!r}")
        lines.append(line)
    steps = [line["step"] for line in lines]
    if steps != sorted(set(steps)):
        raise ValueError(f"{f}: steps repeated or out of order ({steps})")
    want = ((lines[-1].get("config") or {}).get("ppo") or {}).get("steps")
    if isinstance(want, int) and steps[-1] != want:
        raise ValueError(f"{f}: the last record is step {steps[-1]} of {want}: records are missing")
    return lines


def load_results(path: str | Path, problems: dict[str, str] | None = None) -> list[dict]:
    """Every evaluation line of the finished cells in ``path`` (``.part`` files of unfinished cells and ``.bad``
    files set aside are ignored). A cell file that is not complete (:func:`read_cell`) is skipped with a warning
    naming it, and its reason is added to ``problems`` (file name -> reason) when given."""
    lines = []
    for f in sorted(Path(path).glob("*.jsonl")):
        try:
            lines += read_cell(f)
        except ValueError as err:
            warnings.warn(f"skipped: {err}", stacklevel=2)
            if problems is not None:
                problems[f.name] = str(err)
    return lines


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % Student-t interval); half-width nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96 + 2.5 / (n - 1)
    return mean, t * s / math.sqrt(n)


def _group_key(line: dict) -> tuple:
    axes = {k: v for k, v in line["axes"].items() if k != "seed"}
    return tuple(sorted((k, json.dumps(v)) for k, v in axes.items()))


def aggregate(lines: list[dict]) -> list[dict]:
    """One row per cell without its seed: axes, effective coefficient, seeds, and for every eval metric
    ``start`` (step 0) and ``final`` (last evaluation) as (mean, 95 % half-width) over seeds, plus the mean over
    seeds of the training-batch mass outside the top 10, ``tail_curve = [(step, mean), ...]``."""
    cells = [sorted(ls, key=lambda r: r["step"]) for ls in _by(lines, lambda line: line["cell"]).values()]
    rows = []
    for runs in _by(cells, lambda r: _group_key(r[0])).values():
        first = runs[0][0]
        row = {k: v for k, v in first["axes"].items() if k != "seed"}
        row |= {k: first[k] for k in ("method", "kind", "coefficient", "effective_coef", "tail")}
        row |= {"vocab_size": first.get("vocab_size"), "horizon": first["horizon"]}
        row |= {"seeds": sorted(r[0]["seed"] for r in runs), "steps": runs[0][-1]["step"], "start": {}, "final": {}}
        for key in sorted({k for r in runs for line in r for k in line["eval"]}):
            for which, pick in (("start", 0), ("final", -1)):
                vals = [r[pick]["eval"][key] for r in runs if key in r[pick]["eval"]]
                if vals:
                    row[which][key] = t_interval(vals)
        per_step = defaultdict(list)
        for point in (p for r in runs for line in r for p in line.get("train_curve", [])):
            if "tail/mass_outside_top10" in point:
                per_step[point["step"]].append(point["tail/mass_outside_top10"])
        row["tail_curve"] = [(s, sum(v) / len(v)) for s, v in sorted(per_step.items())]
        row["per_seed"] = {r[0]["seed"]: r[-1]["eval"] for r in runs}
        rows.append(row)
    _paired_deltas(rows)
    order = {m: i for i, m in enumerate(("none", "entropy", "tre-k", "tre-p", "forking", "kl-cov", "clip-cov"))}
    rows.sort(key=lambda r: (r["tail"], str(r["horizon"]), order.get(r["kind"], 99), r["coefficient"] or 0))
    return rows


def _paired_deltas(rows: list[dict], baseline: str = "none") -> None:
    """``row["delta"][key]`` = (mean, 95 % half-width) over seeds of the row's final ``key`` minus the
    ``baseline``'s of the same seed, tail and horizon. Every method of a seed starts from the same warm start and is
    evaluated on the same puzzles, so the paired difference removes the seed-to-seed spread of the warm starts
    (which dominates the unpaired intervals)."""
    base = {(r["tail"], r["horizon"]): r for r in rows if r["method"] == baseline}
    for r in rows:
        r["delta"] = {}
        b = base.get((r["tail"], r["horizon"]))
        if b is None or b is r:
            continue
        for key in r["final"]:
            diffs = _paired(r, b, key)
            if diffs:
                r["delta"][key] = t_interval(diffs)


def _paired(r: dict, b: dict, key: str) -> list[float]:
    """Row ``r``'s final ``key`` minus row ``b``'s, for every seed both have."""
    seeds = sorted(s for s in set(r["per_seed"]) & set(b["per_seed"]) if key in b["per_seed"][s])
    return [r["per_seed"][s][key] - b["per_seed"][s][key] for s in seeds if key in r["per_seed"][s]]


def _fmt(mean_hw: tuple[float, float] | None, scale: float) -> str:
    if mean_hw is None:
        return "–"
    m, hw = mean_hw
    if scale == 1:
        return f"{m:.1e}" + ("" if math.isnan(hw) else f" ± {hw:.0e}")
    return f"{m * scale:.1f}" + ("" if math.isnan(hw) else f" ± {hw * scale:.1f}")


def leaked_seeds(row: dict) -> tuple[int, int]:
    """(seeds whose final sampled responses hold a tail token in at least ``LEAK_FRAC`` of cases, seeds measured)."""
    fracs = [e["tail_response_frac"] for e in row["per_seed"].values() if "tail_response_frac" in e]
    return sum(f >= LEAK_FRAC for f in fracs), len(fracs)


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`aggregate`'s rows: final values, mean ± 95 % half-width over seeds."""
    ks = [int(k[5:]) for r in rows for k in r["final"] if k.startswith("pass@")]
    top = f"pass@{max(ks)}" if ks else "pass@8"  # the largest k measured
    columns = [(top, f"{top} %", s) if k == "pass@8" else (k, h, s) for k, h, s in COLUMNS]
    head = ["tail", "horizon", "method", "coef", "eff. coef", "seeds", "steps", "greedy % at start"]
    head += [columns[0][1], "Δ greedy vs none (paired), points"] + [h for _, h, _ in columns[1:]]
    head.insert(head.index("responses with a tail token %") + 1, "seeds leaked")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        coef = "–" if r["coefficient"] is None else f"{r['coefficient']:g}"
        eff = "–" if not r["effective_coef"] else f"{r['effective_coef']:.3g}"
        cells = [f"{r['tail']:,}", str(r["horizon"] or "–"), r["method"], coef, eff, str(len(r["seeds"]))]
        cells += [str(r["steps"]), _fmt(r["start"].get("greedy_accuracy"), 100)]
        cells += [_fmt(r["final"].get(k), s) for k, _, s in columns]
        delta = r.get("delta", {}).get("greedy_accuracy")
        cells.insert(9, "–" if delta is None else ("+" if delta[0] >= 0 else "") + _fmt(delta, 100))
        n, of = leaked_seeds(r)
        cells.insert(head.index("seeds leaked"), f"{n}/{of}" if of else "–")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def figures(rows: list[dict]) -> dict[str, go.Figure]:
    """Plotly figures of the aggregated rows: final metric vs coefficient (one line per method, per tail and
    horizon) and vs tail size (per horizon and coefficient), with 95 % intervals as error bars; and the mass
    outside the top 10 on the training batches, step by step (mean over seeds, log scale)."""
    figs: dict[str, go.Figure] = {}

    for (tail, horizon), grp in _by(rows, lambda r: (r["tail"], r["horizon"])).items():
        if any(r["tail_curve"] for r in grp):
            fig = go.Figure()
            for r in grp:
                name = r["method"] if r["coefficient"] is None else f"{r['method']} {r['coefficient']:g}"
                fig.add_scatter(x=[s for s, _ in r["tail_curve"]], y=[v for _, v in r["tail_curve"]], name=name)
            fig.update_layout(
                template="plotly_white",
                title=f"mass outside the top 10 (training batches, mean over seeds), tail {tail:,}, horizon {horizon}",
                xaxis_title="PPO step",
                yaxis={"type": "log", "title": "mass outside top-10"},
            )
            figs[f"train_tail_tail{tail}_{horizon}"] = fig
        swept = [r for r in grp if r["coefficient"] is not None]
        if len({r["coefficient"] for r in swept}) < 2 or len({r["method"] for r in swept}) < 2:
            continue  # a coefficient figure compares methods: two or more of them swept
        lines = {m: sorted(rs, key=lambda r: r["coefficient"]) for m, rs in _by(swept, lambda r: r["method"]).items()}
        for key, title, scale in COLUMNS[:1] + COLUMNS[3:4]:
            fig = _lines_figure(
                lines, "coefficient", key, scale, f"{title}, tail {tail:,}, horizon {horizon}",
                "coefficient (paper units)", title,
            )  # fmt: skip
            for r in grp:
                if r["coefficient"] is None:
                    fig.add_hline(y=_bar(r, key, scale)[0], line_dash="dot", annotation_text=r["method"])
            figs[f"coef_{key}_tail{tail}_{horizon}"] = fig
    for horizon, grp in _by(rows, lambda r: r["horizon"]).items():
        if len({r["tail"] for r in grp}) < 2:
            continue
        for key, title, scale in COLUMNS[:1] + COLUMNS[3:4]:
            fig = _lines_figure(
                _tail_lines(grp), "vocab_size", key, scale, f"{title} after PPO vs vocabulary size, horizon {horizon}",
                "V = 33 useful + tail tokens (log scale)", title,
            )  # fmt: skip
            figs[f"tail_{key.removesuffix('_accuracy')}_{horizon}"] = fig
    return figs


def _bar(r: dict, key: str, scale: float) -> tuple[float, float]:
    m, hw = r["final"].get(key, (math.nan, math.nan))
    return m * scale, (0.0 if math.isnan(hw) else hw * scale)


def _lines_figure(lines: dict, x: str, key: str, scale: float, title: str, xtitle: str, ytitle: str) -> go.Figure:
    """One line per entry of ``lines`` (name -> rows): row[x] against the final ``key`` with its 95 % interval."""
    fig = go.Figure()
    for name, rs in lines.items():
        ys = [_bar(r, key, scale) for r in rs]
        xs = [r[x] or r["tail"] for r in rs] if x == "vocab_size" else [r[x] for r in rs]
        err = {"array": [e for _, e in ys]}
        fig.add_scatter(x=xs, y=[y for y, _ in ys], error_y=err, name=name, mode="lines+markers")
    fig.update_layout(
        template="plotly_white",
        title=title,
        xaxis={"type": "log", "title": xtitle},
        yaxis={"title": ytitle, "range": [-2, 102] if scale == 100 else None},
    )
    return fig


def _tail_lines(rows: list[dict]) -> dict[str, list[dict]]:
    """The lines of the vs-tail-size figures: one per (method, coefficient) measured at >= 2 tail sizes; rows whose
    coefficient was set per tail (the same *effective* weight at every V) join one line per (method, effective
    weight), named ``"tre-k eff 0.01"``. Each line sorted by tail size."""
    lines: dict[str, list[dict]] = {}
    single: list[dict] = []
    for (method, coef), rs in _by(rows, lambda r: (r["method"], r["coefficient"])).items():
        if len(rs) >= 2:
            lines[method if coef is None else f"{method} {coef:g}"] = sorted(rs, key=lambda r: r["tail"])
        else:
            single += rs
    for (method, eff), rs in _by(single, lambda r: (r["method"], float(f"{r['effective_coef'] or 0:.2g}"))).items():
        if len(rs) >= 2:
            lines[f"{method} eff {eff:g}"] = sorted(rs, key=lambda r: r["tail"])
    return lines


def against_baseline(rows: list[dict], key: str = "greedy_accuracy", baseline: str = "none") -> list[str]:
    """One sentence per row: its final ``key`` next to the ``baseline`` method's of the same tail and horizon, and the
    paired difference over the seeds both have (mean and 95 % t-interval): "below" / "above" when the interval
    excludes 0, and how many seeds leaked (:func:`leaked_seeds`) where any did (the notebook and README state only
    what these sentences say)."""
    base = {(r["tail"], r["horizon"]): r for r in rows if r["method"] == baseline}
    out = []
    for r in rows:
        b = base.get((r["tail"], r["horizon"]))
        if b is None or r is b or key not in r["final"] or key not in b["final"]:
            continue
        diffs = _paired(r, b, key)
        if not diffs:
            continue
        d, hw = t_interval(diffs)
        if math.isnan(hw):
            verdict = "one seed: no interval"
        elif d + hw < 0:
            verdict = f"below {baseline} (paired interval excludes 0)"
        elif d - hw > 0:
            verdict = f"above {baseline} (paired interval excludes 0)"
        else:
            verdict = f"not distinguishable from {baseline}"
        coef = "" if r["coefficient"] is None else f" {r['coefficient']:g}"
        n, of = leaked_seeds(r)
        leaks = f"; {n} of {of} seeds leaked" if n else ""
        out.append(
            f"{r['method']}{coef} (tail {r['tail']:,}, {r['horizon']}): {key} {_fmt(r['final'][key], 100)} % vs "
            f"{baseline} {_fmt(b['final'][key], 100)} %; paired difference over {len(diffs)} seed(s) "
            f"{'+' if d >= 0 else ''}{_fmt((d, hw), 100)} points -> {verdict}{leaks}"
        )
    return out


def _by(rows, key) -> dict:
    out: dict = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def save_figures(figs: dict[str, go.Figure], out: str | Path) -> list[Path]:
    """Each figure as a static PNG (plotly image export: needs kaleido and a Chromium), else as HTML."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, static = [], True
    for name, fig in figs.items():
        if static:
            try:
                fig.write_image(out / f"{name}.png", width=900, height=500, scale=1)
                paths.append(out / f"{name}.png")
                continue
            except (ValueError, ImportError, RuntimeError) as err:  # no kaleido / no browser: interactive HTML
                static = False
                warnings.warn(
                    f"static PNG export failed ({str(err).strip().splitlines()[0]}); writing HTML figures instead. "
                    "Install the figures extra (pip install 'tre_edu[figures]') and a Chromium for PNGs.",
                    stacklevel=2,
                )
        fig.write_html(out / f"{name}.html", include_plotlyjs="cdn")
        paths.append(out / f"{name}.html")
    return paths


def report(path: str | Path, figures_dir: str | Path | None = None) -> str:
    """The markdown report of the results in ``path``: the table (mean ± 95 % t-interval over seeds) and, with
    ``figures_dir``, the figures written there (PNG, or HTML where static export is unavailable)."""
    problems: dict[str, str] = {}
    lines = load_results(path, problems)
    skipped = "; ".join(problems.values())
    if not lines:
        why = f"; skipped: {skipped}" if problems else ""
        raise ValueError(f"no finished cells in {path} (no complete *.jsonl files with evaluation lines{why})")
    rows = aggregate(lines)
    versions = sorted({str(line.get("code_version", "unknown")) for line in lines})
    text = table(rows) + f"\n\n{len({line['cell'] for line in lines})} cells; code version {', '.join(versions)}."
    if problems:
        text += f"\n\nSkipped {len(problems)} incomplete cell file(s) (`tre-edu study run` runs them again): {skipped}"
    if figures_dir is not None:
        files = save_figures(figures(rows), figures_dir)
        text += "\n\nFigures: " + ", ".join(str(p) for p in files)
    return text


__all__ = [
    "against_baseline",
    "aggregate",
    "cell_config",
    "cell_id",
    "figures",
    "load_results",
    "load_study",
    "read_cell",
    "report",
    "run_study",
    "save_figures",
    "t_interval",
    "table",
    "warm_key",
]
