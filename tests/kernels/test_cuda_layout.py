"""The CUDA kernels' operand layouts, checked on CPU: the arithmetic each GPU kernel applies to lmshrink's stored
codes, scales and zeros reproduces the layer's decoded weight (the GEMMs themselves: tests/kernels/test_cuda.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmshrink.kernels import cuda
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.linear import QuantLinear, unpack_bits


def _layer(fmt: str, group: int | None, **kw: Any) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_weight(
        torch.randn(48, 256), torch.randn(48), WeightSpec.parse(fmt, group_size=group), **kw
    )


@pytest.mark.parametrize(
    ("fmt", "group"), [("int4", 128), ("int4", 64), ("int4-asym", 64), ("int4-asym", 32)]
)
def test_tinygemm_zero_points_reproduce_the_decoded_weight(fmt: str, group: int) -> None:
    """tinygemm computes ``(q - 8) * scale + zero_f`` on the stored unsigned codes ``q``."""
    layer = _layer(fmt, group)
    q = unpack_bits(layer.qweight, 4, 256).float()
    sz = cuda.tinygemm_scales_and_zeros(layer.scale, layer._tinygemm_zero()).float()  # (G, N, 2)
    s, zf = sz[..., 0].t(), sz[..., 1].t()  # (N, G)
    w = ((q.reshape(48, -1, group) - 8) * s[..., None] + zf[..., None]).reshape(48, 256)
    ref = layer.dequantize_weight()
    step = layer.scale.float().repeat_interleave(group, dim=1)  # one grid step per weight
    # bf16 scales: well within a grid step; a zero point off by one code would be a full step everywhere
    assert ((w - ref).abs() / step).max().item() < 0.06
    if layer.spec.symmetric:  # the old zero (8 for a -7..7 grid) was one code off
        bad = cuda.tinygemm_scales_and_zeros(layer.scale, torch.full_like(layer.scale, 8, dtype=torch.uint8))
        w_bad = ((q.reshape(48, -1, group) - 8) * bad.float()[..., 0].t()[..., None]).reshape(48, 256)
        assert ((w_bad - ref).abs() / step).mean().item() > 0.9


def test_fp8_per_channel_layer_hands_its_stored_codes_to_the_gemm() -> None:
    layer = _layer("fp8", None)
    w8, ws = layer._fp8_operands()
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (48, 256) and ws.shape == (1, 48)
    torch.testing.assert_close(w8.float() * ws.t(), layer.dequantize_weight(), rtol=0, atol=0)


def test_fp8_grouped_layer_is_requantized_per_row_once() -> None:
    layer = _layer("fp8", 64)
    w8, ws = layer._fp8_operands()
    assert layer._fp8_operands()[0] is w8  # cached
    ref = layer.dequantize_weight()
    rel = (w8.float() * ws.t() - ref).norm() / ref.norm()
    assert 0 < rel.item() < 0.05  # e4m3 has 3 mantissa bits


def test_fp8_rows_quantizer_scales_each_row_to_its_own_range() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 1e5])[:, None]
    x8, xs = cuda.fp8_quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and xs.shape == (5, 1)
    torch.testing.assert_close(x8.float().abs().amax(1), torch.full((5,), cuda.FP8_MAX))
    rel = ((x8.float() * xs - x).norm(dim=1) / x.norm(dim=1)).max()
    assert rel.item() < 0.05
    w8, ws = cuda.fp8_weight_rowwise(x)
    torch.testing.assert_close(w8.float() * ws.t(), x8.float() * xs)


def test_codec_layers_report_the_device_of_their_codes() -> None:
    """``kernel_name`` asks where the stored tensors are; fp8 / nf4 layers have no ``scale`` buffer."""
    for fmt, group in (("fp8", None), ("nf4", 64), ("int4", 64)):
        layer = _layer(fmt, group)
        assert layer._device_type() == "cpu"
        assert layer.to("meta")._device_type() == "meta"


def test_cuda_kernels_receive_bf16_inputs_as_they_come(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA kernel the layer skips the float32 round trip of the CPU paths (a decode step pays per launch);
    the kernel here is a CPU stand-in with the FP8 GEMM's arithmetic."""
    seen: list[torch.dtype] = []

    def fake_fp8(
        x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        seen.append(x.dtype)
        x8, xs = cuda.fp8_quantize_rows(x)
        y = (x8.float() * xs) @ (w8.float() * w_scale.t()).t() + bias
        return y.to(torch.bfloat16).to(x.dtype)

    layer = _layer("fp8", None)
    monkeypatch.setattr(QuantLinear, "kernel_name", property(lambda self: "cuda-fp8-scaled-mm"))
    monkeypatch.setattr(cuda, "fp8_linear_cuda", fake_fp8)
    layer._cache = {}
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16)
    y = layer(x)
    assert seen == [torch.bfloat16] and y.dtype == torch.bfloat16 and y.shape == (3, 7, 48)
    ref = x.float() @ layer.dequantize_weight().t() + layer.bias
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.08
