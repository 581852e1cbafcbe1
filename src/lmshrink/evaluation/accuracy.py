"""Accuracy of sequence classifiers (SST-2 style ``(sentence, label)`` examples)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation.perplexity import (
    _tokenizer_name,
    model_dtype,
    model_max_length,
    model_name,
    place_model,
)
from lmshrink.evaluation.results import AccuracyResult
from lmshrink.utils.env import provenance


def _num_labels(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(n, int) or n < 1:
        raise LmshrinkError(
            f"{type(model).__name__} has no classification head (config.num_labels is missing)"
        )
    return n


@torch.inference_mode()
def predict(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> list[int]:
    """Predicted class index for each text (argmax of the classifier logits), padded batches, truncated to
    ``max_length`` (default: the smallest of the tokenizer's limit, the model's maximum and 512).

    >>> predict(model, tokenizer, ["a great film"])  # doctest: +SKIP
    [1]
    """
    if isinstance(texts, str):
        raise LmshrinkError("predict takes a list of texts, not a single string")
    if batch_size < 1:
        raise LmshrinkError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer is None:
        raise LmshrinkError("a tokenizer is required to classify text")
    _num_labels(model)
    dev = place_model(model, device)
    limit = max_length or min(
        int(getattr(tokenizer, "model_max_length", 512) or 512), model_max_length(model) or 512, 512
    )
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="predict", disable=not progress, leave=False):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits  # (B, num_labels)
            out.extend(int(j) for j in logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return out


def evaluate_accuracy(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[tuple[str, int]],
    batch_size: int = 32,
    *,
    max_length: int | None = None,
    device: str | None = None,
    progress: bool = True,
    data: str = "examples",
    name: str | None = None,
) -> AccuracyResult:
    """Accuracy of a sequence classifier on ``(text, label)`` examples, with a confusion matrix.

    >>> from lmshrink.data import load_sst2  # doctest: +SKIP
    >>> evaluate_accuracy(model, tokenizer, load_sst2("dev")).accuracy  # doctest: +SKIP
    0.91
    """
    if len(examples) == 0:
        raise LmshrinkError("no examples to evaluate; pass a non-empty list of (text, label) pairs")
    n_labels = _num_labels(model)
    labels: list[int] = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, tuple | list) and len(ex) == 2 and isinstance(ex[0], str)):
            raise LmshrinkError(f"example {i} is not a (text, label) pair: {ex!r}")
        label = int(ex[1])
        if not 0 <= label < n_labels:
            raise LmshrinkError(
                f"example {i} has label {label}; the model has {n_labels} labels (0..{n_labels - 1})"
            )
        labels.append(label)
    preds = predict(
        model,
        tokenizer,
        [ex[0] for ex in examples],
        batch_size=batch_size,
        max_length=max_length,
        device=device,
        progress=progress,
    )
    confusion = [[0] * n_labels for _ in range(n_labels)]
    for y, p in zip(labels, preds, strict=True):
        confusion[y][p] += 1
    n_correct = sum(confusion[i][i] for i in range(n_labels))
    return AccuracyResult(
        model=name or model_name(model),
        data=f"{data} ({len(examples)} examples)",
        protocol={
            "task": "sequence-classification",
            "prediction": "argmax of logits",
            "tokenizer": _tokenizer_name(tokenizer),
            "max_length": max_length,
            "batch_size": batch_size,
        },
        provenance=provenance(place_model(model, None), model_dtype(model)),
        accuracy=n_correct / len(examples),
        n_examples=len(examples),
        n_correct=n_correct,
        confusion=confusion,
    )
