"""Students built from teachers: layer copies, width truncation, random init, vocabulary checks."""

from __future__ import annotations

import pytest
import torch

from lmshrink.distillation.student import check_vocab, default_layer_ids, make_student
from lmshrink.distillation.teacher import build_llama
from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import count_parameters


def _llama4():
    return build_llama(128, 64, 4, 4, 128, 64, num_kv_heads=2)


def test_default_layers_are_every_other_one() -> None:
    assert default_layer_ids(12, 6) == [0, 2, 4, 6, 8, 10]
    assert default_layer_ids(4, 2) == [0, 2]


def test_llama_student_copies_chosen_teacher_layers() -> None:
    teacher = _llama4()
    student = make_student(teacher, layer_ids=[1, 3])
    assert student.config.num_hidden_layers == 2
    ts, ss = teacher.state_dict(), student.state_dict()
    mapping = {"layers.0.": "layers.1.", "layers.1.": "layers.3."}
    for name, value in ss.items():
        src = name
        for a, b in mapping.items():
            if a in name:
                src = name.replace(a, b)
        assert torch.equal(value, ts[src]), name
    x = torch.randint(0, 128, (1, 10))
    assert student(input_ids=x).logits.shape == (1, 10, 128)


def test_bert_student_default_layers(tiny_bert) -> None:  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(
        BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=100
        )
    )
    student = make_student(teacher, num_layers=2)
    assert torch.equal(
        student.bert.encoder.layer[1].attention.self.query.weight,
        teacher.bert.encoder.layer[2].attention.self.query.weight,
    )
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    out = student(input_ids=torch.randint(0, 100, (2, 6)), attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert out.logits.shape == (2, 2)
    small = make_student(tiny_bert, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64)
    assert small.bert.encoder.layer[0].intermediate.dense.weight.shape == (64, 32)


def test_narrow_student_truncates_teacher_weights_and_runs() -> None:
    teacher = _llama4()
    student = make_student(teacher, num_layers=2, num_heads=2, hidden_size=32, intermediate_size=48)
    assert count_parameters(student) < count_parameters(teacher) / 3
    w_s = student.model.layers[1].mlp.down_proj.weight
    w_t = teacher.model.layers[2].mlp.down_proj.weight
    assert torch.equal(w_s, w_t[:32, :48])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, :32])
    assert student(input_ids=torch.randint(0, 128, (2, 7))).logits.shape == (2, 7, 128)


def test_fewer_heads_keep_whole_heads() -> None:
    teacher = _llama4()  # head_dim 16
    student = make_student(teacher, num_layers=1, num_heads=2)
    q_s = student.model.layers[0].self_attn.q_proj.weight
    assert q_s.shape == (32, 64)
    assert torch.equal(q_s, teacher.model.layers[0].self_attn.q_proj.weight[:32])
    assert student(input_ids=torch.randint(0, 128, (1, 5))).logits.shape == (1, 5, 128)


def test_random_init_is_seeded_and_differs_from_teacher() -> None:
    teacher = _llama4()
    a = make_student(teacher, num_layers=2, init="random", seed=3)
    b = make_student(teacher, num_layers=2, init="random", seed=3)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_vocab_mismatch_is_an_error() -> None:
    a = build_llama(128, 32, 1, 2, 64, 32)
    b = build_llama(130, 32, 1, 2, 64, 32)
    with pytest.raises(LmshrinkError, match="vocabularies differ"):
        check_vocab(a, b)


def test_bad_student_requests_are_errors() -> None:
    teacher = _llama4()
    with pytest.raises(LmshrinkError, match="layer_ids"):
        make_student(teacher, layer_ids=[0, 9])
    with pytest.raises(LmshrinkError, match="between 1 and 4"):
        make_student(teacher, num_layers=5)
    with pytest.raises(LmshrinkError, match="init"):
        make_student(teacher, init="zeros")  # type: ignore[arg-type]
