"""Architecture knowledge as data: where the repeated blocks live, which modules are linear layers.

Works for any ``transformers`` model whose blocks sit in one ``nn.ModuleList`` (Llama/SmolLM/Mistral/Qwen use
``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``); no per-model copies of code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

from lmshrink.errors import LmshrinkError

#: Known block-list paths, tried first (then any ModuleList whose length is ``num_hidden_layers``).
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "bert.encoder.layer",
    "encoder.layer",
    "roberta.encoder.layer",
    "distilbert.transformer.layer",
    "layers",
)

#: Default skip patterns for compression: embeddings, the LM head and classifier heads stay in float.
DEFAULT_SKIP: tuple[str, ...] = (
    r"(^|\.)lm_head$",
    r"embed",
    r"(^|\.)wte$",
    r"(^|\.)wpe$",
    r"classifier",
    r"pooler",
)


def _get_attr_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)`` for the model's list of transformer blocks.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> find_layers(m)[0]
    'model.layers'
    """
    for path in LAYER_PATHS:
        mod = _get_attr_path(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            return name, mod
    raise LmshrinkError(
        f"could not find the transformer blocks of {type(model).__name__}; "
        f"supported layouts: {', '.join(LAYER_PATHS)}"
    )


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 style ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight_oi(module: nn.Module) -> nn.Parameter:
    """The weight of a linear layer; note ``Conv1D`` stores it as (in, out), ``nn.Linear`` as (out, in)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise LmshrinkError(f"{type(module).__name__} has no weight parameter")
    return weight


def select_linears(
    model: nn.Module,
    targets: Sequence[str] = (r".*",),
    skip: Sequence[str] = DEFAULT_SKIP,
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for linear layers whose name matches a target regex and no skip regex.

    Patterns use ``re.search`` on the full dotted module name, e.g. ``r"\\.(q|k|v|o)_proj$"``.
    """
    target_re = [re.compile(p) for p in targets]
    skip_re = [re.compile(p) for p in skip]
    for name, mod in model.named_modules():
        if not name or not is_linear(mod):
            continue
        if any(r.search(name) for r in skip_re):
            continue
        if any(r.search(name) for r in target_re):
            yield name, mod


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
