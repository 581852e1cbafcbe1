"""Students built from teachers: fewer layers (DistilBERT-style copies of chosen teacher layers), fewer heads,
smaller hidden or intermediate size (truncated copies of the teacher's weights, or a random initialisation).

Works for any ``transformers`` model whose blocks are one ``nn.ModuleList`` (Llama-style causal LMs, BERT encoders
and classifiers); the architecture knowledge is :func:`lmshrink.models.arch.find_layers` plus config fields.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> t = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
>>> make_student(t).config.num_hidden_layers
2
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Literal

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import find_layers

log = logging.getLogger(__name__)


def default_layer_ids(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher layers starting at the first: every other layer when the student has half (DistilBERT).

    >>> default_layer_ids(12, 6), default_layer_ids(6, 3), default_layer_ids(30, 10)[:4]
    ([0, 2, 4, 6, 8, 10], [0, 2, 4], [0, 3, 6, 9])
    """
    if not 1 <= n_student <= n_teacher:
        raise LmshrinkError(
            f"a student needs between 1 and {n_teacher} layers (the teacher's), got {n_student}"
        )
    return [i * n_teacher // n_student for i in range(n_student)]


def _student_config(
    teacher_cfg: Any,
    num_layers: int,
    num_heads: int | None,
    hidden_size: int | None,
    intermediate_size: int | None,
) -> Any:
    cfg = copy.deepcopy(teacher_cfg)
    t_heads = int(teacher_cfg.num_attention_heads)
    t_hidden = int(teacher_cfg.hidden_size)
    t_head_dim = int(getattr(teacher_cfg, "head_dim", None) or t_hidden // t_heads)
    heads = num_heads or t_heads
    hidden = hidden_size or t_hidden
    cfg.num_hidden_layers = num_layers
    cfg.num_attention_heads = heads
    cfg.hidden_size = hidden
    if intermediate_size is not None:
        cfg.intermediate_size = intermediate_size
    if hasattr(teacher_cfg, "num_key_value_heads"):
        kv = min(int(teacher_cfg.num_key_value_heads or t_heads), heads)
        while heads % kv:
            kv -= 1
        cfg.num_key_value_heads = kv
    if hasattr(teacher_cfg, "head_dim"):
        # keep the teacher's head size when only heads are removed (a truncated copy keeps whole heads)
        cfg.head_dim = t_head_dim if hidden == t_hidden else hidden // heads
    elif hidden % heads:
        raise LmshrinkError(f"student hidden_size {hidden} must be divisible by num_heads {heads}")
    if hasattr(cfg, "layer_types") and getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    return cfg


def _truncate(src: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The leading block of ``src`` with ``shape``, or None when the student is larger in some dimension."""
    if src.dim() != len(shape) or any(s > t for s, t in zip(shape, src.shape, strict=True)):
        return None
    return src[tuple(slice(0, n) for n in shape)].clone()


def _copy_from_teacher(teacher: nn.Module, student: nn.Module, layer_ids: list[int]) -> dict[str, int]:
    path, _ = find_layers(teacher)
    layer_re = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    t_state = teacher.state_dict()
    counts = {"copied": 0, "truncated": 0, "random": 0}
    new_state = {}
    for name, value in student.state_dict().items():
        m = layer_re.match(name)
        src_name = layer_re.sub(f"{path}.{layer_ids[int(m.group(1))]}.", name) if m else name
        src = t_state.get(src_name)
        block = _truncate(src, value.shape) if src is not None else None
        if block is None:
            counts["random"] += 1
            continue
        counts["copied" if src is not None and src.shape == value.shape else "truncated"] += 1
        new_state[name] = block.to(value.dtype)
    student.load_state_dict(new_state, strict=False)
    return counts


def make_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    layer_ids: list[int] | None = None,
    num_heads: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    init: Literal["teacher", "random"] = "teacher",
    seed: int = 0,
) -> nn.Module:
    """A smaller model of the teacher's class and vocabulary.

    ``num_layers`` (default: half the teacher's) blocks are taken from the teacher layers ``layer_ids`` (default:
    evenly spaced from the first, DistilBERT's every other layer). ``num_heads``, ``hidden_size`` and
    ``intermediate_size`` shrink the width; with ``init="teacher"`` every weight is the leading block of the
    matching teacher weight (exact copies when the width is unchanged), with ``init="random"`` the student keeps
    its fresh initialisation (seeded). The embeddings and heads follow the same rule; the vocabulary never changes.

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> t = BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...     num_attention_heads=4, vocab_size=100))
    >>> s = make_student(t, layer_ids=[1, 3])
    >>> bool(torch.equal(s.bert.encoder.layer[1].output.dense.weight, t.bert.encoder.layer[3].output.dense.weight))
    True
    """
    if init not in ("teacher", "random"):
        raise LmshrinkError(f"init must be 'teacher' or 'random', got {init!r}")
    cfg = getattr(teacher, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise LmshrinkError(
            f"{type(teacher).__name__} has no transformers config; cannot build a student from it"
        )
    n_teacher = int(cfg.num_hidden_layers)
    if layer_ids is not None:
        if num_layers is not None and num_layers != len(layer_ids):
            raise LmshrinkError(
                f"num_layers={num_layers} disagrees with {len(layer_ids)} layer_ids {layer_ids}"
            )
        bad = [i for i in layer_ids if not 0 <= i < n_teacher]
        if bad or not layer_ids:
            raise LmshrinkError(
                f"layer_ids must be a non-empty list of teacher layers 0..{n_teacher - 1}, got {layer_ids}"
            )
        ids = list(layer_ids)
    else:
        ids = default_layer_ids(n_teacher, num_layers or max(1, n_teacher // 2))
    for name, value in (
        ("num_heads", num_heads),
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
    ):
        if value is not None and value <= 0:
            raise LmshrinkError(f"{name} must be a positive integer, got {value}")
    s_cfg = _student_config(cfg, len(ids), num_heads, hidden_size, intermediate_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = type(teacher)(s_cfg)
    param = next(teacher.parameters())
    student.to(dtype=param.dtype, device=param.device)
    if init == "teacher":
        counts = _copy_from_teacher(teacher, student, ids)
        log.info("student from teacher layers %s: %s tensors", ids, counts)
    student.lmshrink_student_layers = ids  # type: ignore[assignment]
    check_vocab(teacher, student)
    return student.train(teacher.training)


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the model's input embedding (the vocabulary its token ids index)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return int(emb.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None:
        raise LmshrinkError(f"cannot tell the vocabulary size of {type(model).__name__}")
    return int(size)


def check_vocab(
    teacher: nn.Module, student: nn.Module, teacher_tokenizer: Any = None, student_tokenizer: Any = None
) -> int:
    """Raise unless teacher and student index the same vocabulary (and tokenizers, when given, agree); return it.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> a = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, vocab_size=100))
    >>> check_vocab(a, a)
    100
    """
    vt, vs = vocab_size_of(teacher), vocab_size_of(student)
    if vt != vs:
        raise LmshrinkError(
            f"teacher and student vocabularies differ ({vt} vs {vs} tokens); distillation needs the same tokenizer: "
            "build the student with make_student(teacher, ...)"
        )
    if (
        teacher_tokenizer is not None
        and student_tokenizer is not None
        and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab()
    ):
        raise LmshrinkError(
            "teacher and student tokenizers map tokens differently; use the teacher's tokenizer"
        )
    return vt
