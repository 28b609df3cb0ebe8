"""onnxopt: compress ONNX models with a pipeline of graph passes, checked against ONNX Runtime.

The public names below are imported on first use (PEP 562), so ``import onnxopt`` and
``onnxopt --version`` stay fast: onnx, onnx_ir and ONNX Runtime load when a function that needs
them is first reached. ``onnxopt.merge`` and ``onnxopt.tune`` are packages, callable as their `merge`
and `tune` functions.
"""

from __future__ import annotations

import sys

from onnxopt import _interrupt

if _interrupt.running_as_program():  # the onnxopt command (console script, python -m onnxopt[.cli]):
    _interrupt.quiet_interrupts()  # Ctrl-C while it starts is one line and exit 130, before anything loads

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "optimize": "onnxopt.api",
    "Result": "onnxopt.api",
    "merge": "onnxopt.merge",
    "merge_models": "onnxopt.merge",
    "tune": "onnxopt.tune",
    "TuneResult": "onnxopt.tune",
    "Context": "onnxopt.context",
    "load": "onnxopt.io",
    "save": "onnxopt.io",
    "Pipeline": "onnxopt.pipeline",
    "Pass": "onnxopt.registry",
    "PassStats": "onnxopt.registry",
    "option": "onnxopt.registry",
    "register_pass": "onnxopt.registry",
    "list_passes": "onnxopt.registry",
    "UsageError": "onnxopt.errors",
    "ModelError": "onnxopt.errors",
    "OnnxoptError": "onnxopt.errors",
}
"""Public name -> the module that defines it (``merge`` and ``tune`` are the packages themselves)."""

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` imports these
    from onnxopt.api import Result as Result
    from onnxopt.api import optimize as optimize
    from onnxopt.context import Context as Context
    from onnxopt.errors import ModelError as ModelError
    from onnxopt.errors import OnnxoptError as OnnxoptError
    from onnxopt.errors import UsageError as UsageError
    from onnxopt.io import load as load
    from onnxopt.io import save as save
    from onnxopt.merge import merge_models as merge_models
    from onnxopt.pipeline import Pipeline as Pipeline
    from onnxopt.registry import Pass as Pass
    from onnxopt.registry import PassStats as PassStats
    from onnxopt.registry import list_passes as list_passes
    from onnxopt.registry import option as option
    from onnxopt.registry import register_pass as register_pass
    from onnxopt.tune import TuneResult as TuneResult
    from onnxopt.tune import tune as tune


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``onnxopt.io``, ``onnxopt.bench``...), imported on first use."""
    module = _PUBLIC.get(name)
    if module == f"{__name__}.{name}":
        value = importlib.import_module(module)
    elif module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__"):
        value = _submodule(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def _submodule(name: str) -> Any:
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    """The public names and the submodules imported so far."""
    return sorted({*__all__, *(name for name in globals() if f"{__name__}.{name}" in sys.modules)})
