"""Small graph helpers every pass needs, over onnx_ir's use-def links.

What more than one pass asks of a graph lives here, once: which domain is ONNX's own
(`is_default_domain`, `is_onnx_op`), which values are constants (`is_constant`, `constant_array`: an
initializer that is not also an overridable graph input), the graph and its subgraphs
(`iter_graphs`), the default opset and raising it (`opset_version`, `upgrade_opset`), names, new
initializers and rewiring.

Contract kept here: a new tensor that stands for an old one records it in the metadata prop
``onnxopt.origin``, so validation and distillation can pair student and teacher tensors.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.errors import first_line

__all__ = [
    "ORIGIN",
    "DEFAULT_DOMAINS",
    "is_default_domain",
    "is_onnx_op",
    "iter_graphs",
    "is_constant",
    "count_nodes",
    "count_initializers",
    "upgrade_opset",
    "min_ir_version",
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
DEFAULT_DOMAINS = ("", "ai.onnx")
"""The names ONNX's own operator domain goes by (onnx_ir keeps them as separate keys)."""


def is_default_domain(domain: str | None) -> bool:
    return (domain or "") in DEFAULT_DOMAINS


def is_onnx_op(node: ir.Node | None, *op_types: str) -> bool:
    """True when `node` is an operator of ONNX's own domain, and one of `op_types` when given."""
    return node is not None and is_default_domain(node.domain) and (not op_types or node.op_type in op_types)


def iter_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """The graph and every subgraph below it (If/Loop/Scan bodies), without recursion."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    stack.append(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    stack.extend(attr.value)


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph and every subgraph."""
    return sum(len(g) for g in iter_graphs(model.graph))


def count_initializers(model: ir.Model) -> int:
    """Initializers of the main graph and every subgraph."""
    return sum(len(g.initializers) for g in iter_graphs(model.graph))


def is_constant(value: ir.Value | None) -> bool:
    """True for an initializer that is not also a graph input (inputs can be overridden)."""
    return value is not None and value.const_value is not None and not value.is_graph_input()


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
    """The value's data when it `is_constant`, else None."""
    if not is_constant(value):
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


def min_ir_version(opset: int) -> int:
    """The IR version of the first onnx release that knew default-domain `opset` (at least 3)."""
    import onnx.helper

    for row in onnx.helper.VERSION_TABLE:
        if row[2] >= opset:
            return max(3, int(row[1]))
    return int(onnx.helper.VERSION_TABLE[-1][1])


def upgrade_opset(model: ir.Model, target: int) -> str | None:
    """Raise `model`'s default-domain opset to `target` in place with onnx's version converter.

    Returns None when done (or nothing to do), else the converter's reason in one line. One policy
    for weights: the model goes to the converter as protobuf with external weights left as
    references (never read into memory), and the converted graph takes them back as they were.
    The IR version is raised to what `target` needs, so the model stays valid.
    """
    from onnx import version_converter

    current = opset_version(model, None)
    if current is None or current >= target:
        return None
    try:
        proto = ir.to_proto(model)
        converted = ir.from_proto(version_converter.convert_version(proto, target))
    except Exception as exc:  # the converter raises RuntimeError and friends for missing adapters
        return first_line(exc, 200)
    originals = {name: value.const_value for g in iter_graphs(model.graph) for name, value in g.initializers.items()}
    for g in iter_graphs(converted.graph):
        for name, value in g.initializers.items():
            before = originals.get(name)
            if before is not None and isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = before
    model.graph = converted.graph
    model.ir_version = max(model.ir_version, converted.ir_version, min_ir_version(target))
    return None
