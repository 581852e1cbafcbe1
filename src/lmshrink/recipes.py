"""YAML recipes: a pipeline of named stages (teacher, soft_labels, distill, prune, quantize, sensitivity, evaluate).

A recipe is only the serialization of typed, validated configs (pydantic, ``extra="forbid"``): a typo is an error
that names the key and its line in the file, never a silent default. Stages refer to earlier stages by name
(``input: student``); a reference to a stage that does not exist, comes later, or produces the wrong kind of output
is an error naming the key.

Example::

    name: tiny
    stages:
      - {name: teacher, type: teacher, model: smollm2-135m}
      - {name: int4, type: quantize, input: teacher, format: int4, group_size: 128}
      - {name: eval, type: evaluate}

>>> r = load_recipe_text("name: t\\nstages:\\n  - {name: teacher, type: teacher, model: smollm2-135m}\\n")
>>> r.stages[0].model
'smollm2-135m'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from lmshrink.errors import LmshrinkError


class RecipeError(LmshrinkError):
    """A recipe that cannot be run: the message lists every problem as ``file:line: key: what is wrong``."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- shared options
class CalibrationOptions(_Config):
    """Calibration text for GPTQ/AWQ/Wanda/SparseGPT and for sensitivity analysis."""

    data: str = "c4"
    n_samples: int = Field(default=32, gt=0)
    seq_len: int = Field(default=256, gt=0)


class TextSource(_Config):
    """A training corpus and how much of it to use."""

    data: str = "wikitext103"
    split: str = "train"
    max_chars: int | None = Field(
        default=None, gt=0, description="use only the first N characters of the corpus"
    )
    val_fraction: float = Field(default=0.02, ge=0.0, lt=0.5)


class TrainOptions(_Config):
    """Training loop options, passed to :class:`lmshrink.distillation.TrainConfig` (names mapped there)."""

    epochs: float = Field(default=1, gt=0, description="passes over the training blocks (fractions allowed)")
    batch_size: int = Field(default=16, gt=0)
    seq_len: int = Field(default=128, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    max_steps: int | None = Field(default=None, gt=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    extra: dict[str, Any] = Field(
        default_factory=dict, description="further TrainConfig fields, passed through"
    )


class ArchitectureOptions(_Config):
    """A Llama-style model trained from scratch (with a BPE tokenizer trained on the same text)."""

    vocab_size: int = Field(default=4096, gt=0)
    hidden_size: int = Field(default=256, gt=0)
    num_layers: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    max_position_embeddings: int | None = Field(default=None, gt=0)


class StudentOptions(_Config):
    """How :func:`lmshrink.distillation.make_student` derives the student from the teacher."""

    num_layers: int | None = Field(default=None, gt=0)
    layer_ids: list[int] | None = None
    num_heads: int | None = Field(default=None, gt=0)
    hidden_size: int | None = Field(default=None, gt=0)
    intermediate_size: int | None = Field(default=None, gt=0)
    init: Literal["teacher", "random"] = "teacher"


class PerplexityOptions(_Config):
    """Perplexity protocol (see :func:`lmshrink.evaluation.evaluate_perplexity`)."""

    data: str = "wikitext2"
    protocol: Literal["gptq", "stride"] = "gptq"
    ctx: int | None = Field(default=None, gt=0)
    stride: int | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, gt=0)


class SpeedOptions(_Config):
    """Latency/throughput protocol (see :func:`lmshrink.evaluation.measure_speed`)."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])
    seq_len: int = Field(default=128, gt=0)
    decode_tokens: int = Field(default=16, ge=0)
    repeats: int = Field(default=5, gt=0)
    warmup: int = Field(default=1, ge=0)


class AccuracyOptions(_Config):
    """Classification accuracy on SST-2 (sequence-classification models)."""

    data: Literal["sst2"] = "sst2"
    split: str = "dev"
    limit: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)


# ----------------------------------------------------------------------------------------------- stages
class StageConfig(_Config):
    """Fields every stage has. Subclasses declare ``kind`` (the stage type), ``produces`` and ``references``."""

    kind: ClassVar[str] = ""
    #: what the stage leaves in its directory: "model", "soft_labels", "plan" or "metrics"
    produces: ClassVar[str] = "model"
    #: field name -> the kind of output it must reference ("model", "soft_labels", "plan")
    references: ClassVar[dict[str, str]] = {}

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    type: str

    def resolve(self, earlier: list[StageConfig]) -> None:
        """Fill defaults that depend on the stages before this one (called once the recipe is validated)."""

    def referenced(self) -> dict[str, list[str]]:
        """Stage names this stage reads, by field."""
        out: dict[str, list[str]] = {}
        for field in self.references:
            value = getattr(self, field)
            if value is None:
                continue
            names = [value] if isinstance(value, str) else list(value)
            if field == "plan":  # a plan may also be a file path
                names = [n for n in names if not _looks_like_path(n)]
            if names:
                out[field] = names
        return out

    def settings(self) -> dict[str, Any]:
        """The stage's settings without its name: what its fingerprint hashes."""
        return self.model_dump(mode="json", exclude={"name"})


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".json", ".yaml", ".yml"))


class TeacherStage(StageConfig):
    """Load a model (``model: smollm2-135m`` or a path) or train one from scratch (``architecture`` + ``train``)."""

    kind: ClassVar[str] = "teacher"
    type: Literal["teacher"] = "teacher"
    model: str | None = None
    task: Literal["causal-lm", "sequence-classification", "encoder"] | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    architecture: ArchitectureOptions | None = None
    text: TextSource = Field(default_factory=TextSource)
    train: TrainOptions | None = None
    finetune: TrainOptions | None = Field(
        default=None, description="fine-tune a loaded model (e.g. on SST-2) first"
    )
    finetune_data: Literal["sst2"] | None = None
    finetune_limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _load_or_train(self) -> TeacherStage:
        if (self.model is None) == (self.architecture is None):
            raise ValueError("give exactly one of 'model' (load) or 'architecture' (train from scratch)")
        if self.architecture is not None and self.train is None:
            self.train = TrainOptions()
        if self.finetune is not None and self.model is None:
            raise ValueError("'finetune' applies to a loaded 'model'")
        return self


class SoftLabelsStage(StageConfig):
    """Run the teacher over the training text and store its top-k next-token distributions."""

    kind: ClassVar[str] = "soft_labels"
    produces: ClassVar[str] = "soft_labels"
    references: ClassVar[dict[str, str]] = {"input": "model"}
    type: Literal["soft_labels"] = "soft_labels"
    input: str
    top_k: int = Field(default=32, gt=0)
    seq_len: int = Field(default=128, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    text: TextSource = Field(default_factory=TextSource)


class DistillStage(StageConfig):
    """Derive a student from the teacher and train it on the teacher's soft labels (and the hard labels)."""

    kind: ClassVar[str] = "distill"
    references: ClassVar[dict[str, str]] = {"teacher": "model", "soft_labels": "soft_labels"}
    type: Literal["distill"] = "distill"
    teacher: str
    soft_labels: str | None = None
    student: StudentOptions = Field(default_factory=StudentOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    text: TextSource = Field(default_factory=TextSource)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the soft-label loss")
    temperature: float = Field(default=2.0, gt=0)
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    data_limit: int | None = Field(default=None, gt=0, description="SST-2: number of training sentences")


class PruneStage(StageConfig):
    """Prune the input model (see :class:`lmshrink.pruning.PruneConfig`; ``options`` are passed through)."""

    kind: ClassVar[str] = "prune"
    references: ClassVar[dict[str, str]] = {"input": "model", "plan": "plan"}
    type: Literal["prune"] = "prune"
    input: str
    method: str = "magnitude"
    sparsity: float = Field(default=0.5, ge=0.0, lt=1.0)
    plan: str | None = None
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    options: dict[str, Any] = Field(default_factory=dict)


class QuantizeStage(StageConfig):
    """Quantize the input model (see :class:`lmshrink.quantization.QuantConfig`; ``options`` are passed through).

    ``plan`` names a sensitivity stage (or a ``sensitivity.json`` file) whose per-layer bits override ``format``.
    """

    kind: ClassVar[str] = "quantize"
    references: ClassVar[dict[str, str]] = {"input": "model", "plan": "plan"}
    type: Literal["quantize"] = "quantize"
    input: str
    method: str = "rtn"
    format: str = "int8"
    group_size: int | None = Field(default=None, ge=0)
    plan: str | None = None
    quantize_embeddings: bool = Field(
        default=False,
        description="also quantize the LM head and the token/position embeddings (packed QuantEmbedding); "
        "by default they stay in float like other toolkits' defaults",
    )
    calibration: CalibrationOptions = Field(default_factory=CalibrationOptions)
    options: dict[str, Any] = Field(default_factory=dict)


class SensitivityStage(StageConfig):
    """Per-layer damage of quantizing (or pruning) each layer alone, and a per-layer plan for a target budget."""

    kind: ClassVar[str] = "sensitivity"
    produces: ClassVar[str] = "plan"
    references: ClassVar[dict[str, str]] = {"input": "model"}
    type: Literal["sensitivity"] = "sensitivity"
    input: str
    mode: Literal["quantize", "prune"] = "quantize"
    choices: list[float] = Field(default_factory=lambda: [2.0, 3.0, 4.0, 8.0])
    measure: list[float] | None = Field(
        default=None, description="bits to measure; the others are estimated (see lmshrink.sensitivity)"
    )
    target: float = Field(default=4.0, gt=0)
    metric: Literal["kl", "output"] = "kl"
    group_size: int | None = Field(default=None, ge=0)
    n_windows: int = Field(default=4, gt=0)
    seq_len: int = Field(default=128, gt=0)
    data: str = "wikitext103"
    validate_plan: bool = True


class EvaluateStage(StageConfig):
    """Measure every model of the run (or ``models``) with one protocol: perplexity, size, speed, accuracy."""

    kind: ClassVar[str] = "evaluate"
    produces: ClassVar[str] = "metrics"
    references: ClassVar[dict[str, str]] = {"models": "model", "baseline": "model"}
    type: Literal["evaluate"] = "evaluate"
    models: list[str] | None = None
    baseline: str | None = Field(
        default=None, description="compression ratios are against this model (default: first)"
    )
    perplexity: PerplexityOptions | None = Field(default_factory=PerplexityOptions)
    speed: SpeedOptions | None = Field(default_factory=SpeedOptions)
    accuracy: AccuracyOptions | None = None

    def resolve(self, earlier: list[StageConfig]) -> None:
        """``models`` defaults to every model produced before this stage (spelled out, so it is hashed)."""
        if self.models is None:
            self.models = [s.name for s in earlier if s.produces == "model"]


#: stage type -> config class; :func:`register_stage_config` adds more.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    cls.kind: cls
    for cls in (
        TeacherStage,
        SoftLabelsStage,
        DistillStage,
        PruneStage,
        QuantizeStage,
        SensitivityStage,
        EvaluateStage,
    )
}


def register_stage_config(cls: type[StageConfig]) -> type[StageConfig]:
    """Register a stage config class under its ``kind`` (used by plug-in stages and tests)."""
    if not cls.kind:
        raise LmshrinkError(f"{cls.__name__} must set the class variable 'kind'")
    STAGE_CONFIGS[cls.kind] = cls
    return cls


class Recipe(_Config):
    """A whole pipeline: global settings and the ordered stages."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    threads: int | None = Field(default=None, gt=0)
    stages: list[SerializeAsAny[StageConfig]] = Field(min_length=1)

    def stage(self, name: str) -> StageConfig:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise LmshrinkError(
            f"recipe {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}"
        )

    def model_stages(self) -> list[str]:
        """Names of the stages that produce a model, in order."""
        return [s.name for s in self.stages if s.produces == "model"]

    def to_yaml(self) -> str:
        """The recipe as YAML (every default spelled out)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """A hash of the whole recipe."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- loading
Loc = tuple[str | int, ...]


def _node_line(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the YAML node at ``loc`` (the deepest node reached; a missing key gives its parent)."""
    node = root
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                continue  # a pydantic union tag or a missing key: stay at the parent
            continue
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            continue
    return line


def _model_at(cls: type[BaseModel], parts: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at the end of ``parts`` (for listing accepted keys)."""
    current: type[BaseModel] = cls
    for part in parts:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        nested = _unwrap_model(field.annotation)
        if nested is None:
            return None
        current = nested
    return current


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(err: dict[str, Any], owner: type[BaseModel] | None) -> str:
    kind = err.get("type", "")
    loc = err.get("loc", ())
    if kind == "extra_forbidden":
        accepted = f" (accepted: {', '.join(owner.model_fields)})" if owner is not None else ""
        return f"unknown key {loc[-1]!r}{accepted}"
    if kind == "missing":
        return f"missing required key {loc[-1]!r}"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error", "assertion_error"):
        got = err["input"]
        shown = repr(got) if not isinstance(got, dict | list) or len(repr(got)) < 60 else type(got).__name__
        msg += f", got {shown}"
    return msg


class _Problems:
    def __init__(self, source: str, root: yaml.Node | None) -> None:
        self.source = source
        self.root = root
        self.items: list[tuple[int, str]] = []

    def add(self, loc: Loc, message: str) -> None:
        line = _node_line(self.root, loc)
        where = f"{self.source}:{line}" if line else self.source
        self.items.append((line or 0, f"{where}: {_dotted(loc)}: {message}"))

    def add_validation(self, exc: ValidationError, prefix: Loc, cls: type[BaseModel]) -> None:
        for err in exc.errors():
            loc = tuple(err["loc"])
            owner = _model_at(cls, loc[:-1]) if err["type"] == "extra_forbidden" else None
            self.add((*prefix, *loc), _describe(dict(err), owner))


def _parse_stage(raw: Any, index: int, problems: _Problems) -> StageConfig | None:
    loc: Loc = ("stages", index)
    if not isinstance(raw, dict):
        problems.add(loc, f"a stage must be a mapping with 'name' and 'type', got {type(raw).__name__}")
        return None
    kind = raw.get("type", raw.get("name"))
    if kind not in STAGE_CONFIGS:
        key = "type" if "type" in raw else "name"
        problems.add(
            (*loc, key),
            f"unknown stage type {kind!r}; accepted: {', '.join(STAGE_CONFIGS)} "
            "(the type defaults to the stage name)",
        )
        return None
    data = {**raw, "type": kind}
    cls = STAGE_CONFIGS[kind]
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems.add_validation(exc, loc, cls)
        return None


_KIND_WORDS = {
    "model": "a model",
    "soft_labels": "soft labels",
    "plan": "a per-layer plan",
    "metrics": "metrics",
}


def _check_references(stages: list[StageConfig | None], problems: _Problems) -> None:
    produced: dict[str, str] = {}
    all_names = {s.name for s in stages if s is not None}
    for i, stage in enumerate(stages):
        if stage is None:
            continue
        if stage.name in produced:
            problems.add(
                ("stages", i, "name"), f"duplicate stage name {stage.name!r}; stage names must be unique"
            )
        for field, names in stage.referenced().items():
            want = stage.references[field]
            for name in names:
                if name not in all_names:
                    problems.add(
                        ("stages", i, field),
                        f"refers to stage {name!r}, which does not exist; earlier stages: {list(produced) or 'none'}",
                    )
                elif name not in produced:
                    problems.add(
                        ("stages", i, field), f"refers to stage {name!r}, which runs later; move it earlier"
                    )
                elif produced[name] != want:
                    problems.add(
                        ("stages", i, field),
                        f"stage {name!r} produces {_KIND_WORDS[produced[name]]}, but {field!r} needs {_KIND_WORDS[want]}",
                    )
        produced[stage.name] = stage.produces


#: Deepest nesting of lists/mappings a recipe may use (real recipes need 4).
MAX_YAML_DEPTH = 32
#: Most nodes a recipe may expand to once aliases are resolved (real recipes have a few hundred).
MAX_YAML_NODES = 100_000
#: Longest plain integer accepted (Python refuses to convert integers beyond 4300 digits).
MAX_INT_DIGITS = 100
_INT_LIKE = re.compile(r"[-+]?[0-9][0-9_]*")


def _check_yaml_shape(text: str, source: str) -> None:
    """Scan the YAML events (iteratively: no recursion) before building anything, and refuse what would crash or
    hang the loader: nesting deeper than :data:`MAX_YAML_DEPTH`, alias expansion beyond :data:`MAX_YAML_NODES`
    nodes (an "alias bomb"), integers longer than :data:`MAX_INT_DIGITS` digits. Errors name the line."""
    anchors: dict[str, int] = {}
    stack: list[list[Any]] = [[0, None]]  # [expanded node count, anchor] per open collection

    def fail(event: yaml.Event, what: str) -> RecipeError:
        mark = event.start_mark
        return RecipeError(f"{source}:{mark.line + 1}: {what}" if mark is not None else f"{source}: {what}")

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([1, event.anchor])
            if len(stack) - 1 > MAX_YAML_DEPTH:
                raise fail(event, f"nested deeper than {MAX_YAML_DEPTH} levels; a recipe needs only a few")
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = stack.pop()
            if anchor is not None:
                anchors[anchor] = size
            stack[-1][0] += size
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchors[event.anchor] = 1
            value = event.value
            if event.style is None and len(value) > MAX_INT_DIGITS and _INT_LIKE.fullmatch(value):
                raise fail(
                    event, f"a {len(value)}-digit number; numbers in a recipe have at most {MAX_INT_DIGITS}"
                )
            stack[-1][0] += 1
        elif isinstance(event, yaml.AliasEvent):
            stack[-1][0] += anchors.get(event.anchor or "", 1)
        else:
            continue
        if sum(level[0] for level in stack) > MAX_YAML_NODES:
            raise fail(event, f"the document expands to more than {MAX_YAML_NODES} nodes (repeated aliases?)")


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The composed node tree (for line numbers) and the plain data of a recipe, or :class:`RecipeError`."""
    try:
        _check_yaml_shape(text, source)
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()  # type: ignore[no-untyped-call]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise RecipeError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    except RecipeError:
        raise
    except (ValueError, RecursionError, OverflowError) as exc:  # the shape check should have caught these
        raise RecipeError(f"{source}: a value cannot be read ({type(exc).__name__}: {exc})") from exc
    return root, data


def load_recipe_text(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate a YAML recipe; raise :class:`RecipeError` listing every problem with its line."""
    root, data = _parse_yaml(text, source)
    problems = _Problems(source, root)
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a mapping with 'name' and 'stages', got {type(data).__name__}"
        )
    raw_stages = data.get("stages")
    stages: list[StageConfig | None] = []
    if isinstance(raw_stages, list):
        stages = [_parse_stage(raw, i, problems) for i, raw in enumerate(raw_stages)]
        _check_references(stages, problems)
    header = {**data, "stages": [s for s in stages if s is not None] or raw_stages}
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(header)
    except ValidationError as exc:
        if isinstance(raw_stages, list):  # stage problems were reported above with better locations
            exc_errors = [e for e in exc.errors() if not (e["loc"] and e["loc"][0] == "stages")]
            for err in exc_errors:
                owner = Recipe if err["type"] == "extra_forbidden" else None
                problems.add(tuple(err["loc"]), _describe(dict(err), owner))
            if not raw_stages:
                problems.add(("stages",), "a recipe needs at least one stage")
        else:
            problems.add_validation(exc, (), Recipe)
    if recipe is not None and not problems.items:
        for i, stage in enumerate(recipe.stages):
            stage.resolve(recipe.stages[:i])
    if problems.items or recipe is None:
        listing = "\n  ".join(m for _, m in sorted(problems.items, key=lambda t: t[0])) or "invalid recipe"
        raise RecipeError(f"invalid recipe {source}:\n  {listing}")
    return recipe


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate the recipe at ``path`` (see :func:`load_recipe_text`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RecipeError(f"recipe file {p} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {p}: {exc}") from exc
    return load_recipe_text(text, source=str(p))
