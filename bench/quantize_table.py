"""Quantization accuracy table (issue #3 acceptance): every format of lmshrink next to torch's ``quantize_dynamic``,
on one model, one token stream, one protocol.

Rows: fp32, bf16, int8 per-channel RTN (weight-only and W8A8), W8A8 SmoothQuant, LLM.int8(), int4 RTN / GPTQ / AWQ
(one group size), NF4, 1.58-bit RTN, torch ``quantize_dynamic`` int8. Columns: perplexity and its change vs fp32,
mean KL(fp32 || row) in nats/token, top-1 agreement with fp32, bytes on disk (``lmshrink.models.save_model`` for
lmshrink rows, one safetensors file of the flattened state dict for torch rows).

Evaluation: WikiText-2 raw test, tokenized once, non-overlapping windows of ``--ctx`` tokens (the GPTQ protocol),
scored window by window. Every row's model is built first and kept in memory, so the fp32 reference runs once
per window (not once per row); the result files are rewritten after every window, so a run cut short by
``--time-budget`` still holds a complete table over the windows it scored (``n_tokens`` says how many).

    # the reference model (smollm2-135m, its float weights are dequantized Q4_1 values)
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize_table.py --max-tokens 102400
    # a model trained in float by lmshrink itself (trained first when absent, ~15 CPU-minutes, one thread)
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize_table.py --model float-llama --ctx 128 --calib-seq-len 128 --calib-samples 128
    # (re)create only the float model
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize_table.py --model float-llama --train-only
    # the full WikiText-2 test set on a GPU (model, calibration and evaluation on cuda; cpu is the default)
    python bench/quantize_table.py --device cuda --max-tokens 1000000
    # GPTQ/RTN variants (rows outside the default table): per-channel int4 and the MSE-searched clipping
    OMP_NUM_THREADS=1 .venv/bin/python bench/quantize_table.py --max-tokens 4096 \
        --rows int4-pc-rtn,int4-pc-gptq,int4-g64-rtn-mse,int4-g64-gptq-mse
    # GPTQ options for every GPTQ row: --no-true-sequential, --scale-refit 0, --damp 0.01, --token-clip 100,
    # --no-act-order (the defaults are lmshrink's: act-order, true-sequential, 2 scale refits)
    # a long table in pieces: built lmshrink rows are kept in --cache-dir and reloaded (lmshrink.models.load_model,
    # bit-identical), --resume continues an existing result file from its next window (same settings and code)
    .venv/bin/python bench/quantize_table.py --threads 2 --max-tokens 102400 --cache-dir ~/.cache/lmshrink/qtable --resume

Rows whose quantized layers have no kernel on the chosen device fall back to dequantize-on-the-fly (the
``kernels`` column says which ran); torch ``quantize_dynamic`` is CPU-only (a skipped row on cuda).

Writes ``bench/results/quantize_table_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LinearSelection,
    save_flat_safetensors,
    save_lmshrink,
    size_on_disk,
    stored_bytes,
    versions,
)

from lmshrink.utils.env import numerics_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
os.environ.setdefault("LMSHRINK_DATA", str((REPO / ".." / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
log = logging.getLogger("quantize_table")

#: The float models lmshrink trains itself with ``lmshrink.distillation.teacher.train_teacher`` on the WikiText-103
#: train excerpt (genuinely float weights, unlike smollm2-135m's dequantized Q4_1 ones), each kept outside the
#: repository in ``~/.cache/lmshrink/<name>`` (``LMSHRINK_FLOAT_LLAMA`` moves ``float-llama``).
#: ``float-llama`` is under-trained (perplexity ~340) and so robust that no 4-bit row moves its
#: perplexity; ``float-llama-256`` is trained ~5x longer on a 2,048-token vocabulary, to a perplexity where 4-bit
#: damage is measurable, with widths (256, 768) that groups of 128 divide.
_FLOAT_COMMON: dict[str, Any] = {
    "data": "wikitext103 (train excerpt, lmshrink.distillation.teacher.load_corpus)",
    "num_layers": 4,
    "batch_size": 16,
    "seq_len": 128,
    "lr": 3e-3,
    "seed": 0,
    "bf16": False,
}
FLOAT_MODELS: dict[str, dict[str, Any]] = {
    "float-llama": {
        **_FLOAT_COMMON,
        "hidden_size": 384,
        "num_heads": 6,
        "vocab_size": 4096,
        "steps": 300,
        "warmup": 30,
    },
    "float-llama-256": {
        **_FLOAT_COMMON,
        "hidden_size": 256,
        "num_heads": 4,
        "intermediate_size": 768,
        "vocab_size": 2048,
        "steps": 1600,
        "warmup": 50,
    },
}


def float_model_dir(name: str) -> Path:
    """Where the float model ``name`` is kept (outside the repository)."""
    if name == "float-llama" and os.environ.get("LMSHRINK_FLOAT_LLAMA"):
        return Path(os.environ["LMSHRINK_FLOAT_LLAMA"]).expanduser()
    return Path("~/.cache/lmshrink").expanduser() / name


# --------------------------------------------------------------------------------------------- float model


def train_float_model(name: str, threads: int = 1) -> Path:
    """Train the float model ``name`` (a :data:`FLOAT_MODELS` recipe) with
    ``lmshrink.distillation.teacher.train_teacher`` and save it to ``float_model_dir(name) / "model"``."""
    from lmshrink.distillation.teacher import load_corpus, train_teacher
    from lmshrink.distillation.trainer import TrainConfig
    from lmshrink.models import save_model

    torch.set_num_threads(threads)
    out = float_model_dir(name)
    r = FLOAT_MODELS[name]
    cfg = TrainConfig(
        steps=r["steps"],
        batch_size=r["batch_size"],
        seq_len=r["seq_len"],
        lr=r["lr"],
        warmup_steps=r["warmup"],
        seed=r["seed"],
        bf16=r["bf16"],
        device="cpu",
        val_max_tokens=16384,
        progress=False,
        checkpoint_every=50,
    )
    t0 = time.perf_counter()
    model, tok, result = train_teacher(
        load_corpus("wikitext103", "train"),
        out_dir=out / "run",
        config=cfg,
        hidden_size=r["hidden_size"],
        num_layers=r["num_layers"],
        num_heads=r["num_heads"],
        intermediate_size=r.get("intermediate_size"),
        vocab_size=r["vocab_size"],
        val_text=load_corpus("wikitext103", "validation"),
    )
    path = save_model(model, out / "model", tok)
    info = {
        "recipe": r,
        "parameters": result.parameters,
        "train_s": time.perf_counter() - t0,
        "threads": threads,
        "trace": result.trace,
        "command": f"python bench/quantize_table.py --model {name} --train-only --threads {threads}",
    }
    (out / "train_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    log.info("%s: %d parameters, %.0f s, saved to %s", name, result.parameters, info["train_s"], path)
    return path


def resolve_model(spec: str, train_threads: int) -> tuple[str, str]:
    """``(load spec, label)``; a :data:`FLOAT_MODELS` name is trained first when absent."""
    if spec in FLOAT_MODELS:
        path = float_model_dir(spec) / "model"
        if not (path / "lmshrink.json").is_file():
            train_float_model(spec, train_threads)
        return str(path), spec
    return spec, spec


# --------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    key: str
    method: str
    bits: str
    build: Callable[[nn.Module, list[dict[str, torch.Tensor]]], nn.Module]
    save: Callable[..., str] = save_lmshrink
    needs_calibration: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    default: bool = True  # in the table when --rows is not given
    cpu_only: bool = False  # skipped with --device cuda


def _lmshrink(cfg: dict[str, Any]) -> Callable[[nn.Module, list[dict[str, torch.Tensor]]], nn.Module]:
    def build(model: nn.Module, calib: list[dict[str, torch.Tensor]]) -> nn.Module:
        from lmshrink.quantization import quantize_model

        from_cfg = dict(cfg)
        needs = from_cfg.get("method") in ("gptq", "awq", "smoothquant")
        return quantize_model(model, from_cfg, calib if needs else None)

    return build


def _bf16(model: nn.Module, _calib: Any) -> nn.Module:
    return model.to(torch.bfloat16)


def _torch_dynamic(model: nn.Module, _calib: Any) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = dict.fromkeys(LinearSelection.of(model).names, default_dynamic_qconfig)
    return quantize_dynamic(model, spec, dtype=torch.qint8)


def default_group_size(model: nn.Module) -> int:
    """128 when it divides every selected layer's input dimension, else the largest power of two below it that does
    (smollm2-135m: hidden 576 = 64 x 9, so 64)."""
    from lmshrink.quantization.linear import linear_weight_and_bias

    dims = {
        linear_weight_and_bias(model.get_submodule(n))[0].shape[1] for n in LinearSelection.of(model).names
    }
    g = 128
    while any(d % g for d in dims):
        g //= 2
    return g


def _direct(
    cfg: dict[str, Any], token_clip: float | None = None
) -> Callable[[nn.Module, list[dict[str, torch.Tensor]]], nn.Module]:
    """GPTQ with ``token_clip``, an option that is not a QuantConfig field, so the layers are quantized here
    directly: cap each calibration token's Hessian share (``lmshrink.quantization.gptq.clip_token_energy``)."""

    def build(model: nn.Module, calib: list[dict[str, torch.Tensor]]) -> nn.Module:
        from lmshrink.models.arch import select_linears
        from lmshrink.quantization.config import QuantConfig
        from lmshrink.quantization.gptq import quantize_gptq

        qc = QuantConfig(**cfg)
        layers = list(select_linears(model, qc.targets, qc.skip))
        with torch.no_grad():
            quantize_gptq(model, qc, layers, calib, token_clip=token_clip)
        model.lmshrink_format = "quantized"  # type: ignore[assignment]
        model.lmshrink_quant_config = qc.model_dump(mode="json")  # type: ignore[assignment]
        return model

    return build


def make_rows(
    group: int,
    act_order: bool,
    true_sequential: bool = True,
    damp: float = 0.01,
    token_clip: float | None = None,
    scale_refit: int = 2,
) -> list[Row]:
    """Every row. int4 rows come per group size (``g<group>``) and per channel (``pc``), each also with
    ``clip_search`` (``-mse`` suffix: the MSE-searched clipping for RTN and GPTQ, AWQ's own clip search for AWQ)."""
    ao = " (act-order)" if act_order else ""
    ts = ", true-sequential" if true_sequential else ""
    ts += f", {scale_refit} scale refits" if scale_refit else ""
    dp = f", damp {damp:g}" if damp != 0.01 else ""
    dp += f", token clip {token_clip:g}x median" if token_clip is not None else ""
    gptq_opts = {
        "method": "gptq",
        "act_order": act_order,
        "true_sequential": true_sequential,
        "damp": damp,
        "scale_refit": scale_refit,
    }
    int4_rows = [
        Row(
            f"int4{key}-{g}-{method}{mse}",
            f"int4{label} {g_label} {name}{(' clip search' if method == 'awq' else ' MSE-clip') if mse else ''}",
            "W4",
            _direct(cfg, token_clip) if token_clip is not None and method == "gptq" else _lmshrink(cfg),
            needs_calibration=method != "rtn",
            default=g != "pc" and not mse,
        )
        for g, gs, g_label in ((f"g{group}", group, f"g{group}"), ("pc", None, "per-channel"))
        for mse in ("", "-mse")
        for key, label in (("", ""), ("-asym", " asymmetric"))
        for method, name, extra in (
            ("rtn", "RTN", {}),
            ("gptq", "GPTQ" + ao + ts + dp, gptq_opts),
            ("awq", "AWQ", {"method": "awq"}),
        )
        for cfg in [
            {**extra, "format": f"int4{key}", "group_size": gs} | ({"clip_search": True} if mse else {})
        ]
    ]
    # QuaRot: residual rotation + online Hadamard on down_proj, then the method (lmshrink.quantization.rotation)
    rotated_rows = [
        Row(
            f"{key}-rot",
            f"{name} on the rotated model (residual rotation + online Hadamard on down_proj)",
            bits,
            _lmshrink({**cfg, "rotate": True}),
            needs_calibration=cfg.get("method", "rtn") != "rtn",
            default=False,
        )
        for key, name, bits, cfg in (
            ("int8-rtn", "int8 per-channel RTN, weight-only", "W8", {"format": "int8"}),
            ("int8-rtn-w8a8", "int8 per-channel RTN W8A8", "W8A8", {"format": "int8", "activations": "int8"}),
            (
                "int8-gptq-w8a8",
                f"int8 per-channel GPTQ{ao}{ts} W8A8",
                "W8A8",
                {**gptq_opts, "format": "int8", "activations": "int8"},
            ),
            ("smoothquant", "SmoothQuant W8A8", "W8A8", {"method": "smoothquant", "format": "int8"}),
            (f"int4-g{group}-rtn", f"int4 g{group} RTN", "W4", {"format": "int4", "group_size": group}),
            (
                f"int4-g{group}-gptq",
                f"int4 g{group} GPTQ{ao}{ts}",
                "W4",
                {**gptq_opts, "format": "int4", "group_size": group},
            ),
        )
    ]
    return [
        Row("bf16", "bf16 (all weights and activations)", "16", _bf16, save_flat_safetensors),
        Row("int8-rtn", "int8 per-channel RTN, weight-only", "W8", _lmshrink({"format": "int8"})),
        Row(
            "int8-rtn-w8a8",
            "int8 per-channel RTN, int8 per-token activations",
            "W8A8",
            _lmshrink({"format": "int8", "activations": "int8"}),
        ),
        Row(
            "smoothquant",
            "SmoothQuant W8A8 (alpha auto per layer group)",
            "W8A8",
            _lmshrink({"method": "smoothquant", "format": "int8"}),
            needs_calibration=True,
        ),
        Row(
            "smoothquant-fb",
            "SmoothQuant W8A8, down_proj W8 with float activations",
            "W8A8 (down_proj W8)",
            _lmshrink({"method": "smoothquant", "format": "int8", "float_activations": ["down_proj"]}),
            needs_calibration=True,
        ),
        Row(
            "smoothquant-gptq",
            "SmoothQuant W8A8, GPTQ-rounded int8 weights"
            + ao
            + ts
            + (f", damp {damp:g}" if damp != 0.01 else ""),
            "W8A8",
            _lmshrink({**gptq_opts, "method": "smoothquant", "format": "int8", "weight_method": "gptq"}),
            needs_calibration=True,
            default=False,
        ),
        Row(
            "llm-int8", "LLM.int8() (threshold 6.0)", "W8A8+fp32 outliers", _lmshrink({"method": "llm-int8"})
        ),
        *int4_rows,
        *rotated_rows,
        Row("nf4", f"NF4 RTN, blocks of {group}", "W4", _lmshrink({"format": "nf4", "group_size": group})),
        Row(
            "ternary", "1.58-bit RTN (BitNet absmean, per tensor)", "W1.58", _lmshrink({"format": "1.58bit"})
        ),
        Row(
            "torch-dynamic",
            "torch quantize_dynamic int8 (per-tensor W, dynamic A)",
            "W8A8",
            _torch_dynamic,
            save_flat_safetensors,
            cpu_only=True,
        ),
    ]


# --------------------------------------------------------------------------------------------- scoring


@dataclass
class Acc:
    """Running sums of one row over the scored windows."""

    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    n: int = 0
    windows: int = 0
    eval_s: float = 0.0

    def add(self, logp: torch.Tensor, ref_logp: torch.Tensor, target: torch.Tensor) -> None:
        self.nll += float(-logp.gather(1, target[:, None]).sum())
        self.kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        self.top1 += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.n += target.numel()
        self.windows += 1

    def sums(self) -> dict[str, Any]:
        """The raw sums (exact state for :func:`resume_state`)."""
        return {k: getattr(self, k) for k in ("nll", "kl", "top1", "n", "windows", "eval_s")}

    def summary(self, ref_nll: float) -> dict[str, Any]:
        ppl = math.exp(self.nll / self.n)
        return {
            "perplexity": ppl,
            "delta_pct": 100.0 * (math.exp((self.nll - ref_nll) / self.n) - 1.0),
            "kl_mean": self.kl / self.n,
            "top1_agreement": self.top1 / self.n,
            "n_tokens": self.n,
            "n_windows": self.windows,
            "eval_s": self.eval_s,
        }


# --------------------------------------------------------------------------------------------- resuming

#: Settings that must match for a result file to be continued or a cached model to be reused.
RESUME_KEYS = ("model_spec", "group_size", "calibration", "gptq", "code_fingerprint")


def code_fingerprint() -> str:
    """sha256 (first 16 hex) of the lmshrink sources that decide a row's numbers (quantization, kernels, models,
    evaluation): results or cached models from other code are not mixed in."""
    import hashlib

    h = hashlib.sha256()
    src = REPO / "src" / "lmshrink"
    for sub in ("quantization", "kernels", "models", "evaluation"):
        for f in sorted((src / sub).rglob("*.py")):
            h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The repository's HEAD commit (None outside a git checkout); ``+dirty`` when tracked files differ from it."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"], check=False).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def resume_state(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Acc], int]:
    """Running sums per row and the number of windows already scored in ``old`` (a result file written by this
    script), after checking that ``new`` (this run's settings) would produce the same numbers."""
    for k in (*RESUME_KEYS, "row_keys"):
        if old.get(k) != new.get(k):
            raise SystemExit(
                f"--resume: {k} differs from the existing result file ({old.get(k)!r} there, {new.get(k)!r} now); "
                "rerun with the same settings and code, or write to a new --out"
            )
    if old["evaluation"]["ctx"] != new["evaluation"]["ctx"]:
        raise SystemExit(f"--resume: ctx {old['evaluation']['ctx']} there, {new['evaluation']['ctx']} now")
    if old.get("environment", {}) != numerics_env():
        raise SystemExit(
            f"--resume: the result file was made with environment {old.get('environment', {})}, this run has "
            f"{numerics_env()}; run with the same LMSHRINK_* variables"
        )
    accs = {r["key"]: Acc(**r["sums"]) for r in old["rows"] if "sums" in r}
    done = int(old["evaluation"]["n_windows"])
    if any(a.windows != done for a in accs.values()):
        raise SystemExit("--resume: the rows of the existing result file scored different numbers of windows")
    return accs, done


def cached_build(
    row: Row,
    ref: nn.Module,
    calib: list[dict[str, torch.Tensor]],
    cache: Path | None,
    fingerprint: dict[str, Any],
) -> tuple[nn.Module, bool]:
    """``row.build`` on a copy of ``ref``, or, for lmshrink rows with a ``cache`` folder, the model saved there by
    an earlier run with the same ``fingerprint`` (reloaded with ``lmshrink.models.load_model``). Returns the model
    and whether it came from the cache."""
    from lmshrink.models import load_model
    from lmshrink.utils.io import atomic_write_text

    folder = None if cache is None or row.save is not save_lmshrink else cache / row.key
    stamp = {**fingerprint, "row": row.key, "method": row.method}
    if folder is not None and (folder / "bench_fingerprint.json").is_file():
        if json.loads((folder / "bench_fingerprint.json").read_text()) == stamp:
            model, _ = load_model(folder, device=next(ref.parameters()).device)
            return model.eval(), True
        log.info("%s: cached model in %s is from other settings or code; rebuilding", row.key, folder)
    model = row.build(copy.deepcopy(ref).eval(), calib).eval()
    if folder is not None:
        save_lmshrink(model, folder)
        atomic_write_text(folder / "bench_fingerprint.json", json.dumps(stamp, indent=2) + "\n")
    return model, False


@torch.no_grad()
def _logp(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    out = model(window[None])
    return F.log_softmax(out.logits[0, :-1].float(), dim=-1)


def _size_on_disk(model: nn.Module, save: Callable[..., str]) -> dict[str, Any]:
    """Bytes on disk; a model on an accelerator is saved from a CPU copy (same tensors, same bytes)."""
    if next(model.parameters()).device.type != "cpu":
        cpu = copy.deepcopy(model).to("cpu")
        try:
            return size_on_disk(cpu, save, None)  # type: ignore[arg-type]
        finally:
            del cpu
    return size_on_disk(model, save, None)  # type: ignore[arg-type]


def _kernels(model: nn.Module) -> list[str]:
    from lmshrink.quantization.linear import QuantLinear

    return sorted({m.kernel_name for m in model.modules() if isinstance(m, QuantLinear)})


def _kl(kl: float) -> str:
    """KL to 4 decimals, or 3 significant digits below 0.01 (float-llama's rows differ in the fifth decimal)."""
    return f"{kl:.4f}" if not 0 < kl < 0.01 else f"{kl:.3g}"


def markdown(doc: dict[str, Any]) -> str:
    ev = doc["evaluation"]
    lines = [
        f"### {doc['title']}",
        "",
        f"{ev['data']}; {ev['n_tokens']} tokens scored ({ev['n_windows']} windows of {ev['ctx']}); calibration: "
        f"{doc['calibration']['description']}; {doc['provenance'].get('device_name', '')}; "
        f"{doc['provenance'].get('date', '')}"
        + "".join(f"; {k}={v}" for k, v in doc.get("environment", {}).items())
        + ".",
        "",
        "| row | method | bits | ppl | delta % | KL | top-1 | size MB | bits/w | kernels | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_sel = doc["selected_linears"]["weights"]
    base = doc["rows"][0]
    for r in doc["rows"]:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['key']} | {r['method']} | {r['bits']} | {r.get('status')}: {r.get('reason', '')} |"
            )
            continue
        rest = base["stored_bytes"] - 4 * n_sel
        bpw = 8 * (r["stored_bytes"] - rest) / n_sel if r.get("stored_bytes") else math.nan
        q = r.get("quality") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    r["key"],
                    r["method"],
                    r["bits"],
                    f"{q.get('perplexity', math.nan):.3f}",
                    f"{q.get('delta_pct', math.nan):+.2f}",
                    _kl(q.get("kl_mean", math.nan)),
                    f"{q.get('top1_agreement', math.nan):.3f}",
                    f"{r['bytes_on_disk'] / 1e6:.1f}",
                    {"fp32": "32", "bf16": "16"}.get(r["key"], f"{bpw:.2f}"),
                    ", ".join(r.get("kernels", [])) or "torch",
                    f"{r.get('build_s', 0.0):.0f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "ppl: perplexity; delta: vs fp32 on the same tokens; KL: mean KL(fp32 || row), nats/token; top-1: agreement "
        "of the arg-max with fp32; size: bytes on disk (lmshrink rows: lmshrink.models.save_model; fp32, bf16, "
        "torch: one safetensors file of the flattened state dict); bits/w: stored bits per weight of the quantized "
        "linear layers (scales, zeros, outliers included; embeddings/LM head stay fp32 in every row); kernels: "
        "the QuantLinear forward paths used (CPU).",
        "",
    ]
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _write(doc: dict[str, Any], path: Path) -> None:
    from lmshrink.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown(doc))


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help=f"model spec, or one of {', '.join(FLOAT_MODELS)} (trained when absent)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=102400, help="evaluation tokens (cut into --ctx windows)"
    )
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--time-budget", type=float, default=None, help="stop scoring after this many seconds")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=None, help="int4/NF4 group (default: 128 if it divides)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order")
    p.add_argument(
        "--no-true-sequential",
        action="store_true",
        help="GPTQ rows with true_sequential=False (one pass per block)",
    )
    p.add_argument(
        "--scale-refit", type=int, default=2, help="GPTQ rows: rounds of least-squares scale refits"
    )
    p.add_argument(
        "--damp", type=float, default=0.01, help="GPTQ damping (fraction of the mean Hessian diagonal)"
    )
    p.add_argument(
        "--token-clip",
        type=float,
        default=None,
        help="GPTQ rows: cap every calibration token's squared input norm at this many times the median",
    )
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda[:i]: model, calibration and evaluation run there"
    )
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated row keys (default: every row except the per-channel 'pc' and '-mse' ones); "
        "fp32 always runs",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--cache-dir",
        default=None,
        help="keep built lmshrink rows here (lmshrink.models.save_model) and reload them in later runs",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the result file --out (or the default one) from its next window; settings must match",
    )
    p.add_argument(
        "--train-only", action="store_true", help="with --model float-llama[-256]: (re)train and exit"
    )
    p.add_argument(
        "--out", default=None, help="result JSON path (default bench/results/quantize_table_<model>)"
    )
    p.add_argument("--markdown", default=None, help="rewrite the .md of this result JSON and exit")
    a = p.parse_args(argv)
    if a.markdown:
        path = Path(a.markdown)
        _write(json.loads(path.read_text()), path)
        print(path.with_suffix(".md").read_text())
        return path
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "torchao", "lmshrink.quantization"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        device = torch.device(a.device)
    except RuntimeError:
        raise SystemExit(f"--device {a.device}: not a device name; use cpu or cuda[:i]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {a.device}: only cpu and cuda are supported")
    if a.train_only:
        if a.model not in FLOAT_MODELS:
            raise SystemExit(f"--train-only needs --model {' or '.join(FLOAT_MODELS)}")
        train_float_model(a.model, a.threads)
        return None

    from lmshrink.data import calibration_batches, load_text, tokenize_corpus
    from lmshrink.evaluation.perplexity import model_max_length
    from lmshrink.models import load_model
    from lmshrink.utils.env import provenance

    started = time.time()
    spec, label = resolve_model(a.model, a.threads)
    ref, tok = load_model(spec, dtype="float32")
    ref = ref.to(device).eval()
    group = a.group_size or default_group_size(ref)
    rows = make_rows(group, not a.no_act_order, not a.no_true_sequential, a.damp, a.token_clip, a.scale_refit)
    if a.rows:
        keep = {k.strip() for k in a.rows.split(",") if k.strip()}
        unknown = keep - {r.key for r in rows}
        if unknown:
            raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(r.key for r in rows)}")
        rows = [r for r in rows if r.key in keep]
    else:
        rows = [r for r in rows if r.default]
    limit = model_max_length(ref)
    if limit is not None and a.ctx > limit:
        raise SystemExit(
            f"--ctx {a.ctx} exceeds {label}'s maximum context of {limit} tokens; pass --ctx {limit} "
            f"(and --calib-seq-len <= {limit})"
        )
    if limit is not None and a.calib_seq_len > limit:
        raise SystemExit(
            f"--calib-seq-len {a.calib_seq_len} exceeds {label}'s maximum context of {limit} tokens"
        )
    ids = tokenize_corpus(tok, load_text("wikitext2", split="test"))
    n_windows = min(a.max_tokens, ids.numel()) // a.ctx
    windows = ids[: n_windows * a.ctx].reshape(n_windows, a.ctx).to(device)
    calib = calibration_batches(tok, "c4", n_samples=a.calib_samples, seq_len=a.calib_seq_len, seed=0)
    calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
    selected = LinearSelection.of(ref).names
    n_sel = sum(ref.get_submodule(n).weight.numel() for n in selected)
    out = Path(a.out) if a.out else RESULTS / f"quantize_table_{label}.json"
    settings: dict[str, Any] = {
        "model_spec": spec,
        "group_size": group,
        "calibration": {
            "dataset": "c4 validation (lmshrink.data.calibration_batches, seed 0)",
            "n_samples": a.calib_samples,
            "seq_len": a.calib_seq_len,
            "description": f"C4 validation, {a.calib_samples} x {a.calib_seq_len} tokens, seed 0",
        },
        "gptq": {
            "act_order": not a.no_act_order,
            "true_sequential": not a.no_true_sequential,
            "scale_refit": a.scale_refit,
            "damp": a.damp,
            "token_clip": a.token_clip,
        },
        "code_fingerprint": code_fingerprint(),
        "row_keys": [r.key for r in rows],
        "evaluation": {"ctx": a.ctx},
    }
    old_doc: dict[str, Any] | None = None
    accs: dict[str, Acc] = {}
    start = 0
    if a.resume and out.is_file():
        old_doc = json.loads(out.read_text())
        accs, start = resume_state(old_doc, settings)
        log.info("resuming %s after %d scored windows", out, start)
    old_recs = {r["key"]: r for r in (old_doc or {}).get("rows", [])}
    cache = Path(a.cache_dir).expanduser() if a.cache_dir else None
    fingerprint = {k: settings[k] for k in RESUME_KEYS} | {"device": str(device)}

    base: dict[str, Any] = {"key": "fp32", "method": "float32 reference", "bits": "32", "status": "ok"}
    base["stored_bytes"] = stored_bytes(ref)
    base.update(_size_on_disk(ref, save_flat_safetensors))
    records: list[dict[str, Any]] = [base]
    models: dict[str, nn.Module] = {}
    for row in rows:
        rec: dict[str, Any] = {"key": row.key, "method": row.method, "bits": row.bits}
        if row.cpu_only and device.type != "cpu":
            rec.update(status="skipped", reason=f"CPU-only row, not run on {device}")
            records.append(rec)
            continue
        try:
            log.info("%s: building", row.key)
            t0 = time.perf_counter()
            model, from_cache = cached_build(row, ref, calib, cache, fingerprint)
            rec["build_s"] = time.perf_counter() - t0
            if from_cache:  # the build time is the original build's, when this table has it
                rec["build_s"] = old_recs.get(row.key, {}).get("build_s", rec["build_s"])
                rec["loaded_from_cache"] = str(cache)
            rec["kernels"] = _kernels(model)
            rec["stored_bytes"] = stored_bytes(model)
            rec.update(_size_on_disk(model, row.save))
            rec["status"] = "ok"
            models[row.key] = model
            log.info("%s: built in %.0f s (%s)", row.key, rec["build_s"], rec["kernels"])
        except Exception as exc:  # a failing row is a result, not a reason to drop the table
            rec.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            log.warning("%s: %s", row.key, rec["reason"])
        records.append(rec)
        gc.collect()

    doc: dict[str, Any] = {
        "title": f"Quantization accuracy, {label}, WikiText-2 test (GPTQ protocol), {device.type.upper()}",
        "model": label,
        "model_spec": spec,
        "command": " ".join([".venv/bin/python", sys.argv[0], *(argv or sys.argv[1:])]),
        "group_size": group,
        "group_size_rule": "128 when it divides every selected input dimension, else the largest power of 2 below",
        "calibration": settings["calibration"],
        "evaluation": {
            "data": "WikiText-2 raw test, tokenized once, non-overlapping windows (GPTQ protocol)",
            "ctx": a.ctx,
            "planned_tokens": n_windows * (a.ctx - 1),
            "n_tokens": 0,
            "n_windows": 0,
            "scored": "every window's positions 1..ctx-1 (ctx-1 predictions per window)",
            "time_budget_s": a.time_budget,
        },
        "selected_linears": {"count": len(selected), "weights": n_sel},
        "provenance": provenance(str(device), torch.float32),
        "device": str(device),
        "gptq": settings["gptq"],
        "code_fingerprint": settings["code_fingerprint"],
        "row_keys": settings["row_keys"],
        "versions": versions(),
        "threads": a.threads,
        "environment": numerics_env(),
        "complete": False,
        "rows": records,
        "notes": [],
    }
    train_info = float_model_dir(label) / "train_info.json" if label in FLOAT_MODELS else None
    if train_info is not None and train_info.is_file():
        info = json.loads(train_info.read_text())
        doc["float_model"] = {k: info[k] for k in ("recipe", "parameters", "train_s", "threads", "command")}
    run = {
        "command": doc["command"],
        "date": doc["provenance"].get("date"),
        "commit": git_commit(),
        "first_window": start,
    }
    if old_doc is None:
        accs = {k: Acc() for k in ["fp32", *models]}
        doc["runs"] = [run]
    else:
        if set(accs) != {"fp32", *models}:
            raise SystemExit(
                f"--resume: rows with results there {sorted(accs)} differ from the rows built now "
                f"{sorted(['fp32', *models])} (a row failed to build in one of the runs)"
            )
        doc["runs"] = [*old_doc.get("runs", []), run]
        doc["notes"] = [n for n in old_doc.get("notes", []) if not n.startswith("stopped after")]
        started -= float(old_doc.get("wall_s", 0.0))
    t_eval = time.time()
    if start >= n_windows:
        log.info("all %d windows were already scored", n_windows)
    for wi, window in enumerate(windows):
        if wi < start:
            continue
        target = window[1:]
        t0 = time.perf_counter()
        ref_logp = _logp(ref, window)
        accs["fp32"].add(ref_logp, ref_logp, target)
        accs["fp32"].eval_s += time.perf_counter() - t0
        for key, model in models.items():
            t0 = time.perf_counter()
            accs[key].add(_logp(model, window), ref_logp, target)
            accs[key].eval_s += time.perf_counter() - t0
        del ref_logp
        for rec in records:
            if rec["key"] in accs:
                rec["quality"] = accs[rec["key"]].summary(accs["fp32"].nll)
                rec["sums"] = accs[rec["key"]].sums()
        run["last_window"] = wi
        doc["evaluation"].update(n_tokens=accs["fp32"].n, n_windows=accs["fp32"].windows)
        doc["wall_s"] = time.time() - started
        doc["complete"] = wi + 1 == n_windows
        _write(doc, out)
        log.info("window %d/%d scored (%.0f s since scoring began)", wi + 1, n_windows, time.time() - t_eval)
        if a.time_budget is not None and time.time() - t_eval > a.time_budget and wi + 1 < n_windows:
            doc["notes"].append(
                f"stopped after {wi + 1} of {n_windows} windows: --time-budget {a.time_budget:.0f} s reached"
            )
            _write(doc, out)
            break
    print(markdown(doc))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
