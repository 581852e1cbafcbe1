"""NaN/Inf detection that names the layer: in weights, in activations (forward hooks), in losses and gradients.

>>> import torch
>>> check_finite_loss(torch.tensor(1.5), step=3)
1.5
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lmshrink.errors import NumericsError


@dataclass(frozen=True)
class NonFinite:
    """One tensor with NaN or Inf values: its name, how many of each, and its size."""

    name: str
    nan: int
    inf: int
    numel: int
    shape: tuple[int, ...]

    def describe(self) -> str:
        """``"name (shape (4, 8)): 3 NaN, 1 Inf of 32 values"``."""
        return f"{self.name} (shape {self.shape}): {self.nan} NaN, {self.inf} Inf of {self.numel} values"


def _count(name: str, t: Tensor) -> NonFinite | None:
    """Counts for a floating tensor with non-finite values, else ``None`` (fast path: one ``isfinite().all()``)."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
        return None
    data = t.detach()
    if data.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        data = data.float()  # fp8 and other narrow types: isfinite/isinf are not implemented for all of them
    # fast path: a sum is finite only if every term is (an overflowing sum falls through to the exact count)
    if bool(torch.isfinite(data.sum(dtype=torch.float64 if data.dtype == torch.float64 else torch.float32))):
        return None
    if bool(torch.isfinite(data).all()):
        return None
    nan = int(torch.isnan(data).sum())
    inf = int(torch.isinf(data).sum())
    return NonFinite(name, nan, inf, data.numel(), tuple(data.shape))


def find_nonfinite_weights(model: nn.Module, include_buffers: bool = True) -> list[NonFinite]:
    """Every floating parameter (and buffer) of ``model`` holding NaN or Inf, in ``named_parameters`` order."""
    named: Iterable[tuple[str, Tensor]] = model.named_parameters()
    if include_buffers:
        named = [*model.named_parameters(), *model.named_buffers()]
    out: list[NonFinite] = []
    seen: set[int] = set()
    for name, t in named:
        if id(t) in seen:  # tied weights are reported once, under their first name
            continue
        seen.add(id(t))
        bad = _count(name, t)
        if bad is not None:
            out.append(bad)
    return out


def check_finite_weights(model: nn.Module, include_buffers: bool = True, what: str = "the model") -> int:
    """Raise :class:`NumericsError` naming the first parameter (or buffer) that holds NaN or Inf, with counts and
    how many tensors are affected; return the number of tensors checked when all are finite."""
    bad = find_nonfinite_weights(model, include_buffers)
    if bad:
        first = bad[0]
        others = ""
        if len(bad) > 1:
            names = ", ".join(b.name for b in bad[1:4]) + (", ..." if len(bad) > 4 else "")
            others = f"; {len(bad)} tensors are affected in total (also {names})"
        raise NumericsError(
            f"{what} has non-finite weights: parameter {first.name!r} holds {first.nan} NaN and {first.inf} Inf "
            f"of {first.numel} values (shape {first.shape}){others}; the checkpoint is damaged or training diverged"
        )
    n = sum(1 for _ in model.parameters())
    if include_buffers:
        n += sum(1 for _ in model.buffers())
    return n


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Floating tensors inside a module output (tensor, tuple/list, dict, ``ModelOutput``), with their path."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):  # ModelOutput is an OrderedDict
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def _first_bad(obj: Any) -> tuple[str, NonFinite] | None:
    for path, t in _tensors(obj):
        bad = _count(path or "output", t)
        if bad is not None:
            return path, bad
    return None


@contextlib.contextmanager
def watch_activations(
    model: nn.Module,
    modules: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> Iterator[None]:
    """Forward hooks on every submodule (or those named in ``modules``; regexes in ``skip`` excluded): the first
    module whose output contains NaN/Inf raises :class:`NumericsError` naming it, its class, the counts and whether
    its inputs were finite. Hooks fire when a module returns, so the innermost culprit is named first. Removed on
    exit. Costs one ``isfinite`` pass per module output: a debugging tool, not for timed runs.

    >>> with watch_activations(model):  # doctest: +SKIP
    ...     model(input_ids)
    """
    wanted = set(modules) if modules is not None else None
    skips = [re.compile(s) for s in skip]
    handles = []

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            found = _first_bad(output)
            if found is None:
                return
            path, bad = found
            where = f"output {path}" if path else "output"
            inputs_bad = _first_bad(args)
            if inputs_bad is None:
                origin = "its inputs were finite, so the problem starts in this module"
            else:
                origin = f"its input args{inputs_bad[0]} was already non-finite (look at the module before)"
            raise NumericsError(
                f"module {name!r} ({type(module).__name__}) produced non-finite values in its {where}: "
                f"{bad.nan} NaN, {bad.inf} Inf of {bad.numel} (shape {bad.shape}); {origin}"
            )

        return hook

    try:
        for name, module in model.named_modules():
            label = name or type(model).__name__
            if wanted is not None and name not in wanted:
                continue
            if any(s.search(label) for s in skips):
                continue
            handles.append(module.register_forward_hook(make_hook(label)))
        yield
    finally:
        for h in handles:
            h.remove()


def locate_nonfinite_activation(model: nn.Module, *args: Any, **kwargs: Any) -> str | None:
    """Run ``model(*args, **kwargs)`` under :func:`watch_activations` without gradients; return the error message
    naming the first module with a non-finite output, or ``None`` when every output is finite.

    For callers that found a NaN result (perplexity, loss) and want to say where it came from.
    """
    try:
        with torch.no_grad(), watch_activations(model):
            model(*args, **kwargs)
    except NumericsError as exc:
        return str(exc)
    return None


def check_finite_loss(loss: Tensor | float, step: int | None = None, what: str = "loss") -> float:
    """Return ``loss`` as a float, or raise :class:`NumericsError` when it is NaN or Inf (naming the step)."""
    value = float(loss.detach().float().sum()) if isinstance(loss, Tensor) else float(loss)
    if isinstance(loss, Tensor) and loss.numel() != 1:
        bad = _count(what, loss)
        if bad is not None:
            value = float("nan")
    if math.isfinite(value):
        return value
    at = f" at step {step}" if step is not None else ""
    raise NumericsError(
        f"{what} became {value}{at}; lower the learning rate, enable gradient clipping, or check the inputs "
        "and weights (lmshrink.utils.numerics.check_finite_weights / watch_activations name the layer)"
    )


def check_finite_gradients(model: nn.Module, step: int | None = None) -> None:
    """Raise :class:`NumericsError` naming the first parameter whose gradient holds NaN or Inf."""
    bad = [
        b
        for name, p in model.named_parameters()
        if p.grad is not None and (b := _count(name, p.grad)) is not None
    ]
    if bad:
        at = f" at step {step}" if step is not None else ""
        raise NumericsError(
            f"gradient of {bad[0].describe()} is non-finite{at}; {len(bad)} parameter(s) affected; "
            "lower the learning rate or enable gradient clipping"
        )
