"""One ONNX Runtime session that can run a static int8 model with any of its quantization points switched off.

Searching which layers to keep in float needs the outputs of many mixed-precision variants. Building
and loading each variant costs a graph rewrite and an ONNX Runtime session; here every quantization
*site* of the int8 model gets a boolean graph input (a flag) instead, and one session answers for any
set of sites:

- an activation ``x -> QuantizeLinear -> DequantizeLinear``: the consumers read
  ``Where(flag, DQ(Q(x)), x)`` (for a Relu/Clip fused into the quantization range, the float side is
  ``Clip(x, 0, max)``, which is what the removed activation computed);
- a weight, bias or constant operand behind a DequantizeLinear: ``Where(flag, DQ(q), w)`` with the float
  tensor it replaced;
- a DynamicQuantizeLSTM: the float LSTM with the original weights runs beside it and
  ``Where(flag, ., .)`` picks each output.

Sites are named by the float tensor (or, for an LSTM, the node) they stand for, so a plan of the float
model says which flags to set. With the Q/DQ pairs unfused the arithmetic is float with int8 rounding
(the QDQ reference semantics), which tracks ONNX Runtime's integer kernels closely; a final check runs
the real int8 model. The session keeps ONNX Runtime's graph optimizations (nothing around a switch
fuses into an integer kernel).

Each switch is built as a ``Where`` and then turned into an ``If`` on its flag whose branches hold the work
only one side needs (the QuantizeLinear/DequantizeLinear of an activation, a layer or its float twin, the
float clamp): a run computes the side its flag picks, not both. ``Where`` with a scalar condition broadcast
over a feature map is slow in ONNX Runtime (ONNX Runtime's profiler on PP-OCRv4 det: 87 of 204 ms a run in the
``Where``s). Timed interleaved against the float model on one det page, the ``Where`` form ran 2.7-2.9x its
time, the ``If`` form 1.24-1.37x (every site int8, or every site float).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from onnxopt.graph import all_names, is_constant, is_onnx_op, new_initializer, origin_of, unique_name
from onnxopt.io import temp_model_file
from onnxopt.runtime import run_outputs, session

from .bias import dequantized
from .recurrent import MS_DOMAIN

__all__ = ["Emulator"]

logger = logging.getLogger(__name__)

_BOOL = ir.DataType.BOOL
_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class _Build:
    graph: ir.Graph
    taken: set[str]
    flags: dict[str, str] = dataclasses.field(default_factory=dict)  # site -> flag input name

    values: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    switches: list[ir.Node] = dataclasses.field(default_factory=list)

    def flag(self, site: str) -> ir.Value:
        """The boolean graph input that switches `site` (made once per site)."""
        if site not in self.values:
            name = unique_name(self.graph, f"onnxopt_flag.{site}", self.taken)
            value = ir.Value(name=name, shape=ir.Shape([]), type=ir.TensorType(_BOOL))
            self.graph.inputs.append(value)
            self.flags[site] = name
            self.values[site] = value
        return self.values[site]


def _where(build: _Build, site: str, quantized: ir.Value, alt: ir.Value, before: ir.Node) -> ir.Value:
    """``Where(flag, quantized, alt)`` inserted before `before`; every other reader of `quantized` reads it."""
    uses = list(quantized.uses())
    node = ir.Node("", "Where", [build.flag(site), quantized, alt],
                   name=unique_name(build.graph, f"onnxopt_switch.{site}", build.taken))
    out = node.outputs[0]
    out.name = unique_name(build.graph, f"{quantized.name}.switched", build.taken)
    out.type, out.shape = quantized.type, quantized.shape
    build.switches.append(node)
    for use in uses:
        use.node.replace_input_with(use.idx, out)
    was_output = quantized.is_graph_output()
    build.graph.insert_before(before, node)
    if was_output:
        k = list(build.graph.outputs).index(quantized)
        build.graph.outputs[k] = out
    return out


def _only_for(value: ir.Value, switch: ir.Node, index: int, graph: ir.Graph) -> list[ir.Node]:
    """The main-graph nodes whose outputs feed nothing but input `index` of `switch` (directly or through each
    other): the work only that side of the switch needs, in graph order."""
    inside: set[int] = set()
    todo = [value.producer()]
    while todo:  # a node refused here is offered again when another reader of its outputs joins
        node = todo.pop()
        if node is None or id(node) in inside or node is switch or node.graph is not graph:
            continue
        uses = [u for o in node.outputs for u in o.uses()]
        if (not any(o.is_graph_output() for o in node.outputs)
                and all((u.node is switch and u.idx == index) or id(u.node) in inside for u in uses)):
            inside.add(id(node))
            todo.extend(v.producer() for v in node.inputs if v is not None)
    return [n for n in graph if id(n) in inside]


def _as_branches(graph: ir.Graph, switch: ir.Node, taken: set[str]) -> tuple[list[str], list[str]]:
    """Replace ``Where(flag, a, b)`` by ``If(flag)`` whose branches compute and return `a` and `b` (see the module
    doc); the op types in each branch."""
    flag, a, b = switch.inputs
    out = switch.outputs[0]
    branches = []
    for index, side, label in ((1, a, "int8"), (2, b, "float")):
        nodes = _only_for(side, switch, index, graph)
        graph.remove(nodes, safe=False)
        if side.producer() not in nodes:
            copy = ir.Node("", "Identity", [side], name=unique_name(graph, f"{switch.name}.{label}", taken))
            nodes.append(copy)
            side = copy.outputs[0]
            side.name = unique_name(graph, f"{out.name}.{label}", taken)
        result = side
        result.type, result.shape = out.type, out.shape
        branches.append(ir.Graph([], [result], nodes=nodes, name=f"{switch.name}.{label}"))
    node = ir.Node("", "If", [flag], [ir.AttrGraph("then_branch", branches[0]),
                                      ir.AttrGraph("else_branch", branches[1])],
                   name=switch.name)
    graph.insert_before(switch, node)
    chosen = node.outputs[0]
    chosen.type, chosen.shape = out.type, out.shape
    out.replace_all_uses_with(chosen, replace_graph_outputs=True)
    name = out.name
    graph.remove(switch, safe=False)
    out.name = None
    chosen.name = name
    return [n.op_type for n in branches[0]], [n.op_type for n in branches[1]]


def _stored_dq(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear of a constant that produces `value`, or None."""
    node = value.producer() if value is not None else None
    if is_onnx_op(node, "DequantizeLinear") and is_constant(node.inputs[0]):
        return node
    return None


def _first_user(value: ir.Value) -> ir.Node | None:
    users = [u.node for u in value.uses()]
    return users[0] if users else None


class Emulator:
    """Outputs of the int8 model `quantized` with any subset of its sites on (see the module doc).

    `floats` maps the names of weights, biases and constant operands that were quantized to their float
    tensors; `fused` maps fused activation tensors to their clamp's upper bound (None for Relu);
    `lstms` maps DynamicQuantizeLSTM node names to the float LSTM nodes they replaced.
    """

    def __init__(self, quantized: ir.Model, floats: dict[str, ir.TensorProtocol], fused: dict[str, float | None],
                 lstms: dict[str, ir.Node], *, threads: int | None = None) -> None:
        model = quantized.clone()
        graph = model.graph
        build = _Build(graph, all_names(graph))
        layers = [n for n in graph if is_onnx_op(n, *_LAYERS) and len(n.inputs) > 1
                  and _stored_dq(n.inputs[1]) is not None]
        for node in list(graph):  # activations first: their switches must see the tensors under their own names
            if is_onnx_op(node, "DequantizeLinear") and node.inputs[0] is not None and not is_constant(node.inputs[0]):
                self._switch_dq(build, node, floats, fused)
        for node in layers:
            self._switch_layer(build, node, floats)
        for node in list(graph):
            if is_onnx_op(node, "DequantizeLinear") and is_constant(node.inputs[0]):
                self._switch_dq(build, node, floats, fused)
            elif node.op_type == "DynamicQuantizeLSTM" and node.domain == MS_DOMAIN and node.name in lstms:
                self._switch_lstm(build, node, lstms[node.name])
        graph.sort()
        self.branch_ops: dict[str, tuple[list[str], list[str]]] = {}
        """Each site's switch: the op types its int8 and its float branch run."""
        sites = {flag: site for site, flag in build.flags.items()}
        for switch in build.switches:
            self.branch_ops[sites[switch.inputs[0].name]] = _as_branches(graph, switch, build.taken)
        # A layer reads its int8 weights as dequantized constants now: the DequantizeLinear nodes it read are dead
        # (ONNX Runtime would run them every time: 118 of them on PP-OCRv4 det).
        RemoveUnusedNodesPass()(model)
        self.main_ops = collections.Counter(n.op_type for n in graph)
        """The op types the main graph runs outside the switches."""
        self.sites = dict(build.flags)
        self._stack = contextlib.ExitStack()
        path = self._stack.enter_context(temp_model_file(model))
        try:
            self._sess = session(path, threads=threads)
        except BaseException:
            self._stack.close()
            raise
        self.output_names = [o.name for o in self._sess.get_outputs()]

    # ------------------------------------------------------------------ build
    def _switch_layer(self, build: _Build, node: ir.Node, floats: dict[str, ir.TensorProtocol]) -> None:
        """A layer with int8 weights: it reads the dequantized weights as constants (so ONNX Runtime prepacks
        them) and a twin with the float weights runs beside it; ``Where(flag, int8 side, float side)``."""
        site = origin_of(node.inputs[1].producer().outputs[0]) or node.inputs[1].name
        if site not in floats:
            return
        q_inputs, f_inputs = list(node.inputs), list(node.inputs)
        for idx in range(1, len(node.inputs)):
            value = node.inputs[idx]
            dq = _stored_dq(value)
            if dq is None:
                continue
            name = origin_of(dq.outputs[0]) or value.name
            if name not in floats:
                return
            original = np.asarray(floats[name].numpy())
            q_inputs[idx] = new_initializer(build.graph, f"{name}.dequantized",
                                            dequantized(dq).astype(original.dtype), taken=build.taken)
            f_inputs[idx] = new_initializer(build.graph, f"{name}.float", original, taken=build.taken)
        for idx, value in enumerate(q_inputs):
            node.replace_input_with(idx, value)
        attrs = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        twin = ir.Node(node.domain, node.op_type, f_inputs, attrs,
                       name=unique_name(build.graph, f"{node.name}.float", build.taken))
        out, alt = node.outputs[0], twin.outputs[0]
        alt.name = unique_name(build.graph, f"{out.name}.float", build.taken)
        alt.type, alt.shape = out.type, out.shape
        build.graph.insert_after(node, twin)
        _where(build, site, out, alt, _first_user(out) or twin)

    def _switch_dq(self, build: _Build, dq: ir.Node, floats: dict[str, ir.TensorProtocol],
                   fused: dict[str, float | None]) -> None:
        stored = dq.inputs[0]
        out = dq.outputs[0]
        user = _first_user(out)
        if stored is None or user is None:
            return
        if is_constant(stored):
            name = origin_of(out) or out.name
            tensor = floats.get(name)
            if tensor is None:
                return
            alt = new_initializer(build.graph, f"{name}.float", np.asarray(tensor.numpy()), taken=build.taken)
            _where(build, name, out, alt, user)
            return
        q = stored.producer()
        if not is_onnx_op(q, "QuantizeLinear") or q.inputs[0] is None:
            return
        x = q.inputs[0]
        alt = x
        if x.name in fused:
            alt = self._clamp(build, x, fused[x.name], user)
        _where(build, x.name, out, alt, user)

    @staticmethod
    def _clamp(build: _Build, x: ir.Value, high: float | None, before: ir.Node) -> ir.Value:
        dtype = np.float32
        bounds = [new_initializer(build.graph, f"{x.name}.min", np.asarray(0.0, dtype), taken=build.taken)]
        if high is not None:
            bounds.append(new_initializer(build.graph, f"{x.name}.max", np.asarray(high, dtype), taken=build.taken))
        node = ir.Node("", "Clip", [x, *bounds], name=unique_name(build.graph, f"{x.name}.clamp", build.taken))
        node.outputs[0].name = unique_name(build.graph, f"{x.name}.clamped", build.taken)
        node.outputs[0].type, node.outputs[0].shape = x.type, x.shape
        build.graph.insert_before(before, node)
        return node.outputs[0]

    def _switch_lstm(self, build: _Build, node: ir.Node, original: ir.Node) -> None:
        inputs = list(original.inputs)
        floats = []
        for v in inputs[1:3]:
            floats.append(new_initializer(build.graph, f"{v.name}.float", np.asarray(v.const_value.numpy()),
                                          taken=build.taken))
        args = [node.inputs[0], *floats, *node.inputs[3:8]]
        attrs = [ir.Attr(a.name, a.type, a.value) for a in original.attributes.values()]
        twin = ir.Node("", "LSTM", args, attrs, num_outputs=len(node.outputs),
                       name=unique_name(build.graph, f"{node.name}.float", build.taken))
        build.graph.insert_after(node, twin)
        for k, (out, alt) in enumerate(zip(node.outputs, twin.outputs)):
            alt.name = unique_name(build.graph, f"{node.name}.float_out{k}", build.taken)
            alt.type, alt.shape = out.type, out.shape
            if out.uses() or out.is_graph_output():
                _where(build, node.name, out, alt, _first_user(out) or twin)

    # ------------------------------------------------------------------ run
    def flags_for(self, on: set[str]) -> dict[str, np.ndarray]:
        return {flag: np.array(site in on) for site, flag in self.sites.items()}

    def run(self, feeds: Sequence[dict[str, np.ndarray]], on: set[str]) -> list[list[np.ndarray]]:
        """The model outputs for each feed, with the sites in `on` quantized and every other site float."""
        flags = self.flags_for(on)
        return [run_outputs(self._sess, {**feed, **flags}, self.output_names) for feed in feeds]

    def close(self) -> None:
        self._sess = None
        self._stack.close()

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
