"""Pruning on smollm2-135m: WikiText-2 perplexity for magnitude / Wanda / SparseGPT at 20/40/50% and 2:4, and
structured pruning (heads, neurons, layers at 20/40%) with parameters, size on disk and CPU latency against the dense
model in the same run.

    .venv/bin/python bench/prune_smollm2.py                                   # every row (long: ~1.5 h on one quiet thread)
    .venv/bin/python bench/prune_smollm2.py --rows wanda@0.2,wanda@0.4        # some rows
    .venv/bin/python bench/prune_smollm2.py --speed-only --threads 2          # CPU latency of the structured rows

Rows are ``method[+option...]@amount``: ``magnitude@0.5``, ``nm:wanda@2:4`` (N:M scored by wanda), ``heads@0.2``,
``neurons+ls@0.2`` (with least-squares re-fit of ``down_proj``/``o_proj`` on calibration activations after removal),
``layers+loss@0.2`` (blocks ranked by the measured calibration-loss increase when each is removed alone).
Results merge into ``--out`` by row name (a file lock makes concurrent runs with the same settings safe).

Protocol: WikiText-2 raw test, tokenized once, first ``--max-tokens`` tokens (default 8192), non-overlapping
windows of ``--ctx`` 2048 (GPTQ protocol), token-level perplexity; the same windows for every row. Calibration:
``--n-samples`` x ``--seq-len`` tokens of C4 validation, seed 0 (default 16 x 512). Speed (``--speed-only``): models
with the recorded per-block shapes of every structured row (latency depends on the shapes only, not the values),
timed with :func:`lmshrink.evaluation.measure_speed` (prefill 8 x 128 with last-position logits; batch-1 greedy
decode with the KV cache after a 128-token prompt), dense and pruned interleaved in ``--speed-rounds`` rounds;
ratio = dense time / pruned time within a round, median over rounds (> 1 = faster).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LMSHRINK_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = REPO / "bench" / "results" / "prune_smollm2.json"
UNSTRUCTURED = [f"{m}@{s}" for m in ("magnitude", "wanda", "sparsegpt") for s in ("0.2", "0.4", "0.5")] + [
    f"nm:{m}@2:4" for m in ("magnitude", "wanda", "sparsegpt")
]
STRUCTURED = [
    f"{m}{o}@{s}" for m in ("heads", "neurons", "layers") for o in ("", "+ls") for s in ("0.2", "0.4")
]
STRUCTURED = [r for r in STRUCTURED if not r.startswith("layers+ls")] + ["layers+loss@0.2", "layers+loss@0.4"]
DEFAULT_ROWS = ",".join(UNSTRUCTURED + STRUCTURED)
log = logging.getLogger("bench.prune")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """Read-modify-write ``path`` under an exclusive lock (several runs may fill one file)."""
    from lmshrink.utils.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = (
        Path(tempfile.gettempdir()) / f"lmshrink-bench-{path.resolve().as_posix().replace('/', '_')}.lock"
    )
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {"rows": {}}
        yield data
        atomic_write_json(path, data)


def _ppl(model: Any, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    from lmshrink.evaluation import evaluate_perplexity

    t0 = time.perf_counter()
    r = evaluate_perplexity(model, None, ids, ctx=args.ctx, progress=False)
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


def _speed(models: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleave dense and pruned models round by round; per-round ratios dense/pruned, median over rounds."""
    from lmshrink.evaluation import measure_speed

    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in models}
    for r in range(args.speed_rounds):
        # alternate the order each round (dense first, then last) so that no model always runs first
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            sp = measure_speed(
                models[name],
                batch_sizes=(8,),
                seq_lens=(128,),
                decode_tokens=args.decode_tokens,
                decode_batch_sizes=(1,),
                repeats=args.speed_repeats,
                warmup=1,
            )
            times[name]["prefill"].append(sp.prefill[0].median_ms)
            times[name]["decode"].append(sp.decode[0].median_ms)
        log.info("speed round %d/%d done", r + 1, args.speed_rounds)
    out: dict[str, dict[str, Any]] = {}
    for name, t in times.items():
        row: dict[str, Any] = {
            "threads": args.threads,
            "rounds": args.speed_rounds,
            "decode_tokens": args.decode_tokens,
            "repeats": args.speed_repeats,
            "load_average": os.getloadavg(),
        }
        for kind in ("prefill", "decode"):
            row[f"{kind}_ms"] = t[kind]
            ratios = [d / p for d, p in zip(times["dense"][kind], t[kind], strict=True)]
            row[f"{kind}_speedup"] = statistics.median(ratios)
        out[name] = row
    return out


def markdown(results: dict[str, Any]) -> str:
    """The result file as a Markdown table (rows in file order, dense first)."""
    st = results.get("settings", {})
    dense = results["rows"].get("dense", {})
    lines = [
        "### Pruning smollm2-135m (float32, CPU)",
        "",
        f"WikiText-2 raw test, first {st.get('max_tokens')} tokens, {st.get('protocol')}, ctx {st.get('ctx')}; "
        f"calibration {st.get('calibration')}. Speed: dense time / pruned time, interleaved rounds, median "
        "(prefill 8x128 last-position logits; decode batch 1 per token with KV cache).",
        "",
        "| row | sparsity | ppl | params (M) | size MB | decode x | prefill 8x128 x | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        sp = r.get("speed") or {}

        def f(x: Any, spec: str) -> str:
            return "–" if x is None else format(x, spec)

        lines.append(
            f"| {name} | {f(r.get('sparsity'), '.2f')} | {f(r.get('perplexity'), '.2f')} | "
            f"{f(r.get('parameters', 0) / 1e6, '.1f')} | {f(r.get('bytes_on_disk', 0) / 1e6, '.1f')} | "
            f"{f(sp.get('decode_speedup'), '.2f')} | {f(sp.get('prefill_speedup'), '.2f')} | "
            f"{f(r.get('prune_seconds'), '.0f')} |"
        )
    if dense.get("speed"):
        d = dense["speed"]
        lines += [
            "",
            f"Speed: {d['threads']} thread(s), {d['rounds']} rounds, {d['decode_tokens']} decode tokens, "
            f"{d['repeats']} repeats; load average during the run {d.get('load_average')}; "
            f"command `{results.get('speed_command')}`.",
        ]
    lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in results.get("commands", [])), ""]
    return "\n".join(lines)


def parse_row(row: str) -> dict[str, Any]:
    """``method[+opt...]@amount`` -> a :class:`lmshrink.pruning.PruneConfig` dict."""
    spec, _, amount = row.partition("@")
    method, *opts = spec.split("+")
    if method.startswith("nm:"):
        return {"method": "nm", "nm_score": method[3:], "nm": amount}
    cfg: dict[str, Any] = {"method": method, "sparsity": float(amount)}
    for opt in opts:
        if opt == "ls":
            cfg["reconstruct"] = True
        elif opt == "loss":
            cfg["layer_importance"] = "loss"
        else:
            raise SystemExit(f"unknown row option {opt!r} in {row!r} (known: ls, loss)")
    return cfg


def same_shape_model(dense: Any, shapes: list[dict[str, int]]) -> Any:
    """A copy of ``dense`` resized to recorded per-block shapes (for timing: values do not change latency)."""
    from lmshrink.pruning.structured import apply_layer_shapes, remove_layers

    model = copy.deepcopy(dense)
    n = model.config.num_hidden_layers
    if len(shapes) < n:
        remove_layers(model, list(range(len(shapes), n)))
    apply_layer_shapes(model, shapes)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ROWS)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--speed-only", action="store_true", help="time the structured rows already in --out")
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="only rewrite the Markdown table from --out")
    args = p.parse_args(argv)
    if args.table:
        from lmshrink.utils.io import atomic_write_text

        atomic_write_text(args.out.with_suffix(".md"), markdown(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    from lmshrink.data import calibration_batches, load_text, tokenize_corpus
    from lmshrink.models import load_model
    from lmshrink.pruning import prune_model
    from lmshrink.pruning.config import STRUCTURED as STRUCTURED_METHODS
    from lmshrink.pruning.config import make_config
    from lmshrink.pruning.structured import compute_importance, prune_structured
    from lmshrink.utils.env import provenance

    command = " ".join([".venv/bin/python", "bench/prune_smollm2.py", *(argv or sys.argv[1:])])
    dense, tok = load_model("smollm2-135m", dtype="float32")
    dense.eval()
    if args.speed_only:
        with _locked(args.out) as results:
            shaped = {k: r["layer_shapes"] for k, r in results["rows"].items() if r.get("layer_shapes")}
        models = {"dense": dense}
        seen: dict[str, str] = {}
        for name, shapes in shaped.items():  # rows with identical shapes (e.g. +ls variants) are timed once
            key = json.dumps(shapes)
            if key in seen:
                continue
            seen[key] = name
            models[name] = same_shape_model(dense, shapes)
        speed = _speed(models, args)
        with _locked(args.out) as results:
            for name, shapes in shaped.items():
                results["rows"][name]["speed"] = speed[seen[json.dumps(shapes)]] | {
                    "timed_as": seen[json.dumps(shapes)]
                }
            results["rows"]["dense"]["speed"] = speed["dense"]
            results["speed_command"] = command
            results["speed_provenance"] = provenance("cpu", torch.float32)
            from lmshrink.utils.io import atomic_write_text

            atomic_write_text(args.out.with_suffix(".md"), markdown(results))
        return 0

    settings = {
        "model": "smollm2-135m",
        "dtype": "float32",
        "data": "wikitext2 raw test, tokenized once, first max_tokens tokens",
        "protocol": "gptq (non-overlapping windows of ctx)",
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "calibration": f"c4 validation {args.n_samples}x{args.seq_len} seed 0",
    }
    with _locked(args.out) as results:
        if results.get("settings", settings) != settings:
            log.warning("settings differ from the existing file; its rows are dropped")
            results.clear()
            results["rows"] = {}
        results.update(settings=settings, provenance=provenance("cpu", torch.float32))
        results["commands"] = [*results.get("commands", []), command]
        need_dense = "dense" not in results["rows"]
    ids = tokenize_corpus(tok, load_text("wikitext2", split="test"))[: args.max_tokens].clone()
    if need_dense:
        entry = {"method": "dense", "sparsity": 0.0, **_ppl(dense, ids, args), **_size(dense)}
        with _locked(args.out) as results:
            results["rows"]["dense"] = entry
    calib = calibration_batches(tok, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    importance = None
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        cfg = make_config(**parse_row(row), n_samples=args.n_samples, seq_len=args.seq_len)
        log.info("row %s", row)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"method": row.split("@")[0], "config": cfg.model_dump(exclude_defaults=True)}
        if cfg.method in STRUCTURED_METHODS:
            # importance from the dense model is the same for every structured row: computed once
            if cfg.method != "layers" or cfg.layer_importance != "loss":
                importance = importance or compute_importance(dense, calib)
            records = prune_structured(model, cfg, calib, importance=importance)
            entry["sparsity"] = cfg.sparsity
            entry["unit_fraction_removed"] = sum(len(r.removed) for r in records) / sum(
                r.shape[0] for r in records
            )
            entry["layer_shapes"] = model.config.lmshrink_layer_shapes
        else:
            report = prune_model(model, cfg, calib, progress=False)
            entry["sparsity"] = report.sparsity
        entry["prune_seconds"] = round(time.perf_counter() - t0, 1)
        entry.update(_ppl(model, ids, args))
        entry.update(_size(model))
        with _locked(args.out) as results:
            results["rows"][row] = entry
        log.info("%s: %s", row, {k: entry[k] for k in ("perplexity", "parameters", "bytes_on_disk")})
        del model
        gc.collect()
    from lmshrink.utils.io import atomic_write_text

    with _locked(args.out) as results:
        atomic_write_text(args.out.with_suffix(".md"), markdown(results))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
