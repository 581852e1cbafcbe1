"""Saving and loading pruned models (called by :func:`lmshrink.models.save_model` / ``load_model``).

- ``sparse`` (unstructured): every tensor for which it is smaller is stored as a packed bitmask (1 bit per entry)
  plus its non-zero values in row-major order; other tensors stay dense. The reported size is the file's size.
- ``pruned`` (structured): a smaller dense model whose per-block shapes are in ``config.lmshrink_layer_shapes``;
  loading builds the model from its config, resizes the blocks, then loads the safetensors weights.

Both are written by one writer (compression is applied wherever it makes a tensor smaller), so a structured model
that was also sparsified is stored compactly too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.utils.io import atomic_path

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_MASK, _VALUES = "::bitmask", "::values"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8 (8 entries per byte, big-endian bit order, zero-padded).

    >>> pack_bits(torch.tensor([True, False, False, False, False, False, False, True, True])).tolist()
    [129, 128]
    """
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` booleans."""
    bits = (packed.view(-1, 1) & _BIT_WEIGHTS) != 0
    return bits.flatten()[:numel]


def encode_sparse(t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``{"bitmask", "values"}`` for ``t`` when that is smaller than the dense tensor, else ``None``."""
    if t.numel() < 64 or not t.is_floating_point():
        return None
    mask = t != 0
    nnz = int(mask.sum())
    if (t.numel() + 7) // 8 + nnz * t.element_size() >= t.numel() * t.element_size():
        return None
    return {"bitmask": pack_bits(mask), "values": t[mask].contiguous()}


def decode_sparse(bitmask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Rebuild the dense tensor of ``shape`` from its bitmask and non-zero values."""
    numel = int(torch.Size(shape).numel())
    mask = unpack_bits(bitmask, numel)
    if int(mask.sum()) != values.numel():
        raise CorruptFileError(
            f"sparse tensor has {int(mask.sum())} mask bits set but {values.numel()} values"
        )
    out = torch.zeros(numel, dtype=values.dtype)
    out[mask] = values
    return out.view(shape)


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates, and ``{alias: stored name}`` for the duplicates."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _write(model: nn.Module, tmp_dir: Path, tokenizer: Any, compress: bool) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise LmshrinkError("only transformers models (with a .config) can be saved in a pruned format")
    tensors, aliases = _unique_state(model)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    dense_bytes = 0
    for name, t in tensors.items():
        dense_bytes += t.numel() * t.element_size()
        enc = encode_sparse(t) if compress else None
        if enc is None:
            out[name] = t
        else:
            out[name + _MASK], out[name + _VALUES] = enc["bitmask"], enc["values"]
            shapes[name] = list(t.shape)
    tmp_dir = Path(tmp_dir)
    config.save_pretrained(tmp_dir)
    with atomic_path(tmp_dir / WEIGHTS_FILE) as tmp:
        save_file(out, str(tmp), metadata={"lmshrink_sparse_shapes": json.dumps(shapes)})
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_dir)
    weights_bytes = (tmp_dir / WEIGHTS_FILE).stat().st_size
    log.info(
        "saved %d tensors (%d compressed): %d bytes vs %d dense",
        len(tensors),
        len(shapes),
        weights_bytes,
        dense_bytes,
    )
    return {
        "model_class": type(model).__name__,
        "weights": WEIGHTS_FILE,
        "tied": aliases,
        "compressed_tensors": len(shapes),
        "dense_tensor_bytes": dense_bytes,
        "weights_file_bytes": weights_bytes,
        "layer_shapes": getattr(config, "lmshrink_layer_shapes", None),
    }


def save_sparse(model: nn.Module, tmp_dir: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write an unstructured-sparse model (bitmask + values where smaller); returns extra manifest fields."""
    return _write(model, tmp_dir, tokenizer, compress=True)


def save_pruned(model: nn.Module, tmp_dir: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write a structurally pruned model (per-block shapes in its config); returns extra manifest fields."""
    return _write(model, tmp_dir, tokenizer, compress=True)


def _read(path: Path, manifest: dict[str, Any], device: Any, dtype: Any) -> tuple[nn.Module, Any]:
    import transformers

    from lmshrink.pruning.structured import apply_layer_shapes

    path = Path(path)
    cls_name = manifest.get("model_class")
    cls = getattr(transformers, str(cls_name), None)
    if cls is None:
        raise CorruptFileError(f"{path}: manifest names an unknown model class {cls_name!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    model = cls(config)
    shapes = getattr(config, "lmshrink_layer_shapes", None)
    if shapes:
        apply_layer_shapes(model, shapes)
    weights = path / str(manifest.get("weights", WEIGHTS_FILE))
    try:
        raw = load_file(str(weights))
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (OSError, RuntimeError) as exc:
        raise CorruptFileError(f"cannot read {weights}: {exc}") from exc
    sparse_shapes: dict[str, list[int]] = json.loads(meta.get("lmshrink_sparse_shapes", "{}"))
    state = {k: v for k, v in raw.items() if not (k.endswith(_MASK) or k.endswith(_VALUES))}
    for name, shape in sparse_shapes.items():
        state[name] = decode_sparse(raw[name + _MASK], raw[name + _VALUES], shape)
    tied: dict[str, str] = manifest.get("tied", {}) or {}
    for alias, source in tied.items():
        if source in state:
            state[alias] = state[source]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CorruptFileError(
            f"{path}: weights do not match the model (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.lmshrink_format = "pruned" if shapes else "sparse"
    if dtype is None:  # keep the stored precision
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), None)
    model = model.to(device=device or "cpu", dtype=dtype) if dtype is not None else model.to(device or "cpu")
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_sparse(
    path: Path, manifest: dict[str, Any], device: Any = None, dtype: Any = None
) -> tuple[nn.Module, Any]:
    """Load what :func:`save_sparse` wrote."""
    return _read(path, manifest, device, dtype)


def load_pruned(
    path: Path, manifest: dict[str, Any], device: Any = None, dtype: Any = None
) -> tuple[nn.Module, Any]:
    """Load what :func:`save_pruned` wrote (blocks resized to the recorded shapes first)."""
    return _read(path, manifest, device, dtype)
