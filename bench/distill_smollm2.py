"""Distil ``smollm2-135m`` (30 layers) into a 10-layer student initialised from teacher layers, on CPU.

- teacher: ``smollm2-135m`` (float32; its weights are the dequantized Q4_1 GGUF of the reference package);
- student: ``make_student(teacher, layer_ids=...)``: 10 of the 30 blocks (evenly spaced, first and last included),
  embeddings, final norm and (tied) head copied: a third of the layers, ~47% of the parameters (the 28M-parameter
  embedding is shared by both); the tied embedding/head is frozen unless ``--train-embeddings``;
- training (``train_lm``, AdamW, warm-up + cosine): the first ``steps x batch x seq_len`` tokens of the WikiText-103
  train excerpt, once with the live teacher (online distillation, full distribution, ``alpha x KD + (1 - alpha) x
  CE``) and once with cross-entropy only, same steps, blocks and order;
- evaluation: perplexity of teacher, student at initialisation, distilled and undistilled student on the first
  ``--test-tokens`` tokens of WikiText-2 raw test (``evaluate_perplexity``, non-overlapping windows of
  ``--eval-ctx``).

The budget is small on purpose (no GPU was lent to this task; everything ran on the shared 2-core CPU): a few hundred
short sequences (48 steps of 4 x 64 tokens, 12k tokens; 2k test tokens). The figures show the direction and size of the effect at that budget, not a converged student.

One command (1 torch thread, ~8 CPU-min; about an hour of wall time on the VM at load 15):
  .venv/bin/python bench/distill_smollm2.py     -> bench/results/distill_smollm2.json (+ .md)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmshrink.data import load_text
from lmshrink.distillation.student import make_student
from lmshrink.distillation.teacher import tokenize_text
from lmshrink.distillation.trainer import TrainConfig, train_lm
from lmshrink.evaluation import evaluate_perplexity
from lmshrink.models import load_model
from lmshrink.models.arch import count_parameters
from lmshrink.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record

log = logging.getLogger("bench.smollm2")


def spread_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher layers evenly spaced from the first to the last (both kept)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-layers", type=int, default=10)
    p.add_argument("--data", default="wikitext103", help="training corpus (train split): wikitext103 or c4")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--test-tokens", type=int, default=2048)
    p.add_argument("--eval-ctx", type=int, default=128)
    p.add_argument("--train-embeddings", action="store_true", help="also train the tied embedding / head")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_smollm2.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-smollm2-"))
    t_start = time.time()
    times: dict[str, float] = {}

    teacher, tok = load_model("smollm2-135m", task="causal-lm", dtype=torch.float32, device="cpu")
    teacher.eval()
    n_teacher = int(teacher.config.num_hidden_layers)
    layer_ids = spread_layers(n_teacher, args.student_layers)
    n_train = args.steps * args.batch_size * args.seq_len
    train_ids = tokenize_text(tok, load_text(args.data, split="train"))[:n_train]
    test_ids = tokenize_text(tok, load_text("wikitext2", split="test"))[: args.test_tokens]
    if train_ids.numel() < n_train:
        raise SystemExit(f"{args.data} gives {train_ids.numel()} tokens, fewer than the {n_train} needed")

    def student() -> torch.nn.Module:
        s = make_student(teacher, layer_ids=layer_ids, init="teacher")
        if (
            not args.train_embeddings
        ):  # the tied 28M-parameter embedding/head stays the teacher's (cheaper steps)
            s.get_input_embeddings().weight.requires_grad_(False)
        return s

    def ppl(model: torch.nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        r = evaluate_perplexity(model, tok, test_ids, ctx=args.eval_ctx, progress=False, batch_size=8)
        return {
            "perplexity": r.perplexity,
            "nll": r.nll,
            "n_tokens": r.n_tokens,
            "next_token_accuracy": r.next_token_accuracy,
            "eval_seconds": time.perf_counter() - t0,
        }

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup,
        weight_decay=0.0,
        trace_every=max(args.steps // 8, 1),
        val_max_tokens=None,
        progress=False,
        device="cpu",
    )
    results: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    results["teacher"] = {"parameters": count_parameters(teacher), "layers": n_teacher, **ppl(teacher)}
    init = student()
    results["student_init"] = {"parameters": count_parameters(init), "layers": len(layer_ids), **ppl(init)}
    del init
    for name, alpha, online in (
        ("student_distilled", args.alpha, True),
        ("student_no_distillation", 0.0, False),
    ):
        model = student()
        t0 = time.time()
        res = train_lm(
            model,
            train_ids,
            cfg,
            work / name,
            teacher=teacher if online else None,
            alpha=alpha,
            temperature=args.temperature,
        )
        times[f"{name}_train_s"] = time.time() - t0
        results[name] = {"parameters": count_parameters(model), "layers": len(layer_ids), **ppl(model)}
        runs[name] = {
            "distillation": res.distillation,
            "alpha": res.alpha,
            "tokens": res.tokens,
            "tokens_per_s": res.tokens_per_s,
            "train_seconds": res.train_seconds,
            "trace": res.trace,
        }
        log.info("%s: ppl %.2f, %.1f tokens/s", name, results[name]["perplexity"], res.tokens_per_s)
        del model
    times["total_s"] = time.time() - t_start
    d, n = results["student_distilled"]["perplexity"], results["student_no_distillation"]["perplexity"]
    record = {
        "bench": "distill_smollm2",
        "command": "python bench/distill_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "where": "CPU only (no GPU lent to this task), shared 2-core VM, torch threads = "
        + str(args.threads),
        "student_layer_ids": layer_ids,
        "data": {
            "train": f"{args.data} train, first {train_ids.numel()} tokens ({args.steps} steps x {args.batch_size} "
            f"x {args.seq_len}, one epoch)",
            "test": f"wikitext2 raw test, first {test_ids.numel()} tokens, windows of {args.eval_ctx}",
        },
        "results": results,
        "param_ratio_student_over_teacher": results["student_init"]["parameters"]
        / results["teacher"]["parameters"],
        "distilled_vs_plain": {
            "perplexity_distilled": d,
            "perplexity_plain": n,
            "reduction_pct": 100 * (n - d) / n,
        },
        "runs": runs,
        "training_tokens_per_s_cpu": {k: v["tokens_per_s"] for k, v in runs.items()},
        "times_s": times,
    }
    write_record(args.out, record)
    lines = [
        f"# smollm2-135m -> {len(layer_ids)}-layer student (`{record['command']}`)",
        "",
        f"{record['where']}. Train: {record['data']['train']}. Test: {record['data']['test']}.",
        "",
        "| model | layers | parameters | WikiText-2 test ppl | next-token acc | train tokens/s (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        tps = runs.get(name, {}).get("tokens_per_s")
        lines.append(
            f"| {name} | {r['layers']} | {r['parameters']:,} | {r['perplexity']:.2f} | "
            f"{r['next_token_accuracy']:.4f} | " + (f"{tps:.0f} |" if tps else "- |")
        )
    lines += ["", f"Distilled vs undistilled student: {100 * (n - d) / n:.1f}% lower perplexity."]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
