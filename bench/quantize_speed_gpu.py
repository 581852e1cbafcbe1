"""GPU speed of lmshrink's quantized layers and models against bf16: issue #3's GPU targets, in one short run.

Sized for a 15-minute device lease (a few minutes on an H100 / H200; ``bench/gpu_check.sh`` runs it after the CUDA
tests and writes into ``$OUT``):

    python bench/quantize_speed_gpu.py --out-dir "$OUT"

Two parts, each variant against bf16 in the same process:

* **kernels**: one lmshrink ``QuantLinear`` against bf16 ``F.linear`` at the linear shapes of a Llama-2-7B and a
  TinyLlama-1.1B block, for ``M`` rows (1 = a decode step; 1024+ = prefill): int4 g128 weight-only (tinygemm
  ``_weight_int4pack_mm``), int8 W8A8 (``torch._int_mm`` on a column-major weight; per-token activation
  quantization included in the time) and FP8 W8A8 (row-wise scaled ``torch._scaled_mm``; likewise). Timing: a CUDA
  graph of ``--graph-calls`` back-to-back calls, replayed, CUDA events; so launch overhead is out and the figure is
  the kernels' own time (falls back to an event-timed loop where capture fails, and says so).
* **models**: whole causal LMs in bf16 on the GPU: ``llama-1b`` / ``llama-7b`` are the TinyLlama-1.1B and Llama-2-7B
  shapes with random weights (speed does not depend on the values; the quality figures live in
  ``bench/quantize_table.py --device cuda``); ``--models smollm2-135m`` adds the real model where its package is
  installed (its 576-wide layers have no tinygemm path: they report "dequantize-on-the-fly", which claims no speed). Batch-1 decode after a ``--prompt``-token
  prompt, median ms per token, eager and with the decode step captured in a CUDA graph over a static KV cache
  (eager decode of a small model is bound by Python and kernel launches, not by the weights); prefill
  ``batch x seq`` with ``logits_to_keep=1``.

Every measurement that fails (an op missing from the image's torch, a capture error) is recorded with its error
instead of stopping the run, and the JSON is rewritten after every part, so a run cut short still leaves results.
``--device cpu`` runs the same code on CPU (lmshrink's CPU kernels against float32) for a smoke test.

Writes ``<out-dir>/<date>-<machine>-quant-speed-gpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import logging
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
log = logging.getLogger("bench.gpu")

#: Linear shapes (in, out) of one block: q/o, gate/up, down (k/v of Llama-2-7B equal q; TinyLlama's are 256 wide).
KERNEL_SHAPES: dict[str, list[tuple[int, int]]] = {
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "llama-1b": [(2048, 2048), (2048, 5632), (5632, 2048)],
    "tiny": [(256, 256), (256, 512), (512, 256)],
}
#: Synthetic Llama shapes (random weights): name -> LlamaConfig fields.
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}
#: Variant name -> QuantConfig fields (every variant: RTN; the speed does not depend on how the codes were chosen).
VARIANTS: dict[str, dict[str, Any]] = {
    "int4 g128 weight-only": {"format": "int4", "group_size": 128},
    "int8 W8A8 (per-channel W, per-token A)": {"format": "int8", "activations": "int8"},
    "fp8 e4m3 W8A8 (row-wise W, per-token A)": {"format": "fp8"},
}


# --------------------------------------------------------------------------------------------- timing
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_calls(fn: Callable[[], Any], dev: torch.device, calls: int, replays: int) -> tuple[float, str]:
    """Median milliseconds per call of ``fn``, and the method: on CUDA a captured graph of ``calls`` calls replayed
    ``replays`` times (event-timed loop if capture fails); on CPU a perf_counter loop."""
    for _ in range(3):
        fn()
    _sync(dev)
    if dev.type != "cuda":
        times = []
        for _ in range(replays):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(1e3 * (time.perf_counter() - t0) / calls)
        return statistics.median(times), "perf_counter loop (cpu)"
    method = "cuda graph"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        run: Callable[[], Any] = graph.replay
        per = calls
    except Exception as exc:  # capture is best effort; the fallback says so
        method = f"event-timed loop (graph capture failed: {type(exc).__name__})"
        torch.cuda.synchronize(dev)

        def run() -> None:
            for _ in range(calls):
                fn()

        per = calls
    run()
    torch.cuda.synchronize(dev)
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per)
    return statistics.median(times), method


def _attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # recorded in the result, the run goes on
        log.warning("failed: %s", traceback.format_exc(limit=3))
        return None, f"{type(exc).__name__}: {exc}"[:400]


# --------------------------------------------------------------------------------------------- kernels
@torch.inference_mode()
def kernel_rows(args: argparse.Namespace, dev: torch.device, base_dtype: torch.dtype) -> list[dict[str, Any]]:
    from lmshrink.quantization.config import QuantConfig
    from lmshrink.quantization.linear import QuantLinear

    rows = []
    for shape_name in args.kernel_shapes:
        for k, n in KERNEL_SHAPES[shape_name]:
            torch.manual_seed(0)
            w = torch.randn(n, k, device=dev) * 0.02
            w_base = w.to(base_dtype)
            layers: dict[str, tuple[nn.Module | None, str | None]] = {}
            for name, cfg in VARIANTS.items():
                spec = QuantConfig(**cfg).weight_spec()
                act = cfg.get("activations", "float")
                layers[name] = _attempt(
                    lambda spec=spec, act=act, w=w: QuantLinear.from_weight(w, None, spec, act=act).to(dev)
                )
            for m in args.kernel_m:
                x = torch.randn(m, k, device=dev, dtype=base_dtype)
                base_ms, method = time_calls(
                    lambda x=x, w_base=w_base: F.linear(x, w_base), dev, args.graph_calls, args.replays
                )
                row: dict[str, Any] = {
                    "shape": shape_name,
                    "k": k,
                    "n": n,
                    "m": m,
                    "baseline_ms": base_ms,
                    "method": method,
                    "variants": {},
                }
                for name, (layer, err) in layers.items():
                    if layer is None:
                        row["variants"][name] = {"error": err}
                        continue
                    res, err = _attempt(
                        lambda layer=layer, x=x: time_calls(
                            lambda: layer(x), dev, args.graph_calls, args.replays
                        )
                    )
                    entry: dict[str, Any] = {"kernel": layer.kernel_name}
                    if res is None:
                        entry["error"] = err
                    else:
                        entry.update(ms=res[0], speedup=base_ms / res[0], method=res[1])
                    row["variants"][name] = entry
                rows.append(row)
                log.info(
                    "kernel %s %dx%d M=%d: base %.4f ms; %s",
                    shape_name,
                    n,
                    k,
                    m,
                    base_ms,
                    ", ".join(f"{v.get('speedup', float('nan')):.2f}x" for v in row["variants"].values()),
                )
            del layers
            gc.collect()
    return rows


# --------------------------------------------------------------------------------------------- models
def build_model(name: str, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    if name in MODEL_SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**MODEL_SHAPES[name], max_position_embeddings=4096, tie_word_embeddings=False)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(dev):
                torch.manual_seed(0)
                model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(previous)
        return model.to(dtype).eval()
    from lmshrink.models import load_model

    model, _tok = load_model(name, dtype="float32")
    return model.to(device=dev, dtype=dtype).eval()


@torch.inference_mode()
def prefill_ms(model: nn.Module, ids: torch.Tensor, repeats: int) -> float:
    dev = ids.device
    model(ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(dev)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def eager_decode_ms(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Median per-token latency of greedy batch-1 decoding with the (dynamic) KV cache."""
    dev = prompt.device
    out = model(prompt, use_cache=True)
    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        _sync(dev)
        t0 = time.perf_counter()
        out = model(tok, past_key_values=pkv, use_cache=True)
        pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(dev)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _static_cache(model: nn.Module, max_len: int, dev: torch.device, dtype: torch.dtype) -> Any:
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw: dict[str, Any] = {"config": model.config, "max_cache_len": max_len}
    for key, value in (("max_batch_size", 1), ("batch_size", 1), ("device", dev), ("dtype", dtype)):
        if key in params:
            kw[key] = value
    return StaticCache(**kw)


@torch.inference_mode()
def graph_decode_ms(model: nn.Module, prompt: torch.Tensor, tokens: int, dtype: torch.dtype) -> float:
    """Per-token latency of greedy batch-1 decoding with one decode step captured in a CUDA graph over a static KV
    cache (the tokens are replayed back to back, events around them): the GPU time of a step without Python."""
    dev = prompt.device
    n = prompt.shape[1]
    cache = _static_cache(model, n + tokens + 8, dev, dtype)
    out = model(prompt, past_key_values=cache, cache_position=torch.arange(n, device=dev), use_cache=True)
    tok = out.logits[:, -1:].argmax(-1).clone()
    pos = torch.tensor([n], device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
    graph.replay()
    torch.cuda.synchronize(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(tokens):
        graph.replay()
        tok.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / tokens


def model_rows(
    args: argparse.Namespace,
    dev: torch.device,
    dtype: torch.dtype,
    rows: list[dict[str, Any]],
    save: Callable[[], Any],
) -> list[dict[str, Any]]:
    """Append one row per (model, variant) to ``rows``; ``save()`` after each model."""
    from lmshrink.quantization import QuantConfig, quantize_model

    g = torch.Generator().manual_seed(0)
    for name in args.models:
        base, err = _attempt(lambda name=name: build_model(name, dev, dtype))
        if base is None:
            rows.append({"model": name, "error": err})
            continue
        vocab = int(base.config.vocab_size)
        prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(dev)
        shapes = [(b, s) for b, s in args.prefill]
        ids = {f"{b}x{s}": torch.randint(0, vocab, (b, s), generator=g).to(dev) for b, s in shapes}
        params = sum(p.numel() for p in base.parameters())
        builders: dict[str, Callable[[], nn.Module]] = {
            "bf16" if dtype == torch.bfloat16 else "float32": lambda base=base: base
        }
        for vname, cfg in VARIANTS.items():
            builders[vname] = lambda cfg=cfg, base=base: (
                quantize_model(copy.deepcopy(base), QuantConfig(**cfg)).to(dev).eval()
            )
        for vname, make in builders.items():
            t0 = time.perf_counter()
            model, err = _attempt(make)
            row: dict[str, Any] = {"model": name, "params": params, "variant": vname}
            if model is None:
                row["error"] = err
                rows.append(row)
                continue
            row["build_s"] = time.perf_counter() - t0
            kern: dict[str, int] = {}
            for mod in model.modules():
                if hasattr(mod, "kernel_name") and hasattr(mod, "spec"):
                    kern[mod.kernel_name] = kern.get(mod.kernel_name, 0) + 1
            row["kernels"] = kern
            row["decode_eager_ms"], row["decode_eager_error"] = _attempt(
                lambda model=model, prompt=prompt: eager_decode_ms(model, prompt, args.decode_tokens)
            )
            if dev.type == "cuda":
                row["decode_graph_ms"], row["decode_graph_error"] = _attempt(
                    lambda model=model, prompt=prompt: graph_decode_ms(
                        model, prompt, args.decode_tokens, dtype
                    )
                )
            for key, t in ids.items():
                row[f"prefill_{key}_ms"], row[f"prefill_{key}_error"] = _attempt(
                    lambda model=model, t=t: prefill_ms(model, t, args.prefill_repeats)
                )
            if dev.type == "cuda":
                # everything allocated on the GPU at this point, the baseline model included
                row["gpu_allocated_gib"] = torch.cuda.memory_allocated(dev) / 2**30
            rows.append(row)
            log.info("model %s %s: %s", name, vname, {k: v for k, v in row.items() if k.endswith("_ms")})
            if model is not base:
                del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        base_row = next(r for r in rows if r["model"] == name and "variant" in r and r["variant"] in builders)
        for r in rows:
            if r["model"] != name or "error" in r:
                continue
            for key in [k for k in r if k.endswith("_ms") and r[k] is not None]:
                if base_row.get(key):
                    r[key.replace("_ms", "_speedup")] = base_row[key] / r[key]
        del base
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    return rows


# --------------------------------------------------------------------------------------------- report
def _x(v: Any) -> str:
    return "–" if v is None else f"{v:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    base = doc["baseline"]
    lines = [
        f"### GPU speed of lmshrink's quantized layers and models vs {base} (same run)",
        "",
        f"{doc['device_name']}; torch {doc['versions'].get('torch')}, transformers "
        f"{doc['versions'].get('transformers')}; {doc['date']}. x = {base} time / variant time (>1 = faster).",
        "",
        "#### Kernels (one linear layer; CUDA-graph replay of back-to-back calls, CUDA events)",
        "",
        "| shape | N x K | M | " + base + " ms | " + " | ".join(VARIANTS) + " |",
        "|---|---|---:|---:|" + "---|" * len(VARIANTS),
    ]
    for r in doc.get("kernels", []):
        cells = []
        for name in VARIANTS:
            v = r["variants"].get(name, {})
            cells.append(
                f"{_x(v.get('speedup'))} ({v.get('kernel', '?')})"
                if "ms" in v
                else f"error ({v.get('kernel', '')})"
            )
        lines.append(
            f"| {r['shape']} | {r['n']} x {r['k']} | {r['m']} | {r['baseline_ms']:.4f} | "
            + " | ".join(cells)
            + " |"
        )
    prefill_keys = [f"{b}x{sq}" for b, sq in s["prefill"]]
    lines += [
        "",
        "#### Models (batch-1 decode after a "
        + str(s["prompt"])
        + "-token prompt; prefill with logits_to_keep=1)",
        "",
        "| model | variant | kernels | decode eager ms/tok (x) | decode CUDA graph ms/tok (x) | "
        + " | ".join(f"prefill {k} ms (x)" for k in prefill_keys)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(prefill_keys),
    ]

    def cell(r: dict[str, Any], key: str) -> str:
        if r.get(f"{key}_ms") is None:
            err = r.get(f"{key}_error")
            return f"error: {err[:60]}" if err else "–"
        return f"{r[f'{key}_ms']:.3f} ({_x(r.get(f'{key}_speedup'))})"

    for r in doc.get("models", []):
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r.get('variant', '')} | error: {r['error'][:80]} | | |"
                + " |" * len(prefill_keys)
            )
            continue
        kern = ", ".join(f"{k} x{v}" for k, v in r.get("kernels", {}).items()) or "torch nn.Linear"
        lines.append(
            f"| {r['model']} | {r['variant']} | {kern} | {cell(r, 'decode_eager')} | {cell(r, 'decode_graph')} | "
            + " | ".join(cell(r, f"prefill_{k}") for k in prefill_keys)
            + " |"
        )
    lines += [
        "",
        "llama-1b / llama-7b: TinyLlama-1.1B / Llama-2-7B shapes with random weights (speed only; the LM head and "
        "embeddings stay in the baseline dtype). Kernel rows time one layer including the per-token activation "
        "quantization of the W8A8 variants.",
        "",
        f"Command: `{doc['command']}`",
        "",
    ]
    return "\n".join(lines)


def _write(doc: dict[str, Any], out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    for target, text in (
        (path, json.dumps(doc, indent=1, default=str)),
        (path.with_suffix(".md"), markdown(doc)),
    ):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)
    return path


def _pair(text: str) -> tuple[int, int]:
    b, s = text.lower().split("x")
    return int(b), int(s)


def main(argv: list[str] | None = None) -> Path:
    from common import machine_name, versions

    from lmshrink.utils.env import device_description, now_iso

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the point) or cpu (a smoke test of this script)")
    ap.add_argument("--parts", nargs="+", default=["kernels", "models"], choices=["kernels", "models"])
    ap.add_argument(
        "--kernel-shapes", nargs="+", default=["llama-7b", "llama-1b"], choices=sorted(KERNEL_SHAPES)
    )
    ap.add_argument("--kernel-m", nargs="+", type=int, default=[1, 16, 128, 1024, 4096, 8192])
    ap.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["llama-1b", "llama-7b"],
        help="llama-1b, llama-7b, tiny, or an lmshrink model spec",
    )
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prefill", nargs="+", type=_pair, default=[(8, 128), (4, 2048)], help="BxS shapes")
    ap.add_argument("--prefill-repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a smoke test)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    doc: dict[str, Any] = {
        "name": "quant-speed-gpu",
        "command": "python "
        + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(a).items() if k != "out_dir"},
        "date": now_iso(),
        "device_name": device_description(dev),
        "baseline": "bf16" if dtype == torch.bfloat16 else "float32",
        "versions": versions(),
        "cuda": {
            "torch_cuda": torch.version.cuda,
            "capability": list(torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else None,
        },
    }
    stem = (
        f"{doc['date'][:10]}-{machine_name()}-quant-speed-{'gpu' if dev.type == 'cuda' else 'gpu-smoke-cpu'}"
    )
    out_dir = Path(a.out_dir)
    t0 = time.perf_counter()
    if "kernels" in a.parts:
        doc["kernels"] = kernel_rows(a, dev, dtype)
        doc["kernels_s"] = time.perf_counter() - t0
        _write(doc, out_dir, stem)
    if "models" in a.parts:
        doc["models"] = []
        model_rows(a, dev, dtype, doc["models"], lambda: _write(doc, out_dir, stem))
    doc["wall_s"] = time.perf_counter() - t0
    path = _write(doc, out_dir, stem)
    print(path.with_suffix(".md").read_text())
    return path


if __name__ == "__main__":
    main()
