"""Evaluate: train students on a synthetic set with soft (or hard) labels and report real test top-1."""

from cvdd.evaluation.student import (
    EvalConfig,
    EvalJob,
    EvalResult,
    SyntheticBatches,
    evaluate_many,
    evaluate_synthetic,
    random_real_set,
)

__all__ = [
    "EvalConfig",
    "EvalJob",
    "EvalResult",
    "SyntheticBatches",
    "evaluate_many",
    "evaluate_synthetic",
    "random_real_set",
]
