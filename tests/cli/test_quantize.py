"""``lmshrink quantize``: writes a packed, reloadable directory and prints a summary; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmshrink.cli.quantize as cli_quantize
from lmshrink.cli import main
from lmshrink.kernels import cpu as cpu_kernels
from lmshrink.quantization.linear import QuantLinear


@pytest.fixture()
def fake_sources(monkeypatch: pytest.MonkeyPatch, make_tiny_llama) -> None:
    # a fresh model per call: quantize_model changes the model in place
    monkeypatch.setattr(cli_quantize, "_load", lambda spec: (make_tiny_llama(), None))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (1, 32), generator=g)} for _ in range(4)]
    monkeypatch.setattr(cli_quantize, "_calibration", lambda *a, **k: batches)


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "rtn", "--format", "int4", "--group-size", "32"],
        ["--method", "gptq", "--format", "int4", "--group-size", "32", "--n-samples", "4", "--seq-len", "32"],
        [
            "--method",
            "gptq",
            "--format",
            "int4",
            "--n-samples",
            "4",
            "--seq-len",
            "32",
            "--no-true-sequential",
            "--scale-refit",
            "0",
        ],
        ["--method", "smoothquant", "--format", "int8"],
        ["--method", "smoothquant", "--format", "int8", "--weight-method", "gptq", "--scale-refit", "0"],
        ["--method", "rtn", "--format", "int4-asym", "--group-size", "32", "--clip-search"],
        ["--method", "rtn", "--format", "int8", "--activations", "int8", "--rotate"],
        [
            "--method",
            "gptq",
            "--format",
            "int4",
            "--n-samples",
            "2",
            "--seq-len",
            "16",
            "--rotate",
            "--no-online-hadamard",
            "--scale-refit",
            "0",
        ],
    ],
)
def test_quantize_writes_a_loadable_directory(tmp_path: Path, fake_sources, args: list[str], capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "tiny", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantized layers" in printed and "14" in printed
    from lmshrink.models import load_model

    m, _ = load_model(str(out))
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 14
    # W8A8 on a CPU whose int8 pairs saturate: the summary says how the kernel copes; never for weight-only
    w8a8 = "smoothquant" in args or "--activations" in args
    w8a8_here = w8a8 and cpu_kernels.fbgemm_available() and cpu_kernels.int8_pairs_saturate()
    flat = "".join(ch for ch in printed if ch not in "│┃ \n")  # the table may wrap the note
    assert ("7-bitactivations" in flat) == w8a8_here
    assert ("residualstream,randomizedHadamard" in flat) == ("--rotate" in args)
    assert ("onlineHadamardondown_proj" in flat) == (
        "--rotate" in args and "--no-online-hadamard" not in args
    )


def _quantized(out: Path) -> dict[str, QuantLinear]:
    from lmshrink.models import load_model

    m, _ = load_model(str(out))
    return {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}


def test_target_and_skip_choose_the_layers(tmp_path: Path, fake_sources) -> None:
    out = tmp_path / "q"
    only = ["--target", r"\.q_proj$", "--target", "down_proj"]
    assert main(["quantize", "tiny", *only, "--out", str(out)]) == 0
    assert sorted(n.rsplit(".", 1)[1] for n in _quantized(out)) == ["down_proj"] * 2 + ["q_proj"] * 2
    out2 = tmp_path / "q2"
    skip = ["--skip", "mlp", "--skip", "embed", "--skip", "lm_head"]
    assert main(["quantize", "tiny", *skip, "--out", str(out2)]) == 0
    names = _quantized(out2)
    assert len(names) == 8 and not any("mlp" in n for n in names)


def test_float_activations_and_outliers_reach_smoothquant(tmp_path: Path, fake_sources) -> None:
    out = tmp_path / "q"
    args = ["--method", "smoothquant", "--outliers", "none", "--float-activations", "down_proj"]
    assert main(["quantize", "tiny", *args, "--out", str(out)]) == 0
    layers = _quantized(out)
    acts = {n.rsplit(".", 1)[1]: m.act for n, m in layers.items()}
    assert acts["down_proj"] == "float" and acts["q_proj"] == "int8"
    assert all(m.threshold is None for m in layers.values())  # --outliers none: no fp32 outlier columns
    # the tiny model never takes the outlier fallback under "auto" either, so check the recorded config too
    config = json.loads((out / "lmshrink.json").read_text())["quantization"]["config"]
    assert config["outliers"] == "none" and config["float_activations"] == ["down_proj"]


def test_embeddings_flag_packs_the_embedding_table(tmp_path: Path, fake_sources) -> None:
    from lmshrink.quantization.embedding import QuantEmbedding

    out = tmp_path / "q"
    assert main(["quantize", "tiny", "--format", "int8", "--embeddings", "--out", str(out)]) == 0
    assert any(isinstance(m, QuantEmbedding) for m in _quantized(out).values())
    out2 = tmp_path / "q2"
    assert main(["quantize", "tiny", "--format", "int8", "--out", str(out2)]) == 0
    assert not any(isinstance(m, QuantEmbedding) for m in _quantized(out2).values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method"),
        (["--format", "int4", "--group-size", "48"], "does not divide"),
        (["--format", "int17"], "bits must be in 2..8"),
        (["--method", "gptq", "--format", "int4", "--scale-refit", "-1"], "scale_refit"),
        (["--method", "smoothquant", "--format", "int8", "--clip-search"], "clip_search applies to methods"),
        (["--method", "rtn", "--format", "nf4", "--clip-search"], "clip_search applies to methods"),
        (["--target", "no_such_layer"], "no linear layers"),
        (["--method", "smoothquant", "--outliers", "some"], "outliers"),
        (["--method", "rtn", "--float-activations", "down_proj"], "float_activations applies to method"),
        (["--target", "(unclosed"], "invalid regex"),
        (["--method", "gptq", "--format", "int4", "--damp", "0"], "damp"),
        (
            ["--method", "gptq", "--format", "int4", "--weight-method", "gptq"],
            "weight_method applies to method",
        ),
        (["--method", "smoothquant", "--weight-method", "awq"], "weight_method"),
    ],
)
def test_bad_input_exits_2_without_output(tmp_path: Path, fake_sources, args, message, capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", "tiny", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("online", [True, False])
def test_rotated_model_info_says_so(tmp_path: Path, fake_sources, capsys, online: bool) -> None:
    out = tmp_path / "q"
    args = ["quantize", "tiny", "--format", "int8", "--rotate", *([] if online else ["--no-online-hadamard"])]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    flat = "".join(ch for ch in capsys.readouterr().out if ch not in "│┃ \n")
    assert "residualstreamrotated" in flat
    assert ("onlineblockHadamardon2layerinputs" in flat) == online
