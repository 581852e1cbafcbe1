"""Pure mask math (scores in, boolean *keep* masks out) and :class:`PruningMasks`, which keeps pruned weights at zero.

Convention: a mask is ``True`` where the weight is **kept**. Scores are "higher = more important".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError

log = logging.getLogger(__name__)


def check_sparsity(sparsity: float) -> float:
    """Validate a sparsity fraction: ``0 <= sparsity < 1`` (``0.5`` removes half of the weights)."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not math.isfinite(sparsity):
        raise LmshrinkError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise LmshrinkError(
            f"sparsity must be in [0, 1) (the fraction of weights to remove, e.g. 0.5), got {sparsity}"
        )
    return float(sparsity)


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """Parse an N:M pattern (``"2:4"`` keeps 2 of every 4 consecutive input weights).

    >>> parse_nm("2:4")
    (2, 4)
    """
    if isinstance(nm, tuple):
        n, m = nm
    else:
        parts = str(nm).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise LmshrinkError(f"N:M pattern must look like '2:4' (keep N of every M), got {nm!r}")
        n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise LmshrinkError(f"N:M pattern needs 0 < N < M (e.g. 2:4 or 4:8), got {n}:{m}")
    return n, m


def _keep_all_but_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over a tensor that drops exactly the ``k`` lowest scores (ties at the threshold broken by index)."""
    flat = scores.flatten()
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values  # O(n) selection; much faster than a top-k of half the tensor
    drop = flat <= threshold
    extra = int(drop.sum()) - k
    if extra > 0:  # more ties at the threshold than needed: keep the last ``extra`` of them
        ties = (flat == threshold).nonzero().flatten()
        drop[ties[-extra:]] = False
    return (~drop).view_as(scores)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``round(sparsity * numel)`` lowest scores of the whole tensor (exact per-layer sparsity)."""
    k = round(check_sparsity(sparsity) * scores.numel())
    return _keep_all_but_lowest(scores, k)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the ``round(sparsity * in_features)`` lowest scores of every output row (Wanda's comparison group)."""
    k = round(check_sparsity(sparsity) * scores.shape[-1])
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=-1, largest=False, sorted=False).indices
        mask.scatter_(-1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along the input (last) dimension.

    >>> nm_mask(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), 2, 4).tolist()
    [[False, True, True, False]]
    """
    cols = scores.shape[-1]
    if cols % m != 0:
        raise LmshrinkError(
            f"N:M sparsity {n}:{m} needs the input dimension to be a multiple of {m}, got {cols}; "
            f"choose an M that divides {cols} or skip this layer"
        )
    groups = scores.reshape(-1, m)  # (rows * cols/m, m)
    idx = torch.topk(groups, m - n, dim=1, largest=False, sorted=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, idx, False)
    return mask.view_as(scores)


def global_threshold(score_list: Iterable[torch.Tensor], sparsity: float) -> float:
    """Score below which weights are dropped so that ``sparsity`` of all scores (all layers together) go."""
    flat = torch.cat([s.detach().flatten().float() for s in score_list])
    k = round(check_sparsity(sparsity) * flat.numel())
    if k == 0:
        return float("-inf")
    return float(torch.kthvalue(flat, k).values)


def sparsity_of(mask_or_weight: torch.Tensor) -> float:
    """Fraction of zeros (for a weight) or of ``False`` entries (for a keep-mask)."""
    t = mask_or_weight
    zeros = (~t).sum() if t.dtype == torch.bool else (t == 0).sum()
    return float(zeros) / max(t.numel(), 1)


class PruningMasks:
    """Keep-masks for named modules' weights, with hooks that keep pruned weights at zero during training.

    :meth:`attach` registers a gradient hook on each masked weight (the gradient of a pruned entry is zeroed,
    so SGD/Adam/AdamW started after pruning never move it) and, given an optimizer, an optimizer step hook that
    re-applies the masks (covers optimizer state that predates pruning, momentum, weight decay variants).

    >>> from torch import nn
    >>> lin = nn.Linear(4, 2)
    >>> masks = PruningMasks({"": torch.tensor([[True, False, True, False]] * 2)})
    >>> masks.apply(lin); float((lin.weight == 0).float().mean())
    0.5
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self._handles: list[Any] = []
        self._model: nn.Module | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def _weight(self, model: nn.Module, name: str) -> nn.Parameter:
        module = model.get_submodule(name) if name else model
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            raise LmshrinkError(f"module {name!r} has no weight parameter to mask")
        return weight

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Zero the pruned entries (in place)."""
        model = model if model is not None else self._model
        if model is None:
            raise LmshrinkError("PruningMasks.apply needs a model (or attach the masks to one first)")
        for name, mask in self.masks.items():
            weight = self._weight(model, name)
            weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> PruningMasks:
        """Apply the masks and keep them applied through training (gradient hooks, optional optimizer hook)."""
        self.detach()
        self._model = model
        self.apply(model)
        for name, mask in self.masks.items():
            weight = self._weight(model, name)
            keep = mask.to(device=weight.device)
            self._handles.append(weight.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply(model)))
        return self

    def detach(self) -> None:
        """Remove all hooks (the weights keep their zeros)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def sparsity(self) -> dict[str, float]:
        """Per-module fraction of pruned entries."""
        return {name: sparsity_of(mask) for name, mask in self.masks.items()}

    def overall_sparsity(self) -> float:
        """Pruned entries over all masked entries."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / max(total, 1)
