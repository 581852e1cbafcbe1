"""``examples/quickstart.py``, the README's Python example, end to end on a tiny saved Llama with a real tokenizer:
GPTQ int4, saved packed, reloaded bit-identically, measured against the original."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def tiny_model_dir(tmp_path: Path, data_dir: Path, make_tiny_llama) -> Path:
    from lmshrink.distillation.teacher import train_tokenizer
    from lmshrink.models import save_model

    text = (data_dir / "wikitext-2-raw" / "test.txt").read_text()[:200_000]
    tok = train_tokenizer(text, vocab_size=320)
    model = make_tiny_llama(tied=True, vocab_size=len(tok))
    return save_model(model, tmp_path / "tiny", tok)


def test_quickstart_quantizes_saves_and_reloads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "int4"
    f = _quickstart().run(
        str(tiny_model_dir), str(out), group_size=32, n_samples=4, seq_len=64, max_tokens=1024, ctx=128
    )
    assert f["saved_to"] == str(out) and (out / "lmshrink.json").is_file()
    assert f["n_tokens"] == 8 * 127  # 8 windows of 128, the first token of each not scored
    # the saved directory reloads to the same function
    assert f["perplexity_reloaded"] == pytest.approx(f["perplexity_int4"], rel=1e-6)
    # int4 changed the model (a random-init model's KL is small but not zero) and kept most arg-maxes
    assert 1e-6 < f["kl_mean"] < 0.5 and 0.5 < f["top1_agreement"] < 1.0
    assert math.isfinite(f["perplexity_original"]) and f["perplexity_original"] > 1
    # packed int4 linears + fp32 tied embedding: well under half of the fp32 files
    assert f["bytes_int4"] < 0.5 * f["bytes_original"]
