"""Checkpoints that survive a crash and never run code: atomic writes, a completeness marker, plain-data loads.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` holding ``trainer_state.pt`` (tensors and plain Python data
only), the run's ``config.yaml`` and a ``COMPLETE`` marker written last. It is written under a temporary name and
renamed into place, so a run killed mid-save leaves either the old checkpoint set or the new one, never a half folder
under a real name. Loading uses ``torch.load(weights_only=True)``: a file that would unpickle to anything but
tensors, numbers, strings and containers is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
MARKER = "COMPLETE"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain data (NumPy's key array as a list of ints)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def save(path: str | Path, state: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    """Write ``state`` (and small text ``files``: name -> content) as a complete checkpoint folder ``path``.

    The folder is built as ``.path.tmp``, flushed to disk, marked complete and renamed to ``path`` (replacing an
    older folder of that name).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / STATE_FILE)
    for name, text in (files or {}).items():
        (tmp / name).write_text(text)
    (tmp / MARKER).write_text(json.dumps({"step": state.get("step")}) + "\n")
    _fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """The state of a complete checkpoint folder; ValueError for an incomplete, truncated or hostile one."""
    path = Path(path)
    file = path / STATE_FILE
    if not (path / MARKER).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker: the save was interrupted)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {file}: it holds objects other than tensors and plain data (weights_only load "
            f"failed: {str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"checkpoint {file} is unreadable (truncated or corrupt): {err}") from err


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders under ``output_dir/checkpoints`` that carry the marker, newest first."""
    folders = sorted((Path(output_dir) / "checkpoints").glob("step_*"), reverse=True)
    return [f for f in folders if (f / MARKER).is_file()]


def load_latest(output_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, state) of the newest checkpoint that loads; incomplete or unreadable ones are skipped with a warning.

    Raises FileNotFoundError when there is none.
    """
    root = Path(output_dir) / "checkpoints"
    for folder in sorted(root.glob("step_*"), reverse=True):
        try:
            return folder, load(folder)
        except ValueError as err:
            if "refusing" in str(err):
                raise
            warnings.warn(f"skipping {folder}: {err}", stacklevel=2)
    raise FileNotFoundError(f"no complete checkpoint under {root}")


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only the records of ``path`` with ``step <= last_step`` (a resumed run logs each step once)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
