"""cvdd: dataset distillation by committee voting (CV-DD).

The Python API has the same names as the CLI subcommands::

    import cvdd
    experts = cvdd.squeeze("digits", archs=["convnet_d3_w32", "resnet8"], out="runs/experts")
"""

__version__ = "0.1.0"

from cvdd.api import load_dataset, squeeze

__all__ = ["__version__", "load_dataset", "squeeze"]
