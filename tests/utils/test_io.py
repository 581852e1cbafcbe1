import os

import pytest

from lmshrink.errors import LmshrinkError
from lmshrink.utils.io import (
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    directory_size,
    recover_directory,
)


def test_atomic_directory_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("v2-partial")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recover_interrupted_swap_and_stale_temps(tmp_path):
    out = tmp_path / "ckpt"
    # a writer killed between "move old aside" and "move new in": only the backup and its temp remain
    old = tmp_path / f".ckpt.old-{2**22 + 7}"
    old.mkdir()
    (old / "w").write_text("previous")
    stale = tmp_path / f".ckpt.{2**22 + 7}.abc123.tmp"
    stale.mkdir()
    recover_directory(out)
    assert (out / "w").read_text() == "previous"
    assert not old.exists() and not stale.exists()


def test_atomic_file_writes_and_size(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "hello")
    atomic_write_json(tmp_path / "j.json", {"a": 1})
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert directory_size(tmp_path) == sum(f.stat().st_size for f in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_parent_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file-not-dir"
        target.write_text("x")
        with pytest.raises(LmshrinkError, match="cannot create output directory"):
            atomic_write_text(target / "out.txt", "x")
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(LmshrinkError, match="no write permission"):
            atomic_write_text(ro / "out.txt", "x")


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    import stat

    from lmshrink.utils.io import atomic_write_text

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.txt"
        atomic_write_text(new, "x")
        assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("a")
        kept.chmod(0o640)
        atomic_write_text(kept, "b")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "b"
    finally:
        os.umask(old)


def test_atomic_directory_gets_the_mode_of_a_plain_mkdir(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as d:
            (d / "f").write_text("x")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    finally:
        os.umask(old)
