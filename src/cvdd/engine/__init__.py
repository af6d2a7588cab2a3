"""The one supervised training engine (squeeze trains experts with it; evaluate trains students).

The loop lives in :mod:`cvdd.engine.loop`; no module here is named `fit`, so `cvdd.engine.fit` is always the function.
"""

from cvdd.engine.loop import FitResult, evaluate_accuracy, fit, lr_factor

__all__ = ["FitResult", "evaluate_accuracy", "fit", "lr_factor"]
