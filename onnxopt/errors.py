"""Errors a user can act on, and how text from a model or a library is made fit for a one-line message.

`UsageError` and `ModelError` carry one readable line; the CLI prints it and exits 2. Anything
else raised from the package is a bug, shown with a traceback only under ``--debug``.

Names come from the model file (tensor, node, input and output names) and may hold newlines,
control characters or terminal escape codes: `safe_name` escapes them repr-style (``\\n``,
``\\x1b``) before they reach a message, and `first_line` does the same to what it quotes from onnx,
protobuf or ONNX Runtime (whose messages repeat node names).
"""

from __future__ import annotations

__all__ = ["OnnxoptError", "UsageError", "ModelError", "first_line", "safe_name", "printable"]

_NAME_LIMIT = 200


class OnnxoptError(Exception):
    """Base of the errors that are the user's to fix (exit code 2)."""


class UsageError(OnnxoptError):
    """A bad option, value, path or data set given by the user."""


class ModelError(OnnxoptError):
    """A model that cannot be read, is invalid, or cannot be processed as asked."""


def _escaped(ch: str) -> str:
    """One non-printable character as Python writes it in a string literal (``\\n``, ``\\x1b``, ``\\u202e``)."""
    return repr(ch)[1:-1]


def printable(text: str) -> str:
    """`text` with every non-printable character (newlines, control and escape codes, bidi overrides)
    escaped repr-style; printable characters, including non-ASCII letters, are kept as they are."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escaped(ch) for ch in text)


def safe_name(name: object, limit: int = _NAME_LIMIT) -> str:
    """A name taken from a model, fit for a one-line message: backslashes and non-printable
    characters escaped repr-style, cut to `limit` characters (marked with ``...``)."""
    text = printable(str(name).replace("\\", "\\\\"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), cut to `limit` characters, with
    control characters escaped: what a one-line error quotes from onnx, protobuf or ONNX Runtime."""
    text = str(exc).strip() or type(exc).__name__
    return printable(text.splitlines()[0])[:limit]
