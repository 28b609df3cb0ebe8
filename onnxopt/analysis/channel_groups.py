"""Channel dependency groups: which channels of which tensors must be removed together.

Every tracked tensor has one *channel space*: an axis of a value (``conv.out`` axis 1, a MatMul
output's last axis, the head axis of ``[batch, seq, heads, dim]``). Each index of a space is an
*element*; a union-find over all elements joins the indices that must go together. One walk over
the graph in topological order applies one rule per op (the table ``_RULES``):

- producers (Conv, ConvTranspose, Gemm, MatMul with a constant weight) start a fresh space for
  their output and record which weight axis (and bias) it indexes;
- consumers (the same ops) end the space of their input and record the weight axis indexed by it;
- pass-through ops (BatchNorm, activations, pooling, Pad, Resize, Dropout, Identity, Cast, per
  channel Add/Sub/Mul/Div with sliced constants, InstanceNorm, LayerNorm over other axes) join each
  output index to the same input index;
- Add/Sum/Mul/Max/Min between tracked branches join all inputs; Concat maps each input to its
  offset range; Split/Slice map ranges back; Transpose/Squeeze/Unsqueeze move the axis; Flatten and
  Reshape map a channel to its block (``c -> c*S .. c*S+S-1``) or a block of channels to one index
  (``32 -> 4 heads x 8``: head ``h`` joins channels ``8h .. 8h+7``);
- grouped and depthwise Conv join the input channels of a group with that group's outputs;
- a MatMul between two activations joins their batch axes (attention heads);
- graph outputs, shape-consuming uses, subgraph captures and any op without a rule *pin* their
  elements (never removed), with the reason.

Worked example, ``Conv(1->4) -> BN(4) -> Relu -> Conv(4->8)``: spaces ``conv1.out``, ``bn.out`` and
``relu.out`` (4 elements each); index ``c`` of the three forms one *unit*; the four units touch the
same spaces and form one *group*. Removing unit ``c`` slices ``conv1.W[c]``, ``conv1.B[c]``, the BN
parameters ``[c]`` and ``conv2.W[:, c]``.

Each element also carries the constant its tensor holds when the producer's filter is all zero
(``bias`` at the producer, then pushed through the pass-through ops: ``relu(bias)``); NaN when not
constant. Bias compensation folds this constant into the consumers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.stats import infer_shapes, node_macs
from onnxopt.graph import constant_array, opset_version

__all__ = ["Space", "Producer", "Consumer", "ParamSlice", "Fixup", "Group", "ChannelGraph", "build_channel_graph"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Space:
    """One tracked axis of one value; its elements are ``base .. base + size - 1``."""

    index: int
    value: ir.Value
    axis: int
    size: int
    base: int

    def elements(self) -> range:
        return range(self.base, self.base + self.size)


@dataclasses.dataclass(eq=False)
class Producer:
    """A node whose output channels are the space: weight ``axis`` (and bias) indexed by it."""

    node: ir.Node
    space: Space
    weight_index: int
    axis: int
    bias_index: int | None


@dataclasses.dataclass(eq=False)
class Consumer:
    """A node that contracts over the space: weight ``axis`` indexed by it (kind: conv/gemm/matmul...)."""

    node: ir.Node
    space: Space
    kind: str
    weight_index: int
    axis: int


@dataclasses.dataclass(eq=False)
class ParamSlice:
    """Slice constant input ``input_index`` of ``node`` along ``axis`` with the keep mask of ``space``."""

    node: ir.Node
    input_index: int
    axis: int
    space: Space


@dataclasses.dataclass(eq=False)
class Fixup:
    """An attribute or shape constant to recompute after removal (kind: group/reshape/split/slice)."""

    node: ir.Node
    kind: str
    spaces: list[Space]
    data: dict[str, Any]


@dataclasses.dataclass(eq=False)
class Group:
    """Units (sets of elements removed together) that touch the same spaces."""

    name: str
    units: list[list[int]]
    pinned: dict[int, str]
    spaces: list[Space]
    producers: list[Producer]
    consumers: list[Consumer]

    @property
    def size(self) -> int:
        return len(self.units)

    def prunable(self) -> list[int]:
        return [u for u in range(len(self.units)) if u not in self.pinned]

    def nodes(self) -> list[ir.Node]:
        seen: dict[int, ir.Node] = {}
        for p in self.producers:
            seen.setdefault(id(p.node), p.node)
        for c in self.consumers:
            seen.setdefault(id(c.node), c.node)
        return list(seen.values())


_UNARY: dict[str, Callable[[np.ndarray, ir.Node], np.ndarray]] = {
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
_SPATIAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample"}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power, "Sum": np.add,
}
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd"}


def _dims(value: ir.Value | None) -> list[int | ir.SymbolicDim] | None:
    if value is None or value.shape is None:
        return None
    return list(value.shape.dims)


def _rank(value: ir.Value | None) -> int | None:
    dims = _dims(value)
    return None if dims is None else len(dims)


def _static(dims: list[Any]) -> bool:
    return all(isinstance(d, int) for d in dims)


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = constant_array(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


class ChannelGraph:
    """Build once per model; `groups()` lists the coupled channel groups."""

    def __init__(self, model: ir.Model, dims: dict[str, int] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.dims = dims or {}
        self.spaces: list[Space] = []
        self._space_of: dict[int, Space] = {}
        self.parent: list[int] = []
        self.const: list[float] = []
        self.elem_space: list[int] = []
        self.pins: dict[int, str] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.slices: list[ParamSlice] = []
        self.fixups: list[Fixup] = []
        self.mac_nodes: list[tuple[ir.Node, int, Space | None, Space | None]] = []
        self.opset = opset_version(model, 17)

    # ------------------------------------------------------------------ union-find and spaces
    def find(self, e: int) -> int:
        parent = self.parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb

    def space_of(self, value: ir.Value | None) -> Space | None:
        return None if value is None else self._space_of.get(id(value))

    def new_space(self, value: ir.Value, axis: int, size: int, consts: np.ndarray | None = None) -> Space:
        base = len(self.parent)
        space = Space(len(self.spaces), value, axis, size, base)
        self.spaces.append(space)
        self._space_of[id(value)] = space
        self.parent.extend(range(base, base + size))
        self.elem_space.extend([space.index] * size)
        if consts is None:
            self.const.extend([math.nan] * size)
        else:
            self.const.extend(float(c) for c in np.broadcast_to(consts, (size,)))
        return space

    def consts(self, space: Space) -> np.ndarray:
        return np.asarray(self.const[space.base:space.base + space.size], dtype=np.float64)

    def pin(self, space: Space | None, reason: str) -> None:
        if space is None:
            return
        for e in space.elements():
            self.pins.setdefault(e, reason)

    def pin_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            self.pin(self.space_of(v), reason)

    def follow(self, src: Space, value: ir.Value, axis: int, consts: np.ndarray | None = None) -> Space:
        """A space on `value` whose index i is joined to index i of `src` (pass-through)."""
        out = self.new_space(value, axis, src.size, self.consts(src) if consts is None else consts)
        for i in range(src.size):
            self.union(src.base + i, out.base + i)
        return out

    # ------------------------------------------------------------------ the walk
    def build(self) -> ChannelGraph:
        infer_shapes(self.model)
        for node in self.graph:
            rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                rule = None
            tracked = any(self.space_of(v) is not None for v in node.inputs)
            if rule is None:
                if tracked:
                    self.pin_inputs(node, f"{node.op_type} ({node.name or 'unnamed'}) has no channel rule")
                continue
            reason = rule(self, node)
            if reason:
                logger.debug("%s: %s", node.name or node.op_type, reason)
                self.pin_inputs(node, f"{node.name or node.op_type}: {reason}")
                for out in node.outputs:
                    self.pin(self.space_of(out), f"{node.name or node.op_type}: {reason}")
        self._pin_boundaries()
        return self

    def _pin_boundaries(self) -> None:
        for space in self.spaces:
            v = space.value
            if v.is_graph_output():
                self.pin(space, f"'{v.name}' is a graph output")
            for use in v.uses():
                if use.node.graph is not self.graph:
                    self.pin(space, f"'{v.name}' is used inside a subgraph")

    # ------------------------------------------------------------------ groups
    def groups(self) -> list[Group]:
        members: dict[int, list[int]] = {}
        for e in range(len(self.parent)):
            members.setdefault(self.find(e), []).append(e)
        by_key: dict[tuple[int, ...], list[list[int]]] = {}
        for elems in members.values():
            key = tuple(sorted({self.elem_space[e] for e in elems}))
            by_key.setdefault(key, []).append(elems)
        groups = []
        for key, units in by_key.items():
            units.sort(key=lambda u: u[0])
            spaces = [self.spaces[i] for i in key]
            ids = set(key)
            pinned = {}
            for k, unit in enumerate(units):
                for e in unit:
                    if e in self.pins:
                        pinned[k] = self.pins[e]
                        break
            producers = [p for p in self.producers if p.space.index in ids]
            consumers = [c for c in self.consumers if c.space.index in ids]
            if not producers:
                for k in range(len(units)):
                    pinned.setdefault(k, "no producer with weights")
            name = (producers[0].node.name or producers[0].space.value.name) if producers else spaces[0].value.name
            groups.append(Group(name or f"group{len(groups)}", units, pinned, spaces, producers, consumers))
        groups.sort(key=lambda g: min(s.index for s in g.spaces))
        return groups

    def unit_counts(self, unit: list[int]) -> dict[int, int]:
        """Elements of `unit` per space index."""
        counts: dict[int, int] = {}
        for e in unit:
            s = self.elem_space[e]
            counts[s] = counts.get(s, 0) + 1
        return counts

    def keep_masks(self, removed: set[int]) -> dict[int, np.ndarray]:
        """Keep mask per space index, given the removed elements."""
        masks = {}
        for space in self.spaces:
            masks[space.index] = np.array([e not in removed for e in space.elements()], dtype=bool)
        return masks

    # ------------------------------------------------------------------ MAC bookkeeping
    def note_macs(self, node: ir.Node, in_space: Space | None, out_space: Space | None) -> None:
        macs = node_macs(node, self.dims)
        if macs:
            self.mac_nodes.append((node, int(macs), in_space, out_space))

    def total_macs(self) -> int:
        total = 0
        for node in self.graph:
            m = node_macs(node, self.dims)
            total += int(m or 0)
        return total


def build_channel_graph(model: ir.Model, dims: dict[str, int] | None = None) -> ChannelGraph:
    """Walk `model` (shapes inferred in place) and return its channel dependency graph."""
    return ChannelGraph(model, dims).build()


# ====================================================================== per-op rules
# A rule returns None when it handled the node, or the reason its tracked inputs must be pinned.


def _input(node: ir.Node, index: int) -> ir.Value | None:
    """Input `index` of `node`, or None when it is absent or left empty."""
    return node.inputs[index] if len(node.inputs) > index else None


def _on_tracked_input(rule: Callable[[ChannelGraph, ir.Node, Space], str | None]
                      ) -> Callable[[ChannelGraph, ir.Node], str | None]:
    """A rule over the space of the node's first input; nothing to do when that input is untracked."""

    @functools.wraps(rule)
    def wrapped(cg: ChannelGraph, node: ir.Node) -> str | None:
        x = cg.space_of(node.inputs[0])
        return None if x is None else rule(cg, node, x)

    return wrapped


def _axes_operand(node: ir.Node) -> tuple[list[int] | None, str | None]:
    """Axes from input 1 (newer opsets) or the ``axes`` attribute; the reason when the input is not constant."""
    if _input(node, 1) is not None:
        axes = _ints(node.inputs[1])
        return axes, None if axes is not None else "axes are not constant"
    return node.attributes.get_ints("axes", None), None


def _const_weight(node: ir.Node, index: int) -> np.ndarray | None:
    if len(node.inputs) <= index:
        return None
    arr = constant_array(node.inputs[index])
    if arr is None or not np.issubdtype(arr.dtype, np.floating):
        return None
    return arr


def _rule_conv(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = _const_weight(node, 1)
    x = cg.space_of(node.inputs[0])
    if w is None:
        return "weight is not a constant float initializer"
    bias = _const_weight(node, 2)
    if _input(node, 2) is not None and bias is None:
        return "bias is not a constant"
    group = node.attributes.get_int("group", 1)
    cout = w.shape[0]
    consts = bias.astype(np.float64) if bias is not None else np.zeros(cout)
    if x is not None and x.axis != 1:
        return "input channels are not on axis 1"
    out = cg.new_space(node.outputs[0], 1, cout, consts)
    bias_index = 2 if bias is not None else None
    cg.producers.append(Producer(node, out, 1, 0, bias_index))
    cg.slices.append(ParamSlice(node, 1, 0, out))
    if bias is not None:
        cg.slices.append(ParamSlice(node, 2, 0, out))
    if group == 1:
        if x is not None:
            cg.consumers.append(Consumer(node, x, "conv", 1, 1))
            cg.slices.append(ParamSlice(node, 1, 1, x))
        cg.note_macs(node, x, out)
        return None
    cg.note_macs(node, None, out)
    if x is None:
        cg.pin(out, f"{node.name or 'Conv'}: grouped conv whose input channels cannot be removed")
        return None
    cin_g, cout_g = w.shape[1], cout // group
    for o in range(cout):
        g = o // cout_g
        for i in range(g * cin_g, (g + 1) * cin_g):
            cg.union(out.base + o, x.base + i)
    cg.fixups.append(Fixup(node, "group", [out], {"per_group": cout_g}))
    return None


def _rule_conv_transpose(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = _const_weight(node, 1)
    x = cg.space_of(node.inputs[0])
    if w is None:
        return "weight is not a constant float initializer"
    if node.attributes.get_int("group", 1) != 1:
        return "grouped ConvTranspose is not handled"
    if x is not None and x.axis != 1:
        return "input channels are not on axis 1"
    bias = _const_weight(node, 2)
    if _input(node, 2) is not None and bias is None:
        return "bias is not a constant"
    has_bias = bias is not None
    cout = w.shape[1]
    out = cg.new_space(node.outputs[0], 1, cout, bias.astype(np.float64) if bias is not None else np.zeros(cout))
    cg.producers.append(Producer(node, out, 1, 1, 2 if has_bias else None))
    cg.slices.append(ParamSlice(node, 1, 1, out))
    if has_bias:
        cg.slices.append(ParamSlice(node, 2, 0, out))
    if x is not None:
        cg.consumers.append(Consumer(node, x, "convtranspose", 1, 0))
        cg.slices.append(ParamSlice(node, 1, 0, x))
    cg.note_macs(node, x, out)
    return None


def _rule_gemm(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = _const_weight(node, 1)
    x = cg.space_of(node.inputs[0])
    if w is None or w.ndim != 2:
        return "B is not a constant 2-D float initializer"
    if node.attributes.get_int("transA", 0):
        return "transA=1 is not handled"
    if x is not None and x.axis != 1:
        return "input features are not on axis 1"
    trans_b = node.attributes.get_int("transB", 0)
    n_out = w.shape[0] if trans_b else w.shape[1]
    consts = np.zeros(n_out)
    bias_index = None
    if _input(node, 2) is not None:
        c = _const_weight(node, 2)
        if c is None:
            return "C is not a constant"
        beta = node.attributes.get_float("beta", 1.0)
        if c.size == n_out and c.shape[-1] == n_out:
            bias_index = 2
            consts = c.reshape(-1).astype(np.float64) * beta
        elif c.size == 1:
            consts = np.full(n_out, float(c.reshape(-1)[0]) * beta)
        else:
            return "C is not per output column"
    out = cg.new_space(node.outputs[0], 1, n_out, consts)
    cg.producers.append(Producer(node, out, 1, 0 if trans_b else 1, bias_index))
    cg.slices.append(ParamSlice(node, 1, 0 if trans_b else 1, out))
    if bias_index is not None:
        cg.slices.append(ParamSlice(node, 2, node.inputs[2].const_value.shape.rank() - 1, out))
    if x is not None:
        cg.consumers.append(Consumer(node, x, "gemm", 1, 1 if trans_b else 0))
        cg.slices.append(ParamSlice(node, 1, 1 if trans_b else 0, x))
    cg.note_macs(node, x, out)
    return None


def _rule_matmul(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = _const_weight(node, 1)
    a = node.inputs[0]
    if w is None:
        return _matmul_activations(cg, node)
    if w.ndim != 2:
        return "weight is not 2-D"
    ra = _rank(a)
    x = cg.space_of(a)
    if ra is None or ra < 2:
        return "input rank unknown or below 2"
    if x is not None and x.axis != ra - 1:
        return "input features are not on the last axis"
    out = cg.new_space(node.outputs[0], ra - 1, w.shape[1], np.zeros(w.shape[1]))
    cg.producers.append(Producer(node, out, 1, 1, None))
    cg.slices.append(ParamSlice(node, 1, 1, out))
    if x is not None:
        cg.consumers.append(Consumer(node, x, "matmul", 1, 0))
        cg.slices.append(ParamSlice(node, 1, 0, x))
    cg.note_macs(node, x, out)
    return None


def _matmul_activations(cg: ChannelGraph, node: ir.Node) -> str | None:
    """MatMul of two activations: a tracked batch axis (attention heads) joins A, B and the output."""
    a, b = node.inputs
    sa, sb = cg.space_of(a), cg.space_of(b)
    if sa is None and sb is None:
        return None
    ra, rb, ro = _rank(a), _rank(b), _rank(node.outputs[0])
    if ra is None or rb is None or ro is None or ra != rb or ra < 3:
        return "MatMul of activations with unknown or unequal ranks"
    if sa is None or sb is None or sa.axis != sb.axis or sa.size != sb.size or sa.axis >= ra - 2:
        return "MatMul of activations contracts or mixes a tracked axis"
    out = cg.new_space(node.outputs[0], sa.axis, sa.size)
    for i in range(sa.size):
        cg.union(sa.base + i, out.base + i)
        cg.union(sb.base + i, out.base + i)
    cg.note_macs(node, None, out)
    return None


@_on_tracked_input
def _rule_unary(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return f"its second output ({node.outputs[1].name}) is used"
    fn = _UNARY.get(node.op_type)
    consts = cg.consts(x)
    if node.op_type == "Clip":
        lo, hi = constant_array(_input(node, 1)), constant_array(_input(node, 2))
        consts = np.clip(consts, -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi))
    elif fn is not None:
        with np.errstate(all="ignore"):
            consts = fn(consts, node)
    elif node.op_type not in _SPATIAL and node.op_type != "Pad":
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
    if node.op_type == "Resize" and _input(node, 3) is not None:
        return "Resize by explicit sizes"
    index = 2 if node.op_type == "Resize" else 1
    if _input(node, index) is None:
        return None if node.op_type == "Resize" else "scales not given"
    scales = constant_array(node.inputs[index])
    if scales is None:
        return "scales are not constant"
    if scales.size and (scales.size <= x.axis or float(scales.reshape(-1)[x.axis]) != 1.0):
        return "resizes the channel axis"
    return None


def _check_pad(node: ir.Node, x: Space) -> str | None:
    pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else node.attributes.get_ints("pads", None)
    if pads is None:
        return "pads are not constant"
    rank = len(pads) // 2
    axes = _ints(node.inputs[3]) if _input(node, 3) is not None else list(range(rank))
    for k, ax in enumerate(axes):
        ax = ax % (_rank(node.inputs[0]) or rank)
        if ax == x.axis and (pads[k] or pads[k + rank]):
            return "pads the channel axis"
    return None


@_on_tracked_input
def _rule_softmax(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    if rank is None:
        return "rank unknown"
    axis = node.attributes.get_int("axis", -1 if cg.opset >= 13 else 1) % rank
    if axis == x.axis or (cg.opset < 13 and axis <= x.axis):
        return "normalizes over the channel axis"
    cg.follow(x, node.outputs[0], x.axis, np.full(x.size, math.nan))
    return None


@_on_tracked_input
def _rule_batchnorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if x.axis != 1:
        return "channel is not on axis 1"
    params = [_const_weight(node, i) for i in range(1, 5)]
    if any(p is None for p in params) or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "parameters are not constant, or training outputs are used"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = node.attributes.get_float("epsilon", 1e-5)
    consts = (cg.consts(x) - mean) * gamma / np.sqrt(var + eps) + beta
    cg.follow(x, node.outputs[0], 1, consts)
    for i in range(1, 5):
        cg.slices.append(ParamSlice(node, i, 0, x))
    return None


@_on_tracked_input
def _rule_instancenorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    if x.axis != 1 or _const_weight(node, 1) is None or _const_weight(node, 2) is None:
        return "channel not on axis 1 or parameters not constant"
    cg.follow(x, node.outputs[0], 1, _const_weight(node, 2).astype(np.float64))
    cg.slices.append(ParamSlice(node, 1, 0, x))
    cg.slices.append(ParamSlice(node, 2, 0, x))
    return None


@_on_tracked_input
def _rule_layernorm(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    if rank is None:
        return "rank unknown"
    axis = node.attributes.get_int("axis", -1) % rank
    if x.axis >= axis:
        return "normalizes over the channel axis"
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return "mean/inv-std outputs are used"
    cg.follow(x, node.outputs[0], x.axis, np.full(x.size, math.nan))
    return None


def _aligned_axis(rank_in: int, rank_out: int, axis: int) -> int:
    return axis + rank_out - rank_in


def _rule_binary(cg: ChannelGraph, node: ir.Node) -> str | None:
    inputs = [(k, v) for k, v in enumerate(node.inputs) if v is not None]
    spaces = [cg.space_of(v) for _, v in inputs]
    if all(s is None for s in spaces):
        return None
    ro = _rank(node.outputs[0])
    ranks = [_rank(v) for _, v in inputs]
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
        dims = _dims(v)
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
    fn = _BINARY.get(node.op_type)
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


def _rule_concat(cg: ChannelGraph, node: ir.Node) -> str | None:
    spaces = [cg.space_of(v) for v in node.inputs]
    if all(s is None for s in spaces):
        return None
    ro = _rank(node.outputs[0])
    if ro is None:
        return "rank unknown"
    axis = node.attributes.get_int("axis", 0) % ro
    if any(s is not None and s.axis != axis for s in spaces):
        if all(s is not None and s.axis == spaces[0].axis and s.size == spaces[0].size for s in spaces):
            out = cg.follow(spaces[0], node.outputs[0], spaces[0].axis)
            for s in spaces[1:]:
                for i in range(s.size):
                    cg.union(s.base + i, out.base + i)
            return None
        return "concatenates along another axis than the tracked one"
    sizes = []
    for v, s in zip(node.inputs, spaces):
        dims = _dims(v)
        n = s.size if s is not None else (dims[axis] if dims is not None else None)
        if not isinstance(n, int):
            return "an input's size on the concat axis is unknown"
        sizes.append(n)
    consts = np.concatenate([cg.consts(s) if s is not None else np.full(n, math.nan) for s, n in zip(spaces, sizes)])
    out = cg.new_space(node.outputs[0], axis, sum(sizes), consts)
    offset = 0
    for s, n in zip(spaces, sizes):
        for i in range(n):
            if s is not None:
                cg.union(s.base + i, out.base + offset + i)
            else:
                cg.pins.setdefault(out.base + offset + i, f"{node.name or 'Concat'}: part of an untracked input")
        offset += n
    return None


@_on_tracked_input
def _rule_split(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    if rank is None:
        return "rank unknown"
    axis = node.attributes.get_int("axis", 0) % rank
    if axis != x.axis:
        for out in node.outputs:
            cg.follow(x, out, x.axis)
        return None
    if _input(node, 1) is not None:
        split = _ints(node.inputs[1])
        if split is None:
            return "split sizes are not constant"
    else:
        split = node.attributes.get_ints("split", None)
        if split is None:
            n = len(node.outputs)
            if x.size % n:
                return "uneven split without explicit sizes"
            split = [x.size // n] * n
    offset = 0
    outs = []
    for out, n in zip(node.outputs, split):
        sp = cg.new_space(out, axis, n, cg.consts(x)[offset:offset + n])
        for i in range(n):
            cg.union(x.base + offset + i, sp.base + i)
        offset += n
        outs.append(sp)
    cg.fixups.append(Fixup(node, "split", outs, {}))
    return None


@_on_tracked_input
def _rule_slice(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes, steps = _ints(_input(node, 3)), _ints(_input(node, 4))
    if rank is None or starts is None or ends is None or (_input(node, 3) is not None and axes is None):
        return "slice bounds are not constant"
    axes = [a % rank for a in (axes if axes is not None else range(len(starts)))]
    if x.axis not in axes:
        cg.follow(x, node.outputs[0], x.axis)
        return None
    k = axes.index(x.axis)
    if steps is not None and steps[k] != 1:
        return "slices the channel axis with a step"
    lo = max(0, min(x.size, starts[k] + x.size if starts[k] < 0 else starts[k]))
    hi = max(0, min(x.size, ends[k] + x.size if ends[k] < 0 else ends[k]))
    n = max(0, hi - lo)
    out = cg.new_space(node.outputs[0], x.axis, n, cg.consts(x)[lo:hi])
    for i in range(n):
        cg.union(x.base + lo + i, out.base + i)
    cg.fixups.append(Fixup(node, "slice", [x], {"k": k, "lo": lo, "hi": hi}))
    return None


@_on_tracked_input
def _rule_transpose(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        if rank is None:
            return "rank unknown"
        perm = list(reversed(range(rank)))
    cg.follow(x, node.outputs[0], list(perm).index(x.axis))
    return None


@_on_tracked_input
def _rule_squeeze(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank_in, rank_out = _rank(node.inputs[0]), _rank(node.outputs[0])
    if rank_in is None or rank_out is None:
        return "rank unknown"
    axes, reason = _axes_operand(node)
    if reason:
        return reason
    if axes is None:
        return "axes not given"
    if node.op_type == "Squeeze":
        axes = [a % rank_in for a in axes]
        if x.axis in axes:
            return "squeezes the channel axis"
        axis = x.axis - sum(1 for a in axes if a < x.axis)
    else:
        axes = sorted(a % rank_out for a in axes)
        axis = x.axis
        for a in axes:
            if a <= axis:
                axis += 1
    cg.follow(x, node.outputs[0], axis)
    return None


@_on_tracked_input
def _rule_flatten(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    dims = _dims(node.inputs[0])
    if dims is None:
        return "input shape unknown"
    k = node.attributes.get_int("axis", 1) % max(1, len(dims))
    if x.axis < k or any(d != 1 for d in dims[k:x.axis]):
        return "flattens the channel axis into the leading dimension"
    rest = dims[x.axis + 1:]
    if not _static(rest):
        return "trailing dimensions are not static"
    return _merge_block(cg, x, node.outputs[0], 1, math.prod(rest))


def _merge_block(cg: ChannelGraph, x: Space, out_value: ir.Value, axis: int, block: int) -> None:
    consts = np.repeat(cg.consts(x), block)
    out = cg.new_space(out_value, axis, x.size * block, consts)
    for c in range(x.size):
        for j in range(block):
            cg.union(x.base + c, out.base + c * block + j)
    return None


@_on_tracked_input
def _rule_reshape(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    shape = _ints(node.inputs[1])
    din, dout = _dims(node.inputs[0]), _dims(node.outputs[0])
    if shape is None or din is None or dout is None:
        return "target shape is not constant or shapes are unknown"
    a = x.axis
    if len(shape) <= a or len(dout) <= a:
        return "reshape drops the channel axis"
    for i in range(a):
        if not (shape[i] == 0 or (isinstance(din[i], int) and din[i] == shape[i])
                or (din[i] == dout[i] and not isinstance(din[i], int) and din[i].value is not None)):
            return "leading dimensions change"
    rin, rout = din[a:], dout[a:]
    if not _static(rin) or not _static(rout):
        return "dimensions from the channel axis on are not static"
    if shape[a] == 0 and rin[0] != rout[0]:
        return "shape copies the channel dimension"
    kind, block = _reshape_kind(rin, rout)
    if kind is None:
        return "reshape regroups the channel axis in a way that is not tracked"
    if kind == "merge":
        _merge_block(cg, x, node.outputs[0], a, block)
    else:
        out = cg.new_space(node.outputs[0], a, rout[0], _block_consts(cg.consts(x), block))
        for h in range(rout[0]):
            for j in range(block):
                cg.union(x.base + h * block + j, out.base + h)
    if shape[a] not in (0, -1):
        cg.fixups.append(Fixup(node, "reshape", [cg.space_of(node.outputs[0])], {"index": a}))
    return None


def _block_consts(consts: np.ndarray, block: int) -> np.ndarray:
    c = consts.reshape(-1, block)
    same = np.all(c == c[:, :1], axis=1)
    return np.where(same, c[:, 0], math.nan)


def _reshape_kind(rin: list[int], rout: list[int]) -> tuple[str | None, int]:
    """('merge', S): in[0] x S -> out[0]; ('split', d): in[0] -> out[0] x d; rest unchanged."""
    for k in range(1, len(rin) + 1):
        if math.prod(rin[:k]) == rout[0] and rin[k:] == rout[1:]:
            return "merge", math.prod(rin[1:k])
    for k in range(2, len(rout) + 1):
        if math.prod(rout[:k]) == rin[0] and rout[k:] == rin[1:]:
            return "split", math.prod(rout[1:k])
    return None, 0


@_on_tracked_input
def _rule_reduce(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    if rank is None:
        return "rank unknown"
    axes, reason = _axes_operand(node)
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


@_on_tracked_input
def _rule_shape(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = _rank(node.inputs[0])
    if rank is None:
        return "reads the shape of a tracked tensor"
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start = start + rank if start < 0 else start
    end = min(rank, end + rank if end < 0 else end)
    if start <= x.axis < end:
        return "reads the channel dimension"
    return None


_RULES: dict[str, Callable[[ChannelGraph, ir.Node], str | None]] = {
    "Conv": _rule_conv,
    "ConvTranspose": _rule_conv_transpose,
    "Gemm": _rule_gemm,
    "MatMul": _rule_matmul,
    "BatchNormalization": _rule_batchnorm,
    "InstanceNormalization": _rule_instancenorm,
    "LayerNormalization": _rule_layernorm,
    "Softmax": _rule_softmax,
    "Concat": _rule_concat,
    "Split": _rule_split,
    "Slice": _rule_slice,
    "Transpose": _rule_transpose,
    "Squeeze": _rule_squeeze,
    "Unsqueeze": _rule_squeeze,
    "Flatten": _rule_flatten,
    "Reshape": _rule_reshape,
    "Shape": _rule_shape,
    "Clip": _rule_unary,
    "Pad": _rule_unary,
    **{op: _rule_unary for op in _UNARY},
    **{op: _rule_unary for op in _SPATIAL},
    **{op: _rule_binary for op in _BINARY},
    **{op: _rule_reduce for op in _REDUCE},
}
