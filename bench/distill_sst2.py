"""SST-2 distillation on CPU: a ``minilm-l6`` teacher fine-tuned with a classification head on ``--train-examples``
labelled sentences, then 3-layer students copied from the fine-tuned teacher (``--layer-ids``, default every other
layer from the first, DistilBERT-style; embeddings, pooler and classifier head copied too):

- ``student_distilled``: ``distill_model`` with ``alpha x KD(T) + (1 - alpha) x CE`` against the teacher's logits,
  computed once and carried in the batches (``teacher_logits``: two floats per sentence, so epochs never rerun the
  teacher). With ``--transfer-examples N`` the teacher also labels N further SST-2 train sentences (their gold
  labels unused) and the distilled student trains on labelled + transfer sentences (the transfer set of Hinton et
  al. / DistilBERT); CE targets are gold on labelled rows and the teacher's argmax on transfer rows;
- ``student_no_distillation``: ``distill_model`` with ``alpha = 0`` (plain cross-entropy) on the labelled examples;
- controls on the same sentences as the distilled student (``--controls``): ``student_hard_teacher_labels`` (CE on
  gold + the teacher's hard labels: the transfer set without soft targets), ``student_gold_labels_all`` (an oracle
  with gold labels everywhere), ``student_distilled_labelled_only`` (distillation without the transfer set);
- ``student_hf_trainer``: the peer baseline (issue #7): a plain Hugging Face ``Trainer`` fine-tune of the same
  student, same labelled examples, epochs, batch size, learning rate (constant), weight decay and gradient clipping.

Every student starts from the same RNG state. Batches are length-bucketed (shuffled, then sorted by length within
windows of 50 batches) to cut padding; the same batches are used by every lmshrink run on the same sentences (the
HF ``Trainer`` uses its own ``group_by_length`` sampling). Accuracy on SST-2 dev (872). The JSON and Markdown are
rewritten after every model (``complete`` is false until the last). ``--teacher-state`` caches the fine-tuned
teacher (fine-tuning is deterministic on one thread: the same settings give the same teacher).

The reported run (1 torch thread; ~45 min on the shared 2-core VM at load ~7, teacher from the cache; fine-tuning
it adds ~16 min):
  .venv/bin/python bench/distill_sst2.py --train-examples 10000 --transfer-examples 10000 --epochs 1 \
      --layer-ids 1,3,5 --alpha 0.7 --temperature 2 --controls pseudo --threads 1 --teacher-state /tmp/ds/teacher.pt
  -> bench/results/distill_sst2.json (+ .md)
"""

from __future__ import annotations

import argparse
import hashlib
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
from lmshrink.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_record

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
    hidden_weight: float = 0.0,
) -> tuple[list[dict[str, float]], float]:
    """Train with distill_model epoch by epoch (one optimizer throughout); returns the trace and the seconds.
    ``hidden_weight`` > 0 adds the hidden-state MSE against the live teacher (its default layer map)."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, fused=True)
    trace: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for i, batches in enumerate(epochs, 1):
        if teacher_logits is not None:
            batches = [{**b, "teacher_logits": teacher_logits[b["index"]]} for b in batches]
        row = distill_model(
            teacher,
            student,
            batches,
            opt,
            alpha=alpha,
            temperature=temperature,
            epochs=1,
            max_grad_norm=1.0,
            hidden_weight=hidden_weight,
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


def parse_ids(text: str | None) -> list[int] | None:
    return None if not text else [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-examples", type=int, default=10000, help="labelled SST-2 train examples")
    p.add_argument(
        "--transfer-examples",
        type=int,
        default=0,
        help="extra SST-2 train sentences (disjoint from the labelled ones, labels unused) that the teacher "
        "labels softly for the distilled student (the transfer set)",
    )
    p.add_argument(
        "--controls",
        default="pseudo",
        help="with a transfer set, comma-separated no-distillation students on the same sentences: 'pseudo' "
        "(the teacher's hard labels on the transfer sentences), 'gold' (the true labels everywhere, an oracle), "
        "'labelled' (distillation on the labelled examples only); '' for none",
    )
    p.add_argument("--epochs", type=int, default=1, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--student-lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument(
        "--hidden-weight", type=float, default=0.0, help="weight of the hidden-state loss (live teacher)"
    )
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--layer-ids", default=None, help="teacher layers copied into the student, e.g. 1,3,5")
    p.add_argument("--no-hf-trainer", action="store_true", help="skip the Hugging Face Trainer baseline")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument(
        "--teacher-state",
        type=Path,
        default=None,
        help="fine-tuned teacher weights: loaded when the file exists (skips the teacher fine-tuning), written "
        "after fine-tuning otherwise; it must come from the same labelled examples and teacher settings",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "distill_sst2.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="distill-sst2-"))
    t_start = time.time()
    times: dict[str, float] = {}
    teacher_epochs = args.teacher_epochs or args.epochs
    layer_ids = parse_ids(args.layer_ids)
    controls = [c for c in args.controls.split(",") if c] if args.transfer_examples else []
    if bad := set(controls) - {"pseudo", "gold", "labelled"}:
        p.error(f"unknown --controls {sorted(bad)}")

    train = load_sst2("train")
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    if args.train_examples + args.transfer_examples > len(train):
        p.error(f"--train-examples + --transfer-examples exceed the {len(train)} SST-2 train sentences")
    subset = [train[i] for i in order[: args.train_examples]]
    transfer = [train[i] for i in order[args.train_examples : args.train_examples + args.transfer_examples]]
    dev = load_sst2("dev", limit=args.dev_limit)
    teacher, tok = load_model("minilm-l6", task="sequence-classification", num_labels=2)
    ids = encode(tok, subset, args.max_len)
    labels = [y for _, y in subset]
    n_tokens = sum(len(x) for x in ids)
    pad = tok.pad_token_id

    def make_epochs(
        rows: list[list[int]], ys: list[int], n: int, salt: int = 0
    ) -> list[list[dict[str, Any]]]:
        return [bucketed_batches(rows, ys, args.batch_size, args.seed + salt + e, pad) for e in range(n)]

    epochs = make_epochs(ids, labels, args.epochs)
    teacher_batches = epochs if teacher_epochs == args.epochs else make_epochs(ids, labels, teacher_epochs)
    steps = sum(len(e) for e in epochs)
    log.info("%d labelled examples, %d tokens per epoch, %d steps", len(ids), n_tokens, steps)

    def student() -> torch.nn.Module:
        # every student starts from the same global RNG state (dropout), whichever rows ran before it
        torch.manual_seed(args.seed + 1)
        return make_student(
            teacher,
            num_layers=None if layer_ids else args.student_layers,
            layer_ids=layer_ids,
            init="teacher",
            seed=args.seed,
        ).train()

    teacher_source = "fine-tuned in this run"
    t_trace: list[dict[str, float]] = []
    if args.teacher_state is not None and args.teacher_state.is_file():
        # a teacher fine-tuned earlier with the same settings (the fine-tuning is deterministic on one thread)
        teacher.load_state_dict(torch.load(args.teacher_state, map_location="cpu", weights_only=True))
        digest = hashlib.sha256(args.teacher_state.read_bytes()).hexdigest()[:16]
        teacher_source = f"loaded from {args.teacher_state} (sha256 {digest}), not fine-tuned in this run"
        log.info("teacher: %s", teacher_source)
    else:
        teacher.train()
        t_trace, times["teacher_finetune_s"] = run_lmshrink(
            teacher, teacher, teacher_batches, args.teacher_lr, 0.0, 1.0, None
        )
        if args.teacher_state is not None:
            torch.save(teacher.state_dict(), args.teacher_state)
    teacher.eval()
    # the distillation set: the labelled examples, then the transfer sentences (rows len(ids)...)
    all_ids = ids + encode(tok, transfer, args.max_len) if transfer else ids
    gold_all = labels + [y for _, y in transfer]
    t0 = time.perf_counter()
    t_logits = logits_of(teacher, bucketed_batches(all_ids, gold_all, 128, args.seed, pad), len(all_ids))
    times["teacher_soft_labels_s"] = time.perf_counter() - t0
    t_pred = t_logits.argmax(-1).tolist()
    # CE targets of the distilled student: gold on labelled rows, the teacher's hard label on transfer rows
    pseudo_all = labels + t_pred[len(ids) :]
    n_all_tokens = sum(len(x) for x in all_ids)
    all_epochs = make_epochs(all_ids, pseudo_all, args.epochs, salt=1000) if transfer else epochs
    init_student = student()
    layer_ids_used = getattr(init_student, "lmshrink_student_layers", None)
    n_student_params = count_parameters(init_student)
    steps_all = sum(len(e) for e in all_epochs)
    tokens_of = {
        "teacher": n_tokens * teacher_epochs,
        "student_no_distillation": n_tokens * args.epochs,
        "student_distilled": n_all_tokens * args.epochs,
        "student_hf_trainer": n_tokens * args.epochs,
    }
    sentences = {
        "teacher": f"{len(ids)} labelled",
        "student_init": "-",
        "student_no_distillation": f"{len(ids)} labelled",
        "student_distilled": f"{len(ids)} labelled + {len(transfer)} teacher-labelled"
        if transfer
        else f"{len(ids)} labelled",
        "student_hf_trainer": f"{len(ids)} labelled",
    }
    traces: dict[str, Any] = {"teacher": t_trace}
    results: dict[str, Any] = {}
    hf_info: dict[str, Any] | None = None
    transfer_acc = (
        sum(int(a == b) for a, b in zip(t_pred[len(ids) :], gold_all[len(ids) :], strict=True))
        / len(transfer)
        if transfer
        else None
    )

    def write(complete: bool) -> None:
        """The JSON and Markdown of the rows so far (rewritten after every model, so a cut run keeps them)."""
        times["total_s"] = time.time() - t_start
        t_acc = results["teacher"]["accuracy"]
        throughput = {
            name: tokens_of[name] / r["train_seconds"]
            for name, r in results.items()
            if r["train_seconds"] and name in tokens_of
        }
        record = {
            "bench": "distill_sst2",
            "command": "python bench/distill_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "complete": complete,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "data": {
                "train": f"SST-2 train, {len(subset)} random labelled examples (seed {args.seed}), {n_tokens} "
                f"tokens; teacher {teacher_epochs} epochs, students {args.epochs} epochs ({steps} optimizer steps "
                f"of {args.batch_size} on the labelled examples)",
                "transfer": f"{len(transfer)} further SST-2 train sentences (labels unused), "
                f"{n_all_tokens - n_tokens} tokens; the distilled student trains on labelled + transfer "
                f"({len(all_ids)} sentences, {steps_all} steps) against the teacher's logits, CE targets gold on "
                "labelled rows and the teacher's argmax on transfer rows"
                if transfer
                else "none (the distilled student trains on the labelled examples only)",
                "teacher_accuracy_on_transfer": transfer_acc,
                "eval": f"SST-2 dev ({len(dev)})",
                "teacher": teacher_source,
            },
            "student_layer_ids": layer_ids_used,
            "results": results,
            "retained_vs_teacher": {k: v["accuracy"] / t_acc for k, v in results.items()},
            "param_ratio_student_over_teacher": n_student_params / count_parameters(teacher),
            "traces": traces,
            "hf_trainer": hf_info,
            "training_tokens_per_s_cpu": throughput,
            "times_s": times,
        }
        write_record(args.out, record)
        lines = [
            f"# SST-2 distillation (`{record['command']}`)",
            "",
            f"{record['data']['train']}. Teacher {teacher_source}. Transfer set: {record['data']['transfer']}. "
            f"Student = teacher layers {layer_ids_used} + the fine-tuned teacher's embeddings, pooler and "
            f"classifier; alpha {args.alpha}, T {args.temperature}, lr {args.student_lr}, batch {args.batch_size}, "
            f"max_len {args.max_len}. Evaluated on {record['data']['eval']}. CPU, {args.threads} torch thread, "
            f"shared VM (load average {os.getloadavg()[0]:.1f}; wall {times['total_s'] / 60:.0f} min"
            + ("" if complete else "; INCOMPLETE run")
            + ").",
            "",
            "| model | parameters | train sentences | dev accuracy | vs teacher | train s | train tokens/s |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for name, r in results.items():
            tps = throughput.get(name)
            secs = r["train_seconds"]
            lines.append(
                f"| {name} | {r['parameters']:,} | {r['train_sentences']} | {r['accuracy']:.4f} | "
                f"{r['accuracy'] / t_acc:.1%} | "
                + (f"{secs:.0f} | " if secs else "- | ")
                + (f"{tps:.0f} |" if tps else "- |")
            )
        atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")

    def evaluate(name: str, model: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        acc = evaluate_accuracy(
            model.eval(), tok, dev, batch_size=64, progress=False, max_length=args.max_len
        )
        times["evaluation_s"] = times.get("evaluation_s", 0.0) + time.perf_counter() - t0
        results[name] = {
            "accuracy": acc.accuracy,
            "parameters": count_parameters(model),
            "train_sentences": sentences.get(name, "-"),
            "train_seconds": times.get("teacher_finetune_s" if name == "teacher" else f"{name}_s"),
        }
        log.info("%s: accuracy %.4f", name, acc.accuracy)
        write(complete=False)

    evaluate("teacher", teacher)
    evaluate("student_init", init_student)
    del init_student
    distilled = student()
    traces["student_distilled"], times["student_distilled_s"] = run_lmshrink(
        teacher,
        distilled,
        all_epochs,
        args.student_lr,
        args.alpha,
        args.temperature,
        t_logits,
        args.hidden_weight,
    )
    evaluate("student_distilled", distilled)
    del distilled
    plain = student()
    traces["student_no_distillation"], times["student_no_distillation_s"] = run_lmshrink(
        teacher, plain, epochs, args.student_lr, 0.0, 1.0, None
    )
    evaluate("student_no_distillation", plain)
    del plain
    for control in controls:
        if control == "labelled":
            name, batches, soft, a = "student_distilled_labelled_only", epochs, t_logits, args.alpha
            sentences[name] = f"{len(ids)} labelled"
            tokens_of[name] = n_tokens * args.epochs
        else:
            ys = pseudo_all if control == "pseudo" else gold_all
            name = "student_hard_teacher_labels" if control == "pseudo" else "student_gold_labels_all"
            batches, soft, a = make_epochs(all_ids, ys, args.epochs, salt=1000), None, 0.0
            sentences[name] = f"{len(ids)} labelled + {len(transfer)} " + (
                "teacher-hard-labelled" if control == "pseudo" else "gold-labelled (oracle)"
            )
            tokens_of[name] = n_all_tokens * args.epochs
        s_model = student()
        traces[name], times[f"{name}_s"] = run_lmshrink(
            teacher,
            s_model,
            batches,
            args.student_lr,
            a,
            args.temperature,
            soft,
            args.hidden_weight if soft is not None else 0.0,
        )
        evaluate(name, s_model)
        del s_model
    if not args.no_hf_trainer:
        hf = student()
        traces["student_hf_trainer"], times["student_hf_trainer_s"], hf_info = run_hf_trainer(
            hf, tok, ids, labels, args, work
        )
        evaluate("student_hf_trainer", hf)
    write(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
