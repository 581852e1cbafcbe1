"""Perplexity of causal language models under stated protocols.

Protocols (every result records which one, with its context length, stride and token/word level):

- ``"gptq"`` (default): the test text joined as one string (WikiText-2 rows joined with ``"\\n\\n"``), tokenized
  once, cut into non-overlapping windows of ``ctx`` tokens (default ``min(model maximum, 2048)``). Every window
  is scored on all of its predicted tokens (``ctx - 1`` per window; the first token of a window has no context).
  The last partial window (``n_tokens % ctx`` tokens) is dropped, exactly as the GPTQ/SparseGPT/AWQ evaluation
  code does; ``protocol["dropped_tail_tokens"]`` says how many.
- ``"stride"``: the Hugging Face sliding window. Windows of ``ctx`` tokens start every ``stride`` tokens; the first
  window scores all its predicted tokens, each later one only its last ``stride`` tokens (the others serve as
  context). The last window ends at the last token, so every token but the first is scored exactly once.

Log-probabilities are computed in float32 from the model's hidden states through its output head in chunks of
positions, so memory stays bounded for large vocabularies and batches.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.evaluation.results import PerplexityResult
from lmshrink.utils.env import provenance, resolve_device

log = logging.getLogger(__name__)

PROTOCOLS = ("gptq", "stride")
DEFAULT_MAX_CTX = 2048
#: Positions per log-softmax chunk, shared by the rows of a batch: 512 x 49152 float32 logits = 100 MB.
CHUNK_POSITIONS = 512

DataSpec = str | os.PathLike[str] | torch.Tensor


@dataclass(frozen=True)
class TokenStream:
    """Tokens to evaluate on, where they came from, and the text they cover (for word-level counts)."""

    ids: torch.Tensor  # (N,) int64
    description: str
    text: str | None
    truncated_from: int | None = None


@dataclass(frozen=True)
class Window:
    """Tokens ``ids[start:end]``; positions ``>= score_from`` inside the window are scored as targets."""

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def n_scored(self) -> int:
        return self.length - self.score_from


# --------------------------------------------------------------------------------------------- data resolution


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    from lmshrink.data import tokenize_corpus

    return tokenize_corpus(tokenizer, text).reshape(-1).long()


def _tokenizer_name(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # raw text that is not a valid path (too long, NUL bytes)
        return False


def resolve_tokens(tokenizer: Any, data: DataSpec, max_tokens: int | None = None) -> TokenStream:
    """Turn ``data`` into a 1-D token stream.

    ``data`` is a corpus name (no whitespace, resolved with :func:`lmshrink.data.load_text`, test split), a path
    to an existing text file, raw text (anything containing whitespace), or a 1-D ``LongTensor`` of token ids.
    ``max_tokens`` keeps only the first ``max_tokens`` tokens.

    >>> resolve_tokens(None, torch.arange(10), max_tokens=4).ids.tolist()
    [0, 1, 2, 3]
    """
    text: str | None = None
    if isinstance(data, torch.Tensor):
        if data.dim() == 2 and data.shape[0] == 1:
            data = data[0]
        if data.dim() != 1 or data.dtype not in (torch.int64, torch.int32):
            raise LmshrinkError(
                f"token data must be a 1-D integer tensor, got shape {tuple(data.shape)} dtype {data.dtype}"
            )
        ids = data.long().cpu()
        description = f"token ids ({ids.numel()} tokens)"
    else:
        if not isinstance(data, str | os.PathLike):
            raise LmshrinkError(
                f"data must be a corpus name, a text file path, raw text or a 1-D token tensor, got {type(data)}"
            )
        if tokenizer is None:
            raise LmshrinkError(
                "a tokenizer is required to evaluate on text; pass token ids to evaluate without one"
            )
        spec = os.fspath(data)
        path = Path(spec)
        if _is_file(path):
            text = path.read_text(encoding="utf-8")
            description = f"file {path}"
        elif spec.strip() and not any(c.isspace() for c in spec):
            from lmshrink.data import load_text

            text = load_text(spec, split="test")
            description = f"{spec} (test split)"
        else:
            text = spec
            description = f"raw text ({len(text)} characters)"
        if not text.strip():
            raise LmshrinkError(f"the evaluation text from {description} is empty")
        ids = _tokenize(tokenizer, text)
    if ids.numel() == 0:
        raise LmshrinkError(f"no tokens to evaluate in {description}")
    truncated_from = None
    if max_tokens is not None:
        if max_tokens < 2:
            raise LmshrinkError(f"max_tokens must be at least 2, got {max_tokens}")
        if ids.numel() > max_tokens:
            truncated_from = ids.numel()
            ids = ids[:max_tokens]
            text = None  # no longer the text that is covered; recomputed from the tokens when needed
    return TokenStream(ids=ids, description=description, text=text, truncated_from=truncated_from)


# --------------------------------------------------------------------------------------------- model helpers


def model_max_length(model: nn.Module) -> int | None:
    """Longest context the model supports (from its config), or ``None`` if it does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_name(model: nn.Module) -> str:
    """A readable name: the model's ``name_or_path`` or its class name."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else type(model).__name__


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def place_model(model: nn.Module, device: str | None) -> torch.device:
    """Move ``model`` to ``device`` if one is named; otherwise keep it where it is. Returns the device."""
    if device is None:
        return model_device(model)
    dev = resolve_device(device)
    if model_device(model) != dev:
        model.to(dev)
    return dev


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head (``get_output_embeddings()``) or ``None`` for models without one."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Module) else None


def check_causal_lm(model: nn.Module) -> None:
    """Raise :class:`LmshrinkError` unless ``model`` returns next-token logits."""
    if output_head(model) is None:
        raise LmshrinkError(
            f"{type(model).__name__} is not a causal language model (no output head); perplexity needs one, "
            "e.g. a *ForCausalLM model; use evaluate_accuracy for classifiers"
        )


def check_token_range(model: nn.Module, ids: torch.Tensor) -> None:
    """Raise :class:`LmshrinkError` if a token id is outside the model's vocabulary (tokenizer/model mismatch)."""
    head = output_head(model)
    vocab = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise LmshrinkError(
            f"token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has {vocab} "
            "entries; the tokenizer does not belong to this model"
        )


def resolve_ctx(model: nn.Module, ctx: int | None) -> int:
    """``ctx`` checked against the model's maximum; default ``min(maximum, 2048)``."""
    limit = model_max_length(model)
    if ctx is None:
        return min(limit, DEFAULT_MAX_CTX) if limit else DEFAULT_MAX_CTX
    if ctx < 2:
        raise LmshrinkError(f"ctx must be at least 2 tokens, got {ctx}")
    if limit is not None and ctx > limit:
        raise LmshrinkError(
            f"ctx {ctx} exceeds the model's maximum context of {limit} tokens; use ctx <= {limit}"
        )
    return ctx


class LogitSource:
    """Float32 logits of a causal LM for chunks of positions, without materialising (B, T, V) at once.

    When the model exposes its body (``base_model``) and output head (``get_output_embeddings``) and applies no
    logit post-processing, the body runs once and the head is applied chunk by chunk; otherwise the full forward
    runs and its logits are sliced.
    """

    _POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = getattr(model, "config", None)
        head = output_head(model)
        body = getattr(model, "base_model", None)
        post = any(getattr(config, k, None) not in (None, 1, 1.0) for k in self._POST_PROCESSING)
        self.split = head is not None and isinstance(body, nn.Module) and body is not model and not post
        self.head = head
        self.body = body if isinstance(body, nn.Module) else model

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, H) when split, else logits (B, T, V)."""
        if self.split:
            out = self.body(input_ids=input_ids, use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.model(input_ids=input_ids, use_cache=False).logits

    def logits(self, state: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Float32 logits (B, hi-lo, V) for positions ``lo:hi`` of a state returned by :meth:`run`."""
        chunk = state[:, lo:hi]
        if self.split:
            assert self.head is not None
            chunk = self.head(chunk)
        return chunk.float()


def chunk_size(batch: int) -> int:
    """Positions per log-softmax chunk for a batch of ``batch`` windows (bounded total logits)."""
    return max(1, CHUNK_POSITIONS // batch)


def chunk_bounds(score_from: int, length: int, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """Position ranges ``[lo, hi)`` of predicting positions ``score_from - 1 .. length - 2`` in chunks."""
    chunk = chunk or CHUNK_POSITIONS
    lo = score_from - 1
    while lo < length - 1:
        hi = min(lo + chunk, length - 1)
        yield lo, hi
        lo = hi


def make_windows(n_tokens: int, ctx: int, protocol: str, stride: int | None) -> tuple[list[Window], int]:
    """Windows of a protocol, and how many tail tokens are left unscored (GPTQ drops the partial window)."""
    if protocol == "gptq":
        n = n_tokens // ctx
        if n == 0:
            raise LmshrinkError(
                f"the text has {n_tokens} tokens, fewer than one window of ctx={ctx}; pass a smaller ctx, "
                "more text, or protocol='stride'"
            )
        return [Window(i * ctx, (i + 1) * ctx, 1) for i in range(n)], n_tokens - n * ctx
    if protocol == "stride":
        if stride is None:
            stride = max(1, ctx // 2)
        if not 1 <= stride <= ctx:
            raise LmshrinkError(f"stride must be between 1 and ctx ({ctx}), got {stride}")
        if n_tokens < 2:
            raise LmshrinkError(f"the text has {n_tokens} token(s); at least 2 are needed")
        windows: list[Window] = []
        prev_end = 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + ctx, n_tokens)
            n_new = end - max(prev_end, begin + 1)
            windows.append(Window(begin, end, end - begin - n_new))
            prev_end = end
            if end == n_tokens:
                break
        return windows, 0
    raise LmshrinkError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def batches_of(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows grouped into batches of equal window length and equal ``score_from``."""
    if batch_size < 1:
        raise LmshrinkError(f"batch_size must be at least 1, got {batch_size}")
    group: list[Window] = []
    for w in windows:
        if group and (
            len(group) == batch_size or (w.length, w.score_from) != (group[0].length, group[0].score_from)
        ):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def stack_windows(ids: torch.Tensor, group: list[Window], device: torch.device) -> torch.Tensor:
    """(B, T) input ids of a batch of equal-length windows."""
    return torch.stack([ids[w.start : w.end] for w in group]).to(device)


def word_count(tokenizer: Any, stream: TokenStream, windows: list[Window]) -> int:
    """Whitespace-separated words of the text covered by the windows."""
    end = windows[-1].end
    text = stream.text
    if text is None or end < stream.ids.numel():
        if tokenizer is None:
            raise LmshrinkError("word-level perplexity needs a tokenizer to recover the text of the tokens")
        text = tokenizer.decode(stream.ids[:end].tolist(), skip_special_tokens=True)
    n = len(text.split())
    if n == 0:
        raise LmshrinkError("the evaluated text contains no words; word-level perplexity is undefined")
    return n


# --------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def _score(
    model: nn.Module,
    ids: torch.Tensor,
    windows: list[Window],
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[float, int, int]:
    """Sum of nll, number of scored tokens, number of correct top-1 predictions over the windows."""
    source = LogitSource(model)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    n_correct = torch.zeros((), dtype=torch.int64, device=device)
    n_scored = 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="win", disable=not progress, leave=False)
    for group in batches_of(windows, batch_size):
        x = stack_windows(ids, group, device)  # (B, T)
        state = source.run(x)
        for lo, hi in chunk_bounds(group[0].score_from, x.shape[1], chunk_size(len(group))):
            logits = source.logits(state, lo, hi)  # (B, C, V) float32
            target = x[:, lo + 1 : hi + 1]  # (B, C)
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total_nll += nll.double().sum()
            n_correct += (logits.argmax(-1) == target).sum()
            n_scored += target.numel()
        bar.update(len(group))
    bar.close()
    value = float(total_nll)
    if not math.isfinite(value):
        raise NumericsError(
            "the model produced non-finite log-probabilities; its weights may contain NaN or Inf"
        )
    return value, n_scored, int(n_correct)


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    data: DataSpec = "wikitext2",
    *,
    protocol: str = "gptq",
    ctx: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    word_level: bool = False,
    batch_size: int = 1,
    device: str | None = None,
    progress: bool = True,
    name: str | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``data`` (see the module docstring for the protocols).

    ``data``: corpus name (``"wikitext2"``), text file path, raw text, or a 1-D token tensor (then ``tokenizer``
    may be ``None``). ``max_tokens`` truncates the token stream for quick runs. ``word_level`` reports
    ``exp(total nll / words)`` with words counted by whitespace split of the text the scored windows cover.
    ``device`` moves the model there; ``None`` keeps it where it is.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...     num_attention_heads=2, vocab_size=50, max_position_embeddings=64))
    >>> r = evaluate_perplexity(m, None, torch.randint(0, 50, (256,)), ctx=64, progress=False)
    >>> r.n_windows, r.n_tokens
    (4, 252)
    """
    check_causal_lm(model)
    if protocol not in PROTOCOLS:
        raise LmshrinkError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "gptq" and stride is not None:
        raise LmshrinkError(
            "stride only applies to protocol='stride'; the gptq protocol uses non-overlapping windows"
        )
    n_ctx = resolve_ctx(model, ctx)
    stream = resolve_tokens(tokenizer, data, max_tokens)
    check_token_range(model, stream.ids)
    windows, dropped = make_windows(stream.ids.numel(), n_ctx, protocol, stride)
    dev = place_model(model, device)
    was_training = model.training
    model.eval()
    try:
        total_nll, n_scored, n_correct = _score(model, stream.ids, windows, batch_size, dev, progress)
    finally:
        model.train(was_training)
    token_ppl = math.exp(total_nll / n_scored)
    n_words = word_count(tokenizer, stream, windows) if word_level else None
    ppl = math.exp(total_nll / n_words) if n_words else token_ppl
    info: dict[str, Any] = {
        "name": protocol,
        "ctx": n_ctx,
        "stride": (stride or max(1, n_ctx // 2)) if protocol == "stride" else n_ctx,
        "level": "word" if word_level else "token",
        "tokenizer": _tokenizer_name(tokenizer),
        "tokens_in_stream": stream.ids.numel(),
        "truncated_from": stream.truncated_from,
        "max_tokens": max_tokens,
        "dropped_tail_tokens": dropped,
        "batch_size": batch_size,
        "logits": "float32 log-softmax",
    }
    return PerplexityResult(
        model=name or model_name(model),
        data=stream.description,
        protocol=info,
        provenance=provenance(dev, model_dtype(model)),
        perplexity=ppl,
        token_perplexity=token_ppl,
        nll=total_nll / n_scored,
        total_nll=total_nll,
        n_tokens=n_scored,
        n_windows=len(windows),
        n_words=n_words,
        next_token_accuracy=n_correct / n_scored,
    )
