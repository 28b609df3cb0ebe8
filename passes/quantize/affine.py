"""Exact rewrites before quantizing: constant element-wise scales and shifts folded into the linear layers.

Exported graphs often keep per-channel affine ops next to convolutions that neither ``fold`` nor
ONNX Runtime's optimizer merges (PP-LCNet's "learnable affine blocks" ``Conv -> Mul(c) -> Add(d)``,
hard-swish's ``Div(6)`` in front of the next Conv). Quantized, each of them is either a float op
between a DequantizeLinear and a QuantizeLinear or one more requantization, which costs time and
accuracy. Both cases below are exact in real arithmetic (float rounding aside), using the shared
row view of `onnxopt.analysis.layers` (``y[row, j] = features(x)[row] · W[j] + b[j]``):

1. **After a layer** (`fold_after_layers`): ``y -> Mul(c) | Div(c) | Add(d) | Sub(d)`` where ``y`` is
   the output of a Conv / ConvTranspose / Gemm / MatMul (or its bias Add) used only by that op, and
   the constant broadcasts along the output channels only (a scalar, ``[C, 1, 1]``, ``[N]``...):
   ``W[j] *= c_j``, ``b[j] = b[j] * c_j + d_j``; chains (``Mul -> Add``) fold one op at a time.
   ``Sub(d, y)`` is ``-y + d``.
2. **Before layers** (`fold_before_layers`): ``x -> [Mul(a) | Div(a)]... -> [Add(b) | Sub(b)] -> layers``
   where every op of the chain has one user, the last one's users are all linear layers reading it as
   their activation, and the constants broadcast along the input channels (Conv axis 1, Gemm/MatMul
   the last axis). ``W[:, c] *= a_c`` is exact whatever the padding (a padded zero stays zero);
   the shift goes into the bias, ``b[j] += Σ_f W[j, f] b_{c(f)}``, only for layers without padding;
   otherwise one ``Add(b / a)`` stays in front (``a x + b = a (x + b / a)``, when no ``a_c`` is 0).

Weights or biases shared with other nodes are not touched (the reason is logged). Names of graph
outputs never change; the folded op's output name is taken over by the layer's output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.layers import LINEAR_OPS, Linear, linear_of
from onnxopt.graph import constant_array, is_constant, is_onnx_op, new_initializer, take_over_output, unique_name
from onnxopt.registry import matches_any

__all__ = ["fold_affine", "fold_after_layers", "fold_before_layers"]

logger = logging.getLogger(__name__)

_AFFINE = ("Mul", "Div", "Add", "Sub")


def fold_affine(graph: ir.Graph, exclude: Iterable[str] = ()) -> dict[str, int]:
    """Both rewrites until nothing changes; counts of the ops folded."""
    patterns = list(exclude)
    after = before = 0
    while True:
        a = fold_after_layers(graph, patterns)
        b = fold_before_layers(graph, patterns)
        after, before = after + a, before + b
        if not a and not b:
            return {"affine_after_layers": after, "affine_before_layers": before}


# ------------------------------------------------------------------------------ helpers
def _float_constant(value: ir.Value | None) -> np.ndarray | None:
    arr = constant_array(value)
    if arr is None or arr.dtype not in (np.float32, np.float64, np.float16):
        return None
    return arr


def _rank(value: ir.Value) -> int | None:
    return value.shape.rank() if value.shape is not None else None


def _channel_vector(c: np.ndarray, channels: int, axis: int, rank: int | None) -> np.ndarray | None:
    """`c` as one value per channel when it broadcasts along axis `axis` of a rank-`rank` tensor only."""
    if c.size == 1:
        if rank is None and c.ndim > 1:
            return None
        if rank is not None and c.ndim > rank:
            return None
        return np.full(channels, float(c.reshape(-1)[0]))
    if rank is None or c.ndim > rank:
        return None
    pos = axis % rank - (rank - c.ndim)  # where the channel axis falls in c's (right-aligned) dims
    if pos < 0 or c.shape[pos] != channels or c.size != channels:
        return None
    return c.reshape(-1).astype(np.float64)


def _split_operands(node: ir.Node, y: ir.Value) -> tuple[int, np.ndarray] | None:
    """(index of `y` among the inputs, the other operand's constant) of a binary op reading `y`."""
    if len(node.inputs) != 2 or node.inputs[0] is node.inputs[1]:
        return None
    idx = 0 if node.inputs[0] is y else 1
    c = _float_constant(node.inputs[1 - idx])
    return (idx, c) if c is not None else None


def _scale_shift(op: str, idx: int, c: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) with ``op(y, c) = scale * y + shift`` (y at input `idx`), or None (e.g. c / y)."""
    zero, one = np.zeros_like(c, dtype=np.float64), np.ones_like(c, dtype=np.float64)
    c64 = c.astype(np.float64)
    if op == "Mul":
        return c64, zero
    if op == "Add":
        return one, c64
    if op == "Sub":
        return (one, -c64) if idx == 0 else (-one, c64)
    if op == "Div" and idx == 0 and np.all(c64 != 0):
        return 1.0 / c64, zero
    return None


# ------------------------------------------------------------------------------ 1. after a layer
def fold_after_layers(graph: ir.Graph, exclude: list[str]) -> int:
    """Fold constant per-output-channel Mul/Div/Add/Sub after linear layers into them; count them."""
    done = 0
    for node in list(graph):
        if not is_onnx_op(node, *LINEAR_OPS) or matches_any(node, exclude):
            continue
        while True:
            layer, _ = linear_of(node)
            if layer is None:
                break
            reason = _try_fold_after(graph, layer, exclude)
            if reason:
                logger.debug("affine after %s: %s", node.name, reason)
                break
            done += 1
    return done


def _try_fold_after(graph: ir.Graph, layer: Linear, exclude: list[str]) -> str | None:
    y = layer.y
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return "output is not used by one node only"
    op = uses[0].node
    if not is_onnx_op(op, *_AFFINE) or matches_any(op, exclude):
        return "its user is not Mul/Div/Add/Sub"
    split = _split_operands(op, y)
    if split is None:
        return "the other operand is not a float constant"
    idx, c = split
    out = op.outputs[0]
    rank = _rank(y) if _rank(y) is not None else (len(layer.weight.shape) if layer.op != "MatMul" else None)
    if _rank(out) is not None and rank is not None and _rank(out) != rank:
        return "the constant broadcasts the output to a larger rank"
    ss = _scale_shift(op.op_type, idx, c)
    if ss is None:
        return "not an affine function of the layer output"
    channels = layer.out_channels
    scale = _channel_vector(ss[0], channels, layer.channel_axis, rank)
    shift = _channel_vector(ss[1], channels, layer.channel_axis, rank)
    if scale is None or shift is None:
        return "the constant is not one value per output channel"
    if np.any(shift) and layer.bias_reason:
        return f"bias: {layer.bias_reason}"
    rows, bias = layer.weights(), layer.bias_values()
    reason = layer.write(graph, weights=rows * scale[:, None], bias=bias * scale + shift if np.any(shift)
                         or layer.bias is not None else None)
    if reason:
        return reason
    constants = [v for v in op.inputs if is_constant(v)]
    take_over_output(graph, op, layer.y)
    _drop_unused(graph, constants)
    return None


# ------------------------------------------------------------------------------ 2. before layers
def fold_before_layers(graph: ir.Graph, exclude: list[str]) -> int:
    """Fold constant per-input-channel Mul/Div(/Add/Sub) chains in front of linear layers; count the ops."""
    done = 0
    for node in list(graph):
        if node.graph is None or not is_onnx_op(node, *_AFFINE) or matches_any(node, exclude):
            continue
        folded = _try_fold_before(graph, node, exclude)
        if isinstance(folded, str):
            logger.debug("affine before layers at %s: %s", node.name, folded)
        else:
            done += folded
    return done


def _activation_input(node: ir.Node) -> ir.Value | None:
    """The operand of a binary affine op that is not a constant."""
    if len(node.inputs) != 2:
        return None
    for v in node.inputs:
        if v is not None and not is_constant(v):
            return v
    return None


def _chain_from(start: ir.Node, exclude: list[str]) -> tuple[list[ir.Node], ir.Value] | str:
    """The affine ops from `start` on, each the single user of the previous one's output."""
    chain = [start]
    while True:
        out = chain[-1].outputs[0]
        uses = list(out.uses())
        if out.is_graph_output() or not uses:
            return "a graph output or unused"
        nxt = uses[0].node
        if len(uses) == 1 and is_onnx_op(nxt, *_AFFINE) and not matches_any(nxt, exclude) \
                and _split_operands(nxt, out) is not None:
            chain.append(nxt)
            continue
        return chain, out


def _consumers(value: ir.Value, exclude: list[str]) -> list[Linear] | str:
    layers = []
    for use in value.uses():
        node = use.node
        if not is_onnx_op(node, *LINEAR_OPS) or matches_any(node, exclude):
            return "a user is not a linear layer"
        layer, reason = linear_of(node)
        if layer is None:
            return reason or "no layer view"
        if layer.x is not value or use.idx != 0 or layer.op == "ConvTranspose" or layer.trans_a:
            return "the chain is not the layer's activation input"
        if layer.write_blocker(weights=True):
            return "a weight is shared with other nodes"
        layers.append(layer)
    return layers if layers else "no users"


def _input_channel_axis(layer: Linear) -> int:
    return 1 if layer.op == "Conv" else -1


def _feature_channels(layer: Linear) -> np.ndarray:
    """The input channel of every (row, feature) entry of the layer's row-form weights [out, in]."""
    kernel = int(np.prod(layer.geometry.kernel)) if layer.geometry is not None else 1
    per_group = layer.in_features // kernel
    features = np.arange(layer.in_features) // kernel
    return layer.row_groups()[:, None] * per_group + features[None, :]


def _padded(layer: Linear) -> bool:
    geo = layer.geometry
    return geo is not None and (geo.auto_pad not in ("NOTSET", "VALID") or any(geo.pads))


def _try_fold_before(graph: ir.Graph, start: ir.Node, exclude: list[str]) -> int | str:
    x = _activation_input(start)
    if x is None:
        return "no activation operand"
    got = _chain_from(start, exclude)
    if isinstance(got, str):
        return got
    chain, end = got
    layers = _consumers(end, exclude)
    if isinstance(layers, str):
        return layers
    axes = {_input_channel_axis(layer) for layer in layers}
    channels = {layer.in_features * layer.groups // (int(np.prod(layer.geometry.kernel)) if layer.geometry else 1)
                for layer in layers}
    if len(axes) != 1 or len(channels) != 1:
        return "the users disagree on the input channels"
    axis, n_in = axes.pop(), channels.pop()
    rank = _rank(x)
    scale, shift = np.ones(n_in), np.zeros(n_in)
    value = x
    for op in chain:
        split = _split_operands(op, value)
        if split is None:
            return "an operand is not a float constant"
        ss = _scale_shift(op.op_type, split[0], split[1])
        if ss is None:
            return "not affine"
        a = _channel_vector(ss[0], n_in, axis, rank)
        b = _channel_vector(ss[1], n_in, axis, rank)
        if a is None or b is None:
            return "a constant is not one value per input channel"
        if _rank(op.outputs[0]) is not None and rank is not None and _rank(op.outputs[0]) != rank:
            return "a constant broadcasts to a larger rank"
        scale, shift = scale * a, shift * a + b
        value = op.outputs[0]
    has_shift = bool(np.any(shift))
    keep_add = has_shift and any(_padded(layer) for layer in layers)
    if keep_add and np.all(scale == 1.0):
        return "only a shift, in front of a padded layer: nothing to fold"
    if keep_add and np.any(scale == 0):
        return "a zero scale with a shift in front of a padded layer"
    if has_shift and not keep_add and any(layer.bias_reason for layer in layers):
        return "a layer's bias cannot take the shift"
    for layer in layers:
        chans = _feature_channels(layer)
        rows = layer.weights()
        bias = layer.bias_values() + (rows * shift[chans]).sum(axis=1) if has_shift and not keep_add else None
        reason = layer.write(graph, weights=rows * scale[chans], bias=bias)
        if reason:  # checked above; a failure here would leave the layers half rewritten
            raise RuntimeError(f"affine fold: {reason}")
    constants = [v for op in chain for v in op.inputs if is_constant(v)]
    if keep_add:
        _rewire_shift(graph, chain, x, end, shift / scale, axis, rank)
    else:
        end.replace_all_uses_with(x)
        for op in reversed(chain):
            graph.remove(op, safe=True)
    _drop_unused(graph, constants)
    return len(chain)


def _drop_unused(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Delete the initializers among `values` that nothing reads any more."""
    for v in values:
        if v is not None and not v.uses() and not v.is_graph_output() and graph.initializers.get(v.name) is v:
            del graph.initializers[v.name]


def _rewire_shift(graph: ir.Graph, chain: list[ir.Node], x: ir.Value, end: ir.Value, shift: np.ndarray,
                  axis: int, rank: int | None) -> None:
    """Leave one ``Add(x, shift)`` in front of the layers, under a name of its own: it computes
    ``x + b / a``, not the chain's ``a x + b``, and a name in both models means the same tensor (the
    report compares tensors by name)."""
    last = chain[-1]
    if rank is not None and axis % rank != rank - 1:
        shape = [1] * (rank - axis % rank)
        shape[0] = -1
        const = shift.reshape(shape)
    else:
        const = shift
    dtype = np.dtype(x.dtype.numpy()) if x.dtype is not None else np.dtype(np.float32)
    c = new_initializer(graph, f"{last.name or end.name}_shift", const.astype(dtype))
    add = ir.Node("", "Add", [x, c], name=last.name or None)
    graph.insert_before(last, add)
    add.outputs[0].name = unique_name(graph, f"{end.name}.unscaled")
    add.outputs[0].type = end.type
    end.replace_all_uses_with(add.outputs[0])
    graph.remove(last, safe=True)
    for op in reversed(chain[:-1]):
        graph.remove(op, safe=True)
