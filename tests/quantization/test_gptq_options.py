"""GPTQ's experimental options: MSE-searched group clipping, the per-token Hessian energy cap and least-squares
scale refits."""

from __future__ import annotations

import pytest
import torch

from lmshrink.quantization.gptq import (
    GPTQ,
    accumulate_hessian,
    clip_token_energy,
    hessian_error,
    refit_scales,
)
from lmshrink.quantization.grid import (
    IntGrid,
    compute_qparams,
    compute_qparams_mse,
    dequantize_codes,
    quantize_codes,
)


def _sq_err(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: IntGrid) -> torch.Tensor:
    deq = dequantize_codes(quantize_codes(w, scale, zero, grid), scale, zero, grid)
    return (deq - w).pow(2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, None, 0])
def test_mse_qparams_never_worse_than_minmax(symmetric: bool, group: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 64, generator=g) * torch.rand(12, 1, generator=g)
    w[3, 7] = 9.0  # an outlier: clipping it is where the search pays
    grid = IntGrid(4, symmetric, group)
    s0, z0 = compute_qparams(w, grid)
    s1, z1 = compute_qparams_mse(w, grid, norm=2.0)
    assert s1.shape == s0.shape and z1.shape == z0.shape
    if group:  # both quantize against float16-stored scales
        s0 = s0.half().float()
    e0, e1 = _sq_err(w, s0, z0, grid).sum(), _sq_err(w, s1, z1, grid).sum()
    assert e1 <= e0 * (1 + 1e-6)
    assert e1 < 0.98 * e0  # and it clips somewhere on Gaussian weights
    assert (s1 <= s0 * (1 + 1e-3)).all()  # the search only shrinks the range


def test_gptq_mse_codes_on_grid_and_layer_error_not_worse() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) @ (torch.randn(64, 64, generator=g) / 8)
    grid = IntGrid(4, True, 16)
    errs = {}
    for mse in (False, True):
        q = GPTQ(w)
        q.add_batch(x)
        codes, scale, zero = q.quantize(grid, blocksize=32, actorder=False, mse=mse)
        assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
        deq = dequantize_codes(codes, scale, zero, grid)
        errs[mse] = float((x @ (w - deq).t()).pow(2).mean())
    assert errs[True] < 1.05 * errs[False]


def test_clip_token_energy_caps_only_outlier_rows() -> None:
    x = torch.ones(10, 4)
    x[0] *= 100.0  # an attention-sink-like row: 10^4 times the median energy
    y = clip_token_energy(x, 10.0)
    e = y.pow(2).sum(-1)
    assert torch.allclose(e[0], 10.0 * e[1:].median())
    assert torch.equal(y[1:], x[1:])
    assert torch.allclose(y[0] / y[0].norm(), x[0] / x[0].norm())  # direction kept


def test_token_clip_none_is_the_plain_hessian_and_clip_limits_a_sink() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 8, generator=g)
    x[0] = 1000.0 * torch.randn(8, generator=g)
    h0, n0 = accumulate_hessian(x, torch.zeros(8, 8), 0)
    h1, n1 = accumulate_hessian(x, torch.zeros(8, 8), 0, token_clip=None)
    assert torch.equal(h0, h1) and n0 == n1 == 256
    sink0 = 2 * x[0].pow(2).sum() / 256
    assert torch.trace(h0) > 0.99 * sink0  # the plain Hessian is the sink token
    h2, _ = accumulate_hessian(x, torch.zeros(8, 8), 0, token_clip=10.0)
    assert torch.trace(h2) < 0.2 * torch.trace(h0)


def test_token_clip_helps_ordinary_tokens_when_a_sink_dominates() -> None:
    """With one huge token in the calibration rows, capping its share makes GPTQ fit the ordinary tokens."""
    g = torch.Generator().manual_seed(3)
    k = 64
    mix = torch.randn(k, k, generator=g) / k**0.5
    ordinary = torch.randn(4096, k, generator=g) @ mix
    sink = 300.0 * torch.randn(4, k, generator=g)
    x = torch.cat([sink, ordinary[:2048]])
    held_out = ordinary[2048:]
    w = torch.randn(48, k, generator=g)
    grid = IntGrid(4, True, 16)
    errs = {}
    for clip in (None, 10.0):
        q = GPTQ(w, token_clip=clip)
        q.add_batch(x)
        codes, scale, zero = q.quantize(grid, actorder=True)
        deq = dequantize_codes(codes, scale, zero, grid)
        errs[clip] = float((held_out @ (w - deq).t()).pow(2).mean())
    assert errs[10.0] < errs[None]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, None])
def test_refit_scales_recovers_the_scales_that_made_the_weight(symmetric: bool, group: int | None) -> None:
    """A weight that is exactly codes x scales: from the codes and deliberately wrong scales, the refit finds the
    true ones (to float16 storage for groups), whatever the Hessian."""
    g = torch.Generator().manual_seed(1)
    grid = IntGrid(4, symmetric, group)
    codes = torch.randint(grid.qmin, grid.qmax + 1, (6, 64), generator=g, dtype=torch.int16)
    n_groups = 1 if group is None else 64 // group
    true_s = (torch.rand(6, n_groups, generator=g) + 0.5).half().float()
    zero = torch.zeros(6, n_groups) if symmetric else torch.randint(6, 10, (6, n_groups), generator=g).float()
    w = dequantize_codes(codes, true_s, zero, grid)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    h, _ = accumulate_hessian(x, torch.zeros(64, 64), 0)
    new = refit_scales(w, h, codes, true_s * 1.3, zero, grid)
    torch.testing.assert_close(new, true_s, rtol=1e-3, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_refit_lowers_the_calibration_error_and_keeps_codes_on_grid(symmetric: bool) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(1024, 128, generator=g) * torch.linspace(0.2, 4.0, 128)
    grid = IntGrid(4, symmetric, 32)
    q = GPTQ(w)
    q.add_batch(x)
    errs = []
    for rounds in (0, 2):
        codes, scale, zero = q.quantize(grid, blocksize=32, actorder=True, refit=rounds)
        assert int(codes.min()) >= grid.qmin and int(codes.max()) <= grid.qmax
        assert torch.equal(scale, scale.half().float())  # grouped scales as stored (float16)
        errs.append(float(hessian_error(w, q.h, dequantize_codes(codes, scale, zero, grid)).sum()))
    assert errs[1] < 0.99 * errs[0]


# --------------------------------------------------------------------------- QuantConfig.clip_search


def test_clip_search_is_for_rtn_gptq_and_awq_integer_grids_only() -> None:
    from lmshrink.errors import LmshrinkError
    from lmshrink.quantization.config import QuantConfig

    assert QuantConfig(method="gptq", format="int4", group_size=64, clip_search=True).clip_search
    assert not QuantConfig(method="gptq", format="int4").clip_search  # off by default
    assert QuantConfig(method="awq", format="int4", clip_search=True).clip_search
    for bad in ({"method": "smoothquant"}, {"method": "rtn", "format": "nf4"}, {"method": "llm-int8"}):
        with pytest.raises(LmshrinkError, match="clip_search applies to methods 'rtn', 'gptq' and 'awq'"):
            QuantConfig(**bad, clip_search=True)


@pytest.mark.parametrize("fmt", ["int4", "int4-asym", "int3"])
def test_rtn_clip_search_uses_the_searched_range_and_lowers_the_weight_error(fmt: str) -> None:
    from lmshrink.quantization.config import QuantConfig
    from lmshrink.quantization.rtn import quantize_layer

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g))
        lin.weight[5, 9] = 6.0
    plain = quantize_layer(lin, QuantConfig(format=fmt, group_size=16))
    searched = quantize_layer(lin, QuantConfig(format=fmt, group_size=16, clip_search=True))
    cfg = QuantConfig(format=fmt, group_size=16)
    spec = cfg.weight_spec()
    grid = IntGrid(spec.bits, spec.symmetric, 16)
    scale, zero = compute_qparams_mse(lin.weight.detach(), grid)
    expected = dequantize_codes(quantize_codes(lin.weight.detach(), scale, zero, grid), scale, zero, grid)
    w_plain, w_searched = plain.dequantize_weight(), searched.dequantize_weight()
    torch.testing.assert_close(w_searched, expected, rtol=0, atol=1e-6)
    err = {k: (v - lin.weight.detach()).abs().pow(2.4).sum() for k, v in (("p", w_plain), ("s", w_searched))}
    assert err["s"] < 0.95 * err["p"]
    x = torch.randn(8, 64, generator=g)  # the layer computes with the searched weight
    torch.testing.assert_close(searched(x), x @ expected.t() + lin.bias.detach(), rtol=1e-4, atol=1e-4)


def test_gptq_clip_search_reaches_the_layer_search(monkeypatch: pytest.MonkeyPatch, make_tiny_llama) -> None:
    from lmshrink.quantization import quantize_model
    from lmshrink.quantization.config import QuantConfig

    seen: list[bool] = []
    original = GPTQ.quantize

    def spy(
        self: GPTQ, grid: IntGrid, blocksize: int, percdamp: float, actorder: bool, mse: bool, refit: int
    ):
        seen.append(mse)
        return original(self, grid, blocksize, percdamp, actorder, mse, refit)

    monkeypatch.setattr(GPTQ, "quantize", spy)
    for flag in (False, True):
        model = make_tiny_llama()
        batches = [{"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))}]
        cfg = QuantConfig(method="gptq", format="int4", group_size=32, clip_search=flag, scale_refit=0)
        quantize_model(model, cfg, batches)
        assert seen and set(seen) == {flag}
        seen.clear()
