"""quantize_model: one entry point, a registry, validation before any change."""

from __future__ import annotations

import copy

import pytest
import torch

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.quantization import QuantConfig, quantize_model
from lmshrink.quantization.api import METHOD_HANDLERS, get_handler
from lmshrink.quantization.config import METHODS
from lmshrink.quantization.linear import QuantLinear


def _calib(n: int = 4, length: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (1, length), generator=g)} for _ in range(n)]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_method_has_a_handler() -> None:
    assert set(METHOD_HANDLERS) == set(METHODS)
    for m in METHODS:
        assert callable(get_handler(m))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "bogus"}, "unknown method"),
        ({"format": "int12"}, "bits must be in 2..8"),
        ({"format": "int1"}, "bits must be in 2..8"),
        ({"format": "float3"}, "unknown format"),
        ({"group_size": 0}, "group_size"),
        ({"typo_field": 1}, "typo_field"),
        ({"method": "smoothquant", "format": "int4"}, "needs format 'int8'"),
        ({"method": "gptq", "format": "nf4"}, "integer format"),
        ({"targets": ["("]}, "invalid regex"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(LmshrinkError, match=match):
        QuantConfig(**kwargs)


def test_rtn_swaps_selected_layers_and_marks_model(tiny_llama) -> None:
    m = quantize_model(tiny_llama, QuantConfig(format="int4", group_size=32))
    quant = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(quant) == 2 * 7
    assert not isinstance(m.lm_head, QuantLinear)  # skipped by default
    assert m.lmshrink_format == "quantized"
    assert m.lmshrink_quant_config["format"] == "int4"


def test_targets_select_a_subset(tiny_llama) -> None:
    m = quantize_model(tiny_llama, {"format": "int8", "targets": [r"mlp\.down_proj$"]})
    assert sum(isinstance(mod, QuantLinear) for mod in m.modules()) == 2


def test_gpt2_conv1d_layers_are_quantized() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    ids = torch.randint(0, 100, (1, 16))
    ref = m(ids).logits
    quantize_model(m, QuantConfig(format="int8"))
    assert sum(isinstance(mod, QuantLinear) for mod in m.modules()) == 8
    assert ((m(ids).logits - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize(
    ("config", "calibration", "error", "match"),
    [
        ({"format": "int4", "group_size": 48}, None, LmshrinkError, "does not divide"),
        ({"targets": ["nothing_matches"]}, None, LmshrinkError, "no linear layers"),
        ({"method": "gptq", "format": "int4"}, None, LmshrinkError, "calibration"),
        ({"method": "awq", "format": "int4"}, [], LmshrinkError, "calibration"),
    ],
)
def test_bad_inputs_leave_model_untouched(tiny_llama, config, calibration, error, match) -> None:
    before = _state(tiny_llama)
    with pytest.raises(error, match=match):
        quantize_model(tiny_llama, config, calibration)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(tiny_llama, "lmshrink_format")


def test_nan_weight_is_a_numerics_error_naming_the_layer(tiny_llama) -> None:
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = _state(tiny_llama)
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_model(tiny_llama, {"format": "int8"})
    assert all(
        torch.equal(before[k], v) or (torch.isnan(before[k]).any() and torch.isnan(v).any())
        for k, v in tiny_llama.state_dict().items()
    )


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant", "llm-int8"])
def test_calibrated_methods_run_on_tiny_llama(tiny_llama, method: str) -> None:
    fmt = "int8" if method in ("smoothquant", "llm-int8") else "int4"
    ids = torch.randint(0, 128, (1, 24))
    ref = tiny_llama(ids).logits
    q = quantize_model(copy.deepcopy(tiny_llama), {"method": method, "format": fmt, "grid": 5}, _calib(2))
    assert sum(isinstance(mod, QuantLinear) for mod in q.modules()) == 14
    out = q(ids).logits
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()) < (0.05 if fmt == "int8" else 0.3)


def test_feed_inputs_stops_each_forward_once_every_watched_input_is_seen(tiny_llama) -> None:
    """Watching q/k/v only, the block's MLP never runs, and the inputs reported are exactly those a full pass
    hands to q_proj."""
    from lmshrink.models.layerwise import capture_block_inputs
    from lmshrink.quantization.api import feed_inputs

    block = tiny_llama.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    inputs = capture_block_inputs(
        tiny_llama, [{"input_ids": torch.randint(0, 128, (1, 16), generator=gen)}] * 2
    )
    full: list[torch.Tensor] = []
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: full.append(a[0].reshape(-1, 64)))
    mlp_calls: list[int] = []
    mlp = block.mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))
    with torch.no_grad():
        for inp in inputs:
            block(*inp.args, **inp.kwargs)
    handle.remove()
    assert len(mlp_calls) == 2
    got: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": []}
    attn = block.self_attn
    watched = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}
    feed_inputs(block, watched, inputs, lambda name, x: got[name].append(x))
    mlp.remove()
    assert len(mlp_calls) == 2  # stopped before the MLP both times
    assert all(len(v) == 2 for v in got.values())
    for a, b in zip(got["q"], full, strict=True):
        assert torch.equal(a, b)
