"""Embedding tables in int8 (dynamic and weight-only modes): ``Gather`` on a constant ``[V, D]`` table.

A transformer's word embedding is often the largest tensor of the model (all-MiniLM-L6-v2: 30522 x 384,
half of its weights), and no MatMul rule touches it. Each row gets its own symmetric scale, and only the
gathered rows are dequantized::

    s[v] = max_d |T[v, d]| / 127,   T_q = round(T / s) (int8)
    y = Cast(Gather(T_q, ids), float) * Gather(s[V, 1], ids)

which equals ``Gather(T_q * s, ids)`` exactly, costs two small Gathers and a Mul per call, and stores the
table in a quarter of its bytes. Tables under `MIN_ELEMENTS` values, Gathers on another axis and tables
read by other nodes too stay float.
"""

from __future__ import annotations

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

from .calib import quantize_array

__all__ = ["quantize_embeddings", "MIN_ELEMENTS"]

MIN_ELEMENTS = 1 << 16


def _declined(node: ir.Node) -> str | None:
    table = node.inputs[0] if node.inputs else None
    if not is_constant(table) or node.attributes.get_int("axis", 0) != 0:
        return "not a Gather of rows from a constant table"
    shape = table.shape
    if shape is None or len(shape) != 2 or table.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return "the table is not a 2-D float32 or float16 constant"
    if shape[0] * shape[1] < MIN_ELEMENTS:
        return f"the table has fewer than {MIN_ELEMENTS} values"
    if any(u.node is not node for u in table.uses()) or table.is_graph_output():
        return "the table is read by other nodes too"
    return None


def _rewrite(graph: ir.Graph, node: ir.Node, taken: set[str]) -> None:
    table, ids = node.inputs[0], node.inputs[1]
    t = np.asarray(constant_array(table), dtype=np.float32)
    scales = (np.abs(t).max(axis=1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    q = quantize_array(t, scales, 0, np.dtype(np.int8))
    base = node.name or table.name
    dtype = table.dtype  # the rows come back in the table's type (float16 rows of a float16 table)
    q_value = new_initializer(graph, f"{table.name}_quantized", q, origin=table.name, taken=taken)
    s_value = new_initializer(graph, f"{table.name}_row_scale", scales.astype(dtype.numpy()), taken=taken)

    def make(op: str, inputs: list[ir.Value], attrs: list[ir.Attr] | None = None) -> ir.Node:
        n = ir.Node("", op, inputs, attrs or [], name=unique_name(graph, f"{base}_{op}", taken))
        n.outputs[0].name = unique_name(graph, f"{base}_{op}_out", taken)
        return n

    rows = make("Gather", [q_value, ids], [ir.AttrInt64("axis", 0)])
    cast = make("Cast", [rows.outputs[0]], [ir.AttrInt64("to", dtype.value)])
    row_scale = make("Gather", [s_value, ids], [ir.AttrInt64("axis", 0)])
    out = make("Mul", [cast.outputs[0], row_scale.outputs[0]])
    graph.insert_before(node, [rows, cast, row_scale, out])
    take_over_output(graph, node, out.outputs[0])
    if not table.uses() and graph.initializers.get(table.name) is table:
        del graph.initializers[table.name]


def quantize_embeddings(graph: ir.Graph, stats: PassStats, exclude: list[str]) -> int:
    """Rewrite every eligible embedding Gather of `graph` (see the module doc); the number rewritten."""
    taken = all_names(graph)
    done = 0
    for node in list(graph):
        if not is_onnx_op(node, "Gather") or matches_any(node, exclude):
            continue
        reason = _declined(node)
        if reason:
            continue
        _rewrite(graph, node, taken)
        done += 1
        stats.layers.append({"node": node.name or "Gather", "op": "Gather", "embedding": True})
    return done
