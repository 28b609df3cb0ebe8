"""The collapse guard: tensors that 8 bits would destroy stay float, with the element-wise chain after them.

One signature explains the static-int8 collapses seen on real models: most of a tensor's non-zero values
are smaller than half a quantization step, because one huge value (or a squared dynamic range) sets the
scale, so they come back as 0 or a step away. Examples: a decomposed LayerNorm's
``Reciprocal(Sqrt(var + eps)) * gamma`` reaching 1e6 on zero-padded positions while real tokens are
about 1; attention logits after ``Add(mask)`` spanning ``[-3.4e38, 0]``; an STFT power spectrum (``re²``).

For each tensor about to be quantized, on values sampled from the calibration feeds (`calib`), with the
scale and zero point its calibrated range gives:

    destroyed = #{x != 0 : |x - DQ(Q(x))| > |x| / 2} / #{x != 0}

A tensor whose destroyed share exceeds `THRESHOLD` stays float, and so does the chain of element-wise
ops after it, up to the next op that is not element-wise (a Conv, a MatMul, a reduction...): those ops
read a value whose meaning the collapsed tensor carried (`float_chain`). Healthy tensors of the CNNs
measured lose at most about 40 % of their non-zero values this way (mostly tiny values next to zero);
the collapses above lose 60-96 %.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.graph import is_onnx_op

from .calib import ActType, Range, dequantize_array, qparams, quantize_array
from .regions import ELEMENTWISE

__all__ = ["THRESHOLD", "destroyed_share", "collapsed_tensors", "float_chain"]

logger = logging.getLogger(__name__)

THRESHOLD = 0.5


def destroyed_share(values: np.ndarray, rng: Range, act: ActType) -> float:
    """The share of non-zero `values` whose 8-bit round trip over `rng` is off by more than half of them."""
    x = np.asarray(values, dtype=np.float32)
    x = x[np.isfinite(x) & (x != 0)]
    if x.size == 0:
        return 0.0
    qp = qparams(rng, act)
    back = dequantize_array(quantize_array(x, qp.scale, qp.zero_point, qp.dtype), qp.scale, qp.zero_point)
    return float(np.mean(np.abs(x - back) > 0.5 * np.abs(x)))


def collapsed_tensors(names: Iterable[str], ranges: dict[str, Range], samples: dict[str, np.ndarray],
                      act: ActType, threshold: float = THRESHOLD) -> dict[str, float]:
    """Tensor name -> destroyed share, for the tensors among `names` above `threshold`."""
    out = {}
    for name in names:
        rng, values = ranges.get(name), samples.get(name)
        if rng is None or values is None:
            continue
        share = destroyed_share(values, rng, act)
        if share > threshold:
            out[name] = share
    return out


def float_chain(graph: ir.Graph, names: Iterable[str]) -> list[ir.Node]:
    """The nodes that read a tensor in `names` or the output of an element-wise op in the chain after one."""
    wanted = set(names)
    values = [v for node in graph for v in node.outputs if v.name in wanted]
    values += [v for v in graph.inputs if v.name in wanted]
    chain: list[ir.Node] = []
    seen: set[int] = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is not None and id(producer) not in seen and value.name in wanted:
            seen.add(id(producer))
            chain.append(producer)
        for use in value.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            chain.append(node)
            if is_onnx_op(node, *ELEMENTWISE):
                stack.extend(node.outputs)
    return chain
