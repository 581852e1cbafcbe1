"""Save a model as safetensors + config + tokenizer + an ``lmshrink.json`` manifest, atomically.

Dense models are written with ``save_pretrained`` (so plain ``transformers.from_pretrained`` reloads them, tied
embeddings included). Compressed models declare ``model.lmshrink_format``; their storage lives with the technique
and is found through :data:`FORMAT_HANDLERS` (``module:function`` strings, imported only when needed).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lmshrink.errors import LmshrinkError, ModelLoadError
from lmshrink.models.arch import count_parameters
from lmshrink.utils.env import now_iso
from lmshrink.utils.io import atomic_directory, atomic_write_json
from lmshrink.utils.resources import check_save_disk

log = logging.getLogger(__name__)

MANIFEST_NAME = "lmshrink.json"

#: format -> (save function, load function), as "module:function" strings imported lazily.
FORMAT_HANDLERS: dict[str, tuple[str, str]] = {
    "quantized": (
        "lmshrink.quantization.storage:save_quantized",
        "lmshrink.quantization.storage:load_quantized",
    ),
    "pruned": ("lmshrink.pruning.storage:save_pruned", "lmshrink.pruning.storage:load_pruned"),
    "sparse": ("lmshrink.pruning.storage:save_sparse", "lmshrink.pruning.storage:load_sparse"),
}

#: auto-class name for each task; the task is recorded in the manifest so reloads build the same head.
TASK_AUTO_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}


def resolve_handler(fmt: str, which: str) -> Callable[..., Any]:
    """Import the ``save``/``load`` function registered for storage format ``fmt``."""
    if fmt not in FORMAT_HANDLERS:
        raise ModelLoadError(f"unknown lmshrink format {fmt!r}; known: dense, {', '.join(FORMAT_HANDLERS)}")
    target = FORMAT_HANDLERS[fmt][0 if which == "save" else 1]
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(
            f"format {fmt!r} needs {target}, which is not available in this lmshrink installation ({exc})"
        ) from exc
    return func  # type: ignore[no-any-return]


def task_of(model: nn.Module) -> str:
    """The task a model class serves: ``causal-lm``, ``sequence-classification`` or ``encoder``."""
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "encoder"


def save_model(
    model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any | None = None, *, overwrite: bool = True
) -> Path:
    """Save ``model`` (and ``tokenizer``) to ``out_dir``; returns the directory.

    The directory is built under a temporary name and moved into place when complete. It holds
    ``lmshrink.json`` with ``format`` (``model.lmshrink_format``, default ``"dense"``), ``lmshrink_version``,
    ``task``, ``architecture`` and ``parameters``; dense models also hold safetensors weights and ``config.json``
    readable by plain ``transformers``.
    """
    from lmshrink import __version__

    fmt = str(getattr(model, "lmshrink_format", "dense"))
    if fmt != "dense" and fmt not in FORMAT_HANDLERS:
        raise LmshrinkError(
            f"model.lmshrink_format={fmt!r} is unknown; known: dense, {', '.join(FORMAT_HANDLERS)}"
        )
    config = getattr(model, "config", None)
    manifest: dict[str, Any] = {
        "format": fmt,
        "lmshrink_version": __version__,
        "task": task_of(model),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "parameters": count_parameters(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", "")
        if any(True for _ in model.parameters())
        else None,
        "source": getattr(model, "lmshrink_source", None),
        "created": now_iso(),
        "has_tokenizer": tokenizer is not None,
    }
    out = Path(out_dir)
    check_save_disk(model, out)  # clear error before writing when the disk is too full
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if fmt == "dense":
            if not hasattr(model, "save_pretrained"):
                raise LmshrinkError(
                    f"cannot save a {type(model).__name__}: dense saving needs a transformers PreTrainedModel"
                )
            model.save_pretrained(tmp)  # type: ignore[operator]
        else:
            extra = resolve_handler(fmt, "save")(model, tmp, tokenizer)
            if extra:
                manifest.update(extra)
            manifest["format"] = fmt
        if tokenizer is not None and not (tmp / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    log.info("saved %s model to %s", fmt, out)
    return out
