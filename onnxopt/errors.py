"""Errors a user can act on.

`UsageError` and `ModelError` carry one readable line; the CLI prints it and exits 2. Anything
else raised from the package is a bug, shown with a traceback only under ``--debug``.
"""

from __future__ import annotations

__all__ = ["OnnxoptError", "UsageError", "ModelError"]


class OnnxoptError(Exception):
    """Base of the errors that are the user's to fix (exit code 2)."""


class UsageError(OnnxoptError):
    """A bad option, value, path or data set given by the user."""


class ModelError(OnnxoptError):
    """A model that cannot be read, is invalid, or cannot be processed as asked."""
