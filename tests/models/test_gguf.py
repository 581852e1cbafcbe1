"""GGUF loading: a tiny Llama GGUF written with the `gguf` package, converted once and cached as safetensors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmshrink.errors import CorruptFileError
from lmshrink.models import gguf as gguf_mod
from lmshrink.models import load_model
from lmshrink.models.gguf import CACHE_MANIFEST, gguf_cache_dir, validate_gguf


def write_tiny_llama_gguf(
    path: Path,
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv: int = 2,
    ff: int = 64,
    seed: int = 0,
) -> Path:
    """A random float32 Llama GGUF with a small byte-level BPE vocabulary (loadable by transformers)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    tokens = [chr(ord("a") + i) for i in range(26)] + ["ab", "cd"] + [f"<t{i}>" for i in range(vocab - 28)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(["a b", "c d"])
    w.add_bos_token_id(28)
    w.add_eos_token_id(29)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hd = hidden // heads
    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(kv * hd, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "src").mkdir()
    return write_tiny_llama_gguf(tmp_path / "src" / "tiny.gguf")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_gguf_converted_once_then_loaded_from_cache(tiny_gguf, monkeypatch):
    info = validate_gguf(tiny_gguf)
    assert info["architecture"] == "llama" and info["tensors"] == 21
    model, tok = load_model(tiny_gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    cache = gguf_cache_dir(tiny_gguf)
    assert (cache / CACHE_MANIFEST).is_file() and list(cache.glob("*.safetensors"))
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    ids = torch.tensor([tok("abcdab")["input_ids"]])
    first = _logits(model, ids)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the second load must use the cache")

    monkeypatch.setattr(gguf_mod, "convert_gguf", no_conversion)
    model2, tok2 = load_model(str(tiny_gguf))
    assert tok2("abcdab")["input_ids"] == tok("abcdab")["input_ids"]
    assert torch.equal(_logits(model2, ids), first)
    model3, _ = load_model(tiny_gguf.parent)  # a folder with exactly one .gguf file
    assert torch.equal(_logits(model3, ids), first)


def test_cache_key_follows_file_changes(tiny_gguf):
    before = gguf_cache_dir(tiny_gguf)
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert gguf_cache_dir(tiny_gguf) != before


def test_truncated_or_foreign_gguf_is_corrupt_file_error(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for n, name in ((len(data) - 50, "tail.gguf"), (4000, "mid.gguf"), (100, "head.gguf")):
        bad = tmp_path / name
        bad.write_bytes(data[:n])
        with pytest.raises(CorruptFileError, match=name):
            load_model(bad)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CorruptFileError, match=r"foreign\.gguf"):
        load_model(foreign)


def test_damaged_cache_entry_is_rebuilt(tiny_gguf):
    model, _ = load_model(tiny_gguf)
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = _logits(model, ids)  # before damaging: loaded weights may be memory-mapped from the cache file
    del model
    cache = gguf_cache_dir(tiny_gguf)
    (weights,) = cache.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-10])
    model2, _ = load_model(tiny_gguf)
    assert torch.equal(_logits(model2, ids), ref)
    assert (cache / CACHE_MANIFEST).is_file()


def _smollm2_check(first_model, tok, ids):
    ref = _logits(first_model, ids)
    t0 = time.perf_counter()
    model2, tok2 = load_model("smollm2-135m")
    second_s = time.perf_counter() - t0
    assert tok2("The capital of France is")["input_ids"] == ids[0].tolist()
    assert torch.equal(_logits(model2, ids), ref)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight
    assert model2.config.num_hidden_layers == 30 and model2.config.hidden_size == 576
    return second_s


@pytest.mark.reference
def test_smollm2_cached_load_fast_and_identical():
    """The real packaged GGUF through the shared cache (converted once per machine): reloads are fast, identical."""
    model, tok = load_model("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert _smollm2_check(model, tok, ids) < 5.0


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_first_conversion_then_cache(tmp_path, monkeypatch):
    """A fresh cache: the first load converts the GGUF (tens of seconds), the second is a fast, identical reload."""
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    first_s = time.perf_counter() - t0
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    second_s = _smollm2_check(model, tok, ids)
    print(f"smollm2-135m load: first (conversion) {first_s:.1f} s, cached {second_s:.2f} s")
    assert second_s < 5.0
