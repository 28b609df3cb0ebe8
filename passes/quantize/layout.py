"""Weight layout of the compute nodes as the quantize steps need it, read from the shared layer view.

Every answer comes from `onnxopt.analysis.layers` (`operand_axes`: which input is the weight and which
of its axes are the reduction and the output channels; `conv_geometry` for groups); this module only
adds what quantization asks of it:

- which Gemm is ``x @ W(ᵀ) + C`` (`gemm_declined`: transA=0, alpha = beta = 1);
- the per-channel axis of a weight, where one int8 scale per output channel goes (`weight_axis`):
  the layer's output axis (Conv 0, ConvTranspose 1 with group 1 only, Gemm 0 with ``transB=1`` else
  1, MatMul the last axis);
- the number of output channels, the length a bias must have (`out_channels`);
- a 2-D Gemm/MatMul weight as ``[K, N]`` or ``[N, K]`` whatever its stored layout (`weight_kn`,
  `weight_nk`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.layers import OperandAxes, conv_geometry, linear_of, operand_axes

__all__ = ["gemm_declined", "weight_axes", "weight_axis", "out_channels", "weight_kn", "weight_nk", "stored_from_nk"]


def weight_axes(node: ir.Node) -> OperandAxes | None:
    """The weight/activation roles of a Conv/ConvTranspose/Gemm/MatMul with a constant weight, else None."""
    axes, _ = operand_axes(node)
    return axes


def gemm_declined(node: ir.Node) -> str | None:
    """Why a Gemm cannot be quantized as ``x @ W + C`` (transA or alpha/beta other than 1), else None."""
    layer, _ = linear_of(node)
    trans_a = layer.trans_a if layer is not None else bool(node.attributes.get_int("transA", 0))
    if trans_a:
        return "Gemm with transA=1"
    alpha = layer.alpha if layer is not None else node.attributes.get_float("alpha", 1.0)
    beta = layer.beta if layer is not None else node.attributes.get_float("beta", 1.0)
    if alpha != 1.0 or beta != 1.0:
        return "Gemm with alpha or beta other than 1"
    return None


def weight_axis(node: ir.Node, w: np.ndarray, per_channel: bool) -> int | None:
    """The per-channel axis of a compute node's weight (None: one scale for the tensor)."""
    if not per_channel or w.ndim < 2:
        return None
    axes = weight_axes(node)
    if axes is None or axes.weight != 1:
        return None
    if node.op_type == "ConvTranspose" and conv_geometry(node, w.shape).groups != 1:
        return None
    return axes.output_axis


def out_channels(node: ir.Node, w: np.ndarray) -> int:
    """The number of output channels of a Conv / ConvTranspose / Gemm / MatMul with weight `w`."""
    axes = weight_axes(node)
    axis = axes.output_axis if axes is not None else w.ndim - 1
    channels = int(w.shape[axis])
    if node.op_type == "ConvTranspose":
        channels *= conv_geometry(node, w.shape).groups
    return channels


def weight_kn(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """A 2-D Gemm/MatMul weight `w` (as stored) viewed as ``[K, N]``: K the reduction, N the outputs."""
    axes = weight_axes(node)
    if axes is None or w.ndim != 2:
        raise ValueError(f"{node.op_type} '{node.name}' has no 2-D weight view")
    return w if axes.reduction_axis == 0 else w.T


def weight_nk(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """A 2-D Gemm/MatMul weight `w` (as stored) viewed as ``[N, K]``: one row per output channel."""
    return weight_kn(node, w).T


def stored_from_nk(node: ir.Node, a: np.ndarray) -> np.ndarray:
    """An ``[N, K]`` array back in the node's stored weight layout (the inverse of `weight_nk`), contiguous."""
    return np.ascontiguousarray(a if _stored_as_nk(node) else a.T)


def _stored_as_nk(node: ir.Node) -> bool:
    axes = weight_axes(node)
    return axes is not None and axes.reduction_axis == 1
