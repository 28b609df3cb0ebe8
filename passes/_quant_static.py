"""Static QDQ for the quantize pass, in two phases: mark what to quantize, then insert Q/DQ once.

Phase 1 (`plan_static`) walks the graph with one handler per op family and marks tensors:

- compute ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``: the activation input(s) (both inputs of
  a MatMul of two activations), the constant weight (int8 symmetric, per channel on the op's output
  axis: Conv 0, ConvTranspose 1, Gemm 0 with transB=1 else 1, MatMul the last axis) and the bias
  (int32, ``scale = scale_x * scale_w[c]``, zero point 0). A Conv output is always marked, since ONNX
  Runtime only fuses ``DQ -> Conv -> Q``; Gemm/MatMul outputs only when a consumer wants them
  (their float-output integer kernels need no Q);
- ``Add``, ``Mul`` of two activations, ``Concat``, ``AveragePool``, ``GlobalAveragePool``: inputs and
  output, each with its own scale. A Concat whose inputs' ranges differ by more than
  ``concat_range_ratio`` is left in float (one scale would flatten the small-range inputs to zero);
- data movement ``MaxPool``, ``Reshape``, ``Transpose``, ``Flatten``, ``Resize``, ``Split``, ``Slice``,
  ``Squeeze``, ``Unsqueeze``: input and outputs are tied to one shared scale (so ONNX Runtime can
  drop the Q/DQ pair around them and move int8 data), marked when either side is wanted;
- ``Relu`` and ``Clip(min=0)`` right after a marked producer whose output only they use are fused:
  the node is removed and the producer's output is quantized with the activation's range and a zero
  point at the type's minimum, so QuantizeLinear's saturation performs the clamp exactly.

Graph outputs and non-float tensors are never marked (names and types of outputs never change).

Phase 2 (`apply_static`) inserts ``QuantizeLinear -> DequantizeLinear`` after every marked tensor,
with all its consumers reading the dequantized value, and replaces marked weights and biases by
integer initializers feeding a DequantizeLinear whose output keeps the float weight's name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import all_names, constant_array, new_initializer, record_origin, take_over_output, unique_name
from onnxopt.io import is_constant
from onnxopt.registry import PassStats, matches_any

from ._quant_calib import ActType, QParams, Range, qparams, quantize_array, weight_scales

__all__ = [
    "COMPUTE",
    "SUPPORTED_OPS",
    "StaticPlan",
    "candidate_tensors",
    "gemm_declined",
    "plan_static",
    "apply_static",
    "matmul_add_to_gemm",
    "name_nodes",
    "new_init",
    "quantizable_nodes",
    "weight_axis",
]

logger = logging.getLogger(__name__)

COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_BINARY = frozenset({"Add", "Mul"})
_OWN_SCALE = frozenset({"Concat", "AveragePool", "GlobalAveragePool"}) | _BINARY
_SHARED = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Resize", "Split", "Slice", "Squeeze", "Unsqueeze"})
_ACTIVATIONS = frozenset({"Relu", "Clip"})
SUPPORTED_OPS = COMPUTE | _OWN_SCALE | _SHARED | _ACTIVATIONS
_FLOAT = ir.DataType.FLOAT


@dataclasses.dataclass
class _Fusion:
    act: ir.Node
    producer_out: ir.Value
    clip_max: float | None


@dataclasses.dataclass
class StaticPlan:
    """Marked tensors (by name), tied groups, fused activations, weights and biases to quantize."""

    acts: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    parent: dict[str, str] = dataclasses.field(default_factory=dict)
    fused: dict[str, _Fusion] = dataclasses.field(default_factory=dict)
    weights: list[tuple[ir.Node, int, int | None]] = dataclasses.field(default_factory=list)
    biases: list[tuple[ir.Node, int, str]] = dataclasses.field(default_factory=list)
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


# ------------------------------------------------------------------------------ helpers
def _is_float_activation(value: ir.Value | None) -> bool:
    return value is not None and not is_constant(value) and value.dtype == _FLOAT and bool(value.name)


def gemm_declined(node: ir.Node) -> str | None:
    """Why a Gemm cannot be quantized as ``x @ W + C`` (transA or alpha/beta other than 1), else None."""
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.attributes.get_float("alpha", 1.0) != 1.0 or node.attributes.get_float("beta", 1.0) != 1.0:
        return "Gemm with alpha or beta other than 1"
    return None


def new_init(graph: ir.Graph, base: str, array: np.ndarray, taken: set[str], origin: str | None = None) -> ir.Value:
    """`onnxopt.graph.new_initializer` against a running `taken` set (positional, as the rewrites call it)."""
    return new_initializer(graph, base, array, origin=origin, taken=taken)


def _data_inputs(node: ir.Node) -> list[ir.Value | None]:
    if node.op_type in COMPUTE or node.op_type in _SHARED or node.op_type in _ACTIVATIONS:
        n = 2 if node.op_type == "MatMul" else 1
        return list(node.inputs[:n])
    return list(node.inputs)


def candidate_tensors(graph: ir.Graph, exclude: Iterable[str]) -> list[str]:
    """Every float activation a supported, non-excluded node reads or writes (what calibration taps)."""
    patterns = list(exclude)
    names: dict[str, None] = {}
    for node in graph:
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx") or matches_any(node, patterns):
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


def quantizable_nodes(graph: ir.Graph, exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    """Names of the compute nodes and of the other supported nodes that are not excluded."""
    patterns = list(exclude)
    compute, others = [], []
    for node in graph:
        if node.op_type in SUPPORTED_OPS and node.domain in ("", "ai.onnx") and not matches_any(node, patterns):
            (compute if node.op_type in COMPUTE else others).append(node.name)
    return compute, others


# ------------------------------------------------------------------------------ pre-rewrite
def matmul_add_to_gemm(graph: ir.Graph, stats: PassStats, exclude: Iterable[str]) -> int:
    """``Add(MatMul(x, W), b)`` with 2-D ``x``, constant ``W`` [K, N] and ``b`` [N] -> ``Gemm(x, W, b)``.

    Exact up to float rounding. ONNX Runtime fuses a Gemm whose bias is a DequantizeLinear into
    QGemm; a MatMul followed by a float Add would leave the Add (or a float Gemm) behind.
    """
    patterns = list(exclude)
    rewritten = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or matches_any(node, patterns):
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
) -> StaticPlan:
    plan = StaticPlan()
    patterns = list(exclude)
    for node in graph:
        if node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if matches_any(node, patterns):
            stats.skip(node, "excluded by the exclude option")
            continue
        reason = _try_mark(node, plan, ranges, per_channel, concat_range_ratio)
        if reason:
            stats.skip(node, reason)
    _propagate_shared(graph, plan, patterns)
    if fuse_activations:
        for node in graph:
            if node.op_type in _ACTIVATIONS and not matches_any(node, patterns):
                reason = _try_fuse_activation(node, plan)
                if reason:
                    logger.debug("not fusing %s: %s", node.name, reason)
        _propagate_shared(graph, plan, patterns)
    for name in list(plan.acts):
        value = plan.acts[name]
        if value.is_graph_output() or name not in ranges:
            del plan.acts[name]
    return plan


def _try_mark(node: ir.Node, plan: StaticPlan, ranges: dict[str, Range], per_channel: bool, ratio: float) -> str | None:
    op = node.op_type
    if op in COMPUTE:
        return _try_mark_compute(node, plan, per_channel)
    if op in _BINARY:
        return _try_mark_binary(node, plan)
    if op == "Concat":
        return _try_mark_concat(node, plan, ranges, ratio)
    if op in ("AveragePool", "GlobalAveragePool"):
        if not (_is_float_activation(node.inputs[0]) and _is_float_activation(node.outputs[0])):
            return "input or output is not a float activation"
        plan.mark(node.inputs[0])
        plan.mark(node.outputs[0])
        plan.others.append(node)
    return None


def weight_axis(node: ir.Node, w: np.ndarray, per_channel: bool) -> int | None:
    """The per-channel axis of a compute node's weight (None: one scale for the tensor)."""
    if not per_channel or w.ndim < 2:
        return None
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if op == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return w.ndim - 1


def _try_mark_compute(node: ir.Node, plan: StaticPlan, per_channel: bool) -> str | None:
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
    axis = weight_axis(node, w, per_channel)
    if bias_index is not None:
        b = constant_array(node.inputs[bias_index])
        channels = _out_channels(node, w)
        if b is None or b.dtype != np.float32 or b.shape != (channels,):
            return f"bias is not a float32 constant of shape [{channels}]"
        plan.biases.append((node, bias_index, x.name))
    plan.weights.append((node, 1, axis))
    plan.mark(x)
    if node.op_type in ("Conv", "ConvTranspose") and _is_float_activation(node.outputs[0]):
        plan.mark(node.outputs[0])
    plan.compute.append(node)
    return None


def _out_channels(node: ir.Node, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return int(w.shape[0])
    if node.op_type == "ConvTranspose":
        return int(w.shape[1]) * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm":
        return int(w.shape[0] if node.attributes.get_int("transB", 0) else w.shape[1])
    return int(w.shape[-1])


def _try_mark_binary(node: ir.Node, plan: StaticPlan) -> str | None:
    a, b = node.inputs[0], node.inputs[1]
    if not (_is_float_activation(a) and _is_float_activation(b)):
        return "an operand is constant or not float: left in float"
    if not _is_float_activation(node.outputs[0]):
        return "output is not a float activation"
    plan.mark(a)
    plan.mark(b)
    plan.mark(node.outputs[0])
    plan.others.append(node)
    return None


def _try_mark_concat(node: ir.Node, plan: StaticPlan, ranges: dict[str, Range], ratio: float) -> str | None:
    inputs = [v for v in node.inputs if v is not None]
    if not inputs or not all(_is_float_activation(v) for v in inputs) or not _is_float_activation(node.outputs[0]):
        return "inputs are not all float activations"
    widths = []
    for v in inputs:
        r = ranges.get(v.name)
        if r is None:
            return f"no calibration range for input {v.name}"
        widths.append(max(r.hi, 0.0) - min(r.lo, 0.0))
    smallest = min(widths)
    spread = max(widths) / smallest if smallest > 0 else float("inf")
    if spread > ratio:
        return (f"input ranges differ {spread:.3g}x (> concat_range_ratio={ratio:g}): "
                "one scale would flatten the small ones, Concat left in float")
    for v in inputs:
        plan.mark(v)
    plan.mark(node.outputs[0])
    plan.others.append(node)
    return None


def _propagate_shared(graph: ir.Graph, plan: StaticPlan, patterns: list[str]) -> None:
    """Tie the data input and outputs of data-movement ops; mark both sides when either is marked."""
    shared = [n for n in graph if n.op_type in _SHARED and n.domain in ("", "ai.onnx") and not matches_any(n, patterns)]
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
    plan.fused[y.name] = _Fusion(node, x, bounds[1])
    return None


# ------------------------------------------------------------------------------ phase 2: insert
def group_qparams(plan: StaticPlan, ranges: dict[str, Range], act: ActType) -> dict[str, QParams]:
    """One QParams per tied group (union of the members' ranges), looked up by member name."""
    groups: dict[str, list[str]] = {}
    for name in plan.acts:
        groups.setdefault(plan.find(name), []).append(name)
    out: dict[str, QParams] = {}
    for members in groups.values():
        rng: Range | None = None
        fused = False
        for name in members:
            r = ranges[name]
            fusion = plan.fused.get(name)
            if fusion is not None:
                fused = True
                hi = r.hi if fusion.clip_max is None else min(r.hi, fusion.clip_max)
                r = Range(0.0, hi)
            rng = r if rng is None else rng.union(r)
        assert rng is not None
        if fused:
            rng = Range(0.0, rng.hi)
        qp = qparams(rng, act, fused_relu=fused)
        for name in members:
            out[name] = qp
    return out


def apply_static(graph: ir.Graph, plan: StaticPlan, qps: dict[str, QParams],
                 rounded: dict[str, np.ndarray] | None = None) -> dict[str, int]:
    """Rewrite `graph` as planned; return counts of what was inserted.

    `rounded` maps weight names to int8 data rounded elsewhere (GPTQ) with the same scales.
    """
    taken = all_names(graph)
    for name, fusion in plan.fused.items():
        _fuse(graph, fusion, name)
        plan.acts[name] = fusion.producer_out
    for name, value in plan.acts.items():
        _insert_qdq(graph, value, qps[name], taken)
    weight_scale: dict[int, np.ndarray] = {}
    cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]] = {}
    replaced: list[tuple[ir.Value, ir.Value]] = []
    for node, index, axis in plan.weights:
        weight_scale[id(node)] = _quantize_weight(graph, node, index, axis, cache, replaced, taken, rounded or {})
    biases = 0
    for node, index, x_name in plan.biases:
        qp = qps.get(x_name)
        if qp is None:
            continue
        _quantize_bias(graph, node, index, qp.scale, weight_scale[id(node)], replaced, taken)
        biases += 1
    _drop_replaced(graph, replaced)
    return {"activations": len(plan.acts), "weights": len(cache), "biases": biases,
            "fused_activations": len(plan.fused)}


def _fuse(graph: ir.Graph, fusion: _Fusion, name: str) -> None:
    act, x = fusion.act, fusion.producer_out
    y = act.outputs[0]
    shape, typ = y.shape, y.type
    y.replace_all_uses_with(x)
    graph.remove(act, safe=True)
    x.name = name
    x.shape, x.type = shape, typ


def _insert_qdq(graph: ir.Graph, value: ir.Value, qp: QParams, taken: set[str]) -> None:
    base = value.name
    uses = list(value.uses())
    scale = new_init(graph, f"{base}_scale", np.asarray(qp.scale, dtype=np.float32), taken)
    zp = new_init(graph, f"{base}_zero_point", np.asarray(qp.zero_point, dtype=qp.dtype), taken)
    q = ir.Node("", "QuantizeLinear", [value, scale, zp], name=unique_name(graph, f"{base}_QuantizeLinear", taken))
    q.outputs[0].name = unique_name(graph, f"{base}_quantized", taken)
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(qp.dtype))
    q.outputs[0].shape = value.shape
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp],
                 name=unique_name(graph, f"{base}_DequantizeLinear", taken))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized", taken)
    dq.outputs[0].type = ir.TensorType(_FLOAT)
    dq.outputs[0].shape = value.shape
    record_origin(dq.outputs[0], base)
    for use in uses:
        use.node.replace_input_with(use.idx, dq.outputs[0])
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(graph.node(0), [q, dq])


def _dq_node(graph: ir.Graph, q_value: ir.Value, scale: np.ndarray, zp: np.ndarray, axis: int | None,
             base: str, shape: ir.Shape | None, taken: set[str]) -> ir.Value:
    s = new_init(graph, f"{base}_scale", scale, taken)
    inputs = [q_value, s]
    if zp.dtype != np.int32 or np.any(zp):
        # An int32 bias always has zero point 0, DequantizeLinear's default: store none.
        inputs.append(new_init(graph, f"{base}_zero_point", zp, taken))
    attrs = [ir.AttrInt64("axis", axis)] if axis is not None and scale.ndim == 1 else []
    dq = ir.Node("", "DequantizeLinear", inputs, attrs,
                 name=unique_name(graph, f"{base}_DequantizeLinear", taken))
    out = dq.outputs[0]
    out.name = unique_name(graph, f"{base}_dequantized", taken)
    out.type = ir.TensorType(_FLOAT)
    out.shape = shape
    record_origin(out, base)
    graph.insert_before(graph.node(0), dq)
    return out


def _quantize_weight(graph: ir.Graph, node: ir.Node, index: int, axis: int | None,
                     cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]],
                     replaced: list[tuple[ir.Value, ir.Value]], taken: set[str],
                     rounded: dict[str, np.ndarray]) -> np.ndarray:
    w_value = node.inputs[index]
    key = (w_value.name, axis)
    if key not in cache:
        w = np.asarray(w_value.const_value.numpy(), dtype=np.float32)
        scales = weight_scales(w, axis)
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
        q = rounded.get(w_value.name)
        if q is None or q.shape != w.shape:
            q = quantize_array(w, scales.reshape(bshape) if axis is not None else scales, 0, np.dtype(np.int8))
        q_value = new_init(graph, f"{w_value.name}_quantized", q, taken, origin=w_value.name)
        dq_out = _dq_node(graph, q_value, scales, np.zeros(scales.shape, np.int8), axis, w_value.name,
                          w_value.shape, taken)
        cache[key] = (dq_out, scales)
        replaced.append((w_value, dq_out))
    dq_out, scales = cache[key]
    node.replace_input_with(index, dq_out)
    return scales


def _quantize_bias(graph: ir.Graph, node: ir.Node, index: int, x_scale: float, w_scales: np.ndarray,
                   replaced: list[tuple[ir.Value, ir.Value]], taken: set[str]) -> None:
    b_value = node.inputs[index]
    b = np.asarray(b_value.const_value.numpy(), dtype=np.float32)
    scale = (np.float32(x_scale) * np.broadcast_to(w_scales, b.shape)).astype(np.float32)
    q = np.clip(np.rint(b.astype(np.float64) / scale), -(2**31), 2**31 - 1).astype(np.int32)
    q_value = new_init(graph, f"{b_value.name}_quantized", q, taken, origin=b_value.name)
    dq_out = _dq_node(graph, q_value, scale, np.zeros(scale.shape, np.int32), 0, b_value.name, b_value.shape, taken)
    node.replace_input_with(index, dq_out)
    replaced.append((b_value, dq_out))


def _drop_replaced(graph: ir.Graph, replaced: list[tuple[ir.Value, ir.Value]]) -> None:
    """Remove float weights no longer used; their dequantized stand-in takes over their name."""
    renamed: set[str] = set()
    for old, new in replaced:
        if old.uses() or old.is_graph_output() or old.is_graph_input():
            continue
        name = old.name
        if name in graph.initializers:
            del graph.initializers[name]
        if name not in renamed:
            new.name = name
            renamed.add(name)
