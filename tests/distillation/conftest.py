"""Distillation tests run single-threaded: tiny models gain nothing from threads on a shared CPU, and small ops
with several OpenMP threads stall when the machine is busy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
