"""Evaluate: train students on a synthetic set with soft (or hard) labels and report real test top-1."""

from cvdd.evaluate.student import EvalConfig, EvalResult, SyntheticBatches, evaluate_synthetic, random_real_set

__all__ = ["EvalConfig", "EvalResult", "SyntheticBatches", "evaluate_synthetic", "random_real_set"]
