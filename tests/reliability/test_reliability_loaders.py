"""Fuzz the model loaders with damaged saved models: truncated and mutated safetensors, lying headers, absurd sizes,
bad UTF-8 and deep nesting in ``config.json`` / ``lmshrink.json``, for every storage format in the tree.

Each case must end in a successful load or an :class:`lmshrink.errors.LmshrinkError`; see ``conftest.guarded``.
Failures are collected and reported together (case -> outcome), not shrunk one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from _reliability_harness import FAILURES, copy_tree, guarded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FORMATS = ("dense", "quantized", "sparse", "pruned")
#: Examples per random test; raise it for a longer campaign (LMSHRINK_FUZZ_EXAMPLES=200 pytest tests/reliability).
EXAMPLES = int(os.environ.get("LMSHRINK_FUZZ_EXAMPLES", "8"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
HUGE = (2**31, 2**40, 2**62, 2**63 - 1)


class SilentReinit(Exception):
    """A load that "succeeded" although weights were missing from the file (freshly initialised instead)."""


def _load(path: Path) -> None:
    from lmshrink.models import load_model

    model, _ = load_model(path)
    if json.loads((path / "lmshrink.json").read_text()).get("format") != "dense":
        return  # packed formats name their tensors differently; their loaders check names themselves
    from safetensors import safe_open

    with safe_open(str(_weights(path)), framework="pt") as fh:
        stored = set(fh.keys())
    state = model.state_dict()
    present = {state[k].data_ptr() for k in state if k in stored}
    missing = [k for k, t in state.items() if k not in stored and t.data_ptr() not in present]
    if missing:
        raise SilentReinit(
            f"loaded without error but {missing[:3]} were not in the file (randomly initialised)"
        )


def _fmt_dir(saved_models: dict[str, Path], fmt: str) -> Path:
    if fmt not in saved_models:
        pytest.skip(f"format {fmt!r} cannot be saved in this tree yet")
    return saved_models[fmt]


def _run(case: str, path: Path, failures: list[str]) -> None:
    out = guarded(lambda: _load(path), "loader")
    if not out.ok:
        line = f"{case} -> {out.kind}: {out.detail}"
        failures.append(line)
        FAILURES.append(line)


def _report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} cases did not end in LmshrinkError:\n" + "\n".join(
        sorted(set(failures))
    )


# --------------------------------------------------------------------------------------------- safetensors


def _weights(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return files[0]


def _split(file: Path) -> tuple[dict[str, Any], bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(file: Path, header: bytes, data: bytes, length: int | None = None) -> None:
    file.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _entries(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


#: Deterministic damage, one per kind the brief names; (case id, function(weights file) -> None).
def _safetensors_cases() -> list[tuple[str, Any]]:
    def truncate(frac: float):
        return lambda f: f.write_bytes(f.read_bytes()[: int(f.stat().st_size * frac)])

    def length(n: int):
        def go(f: Path) -> None:
            raw = f.read_bytes()
            f.write_bytes(struct.pack("<Q", n) + raw[8:])

        return go

    def edit(key_fn):
        def go(f: Path) -> None:
            header, data = _split(f)
            key_fn(header)
            _write(f, json.dumps(header).encode(), data)

        return go

    def first(h: dict[str, Any]) -> dict[str, Any]:
        return h[_entries(h)[0]]  # type: ignore[no-any-return]

    def biggest(h: dict[str, Any]) -> dict[str, Any]:
        return h[max(_entries(h), key=lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0])]  # type: ignore[no-any-return]

    def raw_header(text: bytes):
        def go(f: Path) -> None:
            _, data = _split(f)
            _write(f, text, data)

        return go

    return [
        ("empty-file", lambda f: f.write_bytes(b"")),
        ("truncated-in-length", truncate(0.0001)),
        ("truncated-in-header", lambda f: f.write_bytes(f.read_bytes()[:40])),
        ("truncated-half", truncate(0.5)),
        ("truncated-last-byte", lambda f: f.write_bytes(f.read_bytes()[:-1])),
        ("trailing-garbage", lambda f: f.write_bytes(f.read_bytes() + b"\0" * 17)),
        ("length-zero", length(0)),
        ("length-2^40", length(2**40)),
        ("length-2^64-1", length(2**64 - 1)),
        ("dtype-unknown", edit(lambda h: first(h).update(dtype="Q7"))),
        ("dtype-wider", edit(lambda h: biggest(h).update(dtype="F64"))),
        ("dtype-narrower", edit(lambda h: biggest(h).update(dtype="I8"))),
        ("dtype-not-string", edit(lambda h: first(h).update(dtype=7))),
        ("shape-mismatch-offsets", edit(lambda h: biggest(h).update(shape=[3, 5]))),
        ("shape-huge", edit(lambda h: biggest(h).update(shape=[2**31, 2**31]))),
        ("shape-negative", edit(lambda h: first(h).update(shape=[-1, 4]))),
        ("shape-not-list", edit(lambda h: first(h).update(shape="big"))),
        ("offsets-huge", edit(lambda h: biggest(h).update(data_offsets=[0, 2**62]))),
        (
            "offsets-reversed",
            edit(lambda h: biggest(h).update(data_offsets=biggest(h)["data_offsets"][::-1])),
        ),
        (
            "offsets-overlap",
            edit(
                lambda h: [
                    h[k].update(data_offsets=h[_entries(h)[0]]["data_offsets"]) for k in _entries(h)[1:2]
                ]
            ),
        ),
        ("entry-dropped", edit(lambda h: h.pop(_entries(h)[0]))),
        ("entry-renamed", edit(lambda h: h.__setitem__("not.a.weight", h.pop(_entries(h)[0])))),
        ("entry-not-object", edit(lambda h: h.__setitem__(_entries(h)[0], [1, 2, 3]))),
        ("metadata-not-strings", edit(lambda h: h.__setitem__("__metadata__", {"x": {"y": 1}}))),
        (
            "metadata-bad-json-values",
            edit(
                lambda h: h.__setitem__(
                    "__metadata__", {k: "{not json" for k in (h.get("__metadata__") or {"format": "pt"})}
                )
            ),
        ),
        ("header-not-json", raw_header(b"{ this is not json " + b" " * 40)),
        (
            "header-bad-utf8",
            raw_header(b'{"\xff\xfe\xfd": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
        ),
        ("header-top-level-list", raw_header(b"[1, 2, 3]")),
        ("header-deep-nesting-1e5", raw_header(('{"__metadata__": ' + _deep(100_000) + "}").encode())),
        ("header-deep-nesting-1e3", raw_header(('{"__metadata__": ' + _deep(1_000) + "}").encode())),
    ]


SAFETENSORS_CASES = _safetensors_cases()


@pytest.mark.parametrize("fmt", FORMATS)
def test_safetensors_damage_named_cases(fmt: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    pristine = _fmt_dir(saved_models, fmt)
    failures: list[str] = []
    for case, damage in SAFETENSORS_CASES:
        d = copy_tree(pristine, tmp_path / case)
        damage(_weights(d))
        _run(f"{fmt}/model.safetensors/{case}", d, failures)
    _report(failures)


@pytest.mark.parametrize("fmt", FORMATS)
def test_safetensors_random_bytes(fmt: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    """Random truncations and byte overwrites anywhere in the file (header bytes more often)."""
    pristine = _fmt_dir(saved_models, fmt)
    failures: list[str] = []
    size = _weights(pristine).stat().st_size
    (hlen,) = struct.unpack("<Q", _weights(pristine).read_bytes()[:8])

    @FUZZ
    @given(
        cut=st.one_of(st.none(), st.integers(0, size - 1)),
        edits=st.lists(
            st.tuples(st.one_of(st.integers(0, 8 + hlen - 1), st.integers(0, size - 1)), st.integers(0, 255)),
            max_size=6,
        ),
    )
    def run(cut: int | None, edits: list[tuple[int, int]]) -> None:
        d = copy_tree(pristine, tmp_path / "case")
        f = _weights(d)
        raw = bytearray(f.read_bytes())
        for pos, val in edits:
            raw[pos] = val
        f.write_bytes(bytes(raw[:cut] if cut is not None else raw))
        _run(f"{fmt}/model.safetensors/random cut={cut} edits={edits}", d, failures)

    run()
    _report(failures)


@pytest.mark.parametrize("fmt", FORMATS)
def test_safetensors_lying_header(fmt: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    """A well-formed header whose entries lie: random dtypes, shapes and offsets, with the data left as it was."""
    pristine = _fmt_dir(saved_models, fmt)
    failures: list[str] = []
    header0, _ = _split(_weights(pristine))
    keys = _entries(header0)
    dims = st.one_of(st.integers(-2, 70), st.sampled_from(HUGE))

    @FUZZ
    @given(
        key=st.sampled_from(keys),
        dtype=st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3"]),
            st.text(max_size=4),
            st.integers(),
        ),
        shape=st.one_of(st.none(), st.lists(dims, max_size=4)),
        offsets=st.one_of(
            st.none(),
            st.tuples(st.integers(-1, 2**20), st.one_of(st.integers(-1, 2**20), st.sampled_from(HUGE))),
        ),
    )
    def run(key: str, dtype: Any, shape: list[int] | None, offsets: tuple[int, int] | None) -> None:
        d = copy_tree(pristine, tmp_path / "case")
        f = _weights(d)
        header, data = _split(f)
        entry = header[key]
        entry["dtype"] = dtype
        if shape is not None:
            entry["shape"] = shape
        if offsets is not None:
            entry["data_offsets"] = list(offsets)
        _write(f, json.dumps(header).encode(), data)
        _run(f"{fmt}/model.safetensors/{key}: dtype={dtype!r} shape={shape} offsets={offsets}", d, failures)

    run()
    _report(failures)


# --------------------------------------------------------------------------------------------- JSON files

JSON_FILES = ("config.json", "lmshrink.json")


def _json_cases() -> list[tuple[str, Any]]:
    def text(b: bytes):
        return lambda f: f.write_bytes(b)

    def splice(b: bytes):
        def go(f: Path) -> None:
            raw = f.read_bytes()
            i = raw.index(b'"', 5) + 1  # inside the first string after the opening
            f.write_bytes(raw[:i] + b + raw[i:])

        return go

    def set_all(value: Any):
        def go(f: Path) -> None:
            doc = json.loads(f.read_text())
            for k in list(doc):
                if isinstance(doc[k], int) and not isinstance(doc[k], bool):
                    doc[k] = value
            f.write_text(json.dumps(doc))

        return go

    def nest(depth: int):
        def go(f: Path) -> None:
            raw = f.read_text()
            f.write_text(raw.rstrip().rstrip("}") + f', "deep": {_deep(depth)}' + "}")

        return go

    return [
        ("empty", text(b"")),
        ("truncated", lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])),
        ("bad-utf8", splice(b"\xff\xfe\xc3\x28")),
        ("utf16-bom", lambda f: f.write_bytes(f.read_text().encode("utf-16"))),
        ("top-level-list", text(b"[1, 2, 3]")),
        ("top-level-string", text(b'"model"')),
        ("deep-nesting-1e3", nest(1_000)),
        ("deep-nesting-1e5", nest(100_000)),
        ("ints-negative", set_all(-1)),
        ("ints-zero", set_all(0)),
        ("ints-huge", set_all(2**40)),
        ("ints-as-strings", set_all("12")),
        ("ints-null", set_all(None)),
        ("nan", lambda f: f.write_text(f.read_text().rstrip().rstrip("}") + ', "x": NaN}')),
    ]


JSON_CASES = _json_cases()


@pytest.mark.parametrize("name", JSON_FILES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_json_damage_named_cases(fmt: str, name: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    pristine = _fmt_dir(saved_models, fmt)
    failures: list[str] = []
    for case, damage in JSON_CASES:
        d = copy_tree(pristine, tmp_path / case)
        damage(d / name)
        _run(f"{fmt}/{name}/{case}", d, failures)
    _report(failures)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            out += _paths(v, (*prefix, i))
    return out


JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.sampled_from(HUGE),
        st.floats(allow_nan=False),
        st.text(max_size=6),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.mark.parametrize("name", JSON_FILES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_json_random_values(fmt: str, name: str, saved_models: dict[str, Path], tmp_path: Path) -> None:
    """Replace one value anywhere in the document (nested manifest entries included) with random JSON."""
    pristine = _fmt_dir(saved_models, fmt)
    failures: list[str] = []
    doc0 = json.loads((pristine / name).read_text())
    paths = _paths(doc0)

    @FUZZ
    @given(path=st.sampled_from(paths), value=JSON_VALUES)
    def run(path: tuple[Any, ...], value: Any) -> None:
        d = copy_tree(pristine, tmp_path / "case")
        doc = json.loads((d / name).read_text())
        node = doc
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        (d / name).write_text(json.dumps(doc))
        _run(f"{fmt}/{name}/{'.'.join(map(str, path))} = {value!r}"[:300], d, failures)

    run()
    _report(failures)
