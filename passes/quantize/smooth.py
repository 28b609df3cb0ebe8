"""SmoothQuant-style scale migration for the quantize pass (``smooth_alpha > 0``, static mode).

Case: ``LayerNormalization(x; γ, β) -> X`` where ``X`` is read only by MatMul/Gemm nodes with constant
2-D weights (``W`` as ``[K, N]``; Gemm with ``transB=1`` as its transpose). A few channels of ``X``
carry outliers that stretch its one activation scale; moving them into the weights, per channel ``j``

    s_j = max|X_j|^α / max_consumers max_n |W[j, n]|^(1-α)
    γ_j /= s_j,  β_j /= s_j,  W[j, :] *= s_j  (every consumer)

leaves the float output unchanged (``X' W' = X diag(1/s) diag(s) W``) while flattening ``X``'s
channel ranges (Xiao et al., 2022). ``max|X_j|`` is streamed over the calibration feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, only_used_by, set_weight
from onnxopt.registry import PassStats, matches_any

from .layout import gemm_declined, weight_kn

__all__ = ["smooth_targets", "channel_absmax", "apply_smoothing"]

logger = logging.getLogger(__name__)


def _weight_kn(node: ir.Node) -> np.ndarray | None:
    w = constant_array(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32 or not only_used_by(node.inputs[1], node):
        return None
    if node.op_type == "Gemm" and gemm_declined(node):
        return None
    return weight_kn(node, w)


def smooth_targets(graph: ir.Graph, exclude: list[str], stats: PassStats) -> list[tuple[ir.Node, list[ir.Node]]]:
    """(LayerNormalization, its MatMul/Gemm consumers) pairs that can migrate scales."""
    out = []
    for ln in graph:
        if ln.op_type != "LayerNormalization" or len(ln.inputs) < 3 or matches_any(ln, exclude):
            continue
        y = ln.outputs[0]
        gamma, beta = constant_array(ln.inputs[1]), constant_array(ln.inputs[2])
        if gamma is None or beta is None or gamma.ndim != 1 or y.is_graph_output():
            continue
        if not (only_used_by(ln.inputs[1], ln) and only_used_by(ln.inputs[2], ln)):
            continue
        users = [u.node for u in y.uses()]
        if not users or any(u.op_type not in ("MatMul", "Gemm") or matches_any(u, exclude) for u in users):
            stats.skip(ln, "smooth: its output is not read by MatMul/Gemm only")
            continue
        if any(u.inputs[0] is not y or _weight_kn(u) is None for u in users):
            stats.skip(ln, "smooth: a consumer's weight is not a 2-D constant used only there")
            continue
        out.append((ln, users))
    return out


def channel_absmax(stream: Iterator[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """Running per-channel (last axis) max |x| of each named tensor."""
    out: dict[str, np.ndarray] = {}
    for result in stream:
        for name in names:
            x = np.abs(np.asarray(result[name], dtype=np.float32))
            m = x.reshape(-1, x.shape[-1]).max(axis=0)
            out[name] = np.maximum(out[name], m) if name in out else m
    return out


def apply_smoothing(ln: ir.Node, users: list[ir.Node], x_max: np.ndarray, alpha: float) -> None:
    """Divide γ, β by s and multiply each consumer's weight rows by s (exact in float)."""
    w_max = np.zeros_like(x_max, dtype=np.float64)
    for node in users:
        w_max = np.maximum(w_max, np.abs(_weight_kn(node)).max(axis=1))
    s = np.power(np.maximum(x_max, 1e-8), alpha) / np.power(np.maximum(w_max, 1e-8), 1.0 - alpha)
    s = np.clip(s, 1e-4, 1e4)
    gamma, beta = constant_array(ln.inputs[1]), constant_array(ln.inputs[2])
    set_weight(ln.inputs[1], (gamma / s).astype(gamma.dtype))
    set_weight(ln.inputs[2], (beta / s).astype(beta.dtype))
    for node in users:
        w = constant_array(node.inputs[1])
        scaled = weight_kn(node, w) * s[:, None]  # rows of [K, N] are the input channels
        set_weight(node.inputs[1], weight_kn(node, scaled).astype(np.float32))
