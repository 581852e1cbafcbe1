"""Epochs -> optimizer steps: the pipeline and the training loop agree, so the trace has one row per epoch
(the bug: ceil(blocks / batch) = 91 steps for a 90-step epoch gave rows at epoch 1.0 and 1.0111)."""

from __future__ import annotations

import pytest
import torch

from lmshrink.distillation import build_llama, train_lm
from lmshrink.distillation.trainer import TrainConfig, steps_for_epochs
from lmshrink.errors import LmshrinkError
from lmshrink.pipeline.stages import train_config
from lmshrink.recipes import TrainOptions


def test_steps_for_epochs_drops_the_partial_batch() -> None:
    cfg = TrainConfig(batch_size=16)
    assert steps_for_epochs(1451, 1, cfg) == 90  # 1451 // 16, not ceil = 91
    assert steps_for_epochs(1451, 2, cfg) == 180
    assert steps_for_epochs(1451, 0.5, cfg) == 45
    assert steps_for_epochs(1451, 1, TrainConfig(batch_size=8, grad_accum=2)) == 90
    with pytest.raises(LmshrinkError, match="fewer than one global batch"):
        steps_for_epochs(10, 1, cfg)
    # the pipeline's conversion (1451 blocks of 128 tokens + a partial block)
    assert train_config(TrainOptions(epochs=1, batch_size=16), 1451 * 128 + 50, 0, "cpu").steps == 90


def test_trace_has_one_row_per_epoch(tmp_path) -> None:
    ids = torch.randint(0, 64, (37 * 16,), generator=torch.Generator().manual_seed(0))  # 37 blocks of 16
    model = build_llama(
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        seed=0,
    )
    opts = TrainOptions(epochs=2, batch_size=4, seq_len=16, lr=1e-3, warmup_steps=1)
    config = train_config(opts, ids.numel(), 0, "cpu")
    assert config.steps == 2 * (37 // 4)
    result = train_lm(model, ids, config, tmp_path / "train")
    assert [row["epoch"] for row in result.trace] == [1.0, 2.0]
    assert [row["step"] for row in result.trace] == [9, 18]
