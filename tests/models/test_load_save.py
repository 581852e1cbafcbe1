"""load_model / save_model: round trips, safety (no pickle), corrupt files, spec errors, format dispatch."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from lmshrink.errors import CorruptFileError, LmshrinkError, ModelLoadError
from lmshrink.models import describe_model, load_model, model_max_length, save_model
from lmshrink.models.load import check_safetensors
from lmshrink.models.save import FORMAT_HANDLERS


def _ids(vocab: int = 128, n: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def bert_tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "good", "bad", "is", "was"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words + [f"w{i}" for i in range(128 - len(words))]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@pytest.fixture()
def tied_llama(make_tiny_llama):
    return make_tiny_llama(tied=True)


def test_llama_round_trip_identical_logits_and_manifest(tiny_llama, tmp_path):
    ids = _ids()
    out = save_model(tiny_llama, tmp_path / "m")
    manifest = json.loads((out / "lmshrink.json").read_text())
    assert manifest["format"] == "dense" and manifest["task"] == "causal-lm"
    assert manifest["architecture"] == "LlamaForCausalLM" and manifest["lmshrink_version"]
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    model, tok = load_model(out)
    assert tok is None and not model.training
    assert torch.equal(_logits(model, ids), _logits(tiny_llama, ids))
    assert model.lmshrink_source == str(out)


def test_dense_save_reloads_with_plain_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_model(tiny_llama, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    assert torch.equal(_logits(plain, ids), _logits(tiny_llama, ids))


def test_tied_embeddings_round_trip(tied_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    assert describe_model(tied_llama)["tied_embeddings"] is True
    out = save_model(tied_llama, tmp_path / "tied")
    ids = _ids()
    model, _ = load_model(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model, ids), _logits(tied_llama, ids))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(plain, ids), _logits(tied_llama, ids))


def test_bert_round_trip_with_tokenizer(tiny_bert, bert_tokenizer, tmp_path):
    out = save_model(tiny_bert, tmp_path / "bert", tokenizer=bert_tokenizer)
    model, tok = load_model(out)
    assert type(model).__name__ == "BertForSequenceClassification"
    enc = tok(["the movie was good", "a bad movie"], padding=True, return_tensors="pt")
    assert (
        enc["input_ids"].tolist()
        == bert_tokenizer(["the movie was good", "a bad movie"], padding=True, return_tensors="pt")[
            "input_ids"
        ].tolist()
    )
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, tiny_bert(**enc).logits)
    encoder, _ = load_model(out, task="encoder")
    assert type(encoder).__name__ == "BertModel"


def test_save_overwrites_atomically_and_dtype_option(tiny_llama, tmp_path):
    out = tmp_path / "m"
    save_model(tiny_llama, out)
    save_model(tiny_llama, out)  # replacing an existing save works and leaves no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    model, _ = load_model(out, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LmshrinkError, match="unknown dtype"):
        load_model(out, dtype="int3")
    with pytest.raises(LmshrinkError, match="unknown task"):
        load_model(out, task="translation")


def test_truncated_safetensors_is_corrupt_file_error(tiny_llama, tmp_path):
    out = save_model(tiny_llama, tmp_path / "m")
    (weights,) = out.glob("*.safetensors")
    data = weights.read_bytes()
    check_safetensors(weights)
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptFileError, match=weights.name):
        load_model(out)
    weights.write_bytes(data[:5])
    with pytest.raises(CorruptFileError, match=weights.name):
        load_model(out)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptFileError, match=weights.name):
        load_model(weights)


def test_pickle_weights_refused_unless_allowed(tiny_llama, tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    tiny_llama.config.save_pretrained(folder)
    torch.save(tiny_llama.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(folder / "pytorch_model.bin")
    model, _ = load_model(folder / "pytorch_model.bin", allow_pickle=True)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(tiny_llama, ids))


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm3-1b/../x.gguf")
    assert "smollm2-135m" in str(err.value) and "minilm-l6" in str(err.value)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match=r"\.gguf file"):
        load_model("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(empty)


def test_close_reference_name_is_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m'"):
        load_model("smollm2-135")


def test_hub_id_offline_error_names_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("lmshrink-test/definitely-not-cached-model")
    msg = str(err.value)
    assert "hub id" in msg and "reference name" in msg and "HF_HUB_OFFLINE" in msg


def test_non_dense_format_dispatch(tiny_llama, tmp_path, monkeypatch):
    calls = {}
    fake = types.ModuleType("lmshrink_fake_storage")

    def save_fake(model, tmp_dir, tokenizer):
        (tmp_dir / "payload.txt").write_text("x")
        calls["save"] = True
        return {"bits": 4}

    def load_fake(path, manifest, device, dtype):
        calls["load"] = (manifest["bits"], str(device))
        return tiny_llama, None

    fake.save_fake = save_fake
    fake.load_fake = load_fake
    monkeypatch.setitem(sys.modules, "lmshrink_fake_storage", fake)
    monkeypatch.setitem(
        FORMAT_HANDLERS, "quantized", ("lmshrink_fake_storage:save_fake", "lmshrink_fake_storage:load_fake")
    )
    tiny_llama.lmshrink_format = "quantized"
    out = save_model(tiny_llama, tmp_path / "q")
    manifest = json.loads((out / "lmshrink.json").read_text())
    assert manifest["format"] == "quantized" and manifest["bits"] == 4
    model, _ = load_model(out)
    assert model is tiny_llama and calls["load"] == (4, "cpu")
    manifest["format"] = "mystery"
    (out / "lmshrink.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="unknown lmshrink format"):
        load_model(out)


def test_metadata_helpers(tiny_llama, tiny_bert):
    info = describe_model(tiny_llama)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden"], info["heads"], info["kv_heads"]) == (2, 64, 4, 2)
    assert info["parameters"] == sum(p.numel() for p in tiny_llama.parameters())
    assert info["dtype"] == "float32" and info["tied_embeddings"] is False
    assert model_max_length(tiny_llama) == 256
    assert model_max_length(tiny_llama, cap=64) == 64
    binfo = describe_model(tiny_bert)
    assert binfo["task"] == "sequence-classification" and binfo["kv_heads"] == 4


# ------------------------------------------------------------------------------------------------ untrusted files


def _rename_tensor(file, old: str, new: str) -> None:
    import struct

    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[new] = header.pop(old)
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize("with_manifest", [True, False])
def test_renamed_tensor_is_refused_not_reinitialised(tiny_llama, tmp_path, with_manifest):
    """A checkpoint whose tensor was renamed used to load with that weight randomly initialised."""
    out = save_model(tiny_llama, tmp_path / "m")
    if not with_manifest:
        (out / "lmshrink.json").unlink()  # a plain Hugging Face directory
    _rename_tensor(out / "model.safetensors", "model.norm.weight", "model.nrom.weight")
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*missing.*model\.nrom\.weight"):
        load_model(out)


def test_new_task_head_is_still_allowed(tiny_llama, tmp_path):
    """A causal LM loaded for sequence classification gets a fresh head: missing head tensors are expected."""
    out = save_model(tiny_llama, tmp_path / "m")
    model, _ = load_model(out, task="sequence-classification", num_labels=3)
    assert model.score.weight.shape == (3, 64)
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama.model.embed_tokens.weight)


def test_absurd_config_sizes_are_refused_before_allocation(tiny_llama, tmp_path):
    out = save_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 2**40
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match=r"config and the weights disagree.*embed_tokens"):
        load_model(out)
    cfg["intermediate_size"] = 2**31
    cfg["vocab_size"] = 128
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptFileError, match=r"mlp\.(gate|up|down)_proj"):
        load_model(out)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c.update(num_attention_heads=0), "config.json"),
        (lambda c: c.update(vocab_size="12"), "vocab_size"),
        (lambda c: c.update(model_type=["llama"]), "model_type"),
        (lambda c: c.update(lmshrink_note="harmless extra key"), None),
    ],
)
def test_invalid_config_values_are_corrupt_file_errors(tiny_llama, tmp_path, edit, match):
    out = save_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    if match is None:  # a harmless extra key loads
        load_model(out)
        return
    with pytest.raises(CorruptFileError, match=match):
        load_model(out)


def test_deeply_nested_config_and_manifest(tiny_llama, tmp_path):
    out = save_model(tiny_llama, tmp_path / "m")
    for name in ("config.json", "lmshrink.json"):
        good = (out / name).read_text()
        (out / name).write_text(
            good.rstrip().rstrip("}") + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
        )
        with pytest.raises(CorruptFileError, match=rf"{name}.*nested deeper than 64"):
            load_model(out)
        (out / name).write_text(good)


def test_allowed_pickle_directory_is_read_weights_only(tiny_llama, tmp_path):
    """allow_pickle=True on a directory with only pytorch_model.bin: read with weights_only=True, strictly."""
    tiny_llama.config.save_pretrained(tmp_path)
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load_model(tmp_path, allow_pickle=True)
    assert torch.equal(model.lm_head.weight, tiny_llama.lm_head.weight)
    state = tiny_llama.state_dict()
    state["lm_head.weihgt"] = state.pop("lm_head.weight")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"missing \['lm_head\.weight'\], unexpected \['lm_head\.weihgt'\]"
    ):
        load_model(tmp_path, allow_pickle=True)
