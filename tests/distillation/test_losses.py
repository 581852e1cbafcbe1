"""Distillation losses against hand computations (values and gradients), masking and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from lmshrink.distillation.losses import (
    HiddenStateLoss,
    attention_map_loss,
    combine_losses,
    compute_distillation_loss,
    topk_distillation_loss,
)
from lmshrink.errors import LmshrinkError


def _hand_kd(s: list[float], t: list[float], temp: float) -> float:
    """KL(softmax(t/T) || softmax(s/T)) x T² for one position, with plain Python math."""
    zs = [x / temp for x in s]
    zt = [x / temp for x in t]
    ls = math.log(sum(math.exp(z) for z in zs))
    lt = math.log(sum(math.exp(z) for z in zt))
    return sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt, strict=True)) * temp**2


def test_kd_loss_matches_hand_computation() -> None:
    s = [1.0, -0.5, 2.0, 0.3]
    t = [0.2, 1.5, -1.0, 0.7]
    for temp in (0.5, 1.0, 2.0, 4.0):
        got = compute_distillation_loss(torch.tensor([s]), torch.tensor([t]), temp)
        assert float(got) == pytest.approx(_hand_kd(s, t, temp), rel=1e-5)


def test_kd_gradient_matches_hand_formula() -> None:
    # d/ds [T² KL(p_T || q_T)] = T (q_T - p_T)
    torch.manual_seed(0)
    s = torch.randn(3, 7, requires_grad=True)
    t = torch.randn(3, 7)
    temp = 3.0
    compute_distillation_loss(s, t, temp).backward()
    # mean over the 3 rows
    expected = temp * (torch.softmax(s.detach() / temp, -1) - torch.softmax(t / temp, -1)) / 3
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    x = torch.randn(2, 4, 11)
    assert float(compute_distillation_loss(x, x, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(compute_distillation_loss(x, torch.randn(2, 4, 11), 2.0)) > 0


def test_mask_excludes_padding_positions() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = compute_distillation_loss(s, t, 2.0, mask)
    # garbage in padded positions must not change the loss
    s2 = s.clone()
    s2[0, 3:] = 1e4
    assert float(compute_distillation_loss(s2, t, 2.0, mask)) == pytest.approx(float(got), rel=1e-6)
    per_tok = [
        compute_distillation_loss(s[b, i], t[b, i], 2.0) for b in range(2) for i in range(5) if mask[b, i]
    ]
    assert float(got) == pytest.approx(float(torch.stack(per_tok).mean()), rel=1e-5)


@pytest.mark.parametrize("temp", [0, -1.0, float("nan"), float("inf")])
def test_temperature_must_be_positive(temp: float) -> None:
    x = torch.randn(1, 4)
    with pytest.raises(LmshrinkError, match="temperature"):
        compute_distillation_loss(x, x, temp)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_must_lie_in_unit_interval(alpha: float) -> None:
    with pytest.raises(LmshrinkError, match=r"alpha .* \[0, 1\]"):
        combine_losses(torch.tensor(1.0), torch.tensor(2.0), alpha)


def test_combine_losses_weights() -> None:
    assert float(combine_losses(torch.tensor(1.0), torch.tensor(3.0), 0.25)) == pytest.approx(2.5)


def test_vocab_mismatch_in_logits_is_an_error() -> None:
    with pytest.raises(LmshrinkError, match="vocabulary"):
        compute_distillation_loss(torch.randn(2, 10), torch.randn(2, 12), 1.0)


def test_topk_loss_equals_full_loss_when_k_is_vocab_and_bounds_it_otherwise() -> None:
    torch.manual_seed(2)
    s = torch.randn(2, 3, 40, requires_grad=True)
    t = torch.randn(2, 3, 40) * 2
    full = compute_distillation_loss(s, t, 1.0)
    p, i = torch.softmax(t, -1).topk(40)
    exact = topk_distillation_loss(s, p, i, torch.zeros(2, 3), 1.0)
    assert float(exact) == pytest.approx(float(full), rel=1e-5)
    g_full = torch.autograd.grad(full, s)[0]
    g_topk = torch.autograd.grad(topk_distillation_loss(s, p, i, torch.zeros(2, 3), 1.0), s)[0]
    torch.testing.assert_close(g_topk, g_full, rtol=1e-4, atol=1e-6)
    p8, i8 = torch.softmax(t, -1).topk(8)
    rest = 1 - p8.sum(-1)
    approx = topk_distillation_loss(s, p8, i8, rest, 1.0)
    assert 0 < float(approx) <= float(full) + 1e-6  # k+1-bucket KL is a lower bound (data processing)


def test_topk_loss_retempered_matches_full_at_temperature_when_k_is_vocab() -> None:
    torch.manual_seed(3)
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    p, i = torch.softmax(t, -1).topk(20)
    got = topk_distillation_loss(s, p, i, torch.zeros(4), 2.0, stored_temperature=1.0)
    assert float(got) == pytest.approx(float(compute_distillation_loss(s, t, 2.0)), rel=1e-4)


def test_hidden_state_loss_projects_and_masks() -> None:
    torch.manual_seed(4)
    same = HiddenStateLoss(8, 8, "mse")
    h = torch.randn(2, 3, 8)
    assert float(same(h, h)) == 0.0
    cos = HiddenStateLoss(8, 8, "cosine")
    assert float(cos(h, 2 * h)) == pytest.approx(0.0, abs=1e-6)
    proj = HiddenStateLoss(4, 8, "mse")
    loss = proj(torch.randn(2, 3, 4), torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    loss.backward()
    assert proj.proj.weight.grad is not None  # type: ignore[union-attr]
    with pytest.raises(LmshrinkError, match="mse"):
        HiddenStateLoss(4, 4, "l1")


def test_attention_map_loss_zero_for_equal_maps_and_handles_head_mismatch() -> None:
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    b = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    assert float(attention_map_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_map_loss(b, a)) > 0
