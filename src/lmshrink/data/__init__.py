"""Data: named corpora (WikiText, C4, SST-2) resolved locally or from the hub, tokenization, calibration windows."""

from lmshrink.data.calibration import calibration_batches, tokenize_corpus
from lmshrink.data.corpora import CORPORA, corpus_names, load_sst2, load_text

__all__ = ["CORPORA", "calibration_batches", "corpus_names", "load_sst2", "load_text", "tokenize_corpus"]
