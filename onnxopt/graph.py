"""Small graph-surgery helpers every pass needs, over onnx_ir's use-def links.

Contract kept here: a new tensor that stands for an old one records it in the metadata prop
``onnxopt.origin``, so validation and distillation can pair student and teacher tensors.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = [
    "ORIGIN",
    "all_names",
    "unique_name",
    "new_initializer",
    "set_weight",
    "only_used_by",
    "record_origin",
    "origin_of",
    "take_over_output",
    "constant_array",
    "opset_version",
]

ORIGIN = "onnxopt.origin"


def all_names(graph: ir.Graph) -> set[str]:
    names = set(graph.initializers)
    names.update(v.name for v in graph.inputs if v.name)
    names.update(v.name for v in graph.outputs if v.name)
    for node in graph:
        if node.name:
            names.add(node.name)
        names.update(o.name for o in node.outputs if o.name)
    return names


def unique_name(graph: ir.Graph, base: str, taken: set[str] | None = None) -> str:
    """`base`, or `base.1`, `base.2`... whichever is not yet a name in `graph`."""
    taken = all_names(graph) if taken is None else taken
    name, k = base, 1
    while name in taken:
        name = f"{base}.{k}"
        k += 1
    taken.add(name)
    return name


def new_initializer(
    graph: ir.Graph, base: str, array: np.ndarray, *, origin: str | None = None, taken: set[str] | None = None
) -> ir.Value:
    """Register `array` as a new initializer of `graph` under a unique name derived from `base`.

    A rewrite that names many values passes one running `taken` set (from `all_names`): cheaper than
    a graph walk per name, and it also sees names of nodes built but not inserted yet.
    """
    name = unique_name(graph, base, taken)
    data = _contiguous(array)
    value = ir.Value(
        name=name,
        shape=ir.Shape(data.shape),
        type=ir.TensorType(ir.DataType.from_numpy(data.dtype)),
        const_value=ir.tensor(data, name=name),
    )
    graph.register_initializer(value)
    if origin:
        record_origin(value, origin)
    return value


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous array of the same shape (np.ascontiguousarray would make a 0-d array 1-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def set_weight(value: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's data (and shape) in place, keeping its name."""
    data = _contiguous(array)
    value.const_value = ir.tensor(data, name=value.name)
    value.shape = ir.Shape(data.shape)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a constant initializer that is not a graph input."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return np.asarray(value.const_value.numpy())


def only_used_by(value: ir.Value, node: ir.Node) -> bool:
    """True when `node` is the only consumer of `value` and it is not a graph output."""
    users = {id(u.node) for u in value.uses()}
    return users == {id(node)} and not value.is_graph_output()


def record_origin(value: ir.Value, original: str) -> None:
    value.metadata_props[ORIGIN] = original


def origin_of(value: ir.Value) -> str | None:
    return value.metadata_props.get(ORIGIN) or value.name


def take_over_output(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
    """Let `replacement` stand in for `node`'s first output under its name, and drop `node`."""
    old = node.outputs[0]
    name, shape, typ = old.name, old.shape, old.type
    old.replace_all_uses_with(replacement, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    replacement.name = name
    if shape is not None:
        replacement.shape = shape
    if typ is not None:
        replacement.type = typ


def opset_version(model: ir.Model | ir.Graph, default: int | None = 1) -> int | None:
    """The version of the default ONNX domain the model or graph imports, under '' or its alias
    'ai.onnx' (onnx_ir keeps them as separate keys), else `default`."""
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    return int(version) if version is not None else default
