"""Graph knowledge shared by passes and reports: parameter and MAC counting, shapes."""

from onnxopt.analysis.stats import ModelStats, infer_shapes, macs_by_node, model_stats

__all__ = ["ModelStats", "infer_shapes", "macs_by_node", "model_stats"]
