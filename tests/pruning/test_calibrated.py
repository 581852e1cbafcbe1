import copy

import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import select_linears
from lmshrink.pruning import prune_model
from lmshrink.pruning.magnitude import magnitude_mask
from lmshrink.pruning.semistructured import follows_nm, to_semi_structured
from lmshrink.pruning.sparsegpt import Hessian, accumulate_hessian, reconstruction_error, sparsegpt_prune
from lmshrink.pruning.wanda import InputNorm, wanda_mask


def _outlier_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d) + torch.randn(d, d, generator=g) / 8  # correlated features, as in real hidden states
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 25.0  # a few outlier channels, as in LLM activations
    return x


def _out_err(x, w, w2):
    return float(((x @ w.T - x @ w2.T) ** 2).mean())


def test_layer_reconstruction_wanda_and_sparsegpt_beat_magnitude():
    x = _outlier_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    norm, hess = InputNorm(64), Hessian(64)
    norm.add(x)
    hess.add(x)
    err_mag = _out_err(x, w, w * magnitude_mask(w, 0.5, "row"))
    err_wanda = _out_err(x, w, w * wanda_mask(w, norm.sq, 0.5))
    w_sgpt, keep = sparsegpt_prune(w, hess.H, 0.5, blocksize=16)
    err_sgpt = _out_err(x, w, w_sgpt)
    assert int((~keep).sum()) == 32 * 32 and (w_sgpt[~keep] == 0).all()
    assert err_wanda < 0.1 * err_mag  # measured ~0.03
    assert err_sgpt < 0.85 * err_wanda  # measured ~0.7
    # the Hessian-based error formula matches the measured output error
    assert reconstruction_error(w, w_sgpt, hess.H) == pytest.approx(err_sgpt, rel=1e-3)


def test_accumulate_hessian_matches_batch():
    x = torch.randn(100, 8)
    H, n = accumulate_hessian(x[:30], torch.zeros(8, 8), 0)
    H, n = accumulate_hessian(x[30:], H, n)
    torch.testing.assert_close(H, x.T @ x / 100, rtol=1e-5, atol=1e-5)
    assert n == 100


def _plant_outliers(model):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
            layer.post_attention_layernorm.weight[:3] = 20.0
    return model


def _calib(n=8, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (1, seq), generator=g)} for _ in range(n)]


def test_calibrated_methods_beat_magnitude_on_tiny_llama(tiny_llama):
    model = _plant_outliers(tiny_llama)
    calib, held_out = _calib(8, seed=0), _calib(4, seed=1)
    with torch.no_grad():
        ref = [model(**b).logits for b in held_out]
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(model)
        report = prune_model(m, {"method": method, "sparsity": 0.5}, calib, progress=False)
        assert report.sparsity == pytest.approx(0.5, abs=1e-3)
        with torch.no_grad():
            errors[method] = sum(
                float(((m(**b).logits - r) ** 2).mean()) for b, r in zip(held_out, ref, strict=True)
            )
    assert errors["wanda"] < 0.7 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_two_four_pattern_holds(tiny_llama, score):
    report = prune_model(
        tiny_llama, {"method": "nm", "nm": "2:4", "nm_score": score}, _calib(4), progress=False
    )
    assert report.sparsity == pytest.approx(0.5)
    for name, mod in select_linears(tiny_llama):
        w = mod.weight.detach()
        assert follows_nm(w, 2, 4), name
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), name
    assert tiny_llama.lmshrink_format == "sparse"


def test_wanda_with_nm_option(tiny_llama):
    prune_model(tiny_llama, {"method": "wanda", "nm": "4:8"}, _calib(2), progress=False)
    for _, mod in select_linears(tiny_llama):
        assert follows_nm(mod.weight.detach(), 4, 8)


def test_nm_not_dividing_is_an_error(tiny_llama):
    with pytest.raises(LmshrinkError, match="multiple of 7"):
        prune_model(tiny_llama, {"method": "nm", "nm": "3:7", "nm_score": "magnitude"})
    with pytest.raises(LmshrinkError, match="multiple of 7"):
        sparsegpt_prune(torch.randn(4, 64), torch.eye(64), 0.5, nm=(3, 7))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "heads", "neurons", "layers"])
@pytest.mark.parametrize("calibration", [None, []])
def test_missing_calibration_is_an_error(tiny_llama, method, calibration):
    with pytest.raises(LmshrinkError, match="calibration"):
        prune_model(tiny_llama, {"method": method, "sparsity": 0.2}, calibration)


def test_report_records_layers(tiny_llama):
    report = prune_model(tiny_llama, {"method": "sparsegpt", "sparsity": 0.4}, _calib(4), progress=False)
    assert len(report.layers) == 14
    assert all(r.error is not None and r.error >= 0 for r in report.layers)
    assert all(abs(r.sparsity - 0.4) < 0.01 for r in report.layers)
    assert '"sparsity"' in report.to_json() and report.provenance["versions"]


def test_semi_structured_needs_cuda_on_cpu(tiny_llama):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(LmshrinkError, match="CUDA"):
        to_semi_structured(tiny_llama)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse tensors need CUDA")
def test_semi_structured_gpu_matches_dense():
    lin = torch.nn.Linear(256, 256).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, 0.5, nm=(2, 4)).half())
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    ref = lin(x)
    model = torch.nn.Sequential(lin)
    assert to_semi_structured(model) == ["0"]
    torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_calibrated_nm_not_dividing_is_an_error(tiny_llama, score):
    # 64 input features are not a multiple of 6: a clear error naming the pattern, before anything changes
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(LmshrinkError, match="multiple of 6"):
        prune_model(tiny_llama, {"method": "nm", "nm": "3:6", "nm_score": score}, _calib(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
