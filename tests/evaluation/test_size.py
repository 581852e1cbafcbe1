"""Size on disk, logical parameter count, stored bytes and bits per weight."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import count_logical_parameters, describe_kernels, measure_size


class PackedLinear(nn.Module):
    """A stand-in for a quantized linear: int4 codes packed two per byte, one fp16 scale per row."""

    kernel_name = None

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out_features))


def test_dense_counts(tiny_llama):
    r = measure_size(tiny_llama, save=False)
    n = sum(p.numel() for p in tiny_llama.parameters())
    assert r.parameters == n and r.bytes_on_disk is None
    assert r.stored_bytes == 4 * n and r.bits_per_weight == pytest.approx(32.0)


def test_tied_weights_counted_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=100, tie_word_embeddings=True)  # fmt: skip
    m = LlamaForCausalLM(cfg)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    r = measure_size(m, save=False)
    assert r.parameters == sum(p.numel() for p in m.parameters())  # parameters() yields tied once
    assert r.stored_bytes == 4 * r.parameters


def test_packed_weights_counted_by_logical_shape():
    m = nn.Sequential(PackedLinear(64, 32), nn.LayerNorm(32))
    assert count_logical_parameters(m) == 64 * 32 + 32 + 2 * 32
    r = measure_size(m, save=False)
    stored = 32 * 32 + 32 * 2 + 32 * 4 + 2 * 32 * 4
    assert r.stored_bytes == stored
    assert r.bits_per_weight == pytest.approx(8 * stored / r.parameters)
    assert describe_kernels(m) == {"kernels": {}, "dequantize_on_the_fly": 1}


def test_size_on_disk_equals_saved_files(tiny_llama, tmp_path):
    out = tmp_path / "m"
    tiny_llama.save_pretrained(out)
    (out / "lmshrink.json").write_text('{"format": "dense"}', encoding="utf-8")
    r = measure_size(tiny_llama, out)
    expected = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert r.bytes_on_disk == expected and set(r.files) == {f.name for f in out.iterdir()}
    weights = (out / "model.safetensors").stat().st_size
    assert r.disk_bits_per_weight == pytest.approx(8 * weights / r.parameters)
    assert 32.0 <= r.disk_bits_per_weight < 32.5  # float32 plus the safetensors header
    assert r.format == "dense"


def test_single_file(tmp_path):
    lin = nn.Linear(16, 16)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in lin.state_dict().items()}, str(path))
    assert measure_size(lin, path).bytes_on_disk == path.stat().st_size


def test_saves_with_save_model_when_no_path(tiny_llama):
    r = measure_size(tiny_llama)
    assert r.bytes_on_disk is not None and r.bytes_on_disk > r.stored_bytes
    assert any(f.endswith(".safetensors") for f in r.files)


def test_bad_path(tiny_llama, tmp_path):
    with pytest.raises(LmshrinkError, match="does not exist"):
        measure_size(tiny_llama, tmp_path / "missing")
