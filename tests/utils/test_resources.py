"""Resource checks: size estimates without loading, clear errors before work starts when memory, disk or the
device are missing (psutil, shutil.disk_usage and torch.cuda monkeypatched)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from lmshrink.errors import CorruptFileError, LmshrinkError
from lmshrink.models import load_model, save_model
from lmshrink.utils import resources
from lmshrink.utils.resources import (
    check_device,
    check_disk,
    check_load_memory,
    check_memory,
    estimate_model_bytes,
    estimate_state_dict_bytes,
)

GiB = 2**30
_Mem = namedtuple("_Mem", "total available percent used free")
_Disk = namedtuple("_Disk", "total used free")


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _fake_memory(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Mem(64 * GiB, available, 0.0, 0, available))


def _fake_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> list[str]:
    asked: list[str] = []

    def usage(path):  # type: ignore[no-untyped-def]
        asked.append(str(path))
        return _Disk(100 * GiB, 100 * GiB - free, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return asked


# ---------------------------------------------------------------------------------------------- estimates


def test_estimate_from_config_matches_real_parameter_bytes(tiny_llama, tiny_bert) -> None:  # type: ignore[no-untyped-def]
    # a config without `architectures` is sized as the model type's causal-LM (BERT: LM head instead of the
    # classifier, 0.04% off); with it (as every saved config.json has), the count is exact
    assert estimate_model_bytes(tiny_bert.config) == pytest.approx(_param_bytes(tiny_bert), rel=1e-2)
    tiny_bert.config.architectures = ["BertForSequenceClassification"]
    for model in (tiny_llama, tiny_bert):
        assert estimate_model_bytes(model.config) == _param_bytes(model)
        assert estimate_model_bytes(model.config, dtype="bf16") == _param_bytes(model) // 2
        assert estimate_model_bytes(model.config, dtype=torch.float16) == _param_bytes(model) // 2
    as_dict = tiny_llama.config.to_dict()
    assert estimate_model_bytes(as_dict) == _param_bytes(tiny_llama)
    with pytest.raises(LmshrinkError, match="unknown dtype"):
        estimate_model_bytes(tiny_llama.config, dtype="int5")
    with pytest.raises(LmshrinkError, match="model_type"):
        estimate_model_bytes({"hidden_size": 8})


def test_estimate_from_files_reads_headers_only(tiny_llama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = save_model(tiny_llama, tmp_path / "m")
    expected = _param_bytes(tiny_llama)
    weights = next(out.glob("*.safetensors"))
    assert estimate_model_bytes(weights) == expected
    assert estimate_model_bytes(out) == expected
    assert estimate_model_bytes(out / "config.json") == expected
    assert estimate_model_bytes(out, dtype="bf16") == expected // 2
    # a directory with only a config is sized from the config
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((out / "config.json").read_text())
    assert estimate_model_bytes(bare) == expected
    assert estimate_state_dict_bytes(tiny_llama) == expected
    with pytest.raises(LmshrinkError, match="no such file"):
        estimate_model_bytes(tmp_path / "missing")


def test_estimate_counts_tied_weights_once() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    unique = {id(p): p for p in model.parameters()}
    expected = sum(p.numel() * 4 for p in unique.values())
    assert estimate_model_bytes(cfg) == expected
    assert estimate_state_dict_bytes(model) == expected


def test_estimate_gguf_is_float32_elements(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}" for i in range(50)])  # string array: skipped entry by entry
    w.add_token_types([1] * 50)  # fixed-size array
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_rope_freq_base(10000.0)
    w.add_tensor("a.weight", np.zeros((4, 8), np.float16))
    w.add_tensor("b.weight", np.zeros((3,), np.float32))
    w.add_tensor("c.weight", np.zeros((2, 3, 5), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    elements = 32 + 3 + 30
    assert sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors) == elements
    assert estimate_model_bytes(path) == elements * 4
    assert estimate_model_bytes(path, dtype="fp16") == elements * 2
    raw = path.read_bytes()
    for cut in (6, 30, 200):
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(CorruptFileError):
            estimate_model_bytes(tmp_path / "cut.gguf")
    (tmp_path / "absurd.gguf").write_bytes(raw[:8] + (2**62).to_bytes(8, "little") + raw[16:])
    with pytest.raises(CorruptFileError, match="absurd"):
        estimate_model_bytes(tmp_path / "absurd.gguf")


def test_corrupt_header_is_corrupt_file_error_and_load_check_stays_quiet(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 7)
    with pytest.raises(CorruptFileError):
        estimate_model_bytes(bad)
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="header length"):
        estimate_model_bytes(bad)
    # the loader reports corrupt files itself; the memory pre-check must not mask that error
    assert check_load_memory(bad) is None
    for header in (
        b'{"w": {"dtype": "F32", "shape": [2147483648, 2147483648], "data_offsets": [0, 16]}}',  # lying shape
        b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4611686018427387904]}}',  # offsets past the end
        b'{"__metadata__": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}",  # nesting deeper than the JSON parser goes
    ):
        bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
        with pytest.raises(CorruptFileError):
            estimate_model_bytes(bad)
        assert check_load_memory(bad) is None


# ---------------------------------------------------------------------------------------------- memory


def test_check_memory_message_and_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_memory(monkeypatch, 3 * GiB)
    assert check_memory(2 * GiB, "model x") == 3 * GiB
    with pytest.raises(LmshrinkError) as err:
        check_memory(int(7.5 * GiB), "model x")
    msg = str(err.value)
    assert "model x needs ~7.50 GiB" in msg and "3.00 GiB available" in msg and "bf16" in msg
    monkeypatch.setenv(resources.SKIP_ENV, "1")
    assert check_memory(int(7.5 * GiB), "model x") == 3 * GiB  # a warning only


def test_check_memory_on_cuda_uses_free_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (GiB, 80 * GiB))
    with pytest.raises(LmshrinkError, match=r"of GPU memory, 1\.00 GiB available on cuda"):
        check_memory(2 * GiB, "model y", device="cuda")


def test_load_model_refuses_before_loading_when_memory_is_short(
    tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    out = save_model(tiny_llama, tmp_path / "m")
    import lmshrink.models.load as load_mod

    def must_not_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("weights were read although the memory check should have failed first")

    _fake_memory(monkeypatch, 1000)
    with monkeypatch.context() as m:
        m.setattr(load_mod, "_load_hf_dir", must_not_load)
        with pytest.raises(
            LmshrinkError, match=r"model .*m \(0.3 MiB of weights \+ 10%\) needs ~0.4 MiB of memory"
        ) as err:
            load_model(out)
    assert "of memory, 1000 bytes available on cpu" in str(err.value)
    # enough memory: the same call loads
    _fake_memory(monkeypatch, 64 * GiB)
    model, _ = load_model(out)
    assert estimate_model_bytes(out) == _param_bytes(model)


# ---------------------------------------------------------------------------------------------- disk


def test_check_disk_measures_nearest_existing_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _fake_disk(monkeypatch, 5 * 2**20)
    target = tmp_path / "a" / "b" / "c"
    assert check_disk(target, 2**20) == 5 * 2**20
    assert asked[-1] == str(tmp_path)
    with pytest.raises(LmshrinkError) as err:
        check_disk(target, 2 * GiB, what="the weights")
    msg = str(err.value)
    assert (
        "not enough disk space for the weights" in msg and "needs ~2.00 GiB" in msg and "5.0 MiB free" in msg
    )


def test_save_model_refuses_before_writing_when_disk_is_short(
    tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    _fake_disk(monkeypatch, 10 * 2**20)  # 10 MiB free; the model needs its bytes + 10% + 64 MiB slack
    with pytest.raises(LmshrinkError, match="not enough disk space for the LlamaForCausalLM weights"):
        save_model(tiny_llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary directory left
    _fake_disk(monkeypatch, 10 * GiB)
    assert (save_model(tiny_llama, tmp_path / "out") / "lmshrink.json").is_file()


# ---------------------------------------------------------------------------------------------- device


def test_check_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device(None) == torch.device("cpu")
    assert check_device("auto") == torch.device("cpu")
    with pytest.raises(LmshrinkError, match="no CUDA device is available"):
        check_device("cuda")
    with pytest.raises(LmshrinkError, match="unknown device"):
        check_device("tpu:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(LmshrinkError, match=r"only 2 CUDA device\(s\)"):
        check_device("cuda:2")


def test_load_model_with_absent_cuda_fails_before_loading(
    tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    out = save_model(tiny_llama, tmp_path / "m")
    import lmshrink.models.load as load_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(load_mod, "_load_path", lambda *a, **k: pytest.fail("loaded before the device check"))
    with pytest.raises(LmshrinkError, match="no CUDA device"):
        load_model(out, device="cuda")
