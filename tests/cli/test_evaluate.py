"""`lmshrink eval` and `lmshrink info` on tiny saved models: results, JSON output, one-line user errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmshrink.cli import main
from lmshrink.evaluation import evaluate_perplexity

TEXT = " ".join(["the cat sat on the mat and looked at the dog", "a bird flew over the old house"] * 60)


def make_tokenizer(pad: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>"] if pad else ["<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>" if pad else None
    )


@pytest.fixture()
def saved_llama(tiny_llama, tmp_path) -> tuple[Path, Path]:
    from lmshrink.models import save_model

    out = save_model(tiny_llama, tmp_path / "tiny", tokenizer=make_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return out, text


def test_eval_writes_json_matching_library(saved_llama, tmp_path, capsys):
    from lmshrink.models import load_model

    model_dir, text = saved_llama
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", str(model_dir), "--data", str(text), "--ctx", "64", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "perplexity" in printed and "next-token accuracy" in printed
    res = json.loads(out.read_text())
    model, tok = load_model(model_dir)
    expected = evaluate_perplexity(model, tok, text, ctx=64, progress=False)
    assert res["perplexity"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert res["perplexity"]["protocol"]["ctx"] == 64 and res["perplexity"]["model"] == str(model_dir)


def test_eval_reference_and_stride(saved_llama, tmp_path, capsys):
    model_dir, text = saved_llama
    out = tmp_path / "agree.json"
    args = [
        "eval",
        str(model_dir),
        "--data",
        str(text),
        "--protocol",
        "stride",
        "--ctx",
        "64",
        "--stride",
        "16",
    ]
    rc = main(
        [*args, "--max-tokens", "256", "--word-level", "--reference", str(model_dir), "--json", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["agreement"]["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert res["agreement"]["top1_agreement"] == 1.0
    assert res["perplexity"]["protocol"]["level"] == "word"
    assert 0 < res["perplexity"]["n_words"] < len(TEXT.split())
    assert res["agreement"]["n_tokens"] == res["perplexity"]["n_tokens"] == 255


def test_eval_speed(saved_llama, tmp_path, capsys):
    model_dir, text = saved_llama
    out = tmp_path / "speed.json"
    args = ["eval", str(model_dir), "--data", str(text), "--ctx", "64", "--max-tokens", "128", "--speed"]
    args += ["--speed-batch", "1", "--speed-batch", "2", "--speed-seq-len", "16", "--decode-tokens", "4"]
    rc = main([*args, "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "decode b=2" in printed
    speed = json.loads(out.read_text())["speed"]
    assert [(p["batch_size"], p["seq_len"]) for p in speed["prefill"]] == [(1, 16), (2, 16)]
    assert [p["batch_size"] for p in speed["decode"]] == [1, 2]


def test_info(saved_llama, tmp_path, capsys):
    from lmshrink.utils.io import directory_size

    model_dir, _ = saved_llama
    out = tmp_path / "info.json"
    rc = main(["info", str(model_dir), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "parameters" in printed and "dense float matmuls" in printed
    info = json.loads(out.read_text())
    assert info["bytes_on_disk"] == directory_size(model_dir)
    assert (info["layers"], info["hidden"], info["heads"], info["kv_heads"]) == (2, 64, 4, 2)
    assert info["format"] == "dense" and info["dtype"] == "float32"


def test_eval_classifier_on_sst2(tiny_bert, tmp_path, capsys, data_dir):
    from lmshrink.models import save_model

    model_dir = save_model(tiny_bert, tmp_path / "bert", tokenizer=make_tokenizer(pad=True))
    out = tmp_path / "acc.json"
    rc = main(["eval", str(model_dir), "--data", "sst2", "--limit", "40", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    acc = json.loads(out.read_text())["accuracy"]
    assert acc["n_examples"] == 40 and 0.0 <= acc["accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--ctx", "4096"], "exceeds the model's maximum"),
        (["--protocol", "sideways"], "unknown perplexity protocol"),
        (["--ctx", "64", "--stride", "8"], "--stride only applies"),
    ],
)
def test_user_errors_are_one_line(saved_llama, capsys, extra, match):
    model_dir, text = saved_llama
    rc = main(["eval", str(model_dir), "--data", str(text), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_missing_model(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "nope"), "--data", "wikitext2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "not found" in err


def test_unwritable_json_fails_before_work_and_writes_nothing(saved_llama, tmp_path, capsys):
    model_dir, text = saved_llama
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc = main(
        ["eval", str(model_dir), "--data", str(text), "--ctx", "64", "--json", str(blocker / "out.json")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write --json" in err and "Traceback" not in err
    rc = main(["info", str(model_dir), "--json", str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "text.txt", "tiny"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only directories")
def test_read_only_directory(saved_llama, tmp_path, capsys):
    model_dir, _ = saved_llama
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(["info", str(model_dir), "--json", str(ro / "info.json")])
        assert rc == 2 and "no write permission" in capsys.readouterr().err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_error_text_prints_as_written_not_as_markup(monkeypatch, capsys):
    # rich would swallow "[hub]" as a style tag: the install hint must reach the user intact
    import lmshrink.cli.evaluate as cli_evaluate
    from lmshrink.errors import LmshrinkError

    def fail(*_a, **_k):
        raise LmshrinkError(
            "the optional package 'datasets' is not installed (pip install 'lmshrink[hub]') [/]"
        )

    monkeypatch.setattr(cli_evaluate, "_load", fail)
    rc = main(["eval", "some-model", "--data", "wikitext2"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'lmshrink[hub]') [/]" in err and "Traceback" not in err
