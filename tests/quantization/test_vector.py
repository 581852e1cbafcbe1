import math

import pytest
import torch

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.quantization.formats import FORMAT_NAMES, get_format
from lmshrink.quantization.vector import QuantizedVector


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a shared machine, thread synchronisation costs more than it saves. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vec() -> torch.Tensor:
    return torch.randn(4096, generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def test_int8_absmax_lab_semantics(vec):
    qv = QuantizedVector(vec, "int8").quantize()
    assert qv.scale is not None and qv.data is not None
    assert math.isclose(qv.scale.item(), 127 / vec.abs().max().item(), rel_tol=1e-6)
    assert qv.data.dtype == torch.int8 and int(qv.data.abs().max()) == 127
    assert torch.equal(qv.data, torch.round(vec * qv.scale).to(torch.int8))
    out = qv.dequantize()
    assert out.dtype == torch.float32 and out.shape == vec.shape
    assert (out - vec).abs().max().item() <= 0.5 / qv.scale.item() + 1e-7  # half a step
    assert qv.nbytes == 4096 + 4  # int8 codes + one float32 scale


def test_fp16_bf16(vec):
    for fmt, dtype, tol in (("fp16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 8e-3)):
        qv = QuantizedVector(vec, fmt).quantize()
        assert qv.data is not None and qv.data.dtype == dtype and qv.scale is None
        assert rel_err(vec, qv.dequantize()) < tol
        assert qv.nbytes == 2 * 4096 and qv.compression_ratio == 2.0


def test_1bit_signs_and_packing():
    x = torch.tensor([0.3, -2.0, 0.0, 5.0, -0.1, 1e-8, -1e-8, 0.7, 0.2])
    qv = QuantizedVector(x, "1bit").quantize()
    assert qv.data is not None
    assert qv.data.tolist() == [1, -1, -1, 1, -1, 1, -1, 1, 1]  # zero -> -1
    assert qv.dequantize().tolist() == [1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
    assert qv.nbytes == 2  # 9 sign bits packed into 2 bytes


def test_158bit_absmean(vec):
    qv = QuantizedVector(vec, "1.58bit").quantize()
    assert qv.data is not None and qv.scale is not None
    assert set(qv.data.unique().tolist()) == {-1, 0, 1}
    gamma = vec.abs().mean().item()
    assert math.isclose(1 / qv.scale.item(), gamma, rel_tol=1e-6)
    expected = torch.clamp(torch.round(vec / gamma), -1, 1)
    assert torch.equal(qv.data.float(), expected)
    assert torch.allclose(qv.dequantize(), expected * gamma, rtol=1e-6)
    assert qv.nbytes == math.ceil(4096 / 5) + 4  # base-3 packing (1.6 bits) + float32 scale
    # agrees with the weight format up to the fp16 storage of gamma
    fmt = get_format("1.58bit")
    assert torch.equal(fmt.encode(vec)["codes"], qv.packed["codes"])


def test_rowwise_and_columnwise_scales():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    rows = QuantizedVector(x, "int8", dim=-1).quantize()
    cols = QuantizedVector(x, "int8", dim=0).quantize()
    assert rows.scale is not None and cols.scale is not None
    assert rows.scale.shape == (5, 1) and cols.scale.shape == (1, 7)
    assert torch.allclose(rows.scale.flatten(), 127 / x.abs().amax(dim=1))
    for qv in (rows, cols):
        assert rel_err(x, qv.dequantize()) < 0.01


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_every_format_roundtrips(fmt, vec):
    qv = QuantizedVector(vec, fmt).quantize()
    out = qv.dequantize()
    assert out.shape == vec.shape and out.dtype == torch.float32
    max_err = {"1bit": 0.8, "1bit-scaled": 0.62, "1.58bit": 0.55, "int2": 0.99, "int3": 0.45}.get(fmt, 0.2)
    assert rel_err(vec, out) < max_err
    assert qv.nbytes * 8 >= qv.storage_bits
    assert qv.nbytes < vec.numel() * 4 // 1.9  # at least ~2x smaller than float32


@pytest.mark.parametrize(
    ("fmt", "group_size", "nbytes"),
    [
        ("int4", None, 4096 // 2 + 2),  # per row (the vector is one row): packed codes + one fp16 scale
        ("int4", 128, 4096 // 2 + 32 * 2),
        ("int4-asym", 128, 4096 // 2 + 32 * 2 + 16),  # + 32 zero points at 4 bits
        ("nf4", None, 4096 // 2 + 64 * 2),  # blocks of 64
        ("fp8", None, 4096 + 2),
    ],
)
def test_delegated_formats_real_bytes(fmt, group_size, nbytes, vec):
    qv = QuantizedVector(vec, fmt, group_size=group_size).quantize()
    assert qv.nbytes == nbytes and qv.storage_bits == 8 * nbytes
    assert torch.equal(qv.dequantize(), get_format(fmt).fake_quantize(vec, group_size))


def test_zero_vector_and_errors():
    z = torch.zeros(8)
    assert torch.equal(QuantizedVector(z, "int8").quantize().dequantize(), z)
    with pytest.raises(LmshrinkError, match=r"unknown format 'int7'.*int8"):
        QuantizedVector(z, "int7")
    with pytest.raises(LmshrinkError, match="quantize"):
        QuantizedVector(z, "int8").dequantize()
    with pytest.raises(LmshrinkError, match="group_size"):
        QuantizedVector(torch.randn(4, 8), "int4", dim=0)
    with pytest.raises(LmshrinkError, match="floating-point"):
        QuantizedVector(torch.arange(4), "int8")
    with pytest.raises(NumericsError, match="NaN"):
        QuantizedVector(torch.tensor([1.0, float("nan")]), "int8").quantize()
