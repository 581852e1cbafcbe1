"""Fixtures and the closing count for the reliability tests (the harness itself is in _reliability_harness.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# pytest imports test modules without putting their folder on sys.path; the tests import the harness by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reliability_harness import COUNTS, FAILURES, saved_models  # noqa: F401  (fixture re-export)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    tr = terminalreporter
    tr.section("reliability: cases tried")
    total = sum(v for k, v in COUNTS.items() if ":" not in k)
    tr.write_line(f"{total} cases in all")
    for key in sorted(COUNTS):
        tr.write_line(f"  {key}: {COUNTS[key]}")
    path = os.environ.get("LMSHRINK_RELIABILITY_REPORT")
    if path:
        Path(path).write_text(json.dumps({"counts": dict(COUNTS), "failures": FAILURES}, indent=2))
