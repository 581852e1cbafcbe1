"""Layer-by-layer calibration: run calibration data through the model one transformer block at a time.

GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT all need the inputs each block sees. Holding only one block's inputs
(and running each block once per calibration batch) keeps memory near one layer's worth beyond the model.

Usage::

    def process(index, block, inputs):      # inputs: list of BlockInput, one per calibration batch
        ...collect statistics with hooks, then edit ``block`` in place...

    run_layerwise(model, calibration_batches, process)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import find_layers


@dataclass
class BlockInput:
    """The positional and keyword arguments one block received for one calibration batch."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> torch.Tensor:
        h = self.args[0] if self.args else self.kwargs["hidden_states"]
        assert isinstance(h, torch.Tensor)
        return h

    def with_hidden(self, hidden: torch.Tensor) -> BlockInput:
        if self.args:
            return BlockInput((hidden, *self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": hidden})


class _StopForward(Exception):
    pass


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor in transformers 5, a tuple in older code)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LmshrinkError(f"unexpected block output type {type(out).__name__}")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[BlockInput]:
    """Run the model up to its first block for every batch and return what that block received."""
    if len(batches) == 0:
        raise LmshrinkError("the calibration set is empty; give at least one calibration sample")
    _, layers = find_layers(model)
    captured: list[BlockInput] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = dict(kwargs)
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        kw["use_cache"] = False
        captured.append(BlockInput(tuple(args), kw))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(**batch)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> list[torch.Tensor]:
    """Run one block over every captured input and return its outputs."""
    return [block_output(block(*inp.args, **inp.kwargs)) for inp in inputs]


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    process: Callable[[int, nn.Module, list[BlockInput]], None],
    propagate_transformed: bool = True,
) -> None:
    """Call ``process(index, block, inputs)`` for each block in order, then feed the block's outputs onward.

    With ``propagate_transformed`` (the GPTQ/SparseGPT convention) the next block sees the outputs of the already
    transformed block, so later layers correct for earlier errors; otherwise the original outputs are used.
    """
    _, layers = find_layers(model)
    inputs = capture_block_inputs(model, batches)
    for index, block in enumerate(layers):
        original = None if propagate_transformed else run_block(block, inputs)
        process(index, block, inputs)
        outputs = run_block(block, inputs) if propagate_transformed else original
        assert outputs is not None
        inputs = [inp.with_hidden(out) for inp, out in zip(inputs, outputs, strict=True)]
