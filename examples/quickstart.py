"""lmshrink from Python: load a model, quantize it, measure it against the original, save it, reload it.

    .venv/bin/python examples/quickstart.py                      # smollm2-135m
    .venv/bin/python examples/quickstart.py --model DIR --out runs/quickstart

Every step is one call of the library (the CLI and the pipeline runner call the same functions):
``load_model`` -> ``calibration_batches`` (C4) -> ``quantize_model`` (GPTQ int4, packed) -> ``save_model``
(safetensors) -> ``evaluate_agreement`` (perplexity of both, KL, top-1 on the same windows) -> ``measure_size`` ->
``load_model`` of the saved directory. Chains (distill -> prune -> quantize) are pipeline recipes:
``lmshrink run examples/demo.yaml``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMSHRINK_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def run(
    model_spec: str = "smollm2-135m",
    out: str = "runs/quickstart",
    *,
    group_size: int | None = 64,
    n_samples: int = 16,
    seq_len: int = 512,
    max_tokens: int = 4096,
    ctx: int | None = None,
    data: Any = "wikitext2",
) -> dict[str, Any]:
    """Quantize ``model_spec`` to int4 with GPTQ, save it to ``out``, compare it with the original on ``data``
    (its first ``max_tokens`` tokens, GPTQ protocol) and reload it; returns the measured figures."""
    from lmshrink.data import calibration_batches
    from lmshrink.evaluation import evaluate_agreement, evaluate_perplexity, measure_size
    from lmshrink.models import load_model, save_model
    from lmshrink.quantization import QuantConfig, quantize_model

    model, tok = load_model(model_spec, dtype="float32")
    original = copy.deepcopy(model)
    calib = calibration_batches(tok, "c4", n_samples=n_samples, seq_len=seq_len, seed=0)
    quantize_model(model, QuantConfig(method="gptq", format="int4", group_size=group_size), calib)
    path = save_model(model, out, tok)

    kw: dict[str, Any] = {"max_tokens": max_tokens, "ctx": ctx, "progress": False}
    agree = evaluate_agreement(model, original, tok, data, **kw)
    reloaded, _ = load_model(path)
    return {
        "perplexity_original": agree.reference_perplexity,
        "perplexity_int4": agree.perplexity,
        "perplexity_reloaded": evaluate_perplexity(reloaded, tok, data, **kw).perplexity,
        "kl_mean": agree.kl_mean,
        "top1_agreement": agree.top1_agreement,
        "n_tokens": agree.n_tokens,
        "bytes_original": measure_size(original).bytes_on_disk,
        "bytes_int4": measure_size(model, path).bytes_on_disk,
        "saved_to": str(path),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--max-tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    figures = run(a.model, a.out, max_tokens=a.max_tokens)
    print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
