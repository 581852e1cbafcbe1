"""NaN/Inf detection names the layer: planted in weights, in activations, in losses and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.models import load_model, save_model
from lmshrink.utils.numerics import (
    check_finite_gradients,
    check_finite_loss,
    check_finite_weights,
    find_nonfinite_weights,
    locate_nonfinite_activation,
    watch_activations,
)


def _ids(vocab: int = 128, n: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------------- weights


def test_finite_models_pass(tiny_llama, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    for model in (tiny_llama, tiny_bert):
        assert check_finite_weights(model) >= sum(1 for _ in model.parameters())
        assert find_nonfinite_weights(model) == []


def test_planted_nan_in_weight_names_layer_and_counts(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, :3] = float("nan")
        tiny_llama.model.layers[1].mlp.down_proj.weight[2, 0] = float("inf")
        tiny_llama.lm_head.weight[5, 5] = -float("inf")
    with pytest.raises(NumericsError) as err:
        check_finite_weights(tiny_llama)
    msg = str(err.value)
    assert "'model.layers.1.mlp.down_proj.weight'" in msg
    assert "3 NaN and 1 Inf of 8192 values" in msg and "(64, 128)" in msg
    assert "2 tensors are affected" in msg and "lm_head.weight" in msg
    assert isinstance(err.value, LmshrinkError)
    bad = find_nonfinite_weights(tiny_llama)
    assert [(b.name, b.nan, b.inf) for b in bad] == [
        ("model.layers.1.mlp.down_proj.weight", 3, 1),
        ("lm_head.weight", 0, 1),
    ]


def test_planted_inf_in_bert_bias_and_buffer(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        tiny_bert.bert.encoder.layer[0].attention.self.query.bias[7] = float("inf")
    with pytest.raises(NumericsError, match=r"'bert\.encoder\.layer\.0\.attention\.self\.query\.bias'"):
        check_finite_weights(tiny_bert)
    tiny_bert.register_buffer("scale_buf", torch.tensor([1.0, float("nan")]))
    names = [b.name for b in find_nonfinite_weights(tiny_bert)]
    assert names[-1] == "scale_buf"
    assert "scale_buf" not in [b.name for b in find_nonfinite_weights(tiny_bert, include_buffers=False)]


def test_saved_and_reloaded_nan_weights_are_named(tiny_llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # load_model stays lazy (safetensors are memory-mapped; a full pass would read every page): callers that
    # need finite weights check them, naming the tensor
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.k_proj.weight[1, 1] = float("nan")
    model, _ = load_model(save_model(tiny_llama, tmp_path / "m"))
    with pytest.raises(NumericsError, match=r"model m has non-finite weights.*layers\.0\.self_attn\.k_proj"):
        check_finite_weights(model, what="model m")


# ---------------------------------------------------------------------------------------------- activations


def test_no_false_alarm_on_healthy_forward_with_padding(tiny_llama, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: masks hold large negative values, never a false alarm
    with watch_activations(tiny_llama):
        tiny_llama(input_ids=ids, attention_mask=mask)
    with watch_activations(tiny_bert):
        tiny_bert(input_ids=ids, attention_mask=mask)
    assert _hook_count(tiny_llama) == 0 and _hook_count(tiny_bert) == 0
    assert locate_nonfinite_activation(tiny_llama, input_ids=ids) is None


def test_nan_weight_is_traced_to_the_first_module_it_reaches(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.q_proj.weight[3, :] = float("nan")
    with pytest.raises(NumericsError) as err, watch_activations(tiny_llama):
        tiny_llama(input_ids=_ids())
    msg = str(err.value)
    assert "module 'model.layers.1.self_attn.q_proj' (Linear)" in msg
    assert "inputs were finite" in msg and "NaN" in msg
    assert _hook_count(tiny_llama) == 0  # removed even though the forward raised


def test_planted_activation_nan_is_named(tiny_llama, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    def poison(module, args, output):  # type: ignore[no-untyped-def]
        output = output.clone()
        output[..., 0] = float("inf")
        return output

    handle = tiny_llama.model.layers[0].mlp.act_fn.register_forward_hook(poison)
    with (
        pytest.raises(NumericsError, match=r"module 'model\.layers\.0\.mlp\.act_fn' \(SiLU.*Inf"),
        watch_activations(tiny_llama),
    ):
        tiny_llama(input_ids=_ids())
    handle.remove()

    handle = tiny_bert.bert.encoder.layer[1].intermediate.register_forward_hook(poison)
    message = locate_nonfinite_activation(tiny_bert, input_ids=_ids())
    assert message is not None and "'bert.encoder.layer.1.intermediate' (BertIntermediate)" in message
    # the same fault, with the culprit skipped: the next module names that its input was already bad
    with pytest.raises(NumericsError, match=r"layer\.1\.output\.dense.*args\[0\] was already non-finite"):  # noqa: SIM117
        with watch_activations(tiny_bert, skip=[r"intermediate$"]):
            tiny_bert(input_ids=_ids())
    handle.remove()


def test_watch_selected_modules_only(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with (
        pytest.raises(NumericsError, match=r"'model\.layers\.0'"),
        watch_activations(tiny_llama, ["model.layers.0"]),
    ):
        tiny_llama(input_ids=_ids())


# ---------------------------------------------------------------------------------------------- losses, gradients


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_loss(bad: float) -> None:
    assert check_finite_loss(torch.tensor(2.25), step=1) == 2.25
    assert check_finite_loss(0.5) == 0.5
    with pytest.raises(NumericsError, match=r"loss became (nan|inf|-inf) at step 17"):
        check_finite_loss(torch.tensor(bad), step=17)
    with pytest.raises(NumericsError, match="distillation loss became"):
        check_finite_loss(bad, what="distillation loss")
    with pytest.raises(NumericsError):
        check_finite_loss(torch.tensor([1.0, bad]), step=2)


def test_check_finite_gradients_names_parameter(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    tiny_llama.train()
    ids = _ids()
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    check_finite_gradients(tiny_llama, step=1)
    tiny_llama.model.layers[1].post_attention_layernorm.weight.grad[0] = float("nan")  # type: ignore[index]
    with pytest.raises(NumericsError, match=r"layers\.1\.post_attention_layernorm\.weight.*1 NaN.*at step 4"):
        check_finite_gradients(tiny_llama, step=4)
