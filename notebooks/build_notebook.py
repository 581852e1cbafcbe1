"""Build notebooks/model_compression_and_pruning.ipynb (run: .venv/bin/python notebooks/build_notebook.py)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS: list[tuple[str, str]] = [
    (
        "md",
        """# Model compression and pruning: MiniLM-L6 (BERT) with lmshrink

The lab exercise: compress a BERT model with **FP16, INT8, INT4 and NF4** weights and with **20% / 40% unstructured and
structured pruning**, and compare **size on disk, inference time and quality**.

* Model: `minilm-l6` (sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 12 heads, hidden 384, 22.7M parameters),
  the offline reference model (`bert-base-uncased` works the same when online: change `MODEL`).
* Quality: this model has no language-modelling head, so perplexity on WikiText is not defined for it. We measure
  what it is used for: **sentence embeddings** (mean pooling of the last hidden states, L2-normalised) of SST-2
  validation sentences, and report the **cosine similarity to the embeddings of the unmodified fp32 model**
  (mean and worst sentence). 1.0 means unchanged.
* Size: bytes of the saved model directory (`lmshrink.models.save_model`: real packed int8/int4/nf4 codes, bitmask +
  values for unstructured sparsity, smaller dense matrices for structured pruning), counted on disk.
* Time: `lmshrink.evaluation.measure_speed`, forward pass of a batch of 8 sequences of 64 tokens, median after warm-up,
  on this machine's CPU (named below). Quantized layers run the lmshrink CPU kernels.

Set `LMSHRINK_NOTEBOOK_SMALL=1` for a quick run on a small slice (CI does).""",
    ),
    (
        "code",
        """%matplotlib inline
import copy
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from lmshrink.data import calibration_batches, load_sst2
from lmshrink.evaluation import measure_size, measure_speed
from lmshrink.models import load_model, save_model
from lmshrink.pruning import prune_model
from lmshrink.quantization import quantize_model
from lmshrink.utils.env import device_description

SMALL = os.environ.get("LMSHRINK_NOTEBOOK_SMALL") == "1"
MODEL = "minilm-l6"
N_SENTENCES = 16 if SMALL else 512
REPEATS = 2 if SMALL else 5
torch.manual_seed(0)
torch.set_num_threads(min(2, os.cpu_count() or 1))
MACHINE = device_description("cpu")
print("machine:", MACHINE, "| small run:", SMALL)""",
    ),
    (
        "code",
        """base, tokenizer = load_model(MODEL, task="encoder")
sentences = [s for s, _ in load_sst2("dev", limit=N_SENTENCES)]
batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
calibration = calibration_batches(tokenizer, "wikitext103", n_samples=4 if SMALL else 32, seq_len=128)
print(type(base).__name__, sum(p.numel() for p in base.parameters()), "parameters;", len(sentences), "sentences")


@torch.inference_mode()
def embed(model):
    hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # (B, H)


reference = embed(base)""",
    ),
    (
        "code",
        """def measure(name, model):
    \"\"\"Size on disk, forward time and embedding similarity of one compressed model.\"\"\"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(model, Path(tmp) / name, tokenizer)
        size = measure_size(model, path)
    speed = measure_speed(model, batch_sizes=(8,), seq_lens=(64,), decode_tokens=0, repeats=REPEATS, warmup=1)
    cos = (embed(model) * reference).sum(-1)
    return {
        "model": name,
        "size_mb": size.bytes_on_disk / 1e6,
        "bits_per_weight": size.bits_per_weight,
        "parameters": size.parameters,
        "ms_per_batch": speed.prefill[0].median_ms,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
    }


VARIANTS = {
    "fp32": lambda m: m,
    "fp16": lambda m: quantize_model(m, {"format": "fp16"}),
    "int8": lambda m: quantize_model(m, {"format": "int8"}),
    "int4": lambda m: quantize_model(m, {"format": "int4", "group_size": 32}),
    "nf4": lambda m: quantize_model(m, {"format": "nf4"}),
    "unstructured 20%": lambda m: prune_model(m, {"method": "magnitude", "sparsity": 0.2}, progress=False),
    "unstructured 40%": lambda m: prune_model(m, {"method": "magnitude", "sparsity": 0.4}, progress=False),
    "structured 20%": lambda m: prune_model(m, {"method": "neurons", "sparsity": 0.2}, calibration, progress=False),
    "structured 40%": lambda m: prune_model(m, {"method": "neurons", "sparsity": 0.4}, calibration, progress=False),
}
rows = []
for name, apply in VARIANTS.items():
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    apply(model)
    rows.append(measure(name, model))
    print(f"{name:>17}: {time.perf_counter() - t0:5.1f} s", flush=True)""",
    ),
    (
        "md",
        """## Results

Unstructured pruning zeroes 20% / 40% of every linear layer's weights (magnitude, per layer); structured pruning
removes 20% / 40% of each block's MLP neurons (scored on calibration text), leaving a smaller dense model.
Embeddings (30,522 x 384 = 11.7M of the 22.7M parameters) stay in float32 in every variant.""",
    ),
    (
        "code",
        """header = ["model", "size (MB)", "bits/weight", "parameters", "ms / batch of 8", "cosine mean", "cosine min"]
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for r in rows:
    print(f"| {r['model']} | {r['size_mb']:.2f} | {r['bits_per_weight']:.2f} | {r['parameters']:,} | "
          f"{r['ms_per_batch']:.1f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} |")""",
    ),
    (
        "code",
        """names = [r["model"] for r in rows]
colors = ["C0"] + ["C1"] * 4 + ["C2"] * 2 + ["C3"] * 2
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for ax, key, label in zip(
    axes,
    ("size_mb", "ms_per_batch", "cos_mean"),
    ("size on disk (MB)", "forward time, batch 8 x 64 tokens (ms)", "cosine similarity to fp32 (mean)"),
    strict=True,
):
    ax.bar(names, [r[key] for r in rows], color=colors)
    ax.set_title(label)
    ax.tick_params(axis="x", rotation=60)
    ax.grid(alpha=0.3, axis="y")
axes[2].set_ylim(min(r["cos_min"] for r in rows) - 0.02, 1.0)
fig.suptitle(f"{MODEL}: compression vs size, time and quality ({len(sentences)} SST-2 dev sentences; {MACHINE})",
             fontsize=9)
fig.tight_layout()
plt.show()

fig, ax = plt.subplots(figsize=(6.5, 4.5))
for r, c in zip(rows, colors, strict=True):
    ax.scatter(r["size_mb"], r["cos_mean"], color=c)
    ax.annotate(r["model"], (r["size_mb"], r["cos_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("size on disk (MB)")
ax.set_ylabel("cosine similarity to fp32 (mean)")
ax.set_title("Size vs quality")
ax.grid(alpha=0.3)
plt.show()""",
    ),
    (
        "md",
        """## Reading the results

* **FP16** halves the linear weights with no visible change in the embeddings; **INT8** quarters them, still with a
  cosine similarity close to 1. **INT4** (groups of 32) and **NF4** (blocks of 64) are about 8x smaller per linear
  weight; NF4's non-uniform codebook usually tracks the normal-shaped weights better than the uniform INT4 grid.
* The whole file shrinks less than the linear weights, because the embedding matrix stays in float32.
* **Unstructured** pruning saves disk only through the sparse format (bitmask + kept values), and does not speed up a
  dense CPU forward pass; **structured** pruning gives a smaller dense model that is faster, at a larger quality cost
  per removed parameter.
* Times are measured on a shared CPU: compare variants within one run, not across machines.""",
    ),
]


def build(path: Path) -> None:
    """Write the notebook (outputs empty; run it with nbclient or Jupyter)."""
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


if __name__ == "__main__":
    build(Path(__file__).with_name("model_compression_and_pruning.ipynb"))
