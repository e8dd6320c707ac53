"""Run folders that survive a crash and never run code: atomic folders, a completeness marker, plain-data loads,
one job per folder.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` holding ``trainer_state.pt`` (tensors and plain Python data
only), the run's ``config.yaml`` and a ``COMPLETE`` marker written last, built under a temporary name and renamed
into place (:func:`atomic_folder`), so a run killed mid-save leaves the old folder or the new one, never a half one.
Loading uses ``torch.load(weights_only=True)``: a file that would unpickle to anything else is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks
    fcntl = None

import numpy as np
import torch

from tre_edu import distributed

STATE_FILE = "trainer_state.pt"
MARKER = "COMPLETE"
LOCK_FILE = ".tre-edu.lock"
CONFIG_FILE, CONFIG_HISTORY = "config.yaml", "config_history.yaml"


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


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether ``err`` (raised while writing into ``folder``) means the disk is full: errno ENOSPC, a library's
    wording of it (torch's C++ writer only says ``iostream error``), or less than 1 MiB left there."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(w in str(err) for w in ("No space left", "os error 28", "Disk quota")):
        return True
    with contextlib.suppress(OSError):
        return isinstance(err, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 2**20
    return False


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def atomic_folder(path: str | Path, what: str = "folder", marker: dict | None = None) -> Iterator[Path]:
    """Build the folder ``path`` in a temporary sibling ``.<name>.tmp`` (yielded), then write the ``COMPLETE``
    marker (``marker`` as its JSON), flush to disk and rename it to ``path`` (replacing an older one). An error
    inside leaves ``path`` as it was; a full disk becomes ``OSError(ENOSPC)`` naming ``what``, folder and free space."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        (tmp / MARKER).write_text(json.dumps(marker or {}) + "\n")
        _fsync_tree(tmp)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, tmp.parent if tmp.parent.exists() else Path("."))
        free = _free(tmp.parent) if full else ""
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while writing {what} {path} ({free}; nothing partial was left, an earlier "
                f"complete {what} is kept). Free some space and run again (with --resume to continue a run)",
            ) from err
        raise
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def is_complete(path: str | Path) -> bool:  # written to the end: carries the COMPLETE marker
    return (Path(path) / MARKER).is_file()


def _open_for_writing(file: Path):
    """``file`` opened for binary writing (torch's own C++ writer reports a full disk as ``iostream error``)."""
    return file.open("wb")


def save(path: str | Path, state: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    """Write ``state`` (and small text ``files``: name -> content) as a complete checkpoint folder ``path``
    (:func:`atomic_folder`)."""
    with atomic_folder(path, "checkpoint", {"step": state.get("step")}) as tmp:
        with _open_for_writing(tmp / STATE_FILE) as f:  # a Python file: a full disk raises OSError(ENOSPC)
            torch.save(state, f)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)


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
    """(folder, state) of the newest checkpoint that loads (FileNotFoundError if none); incomplete or unreadable
    ones are skipped with a warning."""
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
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash is dropped
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ---- a PPO trainer's whole state ---------------------------------------------------------------------------------
def check_finite(model: Any, what: str) -> None:
    """Refuse (FloatingPointError) to save ``what`` while a parameter of ``model`` holds NaN / inf."""
    bad = [n for n, q in model.named_parameters() if not bool(torch.isfinite(q).all())]
    if bad:
        raise FloatingPointError(
            f"refusing to save {what}: {len(bad)} parameter(s) hold NaN / inf "
            f"(first: {bad[0]}); the run diverged — lower the learning rate or the coefficient"
        )


def save_trainer(trainer: Any, path: Path) -> Path:
    """A :class:`~tre_edu.trainer.PPOTrainer`'s state at ``path``: weights and optimisers (FSDP: each rank's shards,
    :mod:`tre_edu.distributed`), schedules, RNGs, data position, regulariser draw, history; written atomically, never
    with non-finite weights."""
    check_finite(trainer.unwrapped, f"a checkpoint at step {trainer.step}")
    acc = trainer.accelerator
    acc.wait_for_everyone()
    own = {"rng": rng_state(), "sampling_generator": trainer.sampling_generator.get_state()}
    weights = distributed.save_weights(acc, path, trainer.policy, trainer.optim.optimizers, own)
    if acc.is_main_process:
        state = {
            **weights,  # model + optimisers (FSDP: each rank wrote its shards beside the folder)
            "schedulers": trainer.optim.state_dict()["schedulers"],
            "skipped_updates": trainer.optim.skipped,
            **own,
            "regularizer": trainer.regularizer.state_dict(),
            "stream": trainer.stream.state_dict(),
            "step": trainer.step,
            "history": trainer.history,
            "eval_history": trainer.eval_history,
        }
        save(path, state, {"config.yaml": trainer.config.to_yaml()})
    distributed.finish_save(acc, path)  # moves the shards / per-rank RNG files in; all ranks wait
    return path


def load_trainer(trainer: Any, path: str | Path) -> Path:
    """Restore :func:`save_trainer`'s state into ``trainer`` (``"latest"``: the newest complete checkpoint under its
    output_dir; incomplete ones are skipped with a warning) and cut its ``metrics.jsonl`` back to that step."""
    if str(path) == "latest":
        path, state = load_latest(trainer.output_dir)
    else:
        path, state = Path(path), load(path)
    own = distributed.load_weights(trainer.accelerator, path, state, trainer.policy, trainer.optim.optimizers)
    state = {**state, **own}  # several processes: this rank's own RNG states
    trainer.optim.load_state_dict({"schedulers": state["schedulers"], "skipped": state["skipped_updates"]})
    set_rng_state(state["rng"])
    trainer.sampling_generator.set_state(state["sampling_generator"])
    trainer.regularizer.load_state_dict(state["regularizer"])
    trainer.stream.load_state_dict(state["stream"])
    trainer.step, trainer.history, trainer.eval_history = state["step"], state["history"], state["eval_history"]
    if trainer.accelerator.is_main_process:
        truncate_jsonl(trainer.metrics_file, trainer.step)
    return path


# ---- one job per folder ------------------------------------------------------------------------------------------
class DirectoryInUse(OSError):
    """Another process holds the lock of a run's output_dir or a study's results folder."""


class DirectoryLock:
    """An exclusive ``flock`` on ``folder/.tre-edu.lock`` (the folder created if missing; the file holds the holder's
    pid) for the lifetime of a job, so a second job into the folder raises :class:`DirectoryInUse` naming ``what``
    and that pid. The kernel drops the lock when the holder dies, even on ``kill -9``, so no stale lock is left; a
    released lock removes its file (and the folder, if it created it and it is still empty). A no-op on Windows."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> DirectoryLock:
        if fcntl is None or self._fd is not None:
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DirectoryInUse(
                    f"{self.what} {self.folder} is in use by another tre-edu process (pid {holder}; lock file "
                    f"{self.path}): wait for it to finish or stop it, or choose another folder"
                ) from None
            # a holder that released the lock meanwhile removed the file we opened: take the new one
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None
        if self._created:  # a job refused before it wrote anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_directory(folder: str | Path, what: str = "folder") -> DirectoryLock:
    """A held :class:`DirectoryLock` on ``folder`` (``with lock_directory(out, "output_dir"): ...``)."""
    return DirectoryLock(folder, what).acquire()


# ---- the run's config record -------------------------------------------------------------------------------------
def write_config(output_dir: str | Path, text: str, note: str = "") -> Path:
    """Write the run's ``config.yaml`` atomically; an earlier one with other content is first appended to
    ``config_history.yaml`` (oldest first, each after a comment saying when it was replaced, and ``note``)."""
    out = Path(output_dir)
    current, history = out / CONFIG_FILE, out / CONFIG_HISTORY
    if current.is_file() and (old := current.read_text()) != text:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with history.open("a") as f:
            f.write(f"# {CONFIG_FILE} until {stamp}{f' ({note})' if note else ''}\n---\n{old.rstrip()}\n")
            f.flush()
            os.fsync(f.fileno())
    tmp = current.with_name(f".{CONFIG_FILE}.tmp")
    tmp.write_text(text)
    os.replace(tmp, current)
    return current


def warm_start_complete(folder: str | Path) -> bool:
    """Whether a warm-start folder was written to the end: its ``COMPLETE`` marker, or for one written before the
    marker existed, its ``sft_history.json`` (then written last) holding complete JSON next to the model."""
    folder = Path(folder)
    if is_complete(folder):
        return True
    history = folder / "sft_history.json"
    if not (history.is_file() and (folder / "config.json").is_file()):
        return False
    try:
        json.loads(history.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return True
