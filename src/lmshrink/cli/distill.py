"""``lmshrink train`` (a Llama-style model from scratch, BPE tokenizer included) and ``lmshrink distill`` (a smaller
student from a teacher, online or from stored soft labels). Both run unchanged under ``torchrun`` (DDP)."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from lmshrink.cli.app import app, console
from lmshrink.errors import LmshrinkError

_VAL = typer.Option("wikitext103", help="Validation corpus name or text file ('none' to skip).")

#: Options shared by ``train`` and ``distill``: name -> (type, typer option). :func:`training_options` adds them to
#: a command and hands the command a ready :class:`TrainConfig` and distributed context instead.
_TRAIN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "steps": (int, typer.Option(1000, help="Optimizer steps.")),
    "batch_size": (int, typer.Option(16, help="Blocks per micro-batch and process.")),
    "grad_accum": (int, typer.Option(1, help="Gradient-accumulation micro-batches per step.")),
    "seq_len": (int, typer.Option(128, help="Tokens per block.")),
    "lr": (float, typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up + cosine).")),
    "warmup": (int, typer.Option(50, help="Warm-up steps.")),
    "checkpoint_every": (
        int | None,
        typer.Option(None, help="Checkpoint every N steps (and at the end); a rerun resumes from it."),
    ),
    "trace_every": (int | None, typer.Option(None, help="Trace row every N steps (default: one per epoch).")),
    "val_tokens": (int, typer.Option(65536, help="Validation tokens used per trace row.")),
    "seed": (int, typer.Option(0, help="Seed of initialisation and batch order.")),
    "device": (str | None, typer.Option(None, help="cpu, cuda, cuda:N (default: cuda when available).")),
    "threads": (int | None, typer.Option(None, help="CPU threads for torch (default: torch's choice).")),
    "resume": (bool, typer.Option(True, help="Resume from OUT/checkpoint when present.")),
}


@dataclass
class Training:
    """What :func:`training_options` gives a command: the training config and the (distributed) context."""

    config: Any
    ctx: Any


def training_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Give a command the shared training options (:data:`_TRAIN_OPTIONS`) in place of its ``training`` parameter.

    The wrapped command receives ``training=Training(config, ctx)``: threads set, the process group initialised,
    ``warmup`` capped at ``steps``. A command adds its own :class:`TrainConfig` fields to ``training.config``
    (``distill`` adds the intermediate-loss ones).
    """
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "training"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, (kind, option) in _TRAIN_OPTIONS.items()
    ]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> None:
        opts = {name: kwargs.pop(name) for name in _TRAIN_OPTIONS}
        ctx = _setup(opts["threads"], opts["device"])
        config = _config(
            steps=opts["steps"],
            batch_size=opts["batch_size"],
            grad_accum=opts["grad_accum"],
            seq_len=opts["seq_len"],
            lr=opts["lr"],
            warmup_steps=min(opts["warmup"], opts["steps"]),
            checkpoint_every=opts["checkpoint_every"],
            trace_every=opts["trace_every"],
            val_max_tokens=opts["val_tokens"],
            seed=opts["seed"],
            device=opts["device"],
            resume=opts["resume"],
        )
        fn(**kwargs, training=Training(config, ctx))

    hints = {k: v for k, v in typing.get_type_hints(fn).items() if k not in ("training", "return")}
    command.__annotations__ = {**hints, **{n: k for n, (k, _) in _TRAIN_OPTIONS.items()}, "return": None}
    command.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in own] + added
    )
    del command.__wrapped__  # typer must read the new signature, not the original one
    return command


def _config(**kw: Any) -> Any:
    from lmshrink.distillation.trainer import TrainConfig

    return TrainConfig(**kw)


def _setup(threads: int | None, device: str | None) -> Any:
    import torch

    from lmshrink.distillation.ddp import init_distributed

    if threads is not None:
        if threads < 1:
            raise LmshrinkError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return init_distributed(device)


def _parse_layer_map(text: str | None) -> list[tuple[int, int]] | None:
    """``'0:1,1:3'`` -> ``[(0, 1), (1, 3)]``."""
    if text is None:
        return None
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise LmshrinkError(f"--layer-map must be student:teacher pairs such as 0:1,1:3, got {text!r}")
    return [(p[0], p[1]) for p in pairs]


def _val_text(val: str) -> str | None:
    from lmshrink.distillation.teacher import load_corpus

    return None if val.lower() == "none" else load_corpus(val, "validation")


def _save(model: Any, tokenizer: Any, out: Path) -> Path:
    from lmshrink.models import save_model

    return save_model(model, out, tokenizer)


def print_trace(trace: list[dict[str, float]], title: str) -> None:
    """The epoch trace as a table (the seed's "Training Trace - Epoch by Epoch")."""
    table = Table(title=title, header_style="bold")
    cols = [
        c
        for c in ("epoch", "step", "loss", "accuracy", "val_ppl", "val_accuracy", "tokens_per_s")
        if trace and c in trace[0]
    ]
    for c in cols:
        table.add_column(c, justify="right")
    for row in trace:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    console.print(table)


@app.command("train")
@training_options
def train_command(
    out: Path = typer.Option(..., "--out", help="Output directory (model, tokenizer, checkpoint, trace)."),
    data: str = typer.Option("wikitext103", help="Training corpus name (split 'train') or a text file."),
    val: str = _VAL,
    hidden: int = typer.Option(256, help="Hidden size."),
    layers: int = typer.Option(4, help="Transformer blocks."),
    heads: int = typer.Option(4, help="Attention heads."),
    kv_heads: int | None = typer.Option(None, help="Key/value heads (GQA; default: = heads)."),
    intermediate: int | None = typer.Option(None, help="MLP width (default 8/3 x hidden)."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size when training a tokenizer."),
    tokenizer: str | None = typer.Option(None, help="Existing tokenizer (directory or model spec) to use."),
    max_train_tokens: int | None = typer.Option(None, help="Use only the first N training tokens."),
    training: Training | None = None,
) -> None:
    """Train a Llama-style causal LM from scratch on a text corpus (a BPE tokenizer is trained when none is given)."""
    from transformers import AutoTokenizer

    from lmshrink.distillation.teacher import load_corpus, train_teacher

    assert training is not None  # given by @training_options
    ctx, cfg = training.ctx, training.config
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    model, tok, result = train_teacher(
        load_corpus(data, "train"),
        out_dir=out,
        config=cfg,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab_size,
        tokenizer=tok,
        val_text=_val_text(val),
        max_train_tokens=max_train_tokens,
    )
    if ctx.is_main:
        path = _save(model, tok, out / "model")
        print_trace(
            result.trace, f"train: {result.parameters:,} parameters, {result.tokens_per_s:.0f} tokens/s"
        )
        console.print(f"model saved to {path}", markup=False)


@app.command("distill")
@training_options
def distill_command(
    teacher: str = typer.Option(..., help="Teacher model spec (directory, reference name, hub id)."),
    out: Path = typer.Option(..., "--out", help="Output directory (student model, checkpoint, trace)."),
    student_layers: int | None = typer.Option(None, help="Student blocks (default: half the teacher's)."),
    layer_ids: str | None = typer.Option(
        None, help="Teacher layers to copy, e.g. '0,2,4' (overrides the default)."
    ),
    student_hidden: int | None = typer.Option(None, help="Student hidden size (default: the teacher's)."),
    student_heads: int | None = typer.Option(None, help="Student attention heads."),
    student_intermediate: int | None = typer.Option(None, help="Student MLP width."),
    init: str = typer.Option("teacher", help="'teacher' (copied/truncated weights) or 'random'."),
    data: str = typer.Option("wikitext103", help="Training corpus name (split 'train') or a text file."),
    val: str = _VAL,
    alpha: float = typer.Option(0.5, help="Weight of the distillation loss, in [0, 1] (0: no teacher)."),
    temperature: float = typer.Option(2.0, help="Softmax temperature of the distillation loss (> 0)."),
    soft_labels: Path | None = typer.Option(
        None, help="Soft-label directory: used when present, else generated."
    ),
    top_k: int = typer.Option(32, help="Teacher tokens stored per position in generated soft labels."),
    max_train_tokens: int | None = typer.Option(None, help="Use only the first N training tokens."),
    hidden_weight: float = typer.Option(
        0.0, help="Weight of the hidden-state loss (online teacher; projected when widths differ)."
    ),
    hidden_loss: str = typer.Option("mse", help="Hidden-state loss: 'mse' or 'cosine'."),
    attention_weight: float = typer.Option(0.0, help="Weight of the attention-map loss (online teacher)."),
    layer_map: str | None = typer.Option(
        None,
        help="Student:teacher layer pairs for the hidden/attention losses, e.g. '0:1,1:3' "
        "(default: each student layer faces the last teacher layer of its span).",
    ),
    training: Training | None = None,
) -> None:
    """Distil a smaller student (fewer layers / narrower) from a causal-LM teacher: online, or from soft labels."""
    from lmshrink.distillation.losses import check_alpha, check_temperature
    from lmshrink.distillation.soft_labels import SoftLabels
    from lmshrink.distillation.student import make_student
    from lmshrink.distillation.teacher import load_corpus, tokenize_text
    from lmshrink.distillation.trainer import train_lm
    from lmshrink.models import load_model

    check_alpha(alpha)
    check_temperature(temperature)
    if init not in ("teacher", "random"):
        raise LmshrinkError(f"--init must be 'teacher' or 'random', got {init!r}")
    ids_list = None
    if layer_ids:
        try:
            ids_list = [int(x) for x in layer_ids.split(",") if x.strip()]
        except ValueError as exc:
            raise LmshrinkError(
                f"--layer-ids must be comma-separated integers such as 0,2,4, got {layer_ids!r}"
            ) from exc
    assert training is not None  # given by @training_options
    ctx = training.ctx
    pairs = _parse_layer_map(layer_map)
    if hidden_loss not in ("mse", "cosine"):
        raise LmshrinkError(f"--hidden-loss must be 'mse' or 'cosine', got {hidden_loss!r}")
    intermediate = hidden_weight > 0 or attention_weight > 0
    if intermediate and soft_labels is not None:
        raise LmshrinkError(
            "--hidden-weight / --attention-weight need the live teacher; drop --soft-labels (they hold only the "
            "teacher's output distribution)"
        )
    cfg = _config(
        **{
            **training.config.model_dump(),
            "hidden_weight": hidden_weight,
            "hidden_loss": hidden_loss,
            "attention_weight": attention_weight,
            "layer_map": pairs,
        }
    )
    seed, seq_len = cfg.seed, cfg.seq_len
    t_model, tok = load_model(teacher, device=str(ctx.device), task="causal-lm")
    if tok is None:
        raise LmshrinkError(
            f"teacher {teacher!r} has no tokenizer; the student must use the teacher's tokenizer"
        )
    student = make_student(
        t_model,
        num_layers=student_layers,
        layer_ids=ids_list,
        num_heads=student_heads,
        hidden_size=student_hidden,
        intermediate_size=student_intermediate,
        init=init,  # type: ignore[arg-type]
        seed=seed,
    )
    ids = tokenize_text(tok, load_corpus(data, "train"))
    if max_train_tokens is not None:
        ids = ids[:max_train_tokens]
    vt = _val_text(val)
    val_ids = tokenize_text(tok, vt) if vt else None
    labels = None
    if soft_labels is not None and alpha > 0:
        from lmshrink.distillation.ddp import barrier

        if not (soft_labels / "header.json").is_file() and ctx.is_main:
            SoftLabels.generate(t_model, ids, soft_labels, top_k=top_k, seq_len=seq_len)
        barrier(ctx)
        labels = SoftLabels.open(soft_labels)
    result = train_lm(
        student,
        ids,
        cfg,
        out,
        val_ids=val_ids,
        teacher=t_model if labels is None and (alpha > 0 or intermediate) else None,
        soft_labels=labels,
        alpha=alpha,
        temperature=temperature,
    )
    if ctx.is_main:
        path = _save(student, tok, out / "model")
        print_trace(
            result.trace, f"distill ({result.distillation}): student {result.parameters:,} parameters"
        )
        console.print(f"student saved to {path}", markup=False)
