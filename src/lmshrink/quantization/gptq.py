"""GPTQ (Frantar et al. 2022), after IST-DASLab's ``gptq.py``: quantize columns one at a time and spread each
column's rounding error over the not-yet-quantized columns using the inverse Hessian ``H = 2 X X^T``.

The math is a pure :func:`accumulate_hessian` plus one small stateful object per layer (:class:`GPTQ`:
``add_batch`` then ``quantize``); :func:`quantize_gptq` is the block-by-block orchestration.

Groups: without act-order, each group's scale/zero is computed from the already error-corrected weights when the
loop reaches it (the original algorithm). With act-order, groups are *static*: computed from the original weights in
the original column order before the permuted loop, so group ``g`` still means columns ``[g*k, (g+1)*k)`` and the
stored layout needs no permutation index.

>>> import torch
>>> from lmshrink.quantization.grid import IntGrid
>>> g = GPTQ(torch.randn(8, 32))
>>> g.add_batch(torch.randn(64, 32))
>>> codes, scale, zero = g.quantize(IntGrid(4, True, 16))
>>> tuple(codes.shape), tuple(scale.shape)
((8, 32), (8, 2))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

from lmshrink.errors import NumericsError
from lmshrink.models.arch import set_submodule
from lmshrink.models.layerwise import BlockInput, run_block
from lmshrink.quantization.api import Batches, BlockLayers, feed_inputs, for_each_block
from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.grid import IntGrid, compute_qparams, compute_qparams_mse, dequantize_codes
from lmshrink.quantization.linear import QuantLinear, linear_weight_and_bias

log = logging.getLogger(__name__)


def clip_token_energy(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows of ``x`` (T, K) scaled down so that no row's squared norm exceeds ``factor`` times the median one.

    Attention-sink tokens (smollm2-135m: the first two positions of every window) reach ``down_proj`` with inputs
    so large that they carry up to 99.9% of ``sum x x^T``: the plain Hessian then fits the layer to those two
    tokens only. Clipped rows keep their direction and still count ``factor`` times a typical token.
    """
    e = x.pow(2).sum(dim=-1)
    cap = factor * e.median()
    w = torch.where(e > cap, torch.sqrt(cap / e.clamp(min=1e-30)), torch.ones_like(e))
    return x * w.unsqueeze(1)


def accumulate_hessian(
    inp: torch.Tensor, h: torch.Tensor, n: int, token_clip: float | None = None
) -> tuple[torch.Tensor, int]:
    """Running mean of ``2 x x^T`` over rows of ``inp`` (..., K): returns the updated ``(H, n_rows)``.

    ``token_clip``: clip each row's energy at that many times the batch's median (:func:`clip_token_energy`).
    """
    x = inp.reshape(-1, inp.shape[-1]).float()
    if token_clip is not None:
        x = clip_token_energy(x, token_clip)
    m = x.shape[0]
    h = h * (n / (n + m))
    n += m
    x = math.sqrt(2.0 / n) * x
    return h + x.t() @ x, n


def _round_scale(scale: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    # grouped scales are stored in float16: quantize against exactly what will be stored
    return scale.to(torch.float16).float() if grid.group_size is not None else scale


def hessian_error(w: torch.Tensor, h: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """Per output row, ``(w - w_hat) H (w - w_hat)^T``: the layer's output error on the calibration inputs (up to
    the constant of ``H = 2 X X^T / n``)."""
    d = (w - w_hat).float()
    return ((d @ h) * d).sum(dim=-1)


def refit_scales(
    w: torch.Tensor,
    h: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: IntGrid,
) -> torch.Tensor:
    """Group scales that minimise :func:`hessian_error` for fixed integer ``codes`` and zero points.

    Row ``r``'s dequantized weight is linear in its group scales, ``w_hat = U s`` with ``U[k, g(k)] = q_k - z``, so
    the best scales solve ``(U^T H U) s = U^T H w`` (a G x G system per row). A row keeps its old scales where the
    new ones are not all positive or (after float16 rounding for grouped grids) do not lower its error.
    """
    n, k = w.shape
    gs = k if grid.group_size is None else grid.group_size
    if grid.group_size == 0 or k % gs:
        return scale
    g = k // gs
    u = (codes.float() - zero.float().repeat_interleave(gs, dim=1)).reshape(n, g, gs)
    hb = h.reshape(g, gs, g, gs)
    a = torch.einsum("rgi,gihj,rhj->rgh", u, hb, u)
    b = (u * (w.float() @ h).reshape(n, g, gs)).sum(dim=-1)
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
    a = a + ridge[:, None, None] * torch.eye(g, device=w.device)
    new = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    new = _round_scale(new, grid)
    old_err = hessian_error(w, h, dequantize_codes(codes, scale, zero, grid))
    new_err = hessian_error(w, h, dequantize_codes(codes, new, zero, grid))
    ok = (new > 0).all(dim=1) & torch.isfinite(new).all(dim=1) & (new_err < old_err)
    return torch.where(ok[:, None], new, scale)


class GPTQ:
    """Per-layer GPTQ state: the float weight (N, K) and the Hessian of its inputs."""

    def __init__(self, weight: torch.Tensor, name: str = "layer", token_clip: float | None = None) -> None:
        self.weight = weight.detach().float().clone()
        self.name = name
        self.token_clip = token_clip
        k = self.weight.shape[1]
        self.h = torch.zeros(k, k, dtype=torch.float32, device=weight.device)
        self.n = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        """Accumulate the inputs (..., K) of one calibration batch."""
        self.h, self.n = accumulate_hessian(inp, self.h, self.n, self.token_clip)

    def _inverse_cholesky(self, h: torch.Tensor, percdamp: float) -> torch.Tensor:
        damp = percdamp * torch.mean(torch.diag(h))
        eye = torch.eye(h.shape[0], device=h.device)
        for attempt in range(6):
            try:
                chol = torch.linalg.cholesky(h + damp * (10**attempt) * eye)
                hinv = torch.cholesky_inverse(chol)
                return torch.linalg.cholesky(hinv, upper=True)
            except RuntimeError:
                log.warning("%s: Hessian not positive definite, raising damping", self.name)
        raise NumericsError(f"layer {self.name!r}: Hessian is not positive definite even with large damping")

    def quantize(
        self,
        grid: IntGrid,
        blocksize: int = 128,
        percdamp: float = 0.01,
        actorder: bool = False,
        mse: bool = False,
        refit: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return integer codes (N, K) in the original column order and ``scale``/``zero`` (N, n_groups).

        ``mse``: fit each group's clipping range by the reference's shrink search
        (:func:`~lmshrink.quantization.grid.compute_qparams_mse`) instead of plain min/max.
        ``refit``: rounds of :func:`refit_scales` (least-squares scales for the codes under the Hessian), each
        followed by a GPTQ pass with those scales held fixed; the codes/scales with the least Hessian-weighted
        error are returned.
        """
        codes, scale, zero = self._quantize_once(grid, blocksize, percdamp, actorder, mse, None)
        if refit <= 0:
            return codes, scale, zero
        w, h = self._problem()
        best = (codes, scale, zero)
        best_err = hessian_error(w, h, dequantize_codes(*best, grid)).sum()
        for _ in range(refit):
            refitted = (codes, refit_scales(w, h, codes, scale, zero, grid), zero)
            codes, scale, zero = self._quantize_once(grid, blocksize, percdamp, actorder, mse, refitted[1:])
            for candidate in (refitted, (codes, scale, zero)):
                err = hessian_error(w, h, dequantize_codes(*candidate, grid)).sum()
                if err < best_err:
                    best, best_err = candidate, err
        return best

    def _problem(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the weight and Hessian with dead inputs (never non-zero in calibration) made harmless: their
        Hessian diagonal set to 1 and their weight columns to 0."""
        w = self.weight.clone()
        h = self.h.clone()
        if not torch.isfinite(h).all():
            raise NumericsError(f"layer {self.name!r}: calibration activations contain NaN or Inf")
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        return w, h

    def _quantize_once(
        self,
        grid: IntGrid,
        blocksize: int,
        percdamp: float,
        actorder: bool,
        mse: bool,
        fixed: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One GPTQ pass; ``fixed``: use these ``scale``/``zero`` for every group instead of fitting them."""
        qparams = compute_qparams_mse if mse else compute_qparams
        w, h = self._problem()
        n_rows, k = w.shape
        gs = grid.group_size
        per_channel = IntGrid(grid.bits, grid.symmetric, None)
        # the group size when group scales are fitted as the loop reaches each group, else None
        dyn_gs = gs if not actorder and fixed is None else None
        if fixed is not None:
            scale, zero = fixed
        elif gs is None or actorder:  # per-channel, or static groups (computed before permuting)
            scale, zero = qparams(w, grid)
            scale = _round_scale(scale, grid)
        else:
            n_groups = k // gs
            scale = torch.empty(n_rows, n_groups, device=w.device)
            zero = torch.empty(n_rows, n_groups, device=w.device)
        perm = torch.arange(k, device=w.device)
        if actorder:
            perm = torch.argsort(torch.diag(h), descending=True)
            w, h = w[:, perm], h[perm][:, perm]
        hinv = self._inverse_cholesky(h, percdamp)
        codes = torch.zeros(n_rows, k, dtype=torch.int16, device=w.device)
        for i1 in range(0, k, blocksize):
            i2 = min(i1 + blocksize, k)
            w1 = w[:, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = int(perm[i1 + i])
                if dyn_gs is not None and col % dyn_gs == 0:  # fit the group on the updated weights
                    s, z = qparams(_group_cols(w, w1, err1, hinv, i1, i, dyn_gs), per_channel)
                    scale[:, col // dyn_gs], zero[:, col // dyn_gs] = (
                        _round_scale(s, grid).flatten(),
                        z.flatten(),
                    )
                g = 0 if gs is None else col // gs
                s_col, z_col = scale[:, g], zero[:, g]
                wcol = w1[:, i]
                q = torch.clamp(torch.round(wcol / s_col) + z_col, grid.qmin, grid.qmax)
                codes[:, i1 + i] = q.to(torch.int16)
                deq = (q - z_col) * s_col
                e = (wcol - deq) / hinv1[i, i]
                w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
                err1[:, i] = e
            w[:, i1:i2] = w1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        if actorder:
            codes = codes[:, torch.argsort(perm)]
        return codes, scale, zero


def _group_cols(
    w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i: int, gs: int
) -> torch.Tensor:
    """Columns ``[i1+i, i1+i+gs)`` of the working weight with every update so far applied.

    Inside the current block they are ``w1`` (updated column by column). A group that runs past the block's end
    also needs the block's pending (lazy) update of those later columns, ``-err1[:, :i] @ hinv[block, later]``:
    without it the group's scale would be fitted on weights that are not the ones then quantized.
    """
    inside = w1[:, i : i + gs]
    rest = gs - inside.shape[1]
    if rest == 0:
        return inside
    i2 = i1 + w1.shape[1]
    later = w[:, i2 : i2 + rest] - err1[:, :i] @ hinv[i1 : i1 + i, i2 : i2 + rest]
    return torch.cat([inside, later], dim=1)


def sequential_groups(
    block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput]
) -> list[BlockLayers]:
    """``block_layers`` split into groups in execution order; consecutive layers that read the same input tensor
    (q/k/v, gate/up) form one group. Found by running ``block`` once over ``inputs`` with pre-hooks; layers the
    block never calls form a last group."""
    first_input: dict[str, torch.Tensor] = {}  # insertion order = order of first call
    handles = []
    for _full, rel, mod in block_layers:

        def hook(_m: nn.Module, args: tuple[object, ...], rel: str = rel) -> None:
            if rel not in first_input and args and isinstance(args[0], torch.Tensor):
                first_input[rel] = args[0]

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    by_rel = {t[1]: t for t in block_layers}
    groups: list[BlockLayers] = []
    last: torch.Tensor | None = None
    for rel, x in first_input.items():
        if last is not None and x is last:
            groups[-1].append(by_rel[rel])
        else:
            groups.append([by_rel[rel]])
        last = x
    missing = [t for t in block_layers if t[1] not in first_input]
    return [*groups, missing] if missing else groups


def _add_batch(states: dict[str, GPTQ], rel: str, x: torch.Tensor) -> None:
    states[rel].add_batch(x)


def layer_hessians(
    block: nn.Module,
    block_layers: BlockLayers,
    inputs: list[BlockInput],
    true_sequential: bool,
    weights: dict[str, torch.Tensor] | None = None,
    token_clip: float | None = None,
) -> Iterator[tuple[BlockLayers, dict[str, GPTQ]]]:
    """Yield ``(group, states)``: each group of ``block_layers`` with one :class:`GPTQ` state per layer, its
    Hessian accumulated from ``inputs`` run through ``block`` as it is when the group is reached.

    With ``true_sequential`` the groups are those of :func:`sequential_groups` (layers reading one input tensor share
    one Hessian, fed once); the caller swaps a group's layers for quantized ones before asking for the next group,
    so later groups see the earlier ones quantized, and pops each state when done, so memory stays one group.
    Otherwise the whole block is one group fed once. ``weights`` (by relative name) replaces the layers' own
    float weights as the matrices to quantize.
    """
    groups = sequential_groups(block, block_layers, inputs[:1]) if true_sequential else [block_layers]
    for group in groups:
        states = {
            rel: GPTQ(weights[rel] if weights else linear_weight_and_bias(mod)[0], full, token_clip)
            for full, rel, mod in group
        }
        watched = group[:1] if true_sequential else group
        feed_inputs(block, {rel: mod for _, rel, mod in watched}, inputs, partial(_add_batch, states))
        first = states[watched[0][1]]
        for _full, rel, _mod in group[len(watched) :]:
            states[rel].h, states[rel].n = first.h, first.n
        yield group, states


def quantize_gptq(
    model: nn.Module,
    config: QuantConfig,
    layers: list[tuple[str, nn.Module]],
    calibration: Batches | None,
    *,
    token_clip: float | None = None,
) -> None:
    """Handler for ``method="gptq"``: block by block, Hessians from the block's calibration inputs.

    ``config.clip_search``: MSE-searched group clipping, see :meth:`GPTQ.quantize` (layers outside the blocks get
    RTN with the same search). ``token_clip`` (not a config field; for experiments): cap each calibration token's
    share of the Hessian, see :func:`clip_token_energy`.
    """
    assert calibration is not None  # checked by quantize_model
    spec = config.weight_spec()
    grid = IntGrid(spec.bits, spec.symmetric, spec.group_size)

    def process(_index: int, block: nn.Module, block_layers: BlockLayers, inputs: list[BlockInput]) -> None:
        hessians = layer_hessians(block, block_layers, inputs, config.true_sequential, token_clip=token_clip)
        for group, states in hessians:
            for _full, rel, mod in group:
                codes, scale, zero = states.pop(rel).quantize(
                    grid,
                    config.block_size,
                    config.damp,
                    config.act_order,
                    config.clip_search,
                    config.scale_refit,
                )
                bias = linear_weight_and_bias(mod)[1]
                q = QuantLinear.from_codes(codes, scale, zero, spec, bias, act=config.act_mode)
                set_submodule(block, rel, q.to(codes.device))

    outside = for_each_block(model, layers, calibration, process)
    if outside:
        from lmshrink.quantization.rtn import quantize_rtn

        log.warning(
            "%d layers outside the transformer blocks get RTN: %s", len(outside), [n for n, _ in outside]
        )
        quantize_rtn(model, config, outside)
