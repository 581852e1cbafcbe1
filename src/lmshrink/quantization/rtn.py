"""Round-to-nearest (RTN) and LLM.int8(): quantize each selected layer on its own, no calibration.

>>> import torch
>>> from lmshrink.quantization.config import QuantConfig
>>> lin = torch.nn.Linear(16, 8)
>>> q = quantize_layer(lin, QuantConfig(format="int4", group_size=8))
>>> q.kernel_name
'dequantize-on-the-fly'
"""

from __future__ import annotations

from torch import nn

from lmshrink.models.arch import set_submodule
from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.linear import QuantLinear, linear_weight_and_bias


def quantize_layer(
    module: nn.Module, config: QuantConfig, threshold: float | None = None, input_scale: bool = False
) -> QuantLinear:
    """RTN-quantize one ``nn.Linear``/``Conv1D`` into a :class:`QuantLinear` per ``config`` (with
    ``config.clip_search``, on the clipping range :func:`~lmshrink.quantization.grid.compute_qparams_mse` finds)."""
    w, b = linear_weight_and_bias(module)
    return QuantLinear.from_weight(
        w,
        b,
        config.weight_spec(),
        clip_search=config.clip_search,
        act=config.act_mode,
        threshold=threshold,
        input_scale=input_scale,
    ).to(w.device)


def quantize_rtn(
    model: nn.Module, config: QuantConfig, layers: list[tuple[str, nn.Module]], calibration: object = None
) -> None:
    """Handler for ``method="rtn"``: every format and granularity, layer by layer, no data."""
    for name, mod in layers:
        set_submodule(model, name, quantize_layer(mod, config))


def quantize_llm_int8(
    model: nn.Module, config: QuantConfig, layers: list[tuple[str, nn.Module]], calibration: object = None
) -> None:
    """Handler for ``method="llm-int8"``: int8 row-wise weights, int8 per-token activations, and input columns
    with any |x| > ``config.threshold`` computed in fp32 on every call (the LLM.int8() decomposition)."""
    for name, mod in layers:
        set_submodule(model, name, quantize_layer(mod, config, threshold=config.threshold))
