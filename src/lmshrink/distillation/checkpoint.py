"""Training checkpoints: model, optimizer, RNG and loop state, written atomically, no pickle.

A checkpoint directory holds ``model.safetensors``, ``optimizer.safetensors`` (every tensor of the optimizer state),
``rng.safetensors`` (torch RNG states) and ``state.json`` (step, config, trace, running sums, optimizer hyper-
parameters and the sha256 of each tensor file), plus ``extra.safetensors`` when training carries modules outside
the model (the learned projections of a hidden-state loss). The data position is the step: the batch order is a pure function
of ``(seed, epoch)``. A truncated or altered file is a :class:`CorruptFileError` on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from lmshrink.errors import CorruptFileError
from lmshrink.utils.io import atomic_directory, atomic_write_json

FORMAT = "lmshrink-checkpoint/1"
_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_EXTRA = "extra.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as flat tensors (``"<param>.<key>"``) plus JSON-able scalars and param groups."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = st
    return out


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: nn.Module | None = None,
) -> Path:
    """Write a checkpoint directory atomically (a crash leaves the previous checkpoint in place); ``extra`` is a
    module trained alongside the model (saved to ``extra.safetensors``)."""
    final = Path(path)
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    files = list(_FILES)
    with atomic_directory(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        if extra is not None:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in extra.state_dict().items()},
                str(tmp / _EXTRA),
            )
            files.append(_EXTRA)
        record = {
            "format": FORMAT,
            **state,
            "optimizer": opt_meta,
            "sha256": {f: _sha256(tmp / f) for f in files},
        }
        atomic_write_json(tmp / "state.json", record)
    return final


def read_state(path: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint, after checking every tensor file against its recorded sha256."""
    root = Path(path)
    file = root / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptFileError(
            f"checkpoint {root} has no state.json; delete the directory to start afresh"
        ) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(
            f"checkpoint state {file} is not valid JSON ({exc}); delete {root} to start afresh"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptFileError(f"{file} is not an lmshrink checkpoint (format {FORMAT!r} expected)")
    for name in (*_FILES, *((_EXTRA,) if _EXTRA in state.get("sha256", {}) else ())):
        f = root / name
        if not f.is_file() or _sha256(f) != state.get("sha256", {}).get(name):
            raise CorruptFileError(
                f"checkpoint file {f} is missing or does not match its checksum (truncated or altered); "
                f"delete {root} to restart from scratch"
            )
    return state


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: nn.Module | None = None
) -> dict[str, Any]:
    """Restore model, optimizer, RNG (and ``extra``, see :func:`save_checkpoint`) from a checkpoint directory in
    place; return its ``state.json``."""
    root = Path(path)
    state = read_state(root)
    has_extra = _EXTRA in state.get("sha256", {})
    if has_extra != (extra is not None):
        raise CorruptFileError(
            f"checkpoint {root} was written {'with' if has_extra else 'without'} extra training modules "
            f"(hidden-state projections) and this run {'has' if extra is not None else 'has none'}; resume with the "
            "same hidden_weight / attention_weight settings"
        )
    try:
        if extra is not None:
            extra.load_state_dict(load_file(str(root / _EXTRA)))
        missing, unexpected = load_model(model, str(root / "model.safetensors"), strict=False)
        opt_tensors = load_file(str(root / "optimizer.safetensors"))
        rng = load_file(str(root / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CorruptFileError(f"cannot read checkpoint {root}: {exc}") from exc
    if missing or unexpected:
        raise CorruptFileError(
            f"checkpoint {root} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); it was written for another architecture"
        )
    # tensors stay on CPU: Optimizer.load_state_dict moves them to each parameter's device (and keeps `step`)
    opt_state = _optimizer_join(opt_tensors, state["optimizer"])
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as exc:
        raise CorruptFileError(f"optimizer state in {root} does not fit this model: {exc}") from exc
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return state
