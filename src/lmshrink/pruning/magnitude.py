"""Magnitude pruning (the lab's ``apply_weight_pruning``): drop the smallest ``|w|`` per layer, row, or globally."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP, linear_weight_oi
from lmshrink.pruning.masks import (
    PruningMasks,
    check_sparsity,
    global_threshold,
    layer_mask,
    nm_mask,
    row_mask,
)

log = logging.getLogger(__name__)

Scope = Literal["layer", "row", "global"]


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, scope: Scope = "layer", nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep-mask dropping the smallest-magnitude weights of one tensor (``scope`` "layer" or "row") or N:M.

    >>> w = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    >>> magnitude_mask(w, 0.5).tolist()
    [[False, True], [False, True]]
    """
    scores = weight.detach().abs().float()
    if nm is not None:
        return nm_mask(scores, *nm)
    if scope == "row":
        return row_mask(scores, sparsity)
    return layer_mask(scores, sparsity)


def _as_fraction(pruning_percentage: float) -> float:
    if isinstance(pruning_percentage, bool) or not isinstance(pruning_percentage, (int, float)):
        raise LmshrinkError(f"pruning_percentage must be a number, got {pruning_percentage!r}")
    p = float(pruning_percentage)
    if 1.0 <= p < 100.0:
        return p / 100.0
    if not 0.0 <= p < 1.0:
        raise LmshrinkError(
            f"pruning_percentage must be a fraction in [0, 1) (0.2 = 20%) or a percentage in [1, 100), got {p}"
        )
    return p


def select_modules(
    model: nn.Module,
    layer_type: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = DEFAULT_SKIP,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for modules of ``layer_type`` with a weight, matching ``targets`` and no ``skip`` regex."""
    target_re = [re.compile(p) for p in targets]
    skip_re = [re.compile(p) for p in skip]
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, layer_type) or not isinstance(getattr(mod, "weight", None), nn.Parameter):
            continue
        if any(r.search(name) for r in skip_re) or not any(r.search(name) for r in target_re):
            continue
        out.append((name, mod))
    return out


@torch.no_grad()
def apply_weight_pruning(
    model: nn.Module,
    pruning_percentage: float,
    layer_type: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear,
    *,
    scope: Scope = "layer",
    nm: tuple[int, int] | None = None,
    skip: Sequence[str] = DEFAULT_SKIP,
    targets: Sequence[str] = (r".*",),
    persist: bool = True,
) -> PruningMasks:
    """Magnitude-prune every ``layer_type`` module of ``model`` in place and return the masks.

    ``pruning_percentage`` is the fraction of weights removed in each layer: a fraction in [0, 1) (``0.2`` = 20%)
    or, for convenience, a percentage in [1, 100) (``20`` = 20%). ``scope="layer"`` removes exactly that share
    of every layer's weights (the lab's definition), ``"row"`` of every output row, ``"global"`` uses one
    threshold over all selected layers (layers then end up with different sparsities). Modules whose name
    matches a ``skip`` regex (embeddings, LM head, classifier by default) are left alone; pass ``skip=()`` to
    prune them too. With ``persist`` the masks stay attached (gradient hooks), so fine-tuning or distillation
    keeps the pruned weights at zero; ``masks.attach(model, optimizer)`` adds a re-apply after every step.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> masks = apply_weight_pruning(net, 0.5)
    >>> round(float((net[0].weight == 0).float().mean()), 2)
    0.5
    """
    fraction = check_sparsity(_as_fraction(pruning_percentage))
    modules = select_modules(model, layer_type, targets, skip)
    if not modules:
        raise LmshrinkError(f"no {layer_type} modules found to prune (after skip patterns {list(skip)})")
    masks: dict[str, torch.Tensor] = {}
    if scope == "global" and nm is None:
        threshold = global_threshold((linear_weight_oi(m).abs() for _, m in modules), fraction)
        for name, mod in modules:
            masks[name] = linear_weight_oi(mod).abs().float() > threshold
    elif scope in ("layer", "row", "global"):
        for name, mod in modules:
            masks[name] = magnitude_mask(
                linear_weight_oi(mod), fraction, "row" if scope == "row" else "layer", nm
            )
    else:
        raise LmshrinkError(f"scope must be 'layer', 'row' or 'global', got {scope!r}")
    pm = PruningMasks(masks)
    if persist:
        pm.attach(model)
    else:
        pm.apply(model)
    model.lmshrink_format = "sparse"  # type: ignore[assignment]
    log.info("magnitude pruning: %d modules, overall sparsity %.4f", len(pm), pm.overall_sparsity())
    return pm
