"""Provenance records the environment variables that choose kernels, and only those."""

from __future__ import annotations

import pytest

from lmshrink.utils.env import numerics_env, provenance


def test_provenance_records_kernel_choosing_variables_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in numerics_env():
        monkeypatch.delenv(k)
    monkeypatch.setenv("LMSHRINK_DATA", "/data")
    monkeypatch.setenv("LMSHRINK_SKIP_RESOURCE_CHECKS", "1")
    assert provenance()["environment"] == {}
    monkeypatch.setenv("LMSHRINK_NO_CPP", "1")
    monkeypatch.setenv("LMSHRINK_INT8_EXACT", "1")
    prov = provenance("cpu")
    assert prov["environment"] == {"LMSHRINK_INT8_EXACT": "1", "LMSHRINK_NO_CPP": "1"}
    assert prov["device"] == "cpu" and "torch" in prov["versions"]
