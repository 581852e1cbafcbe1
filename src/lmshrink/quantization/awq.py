"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, searched on calibration data.

For layers sharing an input ``x`` (K columns), ``s = mean|x|^a`` (normalised) is searched over ``a`` in a grid of
``config.grid`` values to minimise ``|| x W^T - (x / s) Q(W * s)^T ||``. The scale is then *folded* into the
operation that produced ``x`` where that is exact (an RMSNorm/LayerNorm weight, or the rows of a preceding linear
whose output feeds the layers linearly), and otherwise kept as ``input_scale`` inside the
:class:`~lmshrink.quantization.linear.QuantLinear`. Which op feeds which layers is data (:data:`SCALE_MAPPINGS`).

>>> import torch
>>> from lmshrink.quantization.grid import IntGrid
>>> x = torch.randn(256, 32); x[:, 3] *= 20
>>> s = search_scale(x, [torch.randn(16, 32)], IntGrid(4, True, 8), n_grid=10)
>>> s.shape
torch.Size([32])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from lmshrink.models.arch import is_linear
from lmshrink.models.layerwise import BlockInput
from lmshrink.quantization.api import (
    Batches,
    BlockLayers,
    feed_inputs,
    for_each_block,
    quantize_outside_blocks,
    replace_with_quantized,
)
from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.grid import IntGrid, fake_quantize
from lmshrink.quantization.linear import linear_weight_and_bias, module_weight

log = logging.getLogger(__name__)

#: Rows of calibration activations kept per layer input for the scale search (statistics use every row).
MAX_SAMPLE_ROWS = 1024


@dataclass(frozen=True)
class ScaleMapping:
    """``prev`` (a norm or linear, name inside the block) produces the input of every layer in ``layers``."""

    prev: str
    layers: tuple[str, ...]


#: Architecture knowledge as data. A mapping applies when all its modules exist in the block and shapes agree.
SCALE_MAPPINGS: tuple[ScaleMapping, ...] = (
    # Llama / Mistral / Qwen / SmolLM
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),  # SwiGLU: act(gate) * up is linear in up
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),  # only without GQA (shapes must agree)
    # GPT-2
    ScaleMapping("ln_1", ("attn.c_attn",)),
    ScaleMapping("ln_2", ("mlp.c_fc",)),
)


@dataclass
class InputStats:
    """Per-channel statistics of one layer's input, plus a capped sample of rows."""

    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    rows: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, keep_rows: int) -> None:
        a = x.abs()
        self.absmax = a.amax(0) if self.absmax is None else torch.maximum(self.absmax, a.amax(0))
        self.abssum = a.sum(0) if self.abssum is None else self.abssum + a.sum(0)
        self.rows += x.shape[0]
        kept = sum(s.shape[0] for s in self.samples)
        if kept < keep_rows:  # evenly spaced rows of each batch, so that the sample spans several batches
            per_batch = min(x.shape[0], max(keep_rows // 8, 1), keep_rows - kept)
            idx = torch.linspace(0, x.shape[0] - 1, per_batch).round().long()
            self.samples.append(x[idx].clone())

    @property
    def absmean(self) -> torch.Tensor:
        assert self.abssum is not None
        return self.abssum / max(self.rows, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


def collect_stats(
    block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput], keep_rows: int
) -> dict:
    """Run the block once and return :class:`InputStats` per layer (name inside the block)."""
    stats = {rel: InputStats() for _, rel, _ in block_layers}
    feed_inputs(
        block, {rel: m for _, rel, m in block_layers}, inputs, lambda r, x: stats[r].add(x, keep_rows)
    )
    return stats


def _fold_kind(prev: nn.Module | None, k: int) -> str | None:
    if prev is None:
        return None
    if is_linear(prev):
        return "linear" if linear_weight_and_bias(prev)[0].shape[0] == k else None
    name = type(prev).__name__
    weight = getattr(prev, "weight", None)
    norm = isinstance(prev, nn.LayerNorm) or (name.endswith("RMSNorm") and "Gemma" not in name)
    return "norm" if norm and isinstance(weight, torch.Tensor) and weight.numel() == k else None


def fold_scale(prev: nn.Module, layers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the input columns of ``layers`` by ``s`` (exact)."""
    with torch.no_grad():
        if is_linear(prev):
            w = module_weight(prev)
            w.div_(s.reshape(1, -1) if type(prev).__name__ == "Conv1D" else s.reshape(-1, 1))
        else:
            module_weight(prev).div_(s)
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s)
        for layer in layers:
            w = module_weight(layer)
            w.mul_(s.reshape(-1, 1) if type(layer).__name__ == "Conv1D" else s.reshape(1, -1))


def plan_mappings(block: nn.Module, names: list[str]) -> tuple[list[tuple[ScaleMapping, str]], list[str]]:
    """Mappings that apply in ``block`` (with their fold kind) and the selected layers no mapping covers."""
    applied: list[tuple[ScaleMapping, str]] = []
    covered: set[str] = set()
    modules = dict(block.named_modules())
    for mp in SCALE_MAPPINGS:
        if not all(name in names for name in mp.layers) or covered & set(mp.layers):
            continue
        k = linear_weight_and_bias(modules[mp.layers[0]])[0].shape[1]
        kind = _fold_kind(modules.get(mp.prev), k)
        if kind is not None:
            applied.append((mp, kind))
            covered.update(mp.layers)
    return applied, [n for n in names if n not in covered]


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], grid: IntGrid, n_grid: int = 20
) -> torch.Tensor:
    """AWQ scale search: ``s = mean|x|^a`` minimising the summed output MSE of ``weights`` (each (N, K))."""
    x = x.float()
    x_mean = x.abs().mean(0)
    refs = [x @ w.float().t() for w in weights]
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for r in range(n_grid):
        s = x_mean.pow(r / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, refs, strict=True):
            wq = fake_quantize(w.float() * s, grid) / s
            err += float((x @ wq.t() - ref).pow(2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


#: The clip search leaves the query/key projections alone: their error passes through ``q k^T``, which a layer's
#: own output error does not measure (the reference implementation skips them too).
CLIP_SKIP = ("q_proj", "k_proj", "query", "key", "c_attn", "Wqkv")


def search_clip(
    x: torch.Tensor,
    w: torch.Tensor,
    grid: IntGrid,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_rows: int = 512,
) -> torch.Tensor:
    """AWQ's clip search: for every (output row, group) of ``w`` (N, K), the clipping value ``max|w| * (1 - i /
    n_grid)``, ``i < max_shrink * n_grid``, whose quantized group gives the least squared error of that group's
    part of the output ``x_g w_g^T`` on ``x`` (T, K; at most ``max_rows`` evenly spaced rows are used). Returns
    (N, n_groups) values; ``i = 0`` (no clipping) is a candidate, so no group's output error grows."""
    n, k = w.shape
    gs = k if grid.group_size is None else grid.group_size
    g = k // gs
    if x.shape[0] > max_rows:
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows).round().long()]
    xg = x.float().reshape(-1, g, gs).transpose(0, 1)  # (G, T, gs)
    wg = w.float().reshape(n, g, gs).transpose(0, 1)  # (G, N, gs)
    ref = torch.bmm(xg, wg.transpose(1, 2))  # (G, T, N): each group's share of the output
    amax = wg.abs().amax(-1)  # (G, N)
    best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for i in range(max(1, int(max_shrink * n_grid))):
        mv = (amax * (1 - i / n_grid))[..., None]
        clipped = torch.maximum(torch.minimum(wg, mv), -mv).transpose(0, 1).reshape(n, k)
        q = fake_quantize(clipped, grid).reshape(n, g, gs).transpose(0, 1)
        err = (torch.bmm(xg, q.transpose(1, 2)) - ref).pow(2).mean(1)  # (G, N)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mv[..., 0], best)
    return best.t().contiguous()


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``w`` (N, K) clamped to ``[-max_val, max_val]`` per (row, group); ``max_val`` is (N, n_groups)."""
    n, k = w.shape
    mv = max_val.to(w.dtype).reshape(n, -1, 1)
    return torch.maximum(torch.minimum(w.reshape(n, mv.shape[1], -1), mv), -mv).reshape(n, k)


def quantize_awq(
    model: nn.Module, config: QuantConfig, layers: list[tuple[str, nn.Module]], calibration: Batches | None
) -> None:
    """Handler for ``method="awq"``: per block, search and fold scales, then (``config.clip_search``) search
    each group's clipping value on the scaled inputs (:func:`search_clip`), then round the scaled weights."""
    assert calibration is not None
    spec = config.weight_spec()
    grid = IntGrid(spec.bits, spec.symmetric, spec.group_size)
    clip = config.clip_search and grid.group_size != 0

    def process(_index: int, block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput]) -> None:
        stats = collect_stats(block, block_layers, inputs, MAX_SAMPLE_ROWS)
        mods = {rel: m for _, rel, m in block_layers}
        applied, loose = plan_mappings(block, list(mods))
        folded: dict[str, torch.Tensor] = {}  # layer -> the scale its input is now divided by
        for mp, _kind in applied:
            ws = [linear_weight_and_bias(mods[n])[0] for n in mp.layers]
            s = search_scale(stats[mp.layers[0]].sample(), ws, grid, config.grid)
            fold_scale(block.get_submodule(mp.prev), [mods[n] for n in mp.layers], s)
            folded.update(dict.fromkeys(mp.layers, s))
        for rel, mod in mods.items():
            w, b = linear_weight_and_bias(mod)
            s_loose: torch.Tensor | None = (
                search_scale(stats[rel].sample(), [w], grid, config.grid) if rel in loose else None
            )
            if clip and not any(part in rel.split(".")[-1] for part in CLIP_SKIP):
                s_in = folded.get(rel, s_loose)
                x = stats[rel].sample()
                w_eff = w if s_loose is None else w * s_loose
                w_eff = apply_clip(w_eff, search_clip(x if s_in is None else x / s_in, w_eff, grid))
                w = w_eff if s_loose is None else w_eff / s_loose
            replace_with_quantized(block, rel, w, b, spec, config.act_mode, s_loose)

    quantize_outside_blocks(model, config, for_each_block(model, layers, calibration, process))
