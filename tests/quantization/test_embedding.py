"""QuantEmbedding: packed tables, tied to the LM head, quantize_model(embeddings=True), bit-identical reload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.evaluation import measure_size
from lmshrink.models import load_model, save_model
from lmshrink.quantization import QuantConfig, quantize_model
from lmshrink.quantization.config import WeightSpec
from lmshrink.quantization.embedding import QuantEmbedding
from lmshrink.quantization.linear import QuantLinear

NO_SKIP = [r"classifier", r"pooler"]  # quantize the LM head too


@pytest.fixture()
def llama(make_tiny_llama):
    """``llama(tied=True)``: a tiny Llama with a 256-token vocabulary (the embedding tests need groups of 16/32)."""
    return lambda tied=True: make_tiny_llama(tied=tied, vocab_size=256)


@pytest.mark.parametrize(("fmt", "group"), [("int8", None), ("int4", 32), ("int4-asym", 16), ("int3", 32)])
def test_rows_match_full_decode_and_error_is_bounded(fmt: str, group: int | None) -> None:
    torch.manual_seed(1)
    emb = nn.Embedding(100, 64)
    spec = WeightSpec.parse(fmt, group_size=group)
    q = QuantEmbedding.from_embedding(emb, spec)
    ids = torch.tensor([[0, 7, 7, 99], [3, 2, 1, 0]])
    table = q.dequantize_weight()
    assert torch.equal(q(ids), table[ids])  # lookup decodes only the rows it needs, bit for bit
    ref = QuantLinear.from_weight(emb.weight, None, spec).dequantize_weight()
    assert torch.equal(table, ref)  # same storage and rounding as a QuantLinear of the table
    err = (table - emb.weight).abs().max() / emb.weight.abs().max()
    assert err < {8: 0.01, 4: 0.15, 3: 0.3}[spec.bits]
    with pytest.raises(LmshrinkError, match=r"token ids must be in \[0, 100\)"):
        q(torch.tensor([[100]]))


def test_tied_model_quantized_with_embeddings_reloads_bit_identical(llama, tmp_path) -> None:
    m = llama(tied=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    fp32_bytes = measure_size(m, save_model(m, tmp_path / "fp32")).bytes_on_disk
    quantize_model(m, QuantConfig(format="int4", group_size=32, skip=NO_SKIP), embeddings=True)
    emb, head = m.model.embed_tokens, m.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and emb.tied_to == "lm_head"
    assert emb.qweight.data_ptr() == head.qweight.data_ptr()  # one packed table for both
    with torch.no_grad():
        out = m(input_ids=ids).logits
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()
    path = save_model(m, tmp_path / "q")
    size = measure_size(m, path)
    assert size.parameters == sum(p.numel() for p in llama().parameters())  # tied table counted once
    # int4 + fp16 scales per 32 -> 4.5 bits for every weight but the norms (and file headers): ~6x smaller
    assert size.bits_per_weight < 4.7
    assert fp32_bytes / size.bytes_on_disk > 5.5
    manifest = json.loads((path / "lmshrink.json").read_text())
    assert manifest["quantization"]["layers"]["model.embed_tokens"]["kind"] == "embedding"
    m2, _ = load_model(path)
    assert isinstance(m2.model.embed_tokens, QuantEmbedding)
    assert m2.model.embed_tokens.qweight.data_ptr() == m2.lm_head.qweight.data_ptr()
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, out)  # bit-identical reload
    again = save_model(m2, tmp_path / "q2")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_untied_embedding_and_skipped_head(llama, tmp_path) -> None:
    m = llama(tied=False)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    quantize_model(m, QuantConfig(format="int8"), embeddings=True)  # default skip keeps the untied head float
    assert isinstance(m.model.embed_tokens, QuantEmbedding) and m.model.embed_tokens.tied_to is None
    assert isinstance(m.lm_head, nn.Linear)
    with torch.no_grad():
        out = m(input_ids=ids).logits
    m2, _ = load_model(save_model(m, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(m2(input_ids=ids).logits, out)


def test_tied_head_skipped_is_quantized_too_and_bad_group_rejected(llama) -> None:
    m = llama(tied=True)
    quantize_model(m, QuantConfig(format="int8"), embeddings=True)  # lm_head in the default skip list
    assert isinstance(m.lm_head, QuantLinear) and m.model.embed_tokens.tied_to == "lm_head"
    m = llama(tied=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(LmshrinkError, match="group size 128 does not divide the dimension 64 of embedding"):
        quantize_model(m, QuantConfig(format="int4", group_size=128, targets=[r"down_proj"]), embeddings=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # untouched
