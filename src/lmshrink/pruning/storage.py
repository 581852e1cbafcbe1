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
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.utils.io import atomic_path
from lmshrink.utils.safe_load import (
    SafetensorsHeader,
    build_on_meta,
    check_declared_shapes,
    check_declared_size,
    declared_tensors,
    load_safetensors,
    parse_json,
    read_config,
    read_safetensors_header,
    safe_file_name,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
_MASK, _VALUES = "::bitmask", "::values"
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
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


def _manifest_fields(path: Path, manifest: dict[str, Any]) -> tuple[type[nn.Module], Path, dict[str, str]]:
    """The model class, weights file and tied aliases a sparse/pruned manifest records, validated."""
    import transformers
    from transformers import PreTrainedModel

    cls_name = manifest.get("model_class")
    cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise CorruptFileError(f"{path}: manifest names an unknown model class {cls_name!r}")
    weights = safe_file_name(path, manifest.get("weights", WEIGHTS_FILE), "weights")
    tied = manifest.get("tied") or {}
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise CorruptFileError(f"{path}: manifest field 'tied' must map tensor names to tensor names")
    return cls, weights, tied


def _sparse_shapes(weights: Path, metadata: dict[str, str]) -> dict[str, tuple[int, ...]]:
    doc = parse_json(
        metadata.get("lmshrink_sparse_shapes", "{}"), f"{weights} (metadata lmshrink_sparse_shapes)"
    )
    if not isinstance(doc, dict) or not all(
        isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
        for v in doc.values()
    ):
        raise CorruptFileError(f"{weights}: metadata lmshrink_sparse_shapes must map tensor names to shapes")
    return {str(k): tuple(v) for k, v in doc.items()}


def _check_stored(
    weights: Path,
    header: SafetensorsHeader,
    sparse: dict[str, tuple[int, ...]],
    tied: dict[str, str],
    declared: dict[str, tuple[int, ...]],
) -> None:
    """Before any allocation: the file stores exactly the model's tensors (dense or bitmask + values), with the
    shapes the model declares, and every tied alias points at a stored tensor."""
    stored = header.tensors
    names: set[str] = set()
    for name, shape in sparse.items():
        mask, values = stored.get(name + _MASK), stored.get(name + _VALUES)
        if mask is None or values is None:
            raise CorruptFileError(f"{weights}: sparse tensor {name!r} lacks its {_MASK} or {_VALUES} entry")
        numel = math.prod(shape)
        if mask.dtype != "U8" or mask.shape != ((numel + 7) // 8,):
            raise CorruptFileError(
                f"{weights}: {name + _MASK!r} is {mask.dtype}{list(mask.shape)}, expected U8[{(numel + 7) // 8}]"
            )
        if values.dtype not in _FLOAT_DTYPES or len(values.shape) != 1 or values.shape[0] > numel:
            raise CorruptFileError(
                f"{weights}: {name + _VALUES!r} is {values.dtype}{list(values.shape)}, expected a float vector "
                f"of at most {numel} values"
            )
        names.add(name)
    for name in stored:
        if name.endswith(_MASK) or name.endswith(_VALUES):
            if name.removesuffix(_MASK).removesuffix(_VALUES) not in sparse:
                raise CorruptFileError(f"{weights}: {name!r} belongs to no sparse tensor in the metadata")
        elif name in sparse:
            raise CorruptFileError(f"{weights}: tensor {name!r} is stored both dense and sparse")
        else:
            names.add(name)
    shapes = {**{k: stored[k].shape for k in names if k in stored}, **sparse}
    for alias, source in tied.items():
        if source not in shapes:
            raise CorruptFileError(
                f"{weights}: tied tensor {alias!r} points at {source!r}, which is not stored"
            )
        shapes.setdefault(alias, shapes[source])
    missing = sorted(set(declared) - set(shapes))
    unexpected = sorted(set(shapes) - set(declared))
    if missing or unexpected:
        raise CorruptFileError(
            f"{weights}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    check_declared_shapes(str(weights), declared, shapes)


def _build(cls: type[nn.Module], config: Any, shapes: Any, where: str) -> nn.Module:
    from lmshrink.pruning.structured import apply_layer_shapes

    model = cls(config)
    if shapes:
        if not isinstance(shapes, list) or not all(
            isinstance(s, dict)
            and all(isinstance(s.get(k), int) for k in ("heads", "kv_heads", "intermediate"))
            for s in shapes
        ):
            raise CorruptFileError(
                f"{where}: lmshrink_layer_shapes must list {{heads, kv_heads, intermediate}} per block"
            )
        apply_layer_shapes(model, shapes)
    return model


def _read(path: Path, manifest: dict[str, Any], device: Any, dtype: Any) -> tuple[nn.Module, Any]:
    import transformers
    from transformers.initialization import no_init_weights

    path = Path(path)
    cls, weights, tied = _manifest_fields(path, manifest)
    header = read_safetensors_header(weights)
    sparse = _sparse_shapes(weights, header.metadata)
    config = read_config(path)
    shapes = getattr(config, "lmshrink_layer_shapes", None)
    where = str(path / "config.json")
    # the declared model on the meta device first: its shapes must be what the file holds before anything is allocated
    meta = build_on_meta(lambda: _build(cls, config, shapes, where), where)
    _check_stored(weights, header, sparse, tied, declared_tensors(meta))
    check_declared_size(where, meta, header.data_bytes)  # non-persistent buffers are sized by the config too
    del meta
    with no_init_weights():
        model = _build(cls, config, shapes, where)
    raw, _ = load_safetensors(weights)
    state = {k: v for k, v in raw.items() if not (k.endswith(_MASK) or k.endswith(_VALUES))}
    for name, shape in sparse.items():
        state[name] = decode_sparse(raw[name + _MASK], raw[name + _VALUES], list(shape))
    for alias, source in tied.items():
        state[alias] = state[source]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CorruptFileError(
            f"{path}: weights do not match the model (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    tie = getattr(model, "tie_weights", None)
    if tied and callable(tie):
        tie()
    model.lmshrink_format = "pruned" if shapes else "sparse"  # type: ignore[assignment]
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
