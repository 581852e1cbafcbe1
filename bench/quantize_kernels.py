"""Kernel speed and model quality for lmshrink's quantized linear layers on this CPU.

Parts (run any subset; each prints a table and writes bench/results/quantize_<part>.json with provenance):

  kernels  per-linear latency at SmolLM2-135M shapes (576x576, 576x1536, 1536x576), M=1 (decode) and M=1024
           (prefill): fp32 F.linear vs lmshrink's per-token int8 (fbgemm) vs fbgemm per-tensor (quantize_dynamic's
           op) vs torch._int_mm / _weight_int8pack_mm / int4 dequantize-on-the-fly; plus relative error.
  gemv     weight-only int8 / int4 g64 / NF4 g64 layers with float32 activations vs fp32 F.linear at M = 1..16 rows
           (decode), SmolLM2-135M shapes plus its 49152x576 LM head; "hot": one layer called repeatedly (its weight
           stays in cache), "cold": 30 distinct layers called in turn, as in a decode step (weights come from DRAM).
  speed    whole-model smollm2-135m: batch-1 decode per-token latency and 8x128 prefill, fp32 vs int8 W8A8
           (RTN per-channel, per-token activations) vs SmoothQuant W8A8, interleaved repeats in one run.
  ppl      WikiText-2 test perplexity (GPTQ protocol, ctx 2048, first --max-tokens tokens) for fp32, int8 RTN,
           SmoothQuant, LLM.int8(), torch quantize_dynamic, int4 g64 RTN / GPTQ / AWQ.

Usage:
  .venv/bin/python bench/quantize_kernels.py kernels gemv speed ppl [--max-tokens 16384] [--repeats 5]

The CPU is shared during development: speeds are medians over interleaved repeats and a ratio against fp32
measured in the same run; rerun on a quiet machine for publication.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmshrink.kernels import cpu as cpu_kernels
from lmshrink.quantization.config import QuantConfig, WeightSpec
from lmshrink.quantization.linear import QuantLinear
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPES = ((576, 576), (576, 1536), (1536, 576))  # (K, N) of SmolLM2-135M's q/o, gate/up, down
warnings.filterwarnings("ignore")


def _time(fn: Callable[[], Any], n: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_kernels(repeats: int) -> dict[str, Any]:
    """Per-linear latency (median of interleaved rounds) and error vs the float product of the same operands."""
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k) * 0.05
        q8 = QuantLinear.from_weight(w, None, WeightSpec.parse("int8"), act="int8")
        q4 = QuantLinear.from_weight(w, None, WeightSpec.parse("int4", group_size=64))
        packed = q8._fbgemm()
        w_deq = q8.dequantize_weight()
        qw8 = q8.qweight
        for m in (1, 1024):
            x = torch.randn(m, k)
            x[:, :4] *= 20  # a few outlier channels, as in real LLM activations
            ref = x @ w_deq.t()
            fns: dict[str, Callable[[], Any]] = {
                "fp32 F.linear": lambda x=x, w=w: F.linear(x, w),
                "int8 per-token (lmshrink)": lambda x=x, q8=q8: q8(x),
                "int8 per-token fbgemm only": lambda x=x, p=packed: cpu_kernels.int8_linear_per_token(x, p),
                "int8 per-tensor (quantize_dynamic op)": lambda x=x, p=packed: (
                    torch.ops.quantized.linear_dynamic(x, p, True)
                ),
                "int4 g64 dequantize-on-the-fly": lambda x=x, q4=q4: q4(x),
            }
            if m <= 64 or k * n <= 576 * 576:
                xq = torch.randint(-127, 127, (max(m, 17), k), dtype=torch.int8)
                fns["torch._int_mm"] = lambda xq=xq, qw8=qw8: torch._int_mm(xq, qw8.t())
                fns["aten._weight_int8pack_mm"] = lambda x=x, qw8=qw8, s=q8.scale: (
                    torch.ops.aten._weight_int8pack_mm(x, qw8, s)
                )
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(repeats):  # interleave so that load from other processes hits every variant alike
                for name, fn in fns.items():
                    times[name].append(_time(fn, 20 if m == 1 else 3))
            base = statistics.median(times["fp32 F.linear"])
            errs = {
                "int8 per-token (lmshrink)": float((q8(x) - ref).norm() / ref.norm()),
                "int8 per-tensor (quantize_dynamic op)": float(
                    (torch.ops.quantized.linear_dynamic(x, packed, True) - ref).norm() / ref.norm()
                ),
            }
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append(
                    {"K": k, "N": n, "M": m, "kernel": name, "median_us": med * 1e6, "speedup_vs_fp32": base / med,
                     "rel_error_vs_float_of_same_weights": errs.get(name)}
                )  # fmt: skip
                print(
                    f"K={k:5d} N={n:5d} M={m:5d} {name:40s} {med * 1e6:10.1f} us  x{base / med:5.2f}",
                    flush=True,
                )
            print(f"   errors: {errs}", flush=True)
    return {
        "rows": rows,
        "int8_pairs_saturate": cpu_kernels.int8_pairs_saturate(),
        "amx_int8": cpu_kernels.amx_int8_available(),
        "lmshrink_kernel": q8.kernel_name,
    }


def bench_gemv(repeats: int) -> dict[str, Any]:
    """Weight-only layers (whatever kernel ``QuantLinear`` picks here) vs fp32 at few rows, hot and cold cache."""
    torch.manual_seed(0)
    rows = []
    specs = {"int8": WeightSpec.parse("int8"), "int4 g64": WeightSpec.parse("int4", 64),
             "nf4 g64": WeightSpec.parse("nf4", 64)}  # fmt: skip
    for k, n in (*SHAPES, (576, 49152)):
        copies = 1 if n > 4096 else 30  # the LM head alone is 113 MB in fp32: never in cache
        ws = [torch.randn(n, k) * 0.05 for _ in range(copies)]
        qs = {name: [QuantLinear.from_weight(w, None, spec) for w in ws] for name, spec in specs.items()}
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k)
            fns: dict[str, list[Callable[[], Any]]] = {
                "fp32 F.linear": [lambda x=x, w=w: F.linear(x, w) for w in ws]
            }
            for name, layers in qs.items():
                fns[name] = [lambda x=x, q=q: q(x) for q in layers]
            hot: dict[str, list[float]] = {name: [] for name in fns}
            cold: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(repeats):
                for name, fl in fns.items():
                    hot[name].append(_time(fl[0], 20))
                    cold[name].append(_time(lambda fl=fl: [f() for f in fl], 5) / len(fl))
            h0, c0 = statistics.median(hot["fp32 F.linear"]), statistics.median(cold["fp32 F.linear"])
            for name in fns:
                h, c = statistics.median(hot[name]), statistics.median(cold[name])
                kern = "fp32" if name not in qs else qs[name][0].kernel_name
                rows.append({"K": k, "N": n, "M": m, "variant": name, "kernel": kern, "hot_us": h * 1e6,
                             "hot_speedup": h0 / h, "cold_us": c * 1e6, "cold_speedup": c0 / c})  # fmt: skip
                print(f"K={k:4d} N={n:5d} M={m:2d} {name:14s} {kern:28s} hot {h * 1e6:8.1f} us x{h0 / h:5.2f}"
                      f"  cold {c * 1e6:8.1f} us x{c0 / c:5.2f}", flush=True)  # fmt: skip
    return {"rows": rows, "max_rows": {"int8": cpu_kernels.AVX2_INT8_GEMV_MAX_ROWS, "nf4": cpu_kernels.AVX2_NF4_GEMV_MAX_ROWS,
                                       "int4": cpu_kernels.AVX2_INT4_GEMV_MAX_ROWS}}  # fmt: skip


def _load(dtype: str = "float32") -> tuple[Any, Any]:
    from lmshrink.models import load_model

    return load_model("smollm2-135m", dtype=dtype)


@torch.no_grad()
def _decode_latency(model: Any, steps: int = 16, prompt: int = 32) -> float:
    ids = torch.randint(0, 1000, (1, prompt))
    out = model(ids, use_cache=True)
    pkv = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        out = model(tok, past_key_values=pkv, use_cache=True)
        ts.append(time.perf_counter() - t)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return statistics.median(ts)


@torch.no_grad()
def _prefill_latency(model: Any, batch: int = 8, seq: int = 128) -> float:
    ids = torch.randint(0, 1000, (batch, seq))
    t = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t


def _quantized(base: Any, cfg: QuantConfig, calib: Any = None) -> Any:
    from lmshrink.quantization.api import quantize_model

    return quantize_model(copy.deepcopy(base), cfg, calib)


def _calib(tok: Any, n: int, seq: int) -> Any:
    from lmshrink.data import calibration_batches

    return calibration_batches(tok, name="c4", n_samples=n, seq_len=seq, seed=0)


def bench_speed(repeats: int) -> dict[str, Any]:
    """Whole-model decode (batch 1) and 8x128 prefill, interleaved across variants."""
    base, tok = _load()
    calib = _calib(tok, 8, 512)
    models = {
        "fp32": base,
        "int8 W8A8 RTN per-token": _quantized(base, QuantConfig(format="int8", activations="int8")),
        "int8 W8A8 SmoothQuant alpha=auto": _quantized(base, QuantConfig(method="smoothquant"), calib),
    }
    dec: dict[str, list[float]] = {k: [] for k in models}
    pre: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            dec[name].append(_decode_latency(m))
            pre[name].append(min(_prefill_latency(m) for _ in range(2)))
    rows = []
    for name in models:
        d, p = statistics.median(dec[name]), statistics.median(pre[name])
        d0, p0 = statistics.median(dec["fp32"]), statistics.median(pre["fp32"])
        rows.append({"model": name, "decode_ms_per_token": d * 1e3, "decode_speedup": d0 / d,
                     "prefill_8x128_ms": p * 1e3, "prefill_speedup": p0 / p,
                     "decode_all_ms": [x * 1e3 for x in dec[name]], "prefill_all_ms": [x * 1e3 for x in pre[name]]})  # fmt: skip
        print(
            f"{name:36s} decode {d * 1e3:7.2f} ms/tok (x{d0 / d:4.2f})  prefill 8x128 {p * 1e3:8.1f} ms (x{p0 / p:4.2f})"
        )
    return {"rows": rows}


def bench_ppl(max_tokens: int, n_calib: int, calib_len: int, only: list[str] | None) -> dict[str, Any]:
    """WikiText-2 perplexity (GPTQ protocol, ctx 2048, first ``max_tokens`` tokens) per variant."""
    from lmshrink.evaluation import evaluate_perplexity

    base, tok = _load()
    calib = _calib(tok, n_calib, calib_len)

    def dyn() -> Any:
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)

    variants: dict[str, Callable[[], Any]] = {
        "fp32": lambda: base,
        "int8 per-channel RTN weight-only": lambda: _quantized(base, QuantConfig(format="int8")),
        "int8 W8A8 RTN per-token": lambda: _quantized(base, QuantConfig(format="int8", activations="int8")),
        "int8 W8A8 SmoothQuant alpha=auto": lambda: _quantized(
            base, QuantConfig(method="smoothquant"), calib
        ),
        "int8 W8A8 SmoothQuant alpha=0.5": lambda: _quantized(
            base, QuantConfig(method="smoothquant", alpha=0.5), calib
        ),
        "int8 LLM.int8() threshold 6": lambda: _quantized(
            base, QuantConfig(method="llm-int8", format="int8")
        ),
        "torch quantize_dynamic int8": dyn,
        "int4 g64 RTN": lambda: _quantized(base, QuantConfig(format="int4", group_size=64)),
        "int4 g64 GPTQ": lambda: _quantized(
            base, QuantConfig(method="gptq", format="int4", group_size=64), calib
        ),
        "int4 g64 AWQ": lambda: _quantized(
            base, QuantConfig(method="awq", format="int4", group_size=64), calib
        ),
    }
    rows = []
    for name, make in variants.items():
        if only and name != "fp32" and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        m = make()
        tq = time.perf_counter() - t0
        r = evaluate_perplexity(
            m, tok, "wikitext2", protocol="gptq", ctx=2048, max_tokens=max_tokens, progress=False
        )
        kernels = sorted({x.kernel_name for x in m.modules() if isinstance(x, QuantLinear)})
        rows.append({"variant": name, "perplexity": r.perplexity, "n_tokens": r.n_tokens, "quantize_s": tq,
                     "kernels": kernels,
                     "eval_s": time.perf_counter() - t0 - tq})  # fmt: skip
        print(f"{name:40s} ppl {r.perplexity:9.3f}  ({r.n_tokens} tokens, quantize {tq:.0f}s)", flush=True)
    fp = rows[0]["perplexity"]
    for r in rows:
        r["delta_vs_fp32_pct"] = 100 * (r["perplexity"] / fp - 1)
    return {
        "rows": rows,
        "max_tokens": max_tokens,
        "calibration": {"dataset": "c4", "n": n_calib, "len": calib_len},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=("kernels", "gemv", "speed", "ppl"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument(
        "--only", nargs="*", default=None, help="ppl: substrings of variant names to run (fp32 always)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "kernels":
            res = bench_kernels(args.repeats)
        elif part == "gemv":
            res = bench_gemv(args.repeats)
        elif part == "speed":
            res = bench_speed(args.repeats)
        else:
            res = bench_ppl(args.max_tokens, args.n_calib, args.calib_len, args.only)
        res["command"] = "python bench/quantize_kernels.py " + " ".join(
            [
                part,
                f"--repeats {args.repeats}",
                f"--max-tokens {args.max_tokens}",
                f"--threads {args.threads}",
            ]
        )
        res["seconds"] = time.perf_counter() - t0
        res["provenance"] = provenance("cpu", torch.float32)
        res["caveat"] = "CPU shared with other processes during measurement; medians of interleaved repeats"
        suffix = (
            "" if not args.only or part != "ppl" else "_" + "_".join(o.replace(" ", "") for o in args.only)
        )
        atomic_write_json(RESULTS / f"quantize_{part}{suffix}.json", res)


if __name__ == "__main__":
    main()
