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
    x = torch.randn(32, 512, device="cuda", dtype=torch.bfloat16)
    y = cuda.fp8_linear_cuda(x, w).float()
    ref = x.float() @ w.t()
    assert ((y - ref).norm() / ref.norm()).item() < 0.1
