"""Untrusted inputs never run code: pickles are refused (and read weights-only when allowed), YAML recipes cannot
construct Python objects, and hostile recipes (deep nesting, alias bombs, bad UTF-8) end in a clean error."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from _reliability_harness import FAILURES, guarded


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _hf_dir_with_pickle(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    ).save_pretrained(folder)
    (folder / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    return folder


def _check(case: str, fn, category: str) -> str:  # type: ignore[no-untyped-def]
    out = guarded(fn, category)
    if not out.ok:
        FAILURES.append(f"{case} -> {out.kind}: {out.detail}")
    assert out.ok, f"{case} -> {out.kind}: {out.detail}"
    return out.kind


@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("spec", ["dir", "file"])
def test_pickle_never_runs_code(tmp_path: Path, spec: str, allow_pickle: bool) -> None:
    from lmshrink.models import load_model

    marker = tmp_path / "pwned"
    folder = _hf_dir_with_pickle(tmp_path / "m", marker)
    target = folder if spec == "dir" else folder / "pytorch_model.bin"
    kind = _check(f"pickle {spec} allow_pickle={allow_pickle}", lambda: load_model(target, allow_pickle=allow_pickle),
                  "untrusted")  # fmt: skip
    assert kind == "clean-error"
    assert not marker.exists(), "unpickling ran code"


def test_pickle_refused_message_says_what_to_do(tmp_path: Path) -> None:
    from lmshrink.errors import LmshrinkError
    from lmshrink.models import load_model

    folder = _hf_dir_with_pickle(tmp_path / "m", tmp_path / "pwned")
    with pytest.raises(LmshrinkError, match=r"(?i)safetensors"):
        load_model(folder)


def test_allowed_pickle_of_plain_tensors_loads(tmp_path: Path) -> None:
    """The escape hatch works for an honest state dict (weights_only=True accepts tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmshrink.models import load_model

    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
    )
    m = LlamaForCausalLM(cfg)
    cfg.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    loaded, _ = load_model(tmp_path / "pytorch_model.bin", allow_pickle=True)
    assert torch.equal(loaded.model.embed_tokens.weight, m.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------- recipes


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "name: bomb\nstages: []\n" + "\n".join(lines) + "\n"


RECIPES = {
    "python-object-tag": "name: x\nstages:\n  - !!python/object/apply:os.system ['touch {marker}']\n",
    "python-name-tag": "name: !!python/name:os.system\nstages: []\n",
    "deep-flow-nesting-1e4": "name: x\nstages: " + "[" * 10_000 + "]" * 10_000 + "\n",
    "deep-flow-nesting-1e3": "name: x\nstages: " + "[" * 1_000 + "]" * 1_000 + "\n",
    "deep-block-nesting-300": "name: x\nstages:\n" + "".join("  " * (i + 1) + "- \n" for i in range(300)),
    "alias-bomb-9^9": _alias_bomb(),
    "alias-bomb-in-stage": "a: &a [1, 2]\nname: x\nstages:\n  - {kind: quantize, name: q, method: *a}\n",
    "not-a-mapping": "- 1\n- 2\n",
    "empty": "",
    "huge-int": "name: x\nstages:\n  - {kind: prune, name: p, sparsity: " + "9" * 5000 + "}\n",
    "tabs-and-nul": "name: x\tstages: [\x00]\n",
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_hostile_recipes(case: str, tmp_path: Path) -> None:
    recipes = pytest.importorskip("lmshrink.recipes")
    marker = tmp_path / "pwned"
    text = RECIPES[case].replace("{marker}", str(marker))
    _check(f"recipe/{case}", lambda: recipes.load_recipe_text(text, source=case), "recipe")
    assert not marker.exists()


def test_recipe_bad_utf8(tmp_path: Path) -> None:
    recipes = pytest.importorskip("lmshrink.recipes")
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: \xff\xfe\nstages: []\n")
    assert _check("recipe/bad-utf8", lambda: recipes.load_recipe(p), "recipe") == "clean-error"


# --------------------------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_absent_cuda_is_a_clean_error(tmp_path: Path) -> None:
    from lmshrink.utils.env import resolve_device

    assert _check("device/cuda-absent", lambda: resolve_device("cuda"), "device") == "clean-error"
    assert _check("device/nonsense", lambda: resolve_device("tpu:7"), "device") == "clean-error"


def test_environment_is_offline() -> None:
    """The suite never reaches the hub (a hostile repo could ship code); conftest sets HF_HUB_OFFLINE."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
