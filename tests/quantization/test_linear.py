"""QuantLinear: real packed storage, decoding, kernels and dtype safety."""

from __future__ import annotations

import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.kernels.cpu import fbgemm_available
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.grid import IntGrid, fake_quantize
from lmshrink.quantization.linear import QuantLinear, pack_bits, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [8, 13, 64])
def test_pack_unpack_roundtrip_and_size(bits: int, k: int) -> None:
    codes = torch.randint(0, 2**bits, (5, k))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-k // 8) * bits)
    assert torch.equal(unpack_bits(packed, bits, k).long(), codes)


@pytest.mark.parametrize(
    ("fmt", "group", "dtype", "width"),
    [("int8", None, torch.int8, 64), ("int4", 16, torch.uint8, 32), ("int3", None, torch.uint8, 24),
     ("int4-asym", 32, torch.uint8, 32), ("int2", 8, torch.uint8, 16)],
)  # fmt: skip
def test_storage_is_packed_and_decodes_like_the_grid(
    fmt: str, group: int | None, dtype: torch.dtype, width: int
):
    torch.manual_seed(0)
    w = torch.randn(12, 64)
    spec = WeightSpec.parse(fmt, group)
    q = QuantLinear.from_weight(w, None, spec)
    assert q.qweight.dtype == dtype and q.qweight.shape == (12, width)
    assert q.lmshrink_storage == "quantized"
    ref = fake_quantize(w, IntGrid(spec.bits, spec.symmetric, group))
    diff = (q.dequantize_weight() - ref).abs()
    if group is None:
        assert diff.max() < 1e-5
    else:  # grouped scales are stored in float16: a few codes may round to the neighbouring level
        step = (w.abs().max() * 2 / (2**spec.bits - 1)).item()
        assert diff.max() <= 1.01 * step
        assert (diff > 1e-2 * step).float().mean() < 0.05


def test_weight_only_forward_equals_float_matmul_of_decoded_weight() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(8, 32), torch.randn(8)
    q = QuantLinear.from_weight(w, b, WeightSpec.parse("int4", 8))
    x = torch.randn(2, 3, 32)
    assert q.kernel_name == "dequantize-on-the-fly"
    torch.testing.assert_close(q(x), x @ q.dequantize_weight().t() + b)


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm not usable")
def test_int8_w8a8_uses_fbgemm_and_is_close_to_float() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(32, 64) * 0.1, torch.randn(32)
    q = QuantLinear.from_weight(w, b, WeightSpec.parse("int8"), act="int8")
    assert q.kernel_name in ("fbgemm-int8-dynamic-per-token", "int8-per-token-fbgemm+amx")
    x = torch.randn(4, 10, 64)
    ref = x @ w.t() + b
    # int8 weights alone: 0.41%; with 8-bit activations (7-bit weights on CPUs whose int8 pairs saturate) 1.14%
    assert ((q(x) - ref).norm() / ref.norm()) < 0.015


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm not usable")
def test_llm_int8_outlier_columns_reduce_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.1
    x = torch.randn(16, 64)
    x[:, 5] = 80.0 * torch.sign(torch.randn(16))  # an outlier feature column
    ref = x @ w.t()
    plain = QuantLinear.from_weight(w, None, WeightSpec.parse("int8"), act="int8")
    mixed = QuantLinear.from_weight(w, None, WeightSpec.parse("int8"), act="int8", threshold=6.0)
    assert mixed.kernel_name.endswith("+fp32-outliers")
    err_plain = ((plain(x) - ref).norm() / ref.norm()).item()
    err_mixed = ((mixed(x) - ref).norm() / ref.norm()).item()
    assert err_mixed < 0.5 * err_plain


def test_dtype_casts_leave_packed_storage_alone() -> None:
    q = QuantLinear.from_weight(torch.randn(8, 16), torch.randn(8), WeightSpec.parse("int4", 8))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.half()
    for k, v in q.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k])
    assert q(torch.randn(2, 16, dtype=torch.float16)).dtype == torch.float16


def test_input_scale_is_applied() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    s = torch.rand(16) + 0.5
    q = QuantLinear.from_weight(w * s, None, WeightSpec.parse("int8"), input_scale=True)
    q.set_input_scale(1.0 / s)
    x = torch.randn(3, 16)
    ref = (x / s) @ q.dequantize_weight().t()
    if q.kernel_name == "int8-weight-only-cpu-bf16":  # activations rounded to bf16 for the AMX/bf16 kernel
        assert ((q(x) - ref).norm() / ref.norm()).item() < 6e-3
    else:
        torch.testing.assert_close(q(x), ref)


def test_bad_layer_arguments() -> None:
    with pytest.raises(LmshrinkError, match="does not divide"):
        QuantLinear(30, 8, WeightSpec.parse("int4", 16))
    with pytest.raises(LmshrinkError, match="int8 activations"):
        QuantLinear(32, 8, WeightSpec.parse("int4", 16), act="int8")


def test_formats_without_a_cpu_kernel_report_dequantize_on_the_fly() -> None:
    from lmshrink.evaluation import describe_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        QuantLinear.from_weight(torch.randn(8, 64), None, WeightSpec.parse("int3", 32)),
        QuantLinear.from_weight(torch.randn(8, 64), None, WeightSpec.parse("1.58bit")),
    )
    assert {m.kernel_name for m in model} == {"dequantize-on-the-fly"}
    assert describe_kernels(model) == {"kernels": {}, "dequantize_on_the_fly": 2}


@pytest.mark.skipif(not fbgemm_available(), reason="fbgemm not usable")
@pytest.mark.parametrize("threshold", [None, 6.0])
def test_w8a8_single_rows_match_the_float_activation_product_where_the_decode_gemv_runs(threshold) -> None:
    from lmshrink.kernels import cpu as cpu_kernels

    torch.manual_seed(0)
    w, b = torch.randn(32, 64) * 0.1, torch.randn(32)
    q = QuantLinear.from_weight(w, b, WeightSpec.parse("int8"), act="int8", threshold=threshold)
    x = torch.randn(1, 64)
    x[0, 5] = 20.0  # an outlier column
    float_act = x @ q.dequantize_weight().t() + b
    y = q(x)
    if cpu_kernels.int8_pairs_saturate() and cpu_kernels.avx2_gemv_available():
        torch.testing.assert_close(y, float_act, rtol=1e-5, atol=1e-5)  # int8 weights, float32 activations
    else:
        assert not torch.allclose(y, float_act, rtol=1e-5, atol=1e-5)  # quantized activations
    # several rows always go through the int8 GEMM with quantized activations
    xs = x.repeat(4, 1) + 0.1 * torch.randn(4, 64)
    ys = q(xs)
    assert not torch.allclose(ys, xs @ q.dequantize_weight().t() + b, rtol=1e-5, atol=1e-5)
    assert ((ys - (xs @ w.t() + b)).norm() / (xs @ w.t() + b).norm()) < 0.05
