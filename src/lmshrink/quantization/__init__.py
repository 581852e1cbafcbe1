"""Quantization: formats, the lab's QuantizedVector and LLM.int8(), whole-model methods, QAT and real kernels.

Names are imported lazily so that ``import lmshrink.quantization`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QuantizedVector": "lmshrink.quantization.vector",
    "mixed_precision_forward": "lmshrink.quantization.llm_int8",
    "get_format": "lmshrink.quantization.formats",
    "FORMAT_NAMES": "lmshrink.quantization.formats",
    "prepare_qat": "lmshrink.quantization.qat",
    "strip_qat": "lmshrink.quantization.qat",
    "QuantConfig": "lmshrink.quantization.config",
    "quantize_model": "lmshrink.quantization.api",
    "save_quantized": "lmshrink.quantization.storage",
    "load_quantized": "lmshrink.quantization.storage",
    "IntGrid": "lmshrink.quantization.grid",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmshrink.quantization' has no attribute {name!r}")
