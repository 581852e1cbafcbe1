"""Tokenizing a whole corpus, and seeded random calibration windows (the GPTQ/AWQ recipe).

:func:`tokenize_corpus` gives exactly the ids that one ``tokenizer(text)`` call gives (the GPTQ protocol tokenizes
the joined test text in one call), but tokenizes in pieces split at paragraph boundaries, batched, so megabyte
texts neither trigger the "sequence longer than the model maximum" warning nor the slow single-string path. A split
point is used only when tokenizing the text around it in one piece and in two pieces agree, so the result does not
depend on the chunking (tokenizers that mark the start of a text, such as SentencePiece with a prefix space,
simply get fewer or no split points).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections import OrderedDict
from typing import Any

import torch

from lmshrink.data.corpora import load_text
from lmshrink.errors import LmshrinkError

log = logging.getLogger(__name__)

CHUNK_CHARS = 64_000
_PROBE_CHARS = 400
_BOUNDARY = re.compile(r"\n\n\s*(?=\S)")
_CACHE: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
_CACHE_SIZE = 6
#: default split used for calibration text per corpus (never a test split when another exists)
CALIBRATION_SPLITS: dict[str, str] = {
    "c4": "validation",
    "wikitext103": "train",
    "wikitext2": "train",
    "wikitext2-tokens": "validation",
}


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Ids a single ``tokenizer(text)`` call adds before and after the text (BOS, [CLS] ... [SEP])."""
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"]
    n = len(plain)
    for i in range(len(full) - n + 1):
        if list(full[i : i + n]) == list(plain):
            return list(full[:i]), list(full[i + n :])
    return [], []


def _split_points(tokenizer: Any, text: str, chunk_chars: int) -> list[int]:
    """Paragraph boundaries about ``chunk_chars`` apart at which tokenization is verified not to change."""
    points: list[int] = []
    last = 0
    pos = chunk_chars
    while pos < len(text) - chunk_chars // 4:
        found = False
        for m in _BOUNDARY.finditer(text, pos, min(len(text), pos + chunk_chars // 2)):
            # split before the last whitespace character of the run: BPE pre-tokenizers attach it to the next word
            cut = m.end() - 1 if m.end() - 1 > m.start() else m.end()
            left = text[max(last, cut - _PROBE_CHARS) : cut]
            right = text[cut : cut + _PROBE_CHARS]
            a, b, ab = _encode(tokenizer, [left, right, left + right])
            if a + b == ab:
                points.append(cut)
                last = cut
                pos = cut + chunk_chars
                found = True
                break
        if not found:
            pos += chunk_chars // 2
    return points


def tokenize_corpus(
    tokenizer: Any, text: str, *, add_special_tokens: bool = True, chunk_chars: int = CHUNK_CHARS
) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``LongTensor``, identical to one ``tokenizer(text)`` call.

    With ``add_special_tokens=True`` (the GPTQ protocol) the tokenizer's special tokens appear once around the whole
    text (e.g. one BOS at the start for Llama-2, none for SmolLM2/GPT-2, [CLS] ... [SEP] for BERT) and never inside
    it; ``False`` gives the bare text ids. Results are cached in memory per (tokenizer, text).
    """
    if not isinstance(text, str) or not text:
        raise LmshrinkError("cannot tokenize an empty text")
    name = getattr(tokenizer, "name_or_path", "") or ""
    key: tuple[Any, ...] | None = None
    if name:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()
        key = (type(tokenizer).__name__, name, len(tokenizer), add_special_tokens, digest)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key].clone()
    cuts = (
        [0, *_split_points(tokenizer, text, chunk_chars), len(text)]
        if len(text) > chunk_chars
        else [0, len(text)]
    )
    pieces = [text[a:b] for a, b in itertools.pairwise(cuts)]
    ids: list[int] = []
    for piece_ids in _encode(tokenizer, pieces):
        ids.extend(piece_ids)
    if add_special_tokens:
        before, after = _special_tokens(tokenizer)
        ids = before + ids + after
    out = torch.tensor(ids, dtype=torch.long)
    log.debug("tokenized %d chars into %d tokens in %d pieces", len(text), out.numel(), len(pieces))
    if key is not None:
        _CACHE[key] = out
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return out.clone()
    return out


def calibration_batches(
    tokenizer: Any,
    name: str = "c4",
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    path: str | None = None,
    *,
    split: str | None = None,
    text: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` random windows of ``seq_len`` tokens from corpus ``name`` (seeded, reproducible).

    Each item is ``{"input_ids": LongTensor (1, seq_len)}``. The corpus is tokenized without special tokens;
    window starts are drawn uniformly with ``torch.Generator().manual_seed(seed)``. ``split`` defaults to the
    corpus's calibration split (c4: validation, wikitext103: the train excerpt); ``text`` overrides the corpus.
    """
    if n_samples < 1:
        raise LmshrinkError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < 1:
        raise LmshrinkError(f"seq_len must be >= 1, got {seq_len}")
    if text is None:
        sp = split or CALIBRATION_SPLITS.get(name.strip().lower(), "validation")
        text = load_text(name, split=sp, path=path)
        label = f"{name}/{sp}"
    else:
        label = "the given text"
    ids = tokenize_corpus(tokenizer, text, add_special_tokens=False)
    if ids.numel() < seq_len:
        raise LmshrinkError(
            f"calibration text {label} has {ids.numel()} tokens, fewer than seq_len={seq_len}; "
            "use a shorter seq_len or a longer corpus"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return [{"input_ids": ids[s : s + seq_len].unsqueeze(0).clone()} for s in starts.tolist()]
