"""The seed pipeline at small scale on CPU: teacher -> soft labels -> distilled student vs the same student without
distillation, all measured on WikiText-2 (raw) test, in the two data regimes that matter.

1. a byte-level BPE tokenizer trained on the WikiText-103 train excerpt (2.5 MiB);
2. a Llama-style teacher (4.3M parameters) trained from scratch on it (about one epoch);
3. a student with <= 1/4 of the teacher's parameters (half the layers, half the width, initialised from the teacher by
   truncation), trained for the same steps on the same blocks in the same order with CE only (``alpha = 0``) and with
   ``alpha x KD + (1 - alpha) x CE`` from stored top-k soft labels (or the live teacher: the full distribution);
4. two regimes: **limited data** (``--limited-tokens`` tokens seen for many epochs: the plain student overfits and
   the teacher's soft labels regularise it) and **one epoch** (fresh tokens every step: the hard labels already carry
   most of the signal, so distillation gains little); in the limited regime a one-factor-at-a-time sweep over alpha,
   temperature, top-k and online (full distribution) distillation;
5. perplexity on the first ``--test-tokens`` tokens of WikiText-2 raw test (``lmshrink.evaluation.evaluate_perplexity``,
   non-overlapping windows of ``--seq-len``), the per-epoch traces (with WikiText-103 validation perplexity), the
   soft-label storage cost and the top-k reconstruction KL against the full distribution.

One command (1 torch thread; on a quiet machine ~10 min for the teacher and ~10 for the students):
  .venv/bin/python bench/distill_seed_pipeline.py --work W      -> bench/results/distill_seed_pipeline.json
Recorded run (shared VM at load average ~15): the teacher of session 1 (trained by this script with the same
settings, --teacher-steps 360 --lr 3e-3) reused with ``--reuse-teacher``, and ``--epoch-steps 0``: the one-epoch
regime with these exact settings is session 1's distill_seed_pipeline_1epoch.json (top-32) and _1epoch_top128.json
(deterministic: the same code path, teacher and blocks give the same numbers). The command is in the JSON.
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

os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))

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
from lmshrink.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("bench.distill")


def _ppl(model: torch.nn.Module, tok: Any, test_ids: torch.Tensor, seq_len: int) -> dict[str, float]:
    r = evaluate_perplexity(model, tok, test_ids, ctx=seq_len, progress=False, batch_size=16)
    return {
        "perplexity": r.perplexity,
        "nll": r.nll,
        "n_tokens": r.n_tokens,
        "next_token_accuracy": r.next_token_accuracy,
    }


def _variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One-factor-at-a-time sweep around the base setting (limited regime), then plain + base for one epoch."""
    base = {"alpha": args.alpha, "temperature": args.temperature, "top_k": args.top_k, "mode": "soft-labels"}
    out: list[dict[str, Any]] = [
        {
            "regime": "limited",
            "name": "plain",
            "alpha": 0.0,
            "temperature": 1.0,
            "top_k": None,
            "mode": "none",
        },
        {"regime": "limited", "name": "kd_base", **base},
    ]
    for a in args.sweep_alpha:
        if a != args.alpha:
            out.append({"regime": "limited", "name": f"kd_alpha{a:g}", **base, "alpha": a})
    for t in args.sweep_temperature:
        if t != args.temperature:
            out.append({"regime": "limited", "name": f"kd_T{t:g}", **base, "temperature": t})
    for k in args.sweep_top_k:
        if k != args.top_k:
            out.append({"regime": "limited", "name": f"kd_top{k}", **base, "top_k": k})
    if args.online:
        out.append({"regime": "limited", "name": "kd_online_full", **base, "top_k": None, "mode": "online"})
    if args.epoch_steps:
        out.append(
            {
                "regime": "one_epoch",
                "name": "plain",
                "alpha": 0.0,
                "temperature": 1.0,
                "top_k": None,
                "mode": "none",
            }
        )
        out.append({"regime": "one_epoch", "name": "kd_base", **base})
    return out


def write_markdown(record: dict[str, Any], path: Path) -> None:
    """A short Markdown summary of a result record (tables of the regimes, soft-label storage and quality)."""
    m = record["models"]
    lines = [
        f"# Seed pipeline at small scale (`{record['command']}`)",
        "",
        f"Teacher {m['teacher']['parameters']:,} parameters, student {m['student_init']['parameters']:,} "
        f"({record['param_ratio_student_over_teacher']:.1%}). {record['data']['test']}. CPU, 1 thread, shared VM "
        f"(load average {record['load_average'][0]:.0f}).",
        "",
        f"Teacher test perplexity {m['teacher']['perplexity']:.1f}; student at initialisation "
        f"{m['student_init']['perplexity']:.1f}.",
        "",
        "| regime | run | alpha | T | top-k | epochs | test ppl | vs plain | best-epoch val ppl | train tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["runs"]:
        plain = record["summary"][r["regime"]]["plain_ppl"]
        ppl = r["test"]["perplexity"]
        k = "full" if r["mode"] == "online" else (r["top_k"] or "-")
        lines.append(
            f"| {r['regime']} | {r['name']} | {r['alpha']:g} | {r['temperature']:g} | {k} | {r['epochs']:g} | "
            f"{ppl:.1f} | {100 * (plain - ppl) / plain:+.1f}% | {r['val_ppl_best_epoch']:.1f} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    sl = record["soft_labels"]
    lines += ["", "| soft labels | tokens | bytes/token | MB on disk |", "|---|---:|---:|---:|"]
    for name, v in sl["storage"].items():
        lines.append(
            f"| {name} | {v['tokens']} | {v['bytes_per_token']:.0f} | {v['bytes_on_disk'] / 1e6:.2f} |"
        )
    lines.append(f"| full fp16 distribution | - | {sl['full_fp16_bytes_per_token']} | - |")
    lines += [
        "",
        "| top-k | KL(full || top-k + uniform tail) on val | mean mass outside top-k |",
        "|---:|---:|---:|",
    ]
    for k, q in sl["reconstruction_kl_vs_full_on_val"].items():
        lines.append(f"| {k} | {q['kl_uniform_tail']:.3f} | {q['rest_mass_mean']:.3f} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=360)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--limited-tokens", type=int, default=20480, help="training tokens of the limited regime")
    p.add_argument(
        "--limited-steps", type=int, default=80, help="steps of the limited regime (8 epochs by default)"
    )
    p.add_argument("--epoch-steps", type=int, default=80, help="steps of the one-epoch regime (0: skip it)")
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--sweep-alpha", type=floats, default=[0.5, 0.8, 1.0])
    p.add_argument("--sweep-temperature", type=floats, default=[1.0, 2.0])
    p.add_argument("--sweep-top-k", type=ints, default=[8, 32, 128])
    p.add_argument(
        "--online",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also distil from the live teacher (full distribution) in the limited regime",
    )
    p.add_argument("--test-tokens", type=int, default=65536)
    p.add_argument("--val-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--reuse-teacher",
        type=Path,
        default=None,
        help="work directory of an earlier run with the same teacher settings: load its teacher instead of training",
    )
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
    t0 = time.time()
    if args.reuse_teacher is not None:
        # the tokenizer is retrained identically (BPE training is deterministic); the check below would catch a drift
        load_model(teacher, str(args.reuse_teacher / "teacher" / "checkpoint" / "model.safetensors"))
        t_result = json.loads((args.reuse_teacher / "teacher" / "result.json").read_text())
        t_trace, t_tokens_per_s = t_result["trace"], t_result["tokens_per_s"]
        again = evaluate_blocks(teacher, val_ids.view(-1, args.seq_len))["ppl"]
        if abs(again - t_trace[-1]["val_ppl"]) > 1e-3 * again:
            raise SystemExit(
                f"reused teacher gives val ppl {again}, its run recorded {t_trace[-1]['val_ppl']}"
            )
    else:
        t_cfg = TrainConfig(steps=args.teacher_steps, trace_every=max(args.teacher_steps // 8, 1), **common)
        t_res = train_lm(teacher, train_ids, t_cfg, work / "teacher", val_ids=val_ids)
        t_trace, t_tokens_per_s = t_res.trace, t_res.tokens_per_s
    times["teacher_train_s"] = time.time() - t0
    teacher.eval()

    def student() -> torch.nn.Module:
        return make_student(
            teacher,
            num_layers=args.student_layers,
            hidden_size=args.student_hidden,
            num_heads=args.student_heads,
            intermediate_size=default_intermediate_size(args.student_hidden),
            init="teacher",
        )

    regimes = {
        "limited": {"tokens": args.limited_tokens, "steps": args.limited_steps},
        "one_epoch": {"tokens": args.epoch_steps * args.batch_size * args.seq_len, "steps": args.epoch_steps},
    }
    evaluated: dict[str, Any] = {}
    t0 = time.time()
    for name, model in (("teacher", teacher), ("student_init", student())):
        evaluated[name] = {"parameters": count_parameters(model), **_ppl(model, tok, test_ids, args.seq_len)}
    times["evaluation_s"] = time.time() - t0

    soft_cache: dict[tuple[str, int], SoftLabels] = {}
    soft_info: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for v in _variants(args):
        reg = regimes[v["regime"]]
        s_ids = train_ids[: reg["tokens"]]
        steps_per_epoch = s_ids.numel() // args.seq_len // args.batch_size
        labels = None
        if v["mode"] == "soft-labels":
            key = (v["regime"], v["top_k"])
            if key not in soft_cache:
                t0 = time.time()
                soft_cache[key] = SoftLabels.generate(
                    teacher,
                    s_ids,
                    work / f"soft-{key[0]}-top{key[1]}",
                    top_k=key[1],
                    seq_len=args.seq_len,
                    batch_size=16,
                    progress=False,
                )
                lab = soft_cache[key]
                soft_info[f"{key[0]}_top{key[1]}"] = {
                    "top_k": key[1],
                    "tokens": int(s_ids.numel()),
                    "bytes_on_disk": lab.bytes_on_disk(),
                    "bytes_per_token": lab.bytes_on_disk() / s_ids.numel(),
                    "seconds_to_generate": time.time() - t0,
                }
            labels = soft_cache[key]
        cfg = TrainConfig(steps=reg["steps"], trace_every=steps_per_epoch, **common)
        model = student()
        t0 = time.time()
        res = train_lm(
            model,
            None if labels is not None else s_ids,
            cfg,
            work / f"{v['regime']}-{v['name']}",
            val_ids=val_ids,
            teacher=teacher if v["mode"] == "online" else None,
            soft_labels=labels,
            alpha=v["alpha"],
            temperature=v["temperature"],
        )
        wall = time.time() - t0
        ev = _ppl(model, tok, test_ids, args.seq_len)
        runs.append(
            {
                **v,
                "train_tokens": int(s_ids.numel()),
                "steps": reg["steps"],
                "epochs": reg["steps"] / steps_per_epoch,
                "test": ev,
                "val_ppl_final": res.trace[-1].get("val_ppl"),
                "val_ppl_best_epoch": min(r["val_ppl"] for r in res.trace if "val_ppl" in r),
                "tokens_per_s": res.tokens_per_s,
                "wall_s": wall,
                "trace": res.trace,
            }
        )
        log.info("%s/%s: test ppl %.2f (%.0f s)", v["regime"], v["name"], ev["perplexity"], wall)

    def get(regime: str, name: str) -> dict[str, Any]:
        return next(r for r in runs if r["regime"] == regime and r["name"] == name)

    summary: dict[str, Any] = {}
    for regime in regimes:
        if not any(r["regime"] == regime for r in runs):
            continue
        plain = get(regime, "plain")["test"]["perplexity"]
        rows = [r for r in runs if r["regime"] == regime and r["name"] != "plain"]
        summary[regime] = {
            "train_tokens": regimes[regime]["tokens"],
            "steps": regimes[regime]["steps"],
            "plain_ppl": plain,
            "distilled": {
                r["name"]: {
                    "ppl": r["test"]["perplexity"],
                    "reduction_vs_plain_pct": 100 * (plain - r["test"]["perplexity"]) / plain,
                }
                for r in rows
            },
        }
    with torch.no_grad():
        t_logits = teacher(input_ids=val_ids[: 8 * args.seq_len].view(8, args.seq_len)).logits
    quality = {str(k): topk_reconstruction_kl(t_logits, k) for k in sorted({*args.sweep_top_k, args.top_k})}
    times["total_s"] = time.time() - t_start
    record = {
        "bench": "distill_seed_pipeline",
        "command": "python bench/distill_seed_pipeline.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train": "wikitext103 train excerpt (2.5 MiB)",
            "train_tokens": int(train_ids.numel()),
            "teacher": f"reused from {args.reuse_teacher} (trained by this script, --teacher-steps "
            f"{args.teacher_steps})"
            if args.reuse_teacher
            else "trained in this run",
            "val": f"wikitext103 validation, first {val_ids.numel()} tokens (trace val_ppl)",
            "test": f"wikitext2 raw test, first {test_ids.numel()} tokens, windows of {args.seq_len}",
        },
        "models": evaluated,
        "param_ratio_student_over_teacher": evaluated["student_init"]["parameters"]
        / evaluated["teacher"]["parameters"],
        "summary": summary,
        "runs": runs,
        "soft_labels": {
            "storage": soft_info,
            "full_fp16_bytes_per_token": 2 * len(tok),
            "reconstruction_kl_vs_full_on_val": quality,
        },
        "teacher_trace": t_trace,
        "throughput_tokens_per_s": {
            "teacher_train": t_tokens_per_s,
            **{f"{r['regime']}/{r['name']}": r["tokens_per_s"] for r in runs},
        },
        "times_s": times,
        "load_average": os.getloadavg(),
        "provenance": provenance("cpu", torch.float32),
    }
    atomic_write_json(args.out, record)
    write_markdown(record, args.out.with_suffix(".md"))
    log.info("summary: %s -> %s", json.dumps(summary, indent=1), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
