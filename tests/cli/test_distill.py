"""``lmshrink train`` and ``lmshrink distill`` end to end on a tiny synthetic corpus."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmshrink.cli import main


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = [
        "the",
        "cat",
        "dog",
        "sat",
        "ran",
        "on",
        "under",
        "a",
        "mat",
        "tree",
        "house",
        "big",
        "small",
        "red",
        "quick",
        "slow",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) + " ." for _ in range(400)]
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(lines))
    return f


_SMALL = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--val-tokens", "64"]


def test_train_then_distill_with_soft_labels(tmp_path: Path, corpus: Path) -> None:
    teacher = tmp_path / "teacher"
    rc = main(
        [
            "train",
            "--data",
            str(corpus),
            "--val",
            str(corpus),
            "--hidden",
            "32",
            "--layers",
            "2",
            "--heads",
            "2",
            "--vocab-size",
            "300",
            "--out",
            str(teacher),
            *_SMALL,
        ]
    )
    assert rc == 0
    assert (teacher / "model" / "lmshrink.json").is_file() and (
        teacher / "tokenizer" / "tokenizer.json"
    ).is_file()
    trace = json.loads((teacher / "trace.json").read_text())
    assert trace[-1]["step"] == 4 and trace[-1]["val_ppl"] > 1

    student = tmp_path / "student"
    rc = main(
        [
            "distill",
            "--teacher",
            str(teacher / "model"),
            "--student-layers",
            "1",
            "--student-hidden",
            "16",
            "--student-heads",
            "1",
            "--data",
            str(corpus),
            "--val",
            str(corpus),
            "--alpha",
            "0.7",
            "--temperature",
            "2",
            "--soft-labels",
            str(tmp_path / "soft"),
            "--top-k",
            "8",
            "--out",
            str(student),
            *_SMALL,
        ]
    )
    assert rc == 0
    result = json.loads((student / "result.json").read_text())
    assert result["distillation"] == "soft-labels" and result["alpha"] == 0.7
    assert (tmp_path / "soft" / "header.json").is_file()
    assert (student / "model" / "lmshrink.json").is_file()


@pytest.mark.parametrize(
    ("flag", "value", "message"), [("--alpha", "1.5", "alpha"), ("--temperature", "0", "temperature")]
)
def test_distill_rejects_bad_hyperparameters(
    tmp_path: Path, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
    assert rc == 2
    assert message in capsys.readouterr().err
