"""Provenance: what machine, device, dtype, library versions and kernel-choosing environment produced a result."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from importlib import metadata
from typing import Any

import torch

_LIBS = ("lmshrink", "torch", "transformers", "safetensors", "tokenizers", "gguf", "accelerate")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the libraries that affect results."""
    out: dict[str, str] = {}
    for name in (*_LIBS, *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


#: ``LMSHRINK_*`` variables that only say where things are or skip checks; the others (``LMSHRINK_INT8_EXACT``,
#: ``LMSHRINK_NO_CPP``) choose kernels, so they can change a result and are recorded with it.
LOCATION_ENV = ("LMSHRINK_DATA", "LMSHRINK_CACHE", "LMSHRINK_FLOAT_LLAMA", "LMSHRINK_SKIP_RESOURCE_CHECKS")


def numerics_env() -> dict[str, str]:
    """The set ``LMSHRINK_*`` environment variables that can change what the kernels compute."""
    return {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("LMSHRINK_") and k not in LOCATION_ENV
    }


def device_description(device: str | torch.device = "cpu") -> str:
    """A human-readable name of the device: CPU model and core count, or the CUDA device name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def now_iso() -> str:
    """Current UTC time, ISO 8601, seconds precision."""
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def provenance(device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The record every result carries: date, host, device, dtype and library versions."""
    return {
        "date": now_iso(),
        "host": platform.node(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_description(device),
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "versions": library_versions(),
        "environment": numerics_env(),
    }


def resolve_device(device: str | None) -> torch.device:
    """``None``/"auto" picks CUDA when present; asking for an absent CUDA device is a clear error."""
    from lmshrink.errors import LmshrinkError

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise LmshrinkError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LmshrinkError("device 'cuda' was requested but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise LmshrinkError(f"device {device!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return dev
