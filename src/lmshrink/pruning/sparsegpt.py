"""SparseGPT (Frantar & Alistarh 2023): prune column blocks with the inverse Hessian of the layer inputs and
update the remaining weights to compensate (optimal brain surgeon, one column at a time)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.models.arch import linear_weight_oi
from lmshrink.pruning.calibrate import check_calibration, prune_calibrated
from lmshrink.pruning.masks import PruningMasks, check_sparsity
from lmshrink.pruning.report import LayerRecord


class Hessian:
    """Accumulates ``H = X^T X / n`` of a linear layer's inputs (the layer-wise reconstruction Hessian / 2)."""

    def __init__(self, in_features: int) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float().cpu()
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t)).addmm_(x.T, x, alpha=1.0 / (self.n + t))
        self.n += t


def accumulate_hessian(x: torch.Tensor, H: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Functional form: fold a batch of inputs (..., in) into the running mean ``H`` over ``n`` rows."""
    x = x.reshape(-1, x.shape[-1]).float()
    t = x.shape[0]
    return H * (n / (n + t)) + x.T @ x / (n + t), n + t


def _inverse_hessian_chol(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp*I)^-1``, with growing damping if ``H`` is not positive definite."""
    damp = percdamp * torch.mean(torch.diag(H)).clamp_min(1e-8)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for factor in (1.0, 10.0, 100.0, 1000.0):
        L, info = torch.linalg.cholesky_ex(H + damp * factor * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise NumericsError(
        "SparseGPT: the input Hessian is not positive definite even with damping; raise percdamp"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (out, in) given the input Hessian ``H`` (in, in); returns ``(new_weight, keep_mask)``.

    Each column block drops exactly ``sparsity`` of its entries with the lowest OBS saliency
    ``w^2 / [H^-1]_jj^2`` (or the N:M pattern), and the error of each pruned column is spread over the
    columns to its right. Fully dead inputs (zero Hessian diagonal) are pruned first.
    """
    W = weight.detach().float().clone()
    H = H.detach().float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_chol(H, percdamp)
    keep = torch.ones_like(W, dtype=torch.bool)
    check_sparsity(sparsity)
    if nm is not None:
        if cols % nm[1] != 0:
            raise LmshrinkError(
                f"N:M sparsity {nm[0]}:{nm[1]} needs the input dimension to be a multiple of {nm[1]}, got {cols}"
            )
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])  # groups must not straddle column blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        Err1 = torch.zeros_like(W1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            saliency = (W1**2 / d.unsqueeze(0) ** 2).flatten()
            k = round(sparsity * saliency.numel())
            if k > 0:
                prune1.view(-1)[torch.topk(saliency, k, largest=False, sorted=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                sal = W1[:, i : i + m] ** 2 / d[i : i + m].unsqueeze(0) ** 2
                idx = torch.topk(sal, m - nm[0], dim=1, largest=False, sorted=False).indices
                prune1.scatter_(1, i + idx, True)
            w = W1[:, i]
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W = W * keep  # exact zeros where pruned
    if not torch.isfinite(W).all():
        raise NumericsError("SparseGPT produced NaN/Inf weights; raise percdamp or use more calibration data")
    return W.to(weight.dtype), keep


def reconstruction_error(w_old: torch.Tensor, w_new: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error ``||(W - W') X||^2 / (n * out)`` from the input second moment ``H = X^T X / n``."""
    dw = (w_old.float() - w_new.float()).to(H.device)
    return float(((dw @ H) * dw).sum() / w_old.shape[0])


def prune_sparsegpt(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]] | None,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = (),
    blocksize: int = 128,
    percdamp: float = 0.01,
    progress: bool = True,
) -> tuple[PruningMasks, list[LayerRecord]]:
    """SparseGPT-prune every block's linear layers in place, calibrating block by block on ``batches``."""
    batches = check_calibration(batches, "sparsegpt")

    def prune_linear(w: torch.Tensor, stat: Hessian) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        new_w, keep = sparsegpt_prune(w, stat.H, sparsity, nm, blocksize, percdamp)
        return new_w, keep, reconstruction_error(w, new_w, stat.H)

    return prune_calibrated(
        model, batches, lambda m: Hessian(linear_weight_oi(m).shape[1]), prune_linear, targets, skip, progress
    )
