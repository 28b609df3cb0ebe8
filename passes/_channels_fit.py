"""Least-squares reconstruction of a consumer after its input channels were cut (channels.reconstruct).

For a consumer ``Y = X W + b`` whose input lost channels, the pruned model's input ``X'`` (rows:
samples, or sampled output positions of a Conv with ``X'`` unfolded into patches, any number of
spatial axes, ``auto_pad`` resolved) and the outputs ``Y`` of the model before the cut give the
ridge solution

    [W'; b'] = (AᵀA + λI)⁻¹ AᵀY,   A = [X' 1],   λ = 1e-4 · trace(AᵀA) / dim + 1e-8

accumulated over the calibration feeds (only AᵀA and AᵀY are kept, never the activations). The
layer view (`onnxopt.analysis.layers`) reads the consumer's features and targets and writes the
new weight and bias back under their names (a MatMul's bias lives in the Add after it).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups import ChannelGraph, Consumer
from onnxopt.analysis.fitting import Moments
from onnxopt.analysis.layers import Linear, linear_of
from onnxopt.context import Context
from onnxopt.runtime import TapSession

__all__ = ["refit_consumer"]

logger = logging.getLogger(__name__)

_MAX_FEATURES = 4096
_ROWS_PER_FEED = 4096


def refit_consumer(model: ir.Model, c: Consumer, teacher: TapSession, cg: ChannelGraph,
                   masks: dict[int, np.ndarray], ctx: Context, comp: np.ndarray | None) -> str | None:
    """Refit `c.node`'s weight and bias; return the reason when it declines."""
    layer, reason = _refittable(c)
    if layer is None:
        return reason
    node = c.node
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    if not x_name or not y_name:
        return "input or output has no name"
    out_space = cg.space_of(node.outputs[0])
    out_mask = masks[out_space.index] if out_space is not None else None
    moments = None
    rng = np.random.default_rng(0)
    targets = (teacher.run(feed, [y_name]) for feed in ctx.calib.feeds)
    for t, s in zip(targets, ctx.activations(model, [x_name], desc="channels: reconstruct")):
        rows, target = _rows(layer, np.asarray(s[x_name], np.float64), np.asarray(t[y_name], np.float64), rng)
        if out_mask is not None:
            target = target[:, out_mask]
        if moments is None:
            moments = Moments(rows.shape[1], target.shape[1], intercept=True)
        moments.add(rows, target)
    if moments is None:
        return "no calibration feeds"
    lam = 1e-4 * float(np.trace(moments.G[0])) / moments.dim + 1e-8
    theta = moments.solve(lam)
    return _write(model.graph, layer, theta[:-1].T, theta[-1], comp)


def _refittable(c: Consumer) -> tuple[Linear | None, str | None]:
    if c.kind not in ("conv", "gemm", "matmul"):
        return None, f"{c.kind} consumers are not refitted"
    layer, reason = linear_of(c.node)
    if layer is None:
        return None, reason or "not a linear layer"
    features = layer.in_features * layer.groups
    if features + 1 > _MAX_FEATURES:
        return None, f"{features} input features is too many to refit"
    reason = layer.write_blocker(weights=True, bias=True, copy_shared=True)
    if reason:
        return None, reason
    return layer, None


def _rows(layer: Linear, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Features and targets of one feed, at most `_ROWS_PER_FEED` rows sampled from them."""
    rows, target = layer.features(x), layer.target(y)
    if rows.shape[0] > _ROWS_PER_FEED:
        pick = rng.choice(rows.shape[0], _ROWS_PER_FEED, replace=False)
        rows, target = rows[pick], target[pick]
    return rows, target


def _write(graph: ir.Graph, layer: Linear, weights: np.ndarray, intercept: np.ndarray,
           comp: np.ndarray | None) -> str | None:
    """Store the refit. The MatMul target is its output before the bias Add, whose constant already
    holds the compensation `comp`: the Add gets ``intercept - comp`` on top."""
    dtype = np.dtype(layer.weight.value.const_value.dtype.numpy())
    if layer.op == "MatMul":
        delta = (intercept - (comp if comp is not None else 0.0)).astype(dtype)
        bias = layer.bias_values() + delta
    else:
        bias = intercept.astype(dtype)
    return layer.write(graph, weights=weights, bias=bias, copy_shared=True)
