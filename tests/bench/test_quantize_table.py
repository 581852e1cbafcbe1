"""The quantization table in pieces: resumed sums equal one uninterrupted run's, and cached rows reload exactly."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from quantize_table import Acc, Row, _lmshrink, cached_build, resume_state

from lmshrink.utils.env import numerics_env


def _settings(**over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "model_spec": "m",
        "group_size": 64,
        "calibration": {"n_samples": 2, "seq_len": 8},
        "gptq": {"act_order": True},
        "code_fingerprint": "abc",
        "row_keys": ["int8-rtn"],
        "evaluation": {"ctx": 16},
    }
    s.update(over)
    return s


def _logps(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = F.log_softmax(torch.randn(15, 32, generator=g), -1)
    row = F.log_softmax(torch.randn(15, 32, generator=g), -1)
    return row, ref, torch.randint(0, 32, (15,), generator=g)


def test_resumed_sums_equal_one_run() -> None:
    whole, first = Acc(), Acc()
    for seed in range(3):
        whole.add(*_logps(seed))
    first.add(*_logps(0))
    old = _settings()
    old["evaluation"] = {"ctx": 16, "n_windows": 1}
    old["rows"] = [{"key": "fp32", "sums": first.sums()}, {"key": "int8-rtn", "sums": first.sums()}]
    accs, done = resume_state(old, _settings())
    assert done == 1
    rest = accs["int8-rtn"]
    for seed in (1, 2):
        rest.add(*_logps(seed))
    assert rest.sums() == pytest.approx(whole.sums())
    assert rest.summary(0.0) == pytest.approx(whole.summary(0.0))


@pytest.mark.parametrize(
    "key, value", [("code_fingerprint", "other"), ("group_size", 32), ("row_keys", ["nf4"]), ("gptq", {})]
)
def test_resume_refuses_other_settings_or_code(key: str, value: Any) -> None:
    old = _settings()
    old["evaluation"] = {"ctx": 16, "n_windows": 1}
    old["rows"] = []
    with pytest.raises(SystemExit, match=key):
        resume_state(old, _settings(**{key: value}))


def test_resume_refuses_another_numerics_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in numerics_env():
        monkeypatch.delenv(k)
    monkeypatch.setenv("LMSHRINK_DATA", "/somewhere")  # a location, not numerics: not recorded
    old = _settings()
    old["evaluation"] = {"ctx": 16, "n_windows": 0}
    old["rows"] = []
    assert "LMSHRINK_DATA" not in numerics_env()
    resume_state(old, _settings())  # a file from before the field existed counts as the empty environment
    monkeypatch.setenv("LMSHRINK_INT8_EXACT", "1")
    assert numerics_env() == {"LMSHRINK_INT8_EXACT": "1"}
    with pytest.raises(SystemExit, match="LMSHRINK_INT8_EXACT"):
        resume_state(old, _settings())
    old["environment"] = {"LMSHRINK_INT8_EXACT": "1"}
    resume_state(old, _settings())


def test_cached_row_reloads_bit_identically_and_rebuilds_on_other_settings(tiny_llama, tmp_path) -> None:
    built: list[int] = []
    inner = _lmshrink({"format": "int4", "group_size": 32})

    def build(model: torch.nn.Module, calib: Any) -> torch.nn.Module:
        built.append(1)
        return inner(model, calib)

    row = Row("int4-g32-rtn", "int4 g32 RTN", "W4", build)
    ids = torch.randint(0, 128, (1, 24))
    fp = {"code_fingerprint": "abc"}
    first, hit1 = cached_build(row, copy.deepcopy(tiny_llama), [], tmp_path, fp)
    again, hit2 = cached_build(row, copy.deepcopy(tiny_llama), [], tmp_path, fp)
    assert (hit1, hit2, len(built)) == (False, True, 1)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, again(ids).logits)
    _, hit3 = cached_build(row, copy.deepcopy(tiny_llama), [], tmp_path, {"code_fingerprint": "new"})
    assert not hit3 and len(built) == 2


def test_mse_rows_are_the_library_clip_search(tiny_llama) -> None:
    from quantize_table import make_rows

    from lmshrink.quantization.grid import IntGrid, compute_qparams_mse, dequantize_codes, quantize_codes

    rows = {r.key: r for r in make_rows(32, act_order=True)}
    assert {"int4-g32-gptq-mse", "int4-asym-g32-rtn-mse"} <= set(rows)
    assert not rows["int4-g32-gptq-mse"].default and rows["int4-g32-gptq"].default
    w = tiny_llama.model.layers[0].mlp.down_proj.weight.detach().clone()
    model = rows["int4-asym-g32-rtn-mse"].build(copy.deepcopy(tiny_llama), [])
    assert model.lmshrink_quant_config["clip_search"] is True
    grid = IntGrid(4, False, 32)
    scale, zero = compute_qparams_mse(w, grid)
    expected = dequantize_codes(quantize_codes(w, scale, zero, grid), scale, zero, grid)
    got = model.model.layers[0].mlp.down_proj.dequantize_weight()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_float_models_have_their_own_folders_and_g128_widths(monkeypatch, tmp_path) -> None:
    from quantize_table import FLOAT_MODELS, float_model_dir, main

    monkeypatch.delenv("LMSHRINK_FLOAT_LLAMA", raising=False)
    assert float_model_dir("float-llama-256") == Path("~/.cache/lmshrink/float-llama-256").expanduser()
    monkeypatch.setenv("LMSHRINK_FLOAT_LLAMA", str(tmp_path / "fl"))
    assert float_model_dir("float-llama") == tmp_path / "fl"
    assert float_model_dir("float-llama-256") != tmp_path / "fl"
    r = FLOAT_MODELS["float-llama-256"]
    assert r["hidden_size"] % 128 == 0 and r["intermediate_size"] % 128 == 0  # the g128 divides
    with pytest.raises(SystemExit, match="--train-only needs --model float-llama or float-llama-256"):
        main(["--model", "smollm2-135m", "--train-only", "--threads", str(torch.get_num_threads())])
