"""The lab's pruning cases on the BERT reference model ``minilm-l6`` (all-MiniLM-L6-v2, an embedding model):
20% and 40% unstructured (magnitude, the lab's ``apply_weight_pruning``; Wanda) and structured (heads, neurons,
layers), with size on disk, CPU inference time against the unpruned model in the same run, and quality as
**embedding similarity to the unpruned model**: mean cosine similarity of the mean-pooled sentence embeddings of
SST-2 dev sentences (all-MiniLM's own pooling), plus the mean Spearman-free "same nearest neighbour" rate.

    .venv/bin/python bench/prune_minilm.py
"""

from __future__ import annotations

import argparse
import copy
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
OUT = REPO / "bench" / "results" / "prune_minilm.json"
ROWS = "magnitude@0.2,magnitude@0.4,wanda@0.2,wanda@0.4,heads@0.2,heads@0.4,neurons@0.2,neurons@0.4,layers@0.2,layers@0.4"
log = logging.getLogger("bench.prune_minilm")


@torch.no_grad()
def embed(model: Any, tok: Any, sentences: list[str], batch: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(
            sentences[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def quality(ref: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    cos = (ref * emb).sum(-1)

    # nearest neighbour (other than itself) agreement
    def nn_idx(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)

    return {
        "cosine_to_unpruned": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "same_nearest_neighbour": float((nn_idx(ref) == nn_idx(emb)).float().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from lmshrink.data import calibration_batches, load_sst2
    from lmshrink.evaluation import measure_size, measure_speed
    from lmshrink.models import load_model
    from lmshrink.pruning import prune_model
    from lmshrink.pruning.structured import compute_importance, prune_heads, prune_layers, prune_neurons
    from lmshrink.utils.env import provenance
    from lmshrink.utils.io import atomic_write_json

    dense, tok = load_model("minilm-l6", dtype="float32")
    dense.eval()
    sentences = [s for s, _ in load_sst2("dev", limit=args.sentences)]
    ref = embed(dense, tok, sentences)
    calib = calibration_batches(tok, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    importance = compute_importance(dense, calib)
    s0 = measure_size(dense)
    rows: dict[str, Any] = {
        "dense": {"parameters": s0.parameters, "bytes_on_disk": s0.bytes_on_disk, **quality(ref, ref)}
    }
    models: dict[str, Any] = {"dense": dense}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        method, _, amount = row.partition("@")
        s = float(amount)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if method == "heads":
            prune_heads(model, calib, s, importance=importance)
        elif method == "neurons":
            prune_neurons(model, calib, s, importance=importance)
        elif method == "layers":
            prune_layers(model, calib, s, importance=importance)
        else:
            prune_model(model, {"method": method, "sparsity": s}, calib, progress=False)
        size = measure_size(model)
        rows[row] = {
            "method": method,
            "sparsity": s,
            "prune_seconds": round(time.perf_counter() - t0, 2),
            "parameters": size.parameters,
            "bytes_on_disk": size.bytes_on_disk,
            "format": size.format,
            **quality(ref, embed(model, tok, sentences)),
        }
        models[row] = model
        log.info("%s %s", row, rows[row])
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.speed_rounds):
        for name, model in models.items():
            sp = measure_speed(model, batch_sizes=(8,), seq_lens=(128,), repeats=5, warmup=1)
            times[name].append(sp.prefill[0].median_ms)
    for name, t in times.items():
        rows[name]["prefill_8x128_ms"] = t
        rows[name]["speedup_vs_dense"] = statistics.median(
            d / x for d, x in zip(times["dense"], t, strict=True)
        )
    atomic_write_json(
        args.out,
        {
            "settings": {
                "model": "minilm-l6",
                "dtype": "float32",
                "quality": f"SST-2 dev first {len(sentences)} sentences, mean-pooled embeddings vs unpruned",
                "calibration": f"c4 {args.n_samples}x{args.seq_len}",
                "speed": f"measure_speed prefill 8x128, {args.speed_rounds} alternating rounds, median ratio",
                "threads": args.threads,
            },
            "command": " ".join([".venv/bin/python", "bench/prune_minilm.py", *(argv or sys.argv[1:])]),
            "provenance": provenance("cpu", torch.float32),
            "rows": rows,
        },
    )
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
