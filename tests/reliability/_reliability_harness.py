"""Reliability harness (imported by the tests and by conftest.py): run a loader on a damaged input under a memory cap and a time limit, and classify the end.

Every case must end in a successful load or in :class:`lmshrink.errors.LmshrinkError` (or a subclass). Any other
exception, a time-out (a hang) or a failed allocation under the cap (a huge allocation) is a failure; the test
reports the exact damage that caused it. Counts of cases tried are printed at the end of the session.
"""

from __future__ import annotations

import collections
import contextlib
import resource
import shutil
import signal
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

#: Extra address space a single load may reserve beyond what the process already has (tiny models need ~MBs).
MEMORY_HEADROOM = 1 << 30
#: Seconds a single load may take before it counts as a hang.
TIME_LIMIT_S = 20.0

COUNTS: collections.Counter[str] = collections.Counter()
FAILURES: list[str] = []


class Hang(Exception):
    """Raised by the alarm when a load overruns :data:`TIME_LIMIT_S`."""


@dataclass
class Outcome:
    kind: str  # "loaded" | "clean-error" | "crash" | "hang" | "huge-allocation" | "silent-reinit"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("loaded", "clean-error")


def _address_space() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the process's address space at its current size + ``headroom`` (soft limit, restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds``."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def guarded(fn: Callable[[], Any], category: str) -> Outcome:
    """Run ``fn`` under the memory cap and the time limit; classify how it ended and count it."""
    from lmshrink.errors import LmshrinkError

    COUNTS[category] += 1
    try:
        with memory_cap(), time_limit(TIME_LIMIT_S):
            fn()
        out = Outcome("loaded")
    except LmshrinkError as exc:
        out = Outcome("clean-error", str(exc)[:200])
    except Hang as exc:
        out = Outcome("hang", str(exc))
    except MemoryError as exc:
        out = Outcome("huge-allocation", f"MemoryError: {exc}"[:300])
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        kind = "huge-allocation" if "alloc" in text.lower() and "memory" in text.lower() else "crash"
        if type(exc).__name__ == "SilentReinit":
            kind = "silent-reinit"
        tb = traceback.extract_tb(exc.__traceback__)
        where = next(
            (f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "/lmshrink/" in f.filename), "?"
        )
        out = Outcome(kind, f"{text[:300]} (last lmshrink frame {where})")
    COUNTS[f"{category}:{out.kind}"] += 1
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    """A fresh copy of a pristine saved model to damage."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pristine saved tiny models, one per storage format that exists in this tree: dense, quantized, sparse
    (unstructured, bitmask + values) and pruned (structured: smaller blocks recorded in the config)."""
    from lmshrink.models import save_model

    root = tmp_path_factory.mktemp("pristine")
    out = {"dense": save_model(_tiny_llama(), root / "dense")}
    try:
        from lmshrink.quantization import QuantConfig, quantize_model

        q = quantize_model(_tiny_llama(), QuantConfig(method="rtn", format="int4", group_size=16))
        out["quantized"] = save_model(q, root / "quantized")
    except (ImportError, AttributeError):
        pass
    try:
        from lmshrink.pruning import prune_model

        m = _tiny_llama()
        prune_model(m, {"method": "magnitude", "sparsity": 0.5}, progress=False)
        out["sparse"] = save_model(m, root / "sparse")
    except (ImportError, AttributeError):
        pass
    try:
        from lmshrink.pruning.structured import remove_heads, remove_neurons

        m = _tiny_llama()
        remove_neurons(m, {0: list(range(0, 64, 3))})  # 64 -> 42 MLP neurons
        remove_heads(m, {0: [1]})  # 2 -> 1 KV group (4 -> 2 query heads)
        out["pruned"] = save_model(m, root / "pruned")
    except (ImportError, AttributeError):
        pass
    return out
