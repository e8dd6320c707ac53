"""Tasks: prompts, rewards and dataset loaders (Countdown, MATH, HH).

Every task is a :class:`~tre_edu.tasks.base.Task`; look one up by name with :func:`get_task`.
Modules are imported lazily so that ``import tre_edu.tasks`` stays cheap.
"""

from __future__ import annotations

import importlib

from tre_edu.tasks.base import Task

_REGISTRY = {
    "countdown": "tre_edu.tasks.countdown",
    "math": "tre_edu.tasks.math",
    "hh": "tre_edu.tasks.hh",
}

TASK_NAMES = tuple(_REGISTRY)


def get_task(name: str, **options) -> Task:
    """Return the task called ``name`` (one of :data:`TASK_NAMES`), built with ``options``.

    Each task module defines ``make_task(**options) -> Task``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"task must be one of {', '.join(TASK_NAMES)}; got {name!r}")
    module = importlib.import_module(_REGISTRY[name])
    return module.make_task(**options)


__all__ = ["Task", "TASK_NAMES", "get_task"]
