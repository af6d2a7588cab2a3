"""The one supervised training engine (squeeze trains experts with it; evaluate trains students)."""

from cvdd.engine.fit import FitResult, evaluate_accuracy, fit, lr_factor

__all__ = ["FitResult", "evaluate_accuracy", "fit", "lr_factor"]
