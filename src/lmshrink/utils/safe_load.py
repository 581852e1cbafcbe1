"""Reading untrusted model files: every problem becomes a :class:`~lmshrink.errors.CorruptFileError` naming the file.

The loaders of every storage format (dense, sparse/pruned, quantized) go through these helpers instead of calling
``json``, ``safetensors`` and ``transformers`` directly, so a damaged or hostile file never escapes as a
``RecursionError``, ``SafetensorError``, ``StrictDataclassFieldValidationError`` or an out-of-memory kill:

- :func:`parse_json` / :func:`read_json`: strict UTF-8, a size cap and a nesting-depth limit checked *before*
  parsing (no recursion on ``[[[[...``);
- :func:`read_safetensors_header`: the whole safetensors header validated in Python (dtypes, shapes, offsets that
  tile the data exactly) before ``safetensors`` sees the file; :func:`safetensors_errors` translates what the
  library raises anyway; :func:`load_safetensors` is both;
- :func:`read_config`: ``config.json`` -> a ``transformers`` config without remote code or unchecked values;
- :func:`build_on_meta` and :func:`check_declared_shapes` / :func:`check_declared_size`: the model a config
  declares is built on the meta device (no memory) and compared with what the weights file actually holds, so
  absurd declared sizes are refused before anything is allocated.

>>> parse_json(b'{"a": [1, 2]}', "example")
{'a': [1, 2]}
>>> parse_json(b"[" * 100 + b"]" * 100, "example")
Traceback (most recent call last):
...
lmshrink.errors.CorruptFileError: example: JSON nested deeper than 64 levels; lmshrink reads only flat configs
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import CorruptFileError

#: Deepest JSON nesting accepted in configs, manifests and safetensors headers (real files use < 10).
MAX_JSON_DEPTH = 64
#: Largest JSON file read whole (configs and manifests are KBs; a tokenizer.json is not read here).
MAX_JSON_BYTES = 64 * 2**20
#: Largest safetensors header accepted (the safetensors library's own limit).
MAX_SAFETENSORS_HEADER = 100_000_000
#: Bits per element of each safetensors dtype string.
SAFETENSORS_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ JSON
def json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """Deepest ``[``/``{`` nesting in JSON text (strings skipped), scanning no further than ``limit`` + 1 levels.

    >>> json_depth(b'{"a": [[1], "]]]"]}')
    3
    """
    depth = deepest = 0
    for m in _BRACKETS.finditer(raw):
        tok = m.group()
        if tok in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                break
        elif tok in (b"]", b"}"):
            depth -= 1
    return deepest


def parse_json(raw: bytes | str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON from an untrusted source: strict UTF-8, at most ``max_depth`` levels deep.

    Raises :class:`CorruptFileError` starting with ``where`` for bad UTF-8, bad JSON or deep nesting.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if json_depth(data, max_depth) > max_depth:
        raise CorruptFileError(
            f"{where}: JSON nested deeper than {max_depth} levels; lmshrink reads only flat configs"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{where}: not valid JSON ({_short(exc)})") from exc


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file with :func:`parse_json`; a missing, huge or unreadable file is a
    :class:`CorruptFileError` naming it."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise CorruptFileError(f"{p}: {size} bytes is too large for a JSON config (limit {max_bytes})")
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptFileError(f"{p} is missing") from exc
    except OSError as exc:
        raise CorruptFileError(f"{p} cannot be read: {exc.strerror or exc}") from exc
    return parse_json(raw, str(p))


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`read_json` for files that must hold a JSON object (configs, manifests)."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


# ------------------------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header declares it (validated: the sizes agree with the bytes)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors, string metadata and the number of data bytes."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_bytes: int


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(p: Path, name: str, info: Any) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFileError(
            f"{p}: tensor {name!r} has a malformed header entry (needs dtype, shape, data_offsets)"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        raise CorruptFileError(
            f"{p}: tensor {name!r} has unknown dtype {dtype!r}; accepted: {', '.join(SAFETENSORS_DTYPE_BITS)}"
        )
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise CorruptFileError(f"{p}: tensor {name!r} has an invalid shape {shape!r} (a list of sizes >= 0)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_int(o) and o >= 0 for o in offsets)):
        raise CorruptFileError(f"{p}: tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if end < start or bits % 8 or bits // 8 != end - start:
        raise CorruptFileError(
            f"{p}: tensor {name!r} declares {dtype}{shape} ({bits / 8:.0f} bytes) but data_offsets {offsets} "
            f"span {end - start} bytes"
        )
    return TensorEntry(dtype, tuple(shape), start, end)


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and fully validate the header of a safetensors file without reading its data.

    Checks what the ``safetensors`` library checks (so it never raises on a file that passes) and names the
    tensor at fault: header length within the file, UTF-8 JSON object of bounded depth, string metadata, known
    dtypes, non-negative shapes whose byte size equals the entry's offsets, and offsets that tile the data exactly.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{p} is truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise CorruptFileError(
                    f"{p} is truncated or not safetensors: header length {n} > the {size - 8} bytes that follow"
                )
            raw = fh.read(n)
    except FileNotFoundError as exc:
        raise CorruptFileError(f"{p} is missing") from exc
    except OSError as exc:
        raise CorruptFileError(f"{p} cannot be read: {exc.strerror or exc}") from exc
    header = parse_json(raw, f"{p} (safetensors header)")
    if not isinstance(header, dict):
        raise CorruptFileError(f"{p}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(f"{p}: safetensors __metadata__ must map strings to strings")
    tensors = {name: _entry(p, name, info) for name, info in header.items()}
    data_bytes = size - 8 - n
    pos = 0
    for name, e in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != pos:
            what = "overlaps another tensor" if e.start < pos else "leaves a gap before it"
            raise CorruptFileError(f"{p}: tensor {name!r} at bytes {e.start}..{e.end} {what}")
        pos = e.end
    if pos != data_bytes:
        what = "truncated" if pos > data_bytes else "corrupt (trailing bytes after the last tensor)"
        raise CorruptFileError(
            f"{p} is {what}: the header declares {pos} data bytes, the file holds {data_bytes}"
        )
    return SafetensorsHeader(p, tensors, dict(meta), data_bytes)


@contextlib.contextmanager
def safetensors_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Translate what ``safetensors`` (and torch reading its data) raises into :class:`CorruptFileError`."""
    from safetensors import SafetensorError

    try:
        yield
    except CorruptFileError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], SafetensorsHeader]:
    """All tensors of a safetensors file (on CPU) and its validated header."""
    from safetensors.torch import load_file

    header = read_safetensors_header(path)
    with safetensors_errors(path):
        tensors = load_file(str(path))
    return tensors, header


# ------------------------------------------------------------------------------------------------ configs
def read_config(folder: str | os.PathLike[str]) -> Any:
    """The ``transformers`` config in ``folder/config.json``, built without remote code.

    The file is read with :func:`read_json_object`; ``model_type`` must name a built-in architecture; any error
    the config class raises for a bad value (wrong types, zero head counts, ...) is a :class:`CorruptFileError`
    naming the file.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = Path(folder) / "config.json"
    doc = read_json_object(file)
    model_type = doc.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CorruptFileError(
            f"{file}: 'model_type' is {model_type!r}, not an architecture transformers knows "
            "(lmshrink never runs remote code)"
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(doc)
        config.name_or_path = str(folder)
    except Exception as exc:  # the config classes validate with many exception types
        raise CorruptFileError(f"{file} is invalid: {_short(exc)}") from exc
    return config


def build_on_meta(build: Callable[[], nn.Module], where: str) -> nn.Module:
    """Run ``build`` on the meta device (shapes only, no memory); a config that cannot describe a model (negative
    sizes, heads that do not divide the width, ...) is a :class:`CorruptFileError` starting with ``where``."""
    try:
        with torch.device("meta"):
            return build()
    except CorruptFileError:
        raise
    except Exception as exc:  # architectures raise many types for inconsistent configs
        raise CorruptFileError(
            f"{where}: the config does not describe a buildable model ({_short(exc)})"
        ) from exc


def declared_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``name -> shape`` of every tensor in ``model.state_dict()`` (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_declared_shapes(
    where: str, declared: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]]
) -> None:
    """Every tensor present in both ``declared`` (the model the config describes) and ``stored`` (the file) has the
    same shape; otherwise :class:`CorruptFileError` naming the tensors."""
    bad = [
        f"{k}: config {declared[k]}, file {stored[k]}"
        for k in declared
        if k in stored and declared[k] != stored[k]
    ]
    if bad:
        raise CorruptFileError(
            f"{where}: the config and the weights disagree on {len(bad)} tensor shape(s): "
            + "; ".join(bad[:3])
        )


def check_declared_size(
    where: str, model: nn.Module, stored_bytes: int, *, elements_per_byte: int = 8
) -> int:
    """Refuse a config that declares far more weights than the file stores (the sign of absurd declared sizes).

    The model built on the meta device may hold at most ``elements_per_byte`` elements per stored byte, plus a
    slack of 2**24 elements for freshly initialised heads and buffers. Returns its element count. (Whether the
    stored weights fit in memory is :func:`lmshrink.utils.resources.check_load_memory`'s question, asked first.)
    """
    seen: set[int] = set()
    numel = 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            numel += t.numel()
    if numel > elements_per_byte * stored_bytes + 2**24:
        raise CorruptFileError(
            f"{where}: the config declares a model of {numel:,} elements, but the weights file holds only "
            f"{stored_bytes:,} bytes; the sizes in config.json are wrong or belong to another model"
        )
    return numel


def safe_file_name(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` for a plain file name recorded in a manifest (no directories, no ``..``)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CorruptFileError(f"{folder}: manifest field {what!r} must be a plain file name, got {name!r}")
    return folder / name
