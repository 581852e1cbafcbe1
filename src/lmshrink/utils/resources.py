"""Resource checks that run before work starts: memory, disk space and device.

A model that cannot fit, a disk that will fill half-way through a save, or a CUDA device that is not there should
be a one-line :class:`~lmshrink.errors.LmshrinkError` at the start, not an out-of-memory kill or a traceback later.

- :func:`estimate_model_bytes` sizes a model from a config or from file headers (safetensors, GGUF, an lmshrink
  manifest) without loading any weights;
- :func:`check_memory`, :func:`check_disk` and :func:`check_device` raise clear errors;
- :func:`check_load_memory` and :func:`check_save_disk` are the one-line calls :func:`lmshrink.models.load_model`
  and :func:`lmshrink.models.save_model` make.

Estimates carry a margin (:data:`MEMORY_MARGIN`, :data:`DISK_MARGIN`, :data:`DISK_SLACK_BYTES`) because loading
and saving need a little more than the weights. Setting ``LMSHRINK_SKIP_RESOURCE_CHECKS=1`` turns the memory and
disk checks into warnings (for containers where the reported figures are wrong).

>>> fmt_bytes(3 * 2**30)
'3.00 GiB'
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.utils.env import resolve_device
from lmshrink.utils.safe_load import parse_json, read_json, read_json_object

log = logging.getLogger(__name__)

#: Loading needs the weights plus buffers, the tokenizer and Python: required memory = estimate x this.
MEMORY_MARGIN = 1.1
#: Saving writes the weights plus config, tokenizer and manifest: required disk = estimate x this + slack.
DISK_MARGIN = 1.1
DISK_SLACK_BYTES = 64 * 2**20
SKIP_ENV = "LMSHRINK_SKIP_RESOURCE_CHECKS"

#: Bytes per element of each safetensors dtype string.
SAFETENSORS_DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
_FLOAT_SAFETENSORS = {"F64", "F32", "F16", "BF16"}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
_MAX_HEADER = 100_000_000


def fmt_bytes(n: float) -> str:
    """Human-readable size: GiB from 0.1 GiB up, then MiB, KiB, bytes.

    >>> fmt_bytes(5 * 2**20), fmt_bytes(3000), fmt_bytes(12)
    ('5.0 MiB', '2.9 KiB', '12 bytes')
    """
    if n >= 0.1 * 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 0.1 * 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} bytes"


def checks_disabled() -> bool:
    """True when ``LMSHRINK_SKIP_RESOURCE_CHECKS`` is set to a true value."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _dtype_size(dtype: torch.dtype | str | None) -> int | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key not in _DTYPE_NAMES:
            return None
        dtype = _DTYPE_NAMES[key]
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------ estimates


def _config_dtype(config: Any) -> torch.dtype | str | None:
    for key in ("dtype", "torch_dtype"):
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None and value != "auto":
            return value  # type: ignore[no-any-return]
    return None


def _analytic_parameters(cfg: Any) -> int:
    """Rough parameter count of a decoder/encoder transformer from its config fields (fallback only)."""
    h = int(getattr(cfg, "hidden_size", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * h)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if not h or not layers:
        raise LmshrinkError("cannot estimate the model size: the config has no hidden_size/num_hidden_layers")
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv = int(getattr(cfg, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or h // heads)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * inter if getattr(cfg, "hidden_act", "") in ("silu", "swiglu") else 2 * h * inter
    tied = bool(getattr(cfg, "tie_word_embeddings", True))
    return layers * (attn + mlp + 2 * h) + vocab * h * (1 if tied else 2)


def _config_parameters(config: Any) -> int:
    """Parameter count of the model a config describes, built on the meta device (no memory)."""
    import transformers

    cfg = config
    if isinstance(config, Mapping):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise LmshrinkError("cannot estimate the model size: the config dict has no 'model_type'")
        try:
            cfg = transformers.AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError) as exc:
            raise LmshrinkError(f"cannot estimate the model size: unknown model_type {model_type!r}") from exc
    archs = list(getattr(cfg, "architectures", None) or [])
    cls: Any = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = getattr(cfg, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        build = getattr(cls, "from_config", None) or cls._from_config  # Auto* vs concrete classes
        with torch.device("meta"):
            model = build(cfg)
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
    except Exception as exc:  # any architecture quirk: fall back to the formula
        log.debug("meta-device build of %s failed (%s); using the analytic estimate", type(cfg).__name__, exc)
        return _analytic_parameters(cfg)


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets), read without the data,
    and the number of data bytes after it."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{p} is too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CorruptFileError(
                f"{p} is truncated or not safetensors: header length {n}, file size {size}"
            )
        raw = fh.read(n)
    header = parse_json(raw, f"{p} (safetensors header)")  # depth-limited: no RecursionError
    if not isinstance(header, dict):
        raise CorruptFileError(f"{p}: the safetensors header is not a JSON object")
    return header, size - 8 - n


def _safetensors_bytes(path: Path, dtype_size: int | None) -> int:
    total = 0.0
    header, data_bytes = read_safetensors_header(path)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = str(info["dtype"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed header entry") from exc
        stored = numel * SAFETENSORS_DTYPE_BYTES.get(code, -1)
        if numel < 0 or not 0 <= start <= end <= data_bytes or (stored >= 0 and stored != end - start):
            # a header that lies about sizes: no estimate (the loader names the damage)
            raise CorruptFileError(f"{path}: tensor {name!r} declares sizes the file does not hold")
        if dtype_size is not None and code in _FLOAT_SAFETENSORS:
            total += numel * dtype_size
        else:
            total += numel * SAFETENSORS_DTYPE_BYTES.get(code, 4)
    return int(total)


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def _gguf_elements(path: Path) -> int:
    """Total tensor elements declared by a GGUF (v2+) header, read with ``mmap`` + ``struct`` (the full
    ``GGUFReader`` decodes every vocabulary entry: seconds for a 49k-token vocabulary)."""
    import mmap

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        pos = 0

        def take(fmt: str) -> Any:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > size:
                raise CorruptFileError(f"{path} is truncated inside its GGUF header")
            value = struct.unpack_from(fmt, buf, pos)
            pos += n
            return value[0] if len(value) == 1 else value

        def skip_value(kind: int) -> None:
            nonlocal pos
            if kind in _GGUF_SCALAR:
                pos += _GGUF_SCALAR[kind]
            elif kind == 8:
                length = take("<Q")  # (``pos += take()`` would read pos before take moves it)
                pos += length
            elif kind == 9:
                item, count = take("<I"), take("<Q")
                if count > size:
                    raise CorruptFileError(f"{path}: GGUF array of {count} items is longer than the file")
                if item in _GGUF_SCALAR:
                    pos += count * _GGUF_SCALAR[item]
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise CorruptFileError(f"{path}: unknown GGUF value type {kind}")
            if pos > size:
                raise CorruptFileError(f"{path} is truncated inside its GGUF header")

        magic, version = take("<4s"), take("<I")
        if magic != b"GGUF" or version < 2:
            raise CorruptFileError(f"{path} is not a GGUF v2+ file (magic {magic!r}, version {version})")
        n_tensors, n_kv = take("<Q"), take("<Q")
        if n_tensors > size or n_kv > size:
            raise CorruptFileError(
                f"{path}: GGUF header declares absurd counts ({n_tensors} tensors, {n_kv} keys)"
            )
        for _ in range(n_kv):
            key_length = take("<Q")
            pos += key_length
            skip_value(take("<I"))
        total = 0
        for _ in range(n_tensors):
            name_length = take("<Q")
            pos += name_length
            n_dims = take("<I")
            if n_dims > 8:
                raise CorruptFileError(f"{path}: GGUF tensor with {n_dims} dimensions")
            numel = 1
            for _ in range(n_dims):
                numel *= take("<Q")
            take("<I")  # type
            take("<Q")  # offset
            total += numel
        return total


def _gguf_bytes(path: Path, dtype_size: int | None) -> int:
    """GGUF tensors are dequantized to float32 on load (or to ``dtype``): elements x that size."""
    try:
        elements = _gguf_elements(path)
    except (OSError, ValueError, struct.error) as exc:
        if isinstance(exc, CorruptFileError):
            raise
        raise CorruptFileError(f"{path}: the GGUF header does not parse ({exc})") from exc
    return elements * (dtype_size or 4)


def _directory_bytes(folder: Path, dtype_size: int | None) -> int:
    files = sorted(folder.glob("*.safetensors"))
    tensors = sum(_safetensors_bytes(f, dtype_size) for f in files)
    manifest_file = folder / "lmshrink.json"
    if manifest_file.is_file():
        # compressed formats may load larger than they are stored (sparse -> dense): use the parameter count
        try:
            manifest = read_json(manifest_file)
        except CorruptFileError:
            manifest = {}
        params = manifest.get("parameters") if isinstance(manifest, dict) else None
        if isinstance(params, int) and params > 0 and manifest.get("format") in ("sparse", "pruned", "dense"):
            size = dtype_size or _dtype_size(str(manifest.get("dtype") or "float32")) or 4
            tensors = max(tensors, params * size)
    if tensors:
        return tensors
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_bytes(ggufs[0], dtype_size)
    if (folder / "config.json").is_file():
        config = read_json_object(folder / "config.json")
        size = dtype_size or _dtype_size(_config_dtype(config)) or 4
        return _config_parameters(config) * size
    raise LmshrinkError(f"cannot estimate the size of {folder}: no safetensors, GGUF or config.json found")


def estimate_model_bytes(
    source: Any,
    dtype: torch.dtype | str | None = None,
) -> int:
    """Bytes the model's weights take in memory, estimated without loading them.

    ``source``: a ``transformers`` config (or a dict with ``model_type``) -> parameters (counted on the meta
    device) x dtype size; a ``.safetensors`` file or a model directory -> the tensors its headers declare (an
    lmshrink-saved directory: at least ``parameters`` x dtype from its manifest); a ``.gguf`` file -> its
    elements x 4 (GGUF loads as float32). ``dtype`` overrides the stored float dtype (``"bf16"``, ``torch.float16``;
    default: as stored, float32 for configs without a dtype).

    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    >>> estimate_model_bytes(cfg, dtype="bf16")
    180864
    """
    size = _dtype_size(dtype)
    if dtype is not None and size is None:
        raise LmshrinkError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPE_NAMES)} or a torch dtype")
    if isinstance(source, str | os.PathLike):
        p = Path(source).expanduser()
        if not p.exists():
            raise LmshrinkError(f"cannot estimate the size of {p}: no such file or directory")
        if p.is_dir():
            return _directory_bytes(p, size)
        suffix = p.suffix.lower()
        if suffix == ".safetensors":
            return _safetensors_bytes(p, size)
        if suffix == ".gguf":
            return _gguf_bytes(p, size)
        if p.name == "config.json":
            return _directory_bytes(p.parent, size)
        return p.stat().st_size  # any other weight file: its size on disk
    if isinstance(source, nn.Module):
        return estimate_state_dict_bytes(source)
    size = size or _dtype_size(_config_dtype(source)) or 4
    return _config_parameters(source) * size


def estimate_state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (shared storage counted once; meta tensors skipped)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------------ checks


def available_memory(device: str | torch.device | None = None) -> int:
    """Free memory in bytes: ``psutil`` available RAM, or free CUDA memory for a CUDA device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


def check_memory(required_bytes: int, what: str = "model", device: str | torch.device | None = None) -> int:
    """Raise :class:`LmshrinkError` when ``required_bytes`` exceed the free memory of ``device`` (default: RAM).

    Returns the available bytes. Call it before the work starts, with the margin already included.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    free = available_memory(dev)
    if required_bytes <= free:
        log.debug("%s needs ~%s, %s available on %s", what, fmt_bytes(required_bytes), fmt_bytes(free), dev)
        return free
    where = "GPU memory" if dev.type == "cuda" else "memory"
    message = (
        f"{what} needs ~{fmt_bytes(required_bytes)} of {where}, {fmt_bytes(free)} available on {dev}; "
        "free memory, load in a smaller dtype (dtype='bf16'), or use a machine with more memory "
        f"({SKIP_ENV}=1 tries anyway)"
    )
    if checks_disabled():
        log.warning("%s", message)
        return free
    raise LmshrinkError(message)


def _existing_ancestor(path: Path) -> Path:
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(path: str | os.PathLike[str], required_bytes: int, what: str = "output") -> int:
    """Raise :class:`LmshrinkError` when the filesystem holding ``path`` has less than ``required_bytes`` free.

    ``path`` need not exist yet (its nearest existing parent is measured). Returns the free bytes.
    """
    target = Path(path)
    anchor = _existing_ancestor(target)
    try:
        free = int(shutil.disk_usage(anchor).free)
    except OSError as exc:
        log.warning("cannot measure free disk space at %s (%s); not checked", anchor, exc)
        return -1
    if required_bytes <= free:
        return free
    message = (
        f"not enough disk space for {what} in {target}: needs ~{fmt_bytes(required_bytes)}, "
        f"{fmt_bytes(free)} free on the filesystem of {anchor}; free some space or choose another output "
        f"directory ({SKIP_ENV}=1 tries anyway)"
    )
    if checks_disabled():
        log.warning("%s", message)
        return free
    raise LmshrinkError(message)


def check_device(device: str | torch.device | None) -> torch.device:
    """The device to use, or :class:`LmshrinkError` when it is absent (CUDA asked, none present; ``cuda:N`` with
    fewer devices). ``None``/``"auto"`` picks CUDA when present."""
    dev = resolve_device(str(device) if device is not None else None)
    if dev.type == "cuda" and dev.index is not None:
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise LmshrinkError(
                f"device {str(dev)!r} was requested but only {count} CUDA device(s) are present "
                f"(cuda:0..cuda:{count - 1}); pick one of those or use 'cpu'"
            )
    return dev


# ------------------------------------------------------------------------------------------------ call sites


def check_load_memory(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> int | None:
    """Before loading ``path``: estimate its in-memory size and :func:`check_memory` (RAM, and GPU memory for a
    CUDA ``device``) with :data:`MEMORY_MARGIN`. Returns the estimate, or ``None`` when the files cannot be sized
    (the loader then reports what is wrong with them)."""
    try:
        estimate = estimate_model_bytes(path, dtype=dtype)
    except (
        Exception
    ) as exc:  # a best-effort pre-check must never replace the loader's own error for bad files
        log.debug("no size estimate for %s (%s); memory not checked", path, exc)
        return None
    required = int(estimate * MEMORY_MARGIN)
    what = f"model {os.fspath(path)} ({fmt_bytes(estimate)} of weights + {round((MEMORY_MARGIN - 1) * 100)}%)"
    check_memory(required, what)
    dev = torch.device(device) if device is not None and str(device) != "auto" else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        check_memory(required, what, dev)
    return estimate


def check_save_disk(model: nn.Module, out_dir: str | os.PathLike[str]) -> int:
    """Before saving ``model`` to ``out_dir``: :func:`check_disk` for its state-dict bytes x :data:`DISK_MARGIN` +
    :data:`DISK_SLACK_BYTES`. Returns the required bytes."""
    required = int(estimate_state_dict_bytes(model) * DISK_MARGIN) + DISK_SLACK_BYTES
    check_disk(out_dir, required, what=f"the {type(model).__name__} weights")
    return required
