"""Parameters, nonzeros and multiply-accumulates (MACs) of a model.

MACs are counted for the ops that do the arithmetic (Conv, ConvTranspose, Gemm, MatMul and their
integer/QLinear forms, MatMulNBits); element-wise ops are not counted. Symbolic dimensions take
their value from ``dims`` (default 1), so a dynamic-batch model is counted at batch 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.graph import iter_graphs, set_dtype

__all__ = ["ModelStats", "model_stats", "macs_by_node", "infer_shapes", "dim_values"]

logger = logging.getLogger(__name__)

_NOT_PARAMS = {ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL, ir.DataType.STRING}


@dataclasses.dataclass
class ModelStats:
    nodes: int
    op_histogram: dict[str, int]
    parameters: int
    nonzero: int | None
    macs: int
    macs_unknown_nodes: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def infer_shapes(model: ir.Model) -> bool:
    """Run ONNX shape inference on `model` in place (lenient, no data propagation). False when it failed.

    Only what inference adds is taken: the type of a value that had none (a sequence stays a sequence:
    its type is copied whole, never rebuilt from an element type) and the shapes and element types of
    tensors. The declared shapes of the graph's inputs and outputs are kept as they were: inference may
    refine a symbolic output dim to a number (an LSTM state [1, dim, 128] to [1, 1, 128]), and the
    model's interface must not change.

    Data propagation is off: on a model from anywhere it materializes every integer tensor it can
    compute as a list of dims (a ``Range(0, 2**40)`` or a chain of ``Concat`` doublings needs more memory
    than any machine has), and it buys nothing that folding the shape subgraph does not.
    Weights above 1 KB go to inference as typed inputs without their data, so a large model is never
    serialized whole.
    """
    declared = [(v, v.shape, v.type) for v in (*model.graph.inputs, *model.graph.outputs)]
    try:
        proto = _inference_proto(model)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=False)
        _merge_inferred(model, ir.serde.deserialize_model(inferred))
        return True
    except Exception as exc:  # models with custom ops can defeat onnx's inference
        logger.debug("shape inference failed: %s", exc)
        return False
    finally:
        for value, shape, typ in declared:
            value.shape = shape
            if typ is not None:
                value.type = typ


_INFERENCE_DATA_LIMIT = 1024
"""Initializers larger than this (bytes) go to shape inference without their data."""


def _inference_proto(model: ir.Model) -> onnx.ModelProto:
    """`model` as protobuf for shape inference: main-graph initializers above `_INFERENCE_DATA_LIMIT`
    bytes become typed graph inputs without data for the time of the serialization (the model is
    restored as it was, whatever happens)."""
    graph = model.graph
    inputs = list(graph.inputs)
    held: list[ir.Value] = []
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _INFERENCE_DATA_LIMIT:
            continue
        if value.shape is None:
            value.shape = ir.Shape(tensor.shape)
        if value.type is None:
            value.type = ir.TensorType(tensor.dtype)
        held.append(value)
    try:
        for value in held:
            graph.initializers.pop(value.name)
            if not value.is_graph_input():
                graph.inputs.append(value)
        tensors = [(v, v.const_value) for v in held]
        for value in held:
            value.const_value = None
        try:
            return ir.serde.serialize_model(model)
        finally:
            for value, tensor in tensors:
                value.const_value = tensor
    finally:
        graph.inputs.clear()
        graph.inputs.extend(inputs)
        for value in held:
            graph.register_initializer(value)


def _merge_inferred(model: ir.Model, inferred: ir.Model) -> None:
    """Take from `inferred` (the same graphs, inferred) the types values lack and the tensor shapes."""
    for graph, other in zip(model.graphs(), inferred.graphs()):
        found = ir.convenience.create_value_mapping(other)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = found.get(name)
            if new is None or new.type is None:
                continue
            if value.type is None:
                value.type = new.type
            elif not isinstance(value.type, ir.TensorType) or not isinstance(new.type, ir.TensorType):
                continue  # a sequence, optional or map stays what it is
            elif new.dtype is not None and value.dtype != new.dtype:
                set_dtype(value, new.dtype)
            if new.shape is not None and value.shape != new.shape:
                value.shape = new.shape


def dim_values(shape: ir.Shape | None, dims: dict[str, int]) -> list[int] | None:
    if shape is None:
        return None
    out = []
    for d in shape.dims:
        if isinstance(d, int):
            out.append(d if d >= 0 else 1)
        elif isinstance(d, ir.SymbolicDim) and d.value is not None:
            out.append(dims.get(d.value, 1))
        else:
            out.append(1)
    return out


def _weight_shape(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    if any(not isinstance(d, int) for d in value.shape.dims):
        return None
    return list(value.shape.dims)


def node_macs(node: ir.Node, dims: dict[str, int]) -> int | None:
    """MACs of one node, or None when it does arithmetic whose shapes are unknown; 0 if not counted."""
    op = node.op_type
    out = dim_values(node.outputs[0].shape, dims) if node.outputs else None
    if op in ("Conv", "ConvInteger", "QLinearConv", "NhwcConv", "FusedConv"):
        w = _weight_shape(node.inputs[3] if op == "QLinearConv" else node.inputs[1])
        if out is None or w is None:
            return None
        return math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose":
        x = dim_values(node.inputs[0].shape, dims) if node.inputs[0] is not None else None
        w = _weight_shape(node.inputs[1])
        if x is None or w is None:
            return None
        return math.prod(x) * math.prod(w[1:])
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "QGemm", "FusedMatMul"):
        a = dim_values(node.inputs[0].shape, dims) if node.inputs[0] is not None else None
        if out is None or a is None or not a:
            return None
        k = a[-1]
        if op in ("Gemm", "QGemm") and node.attributes.get_int("transA", 0):
            k = a[0]
        if len(a) == 1:
            k = a[0]
        return math.prod(out) * k
    if op == "MatMulNBits":
        k = node.attributes.get_int("K", 0)
        if out is None or not k:
            return None
        return math.prod(out) * k
    return 0


def macs_by_node(model: ir.Model, dims: dict[str, int] | None = None) -> dict[str, int | None]:
    """MACs of every arithmetic node, subgraph bodies included (an If branch counts as if taken)."""
    dims = dims or {}
    result: dict[str, int | None] = {}
    for graph in iter_graphs(model.graph):
        for i, node in enumerate(graph):
            m = node_macs(node, dims)
            if m != 0:
                key = node.name or f"{graph.name or 'graph'}.{node.op_type}_{i}"
                result[key if key not in result else f"{key}#{i}"] = m
    return result


# Counting nonzeros reads every weight; past this many weight bytes the count is skipped (reported
# as unknown) so that the statistics of a large model do not page all of it into memory.
NONZERO_COUNT_LIMIT = 1 << 30


def model_stats(
    model: ir.Model, dims: dict[str, int] | None = None, *, count_nonzero: bool | None = None
) -> ModelStats:
    """Counts over the main graph and its subgraphs; shapes inferred first (in place).

    ``count_nonzero=None`` counts nonzeros only below `NONZERO_COUNT_LIMIT` weight bytes.
    """
    from onnxopt.io import release_mapping, weight_bytes

    if count_nonzero is None:
        count_nonzero = weight_bytes(model) <= NONZERO_COUNT_LIMIT
    infer_shapes(model)
    hist: Counter[str] = Counter()
    params = 0
    nonzero = 0
    nbytes = 0
    nodes = 0
    for graph in iter_graphs(model.graph):
        for node in graph:
            nodes += 1
            hist[node.op_type if not node.domain else f"{node.domain}.{node.op_type}"] += 1
            if node.op_type == "Constant" and "value" in node.attributes:
                # Exporters such as Paddle's keep every weight in a Constant node.
                tensor = node.attributes["value"].value
                nbytes += int(tensor.nbytes)
                if tensor.dtype not in _NOT_PARAMS:
                    params += int(tensor.size)
                    if count_nonzero:
                        nonzero += int(np.count_nonzero(tensor.numpy()))
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            nbytes += int(tensor.nbytes)
            if tensor.dtype in _NOT_PARAMS:
                continue
            params += int(tensor.size)
            if count_nonzero:
                nonzero += int(np.count_nonzero(tensor.numpy()))
                release_mapping(tensor)  # the pages read for counting leave the resident set
    macs = macs_by_node(model, dims)
    known = [m for m in macs.values() if m is not None]
    unknown = sum(1 for m in macs.values() if m is None)
    return ModelStats(
        nodes=nodes,
        op_histogram=dict(hist.most_common()),
        parameters=params,
        nonzero=nonzero if count_nonzero else None,
        macs=int(sum(known)),
        macs_unknown_nodes=unknown,
        weight_bytes=nbytes,
    )
