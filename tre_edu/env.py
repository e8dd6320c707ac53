"""Where the code runs: fast mode for the notebooks and tests, and the repository root.

Plain Python, no torch: the notebooks import this first.
"""

from __future__ import annotations

import os
from pathlib import Path


def fast_mode() -> bool:
    """True when ``TRE_EDU_FAST`` is set to anything but ``""``, ``0``, ``false``, ``no`` or ``off``: the test
    command sets it, and the notebooks then shrink vocabularies, steps and horizons to run in seconds."""
    return os.environ.get("TRE_EDU_FAST", "").strip().lower() not in ("", "0", "false", "no", "off")


def pick(default, fast):
    """``fast`` in fast mode (see :func:`fast_mode`), else ``default``: ``V = pick(151_936, 8_192)``."""
    return fast if fast_mode() else default


def repo_root(start: str | Path | None = None) -> Path:
    """The source checkout's root (the folder holding ``configs/`` and ``pyproject.toml``), searched upwards from
    ``start`` (default: the working directory, e.g. ``notebooks/``), then from this package's own location.
    FileNotFoundError outside a checkout."""
    for base in (Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent):
        for d in (base, *base.parents):
            if (d / "configs").is_dir() and (d / "pyproject.toml").is_file():
                return d
    raise FileNotFoundError("not inside a tre_edu source checkout (no folder with configs/ and pyproject.toml)")
