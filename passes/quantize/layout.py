"""Weight layout of the compute nodes, as the static and dynamic rewrites both need it.

- which Gemm is ``x @ W(ᵀ) + C`` (`gemm_declined`: transA=0, alpha = beta = 1);
- the output-channel axis of a weight, where one int8 scale per channel goes (`weight_axis`):
  Conv 0, ConvTranspose 1 (group 1 only), Gemm 0 with ``transB=1`` else 1, MatMul the last axis;
- the number of output channels, the length a bias must have (`out_channels`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["gemm_declined", "weight_axis", "out_channels"]


def gemm_declined(node: ir.Node) -> str | None:
    """Why a Gemm cannot be quantized as ``x @ W + C`` (transA or alpha/beta other than 1), else None."""
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1"
    return None


def weight_axis(node: ir.Node, w: np.ndarray, per_channel: bool) -> int | None:
    """The per-channel axis of a compute node's weight (None: one scale for the tensor)."""
    if not per_channel or w.ndim < 2:
        return None
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if op == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return w.ndim - 1


def out_channels(node: ir.Node, w: np.ndarray) -> int:
    """The number of output channels of a Conv / ConvTranspose / Gemm / MatMul with weight `w`."""
    if node.op_type == "Conv":
        return int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm":
        return int(w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1])
    return int(w.shape[-1])
