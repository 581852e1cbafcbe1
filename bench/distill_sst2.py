"""SST-2 distillation on CPU: a ``minilm-l6`` teacher fine-tuned with a classification head on a subset of SST-2
train, then a 3-layer student (teacher layers 0, 2, 4 and its head, DistilBERT-style) trained on the same subset
with and without distillation (``distill_model``; alpha = 0 is plain fine-tuning). Accuracy on SST-2 dev (872).

Run:  .venv/bin/python bench/distill_sst2.py            (writes bench/results/distill_sst2.json)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmshrink.data import load_sst2
from lmshrink.distillation.student import make_student
from lmshrink.distillation.trainer import distill_model
from lmshrink.evaluation import evaluate_accuracy
from lmshrink.models import load_model
from lmshrink.models.arch import count_parameters
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json

log = logging.getLogger("bench.sst2")


def batches(
    tok: Any, examples: list[tuple[str, int]], batch_size: int, seed: int, max_len: int
) -> list[dict]:
    """Shuffled, dynamically padded batches (the same list for every run that uses the same seed)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i : i + batch_size]]
        enc = tok(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in chunk]),
            }
        )
    return out


def epochs_of(tok: Any, examples: list[tuple[str, int]], args: argparse.Namespace) -> Iterator[list[dict]]:
    for e in range(args.epochs):
        yield batches(tok, examples, args.batch_size, args.seed + e, args.max_len)


def finetune(model: torch.nn.Module, data: list[list[dict]], lr: float) -> list[dict[str, float]]:
    """Plain cross-entropy fine-tuning: distill_model with alpha = 0 (the teacher argument is not run)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    trace: list[dict[str, float]] = []
    for i, epoch in enumerate(data, 1):
        row = distill_model(model, model, epoch, opt, alpha=0.0, temperature=1.0, epochs=1)[0]
        trace.append({**row, "epoch": i})
    return trace


def distil(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    data: list[list[dict]],
    lr: float,
    alpha: float,
    temperature: float,
) -> list[dict[str, float]]:
    opt = torch.optim.AdamW(student.parameters(), lr=lr, fused=True)
    trace: list[dict[str, float]] = []
    for i, epoch in enumerate(data, 1):
        row = distill_model(teacher, student, epoch, opt, alpha=alpha, temperature=temperature, epochs=1)[0]
        trace.append({**row, "epoch": i})
    return trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_sst2.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    times: dict[str, float] = {}

    train = load_sst2("train")
    g = torch.Generator().manual_seed(args.seed)
    subset = [train[i] for i in torch.randperm(len(train), generator=g)[: args.train_examples].tolist()]
    dev = load_sst2("dev", limit=args.dev_limit)
    teacher, tok = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    data = list(epochs_of(tok, subset, args))

    t0 = time.time()
    teacher.train()
    t_trace = finetune(teacher, data, args.teacher_lr)
    times["teacher_finetune_s"] = time.time() - t0
    teacher.eval()

    def student() -> torch.nn.Module:
        return make_student(teacher, num_layers=args.student_layers, init="teacher", seed=args.seed).train()

    t0 = time.time()
    plain = student()
    p_trace = finetune(plain, data, args.student_lr)
    times["student_plain_s"] = time.time() - t0
    t0 = time.time()
    distilled = student()
    d_trace = distil(teacher, distilled, data, args.student_lr, args.alpha, args.temperature)
    times["student_distilled_s"] = time.time() - t0

    results: dict[str, Any] = {}
    t0 = time.time()
    for name, model in (
        ("teacher", teacher),
        ("student_init", student()),
        ("student_no_distillation", plain),
        ("student_distilled", distilled),
    ):
        acc = evaluate_accuracy(model, tok, dev, batch_size=64, progress=False, max_length=args.max_len)
        results[name] = {"accuracy": acc.accuracy, "parameters": count_parameters(model)}
        log.info("%s: accuracy %.4f", name, acc.accuracy)
    times["evaluation_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start
    t_acc = results["teacher"]["accuracy"]
    record = {
        "bench": "distill_sst2",
        "command": "python bench/distill_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train": f"SST-2 train, {len(subset)} random examples (seed {args.seed})",
            "eval": "SST-2 dev (872)",
        },
        "results": results,
        "retained_vs_teacher": {k: v["accuracy"] / t_acc for k, v in results.items()},
        "traces": {"teacher": t_trace, "student_no_distillation": p_trace, "student_distilled": d_trace},
        "times_s": times,
        "load_average": os.getloadavg(),
        "provenance": provenance("cpu", torch.float32),
    }
    atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
