"""Save and reload quantized models: one safetensors file of packed codes, scales and float tensors, plus the
quantization description in the ``lmshrink.json`` manifest (written by :func:`lmshrink.models.save_model`).

Reload rebuilds the float architecture from ``config.json`` without initialising weights, swaps in empty
:class:`QuantLinear` modules from the manifest, checks every stored tensor's name, shape and dtype against that
skeleton *before* reading it, and loads it: outputs are bit-identical to the saved model. Anything that does not
match raises :class:`~lmshrink.errors.CorruptFileError`; nothing is ever unpickled.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from lmshrink.quantization import QuantConfig, quantize_model
>>> m = quantize_model(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)), QuantConfig(format="int4", group_size=16))
>>> out = save_quantized_model(m, Path(tempfile.mkdtemp()) / "q")
>>> m2, _ = load_quantized_model(out)
>>> ids = torch.arange(8)[None]
>>> torch.equal(m(ids).logits, m2(ids).logits)
True
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.models.arch import is_linear, set_submodule
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.linear import QuantLinear, linear_weight_and_bias
from lmshrink.quantization.rotation import ROTATION_BUFFER, check_orthogonal, restore_rotation
from lmshrink.utils.io import atomic_path
from lmshrink.utils.safe_load import (
    SafetensorsHeader,
    build_on_meta,
    check_declared_shapes,
    check_declared_size,
    declared_tensors,
    read_config,
    read_json_object,
    read_safetensors_header,
    safe_file_name,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "lmshrink.json"
_MAX_DIM = 1 << 24  # no real layer has 16M input or output features
_MAX_WEIGHTS_PER_BYTE = 64  # float-skeleton elements per stored byte: far above any real format (<= 8)
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tied duplicates (same storage, shape and stride): returns tensors to save and ``alias -> kept name``."""
    keep: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (
            t.device,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            keep[name] = t.detach().contiguous().cpu()
    return keep, aliases


def theoretical_bytes(model: nn.Module) -> int:
    """Bytes the model needs in theory: packed codes at their bit width plus scales/zeros for quantized layers,
    and every other tensor (float parameters, biases, input scales) at its dtype's size, tied tensors once."""
    quant_bits = 0
    quant_names: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            quant_bits += mod.storage_bits()
            quant_names.update(f"{name}.{k}" for k in ("qweight", "scale", "zero"))
            quant_names.update(f"{name}.c_{k}" for k in getattr(mod, "_codec_keys", ()))
    tensors, _ = _dedupe(model.state_dict())
    other = sum(t.numel() * t.element_size() for n, t in tensors.items() if n not in quant_names)
    return quant_bits // 8 + other


def save_quantized(model: nn.Module, tmp_dir: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write the packed weights, ``config.json`` and the tokenizer into ``tmp_dir``; return the manifest fields.

    Called by :func:`lmshrink.models.save_model` for models with ``lmshrink_format == "quantized"``.
    """
    layers = {n: m.layer_spec() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise LmshrinkError("the model has no QuantLinear layers; quantize it first (quantize_model)")
    tensors, aliases = _dedupe(model.state_dict())
    with atomic_path(Path(tmp_dir) / WEIGHTS_FILE) as tmp:
        # a single metadata key: safetensors orders several keys differently from process to process
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise LmshrinkError("only transformers models (with a .config) can be saved in the quantized format")
    config.save_pretrained(tmp_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    return {
        "weights": WEIGHTS_FILE,
        "architecture": type(model).__name__,
        "tied": aliases,
        "quantization": {"config": getattr(model, "lmshrink_quant_config", None), "layers": layers},
        "theoretical_bytes": theoretical_bytes(model),
    }


# ---- loading ------------------------------------------------------------------------------------------------
def _manifest_int(name: str, raw: dict[str, Any], key: str, optional: bool = False) -> int | None:
    value = raw[key]
    if optional and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < _MAX_DIM:
        raise CorruptFileError(
            f"layer {name!r}: manifest field {key!r} is {value!r} (absurd); expected an integer in 1..{_MAX_DIM - 1}"
        )
    return value


def _spec_from_manifest(name: str, raw: Any) -> tuple[WeightSpec, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise CorruptFileError(f"manifest entry for layer {name!r} is not an object")
    try:
        for key in ("in_features", "out_features", "bits"):
            _manifest_int(name, raw, key)
        gs = _manifest_int(name, raw, "group_size", optional=True)
        spec = WeightSpec.parse(str(raw["format"]), gs, bool(raw["symmetric"]))
        if spec.bits != raw["bits"]:
            raise CorruptFileError(f"layer {name!r}: format {spec.format} does not have {raw['bits']} bits")
        threshold = raw["threshold"]
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise CorruptFileError(
                f"layer {name!r}: manifest field 'threshold' is {threshold!r}, expected a number"
            )
        kwargs = {
            "bias": bool(raw["bias"]),
            "act": str(raw["act"]),
            "threshold": None if threshold is None else float(threshold),
            "input_scale": bool(raw["input_scale"]),
        }
    except CorruptFileError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"manifest entry for layer {name!r} is invalid: {exc}") from exc
    return spec, kwargs


def _build_skeleton(path: Path, manifest: dict[str, Any], header: SafetensorsHeader) -> nn.Module:
    """The float architecture ``config.json`` declares, without initialising weights.

    It is first built on the meta device and checked against the weights file (shapes of the tensors stored as
    they are, total size against the file's bytes), so a config with absurd sizes is refused before allocation.
    """
    import transformers
    from transformers import PreTrainedModel
    from transformers.initialization import no_init_weights

    arch = manifest.get("architecture")
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CorruptFileError(f"{path}: unknown architecture {arch!r} in the manifest")
    config = read_config(path)
    where = str(path / "config.json")
    meta = build_on_meta(lambda: cls(config), where)
    check_declared_shapes(where, declared_tensors(meta), {k: e.shape for k, e in header.tensors.items()})
    # packed codes hold several weights per byte (1-bit codecs: 8; float skeleton counts them all): generous bound
    check_declared_size(where, meta, header.data_bytes, elements_per_byte=_MAX_WEIGHTS_PER_BYTE)
    del meta
    with no_init_weights():
        model = cls(config)
    return model.eval()


def _swap_layers(model: nn.Module, layers: Any) -> None:
    if not isinstance(layers, dict) or not layers:
        raise CorruptFileError("the manifest lists no quantized layers")
    modules = dict(model.named_modules())
    for name, raw in layers.items():
        if isinstance(raw, dict) and raw.get("kind") == "embedding":
            continue  # QuantEmbedding tables: restore_embeddings below, once the heads they may share exist
        spec, kwargs = _spec_from_manifest(name, raw)
        mod = modules.get(name)
        if mod is None or not is_linear(mod):
            raise CorruptFileError(f"manifest names layer {name!r}, which is not a linear layer of the model")
        out_f, in_f = linear_weight_and_bias(mod)[0].shape
        if (in_f, out_f) != (raw["in_features"], raw["out_features"]):
            raise CorruptFileError(
                f"layer {name!r}: manifest says {raw['in_features']}->{raw['out_features']}, model has {in_f}->{out_f}"
            )
        try:
            set_submodule(model, name, QuantLinear(in_f, out_f, spec, **kwargs))
        except (LmshrinkError, ValueError, TypeError, RuntimeError, ArithmeticError) as exc:
            raise CorruptFileError(f"layer {name!r}: {exc}") from exc
    from lmshrink.quantization.embedding import restore_embeddings

    restore_embeddings(model, layers)


def _read_tensors(file: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read exactly the expected tensors, checking names, dtypes and shapes before reading any data."""
    try:
        with safe_open(str(file), framework="pt") as fh:
            stored = set(fh.keys())
            missing = sorted(set(expected) - stored)
            extra = sorted(stored - set(expected))
            if missing:
                raise CorruptFileError(f"{file}: missing tensors {missing[:5]} (e.g. scales or codes)")
            if extra:
                raise CorruptFileError(f"{file}: unexpected tensors {extra[:5]}")
            out: dict[str, torch.Tensor] = {}
            for name, ref in expected.items():
                sl = fh.get_slice(name)
                shape = tuple(sl.get_shape())
                if shape != tuple(ref.shape):
                    raise CorruptFileError(
                        f"{file}: tensor {name!r} has shape {shape}, expected {tuple(ref.shape)}"
                    )
                dtype = str(sl.get_dtype())
                if dtype != _ST_DTYPES.get(ref.dtype):
                    raise CorruptFileError(f"{file}: tensor {name!r} has dtype {dtype}, expected {ref.dtype}")
                out[name] = fh.get_tensor(name)
            return out
    except CorruptFileError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"{file}: not a readable safetensors file: {exc}") from exc


def _cast_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for k, b in mod._buffers.items():
            if b is not None and b.is_floating_point() and k != ROTATION_BUFFER:  # the rotation stays float32
                mod._buffers[k] = b.to(dtype)


def load_quantized(
    path: Path, manifest: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_quantized`: ``(model, tokenizer or None)``.

    ``dtype`` casts only the unquantized float tensors (embeddings, norms); packed storage keeps its dtypes.
    """
    path = Path(path)
    quant = manifest.get("quantization")
    if not isinstance(quant, dict):
        raise CorruptFileError(f"{path}: manifest has no 'quantization' section")
    weights = safe_file_name(path, manifest.get("weights", WEIGHTS_FILE), "weights")
    header = read_safetensors_header(weights)
    model = _build_skeleton(path, manifest, header)
    raw_cfg = quant.get("config")
    qcfg: dict[str, Any] = raw_cfg if isinstance(raw_cfg, dict) else {}
    rotated = qcfg.get("rotate") is True
    if rotated:
        restore_rotation(model, qcfg.get("online_hadamard") is True)
    _swap_layers(model, quant.get("layers"))
    aliases = manifest.get("tied") or {}
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CorruptFileError(f"{path}: manifest 'tied' must map tensor names to tensor names")
    expected, skeleton_aliases = _dedupe(model.state_dict())
    if skeleton_aliases and set(skeleton_aliases) != set(aliases):
        raise CorruptFileError(
            f"{path}: tied tensors {sorted(aliases)} do not match the model's {sorted(skeleton_aliases)}"
        )
    expected = {k: v for k, v in expected.items() if k not in aliases}
    tensors = _read_tensors(weights, expected)
    for name, t in tensors.items():
        if (
            t.is_floating_point()
            and name.rsplit(".", 1)[-1] in ("scale", "input_scale")
            and not torch.isfinite(t).all()
        ):
            raise CorruptFileError(f"{path}: tensor {name!r} holds NaN or Inf scales")
    if rotated:
        rot = next((t for n, t in tensors.items() if n.endswith(ROTATION_BUFFER)), None)
        if rot is None or not check_orthogonal(rot):
            raise CorruptFileError(f"{path}: the stored rotation matrix is missing or not orthogonal")
    for alias, target in aliases.items():
        if target not in tensors:
            raise CorruptFileError(f"{path}: tied tensor {alias!r} points at unknown {target!r}")
        tensors[alias] = tensors[target]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=False)
    if unexpected or [m for m in missing if m not in aliases]:
        raise CorruptFileError(
            f"{path}: tensors do not match the model (missing {missing[:5]}, extra {unexpected[:5]})"
        )
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    if dtype is not None:
        _cast_float_tensors(model, dtype)
    model.to(device)
    model.lmshrink_format = "quantized"  # type: ignore[assignment]
    model.lmshrink_quant_config = quant.get("config")  # type: ignore[assignment]
    return model, _load_tokenizer(path)


def _load_tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---- convenience wrappers -------------------------------------------------------------------------------------
def save_quantized_model(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Save a quantized model to ``out_dir`` atomically (:func:`lmshrink.models.save_model` writes the manifest)."""
    from lmshrink.models.save import save_model

    if getattr(model, "lmshrink_format", None) != "quantized":
        raise LmshrinkError(
            "the model is not quantized (model.lmshrink_format != 'quantized'); run quantize_model"
        )
    return save_model(model, out_dir, tokenizer)


def load_quantized_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, Any]:
    """Load a directory written by :func:`save_quantized_model` (reads its manifest; never unpickles)."""
    p = Path(path)
    if not (p / MANIFEST_FILE).is_file():
        raise CorruptFileError(f"{p}: no {MANIFEST_FILE}; not an lmshrink model directory")
    manifest = read_json_object(p / MANIFEST_FILE)
    if manifest.get("format") != "quantized":
        raise CorruptFileError(f"{p}: manifest format is not 'quantized'")
    return load_quantized(p, manifest, device, dtype)
