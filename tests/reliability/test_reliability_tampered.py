"""Tampered checkpoints (dense, sparse, pruned, quantized) written with a valid safetensors layout: every tensor is well formed, but the content lies
(wrong shapes or dtypes for the layer, missing scales, extra or renamed tensors, NaN scales). The loader must refuse
each with a CorruptFileError / ModelLoadError that names the tensor, never load it or crash."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _reliability_harness import FAILURES, copy_tree, guarded
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]
L0 = "model.layers.0"

QUANTIZED: dict[str, tuple[Callable[[Tensors], None], str]] = {
    "qweight-transposed": (
        lambda t: t.update({f"{L0}.mlp.gate_proj.qweight": t[f"{L0}.mlp.gate_proj.qweight"].T.contiguous()}),
        f"{L0}.mlp.gate_proj.qweight",
    ),
    "qweight-as-int8": (
        lambda t: t.update({f"{L0}.mlp.up_proj.qweight": t[f"{L0}.mlp.up_proj.qweight"].view(torch.int8)}),
        f"{L0}.mlp.up_proj.qweight",
    ),
    "scale-as-bf16": (
        lambda t: t.update({f"{L0}.self_attn.q_proj.scale": t[f"{L0}.self_attn.q_proj.scale"].bfloat16()}),
        f"{L0}.self_attn.q_proj.scale",
    ),
    "scale-missing": (lambda t: t.pop(f"{L0}.self_attn.k_proj.scale"), f"{L0}.self_attn.k_proj.scale"),
    "scale-fewer-groups": (
        lambda t: t.update({f"{L0}.mlp.down_proj.scale": t[f"{L0}.mlp.down_proj.scale"][:, :2].contiguous()}),
        f"{L0}.mlp.down_proj.scale",
    ),
    "scale-nan": (
        lambda t: t[f"{L0}.self_attn.o_proj.scale"].fill_(float("nan")),
        f"{L0}.self_attn.o_proj.scale",
    ),
    "codes-missing": (lambda t: t.pop(f"{L0}.self_attn.v_proj.qweight"), f"{L0}.self_attn.v_proj.qweight"),
    "extra-tensor": (lambda t: t.update({"backdoor.weight": torch.zeros(2)}), "backdoor.weight"),
    "norm-renamed": (
        lambda t: t.update({"model.nrom.weight": t.pop("model.norm.weight")}),
        "model.norm.weight",
    ),
    "embedding-resized": (
        lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:32].contiguous()}),
        "model.embed_tokens.weight",
    ),
}

UNPACKED: dict[str, tuple[Callable[[Tensors], None], str]] = {
    "norm-renamed": (
        lambda t: t.update({"model.nrom.weight": t.pop("model.norm.weight")}),
        "model.norm.weight",
    ),
    "norm-missing": (lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
    "embedding-resized": (
        lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:32].contiguous()}),
        "model.embed_tokens",
    ),
}


def _tamper(pristine: Path, dst: Path, edit: Callable[[Tensors], None]) -> Path:
    d = copy_tree(pristine, dst)
    f = d / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata=metadata)
    return d


def _expect_refusal(case: str, folder: Path, tensor: str) -> None:
    from lmshrink.errors import CorruptFileError, ModelLoadError
    from lmshrink.models import load_model

    caught: list[BaseException] = []

    def go() -> None:
        try:
            load_model(folder)
        except (CorruptFileError, ModelLoadError) as exc:
            caught.append(exc)
            raise

    out = guarded(go, "tampered")
    if not out.ok:
        FAILURES.append(f"{case} -> {out.kind}: {out.detail}")
    assert out.kind == "clean-error", f"{case} -> {out.kind}: {out.detail}"
    assert caught, f"{case}: refused with an error other than CorruptFileError/ModelLoadError: {out.detail}"
    assert tensor in str(caught[0]), f"{case}: the error does not name {tensor!r}: {caught[0]}"


@pytest.mark.parametrize("case", sorted(QUANTIZED))
def test_tampered_quantized_checkpoint(case: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    if "quantized" not in saved_models:
        pytest.skip("quantized format not available")
    edit, tensor = QUANTIZED[case]
    _expect_refusal(f"quantized/{case}", _tamper(saved_models["quantized"], tmp_path / case, edit), tensor)


@pytest.mark.parametrize("fmt", ["dense", "sparse", "pruned"])
@pytest.mark.parametrize("case", sorted(UNPACKED))
def test_tampered_unpacked_checkpoints(
    fmt: str, case: str, saved_models: dict[str, Path], tmp_path: Path
) -> None:
    if fmt not in saved_models:
        pytest.skip(f"{fmt} format not available")
    edit, tensor = UNPACKED[case]
    _expect_refusal(f"{fmt}/{case}", _tamper(saved_models[fmt], tmp_path / case, edit), tensor)
