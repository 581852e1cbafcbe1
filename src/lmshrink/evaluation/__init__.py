"""Evaluation: perplexity (stated protocols), agreement with a reference (KL, top-1), classification accuracy,
size on disk and bits per weight, latency/throughput/memory. Every function returns a typed pydantic result
carrying its protocol and provenance (``.to_json()``)."""

from lmshrink.evaluation.accuracy import evaluate_accuracy, predict
from lmshrink.evaluation.agreement import evaluate_agreement
from lmshrink.evaluation.perplexity import PROTOCOLS, evaluate_perplexity
from lmshrink.evaluation.results import (
    AccuracyResult,
    AgreementResult,
    EvalResult,
    LatencyPoint,
    PerplexityResult,
    SizeResult,
    SpeedResult,
)
from lmshrink.evaluation.size import count_logical_parameters, describe_kernels, measure_size
from lmshrink.evaluation.speed import measure_speed

__all__ = [
    "PROTOCOLS",
    "AccuracyResult",
    "AgreementResult",
    "EvalResult",
    "LatencyPoint",
    "PerplexityResult",
    "SizeResult",
    "SpeedResult",
    "count_logical_parameters",
    "describe_kernels",
    "evaluate_accuracy",
    "evaluate_agreement",
    "evaluate_perplexity",
    "measure_size",
    "measure_speed",
    "predict",
]
