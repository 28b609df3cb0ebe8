"""Least-squares reconstruction of a consumer after its input channels were cut (channels.reconstruct).

For a consumer ``Y = X W + b`` whose input lost channels, the pruned model's input ``X'`` (rows:
samples, or sampled output positions of a Conv with ``X'`` unfolded into patches) and the outputs
``Y`` of the model before the cut give the ridge solution

    [W'; b'] = (AᵀA + λI)⁻¹ AᵀY,   A = [X' 1],   λ = 1e-4 · trace(AᵀA) / dim

accumulated over the calibration feeds (only AᵀA and AᵀY are kept, never the activations).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups import ChannelGraph, Consumer
from onnxopt.context import Context
from onnxopt.graph import constant_array
from onnxopt.runtime import TapSession

__all__ = ["refit_consumer"]

logger = logging.getLogger(__name__)

_MAX_FEATURES = 4096
_ROWS_PER_FEED = 4096


def refit_consumer(model: ir.Model, c: Consumer, teacher: TapSession, cg: ChannelGraph,
                   masks: dict[int, np.ndarray], ctx: Context, comp: np.ndarray | None) -> str | None:
    """Refit `c.node`'s weight and bias; return the reason when it declines."""
    node = c.node
    reason = _check(node, c)
    if reason:
        return reason
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    if not x_name or not y_name:
        return "input or output has no name"
    out_space = cg.space_of(node.outputs[0])
    out_mask = masks[out_space.index] if out_space is not None else None
    ata = aty = None
    rng = np.random.default_rng(0)
    targets = (teacher.run(feed, [y_name]) for feed in ctx.calib.feeds)
    for t, s in zip(targets, ctx.activations(model, [x_name], desc="channels: reconstruct")):
        rows, target = _rows(node, c, np.asarray(s[x_name], np.float64), np.asarray(t[y_name], np.float64), rng)
        if out_mask is not None:
            target = target[:, out_mask]
        a = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
        ata = a.T @ a if ata is None else ata + a.T @ a
        aty = a.T @ target if aty is None else aty + a.T @ target
    if ata is None:
        return "no calibration feeds"
    lam = 1e-4 * float(np.trace(ata)) / ata.shape[0] + 1e-8
    theta = np.linalg.solve(ata + lam * np.eye(ata.shape[0]), aty)
    _write(model.graph, node, c, theta[:-1], theta[-1], comp)
    return None


def _check(node: ir.Node, c: Consumer) -> str | None:
    if c.kind not in ("conv", "gemm", "matmul"):
        return f"{c.kind} consumers are not refitted"
    w = constant_array(node.inputs[1])
    if w is None:
        return "weight is not constant"
    if c.kind == "conv":
        if w.ndim != 4 or node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return "only 2-D convolutions with explicit pads are refitted"
        features = w.shape[1] * w.shape[2] * w.shape[3]
    else:
        features = w.shape[c.axis]
    if features + 1 > _MAX_FEATURES:
        return f"{features} input features is too many to refit"
    return None


def _rows(node: ir.Node, c: Consumer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    if c.kind == "conv":
        w = constant_array(node.inputs[1])
        rows = _patches(node, x, w.shape[2], w.shape[3])
        target = y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])
        target = y.reshape(-1, y.shape[-1])
    if rows.shape[0] > _ROWS_PER_FEED:
        pick = rng.choice(rows.shape[0], _ROWS_PER_FEED, replace=False)
        rows, target = rows[pick], target[pick]
    return rows, target


def _patches(node: ir.Node, x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Unfold NCHW `x` into rows of (C, kh, kw) patches, one per output position."""
    pads = node.attributes.get_ints("pads", [0, 0, 0, 0])
    sh, sw = node.attributes.get_ints("strides", [1, 1])
    dh, dw = node.attributes.get_ints("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((x.shape[0], x.shape[1], kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(-1, x.shape[1] * kh * kw)


def _write(graph: ir.Graph, node: ir.Node, c: Consumer, weight: np.ndarray, intercept: np.ndarray,
           comp: np.ndarray | None) -> None:
    from onnxopt.passes.channels import _replace_param, add_to_bias

    old = constant_array(node.inputs[1])
    dtype = old.dtype
    if c.kind == "conv":
        new_w = weight.T.reshape(old.shape)
    elif c.kind == "gemm":
        new_w = weight.T if node.attributes.get_int("transB", 0) else weight
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    else:
        new_w = weight
    _replace_param(graph, node, 1, new_w.astype(dtype))
    if c.kind == "matmul":
        add_to_bias(graph, node, (intercept - (comp if comp is not None else 0.0)).astype(dtype))
        return
    if c.kind == "gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        # a Gemm's C may be one broadcast scalar: the refit bias has one entry per output
        old_c = constant_array(node.inputs[2])
        shape = old_c.shape if old_c.size == intercept.size else intercept.shape
        _replace_param(graph, node, 2, intercept.astype(dtype).reshape(shape))
    else:
        add_to_bias(graph, node, intercept.astype(dtype))
