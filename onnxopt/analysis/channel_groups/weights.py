"""Rules of the ops with weights: Conv, ConvTranspose, Gemm and MatMul start a space for their output
channels (producers) and end the space of their input channels (consumers); a MatMul of two
activations joins their batch axes (attention heads)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups._operands import const_weight, input_at, rank_of
from onnxopt.analysis.channel_groups.spaces import Consumer, Fixup, ParamSlice, Producer, Space

if TYPE_CHECKING:
    from onnxopt.analysis.channel_groups.graph import ChannelGraph

__all__ = ["rule_conv", "rule_conv_transpose", "rule_gemm", "rule_matmul"]


def _link_weight(cg: ChannelGraph, node: ir.Node, out: Space, x: Space | None, kind: str,
                 axes: tuple[int, int], bias_index: int | None, bias_axis: int = 0) -> None:
    """Record `node` as the producer of `out` (weight input 1 indexed on ``axes[0]``, the bias on
    `bias_axis`) and, when `x` is given, as a consumer of `x` (weight indexed on ``axes[1]``)."""
    out_axis, in_axis = axes
    cg.producers.append(Producer(node, out, 1, out_axis, bias_index))
    cg.slices.append(ParamSlice(node, 1, out_axis, out))
    if bias_index is not None:
        cg.slices.append(ParamSlice(node, bias_index, bias_axis, out))
    if x is not None:
        cg.consumers.append(Consumer(node, x, kind, 1, in_axis))
        cg.slices.append(ParamSlice(node, 1, in_axis, x))
    cg.note_macs(node, x, out)


def rule_conv(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = const_weight(node, 1)
    x = cg.space_of(node.inputs[0])
    if w is None:
        return "weight is not a constant float initializer"
    bias = const_weight(node, 2)
    if input_at(node, 2) is not None and bias is None:
        return "bias is not a constant"
    group = node.attributes.get_int("group", 1)
    cout = w.shape[0]
    consts = bias.astype(np.float64) if bias is not None else np.zeros(cout)
    if x is not None and x.axis != 1:
        return "input channels are not on axis 1"
    out = cg.new_space(node.outputs[0], 1, cout, consts)
    bias_index = 2 if bias is not None else None
    # A grouped conv does not contract over all its input channels: it ties them to its outputs instead.
    _link_weight(cg, node, out, x if group == 1 else None, "conv", (0, 1), bias_index)
    if group == 1:
        return None
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


def rule_conv_transpose(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = const_weight(node, 1)
    x = cg.space_of(node.inputs[0])
    if w is None:
        return "weight is not a constant float initializer"
    if node.attributes.get_int("group", 1) != 1:
        return "grouped ConvTranspose is not handled"
    if x is not None and x.axis != 1:
        return "input channels are not on axis 1"
    bias = const_weight(node, 2)
    if input_at(node, 2) is not None and bias is None:
        return "bias is not a constant"
    cout = w.shape[1]
    out = cg.new_space(node.outputs[0], 1, cout, bias.astype(np.float64) if bias is not None else np.zeros(cout))
    _link_weight(cg, node, out, x, "convtranspose", (1, 0), 2 if bias is not None else None)
    return None


def rule_gemm(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = const_weight(node, 1)
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
    if input_at(node, 2) is not None:
        c = const_weight(node, 2)
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
    bias_axis = node.inputs[2].const_value.shape.rank() - 1 if bias_index is not None else 0
    _link_weight(cg, node, out, x, "gemm", (0, 1) if trans_b else (1, 0), bias_index, bias_axis)
    return None


def rule_matmul(cg: ChannelGraph, node: ir.Node) -> str | None:
    w = const_weight(node, 1)
    a = node.inputs[0]
    if w is None:
        return _matmul_activations(cg, node)
    if w.ndim != 2:
        return "weight is not 2-D"
    ra = rank_of(a)
    x = cg.space_of(a)
    if ra is None or ra < 2:
        return "input rank unknown or below 2"
    if x is not None and x.axis != ra - 1:
        return "input features are not on the last axis"
    out = cg.new_space(node.outputs[0], ra - 1, w.shape[1], np.zeros(w.shape[1]))
    _link_weight(cg, node, out, x, "matmul", (1, 0), None)
    return None


def _matmul_activations(cg: ChannelGraph, node: ir.Node) -> str | None:
    """MatMul of two activations: a tracked batch axis (attention heads) joins A, B and the output."""
    a, b = node.inputs
    sa, sb = cg.space_of(a), cg.space_of(b)
    if sa is None and sb is None:
        return None
    ra, rb, ro = rank_of(a), rank_of(b), rank_of(node.outputs[0])
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
