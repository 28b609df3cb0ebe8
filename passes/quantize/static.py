"""Static QDQ for the quantize pass, phase 1: mark what to quantize (phase 2, `qdq`, inserts Q/DQ once).

`plan_static` walks the graph and asks the handler of each node's op type (the `MARKERS` table) to mark
tensors in a `StaticPlan`:

- compute ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``: the activation input(s) (both inputs of
  a MatMul of two activations), the constant weight (int8 symmetric, per channel on the op's output
  axis: Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis, see `layout`) and
  the bias (int32, ``scale = scale_x * scale_w[c]``, zero point 0). A Conv output is always marked,
  since ONNX Runtime only fuses ``DQ -> Conv -> Q``; Gemm/MatMul outputs only when a consumer wants
  them (their float-output integer kernels need no Q);
- ``Add``, ``Mul`` of two activations, ``Concat``, ``AveragePool``, ``GlobalAveragePool``: inputs and
  output, each with its own scale. A Concat whose inputs' ranges differ by more than
  ``concat_range_ratio`` is left in float (one scale would flatten the small-range inputs to zero).

Two op families have no handler in the table; they follow what the handlers marked:

- data movement ``MaxPool``, ``Reshape``, ``Transpose``, ``Flatten``, ``Resize``, ``Split``, ``Slice``,
  ``Squeeze``, ``Unsqueeze``: input and outputs are tied to one shared scale (so ONNX Runtime can
  drop the Q/DQ pair around them and move int8 data), marked when either side is wanted
  (`_propagate_shared`);
- ``Relu`` and ``Clip(min=0)`` right after a marked producer whose output only they use are fused:
  the node is removed and the producer's output is quantized with the activation's range and a zero
  point at the type's minimum, so QuantizeLinear's saturation performs the clamp exactly
  (`_try_fuse_activation`).

Every other op stays float (the table's default). Graph outputs and non-float tensors are never
marked (names and types of outputs never change).

Before marking, `matmul_add_to_gemm` rewrites ``Add(MatMul(x, W), b)`` into a Gemm (exact), so the
bias can become int32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    all_names,
    constant_array,
    is_constant,
    is_onnx_op,
    new_initializer,
    take_over_output,
    unique_name,
)
from onnxopt.registry import PassStats, matches_any

from .calib import ActType, Range, dequantize_array, qparams, quantize_array
from .layout import gemm_declined, out_channels, weight_axis

__all__ = [
    "COMPUTE",
    "SUPPORTED_OPS",
    "MARKERS",
    "Marker",
    "MarkOptions",
    "StaticPlan",
    "Fusion",
    "candidate_tensors",
    "plan_static",
    "matmul_add_to_gemm",
    "name_nodes",
]

logger = logging.getLogger(__name__)

COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_BINARY = frozenset({"Add", "Mul"})
_POOLS = frozenset({"AveragePool", "GlobalAveragePool"})
_SHARED = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Resize", "Split", "Slice", "Squeeze", "Unsqueeze"})
_ACTIVATIONS = frozenset({"Relu", "Clip"})
_FLOAT = ir.DataType.FLOAT
CONST_MAX_REL_ERROR = 0.01
CONST_MAX_SIZE = 1 << 16


@dataclasses.dataclass
class Fusion:
    """A Relu/Clip(0, m) removed in phase 2: its producer's output takes its place and its range."""

    act: ir.Node
    producer_out: ir.Value
    clip_max: float | None


@dataclasses.dataclass
class StaticPlan:
    """Marked tensors (by name), tied groups, fused activations, weights and biases to quantize."""

    acts: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    parent: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: dict[str, Fusion] = dataclasses.field(default_factory=dict)
    weights: list[tuple[ir.Node, int, int | None]] = dataclasses.field(default_factory=list)
    biases: list[tuple[ir.Node, int, str]] = dataclasses.field(default_factory=list)
    consts: list[tuple[ir.Node, int]] = dataclasses.field(default_factory=list)
    """Constant operands of element-wise ops, quantized per tensor with their own range."""
    compute: list[ir.Node] = dataclasses.field(default_factory=list)
    others: list[ir.Node] = dataclasses.field(default_factory=list)

    def mark(self, value: ir.Value) -> None:
        self.acts[value.name] = value

    def find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while name != root:  # path compression
            self.parent[name], name = root, self.parent.get(name, name)
        return root

    def tie(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclasses.dataclass(frozen=True)
class MarkOptions:
    """What the handlers may consult besides the node: calibrated ranges and the pass options."""

    ranges: dict[str, Range]
    per_channel: bool
    concat_range_ratio: float
    activations: ActType = "uint8"


Marker = Callable[[ir.Node, StaticPlan, MarkOptions], str | None]
"""A handler: marks the node's tensors in the plan, or returns why the node stays float."""


# ------------------------------------------------------------------------------ helpers
def _is_float_activation(value: ir.Value | None) -> bool:
    return value is not None and not is_constant(value) and value.dtype == _FLOAT and bool(value.name)


def _data_inputs(node: ir.Node) -> list[ir.Value | None]:
    if node.op_type in COMPUTE or node.op_type in _SHARED or node.op_type in _ACTIVATIONS:
        n = 2 if node.op_type == "MatMul" else 1
        return list(node.inputs[:n])
    return list(node.inputs)


def _is_supported(node: ir.Node) -> bool:
    return node.op_type in SUPPORTED_OPS and is_onnx_op(node)


def candidate_tensors(graph: ir.Graph, exclude: Iterable[str]) -> list[str]:
    """Every float activation a supported, non-excluded node reads or writes (what calibration taps)."""
    patterns = list(exclude)
    names: dict[str, None] = {}
    for node in graph:
        if not _is_supported(node) or matches_any(node, patterns):
            continue
        for value in [*_data_inputs(node), *node.outputs]:
            if _is_float_activation(value):
                names[value.name] = None
    return list(names)


def name_nodes(graph: ir.Graph) -> None:
    """Give every unnamed node a unique name (so layers can be excluded and reported by name)."""
    taken = all_names(graph)
    for node in graph:
        if not node.name:
            node.name = unique_name(graph, node.op_type, taken)


# ------------------------------------------------------------------------------ pre-rewrite
def matmul_add_to_gemm(graph: ir.Graph, stats: PassStats, exclude: Iterable[str]) -> int:
    """``Add(MatMul(x, W), b)`` with 2-D ``x``, constant ``W`` [K, N] and ``b`` [N] -> ``Gemm(x, W, b)``.

    Exact up to float rounding. ONNX Runtime fuses a Gemm whose bias is a DequantizeLinear into
    QGemm; a MatMul followed by a float Add would leave the Add (or a float Gemm) behind.
    """
    patterns = list(exclude)
    rewritten = 0
    for node in list(graph):
        if not is_onnx_op(node, "MatMul") or matches_any(node, patterns):
            continue
        reason = _try_matmul_add_to_gemm(graph, node)
        if reason:
            logger.debug("MatMul %s stays: %s", node.name, reason)
        else:
            rewritten += 1
    return rewritten


def _try_matmul_add_to_gemm(graph: ir.Graph, node: ir.Node) -> str | None:
    x, w_value, y = node.inputs[0], node.inputs[1], node.outputs[0]
    if x is None or x.shape is None or len(x.shape) != 2:
        return "input is not 2-D"
    w = constant_array(w_value)
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return "weight is not a 2-D float32 constant"
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output() or uses[0].node.op_type != "Add":
        return "output is not used by one Add only"
    add = uses[0].node
    b = constant_array(add.inputs[1 - uses[0].idx])
    if b is None or b.dtype != np.float32 or b.size != w.shape[1] or b.shape[-1] != w.shape[1]:
        return "Add operand is not a constant bias of the weight's width"
    b_name = add.inputs[1 - uses[0].idx].name
    bias = new_initializer(graph, f"{b_name}_gemm", b.reshape(-1).copy(), origin=b_name)
    gemm = ir.Node("", "Gemm", [x, w_value, bias], name=node.name or None)
    graph.insert_before(add, gemm)
    take_over_output(graph, add, gemm.outputs[0])
    graph.remove(node, safe=True)
    return None


# ------------------------------------------------------------------------------ the handlers
def _mark_compute(node: ir.Node, plan: StaticPlan, opts: MarkOptions) -> str | None:
    if node.op_type == "ConvTranspose":
        return _mark_weight_only(node, plan, opts)
    x = node.inputs[0]
    if not _is_float_activation(x):
        return "first input is not a float activation"
    if node.op_type == "Gemm" and (reason := gemm_declined(node)):
        return reason
    w_value = node.inputs[1]
    if node.op_type == "MatMul" and _is_float_activation(w_value):
        plan.mark(x)
        plan.mark(w_value)
        plan.compute.append(node)
        return None
    w = constant_array(w_value)
    if w is None or w.dtype != np.float32:
        return "weight is not a float32 constant initializer"
    bias_index = 2 if node.op_type != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None else None
    axis = weight_axis(node, w, opts.per_channel)
    if bias_index is not None:
        b = constant_array(node.inputs[bias_index])
        channels = out_channels(node, w)
        if b is None or b.dtype != np.float32 or b.shape != (channels,):
            return f"bias is not a float32 constant of shape [{channels}]"
        plan.biases.append((node, bias_index, x.name))
    plan.weights.append((node, 1, axis))
    plan.mark(x)
    if node.op_type in ("Conv", "ConvTranspose") and _is_float_activation(node.outputs[0]):
        plan.mark(node.outputs[0])
    plan.compute.append(node)
    return None


def _mark_weight_only(node: ir.Node, plan: StaticPlan, opts: MarkOptions) -> str | None:
    """ConvTranspose: ONNX Runtime has no integer kernel for it on CPU (a DQ -> ConvTranspose -> Q group stays
    float between the two), so its activations keep their float form and only the weight is stored int8."""
    w = constant_array(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return "weight is not a float32 constant initializer"
    plan.weights.append((node, 1, weight_axis(node, w, opts.per_channel)))
    return "no integer ConvTranspose kernel in ONNX Runtime: activations left in float (weight stored int8)"


def _mark_binary(node: ir.Node, plan: StaticPlan, opts: MarkOptions) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    if not _is_float_activation(node.outputs[0]):
        return "output is not a float activation"
    if _is_float_activation(a) and _is_float_activation(b):
        plan.mark(a)
        plan.mark(b)
    else:
        k = 1 if _is_float_activation(a) else 0
        reason = _constant_operand_declined(node.inputs[k], node.inputs[1 - k], opts)
        if reason:
            return reason
        plan.mark(node.inputs[1 - k])
        plan.consts.append((node, k))
    plan.mark(node.outputs[0])
    plan.others.append(node)
    return None


def _constant_operand_declined(const: ir.Value | None, other: ir.Value | None, opts: MarkOptions) -> str | None:
    """Why a constant operand cannot be stored as a per-tensor 8-bit value, else None (the per-node check).

    The constant gets its own scale over ``[min(c, 0), max(c, 0)]``; it is declined when its round trip
    loses more than `CONST_MAX_REL_ERROR` of it (relative L2) or turns a non-zero element into a value
    off by more than half of it (a small gamma next to a large one).
    """
    if not _is_float_activation(other):
        return "neither operand is a float activation"
    c = constant_array(const)
    if c is None or c.dtype != np.float32 or c.size == 0:
        return "the constant operand is not float32"
    if c.size > CONST_MAX_SIZE:
        return f"the constant operand has {c.size} elements (more than {CONST_MAX_SIZE})"
    if not np.all(np.isfinite(c)):
        return "the constant operand is not finite"
    qp = qparams(Range(float(c.min()), float(c.max())), opts.activations)
    rt = dequantize_array(quantize_array(c, qp.scale, qp.zero_point, qp.dtype), qp.scale, qp.zero_point)
    err = np.abs(rt.astype(np.float64) - c)  # in float64: a mask constant near -3.4e38 overflows a float32 norm
    norm = float(np.linalg.norm(c.astype(np.float64)))
    if norm > 0 and float(np.linalg.norm(err)) > CONST_MAX_REL_ERROR * norm:
        return "the constant operand loses too much as one 8-bit tensor: left in float"
    if np.any((c != 0) & (err > 0.5 * np.abs(c))):
        return "a constant element is below half an 8-bit step: left in float"
    return None


def _mark_concat(node: ir.Node, plan: StaticPlan, opts: MarkOptions) -> str | None:
    inputs = [v for v in node.inputs if v is not None]
    if not inputs or not all(_is_float_activation(v) for v in inputs) or not _is_float_activation(node.outputs[0]):
        return "inputs are not all float activations"
    widths = []
    for v in inputs:
        r = opts.ranges.get(v.name)
        if r is None:
            return f"no calibration range for input {v.name}"
        widths.append(max(r.hi, 0.0) - min(r.lo, 0.0))
    smallest = min(widths)
    spread = max(widths) / smallest if smallest > 0 else float("inf")
    ratio = opts.concat_range_ratio
    if spread > ratio:
        return (f"input ranges differ {spread:.3g}x (> concat_range_ratio={ratio:g}): "
                "one scale would flatten the small ones, Concat left in float")
    for v in inputs:
        plan.mark(v)
    plan.mark(node.outputs[0])
    plan.others.append(node)
    return None


def _mark_pool(node: ir.Node, plan: StaticPlan, opts: MarkOptions) -> str | None:
    if not (_is_float_activation(node.inputs[0]) and _is_float_activation(node.outputs[0])):
        return "input or output is not a float activation"
    plan.mark(node.inputs[0])
    plan.mark(node.outputs[0])
    plan.others.append(node)
    return None


MARKERS: dict[str, Marker] = {
    **dict.fromkeys(sorted(COMPUTE), _mark_compute),
    **dict.fromkeys(sorted(_BINARY), _mark_binary),
    "Concat": _mark_concat,
    **dict.fromkeys(sorted(_POOLS), _mark_pool),
}
"""Op type -> handler. No handler: data movement follows its neighbours (`_propagate_shared`),
Relu/Clip fuse into their producer (`_try_fuse_activation`), every other op stays float."""

SUPPORTED_OPS = frozenset(MARKERS) | _SHARED | _ACTIVATIONS


# ------------------------------------------------------------------------------ phase 1: mark
def plan_static(
    graph: ir.Graph,
    ranges: dict[str, Range],
    stats: PassStats,
    *,
    exclude: Iterable[str],
    per_channel: bool,
    concat_range_ratio: float,
    fuse_activations: bool = True,
    activations: ActType = "uint8",
    float_nodes: dict[str, str] | None = None,
) -> StaticPlan:
    """Mark the tensors, weights and biases of `graph` to quantize (see the module doc); change nothing.

    `float_nodes` maps names of nodes the pass keeps in float (range-sensitive regions, collapsed
    tensors, fallback) to the reason, which goes into the skipped list.
    """
    plan = StaticPlan()
    opts = MarkOptions(ranges, per_channel, concat_range_ratio, activations)
    kept = float_nodes or {}
    patterns = list(exclude)
    for node in graph:
        if not _is_supported(node):
            continue
        if node.name in kept:
            stats.skip(node, kept[node.name])
            continue
        if matches_any(node, patterns):
            stats.skip(node, "excluded by the exclude option")
            continue
        marker = MARKERS.get(node.op_type)
        reason = marker(node, plan, opts) if marker is not None else None
        if reason:
            stats.skip(node, reason)
    _propagate_shared(graph, plan, patterns, kept)
    if fuse_activations:
        for node in graph:
            if node.op_type in _ACTIVATIONS and node.name not in kept and not matches_any(node, patterns):
                reason = _try_fuse_activation(node, plan)
                if reason:
                    logger.debug("not fusing %s: %s", node.name, reason)
        _propagate_shared(graph, plan, patterns, kept)
    for name in list(plan.acts):
        value = plan.acts[name]
        if value.is_graph_output() or name not in ranges:
            del plan.acts[name]
    return plan


def _propagate_shared(graph: ir.Graph, plan: StaticPlan, patterns: list[str], kept: dict[str, str]) -> None:
    """Tie the data input and outputs of data-movement ops; mark both sides when either is marked."""
    shared = [n for n in graph if is_onnx_op(n, *_SHARED) and n.name not in kept and not matches_any(n, patterns)]
    changed = True
    while changed:
        changed = False
        for node in shared:
            values = [node.inputs[0], *node.outputs]
            if not all(_is_float_activation(v) for v in values):
                continue
            if not any(v.name in plan.acts for v in values):
                continue
            for v in values:
                if v.name not in plan.acts:
                    plan.mark(v)
                    changed = True
                plan.tie(v.name, values[0].name)


def _clip_bounds(node: ir.Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip from its constant inputs or attributes; None when not constant."""
    if node.op_type == "Relu":
        return 0.0, None
    bounds: list[float | None] = []
    for idx, attr in ((1, "min"), (2, "max")):
        if len(node.inputs) > idx and node.inputs[idx] is not None:
            arr = constant_array(node.inputs[idx])
            if arr is None or arr.size != 1:
                return None
            bounds.append(float(arr.reshape(-1)[0]))
        elif attr in node.attributes:
            bounds.append(node.attributes.get_float(attr))
        else:
            bounds.append(None)
    return bounds[0], bounds[1]


def _try_fuse_activation(node: ir.Node, plan: StaticPlan) -> str | None:
    x, y = node.inputs[0], node.outputs[0]
    if not (_is_float_activation(x) and _is_float_activation(y)):
        return "not a float activation"
    producer = x.producer()
    if producer is None or (producer not in plan.compute and producer not in plan.others):
        return "producer is not quantized"
    if producer.op_type in _SHARED:
        return "producer shares its input's scale"
    if len(x.uses()) != 1 or x.is_graph_output() or y.is_graph_output():
        return "input has other users or a graph output is involved"
    if x.name not in plan.acts and y.name not in plan.acts:
        return "neither side is quantized"
    bounds = _clip_bounds(node)
    if bounds is None or bounds[0] != 0.0:
        return "clamp lower bound is not a constant 0"
    plan.acts.pop(x.name, None)
    plan.mark(y)
    plan.fused[y.name] = Fusion(node, x, bounds[1])
    return None


