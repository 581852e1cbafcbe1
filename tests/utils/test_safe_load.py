"""The shared readers of untrusted files: every problem is a CorruptFileError naming the file (and the tensor)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmshrink.errors import CorruptFileError
from lmshrink.utils.safe_load import (
    MAX_JSON_DEPTH,
    build_on_meta,
    check_declared_size,
    json_depth,
    parse_json,
    read_config,
    read_json_object,
    read_safetensors_header,
    safe_file_name,
)


def _st(tmp_path: Path) -> Path:
    f = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.int8)}, str(f)
    )
    return f


def _rewrite(f: Path, edit) -> None:  # type: ignore[no-untyped-def]
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_json_depth_skips_strings_and_stops_early() -> None:
    assert json_depth(b'{"a": "[[[[", "b": [[]]}') == 3
    assert json_depth(b"[" * 10**6, limit=10) == 11


def test_parse_json_limits_depth_and_utf8() -> None:
    assert parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, "x") is not None
    with pytest.raises(CorruptFileError, match=r"^x: JSON nested deeper than 64"):
        parse_json(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "x")
    with pytest.raises(CorruptFileError, match=r"^x: not UTF-8 text"):
        parse_json(b'{"\xff": 1}', "x")
    with pytest.raises(CorruptFileError, match=r"^x: not valid JSON"):
        parse_json(b'{"a": ', "x")


def test_read_json_object(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text('{"a": 1}')
    (tmp_path / "list.json").write_text("[1]")
    assert read_json_object(tmp_path / "ok.json") == {"a": 1}
    with pytest.raises(CorruptFileError, match="expected a JSON object, found list"):
        read_json_object(tmp_path / "list.json")
    with pytest.raises(CorruptFileError, match="missing"):
        read_json_object(tmp_path / "absent.json")


def test_valid_header_is_read_without_the_data(tmp_path: Path) -> None:
    h = read_safetensors_header(_st(tmp_path))
    assert {k: (e.dtype, e.shape) for k, e in h.tensors.items()} == {"a": ("F32", (2, 3)), "b": ("I8", (4,))}
    assert h.data_bytes == 6 * 4 + 4


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["a"].update(dtype="Q7"), r"tensor 'a' has unknown dtype 'Q7'"),
        (lambda h: h["a"].update(dtype="F64"), r"tensor 'a' declares F64\[2, 3\] \(48 bytes\)"),
        (lambda h: h["a"].update(shape=[-1, 6]), r"tensor 'a' has an invalid shape"),
        (lambda h: h["a"].update(shape=[2**31, 2**31]), r"tensor 'a' declares F32"),
        (lambda h: h["b"].update(data_offsets=[0, 4]), r"overlaps another tensor"),
        (lambda h: h["a"].update(data_offsets=[24, 0]), r"tensor 'a'"),
        (lambda h: h.pop("b"), r"trailing bytes"),
        (lambda h: h.update(__metadata__={"x": {"y": 1}}), r"__metadata__ must map strings to strings"),
        (lambda h: h.update(c=[1, 2]), r"tensor 'c' has a malformed header entry"),
    ],
)
def test_lying_headers_name_the_tensor(tmp_path: Path, edit, match) -> None:  # type: ignore[no-untyped-def]
    f = _st(tmp_path)
    _rewrite(f, edit)
    with pytest.raises(CorruptFileError, match=match):
        read_safetensors_header(f)


@pytest.mark.parametrize("cut", [0, 7, 12, -1])
def test_truncated_files(tmp_path: Path, cut: int) -> None:
    f = _st(tmp_path)
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_safetensors_header(f)


def test_header_that_passes_is_readable_by_safetensors(tmp_path: Path) -> None:
    """The validation is not stricter than the library: a zero-size tensor and string metadata are accepted."""
    f = tmp_path / "z.safetensors"
    save_file({"e": torch.zeros(0, 3), "x": torch.ones(2, dtype=torch.bfloat16)}, str(f), metadata={"k": "v"})
    h = read_safetensors_header(f)
    assert h.metadata == {"k": "v"} and h.tensors["e"].shape == (0, 3)
    assert set(load_file(str(f))) == {"e", "x"}


def test_read_config_translates_every_config_error(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_attention_heads=4, vocab_size=64).save_pretrained(tmp_path)
    assert read_config(tmp_path).hidden_size == 32
    good = json.loads((tmp_path / "config.json").read_text())
    for bad, match in (
        ({"model_type": "no-such-arch"}, "model_type"),
        ({"model_type": ["llama"]}, "model_type"),
        ({"vocab_size": None}, "vocab_size"),
        ({"num_attention_heads": 0}, "invalid"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({**good, **bad}))
        with pytest.raises(CorruptFileError, match=match):
            read_config(tmp_path)


def test_meta_build_and_declared_size() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=2**36
    )
    model = build_on_meta(lambda: LlamaForCausalLM(cfg), "cfg")
    assert next(model.parameters()).device.type == "meta"
    with pytest.raises(
        CorruptFileError, match=r"declares a model of [\d,]+ elements.*holds only 1,000 bytes"
    ):
        check_declared_size("cfg", model, 1000)
    with pytest.raises(CorruptFileError, match="does not describe a buildable model"):
        build_on_meta(lambda: torch.nn.Linear(-1, 3), "cfg")


def test_safe_file_name(tmp_path: Path) -> None:
    assert safe_file_name(tmp_path, "model.safetensors", "weights") == tmp_path / "model.safetensors"
    for bad in ("../x.safetensors", "/etc/passwd", "", 7, None, ".."):
        with pytest.raises(CorruptFileError, match="plain file name"):
            safe_file_name(tmp_path, bad, "weights")
