"""Quantized checkpoints: bit-identical reload, size within 3% of theory, tampering is a CorruptFileError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmshrink.errors import CorruptFileError
from lmshrink.quantization import quantize_model
from lmshrink.quantization.storage import load_quantized_model, save_quantized_model, theoretical_bytes


def _llama(hidden: int = 64, inter: int = 128, tie: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


CONFIGS = [
    {"format": "int8", "activations": "int8"},  # W8A8, fbgemm kernel
    {"format": "int8"},  # weight-only
    {"format": "int4", "group_size": 32},
    {"format": "int4-asym", "group_size": 16},
    {"format": "int3"},
    {"method": "llm-int8", "format": "int8"},
    {"format": "nf4", "group_size": 32},  # codec formats from lmshrink.quantization.formats
    {"format": "1.58bit"},
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("tie", [False, True])
def test_reload_is_bit_identical(tmp_path: Path, cfg: dict, tie: bool) -> None:
    m = quantize_model(_llama(tie=tie), cfg)
    out = save_quantized_model(m, tmp_path / "q")
    m2, tok = load_quantized_model(out)
    assert tok is None and m2.lmshrink_format == "quantized"
    ids = torch.randint(0, 128, (2, 24))
    assert torch.equal(m(ids).logits, m2(ids).logits)
    assert [type(x).__name__ for x in m.modules()] == [type(x).__name__ for x in m2.modules()]


def test_reload_through_load_model(tmp_path: Path) -> None:
    from lmshrink.models import load_model

    m = quantize_model(_llama(), {"format": "int4", "group_size": 32})
    save_quantized_model(m, tmp_path / "q")
    m2, _ = load_model(str(tmp_path / "q"))
    ids = torch.randint(0, 128, (1, 16))
    assert torch.equal(m(ids).logits, m2(ids).logits)


@pytest.mark.parametrize(
    "cfg", [{"format": "int4", "group_size": 64}, {"format": "int3"}, {"format": "int8"}]
)
def test_file_within_3_percent_of_theoretical_size(tmp_path: Path, cfg: dict) -> None:
    m = quantize_model(_llama(hidden=256, inter=768, tie=True), cfg)
    out = save_quantized_model(m, tmp_path / "q")
    size = (out / "model.safetensors").stat().st_size
    theory = theoretical_bytes(m)
    assert abs(size / theory - 1) < 0.03
    # and the theory itself counts packed bits: the quantized linears take bits/8 bytes per weight (+ scales)
    n_lin = 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768)
    float_rest = 128 * 256 * 4 + (2 * 2 + 1) * 256 * 4
    bits = {"int4": 4, "int3": 3, "int8": 8}[cfg["format"]]
    assert theory < float_rest + n_lin * bits / 8 * 1.1


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    m = quantize_model(_llama(), {"format": "int4", "group_size": 32})
    return save_quantized_model(m, tmp_path / "q")


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.scale"), "missing"),
        (
            lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(3, 3, dtype=torch.uint8)}),
            "shape",
        ),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.scale": torch.ones(128, 2)}), "dtype"),
        (
            lambda t: t.update(
                {"model.layers.0.mlp.up_proj.qweight": torch.zeros(128, 32, dtype=torch.int8)}
            ),
            "dtype",
        ),
        (lambda t: t.update({"extra.tensor": torch.zeros(1)}), "unexpected"),
        (lambda t: t["model.layers.1.self_attn.q_proj.scale"].fill_(float("nan")), "NaN"),
    ],
)
def test_tampered_tensors_are_corrupt(saved: Path, edit, match: str) -> None:
    _rewrite(saved, edit)
    with pytest.raises(CorruptFileError, match=match):
        load_quantized_model(saved)


def test_truncated_or_pickled_weights_are_corrupt(saved: Path) -> None:
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        load_quantized_model(saved)
    torch.save({"x": torch.zeros(1)}, f)  # a pickle under the safetensors name is never unpickled
    with pytest.raises(CorruptFileError):
        load_quantized_model(saved)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda m: m["quantization"]["layers"]["model.layers.0.mlp.up_proj"].update(in_features=10**9),
            "absurd",
        ),
        (
            lambda m: m["quantization"]["layers"]["model.layers.0.mlp.up_proj"].update(out_features=7),
            "manifest says",
        ),
        (
            lambda m: m["quantization"]["layers"]["model.layers.0.mlp.up_proj"].update(format="int99"),
            "invalid",
        ),
        (lambda m: m["quantization"]["layers"].update({"model.nope": {}}), "nope"),
        (lambda m: m.update(architecture="os.system"), "architecture"),
        (lambda m: m.pop("quantization"), "quantization"),
    ],
)
def test_tampered_manifest_is_corrupt(saved: Path, edit, match: str) -> None:
    p = saved / "lmshrink.json"
    manifest = json.loads(p.read_text())
    edit(manifest)
    p.write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match=match):
        load_quantized_model(saved)


def test_failed_save_leaves_no_directory(tmp_path: Path) -> None:
    m = _llama()
    with pytest.raises(ValueError):
        save_quantized_model(m, tmp_path / "q")  # not quantized
    assert not (tmp_path / "q").exists()
