"""Recipe validation: every problem names the key and its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmshrink.errors import LmshrinkError
from lmshrink.recipes import DistillStage, QuantizeStage, RecipeError, load_recipe, load_recipe_text

GOOD = """\
name: ok
seed: 3
stages:
  - name: teacher
    model: smollm2-135m
  - name: int4
    type: quantize
    input: teacher
    format: int4
    group_size: 128
  - name: eval
    type: evaluate
"""


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe_text(text, source="r.yaml")
    assert isinstance(info.value, LmshrinkError)
    return str(info.value)


def test_good_recipe_parses_to_typed_stages() -> None:
    r = load_recipe_text(GOOD)
    assert r.seed == 3
    assert isinstance(r.stages[1], QuantizeStage)
    assert r.stages[1].group_size == 128
    assert r.model_stages() == ["teacher", "int4"]
    # the serialized recipe round-trips with every subclass field
    again = load_recipe_text(r.to_yaml())
    assert again.model_dump() == r.model_dump()


def test_unknown_key_names_key_and_line() -> None:
    msg = _error(GOOD.replace("    group_size: 128\n", "    group_size: 128\n    bitz: 4\n"))
    assert "r.yaml:11: stages[1].bitz: unknown key 'bitz'" in msg
    assert "group_size" in msg  # the accepted keys are listed


def test_nested_unknown_key_and_top_level_unknown_key() -> None:
    text = GOOD + "    speed:\n      batch_size: [1]\n" + "colour: red\n"
    msg = _error(text)
    assert "r.yaml:14: stages[2].speed.batch_size: unknown key 'batch_size'" in msg
    assert "batch_sizes" in msg
    assert "r.yaml:15: colour: unknown key 'colour'" in msg


def test_wrong_type_names_key_line_and_value() -> None:
    msg = _error(GOOD.replace("group_size: 128", "group_size: lots"))
    assert "r.yaml:10: stages[1].group_size:" in msg
    assert "'lots'" in msg


def test_missing_and_dangling_inputs() -> None:
    msg = _error(GOOD.replace("    input: teacher\n", ""))
    assert "r.yaml:6: stages[1].input: missing required key 'input'" in msg
    msg = _error(GOOD.replace("input: teacher", "input: teachr"))
    assert "r.yaml:8: stages[1].input: refers to stage 'teachr', which does not exist" in msg


def test_reference_to_later_stage_or_wrong_kind() -> None:
    text = GOOD + "  - name: late\n    type: prune\n    input: eval\n"
    msg = _error(text.replace("input: teacher", "input: late"))
    assert "stages[1].input: refers to stage 'late', which runs later" in msg
    assert "r.yaml:15: stages[3].input: stage 'eval' produces metrics, but 'input' needs a model" in msg


def test_unknown_stage_type_and_duplicates() -> None:
    msg = _error(GOOD.replace("type: quantize", "type: quantise"))
    assert "r.yaml:7: stages[1].type: unknown stage type 'quantise'" in msg
    msg = _error(GOOD.replace("name: int4", "name: teacher"))
    assert "duplicate stage name 'teacher'" in msg


def test_teacher_needs_model_or_architecture_and_yaml_errors(tmp_path: Path) -> None:
    msg = _error("name: x\nstages:\n  - name: teacher\n")
    assert "r.yaml:3: stages[0]: give exactly one of 'model'" in msg
    msg = _error("name: x\nstages: [\n")
    assert "not valid YAML" in msg
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_defaults_are_typed() -> None:
    r = load_recipe_text(
        "name: d\nstages:\n  - {name: teacher, architecture: {hidden_size: 64}}\n"
        "  - {name: student, type: distill, teacher: teacher, student: {num_layers: 1}}\n"
    )
    st = r.stages[1]
    assert isinstance(st, DistillStage)
    assert st.student.num_layers == 1 and st.alpha == 0.5
    assert r.stages[0].train is not None  # type: ignore[attr-defined]


def test_examples_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "examples"
    for path in sorted(root.glob("*.yaml")):
        load_recipe(path)
