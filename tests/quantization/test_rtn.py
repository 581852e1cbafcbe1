"""RTN and LLM.int8() handlers: error shrinks with bits; W8A8 int8 stays close to float."""

from __future__ import annotations

import copy

import pytest
import torch

from lmshrink.quantization import quantize_model
from lmshrink.quantization.linear import QuantLinear


def _rel_err(model: torch.nn.Module, cfg: dict, ids: torch.Tensor, ref: torch.Tensor) -> float:
    m = quantize_model(copy.deepcopy(model), cfg)
    return float((m(ids).logits - ref).norm() / ref.norm())


def test_error_decreases_with_bits(tiny_llama) -> None:
    ids = torch.randint(0, 128, (2, 32))
    ref = tiny_llama(ids).logits
    errs = [
        _rel_err(tiny_llama, {"format": f"int{b}", "activations": "float"}, ids, ref) for b in (2, 3, 4, 8)
    ]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01


@pytest.mark.parametrize("group", [None, 16, 64])
def test_groups_reduce_int4_error(tiny_llama, group: int | None) -> None:
    ids = torch.randint(0, 128, (2, 32))
    ref = tiny_llama(ids).logits
    err = _rel_err(tiny_llama, {"format": "int4", "group_size": group}, ids, ref)
    assert err < {None: 0.3, 64: 0.25, 16: 0.2}[group]


def test_llm_int8_marks_layers_with_threshold(tiny_llama) -> None:
    m = quantize_model(tiny_llama, {"method": "llm-int8", "format": "int8", "threshold": 3.0})
    layers = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert layers and all(x.threshold == 3.0 and x.act == "int8" for x in layers)
