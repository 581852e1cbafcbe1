"""GPTQ beats RTN on layer output error; the Hessian accumulation is the plain mean of 2 x x^T."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from lmshrink.models.arch import find_layers
from lmshrink.models.layerwise import capture_block_inputs, run_block
from lmshrink.quantization import quantize_model
from lmshrink.quantization.gptq import GPTQ, accumulate_hessian
from lmshrink.quantization.grid import IntGrid, dequantize_codes, fake_quantize


def test_accumulate_hessian_is_running_mean() -> None:
    x1, x2 = torch.randn(10, 6), torch.randn(3, 5, 6)
    h, n = accumulate_hessian(x1, torch.zeros(6, 6), 0)
    h, n = accumulate_hessian(x2, h, n)
    allx = torch.cat([x1, x2.reshape(-1, 6)])
    assert n == 25
    torch.testing.assert_close(h, 2 * allx.t() @ allx / 25)


def _correlated(k: int = 128, rows: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(rows, k, generator=g) @ mix + 0.05 * torch.randn(rows, k, generator=g)
    x[:, :3] *= 8  # a few loud channels: act-order matters
    return x


@pytest.mark.parametrize(("group", "act_order"), [(None, False), (32, False), (32, True), (None, True)])
def test_gptq_beats_rtn_on_layer_output(group: int | None, act_order: bool) -> None:
    x = _correlated()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    grid = IntGrid(4, True, group)
    gptq = GPTQ(w)
    gptq.add_batch(x)
    codes, scale, zero = gptq.quantize(grid, blocksize=32, actorder=act_order)
    assert scale.shape == (64, 1 if group is None else 4)
    err_gptq = (x @ dequantize_codes(codes, scale, zero, grid).t() - x @ w.t()).pow(2).mean()
    err_rtn = (x @ fake_quantize(w, grid).t() - x @ w.t()).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn


def _block0_error_fn(model: torch.nn.Module, seed: int) -> Callable[[dict], float]:
    """``f(config)``: squared error of block 0's outputs after ``quantize_model(model, config)`` on 4 random batches."""
    g = torch.Generator().manual_seed(seed)
    calib = [{"input_ids": torch.randint(0, 128, (1, 64), generator=g)} for _ in range(4)]
    inputs = capture_block_inputs(model, calib)
    ref = run_block(find_layers(model)[1][0], inputs)

    def block0_error(cfg: dict) -> float:
        m = quantize_model(copy.deepcopy(model), cfg, calib)
        out = run_block(find_layers(m)[1][0], inputs)
        return sum(float((o - r).pow(2).mean()) for o, r in zip(out, ref, strict=True))

    return block0_error


def test_gptq_model_blocks_closer_than_rtn(tiny_llama) -> None:
    block0_error = _block0_error_fn(tiny_llama, seed=0)
    rtn = block0_error({"format": "int3", "group_size": 32})
    gptq = block0_error({"method": "gptq", "format": "int3", "group_size": 32})
    assert gptq < 0.8 * rtn


def test_sequential_groups_follow_execution_order(tiny_llama) -> None:
    from lmshrink.models.arch import select_linears
    from lmshrink.quantization.gptq import sequential_groups

    calib = [{"input_ids": torch.arange(16).unsqueeze(0)}]
    inputs = capture_block_inputs(tiny_llama, calib)
    block = find_layers(tiny_llama)[1][0]
    layers = [(n, n.split("layers.0.", 1)[1], m) for n, m in select_linears(tiny_llama) if ".layers.0." in n]
    groups = sequential_groups(block, layers[::-1], inputs)  # the given order must not matter
    names = [sorted(rel.rsplit(".", 1)[1] for _, rel, _ in g) for g in groups]
    assert names == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_true_sequential_gptq_at_least_as_close_on_the_block(tiny_llama) -> None:
    block0_error = _block0_error_fn(tiny_llama, seed=1)
    cfg = {"method": "gptq", "format": "int3", "group_size": 32}
    together = block0_error({**cfg, "true_sequential": False})
    sequential = block0_error({**cfg, "true_sequential": True})
    assert sequential != together  # the option changes the Hessians
    assert sequential < 1.05 * together
