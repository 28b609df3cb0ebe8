"""Which graph outputs carry class scores, read from the graph rather than guessed from a shape.

An output carries class scores when it comes from a Softmax/LogSoftmax over its last axis, or from a
Gemm/MatMul with a constant weight of more than one output column, through nodes that keep the scores'
order: Identity, Reshape, Squeeze, Unsqueeze, Flatten, Cast, and a bias or scale (Add, Sub, Mul, Div
with a constant operand). A sigmoid map, boxes, a pooled sentence embedding or a hidden state do not,
whatever their shape, so a ``[N, D]`` embedding is not mistaken for ``N`` rows of ``D`` classes.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.graph import is_constant, is_onnx_op

__all__ = ["class_outputs"]

_PASS_THROUGH = ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast")
_AFFINE = ("Add", "Sub", "Mul", "Div")


def _scores_input(node: ir.Node) -> ir.Value | None:
    """The input whose scores `node` passes on in order, or None when it does not."""
    if is_onnx_op(node, *_PASS_THROUGH) and node.inputs:
        return node.inputs[0]
    if is_onnx_op(node, *_AFFINE) and len(node.inputs) == 2:
        a, b = node.inputs
        if b is not None and is_constant(b) and a is not None:
            return a
        if node.op_type in ("Add", "Mul") and a is not None and is_constant(a) and b is not None:
            return b
    return None


def class_outputs(graph: ir.Graph) -> dict[str, int | None]:
    """Graph outputs that carry class scores, with their class count when the graph says it."""
    found: dict[str, int | None] = {}
    for out in graph.outputs:
        if out.dtype is not None and not out.dtype.is_floating_point():
            continue
        value, node = out, out.producer()
        for _ in range(64):  # a chain of reshapes and biases, never a loop
            source = _scores_input(node) if node is not None else None
            if source is None:
                break
            value, node = source, source.producer()
        if node is None:
            continue
        if is_onnx_op(node, "Softmax", "LogSoftmax"):
            rank = value.shape.rank() if value.shape is not None else None
            axis = node.attributes.get_int("axis", -1)
            if axis == -1 or (rank is not None and axis == rank - 1):
                found[out.name] = None
        elif is_onnx_op(node, "Gemm", "MatMul"):
            w = node.inputs[1] if len(node.inputs) > 1 else None
            dims = tuple(w.const_value.shape) if is_constant(w) else ()  # the shape only: no weight is read
            if len(dims) != 2:
                continue
            width = int(dims[0] if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else dims[1])
            if width > 1:
                found[out.name] = width
    return found
