import pytest
import torch
from safetensors.torch import save_file

from lmshrink.errors import CorruptFileError
from lmshrink.pruning import apply_weight_pruning, prune_model
from lmshrink.pruning.storage import (
    WEIGHTS_FILE,
    decode_sparse,
    encode_sparse,
    load_sparse,
    pack_bits,
    save_sparse,
    unpack_bits,
)


def test_pack_unpack_roundtrip():
    mask = torch.rand(1003) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(unpack_bits(packed, 1003), mask)


def test_encode_only_when_smaller():
    dense = torch.randn(64, 64)
    assert encode_sparse(dense) is None
    sparse = dense * (torch.rand(64, 64) > 0.5)
    enc = encode_sparse(sparse)
    assert enc is not None
    assert torch.equal(decode_sparse(enc["bitmask"], enc["values"], [64, 64]), sparse)
    with pytest.raises(CorruptFileError):
        decode_sparse(enc["bitmask"], enc["values"][:-1], [64, 64])


def _dense_bytes(model, path):
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))
    return path.stat().st_size


def test_sparse_roundtrip_identical_and_smaller(tiny_llama, tmp_path):
    apply_weight_pruning(tiny_llama, 0.5)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = tiny_llama(input_ids=ids).logits
    (tmp_path / "m").mkdir()
    manifest = save_sparse(tiny_llama, tmp_path / "m", None)
    assert manifest["compressed_tensors"] == 14
    stored = (tmp_path / "m" / WEIGHTS_FILE).stat().st_size
    assert stored == manifest["weights_file_bytes"]
    dense = _dense_bytes(tiny_llama, tmp_path / "dense.safetensors")
    # 14 of 15 big matrices at 50%: 1 bit mask + half the values ~ 0.53x for them
    assert stored < 0.75 * dense
    loaded, tok = load_sparse(tmp_path / "m", manifest)
    assert tok is None and loaded.lmshrink_format == "sparse"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_tied_embeddings_roundtrip(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    prune_model(model, {"method": "magnitude", "sparsity": 0.3}, progress=False)
    manifest = save_sparse(model, tmp_path, None)
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded, _ = load_sparse(tmp_path, manifest)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_bf16_kept(tiny_llama, tmp_path):
    tiny_llama.to(torch.bfloat16)
    apply_weight_pruning(tiny_llama, 0.5)
    manifest = save_sparse(tiny_llama, tmp_path, None)
    loaded, _ = load_sparse(tmp_path, manifest)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
