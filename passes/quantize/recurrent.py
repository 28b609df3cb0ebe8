"""LSTM with int8 weights: ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM``.

ONNX Runtime has no QDQ fusion for the ONNX ``LSTM`` op, so a static QDQ model runs it in float; on a
CRNN text recognizer it is then about half of the int8 model's time. ``DynamicQuantizeLSTM`` takes int8
weights and quantizes the activations inside the kernel, several times faster than the float LSTM.

For ``LSTM(X, W[D, 4H, I], R[D, 4H, H], B, sequence_lens, initial_h, initial_c, P)`` with constant float
``W`` and ``R`` (``layout = 0``):

    s_W[d, g] = max_i |W[d, g, i]| / 127,   W_q = round(W / s_W)  (int8, zero point 0)

and the same for ``R``; the kernel wants the weights transposed, ``W_q[D, I, 4H]`` and ``R_q[D, H, 4H]``,
with scales and zero points of shape ``[D, 4H]`` (one per gate row). Inputs of the new node:
``X, W_q, R_q, B, sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale,
R_zero_point``; attributes and outputs (names included) are the LSTM's.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, new_initializer, record_origin

from .calib import quantize_array

__all__ = ["lstm_declined", "quantize_lstm", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"


def lstm_declined(node: ir.Node) -> str | None:
    """Why an LSTM cannot become a DynamicQuantizeLSTM, else None."""
    if node.attributes.get_int("layout", 0) != 0:
        return "LSTM with layout=1"
    if len(node.inputs) < 3:
        return "LSTM without a recurrence weight"
    for idx in (1, 2):
        w = constant_array(node.inputs[idx])
        if w is None or w.dtype != np.float32 or w.ndim != 3:
            return "LSTM weights are not 3-D float32 constants"
    return None


def _quantized(graph: ir.Graph, value: ir.Value, taken: set[str]) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(int8 [D, K, 4H], scales [D, 4H], zero points [D, 4H]) of an LSTM weight [D, 4H, K]."""
    w = np.asarray(value.const_value.numpy(), dtype=np.float32)
    scales = np.abs(w).max(axis=2) / np.float32(127.0)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    q = quantize_array(w, scales[:, :, None], 0, np.dtype(np.int8)).transpose(0, 2, 1)
    q_value = new_initializer(graph, f"{value.name}_quantized", q, origin=value.name, taken=taken)
    s_value = new_initializer(graph, f"{value.name}_scale", scales, taken=taken)
    z_value = new_initializer(graph, f"{value.name}_zero_point", np.zeros(scales.shape, np.int8), taken=taken)
    return q_value, s_value, z_value


def quantize_lstm(graph: ir.Graph, node: ir.Node, taken: set[str]) -> ir.Node:
    """Replace LSTM `node` (checked with `lstm_declined`) by a DynamicQuantizeLSTM; return the new node."""
    w_q, w_s, w_z = _quantized(graph, node.inputs[1], taken)
    r_q, r_s, r_z = _quantized(graph, node.inputs[2], taken)
    optional = [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]
    attrs = [a for name, a in node.attributes.items() if name != "layout"]
    new = ir.Node(MS_DOMAIN, "DynamicQuantizeLSTM", [node.inputs[0], w_q, r_q, *optional, w_s, w_z, r_s, r_z],
                  attrs, num_outputs=len(node.outputs), name=node.name or None)
    graph.insert_before(node, new)
    renames = []
    for old, out in zip(list(node.outputs), new.outputs):
        renames.append((out, old.name, old.shape, old.type))
        old.replace_all_uses_with(out, replace_graph_outputs=True)
    weights = [v for v in node.inputs[1:3] if v is not None]
    graph.remove(node, safe=True)
    for out, name, shape, typ in renames:
        out.name, out.shape, out.type = name, shape, typ
    for v in weights:
        if not v.uses() and not v.is_graph_output() and graph.initializers.get(v.name) is v:
            del graph.initializers[v.name]
    record_origin(w_q, weights[0].name)
    return new
