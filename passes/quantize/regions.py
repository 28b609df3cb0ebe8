"""Range-sensitive regions that static int8 keeps in float: normalizations, softmax, GELU, attention scores.

Quantizing the inside of these computations breaks models, whatever the calibration: a LayerNorm's
``1 / sqrt(var + eps)`` spans 1 on real tokens and ``1 / sqrt(eps)`` on padding; attention logits next
to a ``-3.4e38`` mask; a softmax denominator; ``x * Φ(x)`` in GELU. ONNX Runtime itself runs
LayerNormalization, Softmax and Erf in float. Exporters write them as element-wise ops, so they are
found by structure, not by name (`sensitive_regions`):

- **reduction blocks** (normalizations and softmax written out): from every ``Reduce*`` node, the
  element-wise ops (``Add Sub Mul Div Pow Sqrt Reciprocal Exp Erf Tanh Neg Abs``) reached forward from
  its output whose other activation inputs are the block's own values or the reduction's input ``x``
  (``Sub(x, mean)``, ``Mul(x, s)``, ``Div(exp, sum)``), and, backward, the single-use element-wise ops
  feeding it (``Pow(d, 2)`` or ``Mul(x, x)`` before a variance). A residual ``Add`` after the block
  reads a value from elsewhere and stays out. This covers LayerNorm as tf2onnx writes it
  (``ReduceMean, Sub, Mul(d, d), ReduceMean, Add(eps), Sqrt, Reciprocal, Mul(gamma), Mul(x, s),
  Mul(mean, s), Sub(beta, .), Add``, or ``ReduceSum * (1/D)``), as Paddle writes it (``ReduceMean, Sub,
  Pow, ReduceMean, Add, Sqrt, Div, Mul, Add``) and decomposed softmax (``ReduceMax, Sub, Exp,
  ReduceSum, Div``);
- **activation blocks** seeded by ``Erf`` or ``Tanh`` (GELU, exact or tanh form): the single-use
  element-wise chain into the seed, then forward as above (``Add(1)``, ``Mul(x, .)``, ``Mul(0.5)``);
- **attention**: a MatMul of two activations whose output reaches a ``Softmax`` through element-wise
  ops, ``Where`` or reshapes (scale, mask Add), with those ops; and a MatMul of two activations that
  reads a ``Softmax`` output (``P @ V``).

Every node of a region stays float (its tensors keep their float form unless a quantized neighbour
outside the region needs them). Blocks are capped at `MAX_BLOCK` nodes.
"""

from __future__ import annotations

import dataclasses
from collections import deque

import onnx_ir as ir

from onnxopt.graph import is_constant, is_onnx_op

__all__ = ["Region", "sensitive_regions", "ELEMENTWISE"]

ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Erf", "Tanh", "Neg", "Abs")
_REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare",
               "ReduceLogSumExp")
_SEEDS = ("Erf", "Tanh")
_PATH = ELEMENTWISE + ("Where", "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze")
_SOFTMAX = ("Softmax", "LogSoftmax")
MAX_BLOCK = 24
_MAX_PATH = 6


@dataclasses.dataclass
class Region:
    """A set of nodes kept in float, and what they compute."""

    kind: str
    nodes: list[ir.Node]


def _activations(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and not is_constant(v)]


def _grow_forward(values: set[int], inputs: set[int], start: list[ir.Value], block: list[ir.Node],
                  seen: set[int]) -> None:
    """Add the element-wise consumers whose activation inputs all belong to the block (or its inputs)."""
    queue = deque(start)
    while queue and len(block) < MAX_BLOCK:
        value = queue.popleft()
        for use in value.uses():
            node = use.node
            if id(node) in seen or not (is_onnx_op(node, *ELEMENTWISE) or is_onnx_op(node, *_REDUCTIONS)):
                continue
            if not all(id(v) in values or id(v) in inputs for v in _activations(node)):
                continue
            seen.add(id(node))
            block.append(node)
            for out in node.outputs:
                values.add(id(out))
                queue.append(out)


def _grow_backward(value: ir.Value, block: list[ir.Node], seen: set[int], inputs: set[int]) -> None:
    """Add the single-use element-wise producers of `value`; their activation inputs become block inputs."""
    stack = [value]
    while stack and len(block) < MAX_BLOCK:
        v = stack.pop()
        node = v.producer()
        if node is None or id(node) in seen or not is_onnx_op(node, *ELEMENTWISE) or len(v.uses()) != 1 \
                or v.is_graph_output():
            inputs.add(id(v))
            continue
        seen.add(id(node))
        block.append(node)
        stack.extend(_activations(node))


def _block(seed: ir.Node, backward: bool) -> list[ir.Node]:
    block = [seed]
    seen = {id(seed)}
    inputs: set[int] = set()
    for v in _activations(seed):
        if backward:
            _grow_backward(v, block, seen, inputs)
        else:
            inputs.add(id(v))
            _grow_backward_single(v, block, seen, inputs)
    values = {id(o) for n in block for o in n.outputs}
    _grow_forward(values, inputs, list(seed.outputs), block, seen)
    return block


def _grow_backward_single(value: ir.Value, block: list[ir.Node], seen: set[int], inputs: set[int]) -> None:
    """Before a reduction: the element-wise op that only it reads (``Pow(d, 2)``, ``Mul(x, x)``)."""
    node = value.producer()
    if node is None or id(node) in seen or not is_onnx_op(node, *ELEMENTWISE) or len(value.uses()) != 1 \
            or value.is_graph_output():
        return
    seen.add(id(node))
    block.append(node)
    inputs.update(id(v) for v in _activations(node))


def _reaches_softmax(matmul: ir.Node) -> list[ir.Node] | None:
    """The ops from an activation x activation MatMul to a Softmax (exclusive), or None when none is reached."""
    path: list[ir.Node] = []
    value = matmul.outputs[0]
    for _ in range(_MAX_PATH):
        uses = list(value.uses())
        if len(uses) != 1:
            return None
        node = uses[0].node
        if is_onnx_op(node, *_SOFTMAX):
            return path
        if not is_onnx_op(node, *_PATH):
            return None
        path.append(node)
        value = node.outputs[0]
    return None


def _reads_softmax(matmul: ir.Node) -> bool:
    for v in _activations(matmul):
        node = v.producer()
        for _ in range(_MAX_PATH):
            if node is None:
                break
            if is_onnx_op(node, *_SOFTMAX):
                return True
            if not is_onnx_op(node, "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Identity"):
                break
            node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return False


def sensitive_regions(graph: ir.Graph) -> list[Region]:
    """The range-sensitive regions of `graph` (see the module doc), each node in at most one region."""
    regions: list[Region] = []
    taken: set[int] = set()

    def add(kind: str, nodes: list[ir.Node]) -> None:
        fresh = [n for n in nodes if id(n) not in taken]
        if fresh:
            taken.update(id(n) for n in fresh)
            regions.append(Region(kind, fresh))

    for node in graph:
        if is_onnx_op(node, *_REDUCTIONS):
            block = _block(node, backward=False)
            if len(block) > 1:
                add("normalization", block)
        elif is_onnx_op(node, *_SEEDS):
            add("activation", _block(node, backward=True))
        elif is_onnx_op(node, "MatMul") and len(_activations(node)) == 2:
            path = _reaches_softmax(node)
            if path is not None:
                add("attention", [node, *path])
            elif _reads_softmax(node):
                add("attention", [node])
    return regions
