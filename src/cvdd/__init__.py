"""cvdd: dataset distillation by committee voting (CV-DD).

The Python API has the same names as the CLI subcommands::

    import cvdd
    experts = cvdd.squeeze("digits", archs=["convnet_d3_w32", "resnet8"], out="runs/experts")
    synthetic = cvdd.recover("runs/experts", "runs/synthetic", ipc=10, committee_size=2)
"""

__version__ = "0.1.0"

# The sub-packages cvdd.evaluate and cvdd.relabel share their names with API functions. Importing a package
# binds it as an attribute of its parent, so import them first: the functions below then win for good.
import cvdd.evaluate
import cvdd.relabel  # noqa: F401
from cvdd.api import (
    ablate,
    distill,
    evaluate,
    export,
    info,
    load_dataset,
    merge,
    prior,
    recover,
    relabel,
    report,
    squeeze,
)

__all__ = [
    "__version__",
    "ablate",
    "distill",
    "evaluate",
    "export",
    "info",
    "load_dataset",
    "merge",
    "prior",
    "recover",
    "relabel",
    "report",
    "squeeze",
]
