"""Shared fixtures: tiny models built from configs (fast), and the real reference models (marked)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(
    os.environ.get("LMSHRINK_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)
os.environ.setdefault("LMSHRINK_DATA", str(DATA_DIR.resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR.resolve()


def _build_tiny_llama(tied: bool = False, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def make_tiny_llama():
    """``make_tiny_llama(tied=False, vocab_size=128)``: a fresh deterministic 2-block GQA Llama per call."""
    return _build_tiny_llama


@pytest.fixture()
def tiny_llama():
    """A randomly initialised 2-block Llama (GQA: 4 query heads, 2 KV heads), deterministic."""
    return _build_tiny_llama()


@pytest.fixture()
def tiny_bert():
    """A randomly initialised 2-block BERT encoder with a 2-class head, deterministic."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()
