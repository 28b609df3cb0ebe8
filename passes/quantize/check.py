"""Does ONNX Runtime fuse a quantized model? Count the kernels in its optimized graph.

ONNX Runtime turns ``DequantizeLinear -> op -> QuantizeLinear`` groups into integer kernels while it
optimizes a session. Saving that optimized graph (``SessionOptions.optimized_model_filepath``) and
counting its op types tells how much of the model really runs in integer arithmetic: integer kernels,
float compute ops left (Conv/Gemm/MatMul that were not fused) and Q/DQ boundaries left.

The check's session is released before the optimized graph is read, and a quantized model holding more
than `FUSION_CHECK_LIMIT_BYTES` of weights is not checked (`fusion_check_skipped` says why): loading it
in ONNX Runtime once more, only to count kernels, would cost more time and memory than the count is worth.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt.analysis.layers import INTEGER_KERNELS
from onnxopt.io import iter_proto_graphs, temp_model_file, weight_bytes
from onnxopt.runtime import session

__all__ = ["FusionReport", "INTEGER_KERNELS", "FLOAT_COMPUTE", "FUSION_CHECK_LIMIT_BYTES", "fusion_report",
           "fusion_report_file", "fusion_check_skipped"]

logger = logging.getLogger(__name__)

FLOAT_COMPUTE = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv",
})
_BOUNDARIES = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# Weight bytes of a quantized model above which its fusion is not checked.
FUSION_CHECK_LIMIT_BYTES = 512 * 1024 * 1024


@dataclasses.dataclass
class FusionReport:
    """Op-type counts of ONNX Runtime's optimized graph, split into the parts that matter."""

    ops: dict[str, int]

    @property
    def integer_kernels(self) -> int:
        return sum(n for op, n in self.ops.items() if op in INTEGER_KERNELS)

    @property
    def float_compute(self) -> int:
        return sum(n for op, n in self.ops.items() if op in FLOAT_COMPUTE)

    @property
    def boundaries(self) -> int:
        return sum(n for op, n in self.ops.items() if op in _BOUNDARIES)

    @property
    def other_float(self) -> int:
        """Ops that are neither integer kernels, float compute, nor Q/DQ (pooling, Softmax, ...)."""
        return sum(self.ops.values()) - self.integer_kernels - self.float_compute - self.boundaries

    def to_dict(self) -> dict[str, Any]:
        return {
            "integer_kernels": self.integer_kernels,
            "float_compute_left": self.float_compute,
            "qdq_left": self.boundaries,
            "other_ops": self.other_float,
            "ops": dict(sorted(self.ops.items())),
        }


def fusion_report_file(path: str | os.PathLike[str], *, threads: int | None = 1) -> FusionReport:
    """Load the model file in ONNX Runtime, save its optimized graph, and count the ops in it."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-fused-", ignore_cleanup_errors=True) as tmpdir:
        out = Path(tmpdir) / "optimized.onnx"
        sess = session(path, threads=threads, optimized_model_path=str(out))
        del sess  # only the saved graph is needed: the session goes before the graph is read
        proto = onnx.load(str(out), load_external_data=False)
    counts = Counter(node.op_type for g in iter_proto_graphs(proto.graph) for node in g.node)
    return FusionReport(dict(counts))


def fusion_report(model: ir.Model, *, threads: int | None = 1) -> FusionReport:
    """`fusion_report_file` on an in-memory model (written to a temporary file for ONNX Runtime)."""
    with temp_model_file(model) as path:
        return fusion_report_file(path, threads=threads)


def fusion_check_skipped(model: ir.Model) -> str | None:
    """Why the fusion of `model` is not checked (too many weight bytes), or None when it is."""
    size = weight_bytes(model)
    if size <= FUSION_CHECK_LIMIT_BYTES:
        return None
    return (f"fusion not checked: the quantized model holds {size / 2**20:.0f} MiB of weights (above "
            f"{FUSION_CHECK_LIMIT_BYTES / 2**20:.0f} MiB), too much to load in ONNX Runtime once more only to "
            "count its integer kernels")
