"""The lab notebook: valid, covers the lab's variants, and executes end to end on a small slice (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "model_compression_and_pruning.ipynb"


def test_notebook_is_valid_and_covers_the_lab() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for needle in (
        '"fp16"',
        '"int8"',
        '"int4"',
        '"nf4"',
        "magnitude",
        "neurons",
        "0.2",
        "0.4",
        "measure_speed",
    ):
        assert needle in code


@pytest.mark.slow
@pytest.mark.reference
def test_notebook_executes_on_a_small_slice(tmp_path: Path, data_dir: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    os.environ["LMSHRINK_NOTEBOOK_SMALL"] = "1"
    try:
        nbclient.NotebookClient(
            nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
        ).execute()
    finally:
        del os.environ["LMSHRINK_NOTEBOOK_SMALL"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "| nf4 |" in text and "| structured 40% |" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2
