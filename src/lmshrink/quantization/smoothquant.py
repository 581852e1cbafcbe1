"""SmoothQuant (Xiao et al. 2022) W8A8: move activation outliers into the weights, then int8 weights per channel
and int8 activations per token (the fbgemm per-token kernel on CPU).

Per input channel ``j``: ``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``; ``x / s`` has tamer outliers and
``W * s`` absorbs them. ``s`` is folded into the preceding norm (or linear) where exact, else kept as the layer's
``input_scale``. Mappings are shared with AWQ (:data:`lmshrink.quantization.awq.SCALE_MAPPINGS`).

>>> import torch
>>> s = smoothing_scale(torch.tensor([1.0, 100.0]), [torch.ones(4, 2)], alpha=0.5)
>>> [round(v, 1) for v in s.tolist()]
[1.0, 10.0]
"""

from __future__ import annotations

import logging

import torch
from torch import nn

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
from lmshrink.quantization.linear import linear_weight_and_bias

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


def quantize_smoothquant(
    model: nn.Module, config: QuantConfig, layers: list[tuple[str, nn.Module]], calibration: Batches | None
) -> None:
    """Handler for ``method="smoothquant"``: per block, smooth with calibration absmax, then W8A8."""
    assert calibration is not None
    spec = config.weight_spec()
    keep = MAX_SAMPLE_ROWS if config.alpha == "auto" else 0

    def process(_index: int, block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput]) -> None:
        stats = collect_stats(block, block_layers, inputs, keep_rows=keep)
        mods = {rel: m for _, rel, m in block_layers}
        applied, loose = plan_mappings(block, list(mods))
        for mp, _kind in applied:
            st = stats[mp.layers[0]]
            ws = [linear_weight_and_bias(mods[n])[0] for n in mp.layers]
            s = choose_scale(st.sample() if keep else st.absmax, st.absmax, ws, config.alpha)
            if s is not None:
                fold_scale(block.get_submodule(mp.prev), [mods[n] for n in mp.layers], s)
        for rel, mod in mods.items():
            w, b = linear_weight_and_bias(mod)
            st = stats[rel]
            s = (
                choose_scale(st.sample() if keep else st.absmax, st.absmax, [w], config.alpha)
                if rel in loose
                else None
            )
            replace_with_quantized(block, rel, w, b, spec, config.act_mode, s)

    quantize_outside_blocks(model, config, for_each_block(model, layers, calibration, process))
