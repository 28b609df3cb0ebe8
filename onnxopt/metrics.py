"""The names of the agreement metrics a tolerance can bound (``--metric``), in one place.

`onnxopt.validate` computes them; the command line offers them as choices. This module imports
nothing, so building the parser (``onnxopt --help``) stays free of numpy, onnx and ONNX Runtime.
"""

from __future__ import annotations

__all__ = ["METRICS"]

METRICS: tuple[str, ...] = ("rel_l2", "max_abs", "cosine", "top1", "accuracy")
