"""CPU kernels: the per-token fbgemm path matches a float reference of the quantized operands."""

from __future__ import annotations

import pytest
import torch

from lmshrink.kernels import cpu

pytestmark = pytest.mark.skipif(
    not cpu.fbgemm_available(), reason="fbgemm int8 kernel not usable on this CPU"
)


def _weights(n: int = 48, k: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(n, k)
    scale = w.abs().amax(1) / 127
    return torch.round(w / scale[:, None]).to(torch.int8), scale


def test_saturation_probe_returns_bool() -> None:
    assert isinstance(cpu.needs_reduce_range(), bool)


@pytest.mark.parametrize("m", [1, 7, 64])
def test_per_token_matches_float_reference_of_quantized_operands(m: int) -> None:
    q, scale = _weights()
    w = q.float() * scale[:, None]
    x = torch.randn(m, 96) * torch.logspace(-2, 1, m)[:, None]  # rows of very different magnitude
    bias = torch.randn(48)
    y = cpu.int8_linear_per_token(x, cpu.prepack_int8(q, scale), bias)
    ref = cpu.quantize_per_token_reference(x, cpu.needs_reduce_range()) @ w.t() + bias
    # the kernel differs from the simulation only by fbgemm's float rounding of its qparams
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 2e-3


def test_per_token_beats_per_tensor_on_rows_of_different_scale() -> None:
    q, scale = _weights()
    w = q.float() * scale[:, None]
    x = torch.randn(16, 96)
    x[0] *= 100.0  # one loud token makes per-tensor quantization crush the others
    packed = cpu.prepack_int8(q, scale)
    exact = x @ w.t()
    per_token = cpu.int8_linear_per_token(x, packed)
    per_tensor = torch.ops.quantized.linear_dynamic(x, packed, True)
    err_tok = ((per_token - exact)[1:].norm() / exact[1:].norm()).item()
    err_ten = ((per_tensor - exact)[1:].norm() / exact[1:].norm()).item()
    assert err_tok < 0.02
    assert err_tok < 0.2 * err_ten


@pytest.mark.skipif(not cpu.amx_int8_available(), reason="no AMX-INT8 on this CPU")
def test_amx_path_matches_symmetric_per_token_reference() -> None:
    q, scale = _weights()
    w = q.float() * scale[:, None]
    x = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]
    y = cpu.int8_linear_per_token_amx(x, q, scale, None)
    sx = x.abs().amax(1, keepdim=True) / 127
    ref = (torch.round(x / sx) * sx) @ w.t()
    assert ((y - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5
