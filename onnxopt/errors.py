"""Errors a user can act on.

`UsageError` and `ModelError` carry one readable line; the CLI prints it and exits 2. Anything
else raised from the package is a bug, shown with a traceback only under ``--debug``.
"""

from __future__ import annotations

__all__ = ["OnnxoptError", "UsageError", "ModelError", "first_line"]


class OnnxoptError(Exception):
    """Base of the errors that are the user's to fix (exit code 2)."""


class UsageError(OnnxoptError):
    """A bad option, value, path or data set given by the user."""


class ModelError(OnnxoptError):
    """A model that cannot be read, is invalid, or cannot be processed as asked."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), cut to `limit` characters:
    what a one-line error quotes from onnx, protobuf or ONNX Runtime."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
