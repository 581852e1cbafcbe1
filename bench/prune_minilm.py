"""The lab's pruning cases on the BERT reference model ``minilm-l6`` (all-MiniLM-L6-v2, a sentence-embedding encoder):
20% and 40% unstructured (magnitude = the lab's ``apply_weight_pruning``; Wanda) and structured (attention heads,
MLP neurons, with and without the least-squares re-fit; whole layers), with parameters, size on disk and CPU
inference time against the unpruned model in the same run.

    .venv/bin/python bench/prune_minilm.py                 # every row, ~15 min on one thread
    .venv/bin/python bench/prune_minilm.py --rows heads@0.2,neurons+ls@0.4

Quality, two measures on the mean-pooled, L2-normalised sentence embeddings (all-MiniLM's own pooling):
- **SST-2 linear-probe accuracy**: a logistic-regression head trained (L-BFGS, full batch, fixed iterations) on the
  frozen embeddings of the first ``--train`` SST-2 train sentences, accuracy on the full SST-2 dev set (872). The
  head is re-trained for every row (the encoder is never fine-tuned);
- **embedding similarity to the unpruned model**: mean cosine similarity of each dev sentence's embedding to its
  unpruned embedding, and the share of dev sentences whose nearest neighbour (among dev sentences) is unchanged.
Calibration (Wanda, structured importance, re-fit): ``--n-samples`` x ``--seq-len`` tokens of C4 validation, seed 0.
Speed: :func:`lmshrink.evaluation.measure_speed` forward of 8 x 128 tokens, dense and pruned interleaved over
``--speed-rounds`` rounds; ratio = dense time / pruned time within a round, median over rounds (> 1 = faster).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_smollm2 import parse_row

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("LMSHRINK_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OUT = REPO / "bench" / "results" / "prune_minilm.json"
ROWS = ",".join(
    f"{m}@{s}"
    for m in ("magnitude", "wanda", "heads", "heads+ls", "neurons", "neurons+ls", "layers")
    for s in ("0.2", "0.4")
)
log = logging.getLogger("bench.prune_minilm")


@torch.no_grad()
def embed(model: Any, tok: Any, sentences: list[str], batch: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (sentences sorted by length to limit padding)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        enc = tok(
            [sentences[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[idx] = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    return out


def probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Logistic regression on frozen features (L-BFGS, 200 iterations, L2 1e-4, standardised), test accuracy."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(xtr.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    y = train_y.float()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xtr @ w + b, y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((((xte @ w + b) > 0).long() == test_y).float().mean())


def similarity(ref: torch.Tensor, emb: torch.Tensor) -> dict[str, float]:
    cos = (ref * emb).sum(-1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)

    return {
        "cosine_to_unpruned": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "same_nearest_neighbour": float((nearest(ref) == nearest(emb)).float().mean()),
    }


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [
        "### Pruning minilm-l6 (all-MiniLM-L6-v2), CPU",
        "",
        f"{doc['provenance'].get('device_name', '')}; {doc['provenance'].get('date', '')}; quality: {s['quality']}; "
        f"speed: {s['speed']} ({s['threads']} thread(s)).",
        "",
        "| row | params (M) | size MB | SST-2 probe acc | cos to unpruned | same NN | prefill 8x128 x | prune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in doc["rows"].items():
        lines.append(
            f"| {name} | {r['parameters'] / 1e6:.2f} | {r['bytes_on_disk'] / 1e6:.1f} | {r['probe_accuracy']:.3f} | "
            f"{r['cosine_to_unpruned']:.4f} | {r['same_nearest_neighbour']:.3f} | "
            f"{r.get('speedup_vs_dense', float('nan')):.2f} | {r.get('prune_seconds', 0.0):.1f} |"
        )
    lines += ["", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=ROWS)
    p.add_argument("--train", type=int, default=1000, help="SST-2 train sentences for the linear probe")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from lmshrink.data import calibration_batches, load_sst2
    from lmshrink.evaluation import measure_size, measure_speed
    from lmshrink.models import load_model
    from lmshrink.pruning import prune_model
    from lmshrink.pruning.config import STRUCTURED, make_config
    from lmshrink.pruning.structured import compute_importance, prune_structured
    from lmshrink.utils.env import provenance
    from lmshrink.utils.io import atomic_write_json, atomic_write_text

    dense, tok = load_model("minilm-l6", dtype="float32")
    dense.eval()
    train = load_sst2("train", limit=args.train)
    dev = load_sst2("dev")
    train_s, train_y = [s for s, _ in train], torch.tensor([y for _, y in train])
    dev_s, dev_y = [s for s, _ in dev], torch.tensor([y for _, y in dev])
    calib = calibration_batches(tok, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
    importance = compute_importance(dense, calib)

    def measure(model: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        dev_e = embed(model, tok, dev_s)
        acc = probe_accuracy(embed(model, tok, train_s), train_y, dev_e, dev_y)
        size = measure_size(model)
        return {
            "parameters": size.parameters,
            "bytes_on_disk": size.bytes_on_disk,
            "format": size.format,
            "probe_accuracy": acc,
            **similarity(ref, dev_e),
            "eval_seconds": round(time.perf_counter() - t0, 1),
        }

    ref = embed(dense, tok, dev_s)
    rows: dict[str, Any] = {"dense": {"method": "dense", "sparsity": 0.0, **measure(dense)}}
    log.info("dense %s", rows["dense"])
    models: dict[str, Any] = {"dense": dense}
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        cfg = make_config(**parse_row(row), n_samples=args.n_samples, seq_len=args.seq_len)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if cfg.method in STRUCTURED:
            prune_structured(model, cfg, calib, importance=importance)
        else:
            prune_model(model, cfg, calib, progress=False)
        rows[row] = {
            "method": row.split("@")[0],
            "sparsity": cfg.sparsity,
            "config": cfg.model_dump(exclude_defaults=True),
            "prune_seconds": round(time.perf_counter() - t0, 2),
            **measure(model),
        }
        if cfg.method in STRUCTURED:
            rows[row]["layer_shapes"] = model.config.lmshrink_layer_shapes
        models[row] = model
        log.info("%s %s", row, rows[row])
    if not args.no_speed:
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.speed_rounds):
            for name in list(models) if r % 2 == 0 else list(reversed(models)):
                sp = measure_speed(models[name], batch_sizes=(8,), seq_lens=(128,), repeats=5, warmup=1)
                times[name].append(sp.prefill[0].median_ms)
        for name, t in times.items():
            rows[name]["prefill_8x128_ms"] = t
            rows[name]["speedup_vs_dense"] = statistics.median(
                d / x for d, x in zip(times["dense"], t, strict=True)
            )
    doc = {
        "settings": {
            "model": "minilm-l6",
            "dtype": "float32",
            "quality": f"SST-2 linear probe (train first {len(train)}, dev {len(dev)}) on frozen mean-pooled "
            "embeddings; cosine / nearest neighbour vs unpruned on SST-2 dev",
            "calibration": f"c4 validation {args.n_samples}x{args.seq_len} seed 0",
            "speed": f"measure_speed forward 8x128, {args.speed_rounds} interleaved rounds, median ratio",
            "threads": args.threads,
        },
        "command": " ".join([".venv/bin/python", "bench/prune_minilm.py", *(argv or sys.argv[1:])]),
        "provenance": provenance("cpu", torch.float32),
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    atomic_write_json(args.out, doc)
    atomic_write_text(args.out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
