"""onnxopt: compress ONNX models with a pipeline of graph passes, checked against ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from onnxopt.api import Result, optimize
from onnxopt.context import Context
from onnxopt.errors import ModelError, OnnxoptError, UsageError
from onnxopt.io import load, save
from onnxopt.merge import merge, merge_models
from onnxopt.pipeline import Pipeline
from onnxopt.registry import Pass, PassStats, list_passes, option, register_pass

__all__ = [
    "__version__",
    "optimize",
    "merge",
    "merge_models",
    "Result",
    "Context",
    "load",
    "save",
    "Pipeline",
    "Pass",
    "PassStats",
    "option",
    "register_pass",
    "list_passes",
    "UsageError",
    "ModelError",
    "OnnxoptError",
]
