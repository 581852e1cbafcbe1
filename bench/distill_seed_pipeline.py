"""The seed pipeline at small scale on CPU: teacher -> soft labels -> distilled student vs the same student without
distillation, all measured on WikiText-2 (raw) test.

1. a byte-level BPE tokenizer trained on the WikiText-103 train excerpt (2.5 MiB);
2. a Llama-style teacher trained from scratch on it;
3. the teacher's top-k soft labels for the student's training blocks, stored on disk (fp16 probs + uint16 ids);
4. a student (<= 1/4 of the teacher's parameters: half the layers, half the width, initialised from the teacher
   by truncation) trained twice for the same steps on the same blocks in the same order: with
   ``alpha x KD + (1 - alpha) x CE`` from the soft labels, and with CE only (``alpha = 0``);
5. perplexity of teacher, student at initialisation and both students on the first ``--test-tokens`` tokens of
   WikiText-2 raw test (``lmshrink.evaluation.evaluate_perplexity``, non-overlapping windows of ``--seq-len``),
   the epoch traces, soft-label storage and top-k reconstruction quality.

Runs recorded in bench/results/ (2-core shared CPU, 1 torch thread, load average ~20):
  .venv/bin/python bench/distill_seed_pipeline.py --teacher-steps 360 --student-steps 80 --lr 3e-3 \
      --val-tokens 8192 --work W                                  -> distill_seed_pipeline.json (students: 1 epoch)
  ... same + --student-tokens 40960 --reuse-teacher W             -> distill_seed_pipeline_limited_data.json (4 epochs)
  ... same + --top-k 128 --reuse-teacher W                        -> distill_seed_pipeline_1epoch_top128.json
  .venv/bin/python bench/distill_seed_pipeline.py --teacher-steps 120 --student-steps 80
                                                                  -> distill_seed_pipeline_teacher120.json (too weak a
                                                                     teacher: distillation loses)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from lmshrink.data import load_text
from lmshrink.distillation.soft_labels import SoftLabels, topk_reconstruction_kl
from lmshrink.distillation.student import make_student
from lmshrink.distillation.teacher import (
    build_llama,
    default_intermediate_size,
    tokenize_text,
    train_tokenizer,
)
from lmshrink.distillation.trainer import TrainConfig, evaluate_blocks, train_lm
from lmshrink.evaluation import evaluate_perplexity
from lmshrink.models.arch import count_parameters
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json

log = logging.getLogger("bench.distill")
os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _ppl(model: torch.nn.Module, tok: Any, test_ids: torch.Tensor, seq_len: int) -> dict[str, float]:
    r = evaluate_perplexity(model, tok, test_ids, ctx=seq_len, progress=False, batch_size=16)
    return {
        "perplexity": r.perplexity,
        "nll": r.nll,
        "n_tokens": r.n_tokens,
        "next_token_accuracy": r.next_token_accuracy,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=160)
    p.add_argument("--student-steps", type=int, default=100)
    p.add_argument(
        "--student-tokens",
        type=int,
        default=None,
        help="train the students on the first N training tokens, for several epochs (default: one epoch's worth)",
    )
    p.add_argument(
        "--reuse-teacher",
        type=Path,
        default=None,
        help="work directory of an earlier run with the same teacher settings: load its teacher instead of training",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--test-tokens", type=int, default=65536)
    p.add_argument("--val-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "distill_seed_pipeline.json"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-bench-"))
    t_start = time.time()
    times: dict[str, float] = {}

    t0 = time.time()
    train_text = load_text("wikitext103", split="train")
    tok = train_tokenizer(train_text, args.vocab_size)
    train_ids = tokenize_text(tok, train_text)
    val_ids = tokenize_text(tok, load_text("wikitext103", split="validation"))[: args.val_tokens]
    test_ids = tokenize_text(tok, load_text("wikitext2", split="test"))[: args.test_tokens]
    times["tokenizer_and_tokenize_s"] = time.time() - t0
    log.info("train %d tokens, val %d, test %d", train_ids.numel(), val_ids.numel(), test_ids.numel())

    common = dict(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        val_max_tokens=args.val_tokens,
        progress=False,
        device="cpu",
        warmup_steps=10,
    )
    teacher = build_llama(
        len(tok), args.hidden, args.layers, args.heads, default_intermediate_size(args.hidden), args.seq_len
    )
    t_cfg = TrainConfig(steps=args.teacher_steps, trace_every=max(args.teacher_steps // 8, 1), **common)
    t0 = time.time()
    if args.reuse_teacher is not None:
        # the tokenizer is retrained identically (BPE training is deterministic); the check below would catch a drift
        load_model(teacher, str(args.reuse_teacher / "teacher" / "checkpoint" / "model.safetensors"))
        t_trace = json.loads((args.reuse_teacher / "teacher" / "trace.json").read_text())
        t_tokens_per_s = json.loads((args.reuse_teacher / "teacher" / "result.json").read_text())[
            "tokens_per_s"
        ]
        again = evaluate_blocks(teacher, val_ids.view(-1, args.seq_len))["ppl"]
        if abs(again - t_trace[-1]["val_ppl"]) > 1e-3 * again:
            raise SystemExit(
                f"reused teacher gives val ppl {again}, its run recorded {t_trace[-1]['val_ppl']}"
            )
    else:
        t_res = train_lm(teacher, train_ids, t_cfg, work / "teacher", val_ids=val_ids)
        t_trace, t_tokens_per_s = t_res.trace, t_res.tokens_per_s
    times["teacher_train_s"] = time.time() - t0
    teacher.eval()

    # the students' data: the first blocks of the same excerpt (default: as many as their steps consume, one epoch)
    n_student_tokens = args.student_tokens or args.student_steps * args.batch_size * args.seq_len
    s_ids = train_ids[:n_student_tokens]
    t0 = time.time()
    labels = SoftLabels.generate(
        teacher, s_ids, work / "soft", top_k=args.top_k, seq_len=args.seq_len, batch_size=16, progress=False
    )
    times["soft_labels_s"] = time.time() - t0
    with torch.no_grad():
        vb = val_ids[: 8 * args.seq_len].view(8, args.seq_len)
        t_logits = teacher(input_ids=vb).logits
    quality = {str(k): topk_reconstruction_kl(t_logits, k) for k in (8, 32, 128)}

    def student() -> torch.nn.Module:
        return make_student(
            teacher,
            num_layers=args.student_layers,
            hidden_size=args.student_hidden,
            num_heads=args.student_heads,
            intermediate_size=default_intermediate_size(args.student_hidden),
            init="teacher",
        )

    s_cfg = TrainConfig(steps=args.student_steps, trace_every=max(args.student_steps // 5, 1), **common)
    init_model = student()
    results: dict[str, Any] = {}
    t0 = time.time()
    distilled = student()
    d_res = train_lm(
        distilled,
        s_ids,
        s_cfg,
        work / "distilled",
        val_ids=val_ids,
        soft_labels=labels,
        alpha=args.alpha,
        temperature=args.temperature,
    )
    times["student_distilled_s"] = time.time() - t0
    t0 = time.time()
    plain = student()
    p_res = train_lm(plain, s_ids, s_cfg, work / "plain", val_ids=val_ids, alpha=0.0)
    times["student_plain_s"] = time.time() - t0

    t0 = time.time()
    for name, model in (
        ("teacher", teacher),
        ("student_init", init_model),
        ("student_distilled", distilled),
        ("student_no_distillation", plain),
    ):
        results[name] = {"parameters": count_parameters(model), **_ppl(model, tok, test_ids, args.seq_len)}
        results[name]["val"] = evaluate_blocks(
            model, val_ids.view(-1, args.seq_len)[: args.val_tokens // args.seq_len]
        )
    times["evaluation_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start

    d, n = results["student_distilled"]["perplexity"], results["student_no_distillation"]["perplexity"]
    record = {
        "bench": "distill_seed_pipeline",
        "command": "python bench/distill_seed_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train": "wikitext103 train excerpt (2.5 MiB)",
            "train_tokens": int(train_ids.numel()),
            "student_train_tokens": int(s_ids.numel()),
            "student_epochs": args.student_steps * args.batch_size * args.seq_len / s_ids.numel(),
            "teacher": f"reused from {args.reuse_teacher}" if args.reuse_teacher else "trained in this run",
            "val": f"wikitext103 validation, first {val_ids.numel()} tokens",
            "test": f"wikitext2 raw test, first {test_ids.numel()} tokens, windows of {args.seq_len}",
        },
        "results": results,
        "param_ratio_student_over_teacher": results["student_distilled"]["parameters"]
        / results["teacher"]["parameters"],
        "distilled_vs_plain": {
            "perplexity_distilled": d,
            "perplexity_plain": n,
            "reduction_pct": 100 * (n - d) / n,
        },
        "soft_labels": {
            "top_k": args.top_k,
            "bytes_on_disk": labels.bytes_on_disk(),
            "tokens": int(s_ids.numel()),
            "bytes_per_token": labels.bytes_on_disk() / s_ids.numel(),
            "full_fp16_bytes_per_token": 2 * len(tok),
            "reconstruction_quality_on_val": quality,
        },
        "traces": {
            "teacher": t_trace,
            "student_distilled": d_res.trace,
            "student_no_distillation": p_res.trace,
        },
        "throughput_tokens_per_s": {
            "teacher": t_tokens_per_s,
            "student_distilled": d_res.tokens_per_s,
            "student_no_distillation": p_res.tokens_per_s,
        },
        "times_s": times,
        "load_average": os.getloadavg(),
        "provenance": provenance("cpu", torch.float32),
    }
    atomic_write_json(args.out, record)
    log.info(
        "teacher ppl %.2f | student init %.2f | distilled %.2f | plain %.2f (%.1f%% lower) -> %s",
        results["teacher"]["perplexity"],
        results["student_init"]["perplexity"],
        d,
        n,
        100 * (n - d) / n,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
