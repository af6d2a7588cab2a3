"""cvdd: dataset distillation by committee voting (CV-DD).

The Python API has the same names as the CLI subcommands::

    import cvdd
    experts = cvdd.squeeze("digits", archs=["convnet_d3_w32", "resnet8"], out="runs/experts")
    synthetic = cvdd.recover("runs/experts", "runs/synthetic", ipc=10, committee_size=2)
"""

__version__ = "0.1.0"

from cvdd.api import distill, evaluate, export, info, load_dataset, prior, recover, relabel, squeeze

__all__ = [
    "__version__",
    "distill",
    "evaluate",
    "export",
    "info",
    "load_dataset",
    "prior",
    "recover",
    "relabel",
    "squeeze",
]
