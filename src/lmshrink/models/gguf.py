"""GGUF files: validation, and a one-time conversion to a cached safetensors directory.

``transformers`` reads a GGUF file with ``from_pretrained(folder, gguf_file=name)``, dequantizing every tensor to
float32 (tens of seconds for a 135M model, most of it building the tokenizer). We do that once per file and keep
the result as an ordinary Hugging Face directory (safetensors + config + tokenizer) in the cache, keyed by the file's
absolute path, size and modification time, so later loads are plain safetensors loads. The cache directory is
built under a temporary name and renamed into place, so an interrupted conversion never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmshrink.errors import CorruptFileError, ModelLoadError
from lmshrink.utils.env import now_iso
from lmshrink.utils.io import fsync_dir

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
CACHE_MANIFEST = "lmshrink-cache.json"
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """The lmshrink cache folder: ``$LMSHRINK_CACHE`` or ``~/.cache/lmshrink``."""
    env = os.environ.get("LMSHRINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmshrink"


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def gguf_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Cache directory for the converted form of GGUF file ``path`` (key: absolute path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}|transformers={_transformers_version()}|v{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{digest}"


def validate_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``path`` is a complete GGUF file; return a few header fields.

    Raises :class:`CorruptFileError` naming the file when the magic is wrong, the header does not parse, or the
    tensor data extends past the end of the file (a truncated download).
    """
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise CorruptFileError(f"{p} is not a GGUF file (expected magic b'GGUF', found {head[:4]!r})")
    version = struct.unpack("<I", head[4:8])[0]
    try:
        from gguf import GGUFReader

        reader = GGUFReader(p)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8") if arch_field is not None else None
    except (ValueError, IndexError, KeyError, struct.error, OSError) as exc:
        raise CorruptFileError(
            f"{p} is truncated or corrupt: its GGUF header/tensors do not parse ({exc})"
        ) from exc
    if end > size:
        raise CorruptFileError(f"{p} is truncated: tensor data needs {end} bytes, the file has {size}")
    return {"version": version, "architecture": arch, "tensors": len(reader.tensors), "bytes": size}


def _write_cache_entry(final: Path, build: Any) -> None:
    """Build a directory with ``build(tmp_dir)`` and rename it to ``final``; a concurrent winner is kept."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / CACHE_MANIFEST).is_file():  # another process converted the same file meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Dequantize GGUF file ``path`` with ``transformers`` and write it to ``out_dir`` as a safetensors directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).resolve()
    out = Path(out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"transformers could not load GGUF file {p}: {exc}") from exc
    # The weights are already dequantized float tensors; only transformers' "gguf" quantizer marker remains, and
    # it blocks save_pretrained. Drop it so the cache is an ordinary float checkpoint.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    st = p.stat()
    manifest = {
        "cache_format": _CACHE_FORMAT,
        "source": str(p),
        "source_bytes": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "transformers_version": _transformers_version(),
        "created": now_iso(),
    }
    (out / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def ensure_gguf_converted(path: str | os.PathLike[str]) -> Path:
    """Return the cached safetensors directory for GGUF file ``path``, converting it first if needed."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist")
    target = gguf_cache_dir(p)
    if (target / CACHE_MANIFEST).is_file():
        log.debug("using cached conversion of %s at %s", p, target)
        return target
    info = validate_gguf(p)
    log.info(
        "converting %s (%s, %d tensors) to safetensors in %s; later loads use the cache",
        p,
        info["architecture"],
        info["tensors"],
        target,
    )
    try:
        _write_cache_entry(target, lambda tmp: convert_gguf(p, tmp))
    except PermissionError as exc:
        raise ModelLoadError(
            f"cannot write the GGUF conversion cache at {target.parent} ({exc.strerror}); "
            "set LMSHRINK_CACHE to a writable folder"
        ) from exc
    return target


def drop_cache_entry(path: Path) -> None:
    """Remove a (corrupt) cache entry so the next load converts again."""
    shutil.rmtree(path, ignore_errors=True)
