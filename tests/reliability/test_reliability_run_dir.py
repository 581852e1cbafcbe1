"""A run directory left by a killed pipeline: ``clean_partial`` restores an interrupted stage swap before it removes
anything, so the previous stage output is never lost (the two-rename swap of platforms without an atomic exchange)."""

from __future__ import annotations

import os
from pathlib import Path

from lmshrink.pipeline.runner import RunDirectory
from lmshrink.utils.io import atomic_directory

DEAD_PID = 2**22 + 11  # above Linux's largest pid_max: no such process


def _run_dir(tmp_path: Path) -> RunDirectory:
    rd = RunDirectory(tmp_path / "run")
    rd.prepare()
    return rd


def _dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(text)
    return path


def test_clean_partial_restores_the_previous_stage_output(tmp_path: Path) -> None:
    """Killed between 'move the old output aside' and 'move the new one in': only the backup and the temp remain."""
    rd = _run_dir(tmp_path)
    old = _dir(rd.stages / f".quantize.old-{DEAD_PID}", "previous")
    tmp = _dir(rd.stages / f".quantize.{DEAD_PID}.x1y2.tmp", "half-written")
    removed = rd.clean_partial()
    assert (rd.stage("quantize") / "weights").read_text() == "previous"
    assert not old.exists() and not tmp.exists()
    assert tmp.name in removed
    assert sorted(p.name for p in rd.stages.iterdir()) == ["quantize"]


def test_clean_partial_keeps_the_newer_output_and_drops_a_stale_backup(tmp_path: Path) -> None:
    """Killed after the new output was moved in, while the backup was being deleted."""
    rd = _run_dir(tmp_path)
    _dir(rd.stage("prune"), "new")
    old = _dir(rd.stages / f".prune.old-{DEAD_PID}", "previous")
    rd.clean_partial()
    assert (rd.stage("prune") / "weights").read_text() == "new"
    assert not old.exists()


def test_clean_partial_restores_a_backup_whose_pid_was_reused(tmp_path: Path) -> None:
    """The backup's pid now belongs to a live process (recover_directory leaves it alone): under the run lock no
    writer is alive, so clean_partial still moves it back rather than deleting it."""
    rd = _run_dir(tmp_path)
    live = os.getppid()
    _dir(rd.stages / f".distill.old-{live}", "previous")
    rd.clean_partial()
    assert (rd.stage("distill") / "weights").read_text() == "previous"
    assert sorted(p.name for p in rd.stages.iterdir()) == ["distill"]


def test_stage_write_after_cleanup_replaces_atomically(tmp_path: Path) -> None:
    rd = _run_dir(tmp_path)
    _dir(rd.stages / f".eval.old-{DEAD_PID}", "v1")
    rd.clean_partial()
    with atomic_directory(rd.stage("eval")) as out:
        (out / "weights").write_text("v2")
    assert (rd.stage("eval") / "weights").read_text() == "v2"
    assert sorted(p.name for p in rd.stages.iterdir()) == ["eval"]
