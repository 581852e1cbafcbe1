"""``lmshrink distill`` with hidden-state / attention losses, and the training options shared by train and distill."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pytest

from lmshrink.cli import main
from lmshrink.cli.distill import _TRAIN_OPTIONS, distill_command, train_command

_SMALL = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--val", "none"]


def _corpus(tmp_path: Path) -> Path:
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
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) + " ." for _ in range(200)))
    return f


def test_train_and_distill_share_one_set_of_training_options() -> None:
    for command in (train_command, distill_command):
        params = inspect.signature(command).parameters
        assert set(_TRAIN_OPTIONS) <= set(params) and "training" not in params


@pytest.mark.slow  # trains a teacher and a student through the CLI (~10-70 s on the shared VM)
def test_distill_with_hidden_and_attention_losses(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    teacher = tmp_path / "teacher"
    args = ["--data", str(corpus), "--hidden", "32", "--layers", "2", "--heads", "2", "--vocab-size", "300"]
    assert main(["train", *args, "--out", str(teacher), *_SMALL]) == 0
    student = tmp_path / "student"
    rc = main(
        [
            "distill", "--teacher", str(teacher / "model"), "--student-layers", "1", "--student-hidden", "16",
            "--student-heads", "1", "--data", str(corpus), "--hidden-weight", "0.5", "--hidden-loss", "cosine",
            "--attention-weight", "0.2", "--layer-map", "0:1", "--alpha", "0.5", "--out", str(student), *_SMALL,
        ]
    )  # fmt: skip
    assert rc == 0
    result = json.loads((student / "result.json").read_text())
    assert result["distillation"] == "online"
    assert result["config"]["hidden_weight"] == 0.5 and result["config"]["layer_map"] == [[0, 1]]
    assert result["config"]["steps"] == 3 and result["config"]["warmup_steps"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer-map", "0-1"], "layer-map"),
        (["--hidden-loss", "l1", "--hidden-weight", "1"], "hidden-loss"),
        (["--hidden-weight", "1", "--soft-labels", "x"], "live teacher"),
    ],
)
def test_distill_rejects_bad_intermediate_options(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
