"""Sensitivity analysis and mixed-precision plans on tiny models."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.sensitivity import (
    kl_from_reference,
    make_plan,
    measure_sensitivity,
    perturb_weight,
    plan_damage,
    plan_from_json,
    plan_to_json,
    uniform_plan,
)


@pytest.fixture()
def hetero_llama(tiny_llama: Any) -> Any:
    """tiny_llama with one layer made much more sensitive (outlier weights), as in real models."""
    with torch.no_grad():
        w = tiny_llama.model.layers[0].mlp.down_proj.weight
        w[:, :4] *= 30.0
        tiny_llama.model.layers[1].self_attn.v_proj.weight.mul_(4.0)
    return tiny_llama


def test_replayed_blocks_give_the_same_damage_as_a_full_forward(tiny_llama: Any) -> None:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    sens = measure_sensitivity(tiny_llama, ids, choices=(2,), targets=[r"layers\.1\.mlp\.down_proj$"])
    (layer,) = sens.layers
    mod = tiny_llama.model.layers[1].mlp.down_proj
    with torch.no_grad():
        ref = torch.log_softmax(tiny_llama(input_ids=ids).logits, -1)
        orig = mod.weight.data.clone()
        mod.weight.data = perturb_weight(orig, "quantize", 2)
        full = kl_from_reference(ref, tiny_llama(input_ids=ids).logits)
        mod.weight.data = orig
    assert layer.costs["2"] == pytest.approx(full, rel=1e-4, abs=1e-9)
    assert layer.block == 1 and layer.params == 64 * 128


def test_plan_meets_target_and_beats_uniform_measured(hetero_llama: Any) -> None:
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (4, 32), generator=gen)
    held_out = torch.randint(0, 128, (4, 32), generator=gen)
    sens = measure_sensitivity(hetero_llama, calib, choices=(2, 3, 4, 8))
    assert len(sens.layers) == 14
    # damage falls with more bits, for every layer
    for layer in sens.layers:
        assert layer.costs["2"] >= layer.costs["4"] - 1e-7 and layer.costs["4"] >= layer.costs["8"] - 1e-7
    for target in (3.5, 4.0):
        plan = make_plan(sens, target)
        assert plan.average <= target + 1e-6
        assert plan.average >= target - 0.5  # the budget is used, not wasted
        assert set(plan.layers.values()) <= {2.0, 3.0, 4.0, 8.0}
    plan = make_plan(sens, 4.0)
    assert plan.predicted < plan.uniform["4"]
    mixed = plan_damage(hetero_llama, plan, held_out)
    uniform = plan_damage(hetero_llama, uniform_plan(sens, 4), held_out)
    assert mixed["kl_mean"] < 0.8 * uniform["kl_mean"], (mixed, uniform)
    # the most sensitive layer gets more bits than the least sensitive one
    assert plan.layers["model.layers.0.mlp.down_proj"] >= plan.layers["model.layers.0.self_attn.q_proj"]
    again = plan_from_json(plan_to_json(sens, plan))
    assert again == plan


def test_prune_mode_plan_meets_average_sparsity(tiny_llama: Any) -> None:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    sens = measure_sensitivity(tiny_llama, ids, mode="prune", choices=(0.0, 0.25, 0.5, 0.75))
    plan = make_plan(sens, 0.5)
    assert plan.average >= 0.5 - 1e-6
    assert plan.predicted <= plan.uniform["0.5"] + 1e-12


def test_bad_inputs_are_clear_errors(tiny_llama: Any) -> None:
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(LmshrinkError, match=r"bit widths in 2\.\.8"):
        measure_sensitivity(tiny_llama, ids, choices=(1, 4))
    with pytest.raises(LmshrinkError, match="no linear layers matched"):
        measure_sensitivity(tiny_llama, ids, targets=["nothing$"])
    sens = measure_sensitivity(tiny_llama, ids, choices=(4, 8), targets=[r"layers\.0\.mlp\.up_proj$"])
    with pytest.raises(LmshrinkError, match="cannot be met"):
        make_plan(sens, 3.0)
    with pytest.raises(LmshrinkError, match="not an lmshrink sensitivity file"):
        plan_from_json({"format": "x"})


def test_output_metric_and_extrapolated_bits(hetero_llama: Any) -> None:
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    sens = measure_sensitivity(hetero_llama, ids, choices=(3, 4, 8), metric="output")
    assert sens.metric == "output_mse" and len(sens.layers) == 14
    worst = max(sens.layers, key=lambda layer: layer.costs["3"])
    assert worst.name in (
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.v_proj",
    )  # the scaled layers
    plan = make_plan(sens, 4.0)
    assert plan.average <= 4.0 + 1e-6 and plan.layers[worst.name] == 8.0
    est = measure_sensitivity(
        hetero_llama, ids, choices=(3, 4, 8), measure=(3,), targets=[r"layers\.0\.mlp\.up"]
    )
    (layer,) = est.layers
    assert layer.costs["4"] == pytest.approx(layer.costs["3"] / 4) and est.measured_choices == [3.0]
