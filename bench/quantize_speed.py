"""Whole-model CPU speed of lmshrink's quantized smollm2-135m against fp32, with the accuracy of the same models.

One command (the lead's figure; ~10 min on a quiet 2-core machine):

    .venv/bin/python bench/quantize_speed.py --threads 2

For each variant: batch-1 decode (median per-token latency, KV cache, after a 128-token prompt) and an 8 x 128 prefill
(the forward over 1024 tokens, last-position logits as generation does), interleaved round-robin with fp32 in every
repeat so that machine load hits all variants alike; ratios are fp32 median / variant median. Also:

* linear-only ratio (Amdahl): the time spent inside the quantized linear layers (forward hooks, a separate
  instrumented pass) against the fp32 nn.Linear layers: how fast the kernels are, apart from attention, norms,
  rotary embeddings and the fp32 LM head, which quantization does not touch;
* perplexity of the same model objects (WikiText-2 test, GPTQ protocol, first ``--ppl-tokens`` tokens) so that every
  speed row carries its accuracy; ``--ppl-tokens 0`` skips it;
* the kernel each variant's layers run (``QuantLinear.kernel_name``); "dequantize-on-the-fly" rows claim no speed
  (NF4 is one: timed only with ``--only nf4``, its decode is ~30x slower than fp32);
* a bf16 cast of the model, for context only (not a quantization): on CPUs with AMX-BF16 it is the fast float path.

Writes ``bench/results/<date>-<machine>-quant-speed-cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_name, versions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
warnings.filterwarnings("ignore")
log = logging.getLogger("bench.speed")


# --------------------------------------------------------------------------------------------- timing
@torch.inference_mode()
def decode_ms(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Median per-token latency (ms) of greedy batch-1 decoding with the KV cache after ``prompt``."""
    out = model(prompt, use_cache=True)
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out = model(tok, past_key_values=pkv, use_cache=True)
        times.append(time.perf_counter() - t0)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return 1e3 * statistics.median(times)


@torch.inference_mode()
def prefill_ms(model: nn.Module, ids: torch.Tensor) -> float:
    """Latency (ms) of one forward over ``ids`` (batch x seq), last-position logits only."""
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return 1e3 * (time.perf_counter() - t0)


def _is_linear(m: nn.Module) -> bool:
    from lmshrink.quantization.linear import QuantLinear

    return isinstance(m, QuantLinear | nn.Linear)


@torch.inference_mode()
def linear_share(model: nn.Module, fn: Callable[[], Any], head: nn.Module | None) -> float:
    """Milliseconds spent inside the block linear layers (LM head excluded) during ``fn()`` (hooks)."""
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for m in model.modules():
        if _is_linear(m) and m is not head:
            hooks.append(
                m.register_forward_pre_hook(lambda mod, a: starts.__setitem__(id(mod), time.perf_counter()))
            )
            hooks.append(
                m.register_forward_hook(
                    lambda mod, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(mod)])
                )
            )
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return 1e3 * spent[0]


# --------------------------------------------------------------------------------------------- variants
def variants(
    base: nn.Module, tok: Any, calib_n: int, only: list[str] | None
) -> dict[str, tuple[nn.Module, float]]:
    from lmshrink.data import calibration_batches
    from lmshrink.quantization import QuantConfig, quantize_model

    calib: list[Any] = []

    def q(cfg: QuantConfig, embeddings: bool = False) -> Callable[[], nn.Module]:
        def make() -> nn.Module:
            if cfg.needs_calibration and not calib:
                calib.extend(calibration_batches(tok, "c4", n_samples=calib_n, seq_len=512, seed=0))
            return quantize_model(copy.deepcopy(base), cfg, calib or None, embeddings=embeddings)

        return make

    makers: dict[str, Callable[[], nn.Module]] = {
        "bf16 cast (context, not quantization)": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "int8 W8A8 RTN (per-channel W, per-token A)": q(QuantConfig(format="int8", activations="int8")),
        "int8 W8A8 SmoothQuant": q(QuantConfig(method="smoothquant", format="int8")),
        "int8 W8A8 RTN, rotated (QuaRot residual rotation + online Hadamard)": q(
            QuantConfig(format="int8", activations="int8", rotate=True)
        ),
        "int8 W8A8 GPTQ, rotated (QuaRot residual rotation + online Hadamard)": q(
            QuantConfig(method="gptq", format="int8", activations="int8", rotate=True)
        ),
        "int8 weight-only RTN per-channel": q(QuantConfig(format="int8", activations="float")),
        "int8 weight-only RTN per-channel + embeddings/LM head": q(
            QuantConfig(format="int8", activations="float"), embeddings=True
        ),
        "int4 g64 weight-only RTN": q(QuantConfig(format="int4", group_size=64)),
        "int4 g64 weight-only RTN + embeddings/LM head": q(
            QuantConfig(format="int4", group_size=64), embeddings=True
        ),
        "int4-asym g64 weight-only RTN": q(QuantConfig(format="int4-asym", group_size=64)),
        "nf4 g64 weight-only": q(QuantConfig(format="nf4", group_size=64)),
    }
    # dequantize-on-the-fly rows are 30x slower than fp32 at decode: timed only when asked for (--only nf4)
    slow = {"nf4 g64 weight-only"}
    out: dict[str, tuple[nn.Module, float]] = {"fp32": (base, 0.0)}
    for name, make in makers.items():
        if (only and not any(o in name for o in only)) or (not only and name in slow):
            continue
        t0 = time.perf_counter()
        out[name] = (make().eval(), time.perf_counter() - t0)
        log.info("built %s in %.1f s", name, out[name][1])
    return out


def kernels_of(model: nn.Module) -> dict[str, int]:
    from lmshrink.quantization.linear import QuantLinear

    found: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            found[m.kernel_name] = found.get(m.kernel_name, 0) + 1
    return found


# --------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    from lmshrink.models import load_model
    from lmshrink.utils.env import provenance

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, tok = load_model(args.model, dtype="float32")
    base.eval()
    models = variants(base, tok, args.calib_samples, args.only)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (1, args.prompt), generator=g)
    ids = torch.randint(0, 1000, (args.batch, args.seq), generator=g)
    for m, _ in models.values():  # warm-up: kernels built/packed, caches primed
        decode_ms(m, prompt, 2)
        prefill_ms(m, ids)
    dec: dict[str, list[float]] = {k: [] for k in models}
    pre: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats):  # round-robin: every variant sees the same load pattern
        for name, (m, _) in models.items():
            dec[name].append(decode_ms(m, prompt, args.decode_tokens))
            pre[name].append(prefill_ms(m, ids))
        log.info("round %d/%d done", r + 1, args.repeats)
    lin_pre: dict[str, list[float]] = {k: [] for k in models}
    lin_dec: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.linear_repeats):
        for name, (m, _) in models.items():
            head = m.get_output_embeddings()
            lin_pre[name].append(linear_share(m, lambda m=m: prefill_ms(m, ids), head))
            lin_dec[name].append(linear_share(m, lambda m=m: decode_ms(m, prompt, 8), head) / 8)
    ppl: dict[str, float] = {}
    if args.ppl_tokens:
        from lmshrink.evaluation import evaluate_perplexity

        for name, (m, _) in models.items():
            r = evaluate_perplexity(
                m, tok, "wikitext2", protocol="gptq", ctx=2048, max_tokens=args.ppl_tokens, progress=False
            )
            ppl[name] = r.perplexity
            log.info("ppl %s: %.4f", name, r.perplexity)
    med = {k: (statistics.median(dec[k]), statistics.median(pre[k])) for k in models}
    d0, p0 = med["fp32"]
    l0p, l0d = statistics.median(lin_pre["fp32"]), statistics.median(lin_dec["fp32"])
    rows = []
    for name, (m, build_s) in models.items():
        d, p = med[name]
        lp, ld = statistics.median(lin_pre[name]), statistics.median(lin_dec[name])
        rows.append(
            {
                "variant": name,
                "kernels": kernels_of(m),
                "decode_ms_per_token": d,
                "decode_speedup": d0 / d,
                "prefill_ms": p,
                "prefill_speedup": p0 / p,
                "linear_prefill_ms": lp,
                "linear_prefill_speedup": l0p / lp,
                "linear_decode_ms": ld,
                "linear_decode_speedup": l0d / ld,
                "linear_share_of_fp32_prefill": l0p / p0 if name == "fp32" else None,
                "perplexity": ppl.get(name),
                "ppl_delta_pct": 100 * (ppl[name] / ppl["fp32"] - 1) if ppl else None,
                "quantize_s": build_s,
                "decode_all_ms": dec[name],
                "prefill_all_ms": pre[name],
            }
        )
    return {
        "name": "quant-speed-cpu",
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args),
        "protocol": {
            "decode": f"batch 1, prompt {args.prompt} tokens, {args.decode_tokens} greedy tokens with KV cache; "
            "median per-token latency per round; median over rounds",
            "prefill": f"{args.batch} x {args.seq} tokens, one forward, logits_to_keep=1; median over rounds",
            "pairing": "round-robin over all variants in every round (fp32 first), same process",
            "linear_only": "forward hooks on the block linear layers (LM head excluded), separate instrumented pass",
            "perplexity": f"wikitext2 test, GPTQ protocol, ctx 2048, first {args.ppl_tokens} tokens",
        },
        "cpu_features": {
            "amx_int8": _flag("amx_int8"),
            "amx_bf16": _flag("amx_bf16"),
            "avx512_vnni": _flag("avx512_vnni"),
            "avx2": _flag("avx2"),
            "fused_cpp_helpers": _ext_loaded(),
        },
        "provenance": provenance("cpu", torch.float32),
        "versions": versions(),
        "rows": rows,
    }


def _flag(name: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return name in next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False


def _ext_loaded() -> bool:
    from lmshrink.kernels import cpu_ext

    return cpu_ext.load() is not None


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "### CPU speed of quantized smollm2-135m vs fp32 (same run)",
        "",
        f"{doc['provenance'].get('device_name', '')}, {s['threads']} threads; {doc['provenance'].get('date', '')}; "
        f"CPU flags: {', '.join(k for k, v in doc['cpu_features'].items() if v)}. Decode: batch 1, "
        f"{s['decode_tokens']} tokens after a {s['prompt']}-token prompt; prefill {s['batch']}x{s['seq']}; "
        f"medians of {s['repeats']} interleaved rounds. x = fp32 time / variant time.",
        "",
        "| variant | kernel | decode ms/tok | decode x | prefill ms | prefill x | linear-only decode x | "
        "linear-only prefill x | ppl | ppl vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        kern = ", ".join(r["kernels"]) or (
            "float32 nn.Linear" if r["variant"] == "fp32" else "bf16 nn.Linear"
        )
        ppl = "–" if r["perplexity"] is None else f"{r['perplexity']:.3f}"
        dp = "–" if r["ppl_delta_pct"] is None else f"{r['ppl_delta_pct']:+.2f}%"
        lines.append(
            f"| {r['variant']} | {kern} | {r['decode_ms_per_token']:.1f} | {r['decode_speedup']:.2f} | "
            f"{r['prefill_ms']:.0f} | {r['prefill_speedup']:.2f} | {r['linear_decode_speedup']:.2f} | "
            f"{r['linear_prefill_speedup']:.2f} | {ppl} | {dp} |"
        )
    fp = doc["rows"][0]
    lines += [
        "",
        f"Block linear layers are {100 * (fp['linear_share_of_fp32_prefill'] or 0):.0f}% of the fp32 prefill time; "
        "the rest (attention, norms, rotary, SiLU, the fp32 LM head) is unchanged by quantization (Amdahl). "
        "ppl: WikiText-2 test, GPTQ protocol, "
        f"first {s['ppl_tokens']} tokens (a check that each timed model is the accurate one, not the full protocol).",
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--linear-repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=16384, help="0: no perplexity")
    ap.add_argument(
        "--calib-samples", type=int, default=32, help="SmoothQuant calibration windows (c4, 512 tokens)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="substrings of variant names (fp32 always)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "lmshrink"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.time()
    doc = run(args)
    doc["wall_s"] = time.time() - t0
    from lmshrink.utils.io import atomic_write_text

    stem = Path(args.out_dir) / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{machine_name()}-quant-speed-cpu"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(stem.with_suffix(".md"), markdown(doc))
    print(markdown(doc))
    print(f"wrote {stem}.json")
    gc.collect()


if __name__ == "__main__":
    main()
