"""SIGKILL a writer at every step of an atomic write, and at random moments: the artifact under its final name is
always one complete version (the previous one or the new one), never a partial one, and never missing.

The writer is a subprocess using :mod:`lmshrink.utils.io`. Two ways to kill it:

- kill points: the child counts the file-system calls an atomic write makes (``os.replace``, ``os.fsync``,
  ``os.rename``, ``shutil.rmtree``, ``tempfile.mkdtemp``/``mkstemp``, file writes) and sends itself SIGKILL just before
  or just after the k-th one, for every k until a write completes: every step of the protocol is tried;
- random moments: the parent kills a child that rewrites the artifact in a loop after a random delay.

Directories are swapped in one atomic step on Linux (``renameat2(RENAME_EXCHANGE)``); mode ``dir-fallback`` forces
the two-rename protocol of other platforms and reads after :func:`~lmshrink.utils.io.recover_directory`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _reliability_harness import COUNTS

CHILD = textwrap.dedent(
    r"""
    import builtins, hashlib, json, os, shutil, signal, sys, tempfile
    from pathlib import Path

    import lmshrink.utils.io as lio
    from lmshrink.utils.io import atomic_directory, atomic_write_bytes

    target, mode, first, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kill_at = int(os.environ.get("KILL_AT", "0"))
    calls = [0]

    def point(what):
        calls[0] += 1
        if calls[0] == kill_at:
            sys.stderr.write(f"killed at {what}\n"); sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def hook(mod, name):
        orig = getattr(mod, name)
        def wrapped(*a, **k):
            point(f"before {name}{tuple(str(x)[-40:] for x in a[:2])}")
            out = orig(*a, **k)
            point(f"after {name}")
            return out
        setattr(mod, name, wrapped)

    if mode == "dir-fallback":  # a platform without an atomic exchange: two renames, repaired on the next open
        lio.exchange_paths = lambda a, b: False
    if kill_at:
        for mod, name in ((os, "replace"), (os, "rename"), (os, "fsync"), (shutil, "rmtree"),
                          (tempfile, "mkdtemp"), (tempfile, "mkstemp"), (lio, "exchange_paths")):
            hook(mod, name)
        orig_write = Path.write_bytes
        def write_bytes(self, data):
            point(f"before write {self.name}")
            half = len(data) // 2
            with open(self, "wb") as fh:
                fh.write(data[:half]); fh.flush()
                point(f"mid write {self.name}")
                fh.write(data[half:])
            point(f"after write {self.name}")
            return len(data)
        Path.write_bytes = write_bytes

    def payload(v):
        return hashlib.sha256(str(v).encode()).digest() * (4096 * (1 + v % 3))

    print("ready", flush=True)
    for v in range(first, first + count):
        data = payload(v)
        meta = json.dumps({"version": v, "sha256": hashlib.sha256(data).hexdigest()}).encode()
        if mode.startswith("dir"):
            with atomic_directory(target / "artifact") as tmp:
                (tmp / "weights.bin").write_bytes(data)
                (tmp / "meta.json").write_bytes(meta)
        else:
            atomic_write_bytes(target / "artifact.bin", len(meta).to_bytes(4, "little") + meta + data)
        print(v, flush=True)
    """
)


def _env() -> dict[str, str]:
    src = Path(__file__).resolve().parents[2] / "src"
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _spawn(
    script: Path, target: Path, mode: str, first: int, count: int, kill_at: int = 0
) -> subprocess.Popen[str]:
    env = {**_env(), "KILL_AT": str(kill_at)}
    cmd = [sys.executable, str(script), str(target), mode, str(first), str(count)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read(target: Path, mode: str) -> int:
    """The version of the complete artifact under its final name; AssertionError if it is missing or partial.

    ``dir-fallback`` (two renames instead of an atomic exchange) reads the way lmshrink opens a run or output
    directory: :func:`lmshrink.utils.io.recover_directory` first."""
    if mode == "dir-fallback":
        from lmshrink.utils.io import recover_directory

        recover_directory(target / "artifact")
    if mode.startswith("dir"):
        d = target / "artifact"
        assert d.is_dir(), (
            f"artifact directory missing; left behind: {sorted(p.name for p in target.iterdir())}"
        )
        meta = json.loads((d / "meta.json").read_bytes())
        data = (d / "weights.bin").read_bytes()
    else:
        raw = (target / "artifact.bin").read_bytes()
        n = int.from_bytes(raw[:4], "little")
        meta, data = json.loads(raw[4 : 4 + n]), raw[4 + n :]
    assert hashlib.sha256(data).hexdigest() == meta["sha256"], f"version {meta['version']} is partial"
    return int(meta["version"])


def _script(tmp_path: Path) -> Path:
    p = tmp_path / "writer.py"
    p.write_text(CHILD)
    return p


def _seed(script: Path, target: Path, mode: str) -> None:
    """Write version 0, completely, with no kill."""
    proc = _spawn(script, target, mode, 0, 1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("mode", ["file", "dir", "dir-fallback"])
def test_kill_at_every_step(mode: str, tmp_path: Path) -> None:
    script = _script(tmp_path)
    problems: list[str] = []
    k = 0
    while True:
        k += 1
        target = tmp_path / f"{mode}-{k}"
        target.mkdir()
        _seed(script, target, mode)
        proc = _spawn(script, target, mode, 1, 1, kill_at=k)
        _, err = proc.communicate(timeout=60)
        COUNTS[f"kill points ({mode})"] += 1
        where = next((ln for ln in err.splitlines() if ln.startswith("killed at")), "no kill")
        try:
            version = _read(target, mode)
            if proc.returncode == 0 and version != 1:
                problems.append(f"k={k}: finished but the artifact is version {version}")
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            problems.append(f"k={k} ({where}): {exc}")
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, f"k={k}: writer failed: {err[-500:]}"
        assert k < 200, "the writer never finished"
    assert not problems, f"{len(problems)} of {k} kill points lost the artifact:\n" + "\n".join(problems)


@pytest.mark.parametrize("mode", ["file", "dir"])
def test_kill_at_random_moments(mode: str, tmp_path: Path) -> None:
    script = _script(tmp_path)
    rng = random.Random(0)
    problems: list[str] = []
    target = tmp_path / mode
    target.mkdir()
    _seed(script, target, mode)
    last = 0
    trials = int(os.environ.get("LMSHRINK_KILL_TRIALS", "12"))
    for trial in range(trials):
        proc = _spawn(script, target, mode, last + 1, 10_000)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        COUNTS[f"random kills ({mode})"] += 1
        done = [int(x) for x in out.split()] or [last]
        try:
            version = _read(target, mode)
            if version < max(done):
                problems.append(
                    f"trial {trial}: artifact is version {version}, but {max(done)} had completed"
                )
            last = max(version, max(done))
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            problems.append(f"trial {trial}: {exc}")
            break
    assert not problems, "\n".join(problems)
