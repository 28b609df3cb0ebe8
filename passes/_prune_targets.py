"""Which weights `prune` may touch, and how each weight element meets its input features.

A target is one constant float initializer consumed only by prunable nodes (Conv, ConvTranspose,
Gemm, MatMul) in the weight role; a weight shared by several such nodes is one target, pruned once.
For every use we record the weight's *reduction axis* (the axis summed against the input features,
along which N:M blocks run) and the activation tensor with its *feature axis* (for the activation
criterion, which scales ``|W|`` by the L2 norm of the input feature each element multiplies), as
`onnxopt.analysis.layers.operand_axes` gives them for every linear op:

==============  =====================  ==================  ==============  ===================
op              weight                 activation          reduction axis  feature axis
==============  =====================  ==================  ==============  ===================
Conv            W[O, C/g, k...]        x[N, C, ...]        1               1 (grouped: W[o, i]
                                                                           meets channel
                                                                           (o // (O/g))·C/g + i)
ConvTranspose   W[C, O/g, k...]        x[N, C, ...]        0               1
Gemm            B[K, N] / B[N, K]      A[M, K] / A[K, M]   0 / 1 (transB)  1 / 0 (transA)
MatMul          x[..., K] @ W[.., K, N]                    -2              -1
MatMul          W[.., M, K] @ x[..., K, N]                 -1              -2
==============  =====================  ==================  ==============  ===================

Worked example: ``Gemm(A[8, 512], B[64, 512], transB=1)`` has reduction axis 1 of B; the norm of
column j of A (over the 8 rows and every calibration batch) scales row-wise ``B[:, j]``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.layers import LINEAR_OPS, conv_geometry, operand_axes
from onnxopt.graph import is_constant, iter_graphs
from onnxopt.registry import PassStats, matches_any

__all__ = ["PRUNABLE_OPS", "Use", "Target", "find_targets", "feature_scale"]

logger = logging.getLogger(__name__)

PRUNABLE_OPS = LINEAR_OPS
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclasses.dataclass(frozen=True)
class Use:
    """One prunable node reading the weight at input `index`."""

    node: ir.Node
    index: int
    axis: int
    """Reduction axis of the weight (non-negative)."""
    feature: ir.Value
    """The activation the weight multiplies."""
    feature_axis: int
    """Axis of `feature` that runs over the reduction index (may be negative)."""


@dataclasses.dataclass
class Target:
    """A weight to prune and every node that reads it."""

    value: ir.Value
    uses: list[Use]

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value.const_value.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def node_names(self) -> list[str]:
        return [u.node.name or u.node.op_type for u in self.uses]

    @property
    def op_types(self) -> list[str]:
        return sorted({u.node.op_type for u in self.uses})

    def reduction_axis(self) -> int | None:
        """The reduction axis all uses agree on, or None."""
        axes = {u.axis for u in self.uses}
        return axes.pop() if len(axes) == 1 else None

    def in_main_graph(self, graph: ir.Graph) -> bool:
        return all(u.node.graph is graph for u in self.uses)


def find_targets(
    model: ir.Model, exclude: Sequence[str], min_size: int, stats: PassStats
) -> list[Target]:
    """The prunable weights of `model` in node order; every declined node gets a reason in `stats`."""
    by_value: dict[int, Target] = {}
    for graph in iter_graphs(model.graph):
        for node in graph:
            use, reason = _try_weight_use(node)
            if use is None:
                if reason is None:  # not a prunable op
                    continue
                stats.skip(node, reason or "no prunable weight")
                continue
            value = node.inputs[use.index]
            by_value.setdefault(id(value), Target(value, [])).uses.append(use)
    targets = []
    for target in by_value.values():
        reason = _try_accept(target, exclude, min_size)
        if reason:
            for use in target.uses:
                stats.skip(use.node, reason)
            continue
        targets.append(target)
    return targets


def _try_weight_use(node: ir.Node) -> tuple[Use | None, str | None]:
    """The node's weight use, or the reason it has none ((None, None): not a prunable op)."""
    axes, reason = operand_axes(node)
    if axes is None:
        return None, reason
    if not is_constant(node.inputs[axes.weight]):
        return None, "weight is not a constant initializer"
    return Use(node, axes.weight, axes.reduction_axis, node.inputs[axes.activation], axes.feature_axis), None


def _try_accept(target: Target, exclude: Sequence[str], min_size: int) -> str | None:
    """None when `target` may be pruned, else the reason it stays dense."""
    value = target.value
    if value.is_graph_output():
        return "weight is a graph output"
    if value.const_value.dtype not in _FLOAT_TYPES:
        return f"weight dtype {value.const_value.dtype.name} is not float"
    roles = {(id(u.node), u.index) for u in target.uses}
    for usage in value.uses():
        if (id(usage.node), usage.idx) not in roles:
            other = usage.node.name or usage.node.op_type
            return f"weight '{target.name}' is also read by {other} ({usage.node.op_type}), which is not pruned"
    excluded = [u.node.name or u.node.op_type for u in target.uses if matches_any(u.node, exclude)]
    if excluded:
        if len(excluded) == len(target.uses):
            return "excluded (matches exclude)"
        return f"weight '{target.name}' is shared with excluded node {excluded[0]}"
    if target.size < min_size:
        return f"weight has {target.size} elements, fewer than min_size={min_size}"
    return None


def feature_scale(use: Use, weight_shape: tuple[int, ...], norms: np.ndarray) -> np.ndarray | None:
    """Per-element input norm for `use`, broadcastable to `weight_shape`; None if sizes disagree."""
    ndim = len(weight_shape)
    if use.node.op_type == "Conv":
        out_ch, in_per_group = weight_shape[0], weight_shape[1]
        group = conv_geometry(use.node, weight_shape).groups
        if group < 1 or norms.size != in_per_group * group or out_ch % group:
            return None
        group_of_out = np.arange(out_ch) // (out_ch // group)
        scale = norms.reshape(group, in_per_group)[group_of_out]
        return scale.reshape((out_ch, in_per_group) + (1,) * (ndim - 2))
    if norms.size != weight_shape[use.axis]:
        return None
    shape = [1] * ndim
    shape[use.axis] = norms.size
    return norms.reshape(shape)
