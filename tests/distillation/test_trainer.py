"""The training system: exact resume, NaN stop keeping the last checkpoint, corrupt checkpoints, distillation
modes, the lab's distill_model, schedules and validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmshrink.distillation.soft_labels import SoftLabels
from lmshrink.distillation.student import make_student
from lmshrink.distillation.teacher import build_llama
from lmshrink.distillation.trainer import TrainConfig, distill_model, iterate_blocks, lr_at, train_lm
from lmshrink.errors import CorruptFileError, LmshrinkError, NumericsError


def _model() -> nn.Module:
    return build_llama(64, 32, 2, 2, 64, 32, seed=0)


def _ids(n: int = 16 * 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: a noisy repeating pattern
    base = torch.arange(n) % 17
    return torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(0, 64, (n,), generator=g), base)


def _cfg(**kw) -> TrainConfig:  # type: ignore[no-untyped-def]
    base = dict(
        steps=8,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=3,
        trace_every=4,
        progress=False,
        val_max_tokens=64,
    )
    base.update(kw)
    return TrainConfig(**base)


class _Interrupt(Exception):
    pass


def _fail_at(model: nn.Module, call: int, exc: Exception | None = None) -> None:
    """Make the model's LM head raise (or produce NaN when ``exc`` is None) from its ``call``-th forward on."""
    count = {"n": 0}

    def hook(mod, inp, out):  # type: ignore[no-untyped-def]
        count["n"] += 1
        if count["n"] >= call:
            if exc is not None:
                raise exc
            return out * float("nan")
        return out

    model.lm_head.register_forward_hook(hook)


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids, val = _ids(), _ids(128, seed=1)
    full = train_lm(_model(), ids, _cfg(), tmp_path / "a", val_ids=val)

    broken = _model()
    _fail_at(broken, call=8, exc=_Interrupt())  # the 7th step's forward: checkpoint at step 6 exists
    with pytest.raises(_Interrupt):
        train_lm(broken, ids, _cfg(), tmp_path / "b", val_ids=val)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6
    resumed_model = _model()
    resumed = train_lm(resumed_model, ids, _cfg(), tmp_path / "b", val_ids=val)
    assert resumed.resumed_from_step == 6
    assert resumed.final_loss == full.final_loss  # bit-exact on CPU
    for a, b in zip(full.trace, resumed.trace, strict=True):
        assert a["loss"] == b["loss"] and a["val_ppl"] == b["val_ppl"]
    ref = _model()
    from safetensors.torch import load_model

    load_model(ref, str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    for p, q in zip(ref.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    trace = json.loads((tmp_path / "b" / "trace.json").read_text())
    assert [r["step"] for r in trace] == [4, 8]
    assert (tmp_path / "b" / "trace.csv").read_text().startswith("epoch,step,loss,accuracy,val_loss,val_ppl")


def test_training_reduces_loss_and_traces_epochs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    res = train_lm(
        _model(),
        _ids(),
        _cfg(steps=20, trace_every=None, checkpoint_every=None),
        tmp_path,
        val_ids=_ids(128, 1),
    )
    # 40 blocks / 4 per step = 10 steps per epoch -> rows at epochs 1 and 2
    assert [r["epoch"] for r in res.trace] == [1.0, 2.0]
    assert res.trace[-1]["loss"] < res.trace[0]["loss"]
    assert res.trace[-1]["val_ppl"] < 64
    assert res.tokens == 20 * 4 * 16 and res.tokens_per_s > 0


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    _fail_at(model, call=5)  # NaN from step 5 on
    with pytest.raises(
        NumericsError, match=r"loss became nan .* at step 5; the last good checkpoint is kept"
    ):
        train_lm(model, _ids(), _cfg(), tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    # the kept checkpoint holds finite weights and resumes
    res = train_lm(_model(), _ids(), _cfg(), tmp_path)
    assert res.resumed_from_step == 3 and res.steps == 8


def test_corrupt_checkpoint_on_resume_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_lm(_model(), _ids(), _cfg(steps=3), tmp_path)
    f = tmp_path / "checkpoint" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match="checksum"):
        train_lm(_model(), _ids(), _cfg(steps=3), tmp_path)
    (tmp_path / "checkpoint" / "state.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        train_lm(_model(), _ids(), _cfg(steps=3), tmp_path)


def test_resume_with_other_config_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train_lm(_model(), _ids(), _cfg(steps=3), tmp_path)
    with pytest.raises(LmshrinkError, match="different training config"):
        train_lm(_model(), _ids(), _cfg(steps=3, lr=1e-2), tmp_path)


def test_bad_inputs_are_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LmshrinkError, match="alpha"):
        train_lm(_model(), _ids(), _cfg(), tmp_path, teacher=_model(), alpha=1.5)
    with pytest.raises(LmshrinkError, match="temperature"):
        train_lm(_model(), _ids(), _cfg(), tmp_path, teacher=_model(), temperature=0)
    with pytest.raises(LmshrinkError, match="fewer than one"):
        train_lm(_model(), _ids(10), _cfg(), tmp_path)
    with pytest.raises(LmshrinkError, match="vocabularies differ"):
        train_lm(_model(), _ids(), _cfg(), tmp_path, teacher=build_llama(80, 32, 1, 2, 64, 32))
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(step=3)  # type: ignore[call-arg]


def test_online_and_soft_label_distillation_agree_with_full_k(tmp_path) -> None:  # type: ignore[no-untyped-def]
    teacher = _model()
    ids = _ids()
    labels = SoftLabels.generate(teacher, ids, tmp_path / "soft", top_k=64, seq_len=16, progress=False)
    cfg = _cfg(steps=4, checkpoint_every=None)
    online = train_lm(
        make_student(teacher, num_layers=1), ids, cfg, tmp_path / "on", teacher=teacher, alpha=0.7
    )
    offline = train_lm(
        make_student(teacher, num_layers=1), ids, cfg, tmp_path / "off", soft_labels=labels, alpha=0.7
    )
    assert online.distillation == "online" and offline.distillation == "soft-labels"
    # k = vocab: the stored labels are the full distribution up to fp16 rounding
    assert offline.final_loss == pytest.approx(online.final_loss, rel=2e-3)


def test_lr_schedule_warmup_and_cosine() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_distill_model_lab_loop_causal_and_classification(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    teacher = _model()
    student = make_student(teacher, num_layers=1, init="random")
    blocks = _ids().view(-1, 16)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    trace = distill_model(
        teacher, student, list(iterate_blocks(blocks, 8)), opt, alpha=0.5, temperature=2.0, epochs=2
    )
    assert [r["epoch"] for r in trace] == [1, 2] and trace[1]["loss"] < trace[0]["loss"]

    student_cls = make_student(tiny_bert, num_layers=1)
    ids = torch.randint(0, 128, (8, 6))
    loader = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (8,))}]
    opt = torch.optim.AdamW(student_cls.parameters(), lr=1e-3)
    trace = distill_model(tiny_bert, student_cls, loader, opt, alpha=1.0, temperature=1.0, epochs=1)
    assert 0.0 <= trace[0]["accuracy"] <= 1.0 and trace[0]["loss_kd"] >= 0
    with pytest.raises(LmshrinkError, match="alpha"):
        distill_model(tiny_bert, student_cls, loader, opt, alpha=-1, temperature=1.0, epochs=1)
    with pytest.raises(LmshrinkError, match="no batches"):
        distill_model(tiny_bert, student_cls, [], opt, alpha=0.5, temperature=1.0, epochs=1)
