"""The per-op rule table of the channel dependency graph.

A rule takes the graph and a node, records spaces, unions, producers, consumers, parameter slices
and fixups, and returns None when it handled the node, or the reason its tracked inputs (and
outputs) must be pinned. An op without a rule pins its tracked inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxopt.analysis.channel_groups.index_maps import (
    rule_concat,
    rule_flatten,
    rule_reshape,
    rule_shape,
    rule_slice,
    rule_split,
    rule_squeeze,
    rule_transpose,
)
from onnxopt.analysis.channel_groups.passthrough import (
    BINARY,
    REDUCE,
    SPATIAL,
    UNARY,
    rule_batchnorm,
    rule_binary,
    rule_instancenorm,
    rule_layernorm,
    rule_reduce,
    rule_softmax,
    rule_unary,
)
from onnxopt.analysis.channel_groups.weights import rule_conv, rule_conv_transpose, rule_gemm, rule_matmul

if TYPE_CHECKING:
    from onnxopt.analysis.channel_groups.graph import ChannelGraph

__all__ = ["RULES", "Rule"]

Rule = Callable[["ChannelGraph", ir.Node], "str | None"]

RULES: dict[str, Rule] = {
    "Conv": rule_conv,
    "ConvTranspose": rule_conv_transpose,
    "Gemm": rule_gemm,
    "MatMul": rule_matmul,
    "BatchNormalization": rule_batchnorm,
    "InstanceNormalization": rule_instancenorm,
    "LayerNormalization": rule_layernorm,
    "Softmax": rule_softmax,
    "Concat": rule_concat,
    "Split": rule_split,
    "Slice": rule_slice,
    "Transpose": rule_transpose,
    "Squeeze": rule_squeeze,
    "Unsqueeze": rule_squeeze,
    "Flatten": rule_flatten,
    "Reshape": rule_reshape,
    "Shape": rule_shape,
    "Clip": rule_unary,
    "Pad": rule_unary,
    **{op: rule_unary for op in UNARY},
    **{op: rule_unary for op in SPATIAL},
    **{op: rule_binary for op in BINARY},
    **{op: rule_reduce for op in REDUCE},
}
