"""Read a run directory into one table of models plus the curves the figures need."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmshrink.errors import LmshrinkError


@dataclass
class ModelRow:
    """One model of a run, with everything the report table shows (None: not measured)."""

    name: str
    stage_type: str
    format: str = "dense"
    parameters: int | None = None
    nonzero_parameters: int | None = None  # differs from parameters for pruned models
    bytes_on_disk: int | None = None
    bits_per_weight: float | None = None
    perplexity: float | None = None
    next_token_accuracy: float | None = None
    accuracy: float | None = None
    latency_ms: float | None = None  # prefill, smallest batch size
    tokens_per_s: float | None = None  # prefill throughput, largest batch size
    speed: dict[str, dict[str, float]] = field(default_factory=dict)  # batch size -> metrics
    compression: float | None = None  # baseline bytes / these bytes
    run: str = ""


@dataclass
class RunData:
    """Everything the report draws from one run directory."""

    path: Path
    name: str
    models: list[ModelRow]
    baseline: str | None
    stages: list[dict[str, Any]]  # stage.json + "results"
    protocol: dict[str, Any]
    machine: str
    date: str
    load_average: float | None = None  # 1-minute load average while the evaluate stage ran

    def traces(self) -> dict[str, list[dict[str, Any]]]:
        """Training traces (per-epoch dicts) by stage."""
        return {s["name"]: s["results"]["trace"] for s in self.stages if s["results"].get("trace")}

    def sensitivity(self) -> dict[str, dict[str, Any]]:
        """Sensitivity documents by stage."""
        return {s["name"]: s["results"] for s in self.stages if s["results"].get("sensitivity")}

    def sparsity(self) -> dict[str, dict[str, float]]:
        """Per-layer sparsity by stage."""
        return {
            s["name"]: s["results"]["layer_sparsity"]
            for s in self.stages
            if s["results"].get("layer_sparsity")
        }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return None


def _stage_order(run_dir: Path) -> list[str]:
    recipe = run_dir / "recipe.yaml"
    if recipe.is_file():
        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
            return [s["name"] for s in data.get("stages", []) if isinstance(s, dict) and "name" in s]
        except (yaml.YAMLError, OSError, AttributeError):
            pass
    return sorted(p.name for p in (run_dir / "stages").iterdir() if p.is_dir() and not p.name.startswith("."))


def collect_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read the finished stages of ``run_dir`` (unfinished ones are left out)."""
    path = Path(run_dir)
    if not (path / "stages").is_dir():
        raise LmshrinkError(
            f"{path} is not a run directory (no stages/ inside); run `lmshrink run RECIPE` first"
        )
    stages = []
    for name in _stage_order(path):
        record = _read_json(path / "stages" / name / "stage.json")
        results = _read_json(path / "stages" / name / "results.json")
        if record is None or results is None:
            continue
        stages.append({**record, "results": results})
    rows: dict[str, ModelRow] = {}
    for s in stages:
        model = s["results"].get("model")
        if isinstance(model, dict):
            rows[s["name"]] = ModelRow(
                name=s["name"],
                stage_type=s["type"],
                format=str(model.get("format", "dense")),
                parameters=model.get("parameters"),
                bytes_on_disk=model.get("bytes_on_disk"),
                bits_per_weight=model.get("bits_per_weight"),
            )
    protocol: dict[str, Any] = {}
    baseline = None
    machine, date = "", ""
    load_average = None
    for s in stages:
        res = s["results"]
        prov = res.get("provenance") or {}
        machine = machine or str(prov.get("device_name", ""))
        date = str(prov.get("date", date))
        if s["type"] != "evaluate":
            continue
        protocol = res.get("protocol", protocol)
        load_average = res.get("load_average_1min", load_average)
        baseline = res.get("baseline", baseline)
        for name, m in res.get("models", {}).items():
            row = rows.setdefault(name, ModelRow(name=name, stage_type=str(m.get("stage_type", "?"))))
            for key in (
                "parameters",
                "nonzero_parameters",
                "bytes_on_disk",
                "bits_per_weight",
                "perplexity",
                "next_token_accuracy",
                "accuracy",
                "format",
            ):
                if m.get(key) is not None:
                    setattr(row, key, m[key])
            speed = m.get("speed") or {}
            if speed:
                row.speed = {str(k): v for k, v in speed.items()}
                sizes = sorted(row.speed, key=int)
                row.latency_ms = row.speed[sizes[0]].get("latency_ms")
                row.tokens_per_s = row.speed[sizes[-1]].get("tokens_per_s")
    models = list(rows.values())
    if baseline is None and models:
        baseline = models[0].name
    base_bytes = rows[baseline].bytes_on_disk if baseline in rows else None
    for row in models:
        if base_bytes and row.bytes_on_disk:
            row.compression = base_bytes / row.bytes_on_disk
        row.run = path.name
    return RunData(path, path.name, models, baseline, stages, protocol, machine, date, load_average)
