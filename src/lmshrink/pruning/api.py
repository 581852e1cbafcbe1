"""One entry point, :func:`prune_model`, and a registry mapping each method to its module transform."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import count_parameters, linear_weight_oi
from lmshrink.pruning.calibrate import check_calibration
from lmshrink.pruning.config import STRUCTURED, PruneConfig, make_config
from lmshrink.pruning.magnitude import apply_weight_pruning
from lmshrink.pruning.masks import PruningMasks, sparsity_of
from lmshrink.pruning.report import LayerRecord, PruneReport
from lmshrink.pruning.sparsegpt import prune_sparsegpt
from lmshrink.pruning.structured import prune_structured
from lmshrink.pruning.wanda import prune_wanda
from lmshrink.utils.env import provenance

log = logging.getLogger(__name__)

Batches = Sequence[dict[str, torch.Tensor]]
Pruner = Callable[[nn.Module, PruneConfig, Batches | None, bool], list[LayerRecord]]

#: method name -> transform(model, config, calibration, progress) -> per-layer records
PRUNERS: dict[str, Pruner] = {}


def register_pruner(*names: str) -> Callable[[Pruner], Pruner]:
    """Decorator adding a transform to :data:`PRUNERS` under ``names``."""

    def deco(fn: Pruner) -> Pruner:
        for name in names:
            PRUNERS[name] = fn
        return fn

    return deco


def _mask_records(model: nn.Module, masks: PruningMasks) -> list[LayerRecord]:
    out = []
    for name in masks.masks:
        w = linear_weight_oi(model.get_submodule(name))
        out.append(LayerRecord(name=name, shape=list(w.shape), sparsity=sparsity_of(w.detach())))
    return out


def _unstructured_method(config: PruneConfig) -> str:
    return config.nm_score if config.method == "nm" else config.method


@register_pruner("magnitude", "wanda", "sparsegpt", "nm")
def _unstructured(
    model: nn.Module, config: PruneConfig, calibration: Batches | None, progress: bool
) -> list[LayerRecord]:
    method = _unstructured_method(config)
    sparsity = config.sparsity or 0.0
    nm = config.nm_tuple
    if method == "magnitude":
        masks = apply_weight_pruning(
            model, sparsity, nn.Linear, scope=config.scope, nm=nm, skip=config.skip, targets=config.targets
        )
        return _mask_records(model, masks)
    if method == "wanda":
        _, records = prune_wanda(model, calibration, sparsity, nm, config.targets, config.skip, progress)
        return records
    _, records = prune_sparsegpt(
        model,
        calibration,
        sparsity,
        nm,
        config.targets,
        config.skip,
        config.blocksize,
        config.percdamp,
        progress,
    )
    return records


@register_pruner("heads", "neurons", "layers")
def _structured(
    model: nn.Module, config: PruneConfig, calibration: Batches | None, progress: bool
) -> list[LayerRecord]:
    return prune_structured(model, config, calibration)


def prune_model(
    model: nn.Module,
    config: PruneConfig | dict[str, object],
    calibration: Batches | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says and return the report (per-layer sparsity and importance).

    Calibrated methods (wanda, sparsegpt, nm scored by wanda/sparsegpt, heads, neurons, layers) need
    ``calibration``: a list of ``{"input_ids": (1, seq_len)}`` batches, e.g.
    ``lmshrink.data.calibration_batches(tokenizer, "c4", config.n_samples, config.seq_len, config.seed)``.
    Afterwards ``model.lmshrink_format`` is ``"sparse"`` (unstructured; saved as bitmask + values) or ``"pruned"``
    (structured; saved with per-block shapes), which :func:`lmshrink.models.save_model` dispatches on.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> round(prune_model(m, {"method": "magnitude", "sparsity": 0.5}, progress=False).sparsity, 3)
    0.5
    """
    if isinstance(config, dict):
        config = make_config(**config)
    if config.needs_calibration:
        calibration = check_calibration(calibration, config.method)
    pruner = PRUNERS.get(config.method)
    if pruner is None:
        raise LmshrinkError(f"unknown pruning method {config.method!r}; known: {', '.join(sorted(PRUNERS))}")
    params_before = count_parameters(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        records = pruner(model, config, calibration, progress)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    structured = config.method in STRUCTURED
    total = 0 if structured else sum(int(torch.Size(r.shape).numel()) for r in records)
    pruned = 0 if structured else sum(round(r.sparsity * torch.Size(r.shape).numel()) for r in records)
    dtype = next((p.dtype for p in model.parameters()), None)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    report = PruneReport(
        method=config.method,
        config=config.model_dump(),
        layers=records,
        parameters_before=params_before,
        parameters_after=count_parameters(model),
        weights_pruned=pruned,
        weights_total=total,
        seconds=seconds,
        provenance=provenance(device, dtype),
    )
    log.info(
        "pruned with %s: sparsity %.4f, parameters %d -> %d in %.1fs",
        config.method,
        report.sparsity,
        params_before,
        report.parameters_after,
        seconds,
    )
    return report
