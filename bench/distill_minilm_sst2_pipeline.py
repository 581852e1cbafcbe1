"""Example (c) of the recipes: ``minilm-l6`` on SST-2, distilled to fewer layers, heads and width, pruned, quantized
to int4. Reads the run directory of ``lmshrink run examples/minilm-sst2.yaml --run-dir runs/minilm-sst2`` and
writes its table (parameters, size on disk, SST-2 dev accuracy, size ratio and accuracy retained vs the fp32 teacher).

It also measures the one variant the recipe cannot express yet: the int4 model with its remaining float tensors
(token/position embeddings, LayerNorms, biases, the classifier) stored in float16 instead of float32. The embeddings
(30,522 x hidden) dominate a small student, so this is what decides whether "7x smaller" is reachable. The fp16 copy is
saved with ``save_model`` (size measured on disk) and evaluated in memory (``load_quantized`` does not yet accept
fp16 float tensors next to packed int4 ones).

One command (after the recipe run; ~2 min):
  .venv/bin/python bench/distill_minilm_sst2_pipeline.py --run-dir runs/minilm-sst2
      -> bench/results/distill_minilm_sst2_pipeline.json (+ .md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmshrink.data import load_sst2
from lmshrink.evaluation import evaluate_accuracy
from lmshrink.models import load_model, save_model
from lmshrink.quantization.linear import QuantLinear
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json, atomic_write_text


def dir_bytes(path: Path) -> int:
    return sum(
        f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.name.startswith("tokenizer")
    )


def floats_to_fp16(model: torch.nn.Module) -> int:
    """Cast every float tensor outside the quantized linears to float16; returns how many tensors changed."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for p in mod.parameters(recurse=False):
            if p.dtype == torch.float32:
                p.data = p.data.half()
                n += 1
        for name, b in mod.named_buffers(recurse=False):
            if b.dtype == torch.float32:
                setattr(mod, name, b.half())
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=Path("runs/minilm-sst2"))
    p.add_argument("--quantized-stage", default="int4")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "distill_minilm_sst2_pipeline.json"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ev = json.loads((args.run_dir / "stages" / "evaluate" / "results.json").read_text())
    models: dict[str, Any] = ev["models"]
    teacher = models["teacher"]
    rows: dict[str, dict[str, Any]] = {
        name: {
            "parameters": m.get("parameters"),
            "bytes_on_disk": m.get("bytes_on_disk"),
            "accuracy": m.get("accuracy"),
            "source": "lmshrink run (evaluate stage)",
        }
        for name, m in models.items()
    }
    model, tok = load_model(str(args.run_dir / "stages" / args.quantized_stage / "model"))
    changed = floats_to_fp16(model)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = save_model(model, Path(tmp) / "fp16", tok)
        size = dir_bytes(out_dir)
        # evaluated in memory: load_quantized rebuilds float tensors as float32 and refuses fp16 ones (a storage
        # limitation); the saved file is what the size column measures
        acc = evaluate_accuracy(
            model.eval(), tok, load_sst2("dev"), batch_size=64, progress=False, max_length=args.max_len
        )
    rows[f"{args.quantized_stage}+fp16-floats"] = {
        "parameters": models[args.quantized_stage].get("parameters"),
        "bytes_on_disk": size,
        "accuracy": acc.accuracy,
        "source": f"this script: {changed} float tensors of the {args.quantized_stage} model cast to float16, "
        "saved (size on disk), evaluated in memory on SST-2 dev",
    }
    for r in rows.values():
        r["size_ratio_vs_teacher"] = (
            teacher["bytes_on_disk"] / r["bytes_on_disk"] if r["bytes_on_disk"] else None
        )
        r["accuracy_retained"] = r["accuracy"] / teacher["accuracy"] if r["accuracy"] is not None else None
    record = {
        "bench": "distill_minilm_sst2_pipeline",
        "command": "python bench/distill_minilm_sst2_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "recipe_command": f"lmshrink run examples/minilm-sst2.yaml --run-dir {args.run_dir}",
        "recipe": (args.run_dir / "recipe.yaml").read_text()
        if (args.run_dir / "recipe.yaml").is_file()
        else None,
        "rows": rows,
        "provenance": provenance("cpu", torch.float32),
    }
    atomic_write_json(args.out, record)
    lines = [
        f"# Example (c): minilm-l6 on SST-2 (`{record['recipe_command']}`, then `{record['command']}`)",
        "",
        "| model | parameters | size on disk (MB) | x smaller than teacher | SST-2 dev accuracy | of teacher |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['bytes_on_disk'] / 1e6:.2f} | {r['size_ratio_vs_teacher']:.2f} | "
            f"{r['accuracy']:.4f} | {r['accuracy_retained']:.1%} |"
        )
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
