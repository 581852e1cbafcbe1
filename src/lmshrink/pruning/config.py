"""The pruning configuration: one validated object; YAML/CLI are its serializations."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP
from lmshrink.pruning.masks import check_sparsity, parse_nm

Method = Literal["magnitude", "wanda", "sparsegpt", "nm", "heads", "neurons", "layers"]
CALIBRATED: frozenset[str] = frozenset({"wanda", "sparsegpt", "heads", "neurons", "layers"})
STRUCTURED: frozenset[str] = frozenset({"heads", "neurons", "layers"})


class PruneConfig(BaseModel):
    """How to prune.

    - ``method``: ``magnitude`` | ``wanda`` | ``sparsegpt`` (unstructured), ``nm`` (N:M semi-structured, scored by
      ``nm_score``), ``heads`` | ``neurons`` | ``layers`` (structured, physically removed).
    - ``sparsity``: fraction in [0, 1): of weights (unstructured), of attention heads / MLP neurons / blocks
      (structured). Implied by ``nm`` for the ``nm`` method.
    - ``nm``: ``"2:4"`` etc.; with ``magnitude``/``wanda``/``sparsegpt`` it imposes that pattern instead of a ratio.
    - ``scope`` (magnitude): ``layer`` (each layer loses exactly ``sparsity``), ``row`` (each output row), or
      ``global`` (one threshold over all targeted layers).

    >>> PruneConfig(method="wanda", sparsity=0.5).nm is None
    True
    """

    model_config = ConfigDict(extra="forbid")

    method: Method
    sparsity: float | None = None
    nm: str | None = None
    nm_score: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    scope: Literal["layer", "row", "global"] = "layer"
    targets: list[str] = Field(default_factory=lambda: [r".*"])
    skip: list[str] = Field(default_factory=lambda: list(DEFAULT_SKIP))
    blocksize: int = Field(128, gt=0)
    percdamp: float = Field(0.01, ge=0.0)
    min_keep: float = Field(
        0.1, ge=0.0, lt=1.0, description="structured: least fraction of units kept per block"
    )
    reconstruct: bool = Field(
        False,
        description="heads/neurons: after removal, re-fit o_proj/down_proj by least squares on calibration "
        "activations (block by block, inputs from the already pruned blocks)",
    )
    layer_importance: Literal["influence", "loss"] = Field(
        "influence",
        description="layers: rank blocks by Block Influence (1 - cos of input/output hidden states) or by the "
        "measured calibration-loss increase when each block alone is skipped",
    )
    calib: str = "c4"
    n_samples: int = Field(64, gt=0)
    seq_len: int = Field(512, gt=0)
    seed: int = 0

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | None) -> float | None:
        return None if v is None else check_sparsity(v)

    @field_validator("nm")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        if v is None:
            return None
        n, m = parse_nm(v)
        return f"{n}:{m}"

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        if self.method == "nm":
            self.nm = self.nm or "2:4"
            n, m = parse_nm(self.nm)
            implied = 1 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise LmshrinkError(
                    f"N:M {self.nm} implies sparsity {implied:g}; drop sparsity or set it to that"
                )
            self.sparsity = implied
        elif self.nm is not None and self.method in STRUCTURED:
            raise LmshrinkError(f"nm applies to unstructured methods, not to {self.method!r}")
        elif self.nm is None and self.sparsity is None:
            raise LmshrinkError(f"method {self.method!r} needs a sparsity in [0, 1), e.g. sparsity=0.5")
        if self.reconstruct and self.method not in ("heads", "neurons"):
            raise LmshrinkError(f"reconstruct applies to methods 'heads' and 'neurons', not {self.method!r}")
        if self.layer_importance != "influence" and self.method != "layers":
            raise LmshrinkError(f"layer_importance applies to method 'layers', not {self.method!r}")
        return self

    @property
    def nm_tuple(self) -> tuple[int, int] | None:
        """The N:M pattern as integers, or ``None``."""
        return parse_nm(self.nm) if self.nm else None

    @property
    def needs_calibration(self) -> bool:
        """True when the method scores weights with calibration activations."""
        if self.method == "nm":
            return self.nm_score != "magnitude"
        return self.method in CALIBRATED


def make_config(**kwargs: object) -> PruneConfig:
    """Build a :class:`PruneConfig`, turning validation failures into one-line :class:`LmshrinkError` messages.

    >>> make_config(method="magnitude", sparsity=0.2).sparsity
    0.2
    """
    from pydantic import ValidationError

    try:
        return PruneConfig(**kwargs)  # type: ignore[arg-type]
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msgs.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise LmshrinkError("invalid pruning config: " + "; ".join(msgs)) from None
