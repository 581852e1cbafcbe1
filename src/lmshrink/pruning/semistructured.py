"""N:M semi-structured sparsity (2:4 by default): pattern checks and, on CUDA, PyTorch's semi-structured sparse
tensors (``torch.sparse.to_sparse_semi_structured``) so the matmuls use sparse tensor cores.

Masks themselves come from :func:`lmshrink.pruning.masks.nm_mask` over magnitude, Wanda or SparseGPT scores.
Measured speed is reported honestly by the benchmarks: 2:4 matmuls are slower than dense for small matrices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP
from lmshrink.pruning.masks import parse_nm

log = logging.getLogger(__name__)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros.

    >>> follows_nm(torch.tensor([[0.0, 1.0, 0.0, 2.0]]), 2, 4)
    True
    """
    if weight.shape[-1] % m != 0:
        return False
    nonzero = (weight.reshape(-1, m) != 0).sum(dim=1)
    return bool((nonzero <= n).all())


def to_semi_structured(
    model: nn.Module, nm: str | tuple[int, int] = "2:4", skip: Sequence[str] = DEFAULT_SKIP
) -> list[str]:
    """Swap the weights of 2:4-sparse ``nn.Linear`` layers for ``SparseSemiStructuredTensor`` (CUDA, fp16/bf16).

    Returns the names of the converted layers. Raises on CPU (PyTorch has no CPU kernel for this format) and for
    patterns other than 2:4. Layers whose shapes the kernels do not support are left dense (logged).
    """
    import re

    n, m = parse_nm(nm)
    if (n, m) != (2, 4):
        raise LmshrinkError(f"PyTorch semi-structured sparse tensors support 2:4 only, got {n}:{m}")
    if not torch.cuda.is_available():
        raise LmshrinkError("semi-structured sparse tensors need a CUDA GPU (compute capability >= 8.0)")
    from torch.sparse import to_sparse_semi_structured

    skip_re = [re.compile(p) for p in skip]
    converted = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or any(r.search(name) for r in skip_re):
            continue
        w = mod.weight
        if not w.is_cuda or w.dtype not in (torch.float16, torch.bfloat16):
            raise LmshrinkError(
                f"{name}: move the model to CUDA in float16/bfloat16 first (got {w.device}, {w.dtype})"
            )
        if not follows_nm(w, 2, 4):
            continue
        try:
            mod.weight = nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False)
        except (RuntimeError, ValueError) as exc:
            log.info("%s stays dense: %s", name, exc)
            continue
        converted.append(name)
    return converted
