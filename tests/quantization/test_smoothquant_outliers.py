"""SmoothQuant's outlier fallback: token-sparse massive activations get fp32 columns, ordinary inputs do not."""

from __future__ import annotations

import torch

from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.smoothquant import (
    MAX_OUTLIER_FRACTION,
    smoothing_scale,
    w8a8_error,
    w8a8_outlier_error,
    wants_outliers,
)


def _inputs(massive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    if massive:  # attention-sink style: one channel ~100x on a few tokens only
        x[::128, 7] = 400.0
    w = torch.randn(64, 256, generator=g) * 0.05
    return x, w


def test_massive_token_activations_take_the_fallback() -> None:
    x, w = _inputs(massive=True)
    plain = w8a8_error(x, [w], None)
    err, frac = w8a8_outlier_error(x, [w], None, threshold=6.0)
    assert frac <= MAX_OUTLIER_FRACTION
    assert err < 0.2 * plain  # the sink tokens' other channels are no longer flushed to zero
    assert wants_outliers(x, [w], None, 6.0)
    # smoothing (alpha 0.5) already tames a channel that is loud on the same column every time: no fallback
    s = smoothing_scale(x.abs().amax(0), [w], alpha=0.5)
    assert w8a8_error(x, [w], s) < 0.3 * plain
    assert not wants_outliers(x, [w], s, 6.0)


def test_ordinary_activations_stay_pure_w8a8() -> None:
    x, w = _inputs(massive=False)
    assert not wants_outliers(x, [w], None, 6.0)


def test_outlier_error_without_outlier_columns_equals_plain_w8a8() -> None:
    x, w = _inputs(massive=False)
    err, frac = w8a8_outlier_error(x, [w], None, threshold=1e6)
    assert frac == 0.0
    assert abs(err - w8a8_error(x, [w], None)) <= 1e-9 + 1e-6 * err


def test_config_defaults() -> None:
    cfg = QuantConfig(method="gptq", format="int4", group_size=64)
    assert cfg.act_order is True
    assert QuantConfig(method="smoothquant").outliers == "auto"


def test_float_activations_keep_matched_layers_weight_only(tiny_llama) -> None:
    import pytest

    from lmshrink.errors import LmshrinkError
    from lmshrink.quantization import quantize_model
    from lmshrink.quantization.linear import QuantLinear

    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 128, (1, 32), generator=g)} for _ in range(2)]
    m = quantize_model(tiny_llama, {"method": "smoothquant", "float_activations": ["down_proj"]}, calib)
    acts = {n.rsplit(".", 1)[-1]: q.act for n, q in m.named_modules() if isinstance(q, QuantLinear)}
    assert acts["down_proj"] == "float"
    assert acts["up_proj"] == "int8" and acts["q_proj"] == "int8"
    with pytest.raises(LmshrinkError, match="'smoothquant' only"):
        QuantConfig(method="rtn", float_activations=["down_proj"])
