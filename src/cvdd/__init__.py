"""cvdd: dataset distillation by committee voting (CV-DD).

The Python API has the same names as the CLI subcommands::

    import cvdd
    experts = cvdd.squeeze("digits", archs=["convnet_d3_w32", "resnet8"], out="runs/experts")
    synthetic = cvdd.recover("runs/experts", "runs/synthetic", ipc=10, committee_size=2)

The functions live in :mod:`cvdd.api` and are loaded on first use, so that ``import cvdd`` (and ``cvdd --help``)
does not pay for importing PyTorch. No module of this package is named like one of them: importing a submodule
binds it as an attribute of its package, which would otherwise replace the function of the same name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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
_API = frozenset(__all__[1:])

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    """The API functions, imported from :mod:`cvdd.api` when first asked for (PEP 562)."""
    if name in _API:
        from cvdd import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups find it without coming here
        return value
    raise AttributeError(f"module 'cvdd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
