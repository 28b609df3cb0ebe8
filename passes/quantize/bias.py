"""Bias correction for the quantize pass (``bias_correction=true``, static mode).

Rounding a layer's weights, ``W' = W + ε``, shifts the mean of its output: ``E[W'x] - E[Wx] = ε E[x]``,
which is not zero per channel. With ``μ`` the mean of the layer's input per input channel, measured
on the calibration feeds (streamed, running sums), the shift per output channel ``c`` is

- Conv (group ``g``): ``δ_c = Σ_{j,k} (W - W')[c, j, k] · μ[g(c)·C_in/g + j]`` (padding ignored);
- Gemm: ``δ = (W - W') μ`` over K (``W`` as ``[N, K]``),

and ``δ_c`` is added to the int32 bias: ``b_q' = round(b_q + δ_c / (s_x · s_w,c))``. Only the weight
rounding is corrected (as in Nagel et al., data-free quantization), so layers do not double-count the
error their inputs carry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.layers import conv_geometry
from onnxopt.graph import set_weight
from onnxopt.registry import PassStats

from .layout import gemm_declined, weight_nk

__all__ = ["bias_targets", "input_means", "weight_shift", "apply_shift", "dequantized"]

logger = logging.getLogger(__name__)

_AXIS = {"Conv": 1, "Gemm": -1}


def _dq(value: ir.Value | None) -> ir.Node | None:
    prod = value.producer() if value is not None else None
    return prod if prod is not None and prod.op_type == "DequantizeLinear" else None


def bias_targets(nodes: list[ir.Node]) -> list[ir.Node]:
    """The quantized Conv/Gemm nodes with an int32 bias and a dequantized weight."""
    out = []
    for node in nodes:
        if node.op_type not in _AXIS or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        if _dq(node.inputs[1]) is None or _dq(node.inputs[2]) is None:
            continue
        if node.op_type == "Gemm" and gemm_declined(node):
            continue
        out.append(node)
    return out


def input_means(stream: Iterator[dict[str, np.ndarray]], names: dict[str, str]) -> dict[str, np.ndarray]:
    """Per-channel mean of each input tensor (name -> op type decides the channel axis), streamed."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for result in stream:
        for name, op in names.items():
            x = np.asarray(result[name], dtype=np.float64)
            x = np.moveaxis(x, _AXIS[op], -1)
            flat = x.reshape(-1, x.shape[-1])
            sums[name] = sums.get(name, 0.0) + flat.sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
    return {k: sums[k] / max(counts[k], 1) for k in sums}


def dequantized(dq: ir.Node) -> np.ndarray:
    """The float value of a DequantizeLinear of a constant (per tensor or per axis), in float64."""
    q = np.asarray(dq.inputs[0].const_value.numpy()).astype(np.float64)
    s = np.asarray(dq.inputs[1].const_value.numpy(), dtype=np.float64)
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    z = np.asarray(zp_value.const_value.numpy(), dtype=np.float64) if zp_value is not None else np.zeros_like(s)
    if s.ndim == 1 and q.ndim > 1:
        axis = dq.attributes.get_int("axis", 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (q - z) * s


def weight_shift(node: ir.Node, w_float: np.ndarray, mu: np.ndarray) -> np.ndarray | None:
    """``(W - W') μ`` per output channel, or None when shapes do not line up."""
    eps = np.asarray(w_float, dtype=np.float64) - dequantized(_dq(node.inputs[1]))
    if node.op_type == "Gemm":
        w_nk = weight_nk(node, eps)
        return w_nk @ mu if w_nk.shape[1] == mu.shape[0] else None
    group = conv_geometry(node, eps.shape).groups
    cout, cin_g = eps.shape[0], eps.shape[1]
    if cin_g * group != mu.shape[0] or cout % group:
        return None
    e = eps.reshape(group, cout // group, cin_g, -1).sum(axis=3)
    return np.einsum("goj,gj->go", e, mu.reshape(group, cin_g)).reshape(cout)


def apply_shift(node: ir.Node, delta: np.ndarray, stats: PassStats) -> bool:
    """Add `delta` to the int32 bias of `node` (rescaled by the bias scale); False when it cannot."""
    dq = _dq(node.inputs[2])
    q_value, s_value = dq.inputs[0], dq.inputs[1]
    q = np.asarray(q_value.const_value.numpy()).astype(np.int64)
    scale = np.broadcast_to(np.asarray(s_value.const_value.numpy(), dtype=np.float64), q.shape)
    if delta.shape != q.shape or len(q_value.uses()) != 1:
        stats.skip(node, "bias correction: bias shape differs or the bias is shared")
        return False
    new = np.clip(q + np.rint(delta / scale), -(2**31), 2**31 - 1).astype(np.int32)
    set_weight(q_value, new)
    return True
