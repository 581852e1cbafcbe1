"""Training loops: the lab's ``distill_model`` over any dataloader, and ``train_lm``, the real training system for
causal LMs (AdamW, warm-up + cosine schedule, clipping, accumulation, bf16 autocast on GPU, seeded batch order,
atomic checkpoints with exact resume, NaN stop, DDP, progress bar and the seed's epoch trace).

>>> result = train_lm(model, ids, TrainConfig(steps=200, batch_size=16, seq_len=128), "runs/teacher")  # doctest: +SKIP
>>> result.trace[-1]["val_ppl"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmshrink.distillation import ddp
from lmshrink.distillation.checkpoint import load_checkpoint, save_checkpoint
from lmshrink.distillation.losses import (
    IntermediateLoss,
    build_intermediate_loss,
    causal_lm_cross_entropy,
    check_alpha,
    check_temperature,
    combine_losses,
    compute_distillation_loss,
    topk_distillation_loss,
)
from lmshrink.distillation.soft_labels import SoftLabels, make_blocks
from lmshrink.distillation.student import check_vocab
from lmshrink.errors import LmshrinkError, NumericsError
from lmshrink.models.arch import count_parameters
from lmshrink.utils.env import provenance
from lmshrink.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _logits(model: nn.Module, **inputs: Tensor) -> Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


# --------------------------------------------------------------------------------------------- the lab's loop


def distillation_objective(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    alpha: float,
    temperature: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``alpha x KD + (1 - alpha) x CE`` for a causal-LM batch (logits ``(B, T, V)``, next-token labels) or a
    classification batch (logits ``(B, C)``, class labels). Returns the loss and its parts as floats
    (``loss_ce``, ``loss_kd``, ``correct``, ``count`` for accuracy)."""
    a = check_alpha(alpha)
    if student_logits.dim() == 3:
        ce = causal_lm_cross_entropy(student_logits, labels, mask)
        kd_mask = mask
        with torch.no_grad():
            pred = student_logits[:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            valid = tgt != -100 if mask is None else (tgt != -100) & (mask[:, 1:] != 0)
            correct = int(((pred == tgt) & valid).sum())
            count = int(valid.sum())
    else:
        ce = F.cross_entropy(student_logits.float(), labels)
        kd_mask = None
        correct = int((student_logits.argmax(-1) == labels).sum())
        count = int(labels.numel())
    if teacher_logits is not None and a > 0:
        kd = compute_distillation_loss(student_logits, teacher_logits, temperature, kd_mask)
    else:
        if a > 0:
            raise LmshrinkError("alpha > 0 needs teacher logits (a teacher or soft labels)")
        kd = torch.zeros((), device=student_logits.device)
    loss = combine_losses(kd, ce, a)
    return loss, {
        "loss_ce": float(ce.detach()),
        "loss_kd": float(kd.detach()),
        "correct": correct,
        "count": count,
    }


def distill_model(
    teacher: nn.Module,
    student: nn.Module,
    dataloader: Iterable[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    alpha: float,
    temperature: float,
    epochs: int,
    device: str | torch.device | None = None,
    max_grad_norm: float | None = None,
    progress: bool = False,
    hidden_weight: float = 0.0,
    hidden_loss: str = "mse",
    attention_weight: float = 0.0,
    layer_map: list[tuple[int, int]] | list[list[int]] | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` to imitate ``teacher`` (the lab's Exercise 3): per batch, the teacher's logits (no grad),
    the student's logits, ``alpha x KD(T) + (1 - alpha) x CE(labels)``, backward, optimizer step.

    Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (next-token ids for causal LMs, class
    ids for sequence classification), optionally ``teacher_logits`` (precomputed soft labels: the teacher is then
    not run for the logit loss). Returns the per-epoch trace ``[{epoch, loss, loss_ce, loss_kd, accuracy}]``.

    ``hidden_weight`` / ``attention_weight`` > 0 add the intermediate terms of :class:`IntermediateLoss`
    (``hidden_loss`` "mse" or "cosine", ``layer_map`` pairs of (student layer, teacher layer)); the learned
    projections (widths that differ) are added to ``optimizer`` as a new parameter group.

    >>> trace = distill_model(teacher, student, loader, torch.optim.AdamW(student.parameters()),
    ...                       alpha=0.5, temperature=2.0, epochs=3)  # doctest: +SKIP
    """
    check_alpha(alpha)
    check_temperature(temperature)
    if epochs < 1:
        raise LmshrinkError(f"epochs must be >= 1, got {epochs}")
    check_vocab(teacher, student)
    dev = torch.device(device) if device is not None else next(student.parameters()).device
    inter = build_intermediate_loss(teacher, student, hidden_weight, hidden_loss, attention_weight, layer_map)
    extra_kw: dict[str, bool] = {}
    if inter is not None:
        inter.to(dev)
        extra_kw = inter.forward_kwargs()
        params = [p for p in inter.parameters() if p.requires_grad]
        if params:
            optimizer.add_param_group({"params": params})
    teacher.eval()
    student.train()
    trace: list[dict[str, float]] = []
    for epoch in range(1, epochs + 1):
        sums = {"loss": 0.0, "loss_ce": 0.0, "loss_kd": 0.0, "correct": 0.0, "count": 0.0, "batches": 0.0}
        for batch in tqdm(dataloader, desc=f"distil epoch {epoch}", disable=not progress, leave=False):
            ids = batch["input_ids"].to(dev)
            mask = batch.get("attention_mask")
            mask = mask.to(dev) if mask is not None else torch.ones_like(ids)
            labels = batch["labels"].to(dev)
            t_logits = batch.get("teacher_logits")
            t_out = None
            if inter is not None or (alpha > 0 and t_logits is None):
                # alpha = 0 without intermediate terms is plain fine-tuning: the teacher is not run
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, attention_mask=mask, **extra_kw)
                if t_logits is None:
                    t_logits = t_out.logits if hasattr(t_out, "logits") else t_out[0]
            if t_logits is not None:
                t_logits = t_logits.to(dev)
            s_out = student(input_ids=ids, attention_mask=mask, **extra_kw)
            s_logits = s_out.logits if hasattr(s_out, "logits") else s_out[0]
            loss, parts = distillation_objective(
                s_logits, t_logits if alpha > 0 else None, labels, alpha, temperature, mask
            )
            if inter is not None:
                extra, inter_parts = inter(s_out, t_out, mask)
                loss = loss + extra
                for key, value in inter_parts.items():
                    sums[key] = sums.get(key, 0.0) + value
            if not torch.isfinite(loss):
                raise NumericsError(
                    f"distillation loss became {float(loss)} in epoch {epoch}; lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm
                )
            optimizer.step()
            sums["loss"] += float(loss.detach())
            sums["batches"] += 1
            for key in ("loss_ce", "loss_kd", "correct", "count"):
                sums[key] += parts[key]
        if sums["batches"] == 0:
            raise LmshrinkError("the dataloader yielded no batches; give it some data")
        n = sums["batches"]
        row = {
            "epoch": epoch,
            "loss": sums["loss"] / n,
            "loss_ce": sums["loss_ce"] / n,
            "loss_kd": sums["loss_kd"] / n,
            "accuracy": sums["correct"] / max(sums["count"], 1.0),
        }
        row.update({k: sums[k] / n for k in ("loss_hidden", "loss_attention") if k in sums})
        trace.append(row)
        log.info("epoch %d: %s", epoch, trace[-1])
    return trace


# --------------------------------------------------------------------------------------------- train_lm


class TrainConfig(BaseModel):
    """Hyper-parameters of :func:`train_lm` (unknown keys are an error).

    ``batch_size`` is the micro-batch of one process; the global batch is ``batch_size x grad_accum x processes``
    blocks of ``seq_len`` tokens. An epoch is one pass over the blocks; ``trace_every`` adds trace rows between
    epoch ends (``None``: one row per epoch plus the last step).

    ``hidden_weight`` / ``attention_weight`` > 0 add hidden-state (``hidden_loss``: "mse" or "cosine", with a learned
    projection when widths differ) and attention-map terms between the ``layer_map`` pairs (student layer, teacher
    layer; default: each student layer faces the last teacher layer of its span); they need the live teacher.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)
    trace_every: int | None = Field(None, ge=1)
    val_max_tokens: int | None = Field(65536, ge=2)
    val_batch_size: int = Field(16, ge=1)
    device: str | None = None
    bf16: bool = True
    progress: bool = True
    resume: bool = True
    # intermediate distillation terms (online teacher only; see lmshrink.distillation.losses.IntermediateLoss)
    hidden_weight: float = Field(0.0, ge=0)
    hidden_loss: Literal["mse", "cosine"] = "mse"
    attention_weight: float = Field(0.0, ge=0)
    layer_map: list[tuple[int, int]] | None = None


class TrainResult(BaseModel):
    """What :func:`train_lm` produced: the epoch trace, throughput, and where the files are."""

    trace: list[dict[str, float]]
    final_loss: float
    steps: int
    tokens: int
    tokens_per_s: float
    train_seconds: float
    parameters: int
    world_size: int
    resumed_from_step: int | None
    alpha: float
    temperature: float
    distillation: str
    out_dir: str
    config: dict[str, Any]
    provenance: dict[str, Any]


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to ``min_lr_ratio``.

    >>> cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0)
    >>> lr_at(0, cfg), lr_at(9, cfg), round(lr_at(99, cfg), 4)
    (0.1, 1.0, 0.0003)
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def steps_for_epochs(n_blocks: int, epochs: float, config: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps that make ``epochs`` passes over ``n_blocks`` blocks, with the loop's own definition of an
    epoch (``n_blocks // global batch`` full steps; the partial last batch is dropped). Rounding up with a partial
    batch instead adds a step past the epoch end, i.e. a spurious extra trace row (epoch 1.0111, step 91 of 90).

    >>> steps_for_epochs(1451, 1, TrainConfig(batch_size=16)), steps_for_epochs(1451, 2.5, TrainConfig(batch_size=16))
    (90, 225)
    """
    per_epoch = n_blocks // (config.batch_size * config.grad_accum * world_size)
    if per_epoch < 1:
        raise LmshrinkError(
            f"{n_blocks} blocks are fewer than one global batch "
            f"({config.batch_size * config.grad_accum * world_size} blocks); give more text or a smaller batch"
        )
    return max(round(epochs * per_epoch), 1)


def _epoch_order(n_blocks: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused AdamW: one kernel per step instead of ~10 per tensor (matters on busy CPUs and on GPUs)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def _autocast(device: torch.device, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and config.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_blocks(
    model: nn.Module,
    blocks: Tensor,
    batch_size: int = 16,
    device: torch.device | None = None,
    bf16: bool = True,
) -> dict[str, float]:
    """Mean next-token NLL, perplexity and top-1 accuracy over ``(n, seq_len)`` blocks (no overlap, each block
    scored from its second token)."""
    dev = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if dev.type == "cuda" and bf16
        else contextlib.nullcontext()
    )
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start : start + batch_size].to(dev)
        with ctx:
            logits = _logits(model, input_ids=x)
        lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        tgt = x[:, 1:]
        nll -= float(lp.gather(-1, tgt.unsqueeze(-1)).sum())
        correct += int((lp.argmax(-1) == tgt).sum())
        count += tgt.numel()
    model.train(was_training)
    mean = nll / max(count, 1)
    return {
        "nll": mean,
        "ppl": math.exp(min(mean, 50.0)),
        "accuracy": correct / max(count, 1),
        "tokens": count,
    }


def trace_table(trace: list[dict[str, float]]) -> str:
    """The epoch trace as CSV text (columns from the first row)."""
    if not trace:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(trace[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(trace)
    return buf.getvalue()


class _Loop:
    """State of one :func:`train_lm` run (kept small: the step function and the bookkeeping around it)."""

    def __init__(
        self,
        model: nn.Module,
        blocks: Tensor,
        config: TrainConfig,
        ctx: ddp.DistContext,
        teacher: nn.Module | None,
        soft_labels: SoftLabels | None,
        alpha: float,
        temperature: float,
        inter: IntermediateLoss | None = None,
    ) -> None:
        self.config, self.ctx = config, ctx
        self.inter = inter
        self.base = model
        self.model = ddp.wrap_model(model, ctx)
        self.blocks = blocks
        self.teacher, self.soft, self.alpha, self.temperature = teacher, soft_labels, alpha, temperature
        self.global_batch = config.batch_size * config.grad_accum * ctx.world_size
        self.steps_per_epoch = blocks.shape[0] // self.global_batch
        if self.steps_per_epoch == 0:
            raise LmshrinkError(
                f"the data has {blocks.shape[0]} blocks of {config.seq_len} tokens, fewer than one global batch "
                f"({self.global_batch} blocks); give more text or lower batch_size/grad_accum"
            )
        self.optimizer = _make_optimizer(model, config)
        self.extra_params = [p for p in inter.parameters() if p.requires_grad] if inter is not None else []
        if self.extra_params:  # learned projections of the hidden-state loss, trained alongside (no decay)
            self.optimizer.add_param_group({"params": self.extra_params, "weight_decay": 0.0})
        self.step = 0
        self.trace: list[dict[str, float]] = []
        self.acc = {"loss": 0.0, "micro": 0.0, "correct": 0.0, "count": 0.0, "tokens": 0.0, "seconds": 0.0}
        self.tokens_total = 0
        self.seconds_total = 0.0
        self._order: tuple[int, Tensor] | None = None

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "trace": self.trace,
            "acc": self.acc,
            "tokens_total": self.tokens_total,
            "seconds_total": self.seconds_total,
            "config": self.config.model_dump(),
            "world_size": self.ctx.world_size,
        }

    def restore(self, state: dict[str, Any]) -> None:
        skip = ("progress", "resume", "device")
        now = {k: v for k, v in self.config.model_dump().items() if k not in skip}
        # fields added after a checkpoint was written count as their defaults
        fields = TrainConfig.model_fields
        saved = {k: state["config"].get(k, fields[k].default) for k in now}
        saved = TrainConfig(**saved).model_dump(include=set(now))
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise LmshrinkError(
                f"the checkpoint was written with a different training config (differs in {', '.join(diff)}); "
                "use the same settings to resume, or another --out / resume=False to start afresh"
            )
        if state["world_size"] != self.ctx.world_size:
            log.warning("resuming on %d processes (checkpoint: %d)", self.ctx.world_size, state["world_size"])
        self.step = int(state["step"])
        self.trace = list(state["trace"])
        self.acc = dict(state["acc"])
        self.tokens_total = int(state["tokens_total"])
        self.seconds_total = float(state["seconds_total"])

    def rows(self, step: int, micro: int) -> Tensor:
        """Block rows of this process for micro-batch ``micro`` of optimizer step ``step``."""
        epoch = step // self.steps_per_epoch
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, _epoch_order(self.blocks.shape[0], self.config.seed, epoch))
        within = step % self.steps_per_epoch
        b = self.config.batch_size
        start = within * self.global_batch + (micro * self.ctx.world_size + self.ctx.rank) * b
        return self._order[1][start : start + b]

    def micro_step(self, rows: Tensor, sync: bool) -> tuple[float, int, int]:
        dev = self.ctx.device
        x = self.blocks[rows].to(dev)
        teacher_logits = None
        t_out = None
        kw = self.inter.forward_kwargs() if self.inter is not None else {}
        with _autocast(dev, self.config):
            if self.teacher is not None and (self.alpha > 0 or self.inter is not None):
                with torch.no_grad():
                    t_out = self.teacher(input_ids=x, **kw)
                    teacher_logits = t_out.logits if hasattr(t_out, "logits") else t_out[0]
            with ddp.no_sync(self.model, skip=not sync):
                s_out = self.model(input_ids=x, **kw)
                logits = s_out.logits if hasattr(s_out, "logits") else s_out[0]
                if self.soft is not None and self.alpha > 0:
                    probs, idx, rest = (t.to(dev) for t in self.soft.batch(rows.tolist()))
                    kd = topk_distillation_loss(
                        logits, probs, idx, rest, self.temperature, stored_temperature=self.soft.temperature
                    )
                    ce = causal_lm_cross_entropy(logits, x)
                    loss = combine_losses(kd, ce, self.alpha)
                    with torch.no_grad():
                        correct = int((logits[:, :-1].argmax(-1) == x[:, 1:]).sum())
                    count = x[:, 1:].numel()
                else:
                    loss, parts = distillation_objective(
                        logits, teacher_logits if self.alpha > 0 else None, x, self.alpha, self.temperature
                    )
                    correct, count = int(parts["correct"]), int(parts["count"])
                if self.inter is not None:
                    loss = loss + self.inter(s_out, t_out)[0]
                (loss / self.config.grad_accum).backward()
        return float(loss.detach()), correct, count

    def optimizer_step(self, checkpoint_dir: Path) -> float:
        cfg = self.config
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum, correct, count = 0.0, 0, 0
        for micro in range(cfg.grad_accum):
            loss, c, n = self.micro_step(self.rows(self.step, micro), sync=micro == cfg.grad_accum - 1)
            loss_sum += loss
            correct += c
            count += n
        stats = torch.tensor(
            [loss_sum, float(cfg.grad_accum), float(correct), float(count)], dtype=torch.float64
        )
        ddp.all_reduce_sum(stats, self.ctx)
        mean_loss = float(stats[0] / stats[1])
        if self.extra_params and self.ctx.world_size > 1:
            # DDP averages the student's gradients; the projections live outside it: average them here
            for p in self.extra_params:
                if p.grad is not None:
                    ddp.all_reduce_sum(p.grad, self.ctx)
                    p.grad /= self.ctx.world_size
        params = [p for p in self.base.parameters() if p.requires_grad] + self.extra_params
        grad_norm = nn.utils.clip_grad_norm_(
            params, cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        )
        if not (math.isfinite(mean_loss) and math.isfinite(float(grad_norm))):
            last = checkpoint_dir if (checkpoint_dir / "state.json").is_file() else None
            raise NumericsError(
                f"training loss became {mean_loss} (gradient norm {float(grad_norm)}) at step {self.step + 1}; "
                + (
                    f"the last good checkpoint is kept in {last}; "
                    if last
                    else "no checkpoint was written yet; "
                )
                + "lower the learning rate or enable gradient clipping"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = self.global_batch * cfg.seq_len
        self.tokens_total += tokens
        self.seconds_total += dt
        for key, value in (
            ("loss", float(stats[0])),
            ("micro", float(stats[1])),
            ("correct", float(stats[2])),
            ("count", float(stats[3])),
            ("tokens", float(tokens)),
            ("seconds", dt),
        ):
            self.acc[key] += value
        return mean_loss

    def trace_due(self) -> bool:
        cfg = self.config
        if self.step == cfg.steps:
            return True
        if cfg.trace_every is not None:
            return self.step % cfg.trace_every == 0
        return self.step % self.steps_per_epoch == 0

    def add_trace_row(self, val_blocks: Tensor | None) -> dict[str, float]:
        a = self.acc
        row: dict[str, float] = {
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "step": self.step,
            "loss": a["loss"] / max(a["micro"], 1.0),
            "accuracy": a["correct"] / max(a["count"], 1.0),
        }
        if val_blocks is not None:
            ev = evaluate_blocks(
                self.base, val_blocks, self.config.val_batch_size, self.ctx.device, self.config.bf16
            )
            row.update(val_loss=ev["nll"], val_ppl=ev["ppl"], val_accuracy=ev["accuracy"])
        row.update(
            lr=lr_at(self.step - 1, self.config),
            tokens=self.tokens_total,
            tokens_per_s=a["tokens"] / max(a["seconds"], 1e-9),
        )
        self.trace.append(row)
        self.acc = {k: 0.0 for k in self.acc}
        return row


def _check_soft_labels(
    soft: SoftLabels, blocks: Tensor | None, config: TrainConfig, model: nn.Module
) -> Tensor:
    from lmshrink.distillation.student import vocab_size_of

    if soft.header["seq_len"] != config.seq_len:
        raise LmshrinkError(
            f"soft labels were made with seq_len={soft.header['seq_len']}, training uses seq_len={config.seq_len}"
        )
    if soft.vocab_size != vocab_size_of(model):
        raise LmshrinkError(
            f"soft labels cover a vocabulary of {soft.vocab_size} tokens, the student has {vocab_size_of(model)}; "
            "teacher and student must share the tokenizer"
        )
    stored = soft.blocks()
    if blocks is not None and not torch.equal(blocks, stored):
        raise LmshrinkError(
            "train_ids differ from the tokens the soft labels were generated on; regenerate them"
        )
    return stored


def train_lm(
    model: nn.Module,
    train_ids: Tensor | None,
    config: TrainConfig,
    out_dir: str | Path,
    val_ids: Tensor | None = None,
    teacher: nn.Module | None = None,
    soft_labels: SoftLabels | str | Path | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> TrainResult:
    """Train a causal LM on a 1-D token stream, optionally distilling from a ``teacher`` run alongside (online)
    or from stored ``soft_labels`` (``alpha`` weighs KD against next-token cross-entropy; neither given: plain
    language-model training). Writes ``out_dir/checkpoint`` (every ``checkpoint_every`` steps and at the end),
    ``trace.json``, ``trace.csv`` and ``result.json``; resumes exactly from an existing checkpoint.

    >>> cfg = TrainConfig(steps=300, batch_size=16, seq_len=128, checkpoint_every=100)
    >>> res = train_lm(student, ids, cfg, "runs/student", teacher=teacher, alpha=0.5, temperature=2.0)  # doctest: +SKIP
    """
    a = check_alpha(alpha)
    t = check_temperature(temperature)
    if teacher is not None and soft_labels is not None:
        raise LmshrinkError("give either a teacher (online distillation) or soft_labels (offline), not both")
    wants_inter = config.hidden_weight > 0 or config.attention_weight > 0
    if wants_inter and teacher is None:
        raise LmshrinkError(
            "hidden_weight / attention_weight need the live teacher (teacher=...): stored soft labels hold only "
            "the teacher's output distribution"
        )
    soft = SoftLabels.open(soft_labels) if isinstance(soft_labels, str | Path) else soft_labels
    ctx = ddp.current_context(config.device)
    blocks = make_blocks(train_ids, config.seq_len) if train_ids is not None else None
    if soft is not None:
        blocks = _check_soft_labels(soft, blocks, config, model)
    if blocks is None:
        raise LmshrinkError("train_lm needs train_ids (or soft_labels that carry their tokens)")
    if teacher is not None:
        check_vocab(teacher, model)
        teacher.to(ctx.device).eval()
    with torch.random.fork_rng(
        devices=[]
    ):  # projections initialised from the run's seed, global RNG untouched
        torch.manual_seed(config.seed)
        inter = (
            build_intermediate_loss(
                teacher,
                model,
                config.hidden_weight,
                config.hidden_loss,
                config.attention_weight,
                config.layer_map,
            )
            if teacher is not None
            else None
        )
    mode = (
        "online"
        if teacher is not None and (a > 0 or inter is not None)
        else "soft-labels"
        if soft is not None and a > 0
        else "none"
    )
    if mode == "none":
        a = 0.0
    torch.manual_seed(config.seed)
    model.to(ctx.device).train()
    val_blocks = None
    if val_ids is not None:
        vids = val_ids[: config.val_max_tokens] if config.val_max_tokens else val_ids
        val_blocks = make_blocks(vids, config.seq_len)
    if inter is not None:
        inter.to(ctx.device)
    loop = _Loop(model, blocks, config, ctx, teacher, soft, a, t, inter)
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    resumed = None
    if config.resume and (ckpt / "state.json").exists():
        loop.restore(load_checkpoint(ckpt, model, loop.optimizer, extra=inter))
        resumed = loop.step
        log.info("resumed from %s at step %d", ckpt, loop.step)
    bar = tqdm(
        total=config.steps, initial=loop.step, desc="train", disable=not (config.progress and ctx.is_main)
    )
    last_loss = float("nan")
    try:
        while loop.step < config.steps:
            last_loss = loop.optimizer_step(ckpt)
            bar.update(1)
            bar.set_postfix(
                loss=f"{last_loss:.3f}", tok_s=f"{loop.acc['tokens'] / max(loop.acc['seconds'], 1e-9):.0f}"
            )
            if loop.trace_due():
                row = loop.add_trace_row(val_blocks)
                log.info("step %d: %s", loop.step, row)
            due = config.checkpoint_every is not None and loop.step % config.checkpoint_every == 0
            if due or loop.step == config.steps:
                if ctx.is_main:
                    save_checkpoint(ckpt, loop.base, loop.optimizer, loop.state(), extra=inter)
                ddp.barrier(ctx)
    finally:
        bar.close()
    if math.isnan(last_loss) and loop.trace:
        last_loss = float(loop.trace[-1]["loss"])
    result = TrainResult(
        trace=loop.trace,
        final_loss=last_loss,
        steps=loop.step,
        tokens=loop.tokens_total,
        tokens_per_s=loop.tokens_total / max(loop.seconds_total, 1e-9),
        train_seconds=loop.seconds_total,
        parameters=count_parameters(model),
        world_size=ctx.world_size,
        resumed_from_step=resumed,
        alpha=a,
        temperature=t,
        distillation=mode,
        out_dir=str(out),
        config=config.model_dump(),
        provenance=provenance(
            ctx.device, torch.bfloat16 if ctx.device.type == "cuda" and config.bf16 else None
        ),
    )
    if ctx.is_main:
        atomic_write_json(out / "trace.json", loop.trace)
        atomic_write_text(out / "trace.csv", trace_table(loop.trace))
        atomic_write_json(out / "result.json", result.model_dump())
    return result


def iterate_blocks(blocks: Tensor, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """Causal-LM batches for :func:`distill_model` from ``(n, seq_len)`` blocks: labels are the inputs."""
    for start in range(0, blocks.shape[0], batch_size):
        x = blocks[start : start + batch_size]
        yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
