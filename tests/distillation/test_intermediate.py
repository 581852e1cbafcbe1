"""Hidden-state and attention-map distillation terms wired into distill_model and train_lm: values against hand
computations, their effect on the student's gradient, learned projections trained and checkpointed, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmshrink.distillation.losses import (
    IntermediateLoss,
    build_intermediate_loss,
    compute_distillation_loss,
    default_layer_map,
)
from lmshrink.distillation.student import make_student
from lmshrink.distillation.teacher import build_llama
from lmshrink.distillation.trainer import TrainConfig, distill_model, train_lm
from lmshrink.errors import LmshrinkError


def _teacher() -> nn.Module:
    return build_llama(64, 32, 4, 4, 64, 16, seed=0).eval()


def _student(teacher: nn.Module, hidden: int | None = 16) -> nn.Module:
    return make_student(teacher, num_layers=2, hidden_size=hidden, num_heads=2, intermediate_size=32)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (3, 16), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


def _ce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _grads_after_one_batch(
    teacher: nn.Module, student: nn.Module, **kw: float
) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the step leaves weights and .grad in place
    distill_model(teacher, student, [_batch()], opt, alpha=0.5, temperature=2.0, epochs=1, **kw)  # type: ignore[arg-type]
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}, opt


def test_default_layer_map_faces_the_last_layer_of_each_span() -> None:
    assert default_layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert default_layer_map(10, 30)[-1] == (9, 29)
    with pytest.raises(LmshrinkError, match="layer map"):
        default_layer_map(4, 2)


def test_hidden_mse_with_projection_matches_hand_computation() -> None:
    torch.manual_seed(0)
    hs = [torch.randn(2, 5, 8) for _ in range(3)]  # embeddings + 2 student layers
    ht = [torch.randn(2, 5, 12) for _ in range(5)]  # embeddings + 4 teacher layers
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = IntermediateLoss(8, 12, 2, 4, hidden_weight=0.7, hidden_loss="mse")
    out_s = type("O", (), {"logits": torch.zeros(1), "hidden_states": hs})()
    out_t = type("O", (), {"logits": torch.zeros(1), "hidden_states": ht})()
    got, parts = loss(out_s, out_t, mask)
    terms = []
    for k, (i, j) in enumerate([(0, 1), (1, 3)]):
        w = loss.hidden[k].proj.weight  # (12, 8)
        per_tok = ((hs[i + 1] @ w.T - ht[j + 1]) ** 2).mean(-1)  # (2, 5)
        terms.append((per_tok * mask).sum() / mask.sum())
    expected = 0.7 * (terms[0] + terms[1]) / 2
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert parts["loss_hidden"] == pytest.approx(float(expected) / 0.7, rel=1e-5)


def test_hidden_cosine_and_attention_terms_match_hand_computation() -> None:
    torch.manual_seed(1)
    hs = [torch.randn(1, 4, 6) for _ in range(2)]
    ht = [torch.randn(1, 4, 6) for _ in range(3)]
    a_s = [torch.softmax(torch.randn(1, 2, 4, 4), -1)]
    a_t = [torch.softmax(torch.randn(1, 3, 4, 4), -1) for _ in range(2)]
    loss = IntermediateLoss(6, 6, 1, 2, hidden_weight=1.0, hidden_loss="cosine", attention_weight=0.5)
    assert isinstance(loss.hidden[0].proj, nn.Identity)  # same width: no projection
    out_s = type("O", (), {"logits": torch.zeros(1), "hidden_states": hs, "attentions": a_s})()
    out_t = type("O", (), {"logits": torch.zeros(1), "hidden_states": ht, "attentions": a_t})()
    got, parts = loss(out_s, out_t)
    cos = F.cosine_similarity(hs[1], ht[2], dim=-1)  # student layer 0 vs teacher layer 1 (the last)
    hidden = (1 - cos).mean()
    # head counts differ (2 vs 3): maps are averaged over heads, then KL(teacher || student) per query row
    ps, pt = a_s[0].mean(1), a_t[1].mean(1)
    attn = (pt * (pt.log() - ps.log())).sum(-1).mean()
    assert parts["loss_hidden"] == pytest.approx(float(hidden), rel=1e-5)
    assert parts["loss_attention"] == pytest.approx(float(attn), rel=1e-5)
    assert float(got) == pytest.approx(float(hidden + 0.5 * attn), rel=1e-5)


def test_hidden_loss_changes_the_gradient_and_equals_the_hand_written_objective() -> None:
    teacher = _teacher()
    base = _student(teacher)
    plain, _ = _grads_after_one_batch(teacher, _copy(base, teacher))
    student = _copy(base, teacher)
    with_hidden, opt = _grads_after_one_batch(teacher, student, hidden_weight=0.5, hidden_loss="mse")
    # the projections (16 -> 32) were added to the optimizer as a new group and received gradients
    projections = opt.param_groups[-1]["params"]
    assert len(projections) == 2 and all(p.shape == (32, 16) and p.grad is not None for p in projections)
    diff = sum(float((with_hidden[n] - plain[n]).norm()) for n in plain)
    assert diff > 1e-3
    # the same gradient from the objective written out by hand
    manual = _copy(base, teacher)
    b = _batch()
    x = b["input_ids"]
    with torch.no_grad():
        t_out = teacher(input_ids=x, attention_mask=b["attention_mask"], output_hidden_states=True)
    s_out = manual(input_ids=x, attention_mask=b["attention_mask"], output_hidden_states=True)
    kd = compute_distillation_loss(s_out.logits, t_out.logits, 2.0)
    hidden = torch.stack(
        [
            ((s_out.hidden_states[i + 1] @ w.detach().T - t_out.hidden_states[j + 1]) ** 2).mean()
            for (i, j), w in zip([(0, 1), (1, 3)], projections, strict=True)
        ]
    ).mean()
    (0.5 * kd + 0.5 * _ce(s_out.logits, x) + 0.5 * hidden).backward()
    for n, p in manual.named_parameters():
        torch.testing.assert_close(with_hidden[n], p.grad, rtol=1e-4, atol=1e-6)


def test_attention_loss_changes_the_gradient() -> None:
    teacher = _teacher()
    base = _student(teacher, hidden=None)  # same width, 2 heads of the teacher's 4
    plain, _ = _grads_after_one_batch(teacher, _copy(base, teacher))
    attn, opt = _grads_after_one_batch(teacher, _copy(base, teacher), attention_weight=1.0)
    assert len(opt.param_groups) == 1  # no projection needed
    assert sum(float((attn[n] - plain[n]).norm()) for n in plain) > 1e-4


class _Interrupt(Exception):
    pass


def test_train_lm_hidden_loss_trains_projections_and_resumes_exactly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    teacher = _teacher()
    ids = torch.randint(0, 64, (16 * 24,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=6,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_every=3,
        progress=False,
        hidden_weight=1.0,
        hidden_loss="cosine",
        attention_weight=0.5,
    )
    base = _student(teacher)
    full = train_lm(_copy(base, teacher), ids, cfg, tmp_path / "a", teacher=teacher, alpha=0.5)
    assert full.distillation == "online"
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert "extra.safetensors" in state["sha256"]
    # interrupted in step 5 (checkpoint at step 3), then resumed: the same losses as the uninterrupted run
    broken = _copy(base, teacher)
    calls = {"n": 0}

    def hook(mod, inp, out):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= 5:
            raise _Interrupt
        return out

    broken.lm_head.register_forward_hook(hook)
    with pytest.raises(_Interrupt):
        train_lm(broken, ids, cfg, tmp_path / "b", teacher=teacher, alpha=0.5)
    resumed = train_lm(_copy(base, teacher), ids, cfg, tmp_path / "b", teacher=teacher, alpha=0.5)
    assert resumed.resumed_from_step == 3
    assert resumed.final_loss == full.final_loss  # bit-exact on CPU: projections and their moments restored
    # alpha = 0 with an intermediate term still runs the teacher
    only_hidden = train_lm(
        _copy(base, teacher),
        ids,
        TrainConfig(**{**cfg.model_dump(), "steps": 2}),
        tmp_path / "d",
        teacher=teacher,
        alpha=0.0,
    )
    assert only_hidden.distillation == "online"
    # resuming without the projections is refused clearly
    no_inter = TrainConfig(**{**cfg.model_dump(), "hidden_weight": 0.0, "attention_weight": 0.0})
    with pytest.raises(LmshrinkError, match="hidden_weight"):
        train_lm(_copy(base, teacher), ids, no_inter, tmp_path / "a", teacher=teacher, alpha=0.5)


def test_bad_intermediate_settings_are_clear_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    teacher = _teacher()
    student = _student(teacher)
    ids = torch.randint(0, 64, (16 * 8,))
    with pytest.raises(LmshrinkError, match="live teacher"):
        train_lm(student, ids, TrainConfig(steps=1, batch_size=4, seq_len=16, hidden_weight=1.0), tmp_path)
    with pytest.raises(LmshrinkError, match="layer_map pairs"):
        build_intermediate_loss(teacher, student, hidden_weight=1.0, layer_map=[(0, 7)])
    with pytest.raises(LmshrinkError, match="hidden_weight must be"):
        IntermediateLoss(8, 8, 1, 1, hidden_weight=-1.0)
    with pytest.raises(LmshrinkError, match="mse' or 'cosine"):
        IntermediateLoss(8, 8, 1, 1, hidden_weight=1.0, hidden_loss="l1")
    with pytest.raises(LmshrinkError, match="both 0"):
        build_intermediate_loss(teacher, student, layer_map=[(0, 1)])


def _copy(student: nn.Module, teacher: nn.Module) -> nn.Module:
    twin = _student(teacher, hidden=student.config.hidden_size if student.config.hidden_size != 32 else None)
    twin.load_state_dict(student.state_dict())
    return twin


def test_distill_model_uses_precomputed_teacher_logits_without_running_the_teacher() -> None:
    teacher = _teacher()
    base = _student(teacher)
    online, _ = _grads_after_one_batch(teacher, _copy(base, teacher))
    batch = _batch()
    with torch.no_grad():
        batch["teacher_logits"] = teacher(input_ids=batch["input_ids"]).logits
    calls = {"n": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    student = _copy(base, teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    distill_model(teacher, student, [batch], opt, alpha=0.5, temperature=2.0, epochs=1)
    assert calls["n"] == 0
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, online[n], rtol=1e-5, atol=1e-7)
