"""Pruning on smollm2-135m: WikiText-2 perplexity for magnitude / Wanda / SparseGPT / N:M, and structured pruning
(heads, neurons, layers) with parameters, size on disk and CPU latency against the dense model in the same run.

    .venv/bin/python bench/prune_smollm2.py                       # default rows (see --rows)
    .venv/bin/python bench/prune_smollm2.py --rows wanda@0.2,wanda@0.4 --max-tokens 16384

Rows are ``method@sparsity`` (``nm:<score>@2:4`` for N:M). Results merge into ``bench/results/prune_smollm2.json``
by row name, so runs can be split. Perplexity protocol: WikiText-2 raw test, GPTQ protocol (non-overlapping
windows of ``--ctx`` tokens), token level, first ``--max-tokens`` tokens. Calibration: C4 validation windows.
Speed: :func:`lmshrink.evaluation.measure_speed` (prefill 8x128, batch-1 greedy decode with KV cache), the dense
model and each structured model measured alternately in ``--speed-rounds`` rounds; ratio = dense / pruned time
per round, median over rounds (>1 = faster).
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LMSHRINK_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = REPO / "bench" / "results" / "prune_smollm2.json"
DEFAULT_ROWS = (
    "magnitude@0.5,wanda@0.5,sparsegpt@0.5,heads@0.2,neurons@0.2,layers@0.2,nm:wanda@2:4,nm:magnitude@2:4,"
    "nm:sparsegpt@2:4"
)
log = logging.getLogger("bench.prune")


def _load_results(path: Path) -> dict[str, Any]:
    import json

    if path.exists():
        return json.loads(path.read_text())
    return {"rows": {}}


def _ppl(model: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lmshrink.evaluation import evaluate_perplexity

    t0 = time.perf_counter()
    r = evaluate_perplexity(model, tok, "wikitext2", ctx=args.ctx, max_tokens=args.max_tokens, progress=False)
    return {
        "perplexity": r.perplexity,
        "n_tokens": r.n_tokens,
        "n_windows": r.n_windows,
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }


def _size(model: Any) -> dict[str, Any]:
    from lmshrink.evaluation import measure_size

    s = measure_size(model)
    return {"parameters": s.parameters, "bytes_on_disk": s.bytes_on_disk, "format": s.format}


def _speed(
    models: dict[str, Any], rounds: int, threads: int, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Alternate dense and pruned models; per-round ratios dense/pruned, median over rounds."""
    from lmshrink.evaluation import measure_speed

    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    for _ in range(rounds):
        for name, model in models.items():
            sp = measure_speed(
                model,
                batch_sizes=(8,),
                seq_lens=(128,),
                decode_tokens=16,
                decode_batch_sizes=(1,),
                repeats=3,
                warmup=1,
            )
            times[name]["prefill"].append(sp.prefill[0].median_ms)
            times[name]["decode"].append(sp.decode[0].median_ms)
    out: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        row: dict[str, Any] = {
            "threads": threads,
            "rounds": rounds,
            "decode_tokens": args.decode_tokens,
            "repeats": args.speed_repeats,
        }
        for kind in ("prefill", "decode"):
            row[f"{kind}_ms"] = t[kind]
            ratios = [d / p for d, p in zip(times["dense"][kind], t[kind], strict=True)]
            row[f"{kind}_speedup"] = statistics.median(ratios)
        out[name] = row
    return out


def _parse_row(row: str) -> tuple[str, dict[str, Any]]:
    method, _, amount = row.partition("@")
    if method.startswith("nm:"):
        return "nm", {"method": "nm", "nm_score": method[3:], "nm": amount}
    return method, {"method": method, "sparsity": float(amount)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--speed-rounds", type=int, default=2)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="time the structured rows already in --out: same-shape models rebuilt from their recorded "
        "layer_shapes (latency depends on shapes only), no calibration or perplexity",
    )
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from lmshrink.data import calibration_batches
    from lmshrink.models import load_model
    from lmshrink.pruning import prune_model
    from lmshrink.pruning.config import make_config
    from lmshrink.pruning.structured import compute_importance, prune_heads, prune_layers, prune_neurons
    from lmshrink.utils.env import provenance
    from lmshrink.utils.io import atomic_write_json

    results = _load_results(args.out)
    settings = {
        "model": "smollm2-135m",
        "dtype": "float32",
        "data": "wikitext2 raw test",
        "protocol": "gptq",
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "calibration": f"c4 {args.n_samples}x{args.seq_len}",
        "threads": args.threads,
    }
    if results.get("settings", settings) != settings:
        log.warning("settings differ from the existing file; rows are overwritten with the new settings")
        results = {"rows": {}}
    command = " ".join([".venv/bin/python", "bench/prune_smollm2.py", *(argv or sys.argv[1:])])
    results.update(settings=settings, provenance=provenance("cpu", torch.float32))
    results["commands"] = [*results.get("commands", []), command]

    def save() -> None:
        atomic_write_json(args.out, results)

    dense, tok = load_model("smollm2-135m", dtype="float32")
    dense.eval()
    if args.speed_only:
        from lmshrink.pruning.structured import apply_layer_shapes, remove_layers

        same_shape: dict[str, Any] = {}
        for name, row in results["rows"].items():
            shapes = row.get("layer_shapes")
            if not shapes:
                continue
            model = copy.deepcopy(dense)
            n = model.config.num_hidden_layers
            if len(shapes) < n:
                remove_layers(model, list(range(len(shapes), n)))
            apply_layer_shapes(model, shapes)
            same_shape[name] = model
        speed = _speed({"dense": dense, **same_shape}, args.speed_rounds, args.threads, args)
        for name, row_speed in speed.items():
            results["rows"][name]["speed"] = row_speed
        save()
        return 0
    if "dense" not in results["rows"]:
        results["rows"]["dense"] = {
            "method": "dense",
            "sparsity": 0.0,
            **_ppl(dense, tok, args),
            **_size(dense),
        }
        save()
    calib = calibration_batches(tok, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    importance = None
    structured: dict[str, Any] = {}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        method, cfg = _parse_row(row)
        log.info("row %s", row)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if method in ("heads", "neurons", "layers"):
            importance = importance or compute_importance(dense, calib)
            s = cfg["sparsity"]
            if method == "heads":
                prune_heads(model, calib, s, importance=importance)
            elif method == "neurons":
                prune_neurons(model, calib, s, importance=importance)
            else:
                prune_layers(model, calib, s, importance=importance)
            entry: dict[str, Any] = {
                "method": method,
                "sparsity": s,
                "unit_fraction_removed": s,
                "layer_shapes": model.config.lmshrink_layer_shapes,
            }
        else:
            report = prune_model(model, make_config(**cfg), calib, progress=False)
            entry = {"method": row.split("@")[0], "sparsity": report.sparsity, "config": cfg}
        entry["prune_seconds"] = round(time.perf_counter() - t0, 1)
        entry.update(_ppl(model, tok, args))
        entry.update(_size(model))
        results["rows"][row] = entry
        save()
        log.info("%s: %s", row, {k: entry[k] for k in ("perplexity", "parameters", "bytes_on_disk")})
        if method in ("heads", "neurons", "layers"):
            structured[row] = model
        else:
            del model
            gc.collect()
    if structured and not args.no_speed:
        speed = _speed({"dense": dense, **structured}, args.speed_rounds, args.threads, args)
        for name, row_speed in speed.items():
            results["rows"][name]["speed"] = row_speed
        save()
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
