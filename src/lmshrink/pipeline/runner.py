"""Run a recipe in a run directory: one directory per stage, skip what is unchanged, never a half-written stage.

Layout of ``RUN_DIR``::

    recipe.yaml            the validated recipe, every default spelled out
    run.json               status of every stage (pending / running / complete / skipped / failed / interrupted)
    .lock                  held (flock) while a process runs the pipeline
    stages/NAME/           a finished stage: stage.json (fingerprint, inputs, timing, provenance), results.json,
                           model/ (for stages that produce a model), other artifacts
    stages/.NAME.*.tmp     a stage being written (renamed to stages/NAME when complete; removed if interrupted)
    work/NAME-FPRINT/      scratch that survives an interruption (training checkpoints), removed when the stage ends
    cache/                 per-model evaluation results keyed by model fingerprint and protocol
    report.md report.html figures/

A stage's *fingerprint* hashes its settings, the recipe seed and the fingerprints of the stages it reads (and the
bytes of any file it reads), so changing a stage reruns it and everything downstream, and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmshrink.errors import LmshrinkError
from lmshrink.recipes import Recipe, StageConfig
from lmshrink.utils.env import now_iso, provenance
from lmshrink.utils.io import atomic_directory, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

StageRunner = Callable[["StageContext", Any], dict[str, Any]]

#: stage type -> function(ctx, config) -> results dict; stage modules register here.
STAGE_RUNNERS: dict[str, StageRunner] = {}


def register_stage(kind: str) -> Callable[[StageRunner], StageRunner]:
    """Decorator: register the function that runs stages of type ``kind``."""

    def deco(fn: StageRunner) -> StageRunner:
        STAGE_RUNNERS[kind] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------------ context
@dataclass
class StageContext:
    """What a stage function gets: where to write, where its inputs are, and how to load/save models."""

    recipe: Recipe
    config: StageConfig
    run_dir: Path
    out_dir: Path  # temporary; becomes stages/NAME when the stage returns
    work_dir: Path  # survives an interruption of this stage (same fingerprint); removed when the stage ends
    fingerprints: dict[str, str]
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def stage_dir(self, name: str) -> Path:
        """Directory of the finished stage ``name``."""
        path = self.run_dir / "stages" / name
        if not (path / "stage.json").is_file():
            raise LmshrinkError(f"stage {name!r} has not finished in {self.run_dir}; run it first")
        return path

    def results(self, name: str) -> dict[str, Any]:
        """``results.json`` of the finished stage ``name``."""
        return dict(json.loads((self.stage_dir(name) / "results.json").read_text(encoding="utf-8")))

    def model_dir(self, name: str) -> Path:
        """The saved model of stage ``name``."""
        path = self.stage_dir(name) / "model"
        if not path.is_dir():
            raise LmshrinkError(f"stage {name!r} did not produce a model directory ({path})")
        return path

    def cache_dir(self) -> Path:
        """Run-wide cache (evaluations keyed by model fingerprint and protocol)."""
        path = self.run_dir / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path


# ------------------------------------------------------------------------------------------------ hashing
def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (or of every file below a directory, with relative names)."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def stage_fingerprint(recipe: Recipe, stage: StageConfig, fingerprints: dict[str, str], base: Path) -> str:
    """Hash of a stage's settings, the recipe seed, its inputs' fingerprints and the files it reads."""
    inputs = {n: fingerprints[n] for names in stage.referenced().values() for n in names}
    files: dict[str, str] = {}
    plan = getattr(stage, "plan", None)
    if isinstance(plan, str) and plan not in fingerprints:
        path = (base / plan).resolve()
        if not path.is_file():
            raise LmshrinkError(f"stage {stage.name!r}: plan file {path} does not exist")
        files[plan] = file_digest(path)
    payload = {"settings": stage.settings(), "seed": recipe.seed, "inputs": inputs, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ run directory
class RunDirectory:
    """A run directory: paths, the lock and the status file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def stages(self) -> Path:
        return self.path / "stages"

    def stage(self, name: str) -> Path:
        return self.stages / name

    def stage_record(self, name: str) -> dict[str, Any] | None:
        """``stage.json`` of a finished stage, or None."""
        f = self.stage(name) / "stage.json"
        if not f.is_file():
            return None
        try:
            return dict(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            return None

    def prepare(self) -> None:
        """Create the directory or explain why it cannot be written."""
        try:
            self.stages.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LmshrinkError(
                f"cannot create run directory {self.path}: {exc.strerror or exc}; choose a writable --run-dir"
            ) from exc
        if not os.access(self.path, os.W_OK) or not os.access(self.stages, os.W_OK):
            raise LmshrinkError(f"run directory {self.path} is not writable; choose a writable --run-dir")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory (released by the kernel if the process dies)."""
        lock_path = self.path / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LmshrinkError(f"run directory {self.path} is not writable ({exc.strerror})") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    holder = lock_path.read_text(encoding="utf-8").strip() or "another process"
                    raise LmshrinkError(
                        f"run directory {self.path} is in use by {holder}; wait for it or use another --run-dir"
                    ) from exc
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def clean_partial(self) -> list[str]:
        """Repair what a killed run left in ``stages/`` and return the names removed.

        A stage output whose swap was interrupted is moved back from its ``.NAME.old-PID`` backup first
        (:func:`lmshrink.utils.io.recover_directory`), so the previous artifact is never lost; then half-written
        temporaries and backups that are no longer needed are removed. Called under :meth:`lock`, so no writer
        of this run directory is alive.
        """
        from lmshrink.utils.io import recover_directory

        temps = sorted(p.name for p in self.stages.glob(".*.tmp"))
        for old in sorted(self.stages.glob(".*.old-*")):
            recover_directory(self.stages / old.name[1:].rsplit(".old-", 1)[0])
        removed = [name for name in temps if not (self.stages / name).exists()]
        for old in self.stages.glob(".*.old-*"):  # left only when recover_directory saw a live (reused) pid
            final = self.stages / old.name[1:].rsplit(".old-", 1)[0]
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                removed.append(old.name)
            else:
                os.replace(old, final)
        for tmp in self.stages.glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
        return removed

    def read_status(self) -> dict[str, Any]:
        f = self.path / "run.json"
        if not f.is_file():
            return {}
        try:
            return dict(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            return {}

    def write_status(self, status: dict[str, Any]) -> None:
        status["updated"] = now_iso()
        atomic_write_json(self.path / "run.json", status)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class StageOutcome:
    """What happened to one stage in one run."""

    name: str
    status: str  # "ran", "skipped", "failed", "interrupted"
    seconds: float
    fingerprint: str
    error: str | None = None


@dataclass
class RunResult:
    """The outcome of :func:`run_pipeline`."""

    run_dir: Path
    stages: list[StageOutcome]
    report: Path | None = None

    def ran(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "ran"]

    def skipped(self) -> list[str]:
        return [s.name for s in self.stages if s.status == "skipped"]


Event = Callable[[str, StageConfig, dict[str, Any]], None]


def _noop(_event: str, _stage: StageConfig, _info: dict[str, Any]) -> None:
    return None


def run_pipeline(
    recipe: Recipe,
    run_dir: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    force: set[str] | None = None,
    until: str | None = None,
    report: bool = True,
    on_event: Event = _noop,
) -> RunResult:
    """Run ``recipe`` in ``run_dir``: stages whose fingerprint is unchanged are skipped, the others (re)run.

    ``base_dir`` resolves relative file paths in the recipe (default: the current directory). ``force`` names
    stages to rerun regardless; ``until`` stops after that stage. Each stage is written to a temporary directory
    and renamed into place only when complete, so an interruption (Ctrl-C, a kill, a crash) never leaves a
    half-written stage: the next run redoes it (training stages resume from their checkpoints in ``work/``).

    >>> from lmshrink.recipes import load_recipe  # doctest: +SKIP
    >>> run_pipeline(load_recipe("examples/demo.yaml"), "runs/demo")  # doctest: +SKIP
    """
    from lmshrink.pipeline import stages as _stages  # noqa: F401  (registers the built-in stage functions)

    force = force or set()
    if until is not None:
        recipe.stage(until)
    base = Path(base_dir or Path.cwd())
    rd = RunDirectory(run_dir)
    rd.prepare()
    outcomes: list[StageOutcome] = []
    with rd.lock():
        removed = rd.clean_partial()
        if removed:
            log.warning("removed half-written stage output from an interrupted run: %s", ", ".join(removed))
        atomic_write_text(rd.path / "recipe.yaml", recipe.to_yaml())
        status = rd.read_status()
        previous = status.get("stages", {})
        status = {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), "stages": {}}
        for s in recipe.stages:
            prev = previous.get(s.name, {})
            status["stages"][s.name] = {"status": "pending", "previous": prev.get("status")}
        rd.write_status(status)
        fingerprints: dict[str, str] = {}
        _apply_threads(recipe)
        for stage in recipe.stages:
            outcome = _run_one(recipe, stage, rd, base, fingerprints, status, stage.name in force, on_event)
            outcomes.append(outcome)
            if stage.name == until:
                break
        report_path = None
        if report:
            from lmshrink.report import build_report

            report_path = build_report(rd.path)
    return RunResult(rd.path, outcomes, report_path)


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (a load-independent cost measure on a shared machine)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _apply_threads(recipe: Recipe) -> None:
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)


def _run_one(
    recipe: Recipe,
    stage: StageConfig,
    rd: RunDirectory,
    base: Path,
    fingerprints: dict[str, str],
    status: dict[str, Any],
    force: bool,
    on_event: Event,
) -> StageOutcome:
    fp = stage_fingerprint(recipe, stage, fingerprints, base)
    fingerprints[stage.name] = fp
    entry = status["stages"][stage.name]
    record = rd.stage_record(stage.name)
    if not force and record is not None and record.get("fingerprint") == fp:
        entry.update(status="skipped", fingerprint=fp, seconds=record.get("seconds"))
        rd.write_status(status)
        on_event("skipped", stage, {"fingerprint": fp})
        return StageOutcome(stage.name, "skipped", 0.0, fp)
    runner = STAGE_RUNNERS.get(stage.type)
    if runner is None:
        raise LmshrinkError(f"no runner for stage type {stage.type!r}; known: {', '.join(STAGE_RUNNERS)}")
    if entry.get("previous") == "running":
        log.warning("stage %s was interrupted in an earlier run; redoing it", stage.name)
    entry.update(status="running", fingerprint=fp, started=now_iso())
    rd.write_status(status)
    on_event("start", stage, {"fingerprint": fp})
    work = rd.path / "work" / f"{stage.name}-{fp[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        with atomic_directory(rd.stage(stage.name)) as tmp:
            ctx = StageContext(recipe, stage, rd.path, tmp, work, fingerprints, recipe.device)
            results = runner(ctx, stage)
            seconds = time.perf_counter() - t0
            cpu = round(_cpu_seconds() - cpu0, 3)
            results = {"stage": stage.name, "type": stage.type, **results, "seconds": round(seconds, 3)}
            results["cpu_seconds"] = cpu
            results.setdefault("provenance", provenance(recipe.device))
            atomic_write_json(tmp / "results.json", results)
            inputs = {n: fingerprints[n] for names in stage.referenced().values() for n in names}
            atomic_write_json(
                tmp / "stage.json",
                {
                    "name": stage.name,
                    "type": stage.type,
                    "fingerprint": fp,
                    "inputs": inputs,
                    "config": stage.model_dump(mode="json"),
                    "seed": recipe.seed,
                    "started": entry["started"],
                    "finished": now_iso(),
                    "seconds": round(seconds, 3),
                    "cpu_seconds": cpu,
                    "notes": ctx.notes,
                },
            )
    except KeyboardInterrupt:
        entry.update(status="interrupted", seconds=round(time.perf_counter() - t0, 3))
        rd.write_status(status)
        on_event("interrupted", stage, {})
        raise
    except BaseException as exc:
        entry.update(
            status="failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - t0, 3)
        )
        rd.write_status(status)
        on_event("failed", stage, {"error": str(exc)})
        raise
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        (rd.path / "work").rmdir()
    entry.update(status="complete", seconds=round(seconds, 3), finished=now_iso())
    rd.write_status(status)
    on_event("done", stage, {"seconds": seconds, "results": results})
    return StageOutcome(stage.name, "ran", seconds, fp)
