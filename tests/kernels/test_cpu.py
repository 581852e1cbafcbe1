"""CPU kernels: the per-token fbgemm path matches a float reference of the quantized operands."""

from __future__ import annotations

from typing import Any

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
    assert isinstance(cpu.int8_pairs_saturate(), bool)


@pytest.mark.parametrize("w", [127, 64, -64, -128, 1, -1])
@pytest.mark.parametrize("variant", ["w8a8", "w8a7", "w7a8"])
def test_each_variant_is_exact_on_worst_case_pairs(w: int, variant: str) -> None:
    # the worst case for vpmaddubsw's int16 pair sums: every activation code at the top of its range against one
    # weight value; each variant the kernel may run must return the exact product of its own operands
    packed = cpu.prepack_int8(torch.full((3, 64), w, dtype=torch.int8), torch.full((3,), 0.01))
    if variant == "w8a8" and packed.saturates:
        pytest.skip("8-bit x 8-bit saturates on this CPU (the reason for the other two variants)")
    if variant != "w8a8" and not packed.saturates:
        pytest.skip("the kernel is exact at 8 x 8 bits here")
    x = torch.ones(1, 64)
    x[0, 0] = 0.0  # range [0, 1]: zero point 0, every other code at the top
    codes, s = packed.operands(variant)
    y = torch.ops.quantized.linear_dynamic(x, packed.pack(variant), variant == "w8a7")
    exact = cpu.quantize_per_token_reference(x, variant == "w8a7") @ (codes.float() * s[:, None]).t()
    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-6)


def test_variant_choice_follows_the_error_model() -> None:
    q, scale = _weights()
    packed = cpu.prepack_int8(q, scale)
    x = torch.randn(8, 96)
    if not packed.saturates:
        assert packed.choose(x) == "w8a8"
        return
    qf = q.float()
    halving = float(((2 * torch.round(qf / 2) - qf) ** 2).mean() / (qf**2).mean())
    assert packed.weight_cost == pytest.approx(halving, rel=1e-5)
    codes, s = packed.operands("w7a8")
    assert int(codes.abs().max()) <= 64
    torch.testing.assert_close(s, scale * 2)
    # gaussian rows fill their activation range, so 7-bit weights cost more -> W8A7
    assert packed.choose(x / x.abs().amax(1, keepdim=True)) == "w8a7"
    # one huge channel (the LLM case): every other value sits in a few codes, 8-bit activations win -> W7A8
    x[:, 3] = 200.0
    xn = x / x.abs().amax(1, keepdim=True)
    assert packed.choose(xn) == "w7a8"
    # and on that input it is the variant with the lower measured error
    exact = xn @ (qf * scale[:, None]).t()
    err = {
        v: float((torch.ops.quantized.linear_dynamic(xn, packed.pack(v), v == "w8a7") - exact).norm())
        for v in ("w8a7", "w7a8")
    }
    assert err["w7a8"] < err["w8a7"]


@pytest.mark.parametrize("m", [1, 7, 64])
def test_per_token_matches_float_reference_of_quantized_operands(m: int) -> None:
    q, scale = _weights()
    packed = cpu.prepack_int8(q, scale)
    x = torch.randn(m, 96) * torch.logspace(-2, 1, m)[:, None]  # rows of very different magnitude
    bias = torch.randn(48)
    y = cpu.int8_linear_per_token(x, packed, bias)
    variant = packed.choose(x / x.abs().amax(1, keepdim=True) if m > 1 else x)
    codes, s = packed.operands(variant)
    ref = cpu.quantize_per_token_reference(x, variant == "w8a7") @ (codes.float() * s[:, None]).t() + bias
    # the kernel differs from the simulation only by fbgemm's float rounding of its qparams, which moves some codes
    # by one step: up to ~1/127 per row at 7-bit activations (measured on an AVX2 EPYC: at most 5.7e-3)
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < (1e-2 if variant == "w8a7" else 3e-3)


def test_per_token_beats_per_tensor_on_rows_of_different_scale() -> None:
    q, scale = _weights()
    w = q.float() * scale[:, None]
    x = torch.randn(16, 96)
    x[0] *= 100.0  # one loud token makes per-tensor quantization crush the others
    packed = cpu.prepack_int8(q, scale)
    exact = x @ w.t()
    per_token = cpu.int8_linear_per_token(x, packed)
    per_tensor = torch.ops.quantized.linear_dynamic(x, packed.pack("w8a7"), True)
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


# ---- fused C++ helpers (bit-identical to the eager formulas) --------------------------------------------------
ext = cpu.cpu_ext.load()
needs_ext = pytest.mark.skipif(ext is None, reason="C++ helpers not buildable here (no compiler or ninja)")


@needs_ext
@pytest.mark.parametrize("shape", [(1, 3), (5, 100), (37, 576), (64, 1536)])
def test_fused_row_quantization_is_bit_identical_to_eager(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape) * torch.logspace(-3, 2, shape[0])[:, None]
    x[:, 0] *= 50.0
    if shape[0] > 2:
        x[1] = 0.0  # an all-zero row: scale clamps at 1e-12 / 127, codes 0
    q, s = ext.quantize_rows(x)
    s_ref = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    assert torch.equal(s, s_ref)
    assert torch.equal(q, torch.round(x / s_ref).to(torch.int8))
    assert int(q.abs().max()) == 127


@needs_ext
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_rescale_is_bit_identical_to_eager(with_bias: bool) -> None:
    torch.manual_seed(0)
    acc = torch.randint(-(2**20), 2**20, (33, 70), dtype=torch.int32)
    sx, sw = torch.rand(33, 1), torch.rand(70)
    bias = torch.randn(70) if with_bias else None
    ref = acc.float().mul_(sx).mul_(sw)
    if bias is not None:
        ref = ref.add_(bias)
    assert torch.equal(ext.rescale(acc, sx, sw, bias), ref)


@needs_ext
@pytest.mark.parametrize("fmt", ["int4", "int4-asym"])
def test_fused_int4_decode_to_bf16_matches_dequantize_weight(fmt: str) -> None:
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(24, 128), None, WeightSpec.parse(fmt, group_size=32))
    zero = None if q.spec.symmetric else q.zero
    w = ext.dequant_int4_bf16(q.qweight, q.scale, zero, 128, q.grid.qmin)
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, q.dequantize_weight().bfloat16())


# ---- weight-only kernels with bf16 activations (AMX-BF16 / AVX512-BF16 CPUs) ----------------------------------
needs_bf16 = pytest.mark.skipif(not cpu.bf16_matmul_available(), reason="no native bf16 matmul on this CPU")


@needs_bf16
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 64), ("int4-asym", 32)])
@pytest.mark.parametrize("m", [1, cpu.WEIGHT_ONLY_GEMV_MAX_ROWS + 1, 96])
def test_weight_only_cpu_kernels_match_decoded_weight(fmt: str, group: int | None, m: int) -> None:
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(0)
    w, b = torch.randn(80, 192) * 0.05, torch.randn(80)
    q = QuantLinear.from_weight(w, b, WeightSpec.parse(fmt, group_size=group))
    assert q.kernel_name == ("int8" if fmt == "int8" else "int4") + "-weight-only-cpu-bf16"
    x = torch.randn(m, 192)
    ref = x @ q.dequantize_weight().t() + b
    y = q(x)
    assert y.dtype == torch.float32
    # bf16 activations (and bf16 tinygemm scales): ~2^-9 relative rounding, far below the 4/8-bit weight error
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < 6e-3
    assert rel > 0.0  # it really ran in bf16, not the float path


@pytest.mark.skipif(not cpu.amx_int8_available(), reason="no AMX-INT8 on this CPU")
def test_amx_path_identical_with_and_without_fused_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scale = _weights()
    x = torch.randn(40, 96)
    bias = torch.randn(48)
    fused = cpu.int8_linear_per_token_amx(x, q, scale, bias)
    monkeypatch.setattr(cpu.cpu_ext, "load", lambda: None)
    assert torch.equal(fused, cpu.int8_linear_per_token_amx(x, q, scale, bias))


# ---- weight-only GEMV kernels with float32 activations (AVX2 + FMA CPUs without native bf16) ------------------
@pytest.fixture
def float32_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide native bf16, so QuantLinear picks the AVX2 GEMV kernels on CPUs that would use the bf16 ones."""
    monkeypatch.setattr(cpu, "bf16_matmul_available", lambda: False)


def needs_avx2_gemv(test: Any) -> Any:
    """Run ``test`` on the AVX2 GEMV kernels (on every CPU that has them, bf16-capable ones included)."""
    skip = pytest.mark.skipif(not cpu.avx2_gemv_available(), reason="AVX2 GEMV kernels not built here")
    return pytest.mark.usefixtures("float32_kernels")(skip(test))


_GEMV_CASES = [
    ("int8", None, "int8-weight-only-cpu-avx2"),
    ("int4", 64, "int4-weight-only-cpu-avx2"),
    ("int4-asym", 32, "int4-weight-only-cpu-avx2"),
    ("int4", None, "int4-weight-only-cpu-avx2"),
    ("nf4", 64, "nf4-weight-only-cpu-avx2"),
    ("nf4", 128, "nf4-weight-only-cpu-avx2"),
]


@needs_avx2_gemv
@pytest.mark.parametrize("fmt,group,kernel", _GEMV_CASES)
@pytest.mark.parametrize("m", [1, 3, 8, 17])
def test_avx2_weight_only_gemv_matches_decoded_weight(
    fmt: str, group: int | None, kernel: str, m: int
) -> None:
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(0)
    w, b = torch.randn(80, 256) * 0.05, torch.randn(80)
    q = QuantLinear.from_weight(w, b, WeightSpec.parse(fmt, group_size=group))
    assert q.kernel_name == kernel
    x = torch.randn(m, 256) * 3
    ref = x @ q.dequantize_weight().t() + b
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (m, 80)
    # float32 activations and accumulation: only the summation order differs from F.linear
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-6
    # and no activation rounding anywhere (the bf16 kernels are ~1e-3 off)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


@needs_avx2_gemv
def test_avx2_gemv_is_what_the_layer_runs_at_decode() -> None:
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(1)
    q8 = QuantLinear.from_weight(torch.randn(48, 96), None, WeightSpec.parse("int8"))
    x = torch.randn(1, 96)
    assert torch.equal(q8(x), ext.int8_wo_gemv(x, q8.qweight, q8.scale, None))


@needs_avx2_gemv
@pytest.mark.parametrize("k", [8, 100, 200])
def test_int8_gemv_handles_any_width(k: int) -> None:
    q, scale = torch.randint(-127, 128, (33, k), dtype=torch.int8), torch.rand(33) + 0.1
    x = torch.randn(5, k)
    ref = x @ (q.float() * scale[:, None]).t()
    assert torch.allclose(ext.int8_wo_gemv(x, q, scale, None), ref, rtol=1e-5, atol=1e-4)


@needs_avx2_gemv
def test_int4_gemv_rejects_bad_layouts() -> None:
    x = torch.randn(1, 64)
    packed = torch.zeros(4, 32, dtype=torch.uint8)
    scale = torch.ones(4, 8)  # groups of 8: not a multiple of 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.int4_wo_gemv(x, packed, scale, torch.zeros(4, 8), None, None)
    with pytest.raises(RuntimeError, match="packed"):
        ext.int4_wo_gemv(torch.randn(1, 32), packed, torch.ones(4, 2), torch.zeros(4, 2), None, None)
    with pytest.raises(RuntimeError, match="lut"):
        ext.int4_wo_gemv(x, packed, torch.ones(4, 2), torch.zeros(4, 2), None, torch.zeros(8))


@needs_avx2_gemv
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 64), ("int4-asym", 32), ("nf4", 64)])
def test_one_pass_dequant_is_bit_identical_to_dequantize_weight(fmt: str, group: int | None) -> None:
    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.formats import NF4_CODEBOOK
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(24, 128), None, WeightSpec.parse(fmt, group_size=group))
    if fmt == "int8":
        w = ext.dequant_int8_f32(q.qweight, q.scale)
    elif fmt == "nf4":
        s = q.c_scale.float().reshape(24, -1).contiguous()
        w = ext.dequant_4bit_f32(q.c_codes.reshape(24, 64), s, torch.zeros_like(s), NF4_CODEBOOK.float())
    else:
        s = q.scale.float().contiguous()
        z = q.zero.float() if fmt.endswith("asym") else torch.zeros_like(s)
        w = ext.dequant_4bit_f32(q.qweight, s, (q.grid.qmin - z).contiguous(), None)
    assert torch.equal(w, q.dequantize_weight())


@needs_avx2_gemv
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 64), ("nf4", 64)])
def test_deep_copy_of_a_used_layer_runs_on_its_own_tensors(fmt: str, group: int | None) -> None:
    import copy

    from lmshrink.quantization.config import WeightSpec
    from lmshrink.quantization.linear import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(32, 64), None, WeightSpec.parse(fmt, group_size=group))
    x = torch.randn(1, 64)
    before = q(x)  # builds the kernel caches (closures over q's buffers)
    other = copy.deepcopy(q)
    other.load_state_dict(QuantLinear.from_weight(torch.randn(32, 64), None, q.spec).state_dict())
    assert torch.equal(q(x), before)  # the original is untouched
    assert torch.allclose(other(x), x @ other.dequantize_weight().t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other(x), before)


def test_int8_kernel_note_only_for_fbgemm_w8a8_on_saturating_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu.INT8_EXACT_ENV, raising=False)
    assert cpu.int8_kernel_note(["int4-weight-only-cpu-avx2", "dequantize-on-the-fly"]) is None
    note = cpu.int8_kernel_note({"fbgemm-int8-dynamic-per-token": 3})
    monkeypatch.setenv(cpu.INT8_EXACT_ENV, "1")
    exact = cpu.int8_kernel_note({"fbgemm-int8-dynamic-per-token": 3})
    if cpu.int8_pairs_saturate():
        assert note is not None and "7-bit weights x 8-bit activations" in note
        assert exact is not None and "computes exact W8A8" in exact and "7-bit" not in exact
    else:
        assert note is None and exact is None
    monkeypatch.setenv(cpu.INT8_EXACT_ENV, "0")  # "0" is off
    assert cpu.int8_kernel_note({"fbgemm-int8-dynamic-per-token": 3}) == note


def test_exact_mode_computes_w8a8_numerics(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scale = _weights()
    q[0, :2] = 127  # a saturating pair
    packed = cpu.prepack_int8(q, scale)
    if not packed.saturates:
        pytest.skip("the kernel is exact at 8 x 8 bits here")
    monkeypatch.setenv(cpu.INT8_EXACT_ENV, "1")
    x = torch.randn(16, 96)
    x[:, :2] = 5.0  # both activations of the saturating pair at the top of the range
    assert packed.choose(x) == "split"
    y = cpu.int8_linear_per_token(x, packed)
    ref = cpu.quantize_per_token_reference(x, False) @ (q.float() * scale[:, None]).t()
    rel = (y - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 3e-3
    monkeypatch.setenv(cpu.INT8_EXACT_ENV, "0")
    assert packed.choose(x / x.abs().amax(1, keepdim=True)) in ("w8a7", "w7a8")


def test_single_rows_follow_the_layers_last_decision() -> None:
    q, scale = _weights()
    packed = cpu.prepack_int8(q, scale)
    if not packed.saturates:
        pytest.skip("the kernel is exact at 8 x 8 bits here")
    outlier = torch.randn(8, 96)
    outlier[:, 3] = 200.0
    outlier = outlier / outlier.abs().amax(1, keepdim=True)
    flat = torch.randn(1, 96)
    assert packed.choose(flat) == "w8a7"  # no decision yet: a single row is measured too
    assert packed.choose(outlier) == "w7a8"
    assert packed.choose(flat) == "w7a8"  # decode follows the last multi-row (prefill) decision
    assert packed.choose(torch.randn(8, 96)) == "w8a7"
