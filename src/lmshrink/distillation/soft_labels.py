"""Teacher soft labels, computed once and stored compactly on disk so that student epochs never rerun the teacher.

Layout of a soft-label directory (written atomically, read memory-mapped):

- ``header.json``: format, vocab_size, top_k, seq_len, n_blocks, temperature, dtypes, sha256 of every array
- ``input_ids.npy``  (n_blocks, seq_len) token ids the labels belong to
- ``probs.npy``      (n_blocks, seq_len, k) float16 teacher probabilities of its top-k tokens, descending
- ``indices.npy``    (n_blocks, seq_len, k) uint16 (vocab < 65536) or int32 token ids of those probabilities
- ``rest.npy``       (n_blocks, seq_len)    float32 probability mass outside the top-k

Storage is ``k x 4 + 4`` bytes per token (k=32: 132 B) against ``vocab x 2`` for full fp16 distributions.

>>> labels = SoftLabels.open("runs/soft")  # doctest: +SKIP
>>> probs, idx, rest = labels.batch([0, 1])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmshrink.distillation.losses import check_temperature
from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.utils.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = "lmshrink-soft-labels/1"
_ARRAYS = ("input_ids", "probs", "indices", "rest")


def make_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into non-overlapping ``(n_blocks, seq_len)`` blocks (the tail is dropped)."""
    if ids.dim() != 1:
        raise LmshrinkError(f"token ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise LmshrinkError(f"seq_len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise LmshrinkError(
            f"the data has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}; give more text"
        )
    return ids[: n * seq_len].view(n, seq_len)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out[0]


@dataclass
class SoftLabels:
    """Memory-mapped top-k soft labels of a teacher; see the module docstring for the layout."""

    path: Path
    header: dict[str, Any]
    input_ids: np.ndarray
    probs: np.ndarray
    indices: np.ndarray
    rest: np.ndarray

    @property
    def top_k(self) -> int:
        """Number of stored teacher tokens per position."""
        return int(self.header["top_k"])

    @property
    def temperature(self) -> float:
        """Temperature the probabilities were computed at."""
        return float(self.header["temperature"])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the teacher."""
        return int(self.header["vocab_size"])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def bytes_on_disk(self) -> int:
        """Total size of the arrays and header."""
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def blocks(self) -> torch.Tensor:
        """All token blocks as a ``(n_blocks, seq_len)`` LongTensor."""
        return torch.from_numpy(np.asarray(self.input_ids, dtype=np.int64))

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(probs float32, indices int64, rest float32)`` for the given block rows."""
        r = np.asarray(rows, dtype=np.int64)
        probs = torch.from_numpy(np.asarray(self.probs[r], dtype=np.float32))
        idx = torch.from_numpy(np.asarray(self.indices[r]).astype(np.int64))
        rest = torch.from_numpy(np.asarray(self.rest[r], dtype=np.float32))
        return probs, idx, rest

    @classmethod
    @torch.no_grad()
    def generate(
        cls,
        teacher: nn.Module,
        ids: torch.Tensor,
        path: str | Path,
        top_k: int = 32,
        seq_len: int = 128,
        batch_size: int = 16,
        temperature: float = 1.0,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> SoftLabels:
        """Run ``teacher`` over ``ids`` (1-D token stream, cut into ``seq_len`` blocks) and store its top-k.

        >>> labels = SoftLabels.generate(teacher, ids, "runs/soft", top_k=32, seq_len=128)  # doctest: +SKIP
        """
        t = check_temperature(temperature)
        blocks = make_blocks(ids, seq_len)
        vocab = int(teacher.get_input_embeddings().num_embeddings)  # type: ignore[operator, union-attr]
        if not 1 <= top_k <= vocab:
            raise LmshrinkError(f"top_k must be between 1 and the vocabulary size {vocab}, got {top_k}")
        if batch_size < 1:
            raise LmshrinkError(f"batch_size must be >= 1, got {batch_size}")
        dev = torch.device(device) if device is not None else next(teacher.parameters()).device
        idx_dtype = np.uint16 if vocab <= 65536 else np.int32
        n = blocks.shape[0]
        was_training = teacher.training
        teacher.eval()
        final = Path(path)
        try:
            with atomic_directory(final) as tmp:
                arrays = {
                    "input_ids": np.lib.format.open_memmap(
                        tmp / "input_ids.npy", "w+", idx_dtype, (n, seq_len)
                    ),
                    "probs": np.lib.format.open_memmap(
                        tmp / "probs.npy", "w+", np.float16, (n, seq_len, top_k)
                    ),
                    "indices": np.lib.format.open_memmap(
                        tmp / "indices.npy", "w+", idx_dtype, (n, seq_len, top_k)
                    ),
                    "rest": np.lib.format.open_memmap(tmp / "rest.npy", "w+", np.float32, (n, seq_len)),
                }
                for start in tqdm(
                    range(0, n, batch_size), desc="soft labels", disable=not progress, unit="batch"
                ):
                    x = blocks[start : start + batch_size]
                    logits = _logits(teacher, x.to(dev)).float() / t  # (B, T, V)
                    p = torch.softmax(logits, dim=-1)
                    top_p, top_i = p.topk(top_k, dim=-1)  # (B, T, k)
                    sl = slice(start, start + x.shape[0])
                    arrays["input_ids"][sl] = x.numpy().astype(idx_dtype)
                    arrays["probs"][sl] = top_p.cpu().numpy().astype(np.float16)
                    arrays["indices"][sl] = top_i.cpu().numpy().astype(idx_dtype)
                    arrays["rest"][sl] = (1.0 - top_p.sum(-1)).clamp_min(0).cpu().numpy()
                for arr in arrays.values():
                    arr.flush()
                del arrays
                header = {
                    "format": FORMAT,
                    "vocab_size": vocab,
                    "top_k": top_k,
                    "seq_len": seq_len,
                    "n_blocks": n,
                    "temperature": t,
                    "index_dtype": np.dtype(idx_dtype).name,
                    "sha256": {name: _sha256(tmp / f"{name}.npy") for name in _ARRAYS},
                }
                atomic_write_json(tmp / "header.json", header)
        finally:
            teacher.train(was_training)
        labels = cls.open(final)
        log.info(
            "soft labels: %d blocks x %d tokens, top-%d, %.1f MB",
            n,
            seq_len,
            top_k,
            labels.bytes_on_disk() / 1e6,
        )
        return labels

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> SoftLabels:
        """Open a soft-label directory memory-mapped; ``verify`` checks every array's sha256 (a corrupt or
        truncated file is a :class:`CorruptFileError`)."""
        root = Path(path)
        header_file = root / "header.json"
        if not header_file.is_file():
            raise LmshrinkError(
                f"{root} is not a soft-label directory (no header.json); create it with generate()"
            )
        try:
            header = json.loads(header_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"soft-label header {header_file} is not valid JSON: {exc}") from exc
        if header.get("format") != FORMAT:
            raise CorruptFileError(f"{header_file} has format {header.get('format')!r}, expected {FORMAT!r}")
        arrays: dict[str, np.ndarray] = {}
        for name in _ARRAYS:
            file = root / f"{name}.npy"
            if verify and _sha256(file) != header["sha256"][name]:
                raise CorruptFileError(
                    f"soft-label array {file} does not match its checksum; regenerate the labels"
                )
            try:
                arrays[name] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise CorruptFileError(f"cannot read soft-label array {file}: {exc}") from exc
        n, seq, k = header["n_blocks"], header["seq_len"], header["top_k"]
        expected = {"input_ids": (n, seq), "probs": (n, seq, k), "indices": (n, seq, k), "rest": (n, seq)}
        for name, shape in expected.items():
            if tuple(arrays[name].shape) != shape:
                raise CorruptFileError(
                    f"{root / name}.npy has shape {arrays[name].shape}, header says {shape}"
                )
        return cls(root, header, **arrays)


def topk_reconstruction_kl(
    teacher_logits: torch.Tensor, top_k: int, temperature: float = 1.0
) -> dict[str, float]:
    """How much a top-k soft label loses: KL(full || top-k with the rest spread uniformly), mean rest mass, and the
    fp16 rounding, for the teacher ``logits (..., V)``. Used to report the quality of stored labels.

    >>> stats = topk_reconstruction_kl(torch.randn(4, 100) * 3, top_k=10)
    >>> stats["kl_uniform_tail"] >= 0
    True
    """
    p = torch.softmax(teacher_logits.float() / check_temperature(temperature), dim=-1)
    vocab = p.shape[-1]
    top_p, top_i = p.topk(top_k, dim=-1)
    top_p16 = top_p.half().float()
    rest = (1.0 - top_p.sum(-1)).clamp_min(0)
    q = (rest / max(vocab - top_k, 1)).unsqueeze(-1).expand_as(p).clone()
    q.scatter_(-1, top_i, top_p16)
    q = q.clamp_min(1e-30)
    q = q / q.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - p * q.log()).sum(-1)
    return {
        "top_k": float(top_k),
        "kl_uniform_tail": float(kl.mean()),
        "rest_mass_mean": float(rest.mean()),
        "fp16_max_abs_error": float((top_p16 - top_p).abs().max()),
    }
