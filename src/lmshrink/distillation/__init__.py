"""Knowledge distillation: losses, students built from teachers, stored soft labels, teacher training from scratch
and a training system (checkpoints with exact resume, DDP).

Names are imported lazily so that ``import lmshrink.distillation`` stays cheap.

>>> from lmshrink.distillation import compute_distillation_loss, make_student, train_lm  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compute_distillation_loss": "lmshrink.distillation.losses",
    "topk_distillation_loss": "lmshrink.distillation.losses",
    "HiddenStateLoss": "lmshrink.distillation.losses",
    "attention_map_loss": "lmshrink.distillation.losses",
    "IntermediateLoss": "lmshrink.distillation.losses",
    "build_intermediate_loss": "lmshrink.distillation.losses",
    "default_layer_map": "lmshrink.distillation.losses",
    "make_student": "lmshrink.distillation.student",
    "check_vocab": "lmshrink.distillation.student",
    "SoftLabels": "lmshrink.distillation.soft_labels",
    "build_llama": "lmshrink.distillation.teacher",
    "train_tokenizer": "lmshrink.distillation.teacher",
    "TrainConfig": "lmshrink.distillation.trainer",
    "TrainResult": "lmshrink.distillation.trainer",
    "train_lm": "lmshrink.distillation.trainer",
    "distill_model": "lmshrink.distillation.trainer",
    "evaluate_blocks": "lmshrink.distillation.trainer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmshrink.distillation' has no attribute {name!r}")
