"""`lmshrink prune` on a tiny saved Llama: sparse and structured outputs reload, user errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmshrink.cli import main

TEXT = " ".join(["the cat sat on the mat and looked at the dog", "a bird flew over the old house"] * 60)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture()
def saved_llama(tiny_llama, tmp_path) -> Path:
    from lmshrink.models import save_model

    return save_model(tiny_llama, tmp_path / "tiny", tokenizer=_tokenizer())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_prune_magnitude_saves_sparse_and_reloads(saved_llama, tmp_path, capsys):
    from lmshrink.models import load_model
    from lmshrink.pruning import prune_model

    out = tmp_path / "pruned"
    rc = main(["prune", str(saved_llama), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "lmshrink.json").read_text())
    assert manifest["format"] == "sparse" and manifest["compressed_tensors"] == 14
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5) and len(report["layers"]) == 14
    reloaded, tok = load_model(out)
    assert tok is not None
    ref, _ = load_model(saved_llama)
    prune_model(ref, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    ids = torch.randint(0, 120, (1, 10))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(ref, ids), rtol=0, atol=0)


def test_prune_heads_with_c4_calibration(saved_llama, tmp_path, capsys, data_dir):
    from lmshrink.models import load_model
    from lmshrink.models.arch import count_parameters

    out = tmp_path / "heads"
    args = [
        "prune",
        str(saved_llama),
        "--method",
        "heads",
        "--sparsity",
        "0.5",
        "--n-samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(out),
    ]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "lmshrink.json").read_text())["format"] == "pruned"
    pruned, _ = load_model(out)
    dense, _ = load_model(saved_llama)
    assert count_parameters(pruned) < count_parameters(dense)
    assert torch.isfinite(_logits(pruned, torch.randint(0, 120, (1, 8)))).all()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "magnitude", "--sparsity", "1.5"], r"\[0, 1\)"),
        (["--method", "magnitude", "--sparsity", "-0.1"], r"\[0, 1\)"),
        (["--method", "nm", "--nm", "3:7", "--nm-score", "magnitude"], "multiple of 7"),
        (["--method", "nm", "--nm", "4-2"], "N:M"),
        (["--method", "wanda"], "needs a sparsity"),
        (["--method", "bogus", "--sparsity", "0.2"], "method"),
    ],
)
def test_user_errors_are_one_line(saved_llama, tmp_path, capsys, extra, match):
    import re

    rc = main(["prune", str(saved_llama), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(match, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
