import copy

import pytest
import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.quantization.formats import get_format
from lmshrink.quantization.qat import (
    QATLinear,
    fake_quantize_activations,
    fake_quantize_ste,
    prepare_qat,
    strip_qat,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a shared machine, thread synchronisation costs more than it saves. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-asym", "nf4", "fp8", "1bit-scaled", "1.58bit"])
def test_ste_gradient_is_identity(fmt):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    upstream = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    out = fake_quantize_ste(w, fmt)
    assert torch.equal(out.detach(), get_format(fmt).fake_quantize(w.detach()))
    (out * upstream).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, upstream)  # straight through, also where 1.58bit clips


def test_activation_fake_quant_per_token():
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    xq = fake_quantize_activations(x, 8)
    scale = 127 / x.detach().abs().amax(dim=-1, keepdim=True)
    assert torch.allclose(xq * scale, torch.round(xq * scale), atol=1e-3)  # on each token's int8 grid
    assert (xq - x).abs().max().item() <= (0.5 / scale).max().item() + 1e-6
    xq.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))


def test_prepare_and_strip_tiny_llama(tiny_llama):
    names = [n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)]
    state_keys = set(tiny_llama.state_dict())
    prepare_qat(tiny_llama, "int4", group_size=32)
    wrapped = [n for n, m in tiny_llama.named_modules() if isinstance(m, QATLinear)]
    assert len(wrapped) == 14 and "lm_head" not in wrapped  # 2 blocks x 7 projections; lm_head skipped
    assert set(tiny_llama.state_dict()) == state_keys  # parameter names unchanged
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = tiny_llama(input_ids=ids, labels=ids).loss
    loss.backward()
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fq_logits = tiny_llama(input_ids=ids).logits
    strip_qat(tiny_llama)
    assert [n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)] == names
    assert not any(isinstance(m, QATLinear) for m in tiny_llama.modules())
    with torch.no_grad():
        assert torch.allclose(tiny_llama(input_ids=ids).logits, fq_logits, atol=1e-5)
    # round trip: RTN with the same format reproduces the stripped weights exactly
    fmt = get_format("int4")
    for _, module in tiny_llama.named_modules():
        if module is q_proj:
            assert torch.equal(fmt.fake_quantize(module.weight, 32), module.weight)


@pytest.mark.parametrize(
    ("fmt", "group_size"), [("int4-asym", 16), ("int2-asym", -1), ("nf4", 16), ("fp8", None)]
)
def test_strip_round_trip_exact(fmt, group_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    strip_qat(prepare_qat(model, fmt, group_size=group_size))
    f = get_format(fmt)
    for layer in (model[0], model[2]):
        assert isinstance(layer, nn.Linear)
        assert torch.equal(f.fake_quantize(layer.weight, group_size), layer.weight)


def test_strip_158bit_keeps_codes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    before = get_format("1.58bit").encode(model[0].weight)["codes"]
    strip_qat(prepare_qat(model, "1.58bit", act_bits=8))
    assert torch.equal(get_format("1.58bit").encode(model[0].weight)["codes"], before)


def test_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 32))  # GPT-2 style: weight (in=32, out=24)
    x = torch.randn(5, 32)
    prepare_qat(model, "int4", targets=(r"0",), skip=())
    y = model(x)
    ref = x @ get_format("int4").fake_quantize(model[0].weight.t()).t() + model[0].bias
    assert torch.allclose(y, ref, atol=1e-5)
    strip_qat(model)
    assert type(model[0]).__name__ == "Conv1D"


def test_errors():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(LmshrinkError, match="no linear layer"):
        prepare_qat(model, "int4", targets=(r"nothing",))
    with pytest.raises(LmshrinkError, match="unknown weight format"):
        prepare_qat(model, "int9")
    with pytest.raises(LmshrinkError, match="does not divide"):
        prepare_qat(model, "int4", group_size=3)
    with pytest.raises(LmshrinkError, match="no QAT layers"):
        strip_qat(nn.Sequential(nn.Linear(8, 8)))


# -- QAT beats post-training quantization -------------------------------------------------------------------

_D, _H, _STEPS = 32, 64, 100


def _task() -> tuple[torch.Tensor, torch.Tensor]:
    """Regression whose input features span 3 decades: the float solution has weights of very different sizes,
    which round-to-nearest at low precision handles badly and QAT learns to live with."""
    g = torch.Generator().manual_seed(0)
    feature_scale = torch.logspace(-1.5, 1.5, _D)
    x = torch.randn(512, _D, generator=g) * feature_scale
    w = torch.randn(_D, 8, generator=g) / feature_scale[:, None]
    return x, torch.tanh(x @ w / 4)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(_D, _H), nn.ReLU(), nn.Linear(_H, 8))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, _STEPS)
    for _ in range(_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), y).item()


@pytest.fixture(scope="module")
def float_trained() -> nn.Module:
    x, y = _task()
    return _train(_mlp(), x, y)


# measured (seed 0, 100 steps): float 0.140; int4 per-channel PTQ 0.261 vs QAT 0.197 (ratio 1.33);
# 1.58bit PTQ 0.667 vs QAT 0.303 (2.2); ratios over seeds 0-2: int4 >= 1.31, 1.58bit >= 1.75
@pytest.mark.parametrize(("fmt", "group_size", "act_bits", "max_ratio"), [
    ("int4", -1, None, 0.85),
    ("1.58bit", None, None, 0.6),
    ("1.58bit", None, 8, 0.6),
])  # fmt: skip
def test_qat_beats_ptq(fmt, group_size, act_bits, max_ratio, float_trained):
    x, y = _task()
    ptq = copy.deepcopy(float_trained)
    with torch.no_grad():
        for layer in (ptq[0], ptq[2]):
            layer.weight.copy_(get_format(fmt).fake_quantize(layer.weight, group_size))
    ptq_loss = _loss(ptq, x, y)
    qat = _train(
        prepare_qat(_mlp(), fmt, targets=(r".*",), skip=(), group_size=group_size, act_bits=act_bits), x, y
    )
    qat_loss = _loss(strip_qat(qat), x, y)
    assert qat_loss < max_ratio * ptq_loss, (qat_loss, ptq_loss)
    assert _loss(float_trained, x, y) < qat_loss  # quantization still costs something
