"""SmoothQuant (Xiao et al. 2022) W8A8: move activation outliers into the weights, then int8 weights per channel
and int8 activations per token (the fbgemm per-token kernel on CPU).

Per input channel ``j``: ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``; ``x / s`` has tamer outliers and
``W * s`` absorbs them. ``s`` is folded into the preceding norm (or linear) where exact, else kept as the layer's
``input_scale``. Mappings are shared with AWQ (:data:`lmshrink.quantization.awq.SCALE_MAPPINGS`).

Outlier fallback (``config.outliers="auto"``): smoothing cannot tame a channel that is huge on a few tokens only
(the "massive activations" of attention-sink tokens at SwiGLU ``down_proj`` inputs, ~100x the rest): per-token int8
then spends the whole range of those tokens on one channel. For each layer the simulated W8A8 error on calibration
rows is compared with the LLM.int8() decomposition of the smoothed input (columns with any
``|x| > config.threshold`` in fp32, the rest int8 per token); the layer keeps the decomposition when it at least
halves the error and touches at most :data:`MAX_OUTLIER_FRACTION` of the columns. Everything else stays pure W8A8.

>>> import torch
>>> s = smoothing_scale(torch.tensor([1.0, 100.0]), [torch.ones(4, 2)], alpha=0.5)
>>> [round(v, 1) for v in s.tolist()]
[1.0, 10.0]
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from lmshrink.models.arch import set_submodule
from lmshrink.models.layerwise import BlockInput
from lmshrink.quantization.api import (
    Batches,
    BlockLayers,
    for_each_block,
    quantize_outside_blocks,
    replace_with_quantized,
)
from lmshrink.quantization.awq import MAX_SAMPLE_ROWS, collect_stats, fold_scale, plan_mappings
from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.gptq import layer_hessians
from lmshrink.quantization.grid import IntGrid
from lmshrink.quantization.linear import QuantLinear, linear_weight_and_bias

log = logging.getLogger(__name__)


def smoothing_scale(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """Per-input-channel smoothing factors from activation absmax (K,) and the weights (N, K) reading them."""
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.float().clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


#: Candidate migration strengths for ``alpha="auto"`` (plus "no smoothing").
ALPHA_GRID: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None) -> float:
    """Output MSE of simulated W8A8 (per-token int8 ``x / s``, per-channel int8 ``W * s``) against float."""
    xs = x if s is None else x / s
    xq = _fake_quant_rows(xs)
    err = 0.0
    for w in weights:
        ws = w.float() if s is None else w.float() * s
        err += float((xq @ _fake_quant_rows(ws).t() - x @ w.float().t()).pow(2).mean())
    return err


#: Most input columns a layer may route through fp32 (in the calibration sample) and still take the fallback.
MAX_OUTLIER_FRACTION = 0.05


def w8a8_outlier_error(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None, threshold: float
) -> tuple[float, float]:
    """Simulated output MSE of the LLM.int8() decomposition of the (smoothed) input and the fraction of columns it
    sends to fp32: columns of ``x / s`` with any ``|value| > threshold`` stay float (their int8 weight columns)."""
    xs = x if s is None else x / s
    cols = (xs.abs() > threshold).any(dim=0)
    xq = _fake_quant_rows(xs.masked_fill(cols, 0.0)) + xs * cols
    err = 0.0
    for w in weights:
        ws = w.float() if s is None else w.float() * s
        err += float((xq @ _fake_quant_rows(ws).t() - x @ w.float().t()).pow(2).mean())
    return err, float(cols.float().mean())


def wants_outliers(
    x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor | None, threshold: float
) -> bool:
    """Whether the outlier decomposition at least halves the simulated W8A8 error using few fp32 columns."""
    plain = w8a8_error(x, weights, s)
    err, frac = w8a8_outlier_error(x, weights, s, threshold)
    return frac <= MAX_OUTLIER_FRACTION and err <= 0.5 * plain


def _fake_quant_rows(t: torch.Tensor) -> torch.Tensor:
    scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(t / scale).clamp_(-127, 127) * scale


def choose_scale(
    x: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float | str
) -> torch.Tensor | None:
    """The smoothing scale for a fixed ``alpha``, or with ``alpha="auto"`` the best of :data:`ALPHA_GRID` and no
    smoothing (``None``) by simulated W8A8 output error on the calibration rows ``x``."""
    if alpha != "auto":
        return smoothing_scale(act_absmax, weights, float(alpha))
    best: tuple[float, torch.Tensor | None] = (w8a8_error(x, weights, None), None)
    for a in ALPHA_GRID:
        s = smoothing_scale(act_absmax, weights, a)
        err = w8a8_error(x, weights, s)
        if err < best[0]:
            best = (err, s)
    return best[1]


@dataclass
class LayerPlan:
    """One layer's W8A8 recipe after smoothing: its weight (with any folded scale already in it), bias, the scale
    kept on its input (``None`` when folded upstream or not smoothed), activation mode and outlier threshold."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor | None
    act: str
    threshold: float | None


def replace_with_gptq(
    block: nn.Module,
    block_layers: BlockLayers,
    inputs: list[BlockInput],
    plans: dict[str, LayerPlan],
    config: QuantConfig,
) -> None:
    """Swap each planned layer for int8 per-channel weights rounded by GPTQ instead of RTN (llm-compressor's W8A8
    recipe: SmoothQuant, then GPTQ on the smoothed weights).

    The Hessian is that of the input the int8 GEMM sees: the recorded input ``x`` of the smoothed float block, or
    for a layer that keeps its scale on the input, ``x / s`` (``H / (s s^T)``, with the weight ``W * s``). With
    ``config.true_sequential`` the groups of :func:`~lmshrink.quantization.gptq.sequential_groups` are quantized in
    order, each group's inputs taken with the earlier groups already quantized (activation quantization is not
    simulated in the Hessian, as in the reference)."""
    spec = config.weight_spec()
    grid = IntGrid(8, True, None)
    weights = {
        rel: p.weight if p.scale is None else p.weight.float() * p.scale.float() for rel, p in plans.items()
    }
    for group, states in layer_hessians(block, block_layers, inputs, config.true_sequential, weights):
        for _full, rel, _mod in group:
            p, st = plans[rel], states.pop(rel)
            if p.scale is not None:
                inv = 1.0 / p.scale.float()
                st.h = st.h * inv[:, None] * inv[None, :]
            codes, scale, zero = st.quantize(
                grid, config.block_size, config.damp, config.act_order, False, config.scale_refit
            )
            q = QuantLinear.from_codes(
                codes,
                scale,
                zero,
                spec,
                p.bias,
                act=p.act,
                input_scale=p.scale is not None,
                threshold=p.threshold,
            )
            if p.scale is not None:
                q.set_input_scale(1.0 / p.scale)
            set_submodule(block, rel, q.to(p.weight.device))


def quantize_smoothquant(
    model: nn.Module, config: QuantConfig, layers: list[tuple[str, nn.Module]], calibration: Batches | None
) -> None:
    """Handler for ``method="smoothquant"``: per block, smooth with calibration absmax, then W8A8."""
    assert calibration is not None
    spec = config.weight_spec()
    keep = MAX_SAMPLE_ROWS if config.alpha == "auto" or config.outliers == "auto" else 0
    n_fallback, n_float = [0], [0]

    def process(_index: int, block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput]) -> None:
        stats = collect_stats(block, block_layers, inputs, keep_rows=keep)
        mods = {rel: m for _, rel, m in block_layers}
        applied, loose = plan_mappings(block, list(mods))
        folded: dict[str, torch.Tensor] = {}
        plans: dict[str, LayerPlan] = {}
        for mp, _kind in applied:
            st = stats[mp.layers[0]]
            ws = [linear_weight_and_bias(mods[n])[0] for n in mp.layers]
            s = choose_scale(st.sample() if keep else st.absmax, st.absmax, ws, config.alpha)
            if s is not None:
                fold_scale(block.get_submodule(mp.prev), [mods[n] for n in mp.layers], s)
                folded.update(dict.fromkeys(mp.layers, s))
        for rel, mod in mods.items():
            w, b = linear_weight_and_bias(mod)
            st = stats[rel]
            s = (
                choose_scale(st.sample() if keep else st.absmax, st.absmax, [w], config.alpha)
                if rel in loose
                else None
            )
            # a scale folded upstream is already in ``w`` (columns x s) but not in the recorded inputs
            w_orig = w / folded[rel] if rel in folded else w
            s_in = s if s is not None else folded.get(rel)
            thr = (
                config.threshold
                if config.outliers == "auto"
                and config.act_mode == "int8"
                and wants_outliers(st.sample(), [w_orig], s_in, config.threshold)
                else None
            )
            act = config.act_mode
            if any(re.search(p, rel) for p in config.float_activations):
                act, thr = "float", None
                n_float[0] += 1
            if thr is not None:
                n_fallback[0] += 1
            plans[rel] = LayerPlan(w, b, s, act, thr)
        if config.weight_method == "gptq":
            replace_with_gptq(block, block_layers, inputs, plans, config)
        else:
            for rel, p in plans.items():
                replace_with_quantized(
                    block, rel, p.weight, p.bias, spec, p.act, p.scale, threshold=p.threshold
                )

    quantize_outside_blocks(model, config, for_each_block(model, layers, calibration, process))
    if n_float[0]:
        log.info("SmoothQuant: %d layers keep float activations (%s)", n_float[0], config.float_activations)
    if n_fallback[0]:
        log.info(
            "SmoothQuant: %d of %d layers keep fp32 outlier columns (threshold %.1f)",
            n_fallback[0],
            len(layers),
            config.threshold,
        )
