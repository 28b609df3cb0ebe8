"""Graph knowledge shared by passes and reports: parameter and MAC counting, shapes."""

from onnxopt.analysis.channel_groups import ChannelGraph, build_channel_graph
from onnxopt.analysis.stats import ModelStats, infer_shapes, macs_by_node, model_stats

__all__ = ["ChannelGraph", "build_channel_graph", "ModelStats", "infer_shapes", "macs_by_node", "model_stats"]
