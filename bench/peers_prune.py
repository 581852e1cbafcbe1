"""Pruning: lmshrink against ``torch.nn.utils.prune`` (unstructured 50%) and Torch-Pruning (structured 20%) on CPU.

Unstructured rows prune the same layers (every linear layer of the transformer blocks) to 50% zeros. Structured rows
remove 20% of the MLP neurons (intermediate channels of gate/up/down, physically: a smaller dense model).

    .venv/bin/python bench/peers_prune.py                 # the full table (lead: quiet machine)
    .venv/bin/python bench/peers_prune.py --list          # row keys
    .venv/bin/python bench/peers_prune.py --rows torch-prune-l1,lmshrink-wanda --max-tokens 8192
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Context,
    LinearSelection,
    Row,
    parse_settings,
    run_table,
    save_flat_safetensors,
    save_lmshrink,
)

log = logging.getLogger("bench.peers_prune")
SPARSITY = 0.5
STRUCTURED = 0.2


# --------------------------------------------------------------------------------------------- torch.nn.utils.prune


def torch_prune(scope: str):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from torch.nn.utils import prune

        mods = [model.get_submodule(n) for n in LinearSelection.of(model).names]
        if scope == "layer":
            for m in mods:
                prune.l1_unstructured(m, "weight", amount=SPARSITY)
        else:
            prune.global_unstructured(
                [(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=SPARSITY
            )
        for m in mods:
            prune.remove(m, "weight")  # make the zeros permanent (a dense tensor with zeros)
        return model

    return compress


# --------------------------------------------------------------------------------------------- Torch-Pruning


def _tp_prune(model: nn.Module, ctx: Context, importance: str, unit: str) -> nn.Module:
    """Torch-Pruning ``MetaPruner`` on the HF Llama, pruning only ``unit`` ("neurons" or "heads") by ``STRUCTURED``.

    Set-up (checked on the real model: the removed gate/up rows and down_proj columns are the same indices, and the
    pruned model's logits equal the dense model's with those neurons zeroed, max |diff| 1e-3):
    - the dependency graph is traced with ``example_inputs`` (1 x 64 token ids), ``use_cache=False`` and
      ``output_transform=lambda out: out.logits`` (HF returns a ModelOutput);
    - neurons: roots gate_proj/up_proj, every other linear and the LM head ignored, so the coupled group is
      gate/up output channels + down_proj input channels; 20% per layer (``global_pruning=False``);
    - heads: ``num_heads`` given for q/k/v (9 query / 3 KV heads, GQA), ``prune_num_heads=True``,
      ``prune_head_dims=False`` (RoPE needs whole head dims), ``head_pruning_ratio`` 20%, ``pruning_ratio`` 0 for
      other channels, MLP and LM head ignored;
    - importance: ``GroupMagnitudeImportance(p=2)`` (data-free) or ``GroupTaylorImportance`` with gradients of the
      language-model loss on the same C4 calibration batches lmshrink uses (LLM-Pruner's criterion).
    """
    import torch_pruning as tp

    names = LinearSelection.of(model).names
    model.config.use_cache = False  # no KV-cache objects in the traced graph
    kwargs: dict[str, Any] = {}
    if unit == "neurons":
        roots = [n for n in names if n.endswith(("gate_proj", "up_proj"))]
        kwargs.update(pruning_ratio=STRUCTURED)
    else:
        roots = [n for n in names if n.endswith(("q_proj", "k_proj", "v_proj"))]
        heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
        num_heads = {}
        for n in roots:
            num_heads[model.get_submodule(n)] = heads if n.endswith("q_proj") else kv
        kwargs.update(
            pruning_ratio=0.0,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=STRUCTURED,
        )
    ignored = [model.get_submodule(n) for n in names if n not in roots and not n.endswith("o_proj")]
    ignored.append(model.get_output_embeddings())
    imp = (
        tp.importance.GroupMagnitudeImportance(p=2)
        if importance == "magnitude"
        else tp.importance.GroupTaylorImportance()
    )
    example = torch.randint(0, model.config.vocab_size, (1, 64))
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=imp,
        global_pruning=False,
        ignored_layers=ignored,
        root_module_types=[nn.Linear],
        output_transform=lambda out: out.logits,
        **kwargs,
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in ctx.calibration():
            ids = batch["input_ids"]
            (model(input_ids=ids, labels=ids).loss / len(ctx.calibration())).backward()
    # gate_proj and up_proj roots both yield the same coupled group (gate/up rows + down_proj columns): prune each
    # set of channels once, otherwise the second root prunes the already pruned layer again (seen with Taylor)
    done: set[int] = set()
    for group in pruner.step(interactive=True):
        mods = {id(dep.target.module) for dep, _ in group}
        if mods & done:
            continue
        log.info("torch-pruning group: %s %d channels", group[0][0].target.name, len(group[0][1]))
        group.prune()
        done |= mods
    model.zero_grad(set_to_none=True)
    inter = {model.get_submodule(n).out_features for n in names if n.endswith("gate_proj")}
    if len(inter) == 1:
        model.config.intermediate_size = inter.pop()
    for n in names:
        if n.endswith("q_proj"):  # keep the attention modules' bookkeeping consistent with the new shapes
            attn = model.get_submodule(n.rsplit(".", 1)[0])
            hd = attn.head_dim
            attn.num_heads = model.get_submodule(n).out_features // hd
            attn.num_key_value_heads = model.get_submodule(n.replace("q_proj", "k_proj")).out_features // hd
    return model


def torch_pruning(importance: str, unit: str) -> Callable[[nn.Module, Context], nn.Module]:
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        return _tp_prune(model, ctx, importance, unit)

    return compress


# --------------------------------------------------------------------------------------------- lmshrink


def lmshrink(**config: object):
    def compress(model: nn.Module, ctx: Context) -> nn.Module:
        from lmshrink.pruning import PruneConfig, prune_model

        s = ctx.settings
        cfg = PruneConfig(n_samples=s.calib_samples, seq_len=s.calib_seq_len, seed=s.seed, **config)  # type: ignore[arg-type]
        calib = ctx.calibration() if cfg.needs_calibration else None
        prune_model(model, cfg, calibration=calib, progress=False)
        return model

    return compress


def save_lmshrink_or_flat(model: nn.Module, out: Path, ctx: Context) -> str:
    """lmshrink's own format (bitmask + values for sparse); flat safetensors (said so) if that fails."""
    try:
        return save_lmshrink(model, out, ctx)
    except Exception as exc:  # report a real size either way, and say which
        return (
            save_flat_safetensors(model, out, ctx) + f" [lmshrink save failed: {type(exc).__name__}: {exc}]"
        )


LM = ("lmshrink.pruning.api",)
ROWS: list[Row] = [
    Row("torch-prune-l1", "torch", "nn.utils.prune.l1_unstructured per layer", "50%", torch_prune("layer"),
        note="dense storage (torch.prune has no sparse format)"),
    Row("torch-prune-global", "torch", "nn.utils.prune.global_unstructured L1", "50%", torch_prune("global"),
        note="dense storage"),
    Row("lmshrink-magnitude", "lmshrink", "magnitude (per layer)", "50%",
        lmshrink(method="magnitude", sparsity=SPARSITY), save_lmshrink_or_flat, needs=LM),
    Row("lmshrink-wanda", "lmshrink", "Wanda", "50%", lmshrink(method="wanda", sparsity=SPARSITY),
        save_lmshrink_or_flat, needs=LM),
    Row("lmshrink-sparsegpt", "lmshrink", "SparseGPT", "50%", lmshrink(method="sparsegpt", sparsity=SPARSITY),
        save_lmshrink_or_flat, needs=LM),
    Row("torch-pruning-mlp", "torch-pruning", "MetaPruner, group L2 magnitude, MLP neurons", "20% neurons",
        torch_pruning("magnitude", "neurons"), needs=("torch_pruning",),
        note="data-free importance; set-up verified (see _tp_prune)"),
    Row("torch-pruning-mlp-taylor", "torch-pruning", "MetaPruner, group Taylor (C4 gradients), MLP neurons",
        "20% neurons", torch_pruning("taylor", "neurons"), needs=("torch_pruning",)),
    Row("torch-pruning-heads", "torch-pruning", "MetaPruner, group Taylor (C4 gradients), GQA heads",
        "20% heads", torch_pruning("taylor", "heads"), needs=("torch_pruning",),
        unavailable="Torch-Pruning 1.6.1 MetaPruner fails on grouped-query attention (num_heads q=9, k/v=3, "
        "prune_num_heads=True): RuntimeError \"shape '[9, -1]' is invalid\" in base_pruner._prune (the query-head "
        "count applied to the KV projection's group); reproduced on a tiny GQA Llama"),
    Row("lmshrink-neurons", "lmshrink", "structured MLP neurons (calibrated importance)", "20% neurons",
        lmshrink(method="neurons", sparsity=STRUCTURED), save_lmshrink_or_flat, needs=LM),
    Row("lmshrink-neurons-ls", "lmshrink", "structured MLP neurons + least-squares re-fit of down_proj",
        "20% neurons", lmshrink(method="neurons", sparsity=STRUCTURED, reconstruct=True), save_lmshrink_or_flat,
        needs=LM),
    Row("lmshrink-heads", "lmshrink", "structured attention heads (calibrated importance)", "20% heads",
        lmshrink(method="heads", sparsity=STRUCTURED), save_lmshrink_or_flat, needs=LM),
    Row("lmshrink-heads-ls", "lmshrink", "structured attention heads + least-squares re-fit of o_proj",
        "20% heads", lmshrink(method="heads", sparsity=STRUCTURED, reconstruct=True), save_lmshrink_or_flat,
        needs=LM),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings((__doc__ or "").splitlines()[0], argv)
    run_table("prune", "Pruning vs peers (CPU)", ROWS, settings)


if __name__ == "__main__":
    main()
