"""Tasks: prompts, rewards and dataset loaders (Countdown, MATH, HH).

Every task is a :class:`~tre_edu.tasks.base.Task`; look one up by name with :func:`get_task`. Task modules are
imported on first use, so ``import tre_edu.tasks`` (and :func:`check_options`) stays torch-free.
"""

from __future__ import annotations

import importlib

from tre_edu.tasks.base import OPTIONS, Task, check_options

TASK_NAMES = tuple(OPTIONS)


def get_task(name: str, **options) -> Task:
    """The task called ``name`` (one of :data:`TASK_NAMES`) built by ``tre_edu.tasks.<name>.make_task(**options)``."""
    check_options(name, options)
    return importlib.import_module(f"tre_edu.tasks.{name}").make_task(**options)


__all__ = ["Task", "TASK_NAMES", "check_options", "get_task"]
