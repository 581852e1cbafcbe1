"""tokenize_corpus equals one tokenizer call; calibration windows are seeded and well-formed."""

from __future__ import annotations

import pytest
import torch

from lmshrink.data import calibration_batches, load_text, tokenize_corpus
from lmshrink.errors import LmshrinkError

SAMPLE = (
    " = Valkyria Chronicles III = \n\n\n \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
    "playing video game developed by Sega and Media.Vision for the PlayStation Portable . \n\n\n = = Gameplay = = \n"
    "\n\n As with previous Valkyira Chronicles games , it is a tactical role @-@ playing game where players take "
    "control of a military unit . \n\n  Troops are divided into five classes : Scouts , Shocktroopers , Engineers "
    "and Lancers . 1 @,@ 000 units ; 3 @.@ 5 % \n\n"
)


def _byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def _metaspace():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(
        [SAMPLE] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.mark.parametrize("make", [_byte_bpe, _metaspace])
def test_chunked_tokenization_equals_one_call(make):
    tok = make()
    text = SAMPLE * 40
    ids = tokenize_corpus(tok, text, add_special_tokens=False, chunk_chars=500)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_once_around_the_text(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "game", "is", "good", "."])
    )
    tok = BertTokenizerFast(vocab_file=str(vocab))
    text = "the game is good .\n\n" * 3000
    ids = tokenize_corpus(tok, text, chunk_chars=1000).tolist()
    assert ids == tok(text, verbose=False)["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.cls_token_id) == 1
    with pytest.raises(LmshrinkError, match="empty"):
        tokenize_corpus(tok, "")


def test_calibration_windows_seeded():
    tok = _byte_bpe()
    text = SAMPLE * 20
    a = calibration_batches(tok, n_samples=8, seq_len=32, seed=0, text=text)
    b = calibration_batches(tok, n_samples=8, seq_len=32, seed=0, text=text)
    c = calibration_batches(tok, n_samples=8, seq_len=32, seed=1, text=text)
    assert len(a) == 8 and all(
        x["input_ids"].shape == (1, 32) and x["input_ids"].dtype == torch.long for x in a
    )
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    corpus = tokenize_corpus(tok, text, add_special_tokens=False).tolist()
    window = a[0]["input_ids"][0].tolist()
    assert any(corpus[i : i + 32] == window for i in range(len(corpus) - 31))
    with pytest.raises(LmshrinkError, match="n_samples"):
        calibration_batches(tok, n_samples=0, text=text)
    with pytest.raises(LmshrinkError, match="fewer than seq_len"):
        calibration_batches(tok, n_samples=2, seq_len=100_000, text=text)


def test_calibration_from_corpus_file(tmp_path):
    tok = _byte_bpe()
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "validation-2k.txt").write_text(SAMPLE * 10)
    batches = calibration_batches(tok, "c4", n_samples=4, seq_len=16, path=tmp_path)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(1, 16)] * 4


@pytest.mark.reference
def test_smollm2_tokenizer_wikitext2_matches_one_call(data_dir):
    from lmshrink.models import load_model

    _, tok = load_model("smollm2-135m")
    text = load_text("wikitext2")
    ids = tokenize_corpus(tok, text)
    assert ids.tolist() == tok(text, verbose=False)["input_ids"]
    assert ids.numel() == 304_986
