"""Weight averaging ("model soup"): ``onnxopt merge --combine soup`` and ``merge_models(..., combine="soup")``.

Members must have the same architecture. The check walks the main graphs node by node, in
order, and builds a correspondence between the members' values:

- graph inputs pair by position and must carry the same names; graph outputs likewise;
- node ``k`` of a member pairs with node ``k`` of the first member: same domain, op type,
  overload, number of inputs and outputs, and equal attributes;
- an input of node ``k`` is either absent in both, the same graph input in both, the paired
  output of an earlier node in both, or a constant initializer in both with equal dtype and
  shape (and the same weight-sharing pattern: one weight of the first member pairs with one
  weight of every other member).

The first mismatch is reported with the node, what differs, and both values. Then every paired
float initializer becomes ``W = Σ_i w_i W_i`` with the normalized weights ``w_i`` (accumulated in
float64, one tensor at a time, written back in the tensor's dtype); non-float initializers (shapes,
indices) must be equal in every member. Averaging BatchNorm statistics is the usual soup
approximation; averaging before or after ``fold`` gives different models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import __version__
from onnxopt.errors import ModelError
from onnxopt.graph import is_constant, set_weight
from onnxopt.merge.members import Member, ir_version
from onnxopt.progress import progress

__all__ = ["pair_weights", "average_weights", "soup"]

logger = logging.getLogger(__name__)

Pairs = dict[str, list[ir.Value]]


def _attr_key(attr: ir.Attr) -> object:
    value = attr.value
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return ("graph", id(value))  # subgraphs are declined before we get here
    if attr.type == ir.AttributeType.TENSOR:
        arr = np.asarray(value.numpy())
        return ("tensor", str(arr.dtype), arr.shape, arr.tobytes())
    if attr.type == ir.AttributeType.TENSORS:
        return tuple(np.asarray(t.numpy()).tobytes() for t in value)
    if isinstance(value, list | tuple):
        return tuple(value)
    return value


def _op_text(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def _try_pair_nodes(a: ir.Node, b: ir.Node) -> str | None:
    """Why nodes `a` and `b` cannot play the same role (None when they can)."""
    if (a.domain, a.op_type, a.overload) != (b.domain, b.op_type, b.overload):
        return f"op {_op_text(a)} vs {_op_text(b)}"
    if len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs):
        return f"{len(a.inputs)}/{len(a.outputs)} vs {len(b.inputs)}/{len(b.outputs)} inputs/outputs"
    if set(a.attributes) != set(b.attributes):
        return f"attributes {sorted(a.attributes)} vs {sorted(b.attributes)}"
    for key, attr in a.attributes.items():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return "control flow (subgraphs) is not supported by soup"
        if _attr_key(attr) != _attr_key(b.attributes[key]):
            return f"attribute {key} {attr.value!r} vs {b.attributes[key].value!r}"
    return None


def _try_pair_input(a: ir.Value | None, b: ir.Value | None, seen: dict[int, ir.Value],
                    weights: dict[int, ir.Value], weight_of: dict[int, int]) -> str | None:
    """Pair one node input of the first member with the same input of another member."""
    if a is None or b is None:
        return None if a is None and b is None else "an optional input is present in one model only"
    if is_constant(a):
        if not is_constant(b):
            return f"'{a.name}' is a weight but '{b.name}' is computed"
        ta, tb = a.const_value, b.const_value
        if ta.dtype != tb.dtype or tuple(ta.shape) != tuple(tb.shape):
            return f"weight '{a.name}' {ta.dtype.name}{list(ta.shape)} vs '{b.name}' {tb.dtype.name}{list(tb.shape)}"
        prev_b, prev_a = weights.get(id(a)), weight_of.get(id(b))
        if (prev_b is not None and prev_b is not b) or (prev_a is not None and prev_a != id(a)):
            return f"weight '{a.name}' is shared differently"
        weights[id(a)], weight_of[id(b)] = b, id(a)
        return None
    if seen.get(id(b)) is not a:
        return f"input '{a.name}' vs '{b.name}' come from different places"
    return None


def pair_weights(base: ir.Model, other: ir.Model, base_name: str, other_name: str) -> dict[str, ir.Value]:
    """{weight name of `base`: the weight of `other` that plays its role}; ModelError on any mismatch."""
    gb, go = base.graph, other.graph

    def fail(what: str) -> ModelError:
        return ModelError(f"soup: '{other_name}' does not have the architecture of '{base_name}': {what}")

    in_b = [v for v in gb.inputs if v.const_value is None]
    in_o = [v for v in go.inputs if v.const_value is None]
    if [v.name for v in in_b] != [v.name for v in in_o]:
        raise fail(f"inputs {[v.name for v in in_b]} vs {[v.name for v in in_o]}")
    if [v.name for v in gb.outputs] != [v.name for v in go.outputs]:
        raise fail(f"outputs {[v.name for v in gb.outputs]} vs {[v.name for v in go.outputs]}")
    nodes_b, nodes_o = list(gb), list(go)
    seen: dict[int, ir.Value] = {id(o): b for b, o in zip(in_b, in_o)}
    weights: dict[int, ir.Value] = {}
    weight_of: dict[int, int] = {}
    for k, (nb, no) in enumerate(zip(nodes_b, nodes_o)):
        where = f"node {k} '{nb.name or nb.op_type}'"
        reason = _try_pair_nodes(nb, no)
        for vb, vo in zip(nb.inputs, no.inputs):
            if reason is None:
                reason = _try_pair_input(vb, vo, seen, weights, weight_of)
        if reason is not None:
            raise fail(f"{where}: {reason}")
        for vb, vo in zip(nb.outputs, no.outputs):
            seen[id(vo)] = vb
    if len(nodes_b) != len(nodes_o):
        raise fail(f"{len(nodes_b)} nodes vs {len(nodes_o)}")
    for vb, vo in zip(gb.outputs, go.outputs):
        if seen.get(id(vo)) is not vb and not (is_constant(vb) and is_constant(vo)):
            raise fail(f"output '{vb.name}' is computed differently")
    by_id = {id(v): v for v in gb.initializers.values()}
    return {by_id[i].name: v for i, v in weights.items() if i in by_id}


def average_weights(base: ir.Model, others: Sequence[dict[str, ir.Value]], weights: Sequence[float]) -> int:
    """Replace each paired float weight of `base` by the weighted average; returns how many changed."""
    changed = 0
    items = list(base.graph.initializers.items())
    for name, value in progress(items, desc="averaging weights", total=len(items)):
        partners = [pairs.get(name) for pairs in others]
        if any(p is None for p in partners):
            continue
        tensors = [value, *partners]
        if value.const_value.dtype.is_floating_point():
            acc = np.zeros(tuple(value.const_value.shape), dtype=np.float64)
            for w, v in zip(weights, tensors):
                acc += w * np.asarray(v.const_value.numpy(), dtype=np.float64)
            set_weight(value, acc.astype(value.const_value.dtype.numpy()))
            changed += 1
            continue
        first = np.asarray(value.const_value.numpy())
        for v in partners:
            if not np.array_equal(first, np.asarray(v.const_value.numpy())):
                raise ModelError(f"soup: non-float weight '{name}' differs between members; it cannot be averaged")
    logger.debug("soup averaged %d weights", changed)
    return changed


def soup(members: list[Member], weights: list[float], opsets: dict[str, int]) -> tuple[ir.Model, int]:
    """The first member with every paired float weight averaged over all members (opsets already
    reconciled to `opsets`), and how many weights changed."""
    base = members[0]
    pairs = [pair_weights(base.model, m.model, base.name, m.name) for m in members[1:]]
    changed = average_weights(base.model, pairs, weights)
    base.model.opset_imports.clear()
    base.model.opset_imports.update(opsets)
    base.model.producer_name, base.model.producer_version = "onnxopt", __version__
    base.model.ir_version = ir_version(members, opsets)
    return base.model, changed
