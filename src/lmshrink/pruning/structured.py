"""Structured pruning that physically removes attention heads, MLP neurons or whole blocks.

The result is a smaller dense model: fewer parameters, a smaller file and lower latency with ordinary kernels.

Grouped-query attention: a unit of head pruning is a **KV group**, one key/value head together with all the query
heads that read it (for multi-head attention such as BERT a group is a single head). Removing whole groups keeps
``num_key_value_groups`` (query heads per KV head) unchanged, which is what transformers' ``LlamaAttention`` needs:
it reshapes projections with ``-1`` heads and repeats each KV head ``num_key_value_groups`` times, so layers may
keep different numbers of groups. Per-layer shapes are recorded in ``config.lmshrink_layer_shapes`` so that
:func:`lmshrink.pruning.storage.load_pruned` can rebuild the model before loading its weights.

Importance comes from calibration data (one pass, original activations):
- heads: norm of each group's contribution to the residual stream (its slice of the ``o_proj`` output),
- neurons: ``|activation| * ||down_proj column||``, i.e. the neuron's contribution norm,
- blocks: Block Influence (1 - cosine similarity of a block's input and output hidden states, ShortGPT),
each divided by the norm of the block's input residual stream so that scores compare across blocks. Heads and neurons
are ranked globally (each block keeps at least ``min_keep`` of its units and at least one); blocks by influence, or
(``layer_importance="loss"``) by the measured calibration-loss increase when each block alone is skipped.

Recovery (``reconstruct=True``, heads and neurons): after removal the projection that reads the removed units
(``o_proj`` / ``down_proj``) is re-fit by ridge-regularised least squares so that it reproduces the full layer's
output from the kept inputs, block by block on calibration inputs that went through the already pruned blocks.
It adds no parameters and costs one calibration pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.models.arch import count_parameters, find_layers, set_submodule
from lmshrink.models.layerwise import BlockInput, block_output, run_layerwise
from lmshrink.pruning.masks import check_sparsity
from lmshrink.pruning.report import LayerRecord

if TYPE_CHECKING:
    from lmshrink.pruning.config import PruneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockSpec:
    """Where a block's attention and MLP projections live (paths relative to the block)."""

    attention: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str


#: Architecture knowledge as data: Llama/Mistral/Qwen/SmolLM blocks, BERT/MiniLM blocks.
BLOCK_SPECS: tuple[BlockSpec, ...] = (
    BlockSpec(
        "self_attn",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
    ),
    BlockSpec(
        "attention.self",
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        ("intermediate.dense",),
        "output.dense",
    ),
)


def block_spec(block: nn.Module) -> BlockSpec:
    """The :class:`BlockSpec` whose paths all exist in ``block``."""
    names = {n for n, _ in block.named_modules()}
    for spec in BLOCK_SPECS:
        if {spec.attention, spec.q, spec.k, spec.v, spec.o, spec.mlp_out, *spec.mlp_in} <= names:
            return spec
    raise LmshrinkError(
        f"structured pruning does not know the layout of {type(block).__name__}; "
        "supported: Llama-style (self_attn.q_proj ... mlp.down_proj) and BERT-style blocks"
    )


def _linear(block: nn.Module, path: str) -> nn.Linear:
    mod = block.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise LmshrinkError(f"{path} is a {type(mod).__name__}, structured pruning needs nn.Linear")
    return mod


def head_dim(block: nn.Module) -> int:
    """Per-head width of a block's attention."""
    attn = block.get_submodule(block_spec(block).attention)
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(attn, attr, None)
        if isinstance(value, int):
            return value
    raise LmshrinkError(f"cannot tell the head size of {type(attn).__name__}")


def block_shape(block: nn.Module) -> dict[str, int]:
    """``{"heads", "kv_heads", "intermediate"}`` of one block as it is now."""
    spec, hd = block_spec(block), head_dim(block)
    return {
        "heads": _linear(block, spec.q).out_features // hd,
        "kv_heads": _linear(block, spec.k).out_features // hd,
        "intermediate": _linear(block, spec.mlp_out).in_features,
    }


def _slice_linear(lin: nn.Linear, dim: int, keep: torch.Tensor) -> nn.Linear:
    """A new ``nn.Linear`` keeping output rows (``dim=0``) or input columns (``dim=1``) ``keep``."""
    keep = keep.to(lin.weight.device)
    weight = lin.weight.detach().index_select(dim, keep)
    new = nn.Linear(
        weight.shape[1], weight.shape[0], bias=lin.bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if lin.bias is not None and new.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, keep))
    new.train(lin.training)
    return new


def _set_head_attrs(attn: nn.Module, heads: int, kv_heads: int, hd: int) -> None:
    for attr, value in (
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
        ("all_head_size", heads * hd),
    ):
        if isinstance(getattr(attn, attr, None), int):
            setattr(attn, attr, value)


def keep_groups(block: nn.Module, groups: Sequence[int]) -> torch.Tensor:
    """Keep only the KV groups ``groups`` (sorted indices) of one block's attention; returns the kept ``o_proj``
    input columns."""
    spec, hd, shape = block_spec(block), head_dim(block), block_shape(block)
    per_group = shape["heads"] // shape["kv_heads"]
    g = torch.as_tensor(sorted(groups), dtype=torch.long)
    kv_rows = (g[:, None] * hd + torch.arange(hd)).flatten()
    q_heads = (g[:, None] * per_group + torch.arange(per_group)).flatten()
    q_rows = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
    for path, rows in ((spec.q, q_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
        set_submodule(block, path, _slice_linear(_linear(block, path), 0, rows))
    set_submodule(block, spec.o, _slice_linear(_linear(block, spec.o), 1, q_rows))
    _set_head_attrs(block.get_submodule(spec.attention), len(q_heads), len(g), hd)
    return q_rows


def keep_neurons(block: nn.Module, neurons: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Keep only the MLP neurons ``neurons`` of one block (rows of the input projections, columns of the output);
    returns the kept indices (sorted)."""
    spec = block_spec(block)
    idx = torch.as_tensor(neurons, dtype=torch.long).sort().values
    for path in spec.mlp_in:
        set_submodule(block, path, _slice_linear(_linear(block, path), 0, idx))
    set_submodule(block, spec.mlp_out, _slice_linear(_linear(block, spec.mlp_out), 1, idx))
    return idx


def record_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Write each block's shape to ``config.lmshrink_layer_shapes`` and mark the model as ``pruned``."""
    _, layers = find_layers(model)
    shapes = [block_shape(b) for b in layers]
    config = getattr(model, "config", None)
    if config is not None:
        config.lmshrink_layer_shapes = shapes
    model.lmshrink_format = "pruned"  # type: ignore[assignment]
    return shapes


def apply_layer_shapes(model: nn.Module, shapes: Sequence[dict[str, int]]) -> None:
    """Resize a freshly built model's blocks to recorded ``shapes`` (weights are loaded afterwards)."""
    _, layers = find_layers(model)
    if len(shapes) != len(layers):
        raise LmshrinkError(f"recorded shapes list {len(shapes)} blocks, the model has {len(layers)}")
    for block, shape in zip(layers, shapes, strict=True):
        now = block_shape(block)
        if (shape["heads"], shape["kv_heads"]) != (now["heads"], now["kv_heads"]):
            if shape["heads"] * now["kv_heads"] != shape["kv_heads"] * now["heads"]:
                raise LmshrinkError(f"recorded head shape {shape} does not keep the GQA ratio of {now}")
            keep_groups(block, range(shape["kv_heads"]))
        if shape["intermediate"] != now["intermediate"]:
            keep_neurons(block, torch.arange(shape["intermediate"]))


# ----------------------------------------------------------------------------------------------- explicit plans


def remove_heads(model: nn.Module, plan: Mapping[int, Sequence[int]]) -> None:
    """Remove KV groups ``plan[layer]`` (group = KV head + its query heads; = one head without GQA)."""
    _, layers = find_layers(model)
    for index, groups in plan.items():
        if not 0 <= index < len(layers):
            raise LmshrinkError(f"layer {index} does not exist (the model has {len(layers)} blocks)")
        n = block_shape(layers[index])["kv_heads"]
        drop = set(groups)
        if not drop <= set(range(n)):
            raise LmshrinkError(f"layer {index} has head groups 0..{n - 1}, plan names {sorted(drop)}")
        if len(drop) >= n:
            raise LmshrinkError(
                f"the plan removes every attention head of layer {index}; keep at least one head group "
                "(or remove the whole layer with method 'layers')"
            )
        if drop:
            keep_groups(layers[index], [g for g in range(n) if g not in drop])
    record_shapes(model)


def remove_neurons(model: nn.Module, plan: Mapping[int, Sequence[int] | torch.Tensor]) -> None:
    """Remove MLP neurons ``plan[layer]`` from each named block."""
    _, layers = find_layers(model)
    for index, neurons in plan.items():
        if not 0 <= index < len(layers):
            raise LmshrinkError(f"layer {index} does not exist (the model has {len(layers)} blocks)")
        n = block_shape(layers[index])["intermediate"]
        drop = torch.as_tensor(neurons, dtype=torch.long).unique()
        if len(drop) and (drop.min() < 0 or drop.max() >= n):
            raise LmshrinkError(f"layer {index} has neurons 0..{n - 1}; the plan is out of range")
        if len(drop) >= n:
            raise LmshrinkError(f"the plan removes every MLP neuron of layer {index}; keep at least one")
        keep = torch.ones(n, dtype=torch.bool)
        keep[drop] = False
        if len(drop):
            keep_neurons(layers[index], keep.nonzero().flatten())
    record_shapes(model)


def remove_layers(model: nn.Module, layer_ids: Sequence[int]) -> None:
    """Delete whole blocks, renumber ``layer_idx`` attributes and update ``config.num_hidden_layers``."""
    path, layers = find_layers(model)
    drop = set(layer_ids)
    if not drop <= set(range(len(layers))):
        raise LmshrinkError(f"the model has blocks 0..{len(layers) - 1}, got {sorted(drop)}")
    if len(drop) >= len(layers):
        raise LmshrinkError("the plan removes every layer of the model; keep at least one block")
    kept = [b for i, b in enumerate(layers) if i not in drop]
    new = nn.ModuleList(kept)
    set_submodule(model, path, new)
    for new_idx, block in enumerate(new):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx  # type: ignore[assignment]
    config = getattr(model, "config", None)
    if config is not None:
        old = config.num_hidden_layers
        config.num_hidden_layers = len(new)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == old:
            config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
        removed = list(getattr(config, "lmshrink_removed_layers", []) or [])
        config.lmshrink_removed_layers = removed + sorted(drop)
    record_shapes(model)


# ----------------------------------------------------------------------------------------------- importance


@dataclass
class Importance:
    """Per-block calibration scores: head groups (n_groups,), neurons (intermediate,), block influence, and (on
    demand) the measured loss increase of skipping each block."""

    groups: list[torch.Tensor]
    neurons: list[torch.Tensor]
    influence: list[float]
    layer_loss: list[float] | None = None  # filled on demand by prune_layers(score='loss')


@torch.no_grad()
def compute_importance(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> Importance:
    """One calibration pass over all blocks (original activations) collecting head, neuron and block scores."""
    groups: list[torch.Tensor] = []
    neurons: list[torch.Tensor] = []
    influence: list[float] = []

    def process(index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        spec, hd, shape = block_spec(block), head_dim(block), block_shape(block)
        o, down = _linear(block, spec.o), _linear(block, spec.mlp_out)
        per_group = shape["heads"] // shape["kv_heads"]
        g_score = torch.zeros(shape["kv_heads"], dtype=torch.float64)
        n_score = torch.zeros(shape["intermediate"], dtype=torch.float64)
        down_norm = down.weight.detach().float().norm(dim=0)  # (I,)
        w_o = o.weight.detach().float().view(o.out_features, shape["kv_heads"], per_group * hd)

        def o_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = (
                args[0].detach().float().reshape(-1, shape["kv_heads"], per_group * hd)
            )  # (T, G, per_group*hd)
            contrib = torch.einsum("tgd,ogd->tgo", x, w_o)  # (T, G, hidden): each group's o_proj output
            g_score.add_(contrib.norm(dim=-1).sum(0).double())

        def down_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().float().reshape(-1, shape["intermediate"])  # (T, I)
            n_score.add_((a.abs().sum(0) * down_norm).double())

        handles = [o.register_forward_pre_hook(o_hook), down.register_forward_pre_hook(down_hook)]
        resid, bi = 0.0, 0.0
        try:
            for inp in inputs:
                h_in = inp.hidden.float()
                h_out = block_output(block(*inp.args, **inp.kwargs)).float()
                resid += float(h_in.norm(dim=-1).sum())
                cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
                bi += float((1 - cos).sum())
        finally:
            for h in handles:
                h.remove()
        tokens = sum(inp.hidden.shape[:-1].numel() for inp in inputs)
        groups.append((g_score / max(resid, 1e-12)).float())
        neurons.append((n_score / max(resid, 1e-12)).float())
        influence.append(bi / max(tokens, 1))

    run_layerwise(model, batches, process, propagate_transformed=False)
    return Importance(groups, neurons, influence)


def global_plan(scores: Sequence[torch.Tensor], sparsity: float, min_keep: float) -> dict[int, list[int]]:
    """Drop the ``round(sparsity * total)`` lowest-scoring units over all blocks, each block keeping at least
    ``max(1, ceil(min_keep * n))`` of its ``n`` units. Returns ``{block: [unit, ...]}``.

    >>> global_plan([torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])], 0.5, 0.0)
    {0: [0], 1: [0]}
    """
    check_sparsity(sparsity)
    total = sum(len(s) for s in scores)
    budget = round(sparsity * total)
    floor = [max(1, math.ceil(min_keep * len(s))) for s in scores]
    if budget > total - sum(floor):
        raise LmshrinkError(
            f"sparsity {sparsity} would remove {budget} of {total} units but every block must keep at least "
            f"max(1, {min_keep:g} of its units); lower the sparsity or min_keep"
        )
    flat = sorted((float(v), b, u) for b, s in enumerate(scores) for u, v in enumerate(s.tolist()))
    plan: dict[int, list[int]] = {b: [] for b in range(len(scores))}
    removed = 0
    for _, b, u in flat:
        if removed == budget:
            break
        if len(scores[b]) - len(plan[b]) > floor[b]:
            plan[b].append(u)
            removed += 1
    return {b: sorted(units) for b, units in plan.items() if units}


def _records(
    model: nn.Module, scores: Sequence[torch.Tensor], plan: dict[int, list[int]], unit: str
) -> list[LayerRecord]:
    path, _ = find_layers(model)
    out = []
    for b, s in enumerate(scores):
        removed = plan.get(b, [])
        n = len(s)
        imp = [round(float(v), 6) for v in s.tolist()]
        out.append(
            LayerRecord(
                name=f"{path}.{b}:{unit}",
                shape=[n],
                sparsity=len(removed) / n,
                importance=imp,
                removed=removed,
                kept=n - len(removed),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- reconstruction


class InputGram:
    """Running ``sum x x^T``, ``sum x`` and token count of a linear layer's inputs (float64)."""

    def __init__(self, in_features: int) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.sum = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        self.xtx += x.T @ x
        self.sum += x.sum(0)
        self.n += x.shape[0]


@torch.no_grad()
def refit_input_columns(lin: nn.Linear, keep: torch.Tensor, gram: InputGram, damp: float = 0.01) -> nn.Linear:
    """A new ``nn.Linear`` reading only input columns ``keep`` whose weights (and bias) are the least-squares fit
    of the full layer's outputs on the calibration inputs summarised by ``gram``:
    ``W' = argmin ||X_S W'^T + b' - (X W^T + b)||^2 + lambda ||W' - W_S||^2`` (ridge towards plain removal,
    ``lambda = damp * mean diag``), i.e. ``W' = (W G[:, S] + lambda W_S) (G[S, S] + lambda I)^-1`` with
    ``G = E[x x^T]`` (augmented with a constant input when the layer has a bias)."""
    if gram.n == 0:
        raise LmshrinkError("least-squares re-fit needs calibration inputs, the statistics are empty")
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    d = lin.in_features
    G = gram.xtx / gram.n
    W = lin.weight.detach().double().cpu()
    idx = keep
    if lin.bias is not None:
        mean = (gram.sum / gram.n).unsqueeze(1)
        G = torch.cat([torch.cat([G, mean], 1), torch.cat([mean.T, torch.ones(1, 1, dtype=G.dtype)], 1)], 0)
        W = torch.cat([W, lin.bias.detach().double().cpu().unsqueeze(1)], 1)
        idx = torch.cat([keep, torch.tensor([d])])
    Gss = G[idx][:, idx]
    lam = damp * float(torch.diag(Gss).mean().clamp_min(1e-12))
    rhs = W @ G[:, idx] + lam * W[:, idx]  # (out, |S|)
    new_w = torch.linalg.solve(Gss + lam * torch.eye(len(idx), dtype=G.dtype), rhs.T).T
    if not torch.isfinite(new_w).all():
        raise NumericsError("least-squares re-fit produced NaN/Inf; raise damp or use more calibration data")
    new = _slice_linear(lin, 1, keep)
    dtype = new.weight.dtype
    new.weight.copy_(new_w[:, : len(keep)].to(dtype))
    if new.bias is not None:
        new.bias.copy_(new_w[:, -1].to(dtype))
    return new


def _remove_with_refit(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    unit: str,
    plan: Mapping[int, Sequence[int]],
    damp: float = 0.01,
) -> None:
    """Remove ``plan``'s units block by block (inputs from the already pruned blocks) and re-fit the projection
    that reads them (``o_proj`` for head groups, ``down_proj`` for neurons) by least squares."""
    from lmshrink.pruning.calibrate import collect_stats

    def process(index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        drop = set(plan.get(index, []))
        if not drop:
            return
        spec = block_spec(block)
        path = spec.o if unit == "head_groups" else spec.mlp_out
        lin = _linear(block, path)
        gram = collect_stats(block, inputs, {path: lin}, lambda _m: InputGram(lin.in_features))[path]
        if unit == "head_groups":
            n = block_shape(block)["kv_heads"]
            cols = keep_groups(block, [g for g in range(n) if g not in drop])
        else:
            n = block_shape(block)["intermediate"]
            cols = keep_neurons(block, [u for u in range(n) if u not in drop])
        set_submodule(block, path, refit_input_columns(lin, cols, gram, damp))

    run_layerwise(model, batches, process, propagate_transformed=True)
    record_shapes(model)


# ----------------------------------------------------------------------------------------------- entry points

_UNITS = {"heads": "head_groups", "neurons": "neurons"}


def prune_units(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    method: str,
    sparsity: float,
    min_keep: float = 0.1,
    importance: Importance | None = None,
    reconstruct: bool = False,
) -> list[LayerRecord]:
    """Remove ``sparsity`` of all KV head groups (``method="heads"``) or MLP neurons (``"neurons"``) with the
    lowest calibrated contribution, physically; with ``reconstruct`` re-fit the reading projection afterwards."""
    if method not in _UNITS:
        raise LmshrinkError(f"prune_units removes 'heads' or 'neurons', got {method!r}")
    unit = _UNITS[method]
    imp = importance or compute_importance(model, batches)
    scores = imp.groups if method == "heads" else imp.neurons
    plan = global_plan(scores, sparsity, min_keep)
    records = _records(model, scores, plan, unit)
    if method == "neurons":  # neuron scores are long: keep min / median / max in the report
        for r in records:
            r.importance = None if r.importance is None else _summary(r.importance)
    if reconstruct:
        _remove_with_refit(model, batches, unit, plan)
    elif method == "heads":
        remove_heads(model, plan)
    else:
        remove_neurons(model, plan)
    return records


def prune_heads(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    sparsity: float,
    min_keep: float = 0.1,
    importance: Importance | None = None,
    reconstruct: bool = False,
) -> list[LayerRecord]:
    """Remove ``sparsity`` of all KV head groups (lowest calibrated contribution), physically."""
    return prune_units(model, batches, "heads", sparsity, min_keep, importance, reconstruct)


def prune_neurons(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    sparsity: float,
    min_keep: float = 0.1,
    importance: Importance | None = None,
    reconstruct: bool = False,
) -> list[LayerRecord]:
    """Remove ``sparsity`` of all MLP neurons (lowest calibrated contribution), physically."""
    return prune_units(model, batches, "neurons", sparsity, min_keep, importance, reconstruct)


def _summary(values: list[float] | float) -> list[float] | float:
    """Neuron scores are long: keep min / median / max in the report."""
    if isinstance(values, float):
        return values
    t = torch.tensor(values)
    return [float(t.min()), float(t.median()), float(t.max())]


@torch.no_grad()
def _calibration_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean next-token loss of a causal LM over ``batches``."""
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"]
        out = model(**batch, labels=ids, use_cache=False)
        if getattr(out, "loss", None) is None:
            raise LmshrinkError("layer_importance='loss' needs a causal LM (a model that returns a loss)")
        n = ids[:, 1:].numel()
        total += float(out.loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def layer_loss_importance(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], max_batches: int = 2
) -> list[float]:
    """Per block: calibration-loss increase when that block alone is skipped (its output replaced by its input),
    measured on the first ``max_batches`` calibration batches. Higher = more important."""
    _, layers = find_layers(model)
    use = list(batches)[:max_batches]
    base = _calibration_loss(model, use)
    scores = []
    for block in layers:

        def skip(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

        handle = block.register_forward_hook(skip, with_kwargs=True)
        try:
            scores.append(_calibration_loss(model, use) - base)
        finally:
            handle.remove()
    return scores


def prune_layers(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    sparsity: float,
    importance: Importance | None = None,
    score: str = "influence",
) -> list[LayerRecord]:
    """Remove ``round(sparsity * num_layers)`` blocks with the lowest Block Influence (``score="influence"``) or
    the lowest measured loss increase (``score="loss"``; cached on ``importance.layer_loss``)."""
    check_sparsity(sparsity)
    if score == "loss":
        imp = importance or Importance([], [], [])
        if imp.layer_loss is None:
            imp.layer_loss = layer_loss_importance(model, batches)
        values = imp.layer_loss
    elif score == "influence":
        values = (importance or compute_importance(model, batches)).influence
    else:
        raise LmshrinkError(f"layer importance must be 'influence' or 'loss', got {score!r}")
    n = len(values)
    k = round(sparsity * n)
    if k >= n:
        raise LmshrinkError(f"sparsity {sparsity} would remove all {n} layers; keep at least one block")
    drop = sorted(sorted(range(n), key=lambda i: values[i])[:k])
    path, _ = find_layers(model)
    records = [
        LayerRecord(
            name=f"{path}.{i}",
            shape=[1],
            sparsity=float(i in drop),
            importance=values[i],
            removed=[0] if i in drop else [],
            kept=int(i not in drop),
        )
        for i in range(n)
    ]
    remove_layers(model, drop)
    return records


def prune_structured(
    model: nn.Module,
    config: PruneConfig,
    batches: Sequence[dict[str, torch.Tensor]] | None,
    importance: Importance | None = None,
) -> list[LayerRecord]:
    """Apply a structured :class:`~lmshrink.pruning.config.PruneConfig` (``heads``/``neurons``/``layers``);
    ``importance`` may be shared between calls on the same dense model (it is computed when absent)."""
    from lmshrink.pruning.calibrate import check_calibration

    batches = check_calibration(batches, config.method)
    sparsity = config.sparsity or 0.0
    if config.method == "layers":
        return prune_layers(model, batches, sparsity, importance, config.layer_importance)
    return prune_units(
        model, batches, config.method, sparsity, config.min_keep, importance, config.reconstruct
    )


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (re-exported for reports)."""
    return count_parameters(model)
