"""Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2`` and drop the lowest scores of every output row."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmshrink.models.arch import linear_weight_oi
from lmshrink.pruning.calibrate import check_calibration, prune_calibrated
from lmshrink.pruning.masks import PruningMasks, nm_mask, row_mask
from lmshrink.pruning.report import LayerRecord


class InputNorm:
    """Running sum of squared input activations per input feature (``||X_j||_2^2`` over all tokens)."""

    def __init__(self, in_features: int) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq += x.pow(2).sum(0).double().cpu()
        self.n += x.shape[0]


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` for a weight (out, in) and the squared input norms (in,).

    >>> wanda_scores(torch.tensor([[1.0, -1.0]]), torch.tensor([4.0, 1.0])).tolist()
    [[2.0, 1.0]]
    """
    return weight.abs().float() * sq_norm.to(device=weight.device, dtype=torch.float32).sqrt().unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep-mask: per output row, drop the ``sparsity`` share with the lowest Wanda score (or N:M groups)."""
    scores = wanda_scores(weight, sq_norm)
    return nm_mask(scores, *nm) if nm is not None else row_mask(scores, sparsity)


def prune_wanda(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]] | None,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = (),
    progress: bool = True,
) -> tuple[PruningMasks, list[LayerRecord]]:
    """Wanda-prune every block's linear layers in place, calibrating block by block on ``batches``."""
    batches = check_calibration(batches, "wanda")

    def prune_linear(w: torch.Tensor, stat: InputNorm) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        keep = wanda_mask(w, stat.sq, sparsity, nm)
        return w * keep, keep, None

    return prune_calibrated(
        model,
        batches,
        lambda m: InputNorm(linear_weight_oi(m).shape[1]),
        prune_linear,
        targets,
        skip,
        progress,
    )
