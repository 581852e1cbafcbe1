"""What a pruning run did: per-layer sparsity and importance, parameter counts, the config, provenance."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field


class LayerRecord(BaseModel):
    """One pruned module (unstructured) or one block (structured)."""

    name: str
    shape: list[int] = Field(default_factory=list)
    sparsity: float = 0.0
    importance: list[float] | float | None = None
    removed: list[int] = Field(default_factory=list)
    kept: int | None = None
    error: float | None = None


class PruneReport(BaseModel):
    """The record of one :func:`lmshrink.pruning.prune_model` call."""

    method: str
    config: dict[str, Any]
    layers: list[LayerRecord] = Field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    weights_pruned: int = 0
    weights_total: int = 0
    seconds: float = 0.0
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Pruned fraction of the targeted weights (unstructured) or of the parameters (structured)."""
        if self.weights_total:
            return self.weights_pruned / self.weights_total
        return 1.0 - self.parameters_after / max(self.parameters_before, 1)

    def to_json(self) -> str:
        """JSON text with the derived overall sparsity included."""
        data = self.model_dump()
        data["sparsity"] = self.sparsity
        return json.dumps(data, indent=2, default=str)
