"""Small graph helpers every pass needs, over onnx_ir's use-def links.

What more than one pass asks of a graph lives here, once: which domain is ONNX's own
(`is_default_domain`, `is_onnx_op`), which values are constants (`is_constant`, `constant_array`: an
initializer that is not also an overridable graph input), the graph and its subgraphs
(`iter_graphs`), the default opset and raising it (`opset_version`, `upgrade_opset`), names, new
initializers and rewiring, and what the pipeline does before the first pass so that every pass sees
weights the same way (`lift_constant_nodes`, `weights_from_inputs`). `require_finite` is the one guard
numeric routines call before math that non-finite numbers break.

Contract kept here: a new tensor that stands for an old one records it in the metadata prop
``onnxopt.origin``, so validation and distillation can pair student and teacher tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import ModelError, OnnxoptError, first_line

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
    "set_dtype",
    "name_stem",
    "only_used_by",
    "record_origin",
    "origin_of",
    "take_over_output",
    "constant_array",
    "opset_version",
    "lift_constant_nodes",
    "weights_from_inputs",
    "InitializerInputs",
    "prepare_weights",
    "require_finite",
]

logger = logging.getLogger(__name__)

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


def set_dtype(value: ir.Value, dtype: ir.DataType) -> None:
    """Give `value` a tensor type of `dtype`, as a new type object: onnx_ir's ``Value.dtype`` setter changes
    the type object in place, and ``Model.clone()`` shares type objects between the copies, so setting it on
    one copy (a pass's model) changed the other (the copy a pass keeps to write back)."""
    value.type = ir.TensorType(dtype)


_STEM_ROOM = 48


def name_stem(name: str) -> str:
    """The head and tail of a long name, as the stem of the names a rewrite derives from it: TensorFlow exports
    repeat scopes of 60-140 characters, and a few derived names per tensor (Q/DQ nodes, scales, zero points)
    made a 225 KB model's file 1.5x larger after int8. `unique_name` keeps the derived names unique."""
    if len(name) <= _STEM_ROOM:
        return name
    return f"{name[:16]}..{name[-(_STEM_ROOM - 18):]}"


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


# ------------------------------------------------------------------------------ weights, as passes see them
def lift_constant_nodes(model: ir.Model) -> int:
    """Turn every ``Constant`` node (main graph and subgraphs) into an initializer of its graph under its
    output's name, exactly; the number lifted.

    Exporters such as Paddle's keep every weight in a Constant node; as initializers they are weights
    to every pass. A Constant that is a graph output stays (an initializer cannot take its place there
    in every IR version), as do sparse and string ones.
    """
    lifted = 0
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if not is_onnx_op(node, "Constant") or len(node.outputs) != 1 or node.outputs[0].is_graph_output():
                continue
            tensor = _constant_tensor(node)
            if tensor is None:
                continue
            out = node.outputs[0]
            value = ir.Value(name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                             const_value=tensor, metadata_props=out.metadata_props.copy())
            out.replace_all_uses_with(value)
            graph.remove(node, safe=True)
            graph.register_initializer(value)
            lifted += 1
    return lifted


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    """The tensor a Constant node holds, or None for the forms no pass reads as a weight (sparse, strings)."""
    if len(node.attributes) != 1:
        return None
    attr = next(iter(node.attributes.values()))
    name = node.outputs[0].name
    if attr.name == "value":
        tensor = attr.as_tensor()
        tensor.name = name
        return tensor
    forms = {"value_int": (ir.DataType.INT64, False), "value_ints": (ir.DataType.INT64, True),
             "value_float": (ir.DataType.FLOAT, False), "value_floats": (ir.DataType.FLOAT, True)}
    if attr.name in forms:
        dtype, many = forms[attr.name]
        data = np.asarray(list(attr.value) if many else attr.value, dtype=dtype.numpy())
        return ir.tensor(data, dtype=dtype, name=name)
    return None


InitializerInputs = Literal["constant", "input"]
"""How an IR < 4 model's initializers, all of which it must also list as graph inputs, are read:
``constant`` (what ONNX Runtime does: it refuses feeds for them) or ``input`` (overridable)."""

_FIRST_IR_WITH_DEFAULTS = 4
"""The first IR version in which an initializer need not be a graph input (and one that is, is a default)."""


def weights_from_inputs(model: ir.Model, mode: InitializerInputs = "constant") -> str | None:
    """Bring an IR < 4 model to IR 4 so that passes may add initializers; None when nothing changed,
    else what was done, in a sentence for the user.

    Up to IR 3 every initializer must also be a graph input, and ONNX Runtime treats them all as
    constants. With ``mode="constant"`` they leave the main graph's inputs, so they are what they were
    (constant weights passes may compress) and new initializers stay valid; with ``mode="input"`` they
    stay inputs, which IR 4 makes overridable defaults, and passes leave them as they are.
    """
    if mode not in ("constant", "input"):
        raise ValueError(f"initializer inputs are 'constant' or 'input', not {mode!r}")
    if model.ir_version >= _FIRST_IR_WITH_DEFAULTS:
        return None
    before = model.ir_version
    graph = model.graph
    listed = [v for v in graph.inputs if v.name in graph.initializers and graph.initializers[v.name] is v]
    if mode == "constant" and listed:
        kept = [v for v in graph.inputs if v not in listed]
        graph.inputs.clear()
        graph.inputs.extend(kept)
    model.ir_version = _FIRST_IR_WITH_DEFAULTS
    logger.debug("IR version %d raised to %d (%d initializers listed as inputs, mode %s)",
                 before, model.ir_version, len(listed), mode)
    if not listed:
        return f"IR version {before} raised to {model.ir_version} (the first in which a pass may add a weight)"
    if mode == "constant":
        return (f"IR version {before} raised to {model.ir_version}: its {len(listed)} weights listed as graph "
                "inputs are constants, as ONNX Runtime treats them (keep them overridable inputs with "
                "--keep-initializer-inputs)")
    return (f"IR version {before} raised to {model.ir_version}: its {len(listed)} weights stay graph inputs, "
            "overridable by feeds, and passes leave them as they are")


def prepare_weights(model: ir.Model, initializer_inputs: InitializerInputs = "constant") -> list[str]:
    """What every pass relies on, done once before the first (and to a teacher loaded beside it): weights
    in Constant nodes become initializers, and an IR < 4 model's weights listed as inputs are constants
    (or overridable inputs, as asked). Exact, names kept; returns notes for the user."""
    notes = []
    ir_note = weights_from_inputs(model, initializer_inputs)
    if ir_note:
        notes.append(ir_note)
    lifted = lift_constant_nodes(model)
    if lifted:
        notes.append(f"{lifted} Constant node{'s' if lifted != 1 else ''} became initializers (names kept), "
                     "so every pass reads them as weights")
    return notes


def require_finite(
    array: np.ndarray, what: str, hint: str = "", *, error: type[OnnxoptError] = ModelError
) -> np.ndarray:
    """`array` when every number in it is finite, else a one-line `error` (ModelError: exit 2) naming `what`.

    Call it on the data a numeric routine (SVD, least squares, ranges, scales) is about to read:
    NaN and infinities make those fail deep inside (or silently give garbage).
    """
    data = np.asarray(array)
    if np.issubdtype(data.dtype, np.inexact) and not np.all(np.isfinite(data)):
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        extra = f"; {hint}" if hint else ""
        raise error(f"{what} holds {bad} NaN or infinite value{'s' if bad != 1 else ''}{extra}")
    return array
