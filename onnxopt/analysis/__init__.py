"""Graph knowledge shared by passes and reports: parameter and MAC counting, shapes, channel groups, the
linear-layer view (`layers`), the outputs that carry class scores (`outputs`) and least-squares fitting of
layers from data (`fitting`)."""

from onnxopt.analysis.channel_groups import ChannelGraph, build_channel_graph
from onnxopt.analysis.fitting import Moments, im2col, ridge_solve
from onnxopt.analysis.layers import ConvGeometry, Linear, Param, conv_geometry, linear_of, operand_axes
from onnxopt.analysis.outputs import class_outputs
from onnxopt.analysis.stats import ModelStats, infer_shapes, macs_by_node, model_stats

__all__ = [
    "ChannelGraph",
    "class_outputs",
    "build_channel_graph",
    "ModelStats",
    "infer_shapes",
    "macs_by_node",
    "model_stats",
    "ConvGeometry",
    "Linear",
    "Param",
    "conv_geometry",
    "linear_of",
    "operand_axes",
    "Moments",
    "im2col",
    "ridge_solve",
]
