"""Quantization-aware training: fake-quantized weights with a straight-through estimator (STE).

:func:`prepare_qat` swaps selected linear layers for :class:`QATLinear`, whose forward uses
``fmt.fake_quantize(weight)`` while the gradient flows unchanged to the float master weight (the STE is the
identity: with absmax scales nothing is clipped, and for 1.58bit this is BitNet's ``w + (q(w) - w).detach()``).
``act_bits=8`` also fake-quantizes the layer input per token with AbsMax int8 (BitNet's BitLinear when used with
``fmt="1.58bit"``). :func:`strip_qat` puts the original layers back with their weights snapped to the grid
(:meth:`~lmshrink.quantization.formats.WeightFormat.snap`), so round-to-nearest quantization with the same format
and group size reproduces them exactly. Two caveats: an asymmetric grid may need a second snapping pass, which
moves a few weights of the groups whose extremes missed the end codes by one step; for 1.58bit only the ternary
codes reproduce (gamma = mean|W| of the snapped weight is smaller, since zeros count in the mean).

The training loop is the caller's: QAT only changes the modules.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> model = prepare_qat(model, "int4", group_size=-1)
>>> model(torch.randn(3, 8)).sum().backward()
>>> model = strip_qat(model)
>>> type(model[0]).__name__
'Linear'
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP, select_linears, set_submodule
from lmshrink.quantization.formats import WeightFormat, get_format

log = logging.getLogger(__name__)


class FakeQuantize(torch.autograd.Function):
    """``fmt.fake_quantize(w, group_size)`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, fmt: WeightFormat, group_size: int | None) -> torch.Tensor:
        return fmt.fake_quantize(w, group_size)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


def fake_quantize_ste(
    w: torch.Tensor, fmt: str | WeightFormat, group_size: int | None = None
) -> torch.Tensor:
    """Fake-quantize ``w`` to ``fmt`` with a straight-through gradient.

    >>> w = torch.randn(4, 8, requires_grad=True)
    >>> fake_quantize_ste(w, "int4").sum().backward()
    >>> bool((w.grad == 1).all())
    True
    """
    out: torch.Tensor = FakeQuantize.apply(w, get_format(fmt), group_size)
    return out


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token AbsMax fake quantization of activations (BitNet: ``127 / max|x|`` per row), STE backward."""
    if not 2 <= bits <= 8:
        raise LmshrinkError(f"activation bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    scale = qmax / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = (x.detach() * scale).round().clamp(-qmax - 1, qmax) / scale
    return x + (xq - x).detach()


class QATLinear(nn.Module):
    """A linear layer whose forward uses fake-quantized weights (and optionally activations).

    Holds the wrapped layer's own ``weight``/``bias`` parameters (so state-dict names do not change and an
    optimizer built on them keeps working); ``nn.Linear`` (out, in) and GPT-2 ``Conv1D`` (in, out) are supported.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        linear: nn.Module,
        fmt: str | WeightFormat,
        group_size: int | None = None,
        act_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.fmt = get_format(fmt)
        self.group_size = group_size
        self.act_bits = act_bits
        self.transposed = not isinstance(linear, nn.Linear)  # Conv1D stores (in, out)
        weight, bias = getattr(linear, "weight", None), getattr(linear, "bias", None)
        if not isinstance(weight, nn.Parameter):
            raise LmshrinkError(f"{type(linear).__name__} has no weight parameter; QAT wraps linear layers")
        self.weight = weight
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        # the original module, kept out of the module tree (its parameters are registered above)
        object.__setattr__(self, "_wrapped", linear)
        w_oi = self._weight_oi()
        self.fmt.resolve_group_size(w_oi.shape[1], group_size)  # fail early on a bad group size

    def _weight_oi(self) -> torch.Tensor:
        return self.weight.t() if self.transposed else self.weight

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight in (out, in) layout, differentiable by STE."""
        return fake_quantize_ste(self._weight_oi(), self.fmt, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quantize_activations(x, self.act_bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_linear(self) -> nn.Module:
        """The wrapped layer with its weight snapped to the grid (in place; see :meth:`WeightFormat.snap`)."""
        module: nn.Module = self.__dict__["_wrapped"]
        with torch.no_grad():
            snapped = self.fmt.snap(self._weight_oi(), self.group_size)
            self.weight.copy_(snapped.t() if self.transposed else snapped)  # the wrapped layer's parameter
        return module

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name!r}, group_size={self.group_size}, act_bits={self.act_bits}"


def prepare_qat(
    model: nn.Module,
    fmt: str | WeightFormat,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = DEFAULT_SKIP,
    group_size: int | None = None,
    act_bits: int | None = None,
) -> nn.Module:
    """Wrap the linear layers selected by ``targets``/``skip`` (regexes on module names) in :class:`QATLinear`.

    Modifies ``model`` in place and returns it. ``act_bits=8`` adds per-token int8 activation fake quantization
    (with ``fmt="1.58bit"`` this is BitNet b1.58's BitLinear, minus its extra LayerNorm).
    """
    fmt_obj = get_format(fmt)
    chosen = [(n, m) for n, m in select_linears(model, targets, skip) if not isinstance(m, QATLinear)]
    if not chosen:
        raise LmshrinkError(
            f"no linear layer matches targets={list(targets)} (skip={list(skip)}); nothing to train"
        )
    for name, module in chosen:
        set_submodule(model, name, QATLinear(module, fmt_obj, group_size, act_bits))
    log.info("QAT: %d linear layers fake-quantized to %s", len(chosen), fmt_obj.name)
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """Replace every :class:`QATLinear` by its original layer with the weight snapped to the grid (in place).

    Activation fake quantization is not kept: the result is a plain float model with on-grid weights.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if not found:
        raise LmshrinkError("strip_qat: the model has no QAT layers (was prepare_qat called?)")
    for name, module in found:
        if module.act_bits is not None:
            log.info("strip_qat: %s drops its %d-bit activation fake quantization", name, module.act_bits)
        set_submodule(model, name, module.to_linear())
    return model
