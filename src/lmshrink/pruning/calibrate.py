"""Orchestration for calibrated unstructured pruning: block by block, collect per-linear input statistics with
forward hooks, then let a pure function prune each linear layer. No pruning math lives here."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import find_layers, linear_weight_oi, select_linears
from lmshrink.models.layerwise import BlockInput, run_block, run_layerwise
from lmshrink.pruning.masks import PruningMasks
from lmshrink.pruning.report import LayerRecord

log = logging.getLogger(__name__)


class InputStat(Protocol):
    """Accumulates statistics of a linear layer's inputs, ``x`` of shape (..., in_features)."""

    def add(self, x: torch.Tensor) -> None: ...


#: prune_linear(weight (out, in), stat) -> (new weight, keep-mask, reconstruction error or None)
PruneLinear = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, float | None]]


def check_calibration(
    batches: Sequence[dict[str, torch.Tensor]] | None, method: str
) -> Sequence[dict[str, torch.Tensor]]:
    """Return ``batches``, or raise a clear error when a calibrated method gets no calibration data."""
    if batches is None or len(batches) == 0:
        raise LmshrinkError(
            f"method {method!r} needs calibration data: pass calibration="
            "lmshrink.data.calibration_batches(tokenizer, 'c4', n_samples, seq_len) (got none)"
        )
    return batches


def _hook(stat: InputStat) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def hook(_mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        stat.add(args[0].detach())

    return hook


def collect_stats(
    block: nn.Module,
    inputs: list[BlockInput],
    linears: dict[str, nn.Module],
    make_stat: Callable[[nn.Module], Any],
) -> dict[str, Any]:
    """Run ``block`` over ``inputs`` once with hooks and return ``{name: stat}`` for each linear."""
    stats = {name: make_stat(mod) for name, mod in linears.items()}
    handles = [mod.register_forward_hook(_hook(stats[name])) for name, mod in linears.items()]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats


def prune_calibrated(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    make_stat: Callable[[nn.Module], Any],
    prune_linear: PruneLinear,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = (),
    progress: bool = True,
) -> tuple[PruningMasks, list[LayerRecord]]:
    """Prune the linear layers of every block with ``prune_linear``, using inputs that went through the already
    pruned earlier blocks (the SparseGPT/Wanda sequential convention). Returns attached masks and records."""
    path, layers = find_layers(model)
    target_re = [re.compile(p) for p in targets]
    skip_re = [re.compile(p) for p in skip]
    masks: dict[str, torch.Tensor] = {}
    records: list[LayerRecord] = []
    bar = tqdm(total=len(layers), desc="prune blocks", disable=not progress)

    def process(index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        linears = {}
        for name, mod in select_linears(block, (r".*",), ()):
            full = f"{path}.{index}.{name}"
            if any(r.search(full) for r in target_re) and not any(r.search(full) for r in skip_re):
                linears[full] = mod
        stats = collect_stats(block, inputs, linears, make_stat)
        for full, mod in linears.items():
            weight = linear_weight_oi(mod)
            if type(mod).__name__ == "Conv1D":
                raise LmshrinkError(
                    "calibrated pruning supports nn.Linear layers (GPT-2 Conv1D is not supported)"
                )
            new_w, keep, err = prune_linear(weight.data, stats[full])
            weight.data.copy_(new_w.to(weight.dtype))
            masks[full] = keep
            records.append(
                LayerRecord(
                    name=full, shape=list(weight.shape), sparsity=float((~keep).float().mean()), error=err
                )
            )
        bar.update(1)

    try:
        run_layerwise(model, batches, process)
    finally:
        bar.close()
    pm = PruningMasks(masks).attach(model)
    model.lmshrink_format = "sparse"  # type: ignore[assignment]
    return pm, records
