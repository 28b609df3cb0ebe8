"""Rules of the ops that move or remap channel indices: Concat (offset ranges), Split and Slice
(ranges back), Transpose and Squeeze/Unsqueeze (the axis moves), Flatten and Reshape (a channel to
its block ``c -> c*S .. c*S+S-1``, or a block of channels to one index), and Shape (reads dims).

Split, Slice and Reshape record a `Fixup`: their split sizes, bounds or target shape are recomputed
after removal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups._operands import (
    axes_operand,
    axis_attribute,
    const_ints,
    dims_of,
    input_at,
    is_static,
    on_tracked_input,
    rank_of,
)
from onnxopt.analysis.channel_groups.spaces import Fixup, Space

if TYPE_CHECKING:
    from onnxopt.analysis.channel_groups.graph import ChannelGraph

__all__ = [
    "rule_concat",
    "rule_split",
    "rule_slice",
    "rule_transpose",
    "rule_squeeze",
    "rule_flatten",
    "rule_reshape",
    "rule_shape",
]


def rule_concat(cg: ChannelGraph, node: ir.Node) -> str | None:
    spaces = [cg.space_of(v) for v in node.inputs]
    if all(s is None for s in spaces):
        return None
    ro = rank_of(node.outputs[0])
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
        dims = dims_of(v)
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


@on_tracked_input
def rule_split(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    axis = axis_attribute(node, 0)
    if axis is None:
        return "rank unknown"
    if axis != x.axis:
        for out in node.outputs:
            cg.follow(x, out, x.axis)
        return None
    if input_at(node, 1) is not None:
        split = const_ints(node.inputs[1])
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


@on_tracked_input
def rule_slice(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = rank_of(node.inputs[0])
    starts, ends = const_ints(node.inputs[1]), const_ints(node.inputs[2])
    axes, steps = const_ints(input_at(node, 3)), const_ints(input_at(node, 4))
    if rank is None or starts is None or ends is None or (input_at(node, 3) is not None and axes is None):
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


@on_tracked_input
def rule_transpose(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = rank_of(node.inputs[0])
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        if rank is None:
            return "rank unknown"
        perm = list(reversed(range(rank)))
    cg.follow(x, node.outputs[0], list(perm).index(x.axis))
    return None


@on_tracked_input
def rule_squeeze(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank_in, rank_out = rank_of(node.inputs[0]), rank_of(node.outputs[0])
    if rank_in is None or rank_out is None:
        return "rank unknown"
    axes, reason = axes_operand(node)
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


@on_tracked_input
def rule_flatten(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    dims = dims_of(node.inputs[0])
    if dims is None:
        return "input shape unknown"
    k = node.attributes.get_int("axis", 1) % max(1, len(dims))
    if x.axis < k or any(d != 1 for d in dims[k:x.axis]):
        return "flattens the channel axis into the leading dimension"
    rest = dims[x.axis + 1:]
    if not is_static(rest):
        return "trailing dimensions are not static"
    return _merge_block(cg, x, node.outputs[0], 1, math.prod(rest))


def _merge_block(cg: ChannelGraph, x: Space, out_value: ir.Value, axis: int, block: int) -> None:
    consts = np.repeat(cg.consts(x), block)
    out = cg.new_space(out_value, axis, x.size * block, consts)
    for c in range(x.size):
        for j in range(block):
            cg.union(x.base + c, out.base + c * block + j)
    return None


@on_tracked_input
def rule_reshape(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    shape = const_ints(node.inputs[1])
    din, dout = dims_of(node.inputs[0]), dims_of(node.outputs[0])
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
    if not is_static(rin) or not is_static(rout):
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



@on_tracked_input
def rule_shape(cg: ChannelGraph, node: ir.Node, x: Space) -> str | None:
    rank = rank_of(node.inputs[0])
    if rank is None:
        return "reads the shape of a tracked tensor"
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start = start + rank if start < 0 else start
    end = min(rank, end + rank if end < 0 else end)
    if start <= x.axis < end:
        return "reads the channel dimension"
    return None
