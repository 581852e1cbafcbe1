"""Per-layer sensitivity and mixed-precision (or mixed-sparsity) plans.

For every linear layer alone, :func:`measure_sensitivity` quantizes (fake quantization with the real storage
format's rounding, :func:`lmshrink.quantization.formats.get_format`) or prunes (magnitude) that layer and measures the
damage as the KL divergence of the model's next-token distribution from the original one on a few calibration
windows. Blocks before the layer are replayed from a cache, so each measurement only runs the layer's block and
the ones after it.

:func:`make_plan` then picks one choice per layer (bits from e.g. {2, 3, 4, 8}, or a sparsity) that meets a target
average (bits per weight, weighted by parameter count; scales not counted) with the least predicted damage, the sum
of the measured per-layer costs: a Lagrangian relaxation of the knapsack, then a greedy fill of the remaining budget,
and never worse (predicted) than the uniform plan when the target is itself a choice.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
>>> ids = torch.randint(0, 64, (2, 16))
>>> sens = measure_sensitivity(m, ids, choices=(2, 4, 8))
>>> plan = make_plan(sens, target=4.0)
>>> plan.average <= 4.0
True
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP, find_layers, select_linears
from lmshrink.utils.env import provenance

log = logging.getLogger(__name__)

Mode = Literal["quantize", "prune"]


class LayerCost(BaseModel):
    """Measured damage of one layer at each choice (key: the choice as a string, e.g. "4" or "0.5")."""

    name: str
    block: int | None
    params: int
    costs: dict[str, float]


class SensitivityResult(BaseModel):
    """Per-layer damage table and how it was measured."""

    mode: Mode
    metric: str = "kl_mean"
    choices: list[float]
    group_size: int | None = None
    layers: list[LayerCost]
    measured_choices: list[float] = Field(
        default_factory=list
    )  # the others are estimated (see measure_sensitivity)
    n_windows: int
    seq_len: int
    protocol: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)


class Plan(BaseModel):
    """One choice per layer (bits, or sparsity), the average it reaches and the damage it predicts."""

    mode: Mode
    target: float
    average: float  # bits per weight (quantize) or sparsity (prune), weighted by parameters
    layers: dict[str, float]
    predicted: float
    uniform: dict[str, float] = Field(default_factory=dict)  # choice -> predicted damage of the uniform plan
    group_size: int | None = None
    measured: dict[str, Any] = Field(default_factory=dict)

    def groups(self) -> dict[float, list[str]]:
        """Layer names by choice."""
        out: dict[float, list[str]] = {}
        for name, c in self.layers.items():
            out.setdefault(c, []).append(name)
        return out


def _key(c: float) -> str:
    return f"{c:g}"


def _size(mode: Mode, choice: float) -> float:
    """What a choice costs in the budget: bits per weight, or the kept fraction."""
    return choice if mode == "quantize" else 1.0 - choice


# ----------------------------------------------------------------------------------------------- damage
def perturb_weight(w: torch.Tensor, mode: Mode, choice: float, group_size: int | None = None) -> torch.Tensor:
    """``w`` quantized to ``int{choice}`` (fake, exact storage rounding) or magnitude-pruned to sparsity ``choice``."""
    if mode == "quantize":
        from lmshrink.quantization.formats import get_format

        bits = int(choice)
        if bits >= 16:
            return w.clone()
        return get_format(f"int{bits}").fake_quantize(w, group_size)
    k = round(choice * w.numel())
    if k <= 0:
        return w.clone()
    threshold = w.detach().abs().flatten().float().kthvalue(k).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


def _logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    if not isinstance(logits, torch.Tensor):
        raise LmshrinkError("the model output has no logits; sensitivity needs a causal LM or a classifier")
    return logits.float()


def kl_from_reference(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(reference || model), in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return max(0.0, float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()))


class _Replay(nn.Module):
    """Stands in for a block: returns what the block returned in the clean pass (no compute)."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


@contextlib.contextmanager
def _replayed(layers: nn.ModuleList, outputs: list[Any], upto: int) -> Iterator[None]:
    """Replace blocks ``0..upto-1`` by replays of their clean outputs."""
    saved = [layers[i] for i in range(upto)]
    try:
        for i in range(upto):
            layers[i] = _Replay(outputs[i])
        yield
    finally:
        for i, blk in enumerate(saved):
            layers[i] = blk


def _gram_hook(grams: dict[str, torch.Tensor], name: str) -> Any:
    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
        g = x.T @ x
        grams[name] = grams[name] + g if name in grams else g

    return hook


def _block_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


@torch.inference_mode()
def measure_sensitivity(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    mode: Mode = "quantize",
    choices: Sequence[float] = (2, 3, 4, 8),
    group_size: int | None = None,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = DEFAULT_SKIP,
    measure: Sequence[float] | None = None,
    metric: Literal["kl", "output"] = "kl",
    progress: bool = False,
) -> SensitivityResult:
    """Damage (mean KL vs the unmodified model) of quantizing/pruning each linear layer alone at each choice.

    ``input_ids``: (n_windows, seq_len) token ids (one batch). ``choices``: bits (quantize) or sparsities (prune).
    ``measure`` (quantize only, default: all choices) measures only these bit widths and estimates the others from
    the nearest measured one with the rounding-noise law ``KL(b) ~ KL(m) * 4**(m - b)`` (each extra bit quarters
    the noise power; the KL of a small perturbation is quadratic in it), which saves one forward pass per choice.
    """
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise LmshrinkError(f"input_ids must be (n_windows, seq_len), got shape {tuple(input_ids.shape)}")
    if mode == "quantize" and any(not float(c).is_integer() or not 2 <= c <= 8 for c in choices):
        raise LmshrinkError(f"quantization choices are bit widths in 2..8, got {list(choices)}")
    if mode == "prune" and any(not 0 <= c < 1 for c in choices):
        raise LmshrinkError(f"pruning choices are sparsities in [0, 1), got {list(choices)}")
    measured = [float(c) for c in (measure if measure is not None else choices)]
    if not measured or not set(measured) <= {float(c) for c in choices}:
        raise LmshrinkError(
            f"measure must be a non-empty subset of the choices {list(choices)}, got {measured}"
        )
    if mode == "prune" and len(measured) != len(choices):
        raise LmshrinkError("pruning damage cannot be extrapolated; measure every sparsity choice")
    model.eval()
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    prefix, layers = find_layers(model)
    outputs: list[Any] = [None] * len(layers)
    linears = list(select_linears(model, targets, skip))
    if not linears:
        raise LmshrinkError("no linear layers matched the targets/skip patterns; nothing to measure")
    hooks = [
        blk.register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
        for i, blk in enumerate(layers)
    ]
    grams: dict[str, torch.Tensor] = {}
    if metric == "output":
        hooks += [mod.register_forward_pre_hook(_gram_hook(grams, name)) for name, mod in linears]
    elif metric != "kl":
        raise LmshrinkError(f"metric must be 'kl' or 'output', got {metric!r}")
    try:
        ref_logp = F.log_softmax(_logits(model(input_ids=ids, use_cache=False)), dim=-1)
    finally:
        for h in hooks:
            h.remove()
    n_tokens = ids.numel()
    results: list[LayerCost] = []
    from tqdm.auto import tqdm

    for name, mod in tqdm(linears, desc=f"sensitivity ({mode})", disable=not progress):
        block = _block_of(name, prefix)
        weight = mod.weight
        assert isinstance(weight, torch.Tensor)
        original = weight.data.clone()
        costs: dict[str, float] = {}
        if metric == "output":
            for c in measured:
                dw = (perturb_weight(original, mode, c, group_size) - original).float()
                if dw.shape[1] != grams[name].shape[0]:  # GPT-2 Conv1D stores (in, out)
                    dw = dw.T
                costs[_key(c)] = float(((dw @ grams[name]) * dw).sum()) / n_tokens
        ctx = _replayed(layers, outputs, block) if block is not None else contextlib.nullcontext()
        with ctx:
            for c in measured if metric == "kl" else ():
                mod.weight.data = perturb_weight(original, mode, c, group_size)
                costs[_key(c)] = kl_from_reference(ref_logp, _logits(model(input_ids=ids, use_cache=False)))
                mod.weight.data = original
        for choice in choices:
            c = float(choice)
            if _key(c) not in costs:
                m = min(measured, key=lambda x: abs(x - c))
                costs[_key(c)] = costs[_key(m)] * 4.0 ** (m - c)
        results.append(LayerCost(name=name, block=block, params=original.numel(), costs=costs))
    return SensitivityResult(
        mode=mode,
        metric="kl_mean" if metric == "kl" else "output_mse",
        choices=[float(c) for c in choices],
        group_size=group_size,
        layers=results,
        measured_choices=measured,
        n_windows=int(ids.shape[0]),
        seq_len=int(ids.shape[1]),
        provenance=provenance(device),
    )


# ----------------------------------------------------------------------------------------------- planning
def _average(sens: SensitivityResult, pick: dict[str, float]) -> float:
    total = sum(layer.params for layer in sens.layers)
    return sum(layer.params * _size(sens.mode, pick[layer.name]) for layer in sens.layers) / total


def _damage(sens: SensitivityResult, pick: dict[str, float]) -> float:
    return sum(layer.costs[_key(pick[layer.name])] for layer in sens.layers)


def _lagrange_pick(sens: SensitivityResult, lam: float) -> dict[str, float]:
    total = sum(layer.params for layer in sens.layers)
    pick: dict[str, float] = {}
    for layer in sens.layers:
        frac = layer.params / total
        best, best_value = sens.choices[0], math.inf
        for c in sens.choices:
            value = layer.costs[_key(c)] + lam * frac * _size(sens.mode, c)
            if value < best_value:
                best, best_value = c, value
        pick[layer.name] = best
    return pick


def make_plan(sens: SensitivityResult, target: float) -> Plan:
    """The per-layer choices with the least total predicted damage whose average meets ``target``.

    ``target`` is the average bits per weight (quantize) or the average sparsity (prune), weighted by parameters.
    """
    sizes = [_size(sens.mode, c) for c in sens.choices]
    budget = _size(sens.mode, target)
    if budget < min(sizes) - 1e-9:
        raise LmshrinkError(
            f"target {target:g} cannot be met with choices {[_key(c) for c in sens.choices]}; "
            f"{'use a target of at least' if sens.mode == 'quantize' else 'use a sparsity of at most'} "
            f"{min(sens.choices) if sens.mode == 'quantize' else max(sens.choices):g}"
        )
    # 1. Lagrangian relaxation: bisection on the price of size until the budget is met.
    lo, hi = 0.0, 1.0
    while _average(sens, _lagrange_pick(sens, hi)) > budget + 1e-9 and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if _average(sens, _lagrange_pick(sens, mid)) > budget + 1e-9:
            lo = mid
        else:
            hi = mid
    pick = _lagrange_pick(sens, hi)
    # 2. Greedy fill: spend the leftover budget on the upgrades with the best damage saved per unit of size.
    pick = _greedy_fill(sens, pick, budget)
    # 3. Never worse (predicted) than a uniform plan that meets the budget.
    uniform = {
        _key(c): _damage(sens, {layer.name: c for layer in sens.layers})
        for c in sens.choices
        if _size(sens.mode, c) <= budget + 1e-9
    }
    if uniform:
        best_c = min(uniform, key=lambda k: uniform[k])
        if uniform[best_c] < _damage(sens, pick):
            pick = {layer.name: float(best_c) for layer in sens.layers}
    return Plan(
        mode=sens.mode,
        target=target,
        average=round(_average(sens, pick) if sens.mode == "quantize" else 1 - _average(sens, pick), 6),
        layers=pick,
        predicted=_damage(sens, pick),
        uniform=uniform,
        group_size=sens.group_size,
    )


def _greedy_fill(sens: SensitivityResult, pick: dict[str, float], budget: float) -> dict[str, float]:
    pick = dict(pick)
    total = sum(layer.params for layer in sens.layers)
    by_name = {layer.name: layer for layer in sens.layers}
    while True:
        used = _average(sens, pick)
        best: tuple[float, str, float] | None = None
        for name, layer in by_name.items():
            cur = pick[name]
            for c in sens.choices:
                extra = (_size(sens.mode, c) - _size(sens.mode, cur)) * layer.params / total
                saved = layer.costs[_key(cur)] - layer.costs[_key(c)]
                if extra <= 0 or saved <= 0 or used + extra > budget + 1e-9:
                    continue
                ratio = saved / extra
                if best is None or ratio > best[0]:
                    best = (ratio, name, c)
        if best is None:
            return pick
        pick[best[1]] = best[2]


# ----------------------------------------------------------------------------------------------- applying
@torch.no_grad()
def apply_plan_fake(model: nn.Module, plan: Plan) -> nn.Module:
    """Apply ``plan`` in place with fake quantization / magnitude masks (for measuring, not for storage)."""
    modules = dict(model.named_modules())
    for name, c in plan.layers.items():
        if name not in modules:
            raise LmshrinkError(
                f"plan layer {name!r} is not in the model; was the plan made for another model?"
            )
        mod = modules[name]
        mod.weight.data = perturb_weight(mod.weight.data, plan.mode, c, plan.group_size)
    return model


def uniform_plan(sens: SensitivityResult, choice: float) -> Plan:
    """Every layer at ``choice``."""
    pick = {layer.name: float(choice) for layer in sens.layers}
    avg = _average(sens, pick)
    return Plan(
        mode=sens.mode,
        target=choice,
        average=avg if sens.mode == "quantize" else 1 - avg,
        layers=pick,
        predicted=_damage(sens, pick),
        group_size=sens.group_size,
    )


@torch.inference_mode()
def plan_damage(model: nn.Module, plan: Plan, input_ids: torch.Tensor) -> dict[str, float]:
    """Measured KL (vs ``model``) and perplexity of the model with ``plan`` applied, on ``input_ids`` windows."""
    import copy

    device = next(model.parameters()).device
    ids = input_ids.to(device)
    ref = _logits(model(input_ids=ids, use_cache=False))
    ref_logp = F.log_softmax(ref, dim=-1)
    changed = apply_plan_fake(copy.deepcopy(model), plan)
    logits = _logits(changed(input_ids=ids, use_cache=False))
    kl = kl_from_reference(ref_logp, logits)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ref_nll = F.cross_entropy(ref[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return {
        "kl_mean": kl,
        "perplexity": math.exp(float(nll)),
        "reference_perplexity": math.exp(float(ref_nll)),
    }


def plan_storage_bits(model: nn.Module, plan: Plan) -> float:
    """Exact average bits per weight of ``plan``'s layers as stored (packed codes plus float16 scales / zero
    points, :meth:`lmshrink.quantization.formats.WeightFormat.storage_bits`); plans are compared at equal values.

    Only for quantization plans: a pruning plan stores masks, not bit widths.
    """
    from lmshrink.quantization.formats import get_format

    if plan.mode != "quantize":
        raise LmshrinkError("storage bits are defined for quantization plans only")
    modules = dict(model.named_modules())
    bits = 0
    weights = 0
    for name, c in plan.layers.items():
        w = getattr(modules.get(name), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise LmshrinkError(
                f"plan layer {name!r} is not in the model; was the plan made for another model?"
            )
        shape = tuple(w.shape)
        numel = w.numel()
        bits += numel * 32 if c >= 16 else get_format(f"int{int(c)}").storage_bits(shape, plan.group_size)
        weights += numel
    return bits / max(weights, 1)


def plan_to_json(sens: SensitivityResult, plan: Plan) -> dict[str, Any]:
    """The ``sensitivity.json`` document: the measured table and the plan (what recipes read)."""
    return {"format": "lmshrink-sensitivity/1", "plan": plan.model_dump(), "sensitivity": sens.model_dump()}


def plan_from_json(doc: dict[str, Any]) -> Plan:
    """Read the plan out of a ``sensitivity.json`` document."""
    if doc.get("format") != "lmshrink-sensitivity/1" or "plan" not in doc:
        raise LmshrinkError("not an lmshrink sensitivity file (expected format 'lmshrink-sensitivity/1')")
    return Plan.model_validate(doc["plan"])
