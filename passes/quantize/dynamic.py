"""Dynamic and weight-only quantization for the quantize pass (no calibration data).

Dynamic (MatMul ``x @ W`` and Gemm ``x @ W(^T) + C`` with a constant float weight, ``W`` as ``[K, N]``)::

    x -> DynamicQuantizeLinear -> (x_q uint8, s_x, z_x)
    y = Cast(MatMulInteger(x_q, W_q, z_x, 0), float) * (s_x * s_w)        [+ C for Gemm]

``W_q = round(W / s_w)`` int8 with ``s_w = max|W[:, n]| / 127`` per output column (or one scale), so
``y = s_x s_w Σ_k (x_q - z_x) W_q ≈ x @ W``. ONNX Runtime fuses the chain into
``DynamicQuantizeMatMul``.

Dynamic Conv (1-D, 2-D or 3-D, any stride / pads / dilation / group, constant float weight ``[M, C/g, k...]``
and optional constant bias ``[M]``)::

    x -> DynamicQuantizeLinear -> (x_q uint8, s_x, z_x)
    y = Cast(ConvInteger(x_q, W_q, z_x, 0), float) * (s_x * s_w[1, M, 1...]) [+ B[1, M, 1...]]

with the Conv's attributes on ConvInteger and ``W_q = round(W / s_w)`` int8, ``s_w[m] = max|W[m]| / 127``
per output channel (or one scale). ONNX Runtime's ConvInteger accepts only a scalar weight zero point;
symmetric weights have zero point 0 in every channel, so one scalar 0 serves and the per-channel
scales live in the float Mul after the integer convolution. ConvInteger pads ``x_q`` with ``z_x``,
the code of 0.0, so padding stays exact. ONNX Runtime runs ConvInteger as is (no fused kernel), and
its generic CPU kernel is several times slower than its float Conv: the pass says so in a note, and
``exclude=Conv`` keeps Convs float. ConvTranspose has no integer form here and stays float.

One DynamicQuantizeLinear serves every MatMul, Gemm and Conv reading the same ``x``.

Weight-only (MatMul with a 2-D constant ``[K, N]`` weight, or Gemm with transA=0, alpha=beta=1 and a
``[N]`` bias, which becomes MatMulNBits' bias input) -> ``com.microsoft.MatMulNBits``: for each
output column ``n`` and block ``b`` of ``block_size`` rows along K (K zero-padded to a whole block),
``s = max|w| / (2^(bits-1) - 1)``, ``q = clip(round(w / s), -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1)``
stored unsigned (two 4-bit values per byte, low nibble first); the kernel's default zero point
``2^(bits-1)`` undoes the offset, so ``w' = (q - 2^(bits-1)) * s``. ``accuracy_level`` (default 4) is
the kernel's lowest allowed compute precision: 4 lets ONNX Runtime quantize each block of the input to
int8 on the fly and multiply in integers (all-MiniLM-L6-v2, 8-bit, one thread: 0.81x fp32 against 2.1x
with level 0, which dequantizes every weight to float per run); 0 leaves the kernel's default.

With calibration data and ``gptq=true``, weight-only rounding is error-compensating (GPTQ, see
`gptq`) with the same blockwise scales.

Weights are read, quantized and released one at a time: a weight memory-mapped from external data is
unmapped once quantized (`onnxopt.io.release_mapping`), so resident memory holds one float weight at a time, not
every page read so far. int8 weights are quantized in blocks of rows that stay in cache (`_int8_symmetric`:
the same numbers as ``calib.weight_scales`` and ``calib.quantize_array``, without full-size temporaries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import (
    all_names,
    is_constant,
    is_onnx_op,
    name_stem,
    new_initializer,
    require_finite,
    take_over_output,
    unique_name,
)
from onnxopt.io import release_mapping
from onnxopt.progress import progress
from onnxopt.registry import PassStats, matches_any

from .gptq import gptq_round
from .layout import gemm_declined, weight_kn

__all__ = ["apply_dynamic", "apply_weight_only", "pack_nbits"]

logger = logging.getLogger(__name__)

_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16
_TYPE_NAMES = {_FLOAT: "float32", _HALF: "float16"}
_WEIGHT_ONLY_TYPES = frozenset({_FLOAT, _HALF})
"""MatMulNBits computes in its input's type: float32 or float16 models keep their type."""
_MS = "com.microsoft"
# Bytes of float weight quantized per step of `_int8_symmetric`: small enough to stay in cache.
_BLOCK_BYTES = 256 * 1024


def _new_node(graph: ir.Graph, op: str, inputs: list[ir.Value | None], base: str, taken: set[str], *,
              attrs: list[ir.Attr] | None = None, domain: str = "", outputs: int = 1) -> ir.Node:
    base = name_stem(base)
    node = ir.Node(domain, op, inputs, attrs or [], num_outputs=outputs, name=unique_name(graph, f"{base}_{op}", taken))
    for i, out in enumerate(node.outputs):
        out.name = unique_name(graph, f"{base}_{op}_out{i}" if outputs > 1 else f"{base}_{op}_out", taken)
    return node


def _matmul_weight(node: ir.Node,
                   dtypes: frozenset[ir.DataType] = frozenset({_FLOAT})) -> tuple[np.ndarray, bool] | str:
    """The node's weight as [K, N] float32 (and whether it was transposed), or why it is declined; `dtypes` are
    the weight types taken."""
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_constant(w_value):
        return "weight is not a constant initializer"
    if w_value.dtype not in dtypes or w_value.shape is None or len(w_value.shape) != 2:
        return f"weight is not a 2-D {' or '.join(sorted(_TYPE_NAMES[d] for d in dtypes))} constant"
    if node.op_type == "Gemm" and (reason := gemm_declined(node)):
        return reason
    w = require_finite(np.asarray(w_value.const_value.numpy(), dtype=np.float32), f"weight '{w_value.name}'")
    kn = weight_kn(node, w)
    return np.ascontiguousarray(kn), kn is not w


def _candidates(graph: ir.Graph, ops: set[str], exclude: list[str], stats: PassStats,
                dtypes: frozenset[ir.DataType] = frozenset({_FLOAT})) -> list[ir.Node]:
    """The nodes of `ops` whose first input is an activation of one of `dtypes` (the others skipped, saying why)."""
    nodes = []
    for node in graph:
        if not is_onnx_op(node, *ops):
            if is_onnx_op(node, "Conv", "ConvTranspose"):
                stats.skip(node, _float_conv_reason(node.op_type, ops))
            continue
        if matches_any(node, exclude):
            stats.skip(node, "excluded by the exclude option")
            continue
        x = node.inputs[0]
        if x is None or is_constant(x):
            stats.skip(node, "first input is not an activation")
            continue
        if x.dtype not in dtypes:
            kind = _TYPE_NAMES.get(x.dtype, str(x.dtype))
            stats.skip(node, f"first input is {kind}, not {' or '.join(sorted(_TYPE_NAMES[d] for d in dtypes))}"
                       + (" (float16 models are computed in float32 for this mode when the model is small enough "
                          "to keep a copy; weight-only takes float16 as is)" if x.dtype == _HALF else ""))
            continue
        nodes.append(node)
    return nodes


def _float_conv_reason(op: str, ops: set[str]) -> str:
    if op == "ConvTranspose" and "Conv" in ops:
        return "ConvTranspose has no integer form with a float output (no ConvTransposeInteger); use mode=static"
    return f"this mode quantizes {'/'.join(sorted(ops))} only; {op} stays float (use mode=static)"


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.name in graph.initializers:
        del graph.initializers[value.name]


# ------------------------------------------------------------------------------ dynamic
def apply_dynamic(graph: ir.Graph, stats: PassStats, *, exclude: Iterable[str], per_channel: bool,
                  conv: bool = False) -> dict[str, int]:
    taken = all_names(graph)
    dql: dict[str, ir.Node] = {}
    done: dict[str, int] = {}
    nodes = _candidates(graph, {"MatMul", "Gemm", "Conv"}, list(exclude), stats)
    if not conv:
        for node in (n for n in nodes if n.op_type == "Conv"):
            stats.skip(node, "dynamic Conv is off: ONNX Runtime's ConvInteger runs several times slower than a float "
                       "Conv (dynamic_conv=true quantizes it for size)")
        nodes = [n for n in nodes if n.op_type != "Conv"]
    for node in progress(nodes, desc="quantizing (dynamic)"):
        try_ = _try_dynamic_conv if node.op_type == "Conv" else _try_dynamic
        reason = try_(graph, node, dql, taken, per_channel)
        if reason:
            stats.skip(node, reason)
            continue
        done[node.op_type] = done.get(node.op_type, 0) + 1
        stats.layers.append({"node": node.name or node.op_type, "op": node.op_type, "per_channel": per_channel})
    stats.summary.update({"mode": "dynamic", "per_channel": per_channel})
    if done.get("Conv"):
        stats.notes.append(f"{done['Conv']} Conv became ConvInteger, which ONNX Runtime's CPU kernel runs several "
                           "times slower than a float Conv: exclude=Conv keeps them float when speed matters")
    return {"quantized_nodes": sum(done.values()), "quantized_convs": done.get("Conv", 0),
            "dynamic_quantize_inputs": len(dql)}


def _dynamic_input(graph: ir.Graph, node: ir.Node, dql: dict[str, ir.Node], taken: set[str]) -> ir.Node:
    """The DynamicQuantizeLinear of `node`'s first input: made before `node`, or the one already made."""
    x = node.inputs[0]
    if x.name not in dql:
        q = _new_node(graph, "DynamicQuantizeLinear", [x], x.name, taken, outputs=3)
        q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
        q.outputs[0].shape = x.shape
        q.outputs[1].type, q.outputs[1].shape = ir.TensorType(_FLOAT), ir.Shape([])
        q.outputs[2].type, q.outputs[2].shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([])
        graph.insert_before(node, q)
        dql[x.name] = q
    return dql[x.name]


def _rescale(graph: ir.Graph, node: ir.Node, integer: ir.Node, q: ir.Node, w_scale: ir.Value,
             bias: ir.Value | None, base: str, taken: set[str]) -> None:
    """``Cast(integer, float) * (s_x * w_scale) [+ bias]`` in place of `node` (under its output's name)."""
    cast = _new_node(graph, "Cast", [integer.outputs[0]], base, taken, attrs=[ir.AttrInt64("to", _FLOAT.value)])
    scale = _new_node(graph, "Mul", [q.outputs[1], w_scale], f"{base}_scale", taken)
    out = _new_node(graph, "Mul", [cast.outputs[0], scale.outputs[0]], base, taken)
    new_nodes = [integer, cast, scale, out]
    last = out
    if bias is not None:
        last = _new_node(graph, "Add", [out.outputs[0], bias], f"{base}_bias", taken)
        new_nodes.append(last)
    graph.insert_before(node, new_nodes)
    take_over_output(graph, node, last.outputs[0])


def _try_dynamic(
    graph: ir.Graph, node: ir.Node, dql: dict[str, ir.Node], taken: set[str], per_channel: bool
) -> str | None:
    got = _matmul_weight(node)
    if isinstance(got, str):
        return got
    w_value = node.inputs[1]
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None and not is_constant(bias):
        del got
        release_mapping(w_value.const_value)
        return "Gemm bias is not constant"
    base = node.name or w_value.name
    w_q, s_w = _int8_symmetric(got[0], 1 if per_channel else None)
    del got
    release_mapping(w_value.const_value)
    q = _dynamic_input(graph, node, dql, taken)
    stem = name_stem(w_value.name)
    wq_value = new_initializer(graph, f"{stem}_quantized", w_q, origin=w_value.name, taken=taken)
    wz_value = new_initializer(graph, f"{stem}_zero_point", np.zeros(s_w.shape, np.int8), taken=taken)
    ws_value = new_initializer(graph, f"{stem}_scale", s_w, taken=taken)
    mmi = _new_node(graph, "MatMulInteger", [q.outputs[0], wq_value, q.outputs[2], wz_value], base, taken)
    _rescale(graph, node, mmi, q, ws_value, bias, base, taken)
    _drop_if_unused(graph, w_value)
    return None


def _int8_symmetric(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(round(w / s) as int8, s)`` with ``s = max|w| / 127`` per slice along `axis` (0: the first axis,
    1: the columns of a 2-D weight, None: one scale), as ``calib.weight_scales`` and
    ``calib.quantize_array`` compute them, in blocks of rows (no full-size float temporary)."""
    if axis not in (None, 0, 1) or (axis == 1 and w.ndim != 2):
        raise ValueError(f"axis {axis} of a rank-{w.ndim} weight")
    rows = w.reshape(w.shape[0], int(np.prod(w.shape[1:]))) if w.ndim >= 2 else w.reshape(1, -1)
    by_row = axis == 0
    step = max(1, _BLOCK_BYTES // max(1, rows.shape[1] * 4))
    hi = np.full(rows.shape[0] if by_row else rows.shape[1], -np.inf, np.float32)
    lo = np.full_like(hi, np.inf)
    for i in range(0, rows.shape[0], step):
        block = rows[i:i + step]
        if by_row:
            hi[i:i + step], lo[i:i + step] = block.max(axis=1), block.min(axis=1)
        elif block.size:
            np.maximum(hi, block.max(axis=0), out=hi)
            np.minimum(lo, block.min(axis=0), out=lo)
    absmax = np.maximum(hi, -lo) if hi.size else np.zeros(0, np.float32)
    if axis is None:
        absmax = np.asarray(absmax.max() if absmax.size else 0.0, dtype=np.float32)
    scales = (absmax / np.float32(127)).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    divisor = scales.reshape(-1, 1) if by_row else scales
    q = np.empty(rows.shape, np.int8)
    buf = np.empty((min(step, rows.shape[0]), rows.shape[1]), np.float32)
    for i in range(0, rows.shape[0], step):
        block = rows[i:i + step]
        b = buf[:block.shape[0]]
        np.divide(block, divisor[i:i + step] if by_row else divisor, out=b)
        np.rint(b, out=b)
        np.clip(b, -128, 127, out=b)
        q[i:i + step] = b
    return q.reshape(w.shape), scales


def _conv_weight(node: ir.Node) -> tuple[np.ndarray, ir.Value | None] | str:
    """The Conv's float32 weight ``[M, C/g, k...]`` and its bias value (None without one), or why not."""
    w_value = node.inputs[1] if len(node.inputs) > 1 else None
    if not is_constant(w_value):
        return "weight is not a constant initializer"
    if w_value.dtype != _FLOAT or w_value.shape is None or not 3 <= len(w_value.shape) <= 5:
        return "weight is not a float32 constant of rank 3 to 5 (1-D to 3-D Conv)"
    if any(a.is_ref() for a in node.attributes.values()):
        return "Conv attribute refers to a function attribute"
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    m = w_value.shape[0]
    if bias is not None and (not is_constant(bias) or bias.dtype != _FLOAT or bias.shape is None
                             or list(bias.shape) != [m]):
        return f"Conv bias is not a float32 constant of shape [{m}]"
    return require_finite(np.asarray(w_value.const_value.numpy(), dtype=np.float32), f"weight '{w_value.name}'"), bias


def _try_dynamic_conv(
    graph: ir.Graph, node: ir.Node, dql: dict[str, ir.Node], taken: set[str], per_channel: bool
) -> str | None:
    got = _conv_weight(node)
    if isinstance(got, str):
        return got
    w, bias = got
    x = node.inputs[0]
    if x.shape is not None and len(x.shape) != w.ndim:
        return f"input rank {len(x.shape)} does not match the weight rank {w.ndim}"
    w_value = node.inputs[1]
    base = node.name or w_value.name
    channel_shape = (1, w.shape[0]) + (1,) * (w.ndim - 2)  # broadcasts over [N, M, spatial...]
    w_q, s_w = _int8_symmetric(w, 0 if per_channel else None)
    del w, got
    release_mapping(w_value.const_value)
    q = _dynamic_input(graph, node, dql, taken)
    stem = name_stem(w_value.name)
    wq_value = new_initializer(graph, f"{stem}_quantized", w_q, origin=w_value.name, taken=taken)
    wz_value = new_initializer(graph, f"{stem}_zero_point", np.zeros((), np.int8), taken=taken)
    ws_value = new_initializer(graph, f"{stem}_scale", s_w.reshape(channel_shape) if per_channel else s_w,
                               taken=taken)
    attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
    conv = _new_node(graph, "ConvInteger", [q.outputs[0], wq_value, q.outputs[2], wz_value], base, taken,
                     attrs=attrs)
    conv.outputs[0].type, conv.outputs[0].shape = ir.TensorType(ir.DataType.INT32), node.outputs[0].shape
    b_value = None
    if bias is not None:
        b = np.asarray(bias.const_value.numpy(), dtype=np.float32).reshape(channel_shape)
        b_value = new_initializer(graph, f"{name_stem(bias.name)}_channels", b, origin=bias.name, taken=taken)
    _rescale(graph, node, conv, q, ws_value, b_value, base, taken)
    _drop_if_unused(graph, w_value)
    if bias is not None:
        _drop_if_unused(graph, bias)
    return None


# ------------------------------------------------------------------------------ weight-only
def pack_nbits(w: np.ndarray, bits: int, block_size: int,
               hessian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits data of a [K, N] weight: packed uint8 [N, blocks, block_size*bits/8], scales [N, blocks].

    With the input's ``XᵀX`` (`hessian`, [K, K]) the values are rounded GPTQ-style (same scales).
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    wt = np.zeros((n, blocks * block_size), dtype=np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, blocks, block_size)
    half = 2 ** (bits - 1)
    scales = (np.abs(wt).max(axis=2) / np.float32(half - 1)).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)
    if hessian is not None:
        padded = np.zeros((blocks * block_size, blocks * block_size), dtype=np.float64)
        padded[:k, :k] = hessian
        full_scales = np.repeat(scales, block_size, axis=1)
        signed = gptq_round(wt.reshape(n, -1), padded, full_scales, qmax=half - 1, qmin=-half)
        q = (signed.astype(np.int16) + half).astype(np.uint8).reshape(n, blocks, block_size)
    else:
        q = (np.clip(np.rint(wt / scales[:, :, None]), -half, half - 1) + half).astype(np.uint8)
    if bits == 4:
        q = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scales


def apply_weight_only(model: ir.Model, stats: PassStats, *, exclude: Iterable[str], bits: int,
                      block_size: int, hessians: dict[str, np.ndarray] | None = None,
                      accuracy_level: int = 4) -> dict[str, int]:
    graph = model.graph
    taken = all_names(graph)
    done = 0
    nodes = _candidates(graph, {"MatMul", "Gemm"}, list(exclude), stats, _WEIGHT_ONLY_TYPES)
    for node in progress(nodes, desc=f"quantizing (int{bits} weights)"):
        reason = _try_weight_only(graph, node, bits, block_size, taken, hessians or {}, accuracy_level)
        if reason:
            stats.skip(node, reason)
            continue
        done += 1
        stats.layers.append({"node": node.name or node.op_type, "op": node.op_type, "bits": bits,
                             "block_size": block_size})
    if done:
        model.opset_imports.setdefault(_MS, 1)
    return {"quantized_nodes": done}


def _try_weight_only(graph: ir.Graph, node: ir.Node, bits: int, block_size: int, taken: set[str],
                     hessians: dict[str, np.ndarray], accuracy_level: int) -> str | None:
    x = node.inputs[0]
    got = _matmul_weight(node, frozenset({x.dtype}))
    if isinstance(got, str):
        return got
    w, _ = got
    k, n = w.shape
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is not None and (not is_constant(bias) or bias.dtype != x.dtype or bias.shape is None
                             or list(bias.shape) != [n]):
        return f"Gemm bias is not a {_TYPE_NAMES[x.dtype]} constant of shape [{n}]"
    if node.op_type == "Gemm" and (x.shape is None or len(x.shape) != 2):
        return "Gemm input is not 2-D"
    h = hessians.get(x.name)
    packed, scales = pack_nbits(w, bits, block_size, h if h is not None and h.shape == (k, k) else None)
    del w, got
    w_value = node.inputs[1]
    release_mapping(w_value.const_value)
    stem = name_stem(w_value.name)
    b_value = new_initializer(graph, f"{stem}_quantized", packed, origin=w_value.name, taken=taken)
    # the scales are of the input's type (float16 scales of a float16 model)
    s_value = new_initializer(graph, f"{stem}_scale", scales.reshape(-1).astype(x.dtype.numpy()), taken=taken)
    attrs = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
             ir.AttrInt64("block_size", block_size)]
    if accuracy_level:
        attrs.append(ir.AttrInt64("accuracy_level", accuracy_level))
    inputs = [x, b_value, s_value] + ([None, None, bias] if bias is not None else [])
    mm = _new_node(graph, "MatMulNBits", inputs, node.name or w_value.name, taken, attrs=attrs, domain=_MS)
    graph.insert_before(node, mm)
    take_over_output(graph, node, mm.outputs[0])
    _drop_if_unused(graph, w_value)
    return None
