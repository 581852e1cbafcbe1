"""The compression pipeline: run a recipe's stages in a run directory, skipping what is unchanged.

>>> from lmshrink.pipeline import run_pipeline  # doctest: +SKIP
>>> from lmshrink.recipes import load_recipe  # doctest: +SKIP
>>> run_pipeline(load_recipe("examples/demo.yaml"), "runs/demo").ran()  # doctest: +SKIP
"""

from lmshrink.pipeline.runner import (
    STAGE_RUNNERS,
    RunDirectory,
    RunResult,
    StageContext,
    StageOutcome,
    file_digest,
    register_stage,
    run_pipeline,
    stage_fingerprint,
)

__all__ = [
    "STAGE_RUNNERS",
    "RunDirectory",
    "RunResult",
    "StageContext",
    "StageOutcome",
    "file_digest",
    "register_stage",
    "run_pipeline",
    "stage_fingerprint",
]
