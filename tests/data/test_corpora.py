"""Corpus resolution (path > $LMSHRINK_DATA > hub), exact text, SST-2 parsing, clear errors."""

from __future__ import annotations

import hashlib

import pytest

from lmshrink.data import corpora, load_sst2, load_text
from lmshrink.errors import CorruptFileError, DataNotFoundError, LmshrinkError


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def test_wikitext2_exact_bytes(data_dir):
    text = load_text("wikitext2")
    assert len(text.encode("utf-8")) == 1_296_370
    assert _sha16(text) == "696cca6b65a171b0"
    assert text.startswith("\n\n = Robert Boulter = \n")


@pytest.mark.parametrize(
    ("name", "split", "sha"),
    [
        ("wikitext2-tokens", "test", "d790b833ef8cf03a"),
        ("wikitext2-tokens", "valid", "f0737ed31fc13290"),
        ("wikitext103", "test", "56db52eb157b1ab5"),
        ("wikitext103", "validation", "9aee9f52d6e77de6"),
        ("wikitext103", "train", "7ecf65e37386ef44"),
        ("c4", "calibration", "0730f9cdaf955517"),
    ],
)
def test_corpus_files_match_published_hashes(data_dir, name, split, sha):
    assert _sha16(load_text(name, split)) == sha


def test_sst2_counts_and_labels(data_dir):
    counts = {s: len(load_sst2(s)) for s in ("train", "dev", "test")}
    assert counts == {"train": 67_349, "dev": 872, "test": 1_821}
    dev = load_sst2("validation")
    assert {lab for _, lab in dev} == {0, 1} and all(s and "\t" not in s for s, _ in dev)
    assert load_sst2("dev", limit=5) == dev[:5]
    with pytest.raises(LmshrinkError, match="limit"):
        load_sst2("dev", limit=0)


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode("utf-8"))
    return p


def test_resolution_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    _write(explicit, "wikitext-2-raw/test.txt", "from explicit\r\n")
    _write(env, "wikitext-2-raw/test.txt", "from env")
    monkeypatch.setenv("LMSHRINK_DATA", str(env))
    assert load_text("wikitext2", path=explicit) == "from explicit\r\n"  # exact bytes, no newline translation
    assert load_text("wikitext2") == "from env"
    single = _write(tmp_path, "mine.txt", "a file given directly")
    assert load_text("wikitext2", path=single) == "a file given directly"
    # explicit folder without the file: falls through to $LMSHRINK_DATA
    assert load_text("wikitext2", path=tmp_path / "nothing-here") == "from env"


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSHRINK_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as err:
        load_text("c4", "validation", path=tmp_path / "explicit")
    msg = str(err.value)
    assert str(tmp_path / "explicit") in msg and str(tmp_path / "env") in msg and "hub" in msg
    monkeypatch.delenv("LMSHRINK_DATA")
    with pytest.raises(DataNotFoundError, match="LMSHRINK_DATA: not set"):
        load_sst2("test")


def test_hub_fallback_when_local_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSHRINK_DATA", str(tmp_path))
    monkeypatch.setattr(corpora, "_hub_online", lambda: (True, ""))
    seen = []

    def fake_rows(src):
        seen.append((src.dataset, src.config, src.split))
        return [" = Title = \n", "", " body \n"]

    monkeypatch.setattr(corpora, "_hub_rows", fake_rows)
    assert load_text("wikitext2") == " = Title = \n\n\n\n\n body \n"
    assert seen == [("wikitext", "wikitext-2-raw-v1", "test")]
    assert load_text("wikitext2-tokens", "valid") == " = Title = \n body \n"

    def broken(src):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(corpora, "_hub_rows", broken)
    with pytest.raises(DataNotFoundError, match="network unreachable"):
        load_text("wikitext2")
    with pytest.raises(DataNotFoundError, match="no hub source"):
        load_text("wikitext103", "train")  # the local excerpt is not on the hub: never substituted


def test_empty_and_malformed_files(tmp_path):
    _write(tmp_path, "wikitext-2-raw/test.txt", "  \n\n ")
    with pytest.raises(CorruptFileError, match="empty"):
        load_text("wikitext2", path=tmp_path)
    _write(tmp_path, "sst2/dev.tsv", "text,label\nfoo,1\n")
    with pytest.raises(CorruptFileError, match="header"):
        load_sst2("dev", path=tmp_path)
    _write(tmp_path, "sst2/dev.tsv", "sentence\tlabel\ngood\t1\nbad\tpositive\n")
    with pytest.raises(CorruptFileError, match="line 3"):
        load_sst2("dev", path=tmp_path)
    _write(tmp_path, "sst2/dev.tsv", "sentence\tlabel\r\ngood , fun\t1\r\nbad\t0\r\n")
    assert load_sst2("dev", path=tmp_path) == [("good , fun", 1), ("bad", 0)]


def test_unknown_names_and_splits():
    with pytest.raises(LmshrinkError, match="wikitext2, wikitext2-tokens, wikitext103, c4"):
        load_text("ptb")
    with pytest.raises(LmshrinkError, match="accepted: validation"):
        load_text("c4", "test")
    with pytest.raises(LmshrinkError, match="no split"):
        load_sst2("holdout")
