"""Cross-layer equalization for the quantize pass (``equalize=true``), for depthwise-separable nets.

Case: ``Conv1 -> [Relu] -> Conv2`` where Conv1's output channel ``i`` is Conv2's input channel ``i``
(Conv2 regular with group 1, or depthwise with one input channel per group), both weights constant
and used only there. Relu is positively homogeneous, ``Relu(x / s) = Relu(x) / s`` for ``s > 0``, so
for every channel

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i     (depthwise Conv2: W2[i] *= s_i)

leaves the float output unchanged (exact up to rounding). With ``r1_i = max|W1[i]|`` and
``r2_i = max|W2[:, i]|``, ``s_i = sqrt(r1_i / r2_i)`` makes both ranges ``sqrt(r1_i r2_i)``: a depthwise
layer whose channels span orders of magnitude (common after BatchNorm folding) no longer loses its
small channels to one scale per channel of the *next* layer's input (Nagel et al., 2019). A few sweeps
let chains of pairs settle.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.layers import conv_geometry
from onnxopt.graph import constant_array, is_onnx_op, only_used_by, set_weight
from onnxopt.registry import PassStats

from .layout import out_channels

__all__ = ["equalize_pairs"]

logger = logging.getLogger(__name__)

_SWEEPS = 4


def _next_conv(conv: ir.Node) -> ir.Node | None:
    """The Conv that reads `conv`'s output directly or through one Relu, when nothing else does."""
    y = conv.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    nxt = uses[0].node
    if nxt.op_type == "Relu":
        r = nxt.outputs[0]
        r_uses = list(r.uses())
        if len(r_uses) != 1 or r.is_graph_output() or r_uses[0].idx != 0:
            return None
        nxt = r_uses[0].node
    elif uses[0].idx != 0:
        return None
    return nxt if is_onnx_op(nxt, "Conv") else None


def _try_equalize(a: ir.Node, b: ir.Node) -> str | None:
    """Equalize the pair (a, b) in place; return the reason when it cannot."""
    w1, w2 = constant_array(a.inputs[1]), constant_array(b.inputs[1])
    if w1 is None or w2 is None or w1.dtype != np.float32 or w2.dtype != np.float32:
        return "weights are not float32 constants"
    if not (only_used_by(a.inputs[1], a) and only_used_by(b.inputs[1], b)):
        return "a weight is shared"
    bias = a.inputs[2] if len(a.inputs) > 2 else None
    b1 = constant_array(bias) if bias is not None else None
    if bias is not None and (b1 is None or not only_used_by(bias, a)):
        return "the first bias is not a constant used only here"
    channels = out_channels(a, w1)
    group2 = conv_geometry(b, w2.shape).groups
    if group2 == 1 and w2.shape[1] == channels:
        r2 = np.abs(w2).max(axis=tuple(i for i in range(w2.ndim) if i != 1))
    elif group2 == channels and w2.shape[1] == 1 and w2.shape[0] == channels:
        r2 = np.abs(w2).reshape(channels, -1).max(axis=1)
    else:
        return "the second Conv is neither regular nor depthwise over the same channels"
    r1 = np.abs(w1).reshape(channels, -1).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones(channels, np.float64)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    set_weight(a.inputs[1], (w1 / s.reshape(shape1)).astype(np.float32))
    if b1 is not None:
        set_weight(bias, (b1 / s).astype(np.float32))
    if group2 == 1:
        shape2 = (1, -1) + (1,) * (w2.ndim - 2)
    else:
        shape2 = (-1,) + (1,) * (w2.ndim - 1)
    set_weight(b.inputs[1], (w2 * s.reshape(shape2)).astype(np.float32))
    return None


def equalize_pairs(graph: ir.Graph, stats: PassStats) -> int:
    """Cross-layer equalize every eligible Conv pair of `graph`; return the number of pairs."""
    pairs = []
    for node in graph:
        if is_onnx_op(node, "Conv"):
            nxt = _next_conv(node)
            if nxt is not None:
                pairs.append((node, nxt))
    done: set[int] = set()
    for sweep in range(_SWEEPS):
        for a, b in pairs:
            reason = _try_equalize(a, b)
            if reason and sweep == 0:
                stats.skip(a, f"equalize: {reason}")
            elif not reason:
                done.add(id(a))
    return len(done)
