"""The channel dependency graph: one test per coupling pattern, plus random block compositions.

Each exactness test zeroes the filters of some units (their biases stay, so compensation is
exercised), removes those units, and checks that ONNX Runtime gives the outputs of the zeroed model
to float rounding (rtol 1e-4, atol 1e-5 on outputs of order 1). Consumers in these graphs have no
zero padding, where bias compensation is exact.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, make_model, run_ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper
from onnxopt.passes.channels import remove_units

from onnxopt.analysis.channel_groups import ChannelGraph, Group, build_channel_graph
from onnxopt.graph import constant_array, set_weight

RTOL, ATOL = 1e-4, 1e-5


class Builder:
    """Tiny graph builder: random weights, NCHW convs without padding unless asked."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.k = 0
        self.per_op: dict[str, int] = {}

    def name(self, base: str) -> str:
        self.k += 1
        return f"{base}{self.k}"

    def w(self, *shape: int, scale: float = 0.5) -> str:
        n = self.name("w")
        self.inits[n] = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        return n

    def const(self, array: np.ndarray) -> str:
        n = self.name("c")
        self.inits[n] = np.asarray(array)
        return n

    def op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        self.per_op[op] = self.per_op.get(op, 0) + 1
        name = f"{op.lower()}{self.per_op[op]}"
        outs = [f"{name}.out{i}" if i else f"{name}.out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x: str, cin: int, cout: int, k: int = 1, group: int = 1, pad: int = 0, bias: bool = True) -> str:
        ins = [x, self.w(cout, cin // group, k, k)] + ([self.w(cout)] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        return self.op("BatchNormalization", [x, self.const(r.uniform(0.5, 1.5, c).astype(np.float32)),
                                              self.const(r.normal(0, 0.2, c).astype(np.float32)),
                                              self.const(r.normal(0, 0.2, c).astype(np.float32)),
                                              self.const(r.uniform(0.5, 1.5, c).astype(np.float32))])

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        """A checked model; output shapes left as None are filled by ONNX shape inference."""
        graph = helper.make_graph(self.nodes, "t", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                                  [helper.make_empty_tensor_value_info(n) for n, _, _ in outputs],
                                  [onnx.numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        draft = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        known = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(draft).graph.value_info}
        filled = []
        for n, t, s in outputs:
            dims = known[n].type.tensor_type.shape.dim
            filled.append((n, t, s if s is not None else [d.dim_value or d.dim_param or None for d in dims]))
        return make_model(self.nodes, inputs, filled, self.inits, opset=opset)


def _feeds(proto: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in proto.graph.input:
        dims = [d.dim_value if d.dim_value else 2 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _zero_units(cg: ChannelGraph, group: Group, units: list[int], bias: bool = False) -> set[int]:
    """Zero the producer filters (and with `bias` their biases) of `units`; return their elements."""
    removed = {e for u in units for e in group.units[u]}
    for p in group.producers:
        idx = [e - p.space.base for e in removed if p.space.base <= e < p.space.base + p.space.size]
        targets = [(p.weight_index, p.axis)] + ([(p.bias_index, 0)] if bias and p.bias_index is not None else [])
        for index, axis in targets:
            value = p.node.inputs[index]
            w = np.array(constant_array(value))
            where = [slice(None)] * w.ndim
            where[axis] = idx
            w[tuple(where)] = 0
            set_weight(value, w)
        if bias and p.bias_index is None:
            _zero_following_bias(p.node, idx)
    return removed


def _zero_following_bias(node: ir.Node, idx: list[int]) -> None:
    """Zero the bias of a MatMul's following Add at `idx` (a MatMul keeps its bias there)."""
    for use in node.outputs[0].uses():
        if use.node.op_type == "Add":
            other = use.node.inputs[1 - use.idx]
            arr = constant_array(other)
            if arr is not None:
                arr = np.array(arr)
                arr[..., idx] = 0
                set_weight(other, arr)


def _cut_and_compare(proto: onnx.ModelProto, pick=None, feeds=None, zero_bias=None
                     ) -> tuple[ir.Model, ChannelGraph, list[Group]]:
    """Zero then remove units of every prunable group (by default units 0 and 2 when there are
    more than 2); assert ORT parity with the zeroed model. Returns the cut model and the groups."""
    model = ir.from_proto(proto)
    cg = build_channel_graph(model)
    groups = cg.groups()
    removed: set[int] = set()
    for g in groups:
        units = [u for u in (pick(g) if pick else (0, 2) if g.size > 2 else ()) if u in g.prunable()]
        removed |= _zero_units(cg, g, units, bias=bool(zero_bias and zero_bias(g)))
    assert removed, "the test must remove something"
    reference = ir.to_proto(model)
    cg = build_channel_graph(model)  # the same elements, with constants read from the zeroed weights
    remove_units(model, cg, removed)
    feeds = feeds or _feeds(proto)
    cut = ir.to_proto(model)
    onnx.checker.check_model(cut, full_check=True)
    for a, b in zip(run_ort(reference, feeds), run_ort(cut, feeds)):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)
    return model, cg, groups


def _weight_shape(model: ir.Model, node_name: str, index: int = 1) -> tuple[int, ...]:
    node = next(n for n in model.graph if n.name == node_name)
    return tuple(constant_array(node.inputs[index]).shape)


def _group_of(groups: list[Group], node_name: str) -> Group:
    return next(g for g in groups if any(p.node.name == node_name for p in g.producers))


X4 = [("x", F32, [2, 3, 6, 6])]


# ------------------------------------------------------------------ coupling patterns
def test_conv_bn_relu_conv_chain() -> None:
    b = Builder()
    h = b.op("Relu", [b.bn(b.conv("x", 3, 6, k=3), 6)])
    y = b.conv(h, 6, 4, k=3)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert _weight_shape(model, "conv1") == (4, 3, 3, 3)
    assert _weight_shape(model, "conv2") == (4, 4, 3, 3)
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    assert all(constant_array(v).shape == (4,) for v in bn.inputs[1:])
    assert len([g for g in groups if g.prunable()]) == 1


def test_residual_add_couples_both_producers() -> None:
    b = Builder()
    a = b.op("Relu", [b.conv("x", 3, 6)])
    r = b.op("Add", [a, b.conv(a, 6, 6)])
    y = b.conv(b.op("Relu", [r]), 6, 2)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    g = _group_of(groups, "conv1")
    assert {p.node.name for p in g.producers} == {"conv1", "conv2"}
    assert _weight_shape(model, "conv2") == (4, 4, 1, 1)


def test_concat_maps_offsets() -> None:
    b = Builder()
    c = b.op("Concat", [b.conv("x", 3, 4), b.conv("x", 3, 5)], axis=1)
    y = b.conv(b.op("Relu", [c]), 9, 2)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert len([g for g in groups if g.prunable()]) == 2
    assert _weight_shape(model, _last_conv(model)) == (2, 5, 1, 1)


def _last_conv(model: ir.Model) -> str:
    return [n.name for n in model.graph if n.op_type == "Conv"][-1]


@pytest.mark.parametrize("explicit", [True, False])
def test_split_maps_ranges_back(explicit: bool) -> None:
    b = Builder()
    h = b.conv("x", 3, 8)
    ins = [h, b.const(np.array([3, 5], dtype=np.int64))] if explicit else [h]
    s1, s2 = b.op("Split", ins, n_out=2, axis=1)
    y = b.op("Add", [b.conv(s1, 3 if explicit else 4, 2), b.conv(s2, 5 if explicit else 4, 2)])
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]), pick=lambda g: g.prunable()[:1]
                                        if g.size > 1 else [])
    split = next(n for n in model.graph if n.op_type == "Split")
    assert [int(v) for v in constant_array(split.inputs[1])] == ([2, 4] if explicit else [3, 3])


def test_slice_on_channel_axis_updates_bounds() -> None:
    b = Builder()
    h = b.conv("x", 3, 8)
    s = b.op("Slice", [h, b.const(np.array([2], np.int64)), b.const(np.array([7], np.int64)),
                       b.const(np.array([1], np.int64))])
    y = b.op("Add", [b.conv(s, 5, 2), b.conv(h, 8, 2)])
    model, _, _ = _cut_and_compare(b.model(X4, [(y, F32, None)]), pick=lambda g: {3: [0], 5: [1]}.get(g.size, []))
    sl = next(n for n in model.graph if n.op_type == "Slice")
    assert (int(constant_array(sl.inputs[1])[0]), int(constant_array(sl.inputs[2])[0])) == (1, 5)


def test_depthwise_ties_input_to_output_and_group_count() -> None:
    b = Builder()
    h = b.op("Relu", [b.conv("x", 3, 6)])
    d = b.op("Relu", [b.conv(h, 6, 6, k=3, group=6)])
    y = b.conv(d, 6, 2)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    dw = next(n for n in model.graph if n.attributes.get_int("group", 1) > 1)
    assert dw.attributes.get_int("group") == 4 and constant_array(dw.inputs[1]).shape == (4, 1, 3, 3)
    assert {p.node.name for p in _group_of(groups, "conv1").producers} == {"conv1", dw.name}


def test_grouped_conv_removes_whole_groups() -> None:
    b = Builder()
    h = b.conv("x", 3, 8)
    g2 = b.conv(h, 8, 6, group=2)
    y = b.conv(g2, 6, 2)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]), pick=lambda g: [0] if g.size == 2 else [])
    gc = next(n for n in model.graph if n.name == "conv2")
    assert gc.attributes.get_int("group") == 1 and constant_array(gc.inputs[1]).shape == (3, 4, 1, 1)
    assert _group_of(groups, "conv1").size == 2


def test_flatten_gemm_maps_channel_to_row_block() -> None:
    b = Builder()
    h = b.op("MaxPool", [b.op("Relu", [b.conv("x", 3, 5)])], kernel_shape=[2, 2], strides=[2, 2])
    f = b.op("Flatten", [h], axis=1)
    y = b.op("Gemm", [f, b.w(4, 5 * 9), b.w(4)], transB=1)
    model, _, _ = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert _weight_shape(model, "gemm1") == (4, 3 * 9)


def test_gemm_mlp_hidden_units() -> None:
    b = Builder()
    h = b.op("Relu", [b.op("Gemm", ["x", b.w(8, 6), b.w(6)])])
    y = b.op("Gemm", [h, b.w(6, 3), b.w(3)])
    model, _, _ = _cut_and_compare(b.model([("x", F32, [4, 8])], [(y, F32, None)]))
    assert _weight_shape(model, "gemm1") == (8, 4) and _weight_shape(model, "gemm2") == (4, 3)


def test_per_channel_constants_pooling_pad_resize_pass_through() -> None:
    b = Builder()
    h = b.conv("x", 3, 6)
    h = b.op("Mul", [h, b.const(np.linspace(0.5, 2, 6, dtype=np.float32).reshape(1, 6, 1, 1))])
    h = b.op("Add", [h, b.const(np.linspace(-1, 1, 6, dtype=np.float32).reshape(6, 1, 1))])
    h = b.op("Sub", [h, b.const(np.float32(0.25))])
    h = b.op("AveragePool", [b.op("Clip", [h, b.const(np.float32(-1)), b.const(np.float32(2))])],
             kernel_shape=[2, 2])
    h = b.op("Pad", [h, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="edge")
    h = b.op("Resize", [h, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = b.conv(b.op("Sigmoid", [h]), 6, 2)
    model, _, _ = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert constant_array(mul.inputs[1]).shape == (1, 4, 1, 1)


def test_instance_norm_passes_layer_norm_over_channels_pins() -> None:
    b = Builder()
    h = b.op("InstanceNormalization", [b.conv("x", 3, 6), b.const(np.ones(6, np.float32)),
                                       b.const(np.linspace(0, 1, 6, dtype=np.float32))])
    y = b.conv(b.op("Relu", [h]), 6, 2)
    _cut_and_compare(b.model(X4, [(y, F32, None)]))
    b = Builder()
    h = b.op("LayerNormalization", [b.op("Gemm", ["x", b.w(8, 6), b.w(6)]), b.const(np.ones(6, np.float32))],
             axis=-1)
    y = b.op("Gemm", [h, b.w(6, 3)])
    groups = build_channel_graph(ir.from_proto(b.model([("x", F32, [4, 8])], [(y, F32, None)]))).groups()
    assert all(not g.prunable() for g in groups)
    assert any("normalizes over the channel axis" in r for g in groups for r in g.pinned.values())


def test_transpose_to_channels_last_then_matmul() -> None:
    b = Builder()
    h = b.op("Transpose", [b.op("Relu", [b.conv("x", 3, 6)])], perm=[0, 2, 3, 1])
    y = b.op("MatMul", [h, b.w(6, 4)])
    model, _, _ = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert _weight_shape(model, "matmul1") == (4, 4)


def test_global_pool_squeeze_gemm() -> None:
    b = Builder()
    h = b.op("GlobalAveragePool", [b.op("Relu", [b.conv("x", 3, 6)])])
    h = b.op("Squeeze", [h, b.const(np.array([2, 3], np.int64))])
    y = b.op("Gemm", [h, b.w(6, 3), b.w(3)])
    model, _, _ = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert _weight_shape(model, "gemm1") == (4, 3)


def test_conv_transpose_producer_and_consumer() -> None:
    b = Builder()
    h = b.op("Relu", [b.conv("x", 3, 6)])
    t = b.op("ConvTranspose", [h, b.w(6, 5, 2, 2), b.w(5)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(t, 5, 2)
    # a transposed conv spreads a constant unevenly over its output, so the cut channel's bias is zero
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]), pick=lambda g: [0] if g.size > 1 else [],
                                        zero_bias=lambda g: True)
    assert _weight_shape(model, "convtranspose1") == (5, 4, 2, 2)


def _ffn_attention(b: Builder, d: int = 8, heads: int = 2, hidden: int = 6) -> str:
    x = "x"
    qkv = []
    for name in "qkv":
        m = b.op("Add", [b.op("MatMul", [x, b.w(d, d)]), b.w(d)])
        r = b.op("Reshape", [m, b.const(np.array([0, 0, heads, d // heads], np.int64))])
        perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
        qkv.append(b.op("Transpose", [r], perm=perm))
    s = b.op("Softmax", [b.op("Div", [b.op("MatMul", qkv[:2]), b.const(np.float32(2.0))])], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [s, qkv[2]])], perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [ctx, b.const(np.array([0, 0, d], np.int64))])
    att = b.op("Add", [x, b.op("Add", [b.op("MatMul", [merged, b.w(d, d)]), b.w(d)])])
    f = b.op("Add", [b.op("MatMul", [att, b.w(d, hidden)]), b.w(hidden)])
    g = b.op("Mul", [b.op("Mul", [f, b.op("Add", [b.op("Erf", [b.op("Div", [f, b.const(np.float32(1.4142135))])]),
                                                  b.const(np.float32(1.0))])]), b.const(np.float32(0.5))])
    return b.op("Add", [att, b.op("Add", [b.op("MatMul", [g, b.w(hidden, d)]), b.w(d)])])


def test_attention_heads_and_ffn_hidden_units() -> None:
    b = Builder(3)
    y = _ffn_attention(b)
    proto = b.model([("x", F32, ["batch", "seq", 8])], [(y, F32, None)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}
    model = ir.from_proto(proto)
    groups = build_channel_graph(model).groups()
    prunable = sorted((g.size, len(g.units[0])) for g in groups if g.prunable())
    # one head group (2 heads, each spanning Q/K/V/out columns) and one FFN group (6 units)
    assert [s for s, _ in prunable] == [2, 6]

    def pick(g: Group) -> list[int]:
        return [1] if g.size == 2 else [0, 4]

    # a head with zero Q/K/V weights and biases contributes nothing; FFN units keep their biases,
    # which compensation carries through GELU into the second MatMul's bias
    model, _, _ = _cut_and_compare(proto, pick=pick, feeds=feeds, zero_bias=lambda g: g.size == 2)
    shapes = [tuple(constant_array(n.inputs[1])) for n in model.graph if n.op_type == "Reshape"]
    assert (0, 0, 1, 4) in shapes and (0, 0, 4) in shapes
    assert _weight_shape(model, "matmul1") == (8, 4)
    ffn = [n for n in model.graph if n.op_type == "MatMul" and constant_array(n.inputs[1]) is not None][-2:]
    assert [constant_array(n.inputs[1]).shape for n in ffn] == [(8, 4), (4, 8)]


# ------------------------------------------------------------------ what pins
def _pinned_reasons(proto: onnx.ModelProto) -> list[str]:
    groups = build_channel_graph(ir.from_proto(proto)).groups()
    return [r for g in groups for r in g.pinned.values()]


def test_graph_output_unknown_op_and_shape_use_pin() -> None:
    b = Builder()
    y = b.conv("x", 3, 4)
    assert any("graph output" in r for r in _pinned_reasons(b.model(X4, [(y, F32, None)])))
    b = Builder()
    h = b.op("LRN", [b.conv("x", 3, 4)], size=3)
    y = b.conv(h, 4, 2)
    assert any("LRN" in r for r in _pinned_reasons(b.model(X4, [(y, F32, None)])))
    b = Builder()
    h = b.conv("x", 3, 4)
    shp = b.op("Shape", [h])
    y = b.op("Reshape", [b.conv(h, 4, 2), shp])
    assert any("channel dimension" in r for r in _pinned_reasons(b.model(X4, [(y, F32, None)])))


def test_untracked_reshape_pins() -> None:
    b = Builder()
    h = b.op("Reshape", [b.conv("x", 3, 4), b.const(np.array([2, 2, 2, 36], np.int64))])
    y = b.op("MatMul", [h, b.w(36, 2)])
    reasons = _pinned_reasons(b.model(X4, [(y, F32, None)]))
    assert any("Reshape" in r or "reshape" in r for r in reasons)


# ------------------------------------------------------------------ random compositions
_BLOCKS = ("conv", "residual", "concat", "depthwise", "grouped", "pool", "scale", "split_add", "slice")
_TAILS = ("gap_gemm", "flatten_gemm", "nhwc_matmul")


def _block(b: Builder, kind: str, x: str, c: int, w: int) -> tuple[str, int]:
    if kind == "conv":
        return b.op("Relu", [b.bn(b.conv(x, c, w, k=3), w)]), w
    if kind == "residual":
        h = b.op("Relu", [b.conv(x, c, c)])
        return b.op("Relu", [b.op("Add", [x, b.conv(h, c, c)])]), c
    if kind == "concat":
        return b.op("Concat", [b.conv(x, c, w), b.conv(x, c, w + 1)], axis=1), 2 * w + 1
    if kind == "depthwise":
        return b.op("Relu", [b.conv(x, c, c, k=3, group=c, pad=1)]), c
    if kind == "grouped":
        return (b.conv(x, c, 2 * w, group=2), 2 * w) if c % 2 == 0 else (x, c)
    if kind == "pool":
        return b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[1, 1]), c
    if kind == "scale":
        return b.op("Mul", [x, b.const(b.rng.uniform(0.5, 2, (c, 1, 1)).astype(np.float32))]), c
    if kind == "slice" and c >= 3:
        bounds = [b.const(np.array([v], np.int64)) for v in (1, c, 1)]
        return b.op("Slice", [x] + bounds), c - 1
    if kind == "split_add":
        h = b.conv(x, c, 2 * w)
        s1, s2 = b.op("Split", [h, b.const(np.array([w, w], np.int64))], n_out=2, axis=1)
        return b.op("Add", [s1, b.op("Relu", [s2])]), w
    return x, c


def _tail(b: Builder, kind: str, x: str, c: int, spatial: int) -> str:
    if kind == "gap_gemm":
        return b.op("Gemm", [b.op("Flatten", [b.op("GlobalAveragePool", [x])]), b.w(c, 3), b.w(3)])
    if kind == "flatten_gemm":
        return b.op("Gemm", [b.op("Flatten", [x]), b.w(3, c * spatial * spatial), b.w(3)], transB=1)
    return b.op("MatMul", [b.op("Transpose", [x], perm=[0, 2, 3, 1]), b.w(c, 3)])


def _compose(blocks: list[str], widths: list[int], tail: str, seed: int) -> onnx.ModelProto:
    b = Builder(seed)
    x, c, spatial = "x", 3, 9
    for kind, w in zip(blocks, widths):
        x, c = _block(b, kind, x, c, w)
        spatial -= {"conv": 2, "pool": 1}.get(kind, 0)
    y = _tail(b, tail, x, c, spatial)
    return b.model([("x", F32, [2, 3, 9, 9])], [(y, F32, None)])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(st.sampled_from(_BLOCKS), min_size=1, max_size=5),
       widths=st.lists(st.integers(2, 6), min_size=5, max_size=5), tail=st.sampled_from(_TAILS),
       seed=st.integers(0, 1000), data=st.data())
def test_random_compositions_remove_zero_units_exactly(blocks, widths, tail, seed, data) -> None:
    proto = _compose(blocks, widths, tail, seed)
    if not any(g.prunable() and g.size > 1 for g in build_channel_graph(ir.from_proto(proto)).groups()):
        return

    def pick(g: Group) -> list[int]:
        units = g.prunable()
        if g.size < 2 or not units:
            return []
        k = data.draw(st.integers(1, min(len(units), g.size - 1)))
        return data.draw(st.permutations(units))[:k]

    _cut_and_compare(proto, pick=pick)


def test_no_producer_means_unprunable() -> None:
    b = Builder()
    y = b.op("Relu", ["x"])
    y = b.op("Add", [y, b.const(np.zeros((1, 3, 1, 1), np.float32))])
    assert build_channel_graph(ir.from_proto(b.model(X4, [(y, F32, None)]))).groups() == []


def test_concat_with_an_untracked_input_keeps_that_part() -> None:
    b = Builder()
    c = b.op("Concat", [b.conv("x", 3, 5), "x"], axis=1)
    y = b.conv(b.op("Relu", [c]), 8, 2)
    model, _, groups = _cut_and_compare(b.model(X4, [(y, F32, None)]))
    assert _weight_shape(model, "conv2") == (2, 6, 1, 1)
    assert any("untracked input" in r for g in groups for r in g.pinned.values())


def test_resize_of_the_channel_axis_and_used_pool_indices_pin() -> None:
    b = Builder()
    h = b.op("Resize", [b.conv("x", 3, 4), "", b.const(np.array([1, 2, 1, 1], np.float32))], mode="nearest")
    y = b.conv(h, 8, 2)
    assert any("resizes the channel axis" in r for r in _pinned_reasons(b.model(X4, [(y, F32, None)])))
    b = Builder()
    pooled, idx = b.op("MaxPool", [b.conv("x", 3, 4)], n_out=2, kernel_shape=[2, 2])
    y = b.conv(pooled, 4, 2)
    reasons = _pinned_reasons(b.model(X4, [(y, F32, None), (idx, onnx.TensorProto.INT64, None)]))
    assert any("second output" in r for r in reasons)
