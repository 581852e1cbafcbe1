"""One table from quality runs and a speed run of the same bench script (same rows, same machine).

Quality (perplexity, KL, top-1) is deterministic and can be measured on a busy machine with ``--no-speed``; speed
needs a quiet one and is measured apart with ``--no-quality``. This joins the two by row key: the quality, size and
compress-time columns come from the quality runs (several, e.g. the slow calibrated rows measured apart, must share
model, tokens and context; a later file's row replaces an earlier one of the same key), the decode/prefill ratios and
peak memory from the speed run. Every source file's command and provenance is kept in the combined JSON.

    .venv/bin/python bench/combine.py QUALITY.json [QUALITY2.json ...] --speed SPEED.json --out bench/results/NAME.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown


def merge_quality(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One quality document from runs of the same protocol: the first run's fp32 row, every other row by key."""
    first = docs[0]
    for d in docs[1:]:
        for k in ("model", "max_tokens", "ctx"):
            if d["settings"][k] != first["settings"][k]:
                raise SystemExit(f"quality runs differ in {k}: {first['settings'][k]} vs {d['settings'][k]}")
        ref, other = first["rows"][0].get("perplexity"), d["rows"][0].get("perplexity")
        if ref is not None and other is not None and abs(ref - other) > 1e-6 * abs(ref):
            raise SystemExit(
                f"the quality runs' fp32 perplexities differ ({ref} vs {other}): not the same windows"
            )
    rows: dict[str, dict[str, Any]] = {}
    for d in docs:
        for r in d["rows"][1:]:
            rows[r["key"]] = r
    out = json.loads(json.dumps(first))
    out["rows"] = [first["rows"][0], *rows.values()]
    out["quality_sources"] = [{"command": d["command"], "provenance": d["provenance"]} for d in docs]
    return out


def merge_speed(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One speed document from runs with the same speed settings; a later run's row replaces an earlier one."""
    keys = ("model", "threads", "speed_repeats", "speed_warmup", "decode_tokens", "seq_len", "prefill_batch")
    first = docs[0]
    for d in docs[1:]:
        for k in keys:
            if d["settings"].get(k) != first["settings"].get(k):
                raise SystemExit(
                    f"speed runs differ in {k}: {first['settings'].get(k)} vs {d['settings'].get(k)}"
                )
    rows: dict[str, dict[str, Any]] = {}
    for d in docs:
        for r in d["rows"][1:]:
            if r.get("speed") or r["key"] not in rows:
                rows[r["key"]] = r
    out = json.loads(json.dumps(first))
    out["rows"] = [first["rows"][0], *rows.values()]
    if len(docs) > 1:
        out["command"] = " ; ".join(d["command"] for d in docs)
        out["provenance"]["date"] = " + ".join(dict.fromkeys(d["provenance"].get("date", "") for d in docs))
    return out


def combine(quality: dict[str, Any], speed: dict[str, Any]) -> dict[str, Any]:
    """``quality`` with each row's ``speed`` taken from the row of the same key in ``speed``."""
    if quality["settings"]["model"] != speed["settings"]["model"]:
        raise SystemExit(
            f"the runs are of different models: {quality['settings']['model']} vs {speed['settings']['model']}"
        )
    timed = {r["key"]: r for r in speed["rows"]}
    doc = json.loads(json.dumps(quality))
    for row in doc["rows"]:
        other = timed.get(row["key"], {})
        if other.get("speed"):
            row["speed"] = other["speed"]
        elif row.get("status") == "ok" and row["key"] != "fp32":
            row["speed_status"] = other.get("status", "not timed")
    doc["settings"]["speed"] = True
    doc["speed_settings"] = speed["settings"]
    doc["sources"] = {
        "quality": quality.get(
            "quality_sources", [{"command": quality["command"], "provenance": quality["provenance"]}]
        ),
        "speed": {"command": speed["command"], "provenance": speed["provenance"]},
    }
    doc["provenance"] = dict(quality["provenance"])
    doc["provenance"]["device_name"] = (
        f"quality: {quality['provenance'].get('device_name', '')}, {quality['provenance'].get('date', '')}; "
        f"speed: {speed['provenance'].get('device_name', '')}, {speed['provenance'].get('date', '')}"
    )
    doc["provenance"]["date"] = speed["provenance"].get("date", "")
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("quality", type=Path, nargs="+", help="quality runs (--no-speed)")
    p.add_argument(
        "--speed", type=Path, nargs="+", required=True, help="the speed runs (same speed settings)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="combined JSON (the Markdown table is written beside it)"
    )
    a = p.parse_args(argv)
    quality = merge_quality([json.loads(q.read_text()) for q in a.quality])
    doc = combine(quality, merge_speed([json.loads(f.read_text()) for f in a.speed]))
    from lmshrink.utils.io import atomic_write_text

    atomic_write_text(a.out, json.dumps(doc, indent=2, default=str) + "\n")
    atomic_write_text(a.out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
