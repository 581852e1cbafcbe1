"""Model size: bytes of the saved files on disk, logical weight count, stored bytes and bits per weight."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation.perplexity import model_device, model_dtype, model_name
from lmshrink.evaluation.results import SizeResult
from lmshrink.utils.env import provenance

log = logging.getLogger(__name__)

#: Files that hold weights (their bytes give ``disk_bits_per_weight``).
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".npz")


def _packed_logical_numel(module: nn.Module) -> int:
    """Logical weights of a module whose weight is stored packed (not as a float ``weight`` parameter).

    A module may say so itself with an integer ``logical_numel`` attribute; otherwise a module with integer
    ``in_features``/``out_features``, no child modules and no floating ``weight`` parameter counts ``in_features * out_features``.
    """
    declared = getattr(module, "logical_numel", None)
    if isinstance(declared, int):
        return declared
    weight = module._parameters.get("weight")
    if (weight is not None and weight.is_floating_point()) or any(True for _ in module.children()):
        return 0
    fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fan_in, int) and isinstance(fan_out, int):
        return fan_in * fan_out
    return 0


def count_logical_parameters(model: nn.Module) -> int:
    """Logical weight count: distinct parameters (tied weights once) plus the dense shape of packed weights.

    Integer parameters that a packed module holds (codes) are not counted; their module's dense shape is.

    >>> count_logical_parameters(nn.Linear(4, 3))
    15
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        packed = _packed_logical_numel(module)
        total += packed
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if packed and (pname == "weight" or not p.is_floating_point()):
                continue
            total += p.numel()
    return total


def stored_tensor_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model stores (parameters and persistent buffers, shared storage once)."""
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _file_sizes(path: Path) -> dict[str, int]:
    if path.is_file():
        return {path.name: path.stat().st_size}
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and not f.is_symlink()
    }


def _manifest_format(path: Path) -> str | None:
    manifest = path / "lmshrink.json" if path.is_dir() else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        value = json.loads(manifest.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        log.warning("could not read the manifest %s", manifest)
        return None
    return str(value) if value else None


def measure_size(
    model: nn.Module,
    path: str | os.PathLike[str] | None = None,
    *,
    save: bool = True,
    name: str | None = None,
) -> SizeResult:
    """Size of ``model``: bytes of its saved files, logical parameters, stored bytes and bits per weight.

    ``path`` names the saved model (a directory or a single file) whose files are counted. Without it the model
    is saved with :func:`lmshrink.models.save_model` into a temporary directory and measured there (``save=False``
    skips that and reports ``bytes_on_disk=None``).

    >>> r = measure_size(nn.Linear(4, 4), save=False)
    >>> r.parameters, r.bits_per_weight
    (20, 32.0)
    """
    files: dict[str, int] | None = None
    fmt = str(getattr(model, "lmshrink_format", "dense"))
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LmshrinkError(
                f"saved model path {p} does not exist; pass the directory the model was saved to"
            )
        files = _file_sizes(p)
        fmt = _manifest_format(p) or fmt
        where = str(p)
    elif save:
        from lmshrink.models import save_model

        with tempfile.TemporaryDirectory(prefix="lmshrink-size-") as tmp:
            out = Path(save_model(model, Path(tmp) / "model"))
            files = _file_sizes(out)
        where = "saved with lmshrink.models.save_model to a temporary directory"
    else:
        where = "not saved"
    parameters = count_logical_parameters(model)
    if parameters == 0:
        raise LmshrinkError(f"{type(model).__name__} has no weights to measure")
    stored = stored_tensor_bytes(model)
    weight_file_bytes = sum(n for f, n in (files or {}).items() if f.endswith(WEIGHT_SUFFIXES))
    return SizeResult(
        model=name or model_name(model),
        data=where,
        protocol={
            "bytes_on_disk": "sum of the sizes of all files of the saved model",
            "parameters": "distinct parameters (tied once) + dense shape of packed weights",
            "bits_per_weight": "8 * stored tensor bytes / parameters",
            "disk_bits_per_weight": "8 * bytes of weight files ("
            + ", ".join(WEIGHT_SUFFIXES)
            + ") / parameters",
        },
        provenance=provenance(model_device(model), model_dtype(model)),
        bytes_on_disk=sum(files.values()) if files is not None else None,
        files=files or {},
        parameters=parameters,
        stored_bytes=stored,
        bits_per_weight=8 * stored / parameters,
        disk_bits_per_weight=8 * weight_file_bytes / parameters if weight_file_bytes else None,
        format=fmt,
    )


def describe_kernels(model: nn.Module) -> dict[str, Any]:
    """Which compute path packed modules use: ``{"kernels": {name: count}, "dequantize_on_the_fly": count}``.

    Modules that declare a ``kernel_name`` attribute are counted; ``None`` or ``"dequantize"`` means the weight
    is dequantized on the fly before a float matmul.
    """
    kernels: dict[str, int] = {}
    on_the_fly = 0
    for module in model.modules():
        if not hasattr(module, "kernel_name"):
            continue
        kname = module.kernel_name
        if kname in (None, "", "dequantize", "dequantize on the fly", "dequantize-on-the-fly"):
            on_the_fly += 1
        else:
            kernels[str(kname)] = kernels.get(str(kname), 0) + 1
    return {"kernels": kernels, "dequantize_on_the_fly": on_the_fly}
