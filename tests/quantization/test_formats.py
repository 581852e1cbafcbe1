import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.quantization.formats import (
    FORMAT_NAMES,
    NF4_CODEBOOK,
    get_format,
    pack_bits,
    pack_ternary,
    unpack_bits,
    unpack_ternary,
)
from lmshrink.quantization.grid import pack_int4

GRANULARITIES = (0, -1, 128, 32)  # per tensor, per channel, groups of 128 and 32
GROUPED = [n for n in FORMAT_NAMES if get_format(n).grouped]

# Minimum SQNR (dB) on a seeded 128x256 standard Gaussian at the coarsest granularity (per tensor), a little below
# what was measured (1024x1024 table in the report): int8 39.3, int4 14.1, nf4 17.9, fp8 31.6, 1.58bit 5.8, ...
MIN_SQNR = {
    "int8": 38.0,
    "int4": 13.5,
    "int4-asym": 14.0,
    "int3": 6.2,
    "int2": 0.2,
    "nf4": 17.0,
    "fp8": 31.0,
    "fp16": 70.0,
    "bf16": 52.0,
    "1bit": 3.8,
    "1bit-scaled": 4.2,
    "1.58bit": 5.5,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a shared machine, thread synchronisation costs more than it saves. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum().item() / (ref - approx).pow(2).sum().item())


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(128, 256, generator=torch.Generator().manual_seed(0))


def _granularities(name: str) -> tuple[int | None, ...]:
    return GRANULARITIES if get_format(name).grouped else (None,)


CASES = [(n, g) for n in FORMAT_NAMES for g in _granularities(n)]


def test_registry():
    assert FORMAT_NAMES == (
        "int8", "int4", "int4-asym", "int3", "int2", "nf4", "fp8", "fp16", "bf16", "1bit", "1bit-scaled", "1.58bit",
    )  # fmt: skip
    for name in FORMAT_NAMES:
        assert get_format(name).name == name
    assert get_format("NF4").name == "nf4"
    int2_asym = get_format("int2-asym")
    assert (int2_asym.bits, int2_asym.symmetric, get_format("int2").symmetric) == (2, False, True)
    with pytest.raises(LmshrinkError, match=r"unknown weight format 'int9'.*int8, int4, .*1\.58bit"):
        get_format("int9")


@pytest.mark.parametrize(("name", "group_size"), CASES)
def test_roundtrip_sqnr_storage_and_dtypes(name, group_size, gauss):
    fmt = get_format(name)
    packed = fmt.encode(gauss, group_size)
    assert set(packed) == set(fmt.storage_keys())
    decoded = fmt.decode(packed, gauss.shape, group_size)
    assert decoded.dtype == torch.float32 and decoded.shape == gauss.shape
    assert torch.equal(decoded, fmt.fake_quantize(gauss, group_size))  # fake_quantize == decode(encode)
    assert sqnr(gauss, decoded) > MIN_SQNR[name]
    # the packed tensors hold exactly storage_bits, up to rounding each tensor to whole bytes
    actual_bits = 8 * sum(t.numel() * t.element_size() for t in packed.values())
    expected = fmt.storage_bits(gauss.shape, group_size)
    assert 0 <= actual_bits - expected < 8 * len(packed)
    # dtypes of the real storage
    codes = packed.get("codes", packed.get("weight"))
    assert codes is not None
    expected_dtype = {"int8": torch.int8, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        name, torch.uint8
    )
    assert codes.dtype == expected_dtype
    if "scale" in packed:
        assert packed["scale"].dtype == torch.float16


@pytest.mark.parametrize(
    ("name", "bits_per_weight"),
    [
        ("int8", 8),
        ("int4", 4),
        ("int3", 3),
        ("int2", 2),
        ("nf4", 4),
        ("fp8", 8),
        ("1bit", 1),
        ("1.58bit", 1.6),
    ],
)
def test_codes_use_nominal_bits(name, bits_per_weight, gauss):
    codes = get_format(name).encode(gauss, 0 if get_format(name).grouped else None)["codes"]
    assert codes.numel() * codes.element_size() == math.ceil(gauss.numel() * bits_per_weight / 8)


def test_quality_ordering(gauss):
    int4, nf4 = get_format("int4"), get_format("nf4")
    assert sqnr(gauss, nf4.fake_quantize(gauss, 0)) > sqnr(gauss, int4.fake_quantize(gauss, 0)) + 2
    assert sqnr(gauss, int4.fake_quantize(gauss, 128)) > 15
    for name in ("int8", "int4", "int4-asym", "int3", "nf4"):
        fmt = get_format(name)
        per_tensor, per_channel, g32 = (sqnr(gauss, fmt.fake_quantize(gauss, g)) for g in (0, -1, 32))
        assert g32 > per_channel > per_tensor, name
    assert sqnr(gauss, get_format("int4-asym").fake_quantize(gauss, -1)) > sqnr(
        gauss, get_format("int4").fake_quantize(gauss, -1)
    )


def test_default_granularities():
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    assert get_format("int4").encode(w)["scale"].shape == (4, 1)  # per channel
    assert get_format("nf4").encode(w)["scale"].shape == (4, 2)  # blocks of 64
    assert get_format("1.58bit").encode(w)["scale"].shape == (1, 1)  # per tensor (BitNet)
    assert get_format("1.58bit").encode(w, -1)["scale"].shape == (4, 1)  # per row option
    assert get_format("1bit-scaled").encode(w)["scale"].shape == (4, 1)


@pytest.mark.parametrize(("name", "g"), [(n, g) for n in FORMAT_NAMES for g in _granularities(n) if g != 128])
def test_requantizing_is_exact(name, g, gauss):
    fmt = get_format(name)
    once = fmt.fake_quantize(gauss, g)
    snapped = fmt.snap(gauss, g)
    if name == "1.58bit":  # absmean gamma shrinks on re-quantization (zeros count), the ternary codes do not
        assert torch.equal(fmt.encode(once, g)["codes"], fmt.encode(gauss, g)["codes"])
        assert torch.equal(snapped, once)
        return
    assert torch.equal(fmt.fake_quantize(snapped, g), snapped)
    if name != "int4-asym":  # symmetric grids: one pass is already a fixed point
        assert torch.equal(snapped, once)
    assert sqnr(gauss, snapped) > sqnr(gauss, once) - 0.2


def test_sign_conventions():
    w = torch.tensor([[0.5, 0.0, -0.25, 2.0]])
    assert get_format("1bit").fake_quantize(w).tolist() == [[1.0, -1.0, -1.0, 1.0]]  # zero -> -1
    scaled = get_format("1bit-scaled").fake_quantize(w)
    assert torch.allclose(scaled, torch.tensor([[1.0, -1.0, -1.0, 1.0]]) * 0.6875)
    ternary = get_format("1.58bit").fake_quantize(torch.tensor([[0.5, 0.0, -0.25, 2.0, -3.0, 0.1]]))
    gamma = (0.5 + 0.25 + 2.0 + 3.0 + 0.1) / 6
    assert torch.allclose(ternary, torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0, 0.0]]) * gamma, rtol=1e-3)


def test_nf4_codebook_and_values():
    assert (
        NF4_CODEBOOK.numel() == 16
        and NF4_CODEBOOK[0] == -1
        and NF4_CODEBOOK[-1] == 1
        and NF4_CODEBOOK[7] == 0
    )
    w = NF4_CODEBOOK.reshape(1, 16) * 2.0  # exactly on the codebook times an absmax of 2
    assert torch.equal(get_format("nf4").fake_quantize(w, 16), w)


def test_int4_bytes_match_grid_packing():
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    fmt = get_format("int4")
    packed = fmt.encode(w)
    codes = torch.round(w / packed["scale"].float()).clamp(-7, 7).to(torch.int16) + 8
    assert torch.equal(packed["codes"], pack_int4(codes).reshape(-1))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_exact(bits):
    codes = torch.randint(
        0, 2**bits, (7, 13), generator=torch.Generator().manual_seed(bits), dtype=torch.int16
    )
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(codes.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).reshape(7, 13), codes.to(torch.uint8))


def test_ternary_pack_exact():
    codes = torch.randint(-1, 2, (11, 7), generator=torch.Generator().manual_seed(3))
    packed = pack_ternary(codes)
    assert packed.numel() == math.ceil(77 / 5)
    assert torch.equal(unpack_ternary(packed, 77).reshape(11, 7), codes.to(torch.int8))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 255), min_size=0, max_size=70))
def test_pack_unpack_property(bits, values):
    codes = torch.tensor(values, dtype=torch.int16) % (2**bits)
    assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, codes.numel()), codes.to(torch.uint8))
    trits = torch.tensor(values, dtype=torch.int16) % 3 - 1
    assert torch.equal(unpack_ternary(pack_ternary(trits), trits.numel()), trits.to(torch.int8))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(FORMAT_NAMES), st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**16))
def test_encode_decode_shape_property(name, rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    fmt = get_format(name)
    g = -1 if fmt.grouped else None
    out = fmt.decode(fmt.encode(w, g), w.shape, g)
    assert out.shape == w.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.equal(out, fmt.fake_quantize(w, g))


def test_vector_and_dtype_preserved():
    v = torch.randn(64, generator=torch.Generator().manual_seed(4))
    fmt = get_format("int4")
    assert fmt.decode(fmt.encode(v), v.shape).shape == (64,)
    assert fmt.fake_quantize(v.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", GROUPED)
def test_group_size_must_divide(name):
    fmt = get_format(name)
    with pytest.raises(LmshrinkError, match="does not divide the input dimension 96"):
        fmt.encode(torch.randn(4, 96), 64)
    with pytest.raises(LmshrinkError, match="does not divide"):
        fmt.storage_bits((4, 96), 64)
    with pytest.raises(LmshrinkError, match="group_size must be"):
        fmt.encode(torch.randn(4, 96), -3)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize(("bad", "word"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_rejected(name, bad, word):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(NumericsError, match=rf"1 {word}.*\(2, 5\)" if word == "NaN" else r"1 Inf"):
        get_format(name).encode(w)
    with pytest.raises(NumericsError):
        get_format(name).fake_quantize(w)


def test_cast_overflow_and_bad_packed_input():
    with pytest.raises(NumericsError, match="fp16 range"):
        get_format("fp16").encode(torch.tensor([[1e6, 0.0]]))
    assert torch.equal(
        get_format("bf16").encode(torch.tensor([[1e6]]))["weight"].float(), torch.tensor([[999424.0]])
    )
    packed = get_format("int4").encode(torch.randn(4, 8))
    del packed["scale"]
    with pytest.raises(LmshrinkError, match="missing"):
        get_format("int4").decode(packed, (4, 8))
    with pytest.raises(LmshrinkError, match="shape"):
        get_format("int8").encode(torch.randn(2, 3, 4))


def test_all_zero_and_tiny_weights():
    for name in FORMAT_NAMES:
        fmt = get_format(name)
        zero = torch.zeros(2, 64)
        expected = -torch.ones(2, 64) if name == "1bit" else zero
        assert torch.equal(fmt.fake_quantize(zero), expected), name
        tiny = torch.full((2, 64), 1e-9)
        assert bool(torch.isfinite(fmt.fake_quantize(tiny)).all()), name
