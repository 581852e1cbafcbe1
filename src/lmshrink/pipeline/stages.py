"""Built-in stage functions: each is a small adapter from a stage config to the library's APIs.

A stage function gets a :class:`~lmshrink.pipeline.runner.StageContext` and its config, writes into
``ctx.out_dir`` (a model goes to ``out_dir/model`` via :func:`lmshrink.models.save_model`) and returns the
JSON-able results that the runner stores as ``results.json``. Model stages return ``{"model": {...size...}}``;
training stages add ``"trace"`` (per-epoch rows), pruning adds ``"layer_sparsity"``, sensitivity ``"plan"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.errors import LmshrinkError
from lmshrink.models.arch import DEFAULT_SKIP
from lmshrink.pipeline.runner import StageContext, register_stage
from lmshrink.recipes import (
    DistillStage,
    EvaluateStage,
    PruneStage,
    QuantizeStage,
    SensitivityStage,
    SoftLabelsStage,
    TeacherStage,
    TextSource,
    TrainOptions,
)
from lmshrink.utils.io import atomic_write_json

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ helpers
def load_stage_model(ctx: StageContext, name: str) -> tuple[nn.Module, Any]:
    """Load the model that stage ``name`` saved."""
    from lmshrink.models import load_model

    return load_model(ctx.model_dir(name), device=ctx.device)


def save_stage_model(ctx: StageContext, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Save ``model`` as this stage's output and return its size record."""
    from lmshrink.evaluation import measure_size
    from lmshrink.models import save_model

    path = save_model(model, ctx.out_dir / "model", tokenizer)
    size = measure_size(model, path)
    return {
        "path": "model",
        "format": size.format,
        "parameters": size.parameters,
        "bytes_on_disk": size.bytes_on_disk,
        "bits_per_weight": size.disk_bits_per_weight or size.bits_per_weight,
    }


def corpus_ids(tokenizer: Any, source: TextSource) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(train ids, validation ids or None, the text) of a text source, tokenized without special tokens."""
    from lmshrink.data import load_text, tokenize_corpus

    text = load_text(source.data, split=source.split)
    if source.max_chars:
        text = text[: source.max_chars]
    ids = tokenize_corpus(tokenizer, text, add_special_tokens=False)
    n_val = int(ids.numel() * source.val_fraction)
    if n_val < 2:
        return ids, None, text
    return ids[:-n_val], ids[-n_val:], text


def train_config(opts: TrainOptions, n_tokens: int, seed: int, device: str) -> Any:
    """:class:`lmshrink.distillation.TrainConfig` for ``opts`` (epochs -> optimizer steps over ``n_tokens``, with
    the training loop's definition of an epoch: whole batches only)."""
    from lmshrink.distillation import TrainConfig
    from lmshrink.distillation.trainer import steps_for_epochs

    blocks = max(n_tokens // opts.seq_len, 1)
    fields: dict[str, Any] = {
        "steps": 1,
        "batch_size": opts.batch_size,
        "seq_len": opts.seq_len,
        "lr": opts.lr,
        "weight_decay": opts.weight_decay,
        "warmup_steps": 0,
        "grad_clip": opts.grad_clip,
        "seed": seed,
        "device": device,
        "progress": False,
        "checkpoint_every": 1,
        **opts.extra,
    }
    try:
        config = TrainConfig(**fields)
        steps = opts.max_steps or steps_for_epochs(blocks, opts.epochs, config)
        return config.model_copy(
            update={
                "steps": steps,
                "warmup_steps": min(opts.warmup_steps, max(steps - 1, 0)),
                "checkpoint_every": max(steps // 4, 1),
            }
        )
    except ValueError as exc:
        raise LmshrinkError(f"invalid training options {sorted(opts.extra)}: {exc}") from exc


def _trace(result: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in getattr(result, "trace", [])]


def _calibration(tokenizer: Any, data: str, n: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from lmshrink.data import calibration_batches

    return calibration_batches(tokenizer, data, n_samples=n, seq_len=seq_len, seed=seed)


# ------------------------------------------------------------------------------------------------ teacher
@register_stage("teacher")
def run_teacher(ctx: StageContext, cfg: TeacherStage) -> dict[str, Any]:
    """Load a model (optionally fine-tune it on SST-2) or train a Llama-style LM from scratch with a BPE tokenizer."""
    if cfg.model is not None:
        from lmshrink.models import load_model

        num_labels = 2 if cfg.finetune_data == "sst2" else None
        model, tok = load_model(
            cfg.model, dtype=cfg.dtype, device=ctx.device, task=cfg.task, num_labels=num_labels
        )
        out: dict[str, Any] = {"source": cfg.model}
        if cfg.finetune is not None:
            out["trace"] = finetune_classifier(model, tok, cfg.finetune, cfg.finetune_limit, ctx.recipe.seed)
        out["model"] = save_stage_model(ctx, model, tok)
        return out
    return _train_from_scratch(ctx, cfg)


def _train_from_scratch(ctx: StageContext, cfg: TeacherStage) -> dict[str, Any]:
    from lmshrink.data import load_text
    from lmshrink.distillation import build_llama, train_lm, train_tokenizer
    from lmshrink.models.load import load_tokenizer

    arch, opts = cfg.architecture, cfg.train
    assert arch is not None and opts is not None  # guaranteed by TeacherStage validation
    tok_dir = ctx.work_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tok = load_tokenizer(tok_dir)
    else:
        text = load_text(cfg.text.data, split=cfg.text.split)[: cfg.text.max_chars]
        tok = train_tokenizer(text, arch.vocab_size)
        tok.save_pretrained(tok_dir)
    if tok is None:
        raise LmshrinkError(f"no tokenizer found in {tok_dir}")
    train_ids, val_ids, _ = corpus_ids(tok, cfg.text)
    model = build_llama(
        vocab_size=len(tok),
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size or 4 * arch.hidden_size,
        max_position_embeddings=arch.max_position_embeddings or 4 * opts.seq_len,
        num_kv_heads=arch.num_kv_heads,
        seed=ctx.recipe.seed,
    )
    config = train_config(opts, train_ids.numel(), ctx.recipe.seed, ctx.device)
    result = train_lm(model, train_ids, config, ctx.work_dir / "train", val_ids=val_ids)
    model.eval()
    return {
        "model": save_stage_model(ctx, model, tok),
        "trace": _trace(result),
        "train": {
            "tokens": result.tokens,
            "steps": result.steps,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.train_seconds,
            "resumed_from_step": result.resumed_from_step,
            "train_tokens": int(train_ids.numel()),
            "val_tokens": int(val_ids.numel()) if val_ids is not None else 0,
        },
    }


def _sst2_loader(
    tok: Any, examples: list[tuple[str, int]], batch_size: int, seq_len: int, seed: int
) -> list[Any]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=gen).tolist()
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i : i + batch_size]]
        enc = tok(
            [t for t, _ in chunk], padding=True, truncation=True, max_length=seq_len, return_tensors="pt"
        )
        batches.append({**dict(enc), "labels": torch.tensor([y for _, y in chunk])})
    return batches


def finetune_classifier(
    model: nn.Module, tok: Any, opts: TrainOptions, limit: int | None, seed: int
) -> list[dict[str, Any]]:
    """Fine-tune a sequence classifier on SST-2 train (cross-entropy); returns the per-epoch trace."""
    from lmshrink.data import load_sst2

    examples = load_sst2("train", limit=limit)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    trace = []
    model.train()
    for epoch in range(1, max(int(opts.epochs), 1) + 1):
        total, correct, count, n = 0.0, 0, 0, 0
        for batch in _sst2_loader(tok, examples, opts.batch_size, opts.seq_len, seed + epoch):
            out = model(**{k: v for k, v in batch.items() if k != "labels"})
            loss = nn.functional.cross_entropy(out.logits, batch["labels"])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
            optim.step()
            total += float(loss)
            n += 1
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        trace.append({"epoch": epoch, "loss": total / max(n, 1), "accuracy": correct / max(count, 1)})
    model.eval()
    return trace


# ------------------------------------------------------------------------------------------------ soft labels
@register_stage("soft_labels")
def run_soft_labels(ctx: StageContext, cfg: SoftLabelsStage) -> dict[str, Any]:
    """Store the teacher's top-k next-token distributions over the training text."""
    from lmshrink.distillation import SoftLabels

    teacher, tok = load_stage_model(ctx, cfg.input)
    ids, _, _ = corpus_ids(tok, cfg.text)
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    labels = SoftLabels.generate(
        teacher, ids, ctx.out_dir / "soft_labels", top_k=cfg.top_k, seq_len=cfg.seq_len, progress=False
    )
    return {
        "soft_labels": {
            "path": "soft_labels",
            "blocks": len(labels),
            "top_k": cfg.top_k,
            "seq_len": cfg.seq_len,
            "bytes_on_disk": labels.bytes_on_disk(),
        }
    }


# ------------------------------------------------------------------------------------------------ distill
@register_stage("distill")
def run_distill(ctx: StageContext, cfg: DistillStage) -> dict[str, Any]:
    """Derive a student from the teacher and train it on soft labels (stored) or the live teacher."""
    from lmshrink.distillation import make_student, train_lm

    teacher, tok = load_stage_model(ctx, cfg.teacher)
    student = make_student(teacher, **cfg.student.model_dump(), seed=ctx.recipe.seed)
    if cfg.task == "sequence-classification":
        trace = _distill_classifier(teacher, student, tok, cfg, ctx.recipe.seed)
        return {"model": save_stage_model(ctx, student.eval(), tok), "trace": trace, "teacher": cfg.teacher}
    train_ids, val_ids, _ = corpus_ids(tok, cfg.text)
    soft = None
    if cfg.soft_labels is not None:
        soft = ctx.stage_dir(cfg.soft_labels) / "soft_labels"
        n_tokens = ctx.results(cfg.soft_labels)["soft_labels"]["blocks"] * cfg.train.seq_len
    else:
        n_tokens = train_ids.numel()
    config = train_config(cfg.train, n_tokens, ctx.recipe.seed, ctx.device)
    result = train_lm(
        student,
        None if soft is not None else train_ids,
        config,
        ctx.work_dir / "train",
        val_ids=val_ids,
        teacher=None if soft is not None else teacher,
        soft_labels=soft,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
    )
    student.eval()
    return {
        "model": save_stage_model(ctx, student, tok),
        "trace": _trace(result),
        "teacher": cfg.teacher,
        "train": {
            "tokens": result.tokens,
            "steps": result.steps,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.train_seconds,
            "distillation": result.distillation,
            "resumed_from_step": result.resumed_from_step,
        },
    }


def _distill_classifier(
    teacher: nn.Module, student: nn.Module, tok: Any, cfg: DistillStage, seed: int
) -> Any:
    from lmshrink.data import load_sst2
    from lmshrink.distillation import distill_model

    examples = load_sst2("train", limit=cfg.data_limit)
    loader = _sst2_loader(tok, examples, cfg.train.batch_size, cfg.train.seq_len, seed)
    optim = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return distill_model(
        teacher,
        student,
        loader,
        optim,
        cfg.alpha,
        cfg.temperature,
        max(int(cfg.train.epochs), 1),
        max_grad_norm=cfg.train.grad_clip,
    )


# ------------------------------------------------------------------------------------------------ plans
def read_plan(ctx: StageContext, plan: str) -> Any:
    """The :class:`lmshrink.sensitivity.Plan` of a sensitivity stage (by name) or of a ``sensitivity.json`` file."""
    from lmshrink.sensitivity import plan_from_json

    path = ctx.stage_dir(plan) / "sensitivity.json" if plan in ctx.fingerprints else Path(plan)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LmshrinkError(f"cannot read the plan {path}: {exc}") from exc
    return plan_from_json(doc)


def _exact(names: list[str]) -> list[str]:
    return [f"^{re.escape(n)}$" for n in names]


# ------------------------------------------------------------------------------------------------ prune
@register_stage("prune")
def run_prune(ctx: StageContext, cfg: PruneStage) -> dict[str, Any]:
    """Prune the input model with :func:`lmshrink.pruning.prune_model` (per layer when a plan is given)."""
    from lmshrink.pruning import prune_model
    from lmshrink.pruning.config import make_config

    model, tok = load_stage_model(ctx, cfg.input)
    cal = cfg.calibration
    base = {
        "method": cfg.method,
        "calib": cal.data,
        "n_samples": cal.n_samples,
        "seq_len": cal.seq_len,
        "seed": ctx.recipe.seed,
        **cfg.options,
    }
    if cfg.plan is None:
        runs = [make_config(**base, sparsity=cfg.sparsity)]
    else:
        plan = read_plan(ctx, cfg.plan)
        if plan.mode != "prune":
            raise LmshrinkError(
                f"stage {cfg.name!r}: plan {cfg.plan!r} is a {plan.mode} plan, not a prune plan"
            )
        runs = [
            make_config(**base, sparsity=s, targets=_exact(names))
            for s, names in plan.groups().items()
            if s > 0
        ]
    calibration = None
    if any(r.needs_calibration for r in runs):
        calibration = _calibration(tok, cal.data, cal.n_samples, cal.seq_len, ctx.recipe.seed)
    layer_sparsity: dict[str, float] = {}
    reports = []
    for run in runs:
        report = prune_model(model, run, calibration, progress=False)
        reports.append(report)
        layer_sparsity.update({r.name: r.sparsity for r in report.layers if r.shape})
    return {
        "model": save_stage_model(ctx, model, tok),
        "layer_sparsity": layer_sparsity,
        "sparsity": sum(r.sparsity for r in reports) / max(len(reports), 1),
        "parameters_before": reports[0].parameters_before if reports else None,
        "parameters_after": reports[-1].parameters_after if reports else None,
        "prune_seconds": sum(r.seconds for r in reports),
    }


# ------------------------------------------------------------------------------------------------ quantize
_HEAD_AND_EMBEDDING_SKIPS = (r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$")


@register_stage("quantize")
def run_quantize(ctx: StageContext, cfg: QuantizeStage) -> dict[str, Any]:
    """Quantize the input model with :func:`lmshrink.quantization.quantize_model` (per bit width with a plan)."""
    from lmshrink.quantization import QuantConfig, quantize_model

    model, tok = load_stage_model(ctx, cfg.input)
    cal = cfg.calibration
    base: dict[str, Any] = {
        "method": cfg.method,
        "calibration": {
            "dataset": cal.data,
            "n_samples": cal.n_samples,
            "seq_len": cal.seq_len,
            "seed": ctx.recipe.seed,
        },
        **cfg.options,
    }
    plan_info: dict[str, Any] | None = None
    if cfg.quantize_embeddings and "skip" not in base:  # the LM head too (options.skip still overrides)
        base["skip"] = [p for p in DEFAULT_SKIP if p not in _HEAD_AND_EMBEDDING_SKIPS]
    if cfg.plan is None:
        configs = [QuantConfig(**base, format=cfg.format, group_size=cfg.group_size)]
    else:
        plan = read_plan(ctx, cfg.plan)
        if plan.mode != "quantize":
            raise LmshrinkError(
                f"stage {cfg.name!r}: plan {cfg.plan!r} is a {plan.mode} plan, not a quantize plan"
            )
        group = cfg.group_size if cfg.group_size is not None else plan.group_size
        configs = [
            QuantConfig(**base, format=f"int{int(bits)}", group_size=group, targets=_exact(names))
            for bits, names in sorted(plan.groups().items())
            if bits < 16
        ]
        plan_info = {
            "average_bits": plan.average,
            "target": plan.target,
            "layers_per_bits": {f"{b:g}": len(n) for b, n in plan.groups().items()},
        }
    calibration = None
    if any(c.needs_calibration for c in configs):
        calibration = _calibration(tok, cal.data, cal.n_samples, cal.seq_len, ctx.recipe.seed)
    for i, config in enumerate(configs):
        # embeddings (and the tied LM head) once, with the first (widest-reaching) config
        quantize_model(model, config, calibration, embeddings=cfg.quantize_embeddings and i == 0)
    out: dict[str, Any] = {
        "model": save_stage_model(ctx, model, tok),
        "quant": [c.model_dump(mode="json") for c in configs],
    }
    if plan_info:
        out["plan"] = plan_info
    return out


# ------------------------------------------------------------------------------------------------ sensitivity
@register_stage("sensitivity")
def run_sensitivity(ctx: StageContext, cfg: SensitivityStage) -> dict[str, Any]:
    """Measure per-layer damage, make a plan for the target, and check it against uniform on held-out windows."""
    from lmshrink.sensitivity import make_plan, measure_sensitivity, plan_damage, plan_to_json, uniform_plan

    model, tok = load_stage_model(ctx, cfg.input)
    seed = ctx.recipe.seed
    calib = torch.cat([b["input_ids"] for b in _calibration(tok, cfg.data, cfg.n_windows, cfg.seq_len, seed)])
    sens = measure_sensitivity(
        model,
        calib,
        mode=cfg.mode,
        choices=cfg.choices,
        group_size=cfg.group_size,
        measure=cfg.measure,
        metric=cfg.metric,
    )
    sens.protocol = {"data": cfg.data, "n_windows": cfg.n_windows, "seq_len": cfg.seq_len, "seed": seed}
    plan = make_plan(sens, cfg.target)
    if cfg.validate_plan:
        held = torch.cat(
            [b["input_ids"] for b in _calibration(tok, cfg.data, cfg.n_windows, cfg.seq_len, seed + 1)]
        )
        measured: dict[str, Any] = {"plan": plan_damage(model, plan, held)}
        for c in sens.choices:
            if abs(c - cfg.target) < 1e-9:
                measured[f"uniform_{c:g}"] = plan_damage(model, uniform_plan(sens, c), held)
        measured["windows"] = (
            f"{cfg.n_windows} held-out windows of {cfg.seq_len} tokens ({cfg.data}, seed {seed + 1})"
        )
        plan.measured = measured
    doc = plan_to_json(sens, plan)
    atomic_write_json(ctx.out_dir / "sensitivity.json", doc)
    return {"sensitivity": doc["sensitivity"], "plan": doc["plan"]}


# ------------------------------------------------------------------------------------------------ evaluate
def _task(model: nn.Module) -> str:
    from lmshrink.models.save import task_of

    return task_of(model)


@torch.no_grad()
def count_nonzero_weights(model: nn.Module) -> int:
    """Nonzero weights: float parameters (tied ones once) and the decoded weights of packed layers (a pruned then
    quantized model keeps its zeros as zero codes). Equals the parameter count of a dense model, almost surely."""
    from lmshrink.quantization.linear import QuantLinear

    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            if getattr(mod, "tied_to", None) is None:  # a tied QuantEmbedding is its head's weight
                total += int(torch.count_nonzero(mod.dequantize_weight()))
            continue
        for p in mod.parameters(recurse=False):
            if id(p) not in seen and p.is_floating_point():
                seen.add(id(p))
                total += int(torch.count_nonzero(p))
    return total


@register_stage("evaluate")
def run_evaluate(ctx: StageContext, cfg: EvaluateStage) -> dict[str, Any]:
    """Measure every model with one protocol; per-model results are cached by model fingerprint and protocol."""
    names = cfg.models or []  # the recipe loader spells out the default (every earlier model)
    if not names:
        raise LmshrinkError(f"stage {cfg.name!r}: there is no model to evaluate; add a model stage before it")
    protocol = {
        "perplexity": cfg.perplexity.model_dump(mode="json") if cfg.perplexity else None,
        "speed": cfg.speed.model_dump(mode="json") if cfg.speed else None,
        "accuracy": cfg.accuracy.model_dump(mode="json") if cfg.accuracy else None,
    }
    models = {}
    for name in names:
        key = hashlib.sha256(
            json.dumps([ctx.fingerprints[name], protocol], sort_keys=True).encode()
        ).hexdigest()
        cache = ctx.cache_dir() / f"eval-{name}-{key[:16]}.json"
        if cache.is_file():
            models[name] = json.loads(cache.read_text(encoding="utf-8"))
            continue
        log.info("evaluating %s", name)
        models[name] = evaluate_one(ctx, name, cfg)
        atomic_write_json(cache, models[name])
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "models": models,
        "baseline": cfg.baseline or names[0],
        "protocol": protocol,
        # speed figures taken on a busy machine are not comparable with an idle one: say how busy it was
        "load_average_1min": round(load[0], 2) if load else None,
    }


def evaluate_one(ctx: StageContext, name: str, cfg: EvaluateStage) -> dict[str, Any]:
    """Size, perplexity / next-token accuracy, classification accuracy and speed of one stage's model."""
    from lmshrink.evaluation import evaluate_accuracy, evaluate_perplexity, measure_size, measure_speed

    model, tok = load_stage_model(ctx, name)
    model.eval()
    size = measure_size(model, ctx.model_dir(name))
    out: dict[str, Any] = {
        "stage_type": ctx.recipe.stage(name).type,
        "format": size.format,
        "parameters": size.parameters,
        "nonzero_parameters": count_nonzero_weights(model),
        "bytes_on_disk": size.bytes_on_disk,
        "bits_per_weight": size.disk_bits_per_weight or size.bits_per_weight,
    }
    task = _task(model)
    if cfg.perplexity is not None and task == "causal-lm":
        p = cfg.perplexity
        res = evaluate_perplexity(
            model,
            tok,
            p.data,
            protocol=p.protocol,
            ctx=p.ctx,
            stride=p.stride,
            max_tokens=p.max_tokens,
            batch_size=p.batch_size,
            progress=False,
            name=name,
        )
        out.update(
            perplexity=res.perplexity,
            next_token_accuracy=res.next_token_accuracy,
            nll=res.nll,
            n_tokens=res.n_tokens,
            n_windows=res.n_windows,
            perplexity_protocol=res.protocol,
        )
    if cfg.accuracy is not None and task == "sequence-classification":
        from lmshrink.data import load_sst2

        a = cfg.accuracy
        acc = evaluate_accuracy(
            model,
            tok,
            load_sst2(a.split, limit=a.limit),
            a.batch_size,
            progress=False,
            data=f"sst2/{a.split}",
            name=name,
        )
        out.update(accuracy=acc.accuracy, n_examples=acc.n_examples)
    if cfg.speed is not None:
        s = cfg.speed
        seq_len = s.seq_len
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if task == "causal-lm" and isinstance(limit, int) and seq_len + s.decode_tokens > limit:
            seq_len = max(limit - s.decode_tokens, 1)
            log.warning(
                "%s: speed seq_len %d + decode %d exceeds its context %d; using %d",
                name,
                s.seq_len,
                s.decode_tokens,
                limit,
                seq_len,
            )
        speed = measure_speed(
            model,
            batch_sizes=s.batch_sizes,
            seq_lens=(seq_len,),
            decode_tokens=s.decode_tokens,
            decode_batch_sizes=s.batch_sizes[:1],
            repeats=s.repeats,
            warmup=s.warmup,
            name=name,
        )
        out["speed"] = {
            str(pt.batch_size): {
                "latency_ms": pt.median_ms,
                "p90_ms": pt.p90_ms,
                "tokens_per_s": pt.tokens_per_s,
            }
            for pt in speed.prefill
        }
        if speed.decode:
            out["decode_ms_per_token"] = speed.decode[0].median_ms
        out["speed_seq_len"] = seq_len
        out["peak_memory_bytes"] = speed.peak_memory_bytes
        out["threads"] = speed.threads
    return out
