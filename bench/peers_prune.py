"""Pruning: lmshrink against ``torch.nn.utils.prune`` (unstructured 50%) and Torch-Pruning (structured 20%) on CPU.

Unstructured rows prune the same layers (every linear layer of the transformer blocks) to 50% zeros. Structured rows
remove 20% of the MLP neurons (intermediate channels of gate/up/down, physically: a smaller dense model).

    .venv/bin/python bench/peers_prune.py                 # the full table (lead: quiet machine)
    .venv/bin/python bench/peers_prune.py --list          # row keys
    .venv/bin/python bench/peers_prune.py --rows torch-prune-l1,lmshrink-wanda --max-tokens 8192
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def torch_pruning_mlp(model: nn.Module, ctx: Context) -> nn.Module:
    """Torch-Pruning MetaPruner with group L2 magnitude importance, roots restricted to gate_proj/up_proj, so the
    dependency graph removes the coupled gate/up output channels and down_proj input channels (MLP neurons)."""
    import torch_pruning as tp

    names = LinearSelection.of(model).names
    roots = [n for n in names if n.endswith(("gate_proj", "up_proj"))]
    ignored = [model.get_submodule(n) for n in names if n not in roots]
    ignored.append(model.get_output_embeddings())
    example = torch.randint(0, model.config.vocab_size, (1, 64))
    model.config.use_cache = False  # no KV-cache objects in the traced graph
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=STRUCTURED,
        ignored_layers=ignored,
        global_pruning=False,
        root_module_types=[nn.Linear],
        output_transform=lambda out: out.logits,  # HF models return a ModelOutput, TP traces a tensor
    )
    pruner.step()
    inter = {model.get_submodule(n).out_features for n in roots}
    if len(inter) == 1:
        model.config.intermediate_size = inter.pop()
    return model


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
        torch_pruning_mlp, needs=("torch_pruning",)),
    Row("lmshrink-neurons", "lmshrink", "structured MLP neurons (calibrated importance)", "20% neurons",
        lmshrink(method="neurons", sparsity=STRUCTURED), save_lmshrink_or_flat, needs=LM),
    Row("lmshrink-heads", "lmshrink", "structured attention heads (calibrated importance)", "20% heads",
        lmshrink(method="heads", sparsity=STRUCTURED), save_lmshrink_or_flat, needs=LM,
        note="no peer row: Torch-Pruning head pruning with GQA (9 q / 3 kv heads) not attempted"),
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings((__doc__ or "").splitlines()[0], argv)
    run_table("prune", "Pruning vs peers (CPU)", ROWS, settings)


if __name__ == "__main__":
    main()
