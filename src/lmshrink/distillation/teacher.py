"""Teachers from scratch: a Llama-style config builder, a byte-level BPE tokenizer trainer, and corpus loading.

>>> model = build_llama(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
...                     max_position_embeddings=64)
>>> model.config.num_hidden_layers
2
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmshrink.errors import LmshrinkError

log = logging.getLogger(__name__)

#: Special tokens of tokenizers trained here: end of sequence (also used for padding) and unknown.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def build_llama(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama-style causal LM (RMSNorm, RoPE, SwiGLU), from tiny to ~100M parameters.

    Word embeddings are tied to the LM head by default: for small models the embedding dominates the count.

    >>> m = build_llama(256, 64, 2, 4, 128, 128, num_kv_heads=2)
    >>> m.config.num_key_value_heads
    2
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if value <= 0:
            raise LmshrinkError(f"{name} must be a positive integer, got {value}")
    kv = num_kv_heads or num_heads
    if hidden_size % num_heads:
        raise LmshrinkError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    if num_heads % kv:
        raise LmshrinkError(f"num_heads {num_heads} must be a multiple of num_kv_heads {kv}")
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def train_tokenizer(text: str, vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``text``; it has EOS (``<|endoftext|>``) and PAD tokens.

    >>> tok = train_tokenizer("the cat sat on the mat. " * 50, vocab_size=300)
    >>> tok.decode(tok("the cat")["input_ids"])
    'the cat'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not text.strip():
        raise LmshrinkError("cannot train a tokenizer on empty text; give a non-empty corpus")
    if vocab_size < 260:
        raise LmshrinkError(f"vocab_size must be at least 260 (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.splitlines()
    tok.train_from_iterator((ln for ln in lines if ln.strip()), trainer=trainer, length=len(lines))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.model_max_length = 1_000_000_000
    return fast


def load_corpus(name: str, split: str = "train") -> str:
    """Text of a text file path, or of a named corpus via :func:`lmshrink.data.load_text`.

    >>> load_corpus("wikitext103", "train")[:12]  # doctest: +SKIP
    ' \\n = Valkyria'
    """
    from lmshrink.data import load_text

    path = Path(name)
    text = path.read_text(encoding="utf-8") if path.is_file() else load_text(name, split=split)
    if not text.strip():
        raise LmshrinkError(f"corpus {name!r} ({split}) is empty; give a text with some content")
    return text


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    from lmshrink.data import tokenize_corpus

    return tokenize_corpus(tokenizer, text, add_special_tokens=False)


def default_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width of Llama: 8/3 x hidden, rounded up to a multiple of 32.

    >>> default_intermediate_size(256)
    704
    """
    return int(-(-(8 * hidden_size // 3) // 32) * 32)


def train_teacher(
    train_text: str,
    *,
    out_dir: str | Path,
    config: Any,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 4096,
    tokenizer: Any = None,
    val_text: str | None = None,
    max_train_tokens: int | None = None,
) -> tuple[LlamaForCausalLM, Any, Any]:
    """The ``lmshrink train`` flow: a BPE tokenizer (trained on ``train_text`` unless given; kept in
    ``out_dir/tokenizer`` so a resumed run reuses it), a fresh Llama of the given size, :func:`train_lm` on the
    tokenized text. Returns ``(model, tokenizer, TrainResult)``; the caller saves the model.

    >>> model, tok, res = train_teacher(load_corpus("wikitext103"), out_dir="runs/t",
    ...                                 config=TrainConfig(steps=500))  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from lmshrink.distillation.trainer import train_lm

    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    if tokenizer is None and (tok_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(train_text, vocab_size)
        from lmshrink.utils.io import atomic_directory

        with atomic_directory(tok_dir) as tmp:
            tokenizer.save_pretrained(tmp)
    ids = tokenize_text(tokenizer, train_text)
    if max_train_tokens is not None:
        ids = ids[:max_train_tokens]
    val_ids = tokenize_text(tokenizer, val_text) if val_text else None
    model = build_llama(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size or default_intermediate_size(hidden_size),
        max_position_embeddings=max(config.seq_len, 128),
        num_kv_heads=num_kv_heads,
        seed=config.seed,
    )
    if tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    log.info(
        "training a %d-parameter Llama on %d tokens", sum(p.numel() for p in model.parameters()), ids.numel()
    )
    result = train_lm(model, ids, config, out, val_ids=val_ids)
    return model, tokenizer, result
