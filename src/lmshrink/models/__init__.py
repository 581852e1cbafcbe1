"""Models: load (hub id, local directory, .gguf, packaged reference models), save, and architecture helpers."""

from lmshrink.models.load import describe_model, load_model, load_tokenizer, model_max_length
from lmshrink.models.reference import REFERENCE_MODELS, ReferenceModel, reference_names, resolve_reference
from lmshrink.models.save import save_model

__all__ = [
    "REFERENCE_MODELS",
    "ReferenceModel",
    "describe_model",
    "load_model",
    "load_tokenizer",
    "model_max_length",
    "reference_names",
    "resolve_reference",
    "save_model",
]
