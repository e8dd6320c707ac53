"""Models: the tiny CPU model (:mod:`tre_edu.models.tiny`) and pretrained hub models
(:mod:`tre_edu.models.hub`).

Submodules are imported on use so that ``import tre_edu.models`` stays cheap (no transformers import).
"""

from __future__ import annotations

__all__ = ["hub", "tiny"]
