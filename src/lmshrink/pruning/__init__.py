"""Pruning: magnitude (the lab's ``apply_weight_pruning``), Wanda, SparseGPT, N:M, and structured pruning of heads,
MLP neurons and blocks. One entry point: :func:`prune_model` with a :class:`PruneConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmshrink.pruning.api import prune_model
    from lmshrink.pruning.config import PruneConfig
    from lmshrink.pruning.magnitude import apply_weight_pruning
    from lmshrink.pruning.masks import PruningMasks
    from lmshrink.pruning.report import PruneReport

_LAZY = {
    "prune_model": "lmshrink.pruning.api",
    "PRUNERS": "lmshrink.pruning.api",
    "PruneConfig": "lmshrink.pruning.config",
    "apply_weight_pruning": "lmshrink.pruning.magnitude",
    "PruningMasks": "lmshrink.pruning.masks",
    "PruneReport": "lmshrink.pruning.report",
}

__all__ = ["PRUNERS", "PruneConfig", "PruneReport", "PruningMasks", "apply_weight_pruning", "prune_model"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmshrink.pruning' has no attribute {name!r}")
