"""Rules of the ops that keep channel ``i`` at index ``i``: activations, pooling, Pad, Resize,
normalizations, reductions over other axes, and element-wise ops, which also join tracked branches.

Each rule pushes the per-channel constant (what a channel holds when its filter is all zero)
through the op, or makes it NaN when the op does not keep it constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups._operands import (
    axes_operand,
    axis_attribute,
    const_ints,
    const_weight,
    dims_of,
    input_at,
    on_tracked_input,
    rank_of,
)
from onnxopt.analysis.channel_groups.spaces import ParamSlice, Space
from onnxopt.graph import constant_array

if TYPE_CHECKING:
    from onnxopt.analysis.channel_groups.graph import ChannelGraph

__all__ = [
    "UNARY",
    "SPATIAL",
    "BINARY",
    "REDUCE",
    "rule_unary",
    "rule_softmax",
    "rule_batchnorm",
    "rule_instancenorm",
    "rule_layernorm",
    "rule_binary",
    "rule_reduce",
]


UNARY: dict[str, Callable[[np.ndarray, ir.Node], np.ndarray]] = {
    "Relu": lambda x, n: np.maximum(x, 0),
    "LeakyRelu": lambda x, n: np.where(x >= 0, x, x * n.attributes.get_float("alpha", 0.01)),
    "Sigmoid": lambda x, n: 1 / (1 + np.exp(-x)),
    "Tanh": lambda x, n: np.tanh(x),
    "Erf": lambda x, n: np.vectorize(math.erf, otypes=[float])(x),
    "Neg": lambda x, n: -x,
    "Abs": lambda x, n: np.abs(x),
    "Exp": lambda x, n: np.exp(x),
    "Sqrt": lambda x, n: np.sqrt(x),
    "Reciprocal": lambda x, n: 1 / x,
    "Softplus": lambda x, n: np.log1p(np.exp(x)),
    "Elu": lambda x, n: np.where(x >= 0, x, n.attributes.get_float("alpha", 1.0) * (np.exp(x) - 1)),
    "HardSigmoid": lambda x, n: np.clip(n.attributes.get_float("alpha", 0.2) * x
                                        + n.attributes.get_float("beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / 6 + 0.5, 0, 1),
    "Identity": lambda x, n: x,
    "Dropout": lambda x, n: x,
    "Cast": lambda x, n: x,
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
}
# Ops that keep a spatially constant channel constant (borders of padded windows aside).
SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample"}
BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power, "Sum": np.add,
}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd"}


@on_tracked_input
def rule_unary(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return f"its second output ({node.outputs[1].name}) is used"
    fn = UNARY.get(node.op_type)
    consts = cg.consts(x)
    if node.op_type == "Clip":
        lo, hi = constant_array(input_at(node, 1)), constant_array(input_at(node, 2))
        consts = np.clip(consts, -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))
    elif fn is not None:
        with np.errstate(all="ignore"):
            consts = fn(consts, node)
    elif node.op_type not in SPATIAL and node.op_type != "Pad":
        consts = np.full(x.size, math.nan)
    if node.op_type == "Pad":
        reason = _check_pad(node, x)
        if reason:
            return reason
    if node.op_type in ("Resize", "Upsample"):
        reason = _check_resize(node, x)
        if reason:
            return reason
    cg.follow(x, node.outputs[0], x.axis, consts)
    return None


def _check_resize(node: ir.Node, x: Space) -> str | None:
    if node.op_type == "Resize" and input_at(node, 3) is not None:
        return "Resize by explicit sizes"
    index = 2 if node.op_type == "Resize" else 1
    if input_at(node, index) is None:
        return None if node.op_type == "Resize" else "scales not given"
    scales = constant_array(node.inputs[index])
    if scales is None:
        return "scales are not constant"
    if scales.size and (scales.size <= x.axis or float(scales.reshape(-1)[x.axis]) != 1.0):
        return "resizes the channel axis"
    return None


def _check_pad(node: ir.Node, x: Space) -> str | None:
    pads = const_ints(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("pads", None)
    if pads is None:
        return "pads are not constant"
    rank = len(pads) // 2
    axes = const_ints(node.inputs[3]) if input_at(node, 3) is not None else list(range(rank))
    for k, ax in enumerate(axes):
        ax = ax % (rank_of(node.inputs[0]) or rank)
        if ax == x.axis and (pads[k] or pads[k + rank]):
            return "pads the channel axis"
    return None


@on_tracked_input
def rule_softmax(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    axis = axis_attribute(node, -1 if cg.opset >= 13 else 1)
    if axis is None:
        return "rank unknown"
    if axis == x.axis or (cg.opset < 13 and axis <= x.axis):
        return "normalizes over the channel axis"
    cg.follow(x, node.outputs[0], x.axis, np.full(x.size, math.nan))
    return None


@on_tracked_input
def rule_batchnorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if x.axis != 1:
        return "channel is not on axis 1"
    params = [const_weight(node, i) for i in range(1, 5)]
    if any(p is None for p in params) or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "parameters are not constant, or training outputs are used"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = node.attributes.get_float("epsilon", 1e-5)
    consts = (cg.consts(x) - mean) * gamma / np.sqrt(var + eps) + beta
    cg.follow(x, node.outputs[0], 1, consts)
    for i in range(1, 5):
        cg.slices.append(ParamSlice(node, i, 0, x))
    return None


@on_tracked_input
def rule_instancenorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if x.axis != 1 or const_weight(node, 1) is None or const_weight(node, 2) is None:
        return "channel not on axis 1 or parameters not constant"
    cg.follow(x, node.outputs[0], 1, const_weight(node, 2).astype(np.float64))
    cg.slices.append(ParamSlice(node, 1, 0, x))
    cg.slices.append(ParamSlice(node, 2, 0, x))
    return None


@on_tracked_input
def rule_layernorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    axis = axis_attribute(node, -1)
    if axis is None:
        return "rank unknown"
    if x.axis >= axis:
        return "normalizes over the channel axis"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "mean/inv-std outputs are used"
    cg.follow(x, node.outputs[0], x.axis, np.full(x.size, math.nan))
    return None


def _aligned_axis(rank_in: int, rank_out: int, axis: int) -> int:
    return axis + rank_out - rank_in


def rule_binary(cg: ChannelGraph, node: ir.Node) -> str | None:
    inputs = [(k, v) for k, v in enumerate(node.inputs) if v is not None]
    spaces = [cg.space_of(v) for _, v in inputs]
    if all(s is None for s in spaces):
        return None
    ro = rank_of(node.outputs[0])
    ranks = [rank_of(v) for _, v in inputs]
    if ro is None or any(r is None for r in ranks):
        return "ranks unknown"
    axes = {_aligned_axis(r, ro, s.axis) for r, s in zip(ranks, spaces) if s is not None}
    sizes = {s.size for s in spaces if s is not None}
    if len(axes) != 1 or len(sizes) != 1:
        return "inputs carry channels on different axes or with different counts"
    axis, size = axes.pop(), sizes.pop()
    vectors: list[np.ndarray] = []
    pending: list[tuple[int, int]] = []
    for (k, v), r, s in zip(inputs, ranks, spaces):
        if s is not None:
            vectors.append(cg.consts(s))
            continue
        local = axis - (ro - r)
        dims = dims_of(v)
        dim = dims[local] if 0 <= local < len(dims) else 1
        arr = constant_array(v)
        if dim != 1 and (arr is None or dim != size):
            return "an untracked input is not a per-channel constant"
        if dim != 1:
            pending.append((k, local))
        vectors.append(_per_channel(arr, size, local if dim != 1 else -1))
    out = cg.new_space(node.outputs[0], axis, size)
    for s in spaces:
        if s is not None:
            for i in range(size):
                cg.union(s.base + i, out.base + i)
    for k, local in pending:
        cg.slices.append(ParamSlice(node, k, local, out))
    fn = BINARY.get(node.op_type)
    if fn is not None:
        with np.errstate(all="ignore"):
            acc = vectors[0]
            for vec in vectors[1:]:
                acc = fn(acc, vec)
        cg.const[out.base:out.base + size] = [float(c) for c in acc]
    return None


def _per_channel(arr: np.ndarray | None, size: int, axis: int) -> np.ndarray:
    """The per-channel vector of a broadcast constant (NaN when it varies along other axes)."""
    if arr is None:
        return np.full(size, math.nan)
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 0:
        return np.full(size, float(a))
    if not 0 <= axis < a.ndim:
        flat = a.reshape(-1)
        return np.full(size, float(flat[0])) if np.all(flat == flat[0]) else np.full(size, math.nan)
    moved = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    if moved.shape[1] and not np.all(moved == moved[:, :1]):
        return np.full(size, math.nan)
    col = moved[:, 0] if moved.shape[1] else np.zeros(a.shape[axis])
    return np.broadcast_to(col, (size,)).astype(np.float64)



@on_tracked_input
def rule_reduce(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = rank_of(node.inputs[0])
    if rank is None:
        return "rank unknown"
    axes, reason = axes_operand(node)
    if reason:
        return reason
    axes = list(range(rank)) if not axes else [a % rank for a in axes]
    if x.axis in axes:
        return "reduces over the channel axis"
    keep = node.attributes.get_int("keepdims", 1)
    axis = x.axis if keep else x.axis - sum(1 for a in axes if a < x.axis)
    consts = cg.consts(x) if node.op_type in ("ReduceMean", "ReduceMax", "ReduceMin") else None
    cg.follow(x, node.outputs[0], axis, consts if consts is not None else np.full(x.size, math.nan))
    return None
