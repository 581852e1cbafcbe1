"""``quantize_model``: the one entry point for whole-model quantization.

A registry maps each method to its handler (``"module:function"``, imported when used). Every handler receives the
model, the validated :class:`QuantConfig`, the selected ``(name, module)`` linear layers and the calibration batches,
and swaps the layers for :class:`~lmshrink.quantization.linear.QuantLinear` modules. Calibrated methods run block by
block (:func:`for_each_block`) so memory stays near one block's worth beyond the model.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
>>> m = quantize_model(m, QuantConfig(method="rtn", format="int4", group_size=16))
>>> type(m.model.layers[0].mlp.down_proj).__name__, m.lmshrink_format
('QuantLinear', 'quantized')
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.models.arch import find_layers, select_linears
from lmshrink.models.layerwise import BlockInput, run_layerwise
from lmshrink.quantization.config import QuantConfig
from lmshrink.quantization.linear import linear_weight_and_bias

log = logging.getLogger(__name__)

Batches = Sequence[dict[str, torch.Tensor]]
Layers = list[tuple[str, nn.Module]]
Handler = Callable[[nn.Module, QuantConfig, Layers, Batches | None], None]

#: method -> handler, as "module:function" (imported on use; no import-time side effects).
METHOD_HANDLERS: dict[str, str] = {
    "rtn": "lmshrink.quantization.rtn:quantize_rtn",
    "llm-int8": "lmshrink.quantization.rtn:quantize_llm_int8",
    "gptq": "lmshrink.quantization.gptq:quantize_gptq",
    "awq": "lmshrink.quantization.awq:quantize_awq",
    "smoothquant": "lmshrink.quantization.smoothquant:quantize_smoothquant",
}


def get_handler(method: str) -> Handler:
    """The handler registered for ``method``."""
    if method not in METHOD_HANDLERS:
        raise LmshrinkError(f"unknown method {method!r}; accepted: {', '.join(METHOD_HANDLERS)}")
    module, _, func = METHOD_HANDLERS[method].partition(":")
    handler: Handler = getattr(importlib.import_module(module), func)
    return handler


def _validate(model: nn.Module, config: QuantConfig, calibration: Batches | None) -> Layers:
    layers = list(select_linears(model, config.targets, config.skip))
    if not layers:
        raise LmshrinkError(
            f"no linear layers match targets {config.targets} outside skip {config.skip}; "
            f"check the patterns against the names in model.named_modules()"
        )
    gs = config.group_size
    in_dims = {n: linear_weight_and_bias(m)[0].shape[1] for n, m in layers}
    bad = [f"{n} (in={k})" for n, k in in_dims.items() if gs and k % gs]
    if bad:
        raise LmshrinkError(
            f"group size {gs} does not divide the input dimension of {len(bad)} layer(s): {', '.join(bad[:5])}; "
            f"choose a divisor of every input dimension"
        )
    for name, mod in layers:
        w, b = linear_weight_and_bias(mod)
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            raise NumericsError(f"layer {name!r} has NaN or Inf weights; quantization needs finite weights")
    if config.needs_calibration and (calibration is None or len(calibration) == 0):
        raise LmshrinkError(
            f"method {config.method!r} needs calibration data: pass a non-empty list of batches "
            f"(lmshrink.data.calibration_batches)"
        )
    spec = config.weight_spec()
    if not spec.is_integer:
        from lmshrink.quantization.linear import _get_codec

        _get_codec(spec.format)
    if config.rotate:
        from lmshrink.quantization.rotation import check_rotatable

        check_rotatable(model)
    return layers


def quantize_model(
    model: nn.Module,
    config: QuantConfig | dict[str, Any],
    calibration: Batches | None = None,
    *,
    embeddings: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place with ``config`` and return it (``model.lmshrink_format = "quantized"``).

    Everything is validated before any layer changes (formats, group sizes, finite weights, calibration), so a
    failure leaves the model untouched. ``calibration``: batches like ``{"input_ids": LongTensor (1, L)}``.
    ``embeddings=True`` also stores the ``nn.Embedding`` tables packed (RTN, same format; a table tied to the LM
    head shares its packed tensors): see :mod:`lmshrink.quantization.embedding`.
    """
    cfg = config if isinstance(config, QuantConfig) else QuantConfig(**config)
    layers = _validate(model, cfg, calibration)
    handler = get_handler(cfg.method)
    emb_plan = None
    if embeddings:
        from lmshrink.quantization.embedding import plan_embeddings, quantize_embeddings

        emb_plan = plan_embeddings(model, cfg.weight_spec())
    log.info("quantizing %d linear layers with %s/%s", len(layers), cfg.method, cfg.format)
    with torch.no_grad():
        if cfg.rotate:
            from lmshrink.quantization.rotation import rotate_model

            rotate_model(model, cfg.rotation_seed, cfg.online_hadamard)
            layers = list(select_linears(model, cfg.targets, cfg.skip))  # down_proj now sits in a wrapper
        handler(model, cfg, layers, calibration)
        if emb_plan is not None:
            quantize_embeddings(model, cfg.weight_spec(), emb_plan)
            if cfg.rotate:
                from lmshrink.quantization.rotation import install_rotation

                install_rotation(model)  # the embedding module was replaced: hook the new one
    model.lmshrink_format = "quantized"  # type: ignore[assignment]
    model.lmshrink_quant_config = cfg.model_dump(mode="json")  # type: ignore[assignment]
    return model


# ---- orchestration shared by the calibrated methods -----------------------------------------------------------
BlockLayers = list[tuple[str, str, nn.Module]]  # (full name, name inside the block, module)
ProcessBlock = Callable[[int, nn.Module, BlockLayers, list[BlockInput]], None]


def for_each_block(
    model: nn.Module, layers: Layers, calibration: Batches, process: ProcessBlock, propagate: bool = True
) -> Layers:
    """Run ``process(index, block, block_layers, inputs)`` for each transformer block holding selected layers.

    Returns the selected layers that sit outside every block (the caller quantizes those without calibration).
    """
    path, blocks = find_layers(model)
    by_block: dict[int, BlockLayers] = {}
    outside: Layers = []
    for name, mod in layers:
        prefix = f"{path}."
        idx, _, rel = name[len(prefix) :].partition(".") if name.startswith(prefix) else ("", "", "")
        if idx.isdigit() and rel:
            by_block.setdefault(int(idx), []).append((name, rel, mod))
        else:
            outside.append((name, mod))

    def _process(index: int, block: nn.Module, inputs: list[BlockInput]) -> None:
        if index in by_block:
            log.info("block %d/%d: %d layers", index + 1, len(blocks), len(by_block[index]))
            process(index, block, by_block[index], inputs)

    run_layerwise(model, calibration, _process, propagate_transformed=propagate)
    return outside


class _AllInputsSeen(Exception):
    """Raised inside a block's forward once every watched module has its input: the rest is not needed."""


def feed_inputs(
    block: nn.Module,
    modules: dict[str, nn.Module],
    inputs: list[BlockInput],
    on_input: Callable[[str, torch.Tensor], None],
) -> None:
    """Run ``block`` over ``inputs``, calling ``on_input(name, x2d)`` with each watched module's input.

    Each input's forward stops as soon as every watched module has received its input (q/k/v or gate/up of a
    true-sequential GPTQ group need only the first part of the block), so a watched module is reported once per
    input.
    """
    seen: set[str] = set()
    handles = []
    for name, mod in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name in seen:
                return
            x = args[0].detach()
            on_input(name, x.reshape(-1, x.shape[-1]).float())
            seen.add(name)
            if len(seen) == len(modules):
                raise _AllInputsSeen

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for inp in inputs:
            seen.clear()
            with torch.no_grad(), contextlib.suppress(_AllInputsSeen):
                block(*inp.args, **inp.kwargs)
    finally:
        for h in handles:
            h.remove()


def replace_with_quantized(
    block: nn.Module,
    rel: str,
    w: torch.Tensor,
    b: torch.Tensor | None,
    spec: Any,
    act: Any,
    scale: torch.Tensor | None,
    threshold: float | None = None,
) -> None:
    """Swap ``block.<rel>`` for a QuantLinear of ``w`` (times the per-input-channel ``scale``, undone on the input);
    ``threshold``: keep input columns with any ``|x| > threshold`` in fp32 (LLM.int8() decomposition)."""
    from lmshrink.models.arch import set_submodule
    from lmshrink.quantization.linear import QuantLinear

    if scale is not None:
        q = QuantLinear.from_weight(w * scale, b, spec, act=act, input_scale=True, threshold=threshold)
        q.set_input_scale(1.0 / scale)
    else:
        q = QuantLinear.from_weight(w, b, spec, act=act, threshold=threshold)
    set_submodule(block, rel, q.to(w.device))


def quantize_outside_blocks(model: nn.Module, config: QuantConfig, outside: Layers) -> None:
    """RTN for the selected layers that sit outside every transformer block (no calibration inputs reach them)."""
    if not outside:
        return
    from lmshrink.quantization.rtn import quantize_rtn

    log.warning("%d layers outside the transformer blocks get RTN: %s", len(outside), [n for n, _ in outside])
    quantize_rtn(model, config, outside)
