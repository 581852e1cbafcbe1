"""SST-2 distillation on CPU: a ``minilm-l6`` teacher fine-tuned with a classification head, then a 3-layer student
(teacher layers 0, 2, 4 and its head, DistilBERT-style) trained on the same examples for the same steps:

- ``student_distilled``: ``distill_model`` with ``alpha x KD(T) + (1 - alpha) x CE`` against the teacher's logits,
  computed once over the training examples and carried in the batches (``teacher_logits``: two floats per example,
  so epochs never rerun the teacher);
- ``student_no_distillation``: ``distill_model`` with ``alpha = 0`` (plain cross-entropy fine-tuning);
- ``student_hf_trainer``: the peer baseline (issue #7): a plain Hugging Face ``Trainer`` fine-tune of the same
  student, same examples, epochs, batch size, learning rate (constant), weight decay and gradient clipping.

Batches are length-bucketed (shuffled, then sorted by length within windows of 50 batches) to cut padding; the
same batches are used by every lmshrink run (the HF ``Trainer`` uses its own ``group_by_length`` sampling strategy).
Accuracy on SST-2 dev (872). Throughput is training tokens (non-padding) per second on this CPU.

One command (1 torch thread; ~66 min wall on the shared 2-core VM at load ~13, ~15 CPU-min):
  .venv/bin/python bench/distill_sst2.py          -> bench/results/distill_sst2.json (+ .md)
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

from lmshrink.data import load_sst2
from lmshrink.distillation.student import make_student
from lmshrink.distillation.trainer import distill_model
from lmshrink.evaluation import evaluate_accuracy
from lmshrink.models import load_model
from lmshrink.models.arch import count_parameters
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("bench.sst2")


def encode(tok: Any, examples: list[tuple[str, int]], max_len: int) -> list[list[int]]:
    return tok([t for t, _ in examples], truncation=True, max_length=max_len)["input_ids"]


def bucketed_batches(
    ids: list[list[int]], labels: list[int], batch_size: int, seed: int, pad_id: int, window: int = 50
) -> list[dict[str, torch.Tensor]]:
    """One epoch of padded batches: a seeded shuffle, sorted by length inside windows of ``window`` batches, batch
    order shuffled again. Batches carry ``index`` (rows of the example list) for attaching teacher logits."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=g).tolist()
    span = batch_size * window
    groups: list[list[int]] = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s : s + span], key=lambda i: len(ids[i]))
        groups += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(groups), generator=g).tolist()
    out = []
    for gi in perm:
        rows = groups[gi]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        m = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            m[r, : len(ids[i])] = 1
        out.append(
            {
                "input_ids": x,
                "attention_mask": m,
                "labels": torch.tensor([labels[i] for i in rows]),
                "index": torch.tensor(rows),
            }
        )
    return out


def run_lmshrink(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    epochs: list[list[dict[str, torch.Tensor]]],
    lr: float,
    alpha: float,
    temperature: float,
    teacher_logits: torch.Tensor | None,
) -> tuple[list[dict[str, float]], float]:
    """Train with distill_model epoch by epoch (one optimizer throughout); returns the trace and the seconds."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, fused=True)
    trace: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for i, batches in enumerate(epochs, 1):
        if teacher_logits is not None:
            batches = [{**b, "teacher_logits": teacher_logits[b["index"]]} for b in batches]
        row = distill_model(
            teacher, student, batches, opt, alpha=alpha, temperature=temperature, epochs=1, max_grad_norm=1.0
        )[0]
        trace.append({**row, "epoch": i})
        log.info("epoch %d: %s", i, row)
    return trace, time.perf_counter() - t0


@torch.no_grad()
def logits_of(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], n: int) -> torch.Tensor:
    model.eval()
    out = torch.zeros(n, model.config.num_labels)
    for b in batches:
        out[b["index"]] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return out


def run_hf_trainer(
    student: torch.nn.Module,
    tok: Any,
    ids: list[list[int]],
    labels: list[int],
    args: argparse.Namespace,
    work: Path,
) -> tuple[list[dict[str, float]], float, Any]:
    """The peer baseline: transformers.Trainer, no teacher, the same hyper-parameters as the lmshrink students."""
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    class _Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": ids[i], "attention_mask": [1] * len(ids[i]), "labels": labels[i]}

    targs = TrainingArguments(
        output_dir=str(work / "hf-trainer"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.student_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=student, args=targs, train_dataset=_Rows(), data_collator=DataCollatorWithPadding(tok)
    )
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    trace = [
        {"epoch": float(h["epoch"]), "loss": float(h["loss"])}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    return trace, seconds, {"transformers": transformers.__version__, "global_steps": out.global_step}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--no-hf-trainer", action="store_true", help="skip the Hugging Face Trainer baseline")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_sst2.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-sst2-"))
    t_start = time.time()
    times: dict[str, float] = {}

    train = load_sst2("train")
    g = torch.Generator().manual_seed(args.seed)
    subset = [train[i] for i in torch.randperm(len(train), generator=g)[: args.train_examples].tolist()]
    dev = load_sst2("dev", limit=args.dev_limit)
    teacher, tok = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    ids = encode(tok, subset, args.max_len)
    labels = [y for _, y in subset]
    n_tokens = sum(len(x) for x in ids)
    epochs = [
        bucketed_batches(ids, labels, args.batch_size, args.seed + e, tok.pad_token_id)
        for e in range(args.epochs)
    ]
    steps = sum(len(e) for e in epochs)
    log.info("%d examples, %d tokens per epoch, %d steps", len(ids), n_tokens, steps)

    def student() -> torch.nn.Module:
        return make_student(teacher, num_layers=args.student_layers, init="teacher", seed=args.seed).train()

    teacher.train()
    t_trace, times["teacher_finetune_s"] = run_lmshrink(
        teacher, teacher, epochs, args.teacher_lr, 0.0, 1.0, None
    )
    teacher.eval()
    t0 = time.perf_counter()
    t_logits = logits_of(teacher, epochs[0], len(ids))
    times["teacher_soft_labels_s"] = time.perf_counter() - t0
    init_student = student()

    plain = student()
    p_trace, times["student_plain_s"] = run_lmshrink(teacher, plain, epochs, args.student_lr, 0.0, 1.0, None)
    distilled = student()
    d_trace, times["student_distilled_s"] = run_lmshrink(
        teacher, distilled, epochs, args.student_lr, args.alpha, args.temperature, t_logits
    )
    models: list[tuple[str, torch.nn.Module]] = [
        ("teacher", teacher),
        ("student_init", init_student),
        ("student_no_distillation", plain),
        ("student_distilled", distilled),
    ]
    traces = {"teacher": t_trace, "student_no_distillation": p_trace, "student_distilled": d_trace}
    hf_info = None
    if not args.no_hf_trainer:
        hf = student()
        traces["student_hf_trainer"], times["student_hf_trainer_s"], hf_info = run_hf_trainer(
            hf, tok, ids, labels, args, work
        )
        models.append(("student_hf_trainer", hf.eval()))

    results: dict[str, Any] = {}
    t0 = time.time()
    for name, model in models:
        acc = evaluate_accuracy(
            model.eval(), tok, dev, batch_size=64, progress=False, max_length=args.max_len
        )
        results[name] = {"accuracy": acc.accuracy, "parameters": count_parameters(model)}
        log.info("%s: accuracy %.4f", name, acc.accuracy)
    times["evaluation_s"] = time.time() - t0
    times["total_s"] = time.time() - t_start
    t_acc = results["teacher"]["accuracy"]
    train_tokens = n_tokens * args.epochs
    throughput = {
        k.removesuffix("_s"): train_tokens / v
        for k, v in times.items()
        if k in ("teacher_finetune_s", "student_plain_s", "student_distilled_s", "student_hf_trainer_s")
    }
    record = {
        "bench": "distill_sst2",
        "command": "python bench/distill_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            "train": f"SST-2 train, {len(subset)} random examples (seed {args.seed}), {n_tokens} tokens, "
            f"{args.epochs} epochs, {steps} optimizer steps of {args.batch_size}",
            "eval": f"SST-2 dev ({len(dev)})",
        },
        "results": results,
        "retained_vs_teacher": {k: v["accuracy"] / t_acc for k, v in results.items()},
        "param_ratio_student_over_teacher": results["student_distilled"]["parameters"]
        / results["teacher"]["parameters"],
        "traces": traces,
        "hf_trainer": hf_info,
        "training_tokens_per_s_cpu": throughput,
        "times_s": times,
        "load_average": os.getloadavg(),
        "provenance": provenance("cpu", torch.float32),
    }
    atomic_write_json(args.out, record)
    lines = [
        f"# SST-2 distillation (`{record['command']}`)",
        "",
        f"{record['data']['train']}; evaluated on {record['data']['eval']}. CPU, {args.threads} torch thread, "
        f"shared VM (load average {os.getloadavg()[0]:.1f}).",
        "",
        "| model | parameters | dev accuracy | vs teacher | train tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    speed_key = {
        "teacher": "teacher_finetune",
        "student_no_distillation": "student_plain",
        "student_distilled": "student_distilled",
        "student_hf_trainer": "student_hf_trainer",
    }
    for name, r in results.items():
        tps = throughput.get(speed_key.get(name, ""))
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['accuracy']:.4f} | {r['accuracy'] / t_acc:.1%} | "
            + (f"{tps:.0f} |" if tps else "- |")
        )
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
