"""The linear-layer view against ONNX Runtime: for every op form ``features(x) @ rows.T + bias`` is the
layer's output, rows written back are what ORT then computes, shared weights are refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import F32, make_model, run_ort
from onnx import TensorProto, helper

from onnxopt.analysis.layers import Linear, conv_geometry, linear_of, operand_axes

RNG = np.random.default_rng(7)


def _rand(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _layer(model: ir.Model, name: str = "layer") -> Linear:
    node = next(n for n in model.graph if n.name == name)
    layer, reason = linear_of(node)
    assert layer is not None, reason
    return layer


def _predicted(layer: Linear, x: np.ndarray, rows: np.ndarray | None = None,
               bias: np.ndarray | None = None) -> np.ndarray:
    """``features(x) @ rows.T + bias`` (block form for grouped convolutions)."""
    feats = layer.features(x)
    if rows is None:
        dense = layer.dense_weights()
    else:
        dense = np.zeros((rows.shape[0], layer.groups * layer.in_features))
        f = layer.in_features
        for j, g in enumerate(layer.row_groups()):
            dense[j, g * f : (g + 1) * f] = rows[j]
    b = layer.bias_values() if bias is None else bias
    return feats.astype(np.float64) @ dense.T + b


def _run_unfused(model: onnx.ModelProto | ir.Model, x: np.ndarray) -> np.ndarray:
    """ORT without graph rewrites: its optimizer turns DequantizeLinear -> MatMul into a MatMul that
    also quantizes the activation, which is not what the graph says."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _check_reproduces(proto: onnx.ModelProto, x: np.ndarray, *, unfused: bool = False) -> tuple[ir.Model, Linear]:
    y = _run_unfused(proto, x) if unfused else run_ort(proto, {"x": x})[0]
    model = ir.from_proto(proto)
    layer = _layer(model)
    got = _predicted(layer, x)
    want = layer.target(y)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    return model, layer


# ---------------------------------------------------------------------- convolutions
def _conv_model(op: str, w: np.ndarray, x_shape: tuple[int, ...], bias: bool = True, **attrs) -> onnx.ModelProto:
    inits = {"w": w}
    inputs = ["x", "w"]
    channels = w.shape[0] if op == "Conv" else w.shape[1] * attrs.get("group", 1)
    if bias:
        inits["b"] = _rand(channels)
        inputs.append("b")
    node = helper.make_node(op, inputs, ["y"], name="layer", **attrs)
    return make_model([node], [("x", F32, list(x_shape))], [("y", F32, None)], inits)


CONVS = {
    "plain": ((6, 4, 3, 3), (2, 4, 7, 7), {}),
    "groups2": ((6, 2, 3, 3), (2, 4, 7, 7), dict(group=2, pads=[1, 1, 1, 1])),
    "depthwise": ((4, 1, 3, 3), (2, 4, 6, 6), dict(group=4, pads=[1, 0, 1, 2])),
    "dilation": ((5, 3, 3, 2), (1, 3, 9, 8), dict(dilations=[2, 3], pads=[2, 1, 0, 1])),
    "strides": ((5, 3, 3, 3), (2, 3, 9, 8), dict(strides=[2, 3], pads=[0, 1, 1, 0])),
    "same_upper": ((5, 3, 3, 3), (1, 3, 8, 7), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same_lower": ((5, 3, 4, 2), (1, 3, 7, 6), dict(auto_pad="SAME_LOWER", strides=[2, 1])),
    "valid": ((5, 3, 3, 3), (1, 3, 8, 9), dict(auto_pad="VALID", strides=[1, 2], dilations=[1, 2])),
    "conv1d": ((6, 4, 5), (3, 4, 16), dict(strides=[2], pads=[2, 1])),
    "conv1d_same_grouped": ((6, 2, 4), (3, 4, 11), dict(auto_pad="SAME_LOWER", group=2, strides=[2])),
    "conv3d": ((4, 3, 2, 3, 2), (1, 3, 5, 6, 4), dict(strides=[1, 2, 1], pads=[1, 0, 1, 0, 1, 1])),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_rows_reproduce_onnxruntime(case: str) -> None:
    w_shape, x_shape, attrs = CONVS[case]
    _check_reproduces(_conv_model("Conv", _rand(*w_shape), x_shape, **attrs), _rand(*x_shape))


CONV_TRANSPOSES = {
    "plain": ((4, 3, 3, 3), (2, 4, 5, 5), {}),
    "strides_pads": ((4, 3, 3, 2), (1, 4, 5, 6), dict(strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 0])),
    "groups_dilation": ((4, 2, 3, 3), (1, 4, 5, 5), dict(group=2, dilations=[2, 1], strides=[2, 2])),
    "conv1d": ((3, 2, 4), (2, 3, 7), dict(strides=[3], pads=[1, 2])),
}


@pytest.mark.parametrize("case", sorted(CONV_TRANSPOSES))
def test_conv_transpose_rows_reproduce_onnxruntime(case: str) -> None:
    w_shape, x_shape, attrs = CONV_TRANSPOSES[case]
    _check_reproduces(_conv_model("ConvTranspose", _rand(*w_shape), x_shape, **attrs), _rand(*x_shape))


def test_conv_geometry_resolves_auto_pad_like_onnxruntime() -> None:
    # the resolved pads, written as explicit pads, give the same output as ORT's own SAME padding
    w, x = _rand(2, 1, 4, 3), _rand(1, 1, 9, 8)
    for auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        proto = _conv_model("Conv", w, (1, 1, 9, 8), bias=False, auto_pad=auto_pad, strides=[2, 3])
        pads = conv_geometry(ir.from_proto(proto).graph.node(0), w.shape).explicit_pads((9, 8))
        explicit = _conv_model("Conv", w, (1, 1, 9, 8), bias=False, strides=[2, 3], pads=list(pads))
        np.testing.assert_allclose(run_ort(explicit, {"x": x})[0], run_ort(proto, {"x": x})[0], rtol=1e-5, atol=1e-5)
        assert pads != (0, 0, 0, 0)


# ---------------------------------------------------------------------- Gemm and MatMul
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (1,), (5,), (1, 5)])
def test_gemm_rows_reproduce_onnxruntime(trans_a: int, trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    inits = {"w": _rand(5, 6) if trans_b else _rand(6, 5)}
    inputs = ["x", "w"]
    if c_shape is not None:
        inits["c"] = _rand(*c_shape)
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["y"], name="layer", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    x_shape = (6, 4) if trans_a else (4, 6)
    proto = make_model([node], [("x", F32, list(x_shape))], [("y", F32, [4, 5])], inits)
    _, layer = _check_reproduces(proto, _rand(*x_shape))
    assert layer.out_channels == 5 and layer.in_features == 6


@pytest.mark.parametrize("bias_shape", [None, (5,), (1, 1, 5)])
def test_matmul_with_batch_dims_and_bias_add_reproduces_onnxruntime(bias_shape: tuple[int, ...] | None) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if bias_shape else "y"], name="layer")]
    inits = {"w": _rand(6, 5)}
    if bias_shape:
        inits["b"] = _rand(*bias_shape)
        nodes.append(helper.make_node("Add", ["b", "m"], ["y"], name="add"))
    proto = make_model(nodes, [("x", F32, [2, 3, 6])], [("y", F32, None)], inits)
    _, layer = _check_reproduces(proto, _rand(2, 3, 6))
    assert (layer.bias_add is not None) == (bias_shape is not None)
    assert layer.y.name == "y"


# ---------------------------------------------------------------------- quantized weights
def _dq_inputs(name: str, w: np.ndarray, axis: int | None, dtype: type = np.int8) -> tuple[list, dict]:
    """A DequantizeLinear of `w` quantized per tensor (axis None) or along `axis`."""
    info = np.iinfo(dtype)
    if axis is None:
        scale = np.float32(np.abs(w).max() / 100)
        zero = np.asarray(3 if dtype == np.int8 else 128, dtype)
        q = np.clip(np.rint(w / scale) + zero, info.min, info.max).astype(dtype)
        attrs = {}
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = (np.abs(moved).max(axis=1) / 100).astype(np.float32)
        zero = np.zeros(w.shape[axis], dtype)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), info.min, info.max).astype(dtype)
        attrs = {"axis": axis}
    node = helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], **attrs)
    return [node], {f"{name}_q": q, f"{name}_s": np.asarray(scale, np.float32), f"{name}_z": zero}


@pytest.mark.parametrize("axis", [None, 0])
def test_conv_weight_behind_dequantize_linear_reads_and_writes(axis: int | None) -> None:
    nodes, inits = _dq_inputs("w", _rand(6, 4, 3, 3), axis)
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer", pads=[1, 1, 1, 1]))
    inits["b"] = _rand(6)
    proto = make_model(nodes, [("x", F32, [2, 4, 5, 5])], [("y", F32, None)], inits)
    x = _rand(2, 4, 5, 5)
    model, layer = _check_reproduces(proto, x, unfused=True)
    assert layer.weight.quantized and layer.weight.name == "w_q"
    new = layer.weights() * 0.8 + 0.01 * RNG.normal(size=layer.weights().shape)
    assert layer.write(model.graph, weights=new) is None
    stored = layer.roundtrip_weights(new)
    assert np.abs(stored - new).max() <= np.abs(layer.weights()).max() / 100  # within half a step or so
    assert model.graph.initializers["w_q"].const_value.dtype == ir.DataType.INT8
    y = _run_unfused(model, x)
    np.testing.assert_allclose(_predicted(layer, x, stored), layer.target(y), rtol=1e-4, atol=1e-4)


def test_bias_behind_dequantize_linear_reads_and_roundtrips() -> None:
    nodes, inits = _dq_inputs("b", _rand(6), None, np.int8)
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], name="layer"))
    inits["w"] = _rand(6, 4, 1, 1)
    proto = make_model(nodes, [("x", F32, [2, 4, 3, 3])], [("y", F32, None)], inits)
    x = _rand(2, 4, 3, 3)
    model, layer = _check_reproduces(proto, x, unfused=True)
    assert layer.bias is not None and layer.bias.quantized
    wanted = layer.bias_values() + 0.3
    assert layer.write(model.graph, bias=wanted) is None
    got = layer.bias_values()
    np.testing.assert_allclose(got, layer.roundtrip_bias(wanted), rtol=0, atol=1e-12)
    assert np.abs(got - wanted).max() <= float(inits["b_s"]) / 2 + 1e-7
    np.testing.assert_allclose(_predicted(layer, x), layer.target(_run_unfused(model, x)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", [None, 1])
def test_matmul_weight_behind_dequantize_linear_reproduces_onnxruntime(axis: int | None) -> None:
    nodes, inits = _dq_inputs("w", _rand(6, 5), axis, np.uint8 if axis is None else np.int8)
    nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="layer"))
    proto = make_model(nodes, [("x", F32, [3, 6])], [("y", F32, None)], inits)
    _, layer = _check_reproduces(proto, _rand(3, 6), unfused=True)
    q = np.asarray(layer.weight.value.const_value.numpy())
    assert np.array_equal(layer.weight.encode(layer.weight.read()), q)  # reading then storing changes nothing


# ---------------------------------------------------------------------- writing back
@pytest.mark.parametrize("case", ["groups2", "depthwise", "same_upper", "conv1d"])
def test_conv_rows_written_back_are_what_onnxruntime_computes(case: str) -> None:
    w_shape, x_shape, attrs = CONVS[case]
    model = ir.from_proto(_conv_model("Conv", _rand(*w_shape), x_shape, **attrs))
    layer = _layer(model)
    rows, bias = RNG.normal(size=layer.weights().shape), RNG.normal(size=layer.out_channels)
    assert layer.write(model.graph, weights=rows, bias=bias) is None
    assert {"w", "b"} <= set(model.graph.initializers)
    x = _rand(*x_shape)
    y = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(_predicted(layer, x, rows, bias), layer.target(y), rtol=1e-4, atol=1e-4)


def test_conv_transpose_rows_written_back_are_what_onnxruntime_computes() -> None:
    w_shape, x_shape, attrs = CONV_TRANSPOSES["groups_dilation"]
    model = ir.from_proto(_conv_model("ConvTranspose", _rand(*w_shape), x_shape, **attrs))
    layer = _layer(model)
    rows = RNG.normal(size=layer.weights().shape)
    assert layer.write(model.graph, weights=rows) is None
    np.testing.assert_allclose(layer.weights(), rows, rtol=1e-6, atol=1e-6)
    x = _rand(*x_shape)
    y = run_ort(model, {"x": x})[0]
    np.testing.assert_allclose(_predicted(layer, x, rows), layer.target(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [1.3, 0.0])
def test_gemm_write_keeps_alpha_and_beta_and_broadcasts_a_scalar_c(beta: float) -> None:
    inits = {"w": _rand(5, 6), "c": _rand(1)}
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="layer", transB=1, alpha=0.5, beta=beta)
    model = ir.from_proto(make_model([node], [("x", F32, [4, 6])], [("y", F32, [4, 5])], inits))
    layer = _layer(model)
    rows, bias = RNG.normal(size=(5, 6)), RNG.normal(size=5)
    assert layer.write(model.graph, weights=rows, bias=bias) is None
    assert model.graph.node(0).attributes.get_float("alpha") == 0.5
    assert list(model.graph.initializers["c"].const_value.shape) == [5]
    x = _rand(4, 6)
    np.testing.assert_allclose(_predicted(layer, x, rows, bias), run_ort(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_bias_is_created_where_the_layer_had_none() -> None:
    # a Conv gets a bias input; a MatMul whose output is a graph output gets an Add that takes over the name
    conv = helper.make_node("Conv", ["x", "wc"], ["h"], name="conv")
    flat = helper.make_node("Flatten", ["h"], ["f"], name="flat")
    mm = helper.make_node("MatMul", ["f", "wm"], ["y"], name="layer")
    inits = {"wc": _rand(3, 2, 3, 3), "wm": _rand(27, 4)}
    model = ir.from_proto(make_model([conv, flat, mm], [("x", F32, [2, 2, 5, 5])], [("y", F32, [2, 4])], inits))
    x = _rand(2, 2, 5, 5)
    before = run_ort(model, {"x": x})[0]
    conv_layer, mm_layer = _layer(model, "conv"), _layer(model, "layer")
    assert conv_layer.write(model.graph, bias=np.full(3, 0.5)) is None
    assert mm_layer.write(model.graph, bias=np.arange(4.0)) is None
    assert mm_layer.bias_add is not None and mm_layer.y.name == "y"
    assert [v.name for v in model.graph.outputs] == ["y"]
    after = run_ort(model, {"x": x})[0]
    relu_free = before + np.arange(4.0) + 0.5 * inits["wm"].sum(axis=0)  # the conv bias flows through Flatten
    np.testing.assert_allclose(after, relu_free, rtol=1e-4, atol=1e-4)


def test_shared_weight_is_refused_with_a_reason_or_copied_on_request() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="layer"),
             helper.make_node("MatMul", ["x", "w"], ["b"], name="other")]
    model = ir.from_proto(make_model(nodes, [("x", F32, [3, 4])], [("a", F32, [3, 4]), ("b", F32, [3, 4])],
                                     {"w": _rand(4, 4)}))
    x = _rand(3, 4)
    before = run_ort(model, {"x": x})
    layer = _layer(model)
    assert "shared" in (layer.weight.shared() or "")
    reason = layer.write(model.graph, weights=np.zeros((4, 4)))
    assert reason is not None and "shared" in reason
    np.testing.assert_array_equal(run_ort(model, {"x": x})[1], before[1])
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], before[0])
    assert layer.write(model.graph, weights=np.zeros((4, 4)), copy_shared=True) is None
    after = run_ort(model, {"x": x})
    assert not after[0].any() and np.array_equal(after[1], before[1])
    assert model.graph.initializers["w"].const_value is not None and layer.weight.name != "w"


def test_layers_it_cannot_read_give_reasons() -> None:
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["a"], name="act"),
             helper.make_node("Gemm", ["x", "w"], ["b"], name="gemm3d"),
             helper.make_node("Relu", ["x"], ["c"], name="relu")]
    proto = make_model(nodes, [("x", F32, [4, 4]), ("x2", F32, [4, 4])],
                       [("a", F32, None), ("b", F32, None), ("c", F32, None)], {"w": _rand(4, 4)})
    model = ir.from_proto(proto)
    by_name = {n.name: n for n in model.graph}
    assert "not a constant" in (linear_of(by_name["act"])[1] or "")
    assert linear_of(by_name["relu"]) == (None, None)
    assert linear_of(by_name["gemm3d"])[0] is not None
    int_w = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")],
                       [("x", TensorProto.INT32, [2, 3])], [("y", TensorProto.INT32, None)],
                       {"w": np.ones((3, 2), np.int32)})
    assert "not a float" in (linear_of(ir.from_proto(int_w).graph.node(0))[1] or "")


# ---------------------------------------------------------------------- operand axes
@pytest.mark.parametrize("case", ["conv", "conv_transpose", "gemm_tb", "gemm_ta", "matmul_right", "matmul_left"])
def test_operand_axes_match_the_shapes_onnxruntime_computes(case: str) -> None:
    specs = {
        "conv": ("Conv", ["x", "w"], (2, 3, 5, 5), (4, 3, 3, 3), {}),
        "conv_transpose": ("ConvTranspose", ["x", "w"], (2, 3, 5, 5), (3, 4, 3, 3), {}),
        "gemm_tb": ("Gemm", ["x", "w"], (2, 6), (4, 6), dict(transB=1)),
        "gemm_ta": ("Gemm", ["x", "w"], (6, 2), (6, 4), dict(transA=1)),
        "matmul_right": ("MatMul", ["x", "w"], (2, 3, 6), (6, 4), {}),
        "matmul_left": ("MatMul", ["w", "x"], (2, 6, 3), (4, 6), {}),
    }
    op, inputs, x_shape, w_shape, attrs = specs[case]
    proto = make_model([helper.make_node(op, inputs, ["y"], name="layer", **attrs)],
                       [("x", F32, list(x_shape))], [("y", F32, None)], {"w": _rand(*w_shape)})
    y = run_ort(proto, {"x": _rand(*x_shape)})[0]
    axes, reason = operand_axes(ir.from_proto(proto).graph.node(0))
    assert axes is not None, reason
    assert inputs[axes.weight] == "w" and inputs[axes.activation] == "x"
    assert w_shape[axes.reduction_axis] == x_shape[axes.feature_axis]
    out_axis = {"matmul_left": -2, "matmul_right": -1, "gemm_tb": 1, "gemm_ta": 1}.get(case, 1)
    assert w_shape[axes.output_axis] == y.shape[out_axis]
