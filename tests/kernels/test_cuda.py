"""CUDA kernels (skipped without a GPU): each matches the float product of its quantized operands."""

from __future__ import annotations

import pytest
import torch

from lmshrink.kernels import cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_int8_mm_matches_reference() -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda")
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).to(torch.int8)
    for m in (1, 16, 64):
        x = torch.randn(m, 512, device="cuda")
        y = cuda.int8_linear_cuda(x, q, scale)
        ref = x @ (q.float() * scale[:, None]).t()
        assert ((y - ref).norm() / ref.norm()).item() < 0.02


def test_int4_weight_only_matches_reference() -> None:
    torch.manual_seed(0)
    n, k, g = 256, 512, 128
    codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8)
    scale = torch.rand(n, k // g, device="cuda") * 0.01 + 0.001
    zero = torch.full((n, k // g), 8, device="cuda", dtype=torch.uint8)
    packed, sz = cuda.pack_int4_tinygemm(codes, scale, zero, g)
    w = (codes.float() - 8).reshape(n, -1, g) * scale[..., None]
    x = torch.randn(4, k, device="cuda", dtype=torch.bfloat16)
    y = cuda.int4_linear_cuda(x, packed, sz, g, n).float()
    ref = x.float() @ w.reshape(n, k).t()
    assert ((y - ref).norm() / ref.norm()).item() < 0.02


def test_fp8_matches_reference() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda")
    w8, ws = cuda.fp8_weight_rowwise(w)
    for m in (1, 17, 64):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        y = cuda.fp8_linear_cuda(x, w8, ws).float()
        ref = x.float() @ w.t()
        assert y.shape == (m, 256)
        assert ((y - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize(
    ("fmt", "group", "act", "kernel", "tol"),
    [
        ("int4", 128, "float", "cuda-int4-weight-only", 0.02),
        ("int4-asym", 64, "float", "cuda-int4-weight-only", 0.02),
        ("int8", None, "int8", "cuda-int8-mm", 0.03),
        ("fp8", None, "float", "cuda-fp8-scaled-mm", 0.1),
    ],
)
def test_quant_linear_on_cuda_matches_its_decoded_weight(
    fmt: str, group: int | None, act: str, kernel: str, tol: float
) -> None:
    """The whole layer on its CUDA kernel against ``x @ dequantize_weight().T`` (catches layout / zero-point
    mistakes that the raw-kernel tests above cannot: codes, scales and zeros as lmshrink stores them)."""
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    if fmt == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    torch.manual_seed(0)
    spec = WeightSpec.parse(fmt, group_size=group)
    layer = QuantLinear.from_weight(torch.randn(384, 512), torch.randn(384), spec, act=act).cuda()
    assert layer.kernel_name == kernel
    ref_w = layer.dequantize_weight()
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 9, 512, device="cuda", dtype=dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, 9, 384)
        ref = x.float() @ ref_w.t() + layer.bias
        assert ((y.float() - ref).norm() / ref.norm()).item() < tol
