"""Static QDQ for the quantize pass, phase 2: one place inserts the Q/DQ that phase 1 (`static`) marked.

- every tied group of marked tensors gets one scale and zero point, from the union of its members'
  calibrated ranges (`group_qparams`); a group holding a fused Relu/Clip output starts at 0 with the
  zero point at the type's minimum;
- ``QuantizeLinear -> DequantizeLinear`` goes after every marked tensor, and all its consumers read
  the dequantized value (so a tensor shared by several consumers has one scale);
- marked weights become int8 initializers (symmetric, per channel on the `layout` axis) and biases
  int32 initializers (``scale = scale_x * scale_w``, zero point 0), each feeding a DequantizeLinear
  whose output keeps the float tensor's name.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    all_names,
    is_constant,
    name_stem,
    new_initializer,
    record_origin,
    require_finite,
    unique_name,
)

from .calib import ActType, QParams, Range, qparams, quantize_array, weight_scales
from .layout import weight_axes
from .static import Fusion, StaticPlan

__all__ = ["group_qparams", "apply_static"]

_FLOAT = ir.DataType.FLOAT
_WEIGHT_REWRITTEN = ("Conv", "ConvTranspose", "Gemm")
"""The ops whose float weight ONNX Runtime rounds to per-tensor int8 when their input is dequantized."""


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
                 rounded: dict[str, np.ndarray] | None = None, act: ActType = "uint8") -> dict[str, int]:
    """Rewrite `graph` as planned; return counts of what was inserted.

    `rounded` maps weight names to int8 data rounded elsewhere (GPTQ) with the same scales; `act` is the
    type constant operands of element-wise ops are stored in (each with its own scale and zero point).
    """
    taken = all_names(graph)
    for name, fusion in plan.fused.items():
        _fuse(graph, fusion, name)
        plan.acts[name] = fusion.producer_out
    int8_weights = {id(node) for node, _, _ in plan.weights}
    for name, value in plan.acts.items():
        _insert_qdq(graph, value, qps[name], taken, int8_weights)
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
    consts: dict[str, ir.Value] = {}
    for node, index in plan.consts:
        _quantize_constant(graph, node, index, act, consts, replaced, taken)
    _drop_replaced(graph, replaced)
    return {"activations": len(plan.acts), "weights": len(cache), "biases": biases,
            "fused_activations": len(plan.fused), "constant_operands": len(consts)}


def _fuse(graph: ir.Graph, fusion: Fusion, name: str) -> None:
    act, x = fusion.act, fusion.producer_out
    y = act.outputs[0]
    shape, typ = y.shape, y.type
    y.replace_all_uses_with(x)
    graph.remove(act, safe=True)
    x.name = name
    x.shape, x.type = shape, typ


def _insert_qdq(graph: ir.Graph, value: ir.Value, qp: QParams, taken: set[str], int8_weights: set[int]) -> None:
    base = name_stem(value.name)
    uses = list(value.uses())
    float_uses = {u: found for u in uses if (found := _float_weight_channels(u.node, u.idx, int8_weights))}
    uses = [u for u in uses if u not in float_uses]
    if not uses and all(channels <= 1 for channels, _ in float_uses.values()):
        return  # every reader stays float and reads the float value: nothing reads a quantized copy
    scale = new_initializer(graph, f"{base}_scale", np.asarray(qp.scale, dtype=np.float32), taken=taken)
    zp = new_initializer(graph, f"{base}_zero_point", np.asarray(qp.zero_point, dtype=qp.dtype), taken=taken)
    q = ir.Node("", "QuantizeLinear", [value, scale, zp], name=unique_name(graph, f"{base}_QuantizeLinear", taken))
    q.outputs[0].name = unique_name(graph, f"{base}_quantized", taken)
    q.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(qp.dtype))
    q.outputs[0].shape = value.shape
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp],
                 name=unique_name(graph, f"{base}_DequantizeLinear", taken))
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized", taken)
    dq.outputs[0].type = ir.TensorType(_FLOAT)
    dq.outputs[0].shape = value.shape
    record_origin(dq.outputs[0], value.name)
    for use in uses:
        use.node.replace_input_with(use.idx, dq.outputs[0])
    # A Conv/ConvTranspose/Gemm left in float whose input comes from a per-tensor DequantizeLinear gets its float
    # weight rounded to int8 with one scale by ONNX Runtime's own graph optimizer (WeightBiasQuantization):
    # it reads a per-channel DequantizeLinear of the same values instead, which that rewrite leaves alone; one
    # with a single input channel, where per-channel is per-tensor, reads the float value itself.
    extra: dict[tuple[int, int], ir.Node] = {}  # one per (channels, axis), shared by the layers that read it
    for use, (channels, axis) in float_uses.items():
        if channels <= 1:
            continue
        if (channels, axis) in extra:
            use.node.replace_input_with(use.idx, extra[channels, axis].outputs[0])
            continue
        s = new_initializer(graph, f"{base}_scale_per_channel", np.full(channels, qp.scale, np.float32), taken=taken)
        z = new_initializer(graph, f"{base}_zero_point_per_channel", np.full(channels, qp.zero_point, qp.dtype),
                            taken=taken)
        node = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], [ir.AttrInt64("axis", axis)],
                       name=unique_name(graph, f"{base}_DequantizeLinear_per_channel", taken))
        node.outputs[0].name = unique_name(graph, f"{base}_dequantized_per_channel", taken)
        node.outputs[0].type = ir.TensorType(_FLOAT)
        node.outputs[0].shape = value.shape
        record_origin(node.outputs[0], value.name)
        use.node.replace_input_with(use.idx, node.outputs[0])
        extra[channels, axis] = node
    added = [q, *([dq] if uses else []), *extra.values()]  # no per-tensor DequantizeLinear nothing reads
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, added)
    else:
        graph.insert_before(graph.node(0), added)


def _float_weight_channels(node: ir.Node, index: int, int8_weights: set[int]) -> tuple[int, int] | None:
    """(channels, axis) of input `index` when it is the activation of a Conv/ConvTranspose/Gemm that stays float
    with a constant float weight (the shared operand view, `layout.weight_axes`), else None."""
    if id(node) in int8_weights or node.op_type not in _WEIGHT_REWRITTEN or node.domain not in ("", "ai.onnx"):
        return None
    axes = weight_axes(node)
    w = node.inputs[axes.weight] if axes is not None else None
    if axes is None or axes.activation != index or not is_constant(w) or w.dtype != _FLOAT:
        return None
    channels = int(w.const_value.shape[axes.reduction_axis])
    if node.op_type == "Conv":  # W[M, C/g, k...]: the input has g times the kernel's channels
        channels *= node.attributes.get_int("group", 1)
    return channels, axes.feature_axis


def _dq_node(graph: ir.Graph, q_value: ir.Value, scale: np.ndarray, zp: np.ndarray, axis: int | None,
             origin: str, shape: ir.Shape | None, taken: set[str]) -> ir.Value:
    base = name_stem(origin)
    s = new_initializer(graph, f"{base}_scale", scale, taken=taken)
    inputs = [q_value, s]
    if zp.dtype != np.int32 or np.any(zp):
        # An int32 bias always has zero point 0, DequantizeLinear's default: store none.
        inputs.append(new_initializer(graph, f"{base}_zero_point", zp, taken=taken))
    attrs = [ir.AttrInt64("axis", axis)] if axis is not None and scale.ndim == 1 else []
    dq = ir.Node("", "DequantizeLinear", inputs, attrs,
                 name=unique_name(graph, f"{base}_DequantizeLinear", taken))
    out = dq.outputs[0]
    out.name = unique_name(graph, f"{base}_dequantized", taken)
    out.type = ir.TensorType(_FLOAT)
    out.shape = shape
    record_origin(out, origin)
    graph.insert_before(graph.node(0), dq)
    return out


def _quantize_weight(graph: ir.Graph, node: ir.Node, index: int, axis: int | None,
                     cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]],
                     replaced: list[tuple[ir.Value, ir.Value]], taken: set[str],
                     rounded: dict[str, np.ndarray]) -> np.ndarray:
    w_value = node.inputs[index]
    key = (w_value.name, axis)
    if key not in cache:
        w = require_finite(np.asarray(w_value.const_value.numpy(), dtype=np.float32), f"weight '{w_value.name}'")
        scales = weight_scales(w, axis)
        bshape = [1] * w.ndim
        if axis is not None:
            bshape[axis] = -1
        q = rounded.get(w_value.name)
        if q is None or q.shape != w.shape:
            q = quantize_array(w, scales.reshape(bshape) if axis is not None else scales, 0, np.dtype(np.int8))
        q_value = new_initializer(graph, f"{name_stem(w_value.name)}_quantized", q, origin=w_value.name, taken=taken)
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
    q_value = new_initializer(graph, f"{name_stem(b_value.name)}_quantized", q, origin=b_value.name, taken=taken)
    dq_out = _dq_node(graph, q_value, scale, np.zeros(scale.shape, np.int32), 0, b_value.name, b_value.shape, taken)
    node.replace_input_with(index, dq_out)
    replaced.append((b_value, dq_out))


def _quantize_constant(graph: ir.Graph, node: ir.Node, index: int, act: ActType, done: dict[str, ir.Value],
                       replaced: list[tuple[ir.Value, ir.Value]], taken: set[str]) -> None:
    """A constant operand of an element-wise op as an 8-bit initializer (own range, per tensor) + DequantizeLinear."""
    value = node.inputs[index]
    if value.name not in done:
        c = np.asarray(value.const_value.numpy(), dtype=np.float32)
        qp = qparams(Range(float(c.min()), float(c.max())), act)
        q = quantize_array(c, qp.scale, qp.zero_point, qp.dtype)
        q_value = new_initializer(graph, f"{name_stem(value.name)}_quantized", q, origin=value.name, taken=taken)
        done[value.name] = _dq_node(graph, q_value, np.asarray(qp.scale, np.float32),
                                    np.asarray(qp.zero_point, qp.dtype), None, value.name, value.shape, taken)
        replaced.append((value, done[value.name]))
    node.replace_input_with(index, done[value.name])


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
