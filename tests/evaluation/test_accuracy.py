"""Sequence-classification accuracy and predictions."""

from __future__ import annotations

import pytest
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import evaluate_accuracy, predict

SENTENCES = [
    "a great film",
    "a dull and boring film",
    "the best thing",
    "awful acting",
    "fine",
    "not good at all",
]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=100, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_accuracy_matches_plain_predictions(tiny_bert):
    tok = make_tokenizer()
    expected = []
    with torch.no_grad():
        for s in SENTENCES:
            expected.append(int(tiny_bert(**tok([s], return_tensors="pt")).logits.argmax(-1)))
    assert predict(tiny_bert, tok, SENTENCES, batch_size=4) == expected  # padded batches agree with singles
    examples = [(s, i % 2) for i, s in enumerate(SENTENCES)]
    r = evaluate_accuracy(tiny_bert, tok, examples, batch_size=4, progress=False)
    n_correct = sum(int(p == y) for p, (_, y) in zip(expected, examples, strict=True))
    assert r.n_correct == n_correct and r.accuracy == pytest.approx(n_correct / len(SENTENCES))
    assert sum(map(sum, r.confusion)) == len(SENTENCES)
    assert r.to_dict()["kind"] == "accuracy"


def test_bad_inputs(tiny_bert, tiny_llama):
    tok = make_tokenizer()
    with pytest.raises(LmshrinkError, match="no examples"):
        evaluate_accuracy(tiny_bert, tok, [])
    with pytest.raises(LmshrinkError, match="label 5"):
        evaluate_accuracy(tiny_bert, tok, [("fine", 5)], progress=False)
    with pytest.raises(LmshrinkError, match="not a \\(text, label\\) pair"):
        evaluate_accuracy(tiny_bert, tok, [("fine",)], progress=False)  # type: ignore[list-item]
    with pytest.raises(LmshrinkError, match="list of texts"):
        predict(tiny_bert, tok, "fine")
