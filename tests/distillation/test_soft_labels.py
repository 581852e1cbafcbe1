"""Stored top-k soft labels: round trip, storage cost, quality of the top-k reconstruction, corruption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmshrink.distillation.losses import compute_distillation_loss, topk_distillation_loss
from lmshrink.distillation.soft_labels import SoftLabels, topk_reconstruction_kl
from lmshrink.errors import CorruptFileError, LmshrinkError


def test_round_trip_matches_teacher_probabilities(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (5 * 16 + 3,))
    labels = SoftLabels.generate(
        tiny_llama, ids, tmp_path / "soft", top_k=8, seq_len=16, batch_size=2, progress=False
    )
    again = SoftLabels.open(tmp_path / "soft")
    assert len(again) == 5 and again.top_k == 8 and again.vocab_size == 128
    assert again.indices.dtype == np.uint16 and again.probs.dtype == np.float16
    blocks = ids[:80].view(5, 16)
    assert torch.equal(again.blocks(), blocks)
    with torch.no_grad():
        p = torch.softmax(tiny_llama(input_ids=blocks).logits, -1)
    top_p, top_i = p.topk(8)
    probs, idx, rest = again.batch([0, 3])
    torch.testing.assert_close(probs, top_p[[0, 3]], atol=1e-3, rtol=1e-3)  # fp16 storage
    assert torch.equal(idx, top_i[[0, 3]])
    torch.testing.assert_close(rest, 1 - top_p[[0, 3]].sum(-1), atol=1e-5, rtol=1e-5)
    # storage: 8 x (2 + 2) + 4 bytes per token (+ input ids + headers) instead of 128 x 2
    per_token = labels.bytes_on_disk() / ids[:80].numel()
    assert per_token < 8 * 4 + 4 + 2 + 30


def test_topk_loss_from_stored_labels_tracks_full_loss(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    with torch.no_grad():
        # a confident teacher, as a trained one is: the tail mass is small
        tiny_llama.lm_head.weight.mul_(40.0)
    ids = torch.randint(0, 128, (64,))
    labels = SoftLabels.generate(tiny_llama, ids, tmp_path / "s", top_k=16, seq_len=32, progress=False)
    assert float(labels.batch([0, 1])[2].mean()) < 0.05
    student_logits = torch.randn(2, 32, 128)
    with torch.no_grad():
        t_logits = tiny_llama(input_ids=ids.view(2, 32)).logits
    full = compute_distillation_loss(student_logits, t_logits, 1.0)
    approx = topk_distillation_loss(student_logits, *labels.batch([0, 1]), temperature=1.0)
    assert float(approx) <= float(full) + 1e-3
    assert float(approx) == pytest.approx(float(full), rel=0.1)


def test_reconstruction_quality_improves_with_k() -> None:
    torch.manual_seed(2)
    logits = torch.randn(256, 1000) * 4
    kls = [topk_reconstruction_kl(logits, k)["kl_uniform_tail"] for k in (4, 16, 64, 1000)]
    assert kls[0] > kls[1] > kls[2] > kls[3]
    assert kls[3] == pytest.approx(0.0, abs=1e-3)


def test_corrupt_or_mismatched_labels_are_clear_errors(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 128, (64,))
    SoftLabels.generate(tiny_llama, ids, tmp_path / "s", top_k=4, seq_len=16, progress=False)
    with open(tmp_path / "s" / "probs.npy", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(CorruptFileError, match="checksum"):
        SoftLabels.open(tmp_path / "s")
    with pytest.raises(LmshrinkError, match="not a soft-label directory"):
        SoftLabels.open(tmp_path)
    with pytest.raises(LmshrinkError, match="top_k"):
        SoftLabels.generate(tiny_llama, ids, tmp_path / "t", top_k=0, seq_len=16, progress=False)
    with pytest.raises(LmshrinkError, match="fewer than one block"):
        SoftLabels.generate(tiny_llama, ids[:5], tmp_path / "t", top_k=4, seq_len=16, progress=False)
