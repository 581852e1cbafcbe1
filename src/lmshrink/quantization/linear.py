"""``QuantLinear``: a linear layer holding real packed low-precision storage, with a real kernel where one is fast.

Storage (all buffers, saved as they are):

* int8 per channel, symmetric: ``qweight`` int8 (N, K), ``scale`` float32 (N,): runs on fbgemm (CPU) / ``_int_mm``
  (CUDA) with int8 activations quantized per token when ``act="int8"``.
* any other integer grid (int2..int8, sym/asym, groups): ``qweight`` uint8 bit-packed codes (N, ceil(K/8) * bits),
  ``scale`` (N, G) (float16 with groups, float32 per channel), ``zero`` uint8 (N, G) for asymmetric grids.
* codec formats (nf4, fp8, 1.58bit, ...): the tensors of ``lmshrink.quantization.formats`` under ``c_<name>``.
* optional ``bias`` (N,) float32 and ``input_scale`` (K,) float32 (an AWQ/SmoothQuant scale that could not be folded;
  the layer computes ``(x * input_scale) @ W.T``).

``kernel_name`` says what runs for the layer's current device; "dequantize-on-the-fly" means no speed claim.

>>> import torch
>>> from lmshrink.quantization.config import WeightSpec
>>> q = QuantLinear.from_weight(torch.randn(8, 16), None, WeightSpec.parse("int4", group_size=8))
>>> tuple(q.qweight.shape), q.qweight.dtype
((8, 8), torch.uint8)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.kernels import cpu as cpu_kernels
from lmshrink.kernels import cuda as cuda_kernels
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.grid import IntGrid, compute_qparams, compute_qparams_mse, quantize_codes

ACT_MODES = ("float", "int8")
_TINYGEMM_GROUPS = (32, 64, 128, 256)


@functools.lru_cache(maxsize=256)
def _codec_layout(
    fmt: str, n: int, k: int, group_size: int | None
) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """(key, shape, dtype) of each tensor a codec format stores for an (n, k) weight, sorted by key: found once per
    shape by encoding zeros (a model has few distinct shapes; fp8 zeros of one 11008 x 4096 layer took 0.8 s here)."""
    layout = _get_codec(fmt).encode(torch.zeros(n, k), group_size=group_size)
    return tuple((key, tuple(layout[key].shape), layout[key].dtype) for key in sorted(layout))


# ---- bit packing (pure tensor math) -------------------------------------------------------------------------
def packed_width(k: int, bits: int) -> int:
    """Bytes per row for ``k`` codes of ``bits`` bits (rows padded to a multiple of 8 codes)."""
    return math.ceil(k / 8) * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (N, K), each < 2**bits, into uint8 (N, ceil(K/8) * bits); code i of a byte-run first."""
    n, k = codes.shape
    kp = math.ceil(k / 8) * 8
    c = F.pad(codes.to(torch.int64), (0, kp - k))
    if bits == 8:
        return c.to(torch.uint8)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        c = c.reshape(n, kp // per, per)
        out = torch.zeros(n, kp // per, dtype=torch.int64)
        for i in range(per):
            out |= c[..., i] << (i * bits)
        return out.to(torch.uint8)
    c = c.reshape(n, kp // 8, 8)
    v = torch.zeros(n, kp // 8, dtype=torch.int64)
    for i in range(8):
        v |= c[..., i] << (i * bits)
    return torch.stack([(v >> (8 * j)) & 0xFF for j in range(bits)], dim=-1).reshape(n, -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 codes (N, K)."""
    n = packed.shape[0]
    if bits == 8:
        return packed[:, :k]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (i * bits)) & mask for i in range(per)]
        return torch.stack(parts, dim=-1).reshape(n, -1)[:, :k]
    b = packed.reshape(n, -1, bits).to(torch.int64)
    v = torch.zeros(b.shape[:2], dtype=torch.int64, device=packed.device)
    for j in range(bits):
        v |= b[..., j] << (8 * j)
    codes = torch.stack([(v >> (i * bits)) & mask for i in range(8)], dim=-1).reshape(n, -1)[:, :k]
    return codes.to(torch.uint8)


def _get_codec(name: str) -> Any:
    try:
        from lmshrink.quantization.formats import get_format
    except ImportError as exc:
        raise LmshrinkError(
            f"format {name!r} needs lmshrink.quantization.formats, which is not available in this install"
        ) from exc
    return get_format(name)


def _int8_per_channel(spec: WeightSpec) -> bool:
    return spec.is_integer and spec.bits == 8 and spec.symmetric and spec.group_size is None


# ---- the module ---------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A linear layer with packed low-precision weights (see the module docstring for the storage layout)."""

    lmshrink_storage = "quantized"
    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None
    input_scale: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: WeightSpec,
        *,
        bias: bool = False,
        act: str = "float",
        threshold: float | None = None,
        input_scale: bool = False,
    ) -> None:
        super().__init__()
        if act not in ACT_MODES:
            raise LmshrinkError(f"activation mode {act!r} unknown; accepted: {', '.join(ACT_MODES)}")
        if act == "int8" and not _int8_per_channel(spec):
            raise LmshrinkError("int8 activations need int8 symmetric per-channel weights")
        if spec.group_size is not None and in_features % spec.group_size:
            raise LmshrinkError(
                f"group size {spec.group_size} does not divide the input dimension {in_features}"
            )
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.act, self.threshold = act, threshold
        n, k = out_features, in_features
        groups = 1 if spec.group_size is None else k // spec.group_size
        if _int8_per_channel(spec):
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(n, dtype=torch.float32))
        elif spec.is_integer:
            sdt = torch.float16 if spec.group_size is not None else torch.float32
            self.register_buffer("qweight", torch.zeros(n, packed_width(k, spec.bits), dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(n, groups, dtype=sdt))
            if not spec.symmetric:
                self.register_buffer("zero", torch.zeros(n, groups, dtype=torch.uint8))
        else:
            layout = _codec_layout(spec.format, n, k, spec.group_size)
            self._codec_keys = tuple(key for key, _, _ in layout)
            for key, shape, dtype in layout:
                self.register_buffer(f"c_{key}", torch.zeros(shape, dtype=dtype))
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self.register_buffer("input_scale", torch.ones(k) if input_scale else None)
        self._cache: dict[str, Any] = {}

    # -- construction
    @property
    def grid(self) -> IntGrid:
        return IntGrid(self.spec.bits, self.spec.symmetric, self.spec.group_size)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: WeightSpec,
        bias: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> QuantLinear:
        """Build from integer codes on ``spec``'s grid (as :func:`lmshrink.quantization.grid.quantize_codes`)."""
        n, k = codes.shape
        m = cls(k, n, spec, bias=bias is not None, **kwargs)
        grid = m.grid
        with torch.no_grad():
            if _int8_per_channel(spec):
                m.qweight.copy_(codes.to(torch.int8))
                m.scale.copy_(scale.reshape(n))
            else:
                m.qweight.copy_(pack_bits((codes.to(torch.int16) - grid.qmin).to(torch.uint8), spec.bits))
                m.scale.copy_(scale.reshape(m.scale.shape))
                if not spec.symmetric:
                    m.zero.copy_(zero.reshape(m.zero.shape).to(torch.uint8))
            if bias is not None and m.bias is not None:
                m.bias.copy_(bias.detach().float())
        return m

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: WeightSpec,
        clip_search: bool = False,
        **kwargs: Any,
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float weight (N, K) into packed storage; ``clip_search`` (integer
        grids): each group's range from :func:`~lmshrink.quantization.grid.compute_qparams_mse`, not min/max."""
        w = weight.detach().float()
        if clip_search and not spec.is_integer:
            raise LmshrinkError(
                f"clip_search needs an integer format (int2..int8, intN-asym), got {spec.format!r}"
            )
        if spec.is_integer:
            grid = IntGrid(spec.bits, spec.symmetric, spec.group_size)
            scale, zero = (compute_qparams_mse if clip_search else compute_qparams)(w, grid)
            if spec.group_size is not None:  # stored in float16: quantize against the stored scale
                scale = scale.to(torch.float16).float()
            return cls.from_codes(quantize_codes(w, scale, zero, grid), scale, zero, spec, bias, **kwargs)
        n, k = w.shape
        m = cls(k, n, spec, bias=bias is not None, **kwargs)
        packed = _get_codec(spec.format).encode(w, group_size=spec.group_size)
        with torch.no_grad():
            for key in m._codec_keys:
                getattr(m, f"c_{key}").copy_(packed[key])
            if bias is not None and m.bias is not None:
                m.bias.copy_(bias.detach().float())
        return m

    def set_input_scale(self, scale: torch.Tensor) -> None:
        """Set the per-input-channel multiplier (K,) applied to ``x`` before the matmul."""
        if self.input_scale is None:
            raise LmshrinkError("this layer was built without input_scale")
        with torch.no_grad():
            self.input_scale.copy_(scale.reshape(self.in_features))

    # -- decoding
    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight (N, K) the stored codes represent."""
        n, k = self.out_features, self.in_features
        if _int8_per_channel(self.spec):
            return self.qweight.float() * self.scale.reshape(n, 1)
        if self.spec.is_integer:
            codes = unpack_bits(self.qweight, self.spec.bits, k).float() + self.grid.qmin
            if not self.spec.symmetric:
                codes = codes - self.zero.float().repeat_interleave(k // self.zero.shape[1], dim=1)
            g = k if self.spec.group_size is None else self.spec.group_size
            return (codes.reshape(n, k // g, g) * self.scale.float().reshape(n, -1, 1)).reshape(n, k)
        packed = {key: getattr(self, f"c_{key}") for key in self._codec_keys}
        return _get_codec(self.spec.format).decode(packed, (n, k), group_size=self.spec.group_size).float()

    # -- kernels
    @property
    def kernel_name(self) -> str:
        """The kernel the forward pass uses on the layer's current device."""
        dev = self._device_type()
        if dev == "cpu" and self.act == "int8" and cpu_kernels.fbgemm_available():
            if self.threshold is not None:
                return "fbgemm-int8-dynamic-per-token+fp32-outliers"
            if cpu_kernels.amx_int8_available():
                return "int8-per-token-fbgemm+amx"
            return "fbgemm-int8-dynamic-per-token"
        if dev == "cpu" and self.act == "float" and cpu_kernels.bf16_matmul_available():
            if _int8_per_channel(self.spec):
                return "int8-weight-only-cpu-bf16"
            if self._int4_tinygemm_ok():
                return "int4-weight-only-cpu-bf16"
        if dev == "cpu" and self.act == "float" and cpu_kernels.avx2_gemv_available():
            if _int8_per_channel(self.spec):
                return "int8-weight-only-cpu-avx2"
            if self._int4_avx2_ok():
                return "int4-weight-only-cpu-avx2"
            if self._nf4_avx2_ok():
                return "nf4-weight-only-cpu-avx2"
        if dev == "cuda" and self.act == "int8" and self.threshold is None:
            return "cuda-int8-mm"
        if (
            dev == "cuda"
            and self.spec.is_integer
            and self.spec.bits == 4
            and self.spec.group_size in _TINYGEMM_GROUPS
            and self.in_features % 128 == 0
            and self.out_features % 8 == 0
        ):
            return "cuda-int4-weight-only"
        if dev == "cuda" and self.spec.format == "fp8":
            return "cuda-fp8-scaled-mm"
        return "dequantize-on-the-fly"

    def _device_type(self) -> str:
        """Where the stored tensors live (codec formats keep theirs under ``c_<name>``, not ``scale``)."""
        buf = next((b for b in self._buffers.values() if b is not None), None)
        return "cpu" if buf is None else buf.device.type

    def _tinygemm_zero(self) -> torch.Tensor:
        """Integer zero points (N, G) with value ``(stored code - zero) * scale``, as tinygemm's packing wants:
        the stored unsigned codes are ``value - qmin``, so a symmetric grid's zero is ``-qmin`` (7 for int4)."""
        if not self.spec.symmetric:
            return self.zero
        return torch.full(self.scale.shape, -self.grid.qmin, dtype=torch.uint8, device=self.scale.device)

    def _fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """e4m3 weight (N, K) and per-row float32 scale (1, N) for the CUDA FP8 GEMM, built once per device: the
        stored codes themselves when the format is per-channel, else the weight re-quantized per row."""
        if "fp8" not in self._cache:
            n, k = self.out_features, self.in_features
            scale = getattr(self, "c_scale", None)
            if self.spec.group_size is None and scale is not None and scale.numel() == n:
                codes = self._buffers["c_codes"].reshape(n, k).contiguous()  # type: ignore[union-attr]
                self._cache["fp8"] = (
                    codes.view(torch.float8_e4m3fn),
                    scale.float().reshape(1, n).contiguous(),
                )
            else:
                self._cache["fp8"] = cuda_kernels.fp8_weight_rowwise(self.dequantize_weight())
        return self._cache["fp8"]  # type: ignore[no-any-return]

    def _int4_tinygemm_ok(self) -> bool:
        return (
            self.spec.is_integer
            and self.spec.bits == 4
            and self.spec.group_size in _TINYGEMM_GROUPS
            and self.in_features % 2 == 0
        )

    def _int4_avx2_ok(self) -> bool:
        k, g = self.in_features, self.spec.group_size
        return (
            self.spec.is_integer
            and self.spec.bits == 4
            and k % 16 == 0
            and (g is None or g % 16 == 0)
            and self.scale.dtype in (torch.float16, torch.float32)
        )

    def _nf4_avx2_ok(self) -> bool:
        k, g = self.in_features, self.spec.group_size
        scale = getattr(self, "c_scale", None)
        return (
            self.spec.format == "nf4"
            and k % 16 == 0
            and (g is None or (g > 0 and g % 16 == 0))
            and scale is not None
            and scale.numel() == self.out_features * (1 if g is None else k // g)
        )

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # device moves follow the model (.to(device)); dtype casts (.half()) never touch packed storage or scales
        self._cache = {}
        for key, buf in self._buffers.items():
            if buf is not None:
                new = fn(buf)
                self._buffers[key] = new if new.dtype == buf.dtype else buf.to(new.device)
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _w8a8_decode_gemv(self) -> bool:
        """Whether one-row calls of this W8A8 layer run the AVX2 int8 GEMV with float32 activations: on CPUs whose
        int8 pairs saturate (no VNNI) fbgemm's one-row int8 call is no faster than fp32 (whole-model decode 1.08x,
        against 1.70x for that GEMV, ``bench/README.md``), and float activations lose nothing."""
        if "decode_gemv" not in self._cache:
            self._cache["decode_gemv"] = (
                _int8_per_channel(self.spec)
                and self.scale.dtype == torch.float32
                and cpu_kernels.int8_pairs_saturate()
                and cpu_kernels.avx2_gemv_available()
            )
        return bool(self._cache["decode_gemv"])

    def _fbgemm(self) -> Any:
        if "fbgemm" not in self._cache:
            self._cache["fbgemm"] = cpu_kernels.prepack_int8(self.qweight, self.scale)
        return self._cache["fbgemm"]

    def _forward_2d(self, x: torch.Tensor, kernel: str) -> torch.Tensor:
        if (
            x.shape[0] == 1
            and kernel in ("fbgemm-int8-dynamic-per-token", "fbgemm-int8-dynamic-per-token+fp32-outliers")
            and self._w8a8_decode_gemv()
        ):  # decode: every column at float32 (for LLM.int8 the outlier columns' own path)
            return cpu_kernels.int8_weight_only_avx2(x, self.qweight, self.scale, self.bias)
        if kernel == "fbgemm-int8-dynamic-per-token":
            return cpu_kernels.int8_linear_per_token(x, self._fbgemm(), self.bias)
        if (
            kernel == "int8-per-token-fbgemm+amx"
        ):  # fbgemm for few rows (decode), AMX _int_mm for many (prefill)
            if x.shape[0] >= cpu_kernels.AMX_MIN_ROWS:
                return cpu_kernels.int8_linear_per_token_amx(x, self.qweight, self.scale, self.bias)
            return cpu_kernels.int8_linear_per_token(x, self._fbgemm(), self.bias)
        if kernel == "int8-weight-only-cpu-bf16":
            ones = self._cache.get("ones")
            if ones is None:
                ones = self._cache["ones"] = torch.ones(self.out_features, dtype=torch.bfloat16)
            return cpu_kernels.int8_weight_only_bf16(x, self.qweight, self.scale, self.bias, ones)
        if kernel == "int4-weight-only-cpu-bf16":
            zero = None if self.spec.symmetric else self.zero
            if "int4cpu" not in self._cache:
                codes = unpack_bits(self.qweight, 4, self.in_features)
                self._cache["int4cpu"] = cpu_kernels.pack_int4_cpu(
                    codes, self.scale, zero, self.grid.qmin, int(self.spec.group_size or 0)
                )
            return cpu_kernels.int4_weight_only_bf16(
                x, self.qweight, self.scale, zero, self.grid.qmin, int(self.spec.group_size or 0),
                self._cache["int4cpu"], self.bias,
            )  # fmt: skip
        if kernel == "int8-weight-only-cpu-avx2":
            return cpu_kernels.int8_weight_only_avx2(x, self.qweight, self.scale, self.bias)
        if kernel in ("int4-weight-only-cpu-avx2", "nf4-weight-only-cpu-avx2"):
            codes, s, off, lut = self._avx2_4bit_operands(kernel)
            return cpu_kernels.int4_weight_only_avx2(x, codes, s, off, self.dequantize_weight, self.bias, lut)
        if kernel == "fbgemm-int8-dynamic-per-token+fp32-outliers":
            return self._forward_outliers(x)
        if kernel == "cuda-int8-mm":
            return cuda_kernels.int8_linear_cuda(x, self.qweight, self.scale, self.bias)
        if kernel == "cuda-int4-weight-only":
            if "int4" not in self._cache:
                codes = unpack_bits(self.qweight, 4, self.in_features)
                self._cache["int4"] = cuda_kernels.pack_int4_tinygemm(
                    codes, self.scale, self._tinygemm_zero(), int(self.spec.group_size or 0)
                )
            packed, sz = self._cache["int4"]
            return cuda_kernels.int4_linear_cuda(
                x, packed, sz, int(self.spec.group_size or 0), self.out_features, self.bias
            )
        if kernel == "cuda-fp8-scaled-mm":
            w8, w_scale = self._fp8_operands()
            return cuda_kernels.fp8_linear_cuda(x, w8, w_scale, self.bias)
        w = self.dequantize_weight()
        if self.act == "int8":  # no int8 kernel here: same numerics, simulated
            x = _fake_quant_per_token(x)
        return F.linear(x, w, self.bias)

    def _forward_outliers(self, x: torch.Tensor) -> torch.Tensor:
        """LLM.int8(): input columns with any |x| > threshold go through fp32, the rest through the int8 kernel."""
        cols = (x.abs() > float(self.threshold or 0.0)).any(dim=0).nonzero().flatten()
        if cols.numel() == 0:
            return cpu_kernels.int8_linear_per_token(x, self._fbgemm(), self.bias)
        x_out = x[:, cols]
        x_in = x.clone()
        x_in[:, cols] = 0.0
        y = cpu_kernels.int8_linear_per_token(x_in, self._fbgemm(), self.bias)
        w_out = self.qweight[:, cols].float() * self.scale.reshape(-1, 1)
        return y.addmm_(x_out, w_out.t())

    def _avx2_4bit_operands(
        self, kernel: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Packed codes (N, K/2), float32 group scales and offsets (N, n_groups) and the NF4 codebook (None for
        integer grids) in the layout of the AVX2 4-bit GEMV; built once per layer and cached."""
        key = "nf4avx2" if kernel.startswith("nf4") else "int4avx2"
        if key not in self._cache:
            if key == "int4avx2":
                s = self.scale.float().reshape(self.out_features, -1).contiguous()
                z = self.zero.float() if not self.spec.symmetric else torch.zeros_like(s)
                self._cache[key] = (self.qweight, s, (self.grid.qmin - z).contiguous(), None)
            else:
                from lmshrink.quantization.formats import NF4_CODEBOOK

                scale_buf: torch.Tensor = self._buffers["c_scale"]  # type: ignore[assignment]
                codes_buf: torch.Tensor = self._buffers["c_codes"]  # type: ignore[assignment]
                s = scale_buf.float().reshape(self.out_features, -1).contiguous()
                codes = codes_buf.reshape(self.out_features, self.in_features // 2)
                self._cache[key] = (codes, s, torch.zeros_like(s), NF4_CODEBOOK.float().contiguous())
        return self._cache[key]  # type: ignore[no-any-return]

    def _decode_step_fn(self, kernel: str) -> Any:
        """The 2-D forward for ``kernel``. For the AVX2 weight-only kernels a closure that calls the C++ GEMV
        directly for few rows: a decode step runs ~200 of these layers on one row, where Python dispatch (tens of
        microseconds per layer) is a sizeable part of the step; everything else goes through :meth:`_forward_2d`."""
        ext = cpu_kernels.cpu_ext.load()
        if kernel == "int8-weight-only-cpu-avx2" and ext is not None:
            gemv, q, sc, b = ext.int8_wo_gemv, self.qweight, self.scale, self.bias
            rows = cpu_kernels.AVX2_INT8_GEMV_MAX_ROWS

            def int8_fn(x: torch.Tensor) -> torch.Tensor:
                if x.shape[0] <= rows:
                    return gemv(x if x.is_contiguous() else x.contiguous(), q, sc, b)
                return cpu_kernels.int8_weight_only_avx2(x, q, sc, b)

            return int8_fn
        if kernel in ("int4-weight-only-cpu-avx2", "nf4-weight-only-cpu-avx2") and ext is not None:
            slow = functools.partial(self._forward_2d, kernel=kernel)
            codes, s4, off, lut = self._avx2_4bit_operands(kernel)
            gemv4, b4 = ext.int4_wo_gemv, self.bias
            rows4 = cpu_kernels.AVX2_INT4_GEMV_MAX_ROWS if lut is None else cpu_kernels.AVX2_NF4_GEMV_MAX_ROWS

            def int4_fn(x: torch.Tensor) -> torch.Tensor:
                if x.shape[0] <= rows4:
                    return gemv4(x if x.is_contiguous() else x.contiguous(), codes, s4, off, b4, lut)
                return slow(x)

            return int4_fn
        return functools.partial(self._forward_2d, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._cache.get("fn")
        if fn is None:  # decided once per device (the cache is cleared on .to() and on loading weights)
            kernel = self._cache["kernel"] = self.kernel_name
            fn = self._cache["fn"] = self._decode_step_fn(kernel)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 and not self._cache["kernel"].startswith("cuda-"):
            x2 = x2.float()  # the CUDA kernels take bf16 / fp16 inputs as they come (no float32 round trip)
        if self.input_scale is not None:
            x2 = x2 * self.input_scale.to(x2.dtype)
        y = fn(x2).reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def __getstate__(self) -> dict[str, Any]:
        # kernel caches (prepacked weights, closures over this layer's tensors) are rebuilt, never copied: a deep
        # copy or a pickle must not call into the original layer's buffers
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def storage_bits(self) -> int:
        """Bits the stored weight takes in theory: codes at ``bits`` per weight plus scales/zeros (no bias)."""
        n, k = self.out_features, self.in_features
        if not self.spec.is_integer:
            return int(_get_codec(self.spec.format).storage_bits((n, k), self.spec.group_size))
        groups = 1 if self.spec.group_size is None else k // self.spec.group_size
        scale_bits = 16 if self.spec.group_size is not None else 32
        zero_bits = 0 if self.spec.symmetric else 8
        return n * k * self.spec.bits + n * groups * (scale_bits + zero_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.spec.format}, "
            f"group_size={self.spec.group_size}, act={self.act}, kernel={self.kernel_name}"
        )

    def layer_spec(self) -> dict[str, Any]:
        """JSON description used by storage to rebuild an empty layer of the same layout."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "format": self.spec.format,
            "bits": self.spec.bits,
            "symmetric": self.spec.symmetric,
            "group_size": self.spec.group_size,
            "bias": self.bias is not None,
            "act": self.act,
            "threshold": self.threshold,
            "input_scale": self.input_scale is not None,
        }


def _fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(x / s).clamp_(-127, 127) * s


def linear_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float weight (out, in) and bias of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is (in, out))."""
    w = module_weight(module)
    if type(module).__name__ == "Conv1D":
        w = w.t()
    b = getattr(module, "bias", None)
    return w.detach(), (b.detach() if isinstance(b, torch.Tensor) else None)


def module_weight(module: nn.Module) -> torch.Tensor:
    """The ``weight`` tensor of a module (raises if it has none)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise LmshrinkError(f"{type(module).__name__} has no weight tensor")
    return w
