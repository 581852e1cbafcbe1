import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.quantization.grid import (
    IntGrid,
    compute_qparams,
    dequantize_codes,
    fake_quantize,
    pack_int4,
    quantize_codes,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 0, 16])
def test_error_bounded_by_half_step(bits, symmetric, group_size):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    grid = IntGrid(bits, symmetric, group_size)
    scale, zero = compute_qparams(w, grid)
    q = quantize_codes(w, scale, zero, grid)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    err = (dequantize_codes(q, scale, zero, grid) - w).abs()
    step = scale.max().item()
    assert err.max().item() <= 0.5 * step + 1e-6


def test_int4_pack_roundtrip():
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def test_bad_group_size_and_bits():
    with pytest.raises(LmshrinkError, match="does not divide"):
        fake_quantize(torch.randn(4, 30), IntGrid(4, True, 16))
    with pytest.raises(LmshrinkError, match="bits"):
        IntGrid(bits=1)
