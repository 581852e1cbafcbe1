"""Text corpora (WikiText-2/103, C4) and SST-2, found locally or on the hub; never substituted.

Resolution order for every corpus: the explicit ``path`` argument (the file itself, or a data folder laid out like
``../shared/data``); the folder in ``$LMSHRINK_DATA``; the Hugging Face hub through the optional ``datasets``
package (only when it is installed and ``HF_HUB_OFFLINE`` is not set). When none works,
:class:`~lmshrink.errors.DataNotFoundError` lists every place that was tried and why it failed. Text is returned
exactly as stored (bytes decoded as UTF-8, no newline translation).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmshrink.errors import CorruptFileError, DataNotFoundError, LmshrinkError

log = logging.getLogger(__name__)

DATA_ENV = "LMSHRINK_DATA"


@dataclass(frozen=True)
class HubSource:
    """Where a split lives on the Hugging Face hub and how its rows become one text."""

    dataset: str
    config: str | None
    split: str
    joiner: str = "\n\n"
    column: str = "text"
    data_files: str | None = None
    max_rows: int | None = None


@dataclass(frozen=True)
class Corpus:
    """One named corpus: a relative file per split in the data folder, and hub equivalents (same text only)."""

    name: str
    files: dict[str, str]
    hub: dict[str, HubSource] = field(default_factory=dict)
    description: str = ""


_WT2_RAW = "wikitext-2-raw-v1"
CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        "wikitext2",
        files={"test": "wikitext-2-raw/test.txt"},
        hub={
            "test": HubSource("wikitext", _WT2_RAW, "test"),
            "validation": HubSource("wikitext", _WT2_RAW, "validation"),
            "train": HubSource("wikitext", _WT2_RAW, "train"),
        },
        description='WikiText-2 raw, rows joined with "\\n\\n" (the GPTQ / HF perplexity input)',
    ),
    "wikitext2-tokens": Corpus(
        "wikitext2-tokens",
        files={"test": "wikitext-2/test.tokens", "validation": "wikitext-2/valid.tokens"},
        hub={
            "test": HubSource("wikitext", "wikitext-2-v1", "test", joiner=""),
            "validation": HubSource("wikitext", "wikitext-2-v1", "validation", joiner=""),
        },
        description="WikiText-2 word-level tokenized files (<unk>), the classic word-LM data",
    ),
    "wikitext103": Corpus(
        "wikitext103",
        files={
            "test": "wikitext-103/test.tokens",
            "validation": "wikitext-103/valid.tokens",
            "train": "wikitext-103/train.partial.tokens",
        },
        hub={
            "test": HubSource("wikitext", "wikitext-103-v1", "test", joiner=""),
            "validation": HubSource("wikitext", "wikitext-103-v1", "validation", joiner=""),
        },
        description="WikiText-103 tokenized test/valid, and the first 2.5 MiB of train as split 'train'",
    ),
    "c4": Corpus(
        "c4",
        files={"validation": "c4/validation-2k.txt"},
        hub={
            "validation": HubSource(
                "allenai/c4",
                None,
                "validation",
                data_files="en/c4-validation.00000-of-00008.json.gz",
                max_rows=2000,
            ),
        },
        description="2,000 documents of C4 (en) validation joined with blank lines (GPTQ/AWQ calibration text)",
    ),
}

SPLIT_ALIASES: dict[str, str] = {
    "test": "test",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "dev": "validation",
    "calibration": "validation",
    "train": "train",
}

SST2_FILES: dict[str, str] = {
    "train": "sst2/train.tsv",
    "validation": "sst2/dev.tsv",
    "test": "sst2/test.tsv",
}
SST2_HUB: dict[str, HubSource] = {
    "train": HubSource("glue", "sst2", "train", column="sentence"),
    "validation": HubSource("glue", "sst2", "validation", column="sentence"),
}


def corpus_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_text`."""
    return tuple(CORPORA)


def _norm_split(split: str, accepted: list[str], what: str) -> str:
    key = SPLIT_ALIASES.get(split.strip().lower())
    if key is None or key not in accepted:
        raise LmshrinkError(f"{what} has no split {split!r}; accepted: {', '.join(accepted)}")
    return key


def _read_text_file(p: Path) -> str:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {p}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{p} is not valid UTF-8 text ({exc})") from exc
    if not text.strip():
        raise CorruptFileError(f"{p} is empty; expected corpus text")
    return text


def _hub_online() -> tuple[bool, str]:
    if importlib.util.find_spec("datasets") is None:
        return False, "the optional package 'datasets' is not installed (pip install 'lmshrink[hub]')"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return False, f"{var} is set"
    return True, ""


def _hub_rows(src: HubSource) -> list[object]:
    import datasets  # optional dependency

    if src.data_files is not None:
        ds = datasets.load_dataset(src.dataset, data_files={src.split: src.data_files}, split=src.split)
    else:
        ds = datasets.load_dataset(src.dataset, src.config, split=src.split)
    if src.max_rows is not None:
        ds = ds.select(range(min(src.max_rows, len(ds))))
    return list(ds[src.column]) if src.column != "*" else list(ds)


def _resolve(
    what: str,
    rel: str | None,
    hub: HubSource | None,
    path: str | os.PathLike[str] | None,
    read_hub: Callable[[HubSource], str],
) -> tuple[str, str]:
    """Return ``(text, where)`` from the first place that has the data; otherwise raise with every place tried."""
    tried: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        candidate = p / rel if (p.is_dir() and rel is not None) else p
        if candidate.is_file():
            return _read_text_file(candidate), str(candidate)
        tried.append(f"path argument: {candidate} (not found)")
    env = os.environ.get(DATA_ENV)
    if env and rel is not None:
        candidate = Path(env).expanduser() / rel
        if candidate.is_file():
            return _read_text_file(candidate), str(candidate)
        tried.append(f"${DATA_ENV}: {candidate} (not found)")
    elif rel is not None:
        tried.append(f"${DATA_ENV}: not set")
    else:
        tried.append("local files: this split is not part of the offline data folder")
    if hub is None:
        tried.append("hub: no hub source holds exactly this text")
    else:
        online, why = _hub_online()
        label = f"hub: {hub.dataset}" + (f"/{hub.config}" if hub.config else "") + f" split {hub.split}"
        if not online:
            tried.append(f"{label} (skipped: {why})")
        else:
            try:
                text = read_hub(hub)
            except Exception as exc:  # datasets raises many types (network, missing config, ...)
                tried.append(
                    f"{label} (failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                )
            else:
                if not text.strip():
                    raise CorruptFileError(f"{label} returned empty text")
                return text, label
    raise DataNotFoundError(f"{what} not found; tried: " + "; ".join(tried))


def load_text(name: str, split: str = "test", path: str | os.PathLike[str] | None = None) -> str:
    """The text of corpus ``name`` (``wikitext2``, ``wikitext2-tokens``, ``wikitext103``, ``c4``), one split.

    ``wikitext2`` test is ``wikitext-2-raw/test.txt`` exactly as stored (rows joined with ``"\\n\\n"``);
    ``wikitext103`` split ``train`` is the 2.5 MiB excerpt ``train.partial.tokens``; ``c4`` has split
    ``validation`` (alias ``calibration``). ``path`` may be the file itself or a data folder.
    """
    key = name.strip().lower()
    if key not in CORPORA:
        raise LmshrinkError(f"unknown corpus {name!r}; accepted: {', '.join(CORPORA)}")
    corpus = CORPORA[key]
    splits = sorted(set(corpus.files) | set(corpus.hub))
    sp = _norm_split(split, splits, f"corpus {key!r}")
    hub = corpus.hub.get(sp)

    def read_hub(src: HubSource) -> str:
        return src.joiner.join(str(r) for r in _hub_rows(src))

    text, where = _resolve(f"corpus {key!r} split {sp!r}", corpus.files.get(sp), hub, path, read_hub)
    log.debug("corpus %s/%s read from %s (%d chars)", key, sp, where, len(text))
    return text


def _parse_sst2(text: str, where: str) -> list[tuple[str, int]]:
    lines = text.split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if [h.strip().lower() for h in header] != ["sentence", "label"]:
        raise CorruptFileError(f"{where}: expected header 'sentence\\tlabel', found {lines[0][:60]!r}")
    rows: list[tuple[str, int]] = []
    for i, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        sentence, sep, label = line.rpartition("\t")
        if not sep or label.strip() not in ("0", "1"):
            raise CorruptFileError(f"{where}: line {i} is not 'sentence<TAB>0|1': {line[:80]!r}")
        rows.append((sentence, int(label)))
    if not rows:
        raise CorruptFileError(f"{where} holds no examples")
    return rows


def load_sst2(
    split: str = "train", path: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[tuple[str, int]]:
    """SST-2 examples ``(sentence, label)`` (label 1 = positive) of ``split`` (``train``, ``dev``, ``test``).

    Files: ``sst2/{train,dev,test}.tsv`` with header ``sentence\\tlabel``; ``limit`` keeps the first rows in file
    order. The hub fallback (``glue/sst2``) covers train and dev only (GLUE's test labels are hidden).
    """
    sp = _norm_split(split, sorted(SST2_FILES), "SST-2")
    if limit is not None and limit < 1:
        raise LmshrinkError(f"limit must be >= 1 (or None for all rows), got {limit}")

    def read_hub(src: HubSource) -> str:
        import datasets

        ds = datasets.load_dataset(src.dataset, src.config, split=src.split)
        return "sentence\tlabel\n" + "".join(
            f"{s}\t{lab}\n" for s, lab in zip(ds["sentence"], ds["label"], strict=True)
        )

    text, where = _resolve(f"SST-2 split {sp!r}", SST2_FILES[sp], SST2_HUB.get(sp), path, read_hub)
    rows = _parse_sst2(text, where)
    return rows[:limit] if limit is not None else rows
