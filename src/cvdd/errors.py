"""User-facing errors.

Every problem caused by the user's input (a missing path, a corrupt image, a wrong class count, an
unknown architecture, ...) is raised as a :class:`CvddError` subclass with a one-line message that names
the problem. The CLI prints the message alone (no traceback) and exits with status 2.
"""

from __future__ import annotations


class CvddError(Exception):
    """Base class of every error caused by input that cvdd can explain in one line."""


class DataError(CvddError):
    """A dataset path, image or class layout is unusable."""


class ModelError(CvddError):
    """An unknown architecture or a model that does not fit the dataset."""


class ArtifactError(CvddError):
    """A checkpoint or artifact is missing, corrupt or was made for another dataset."""


class ConfigError(CvddError):
    """A preset or option has an unknown key, a wrong type or an invalid value."""
