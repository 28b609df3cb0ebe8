"""float16 models: in static and dynamic mode widened to float32, quantized, inputs and outputs kept float16 (a
static model written back as given when int8 is not faster); in weight-only mode quantized as float16."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from helpers import run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.registry import make_pass

RNG = np.random.default_rng(11)
H16 = TensorProto.FLOAT16


def _half_cnn() -> onnx.ModelProto:
    """conv -> relu -> conv -> Add(Constant) -> Softmax, all float16 (weights, a Constant node, input, output),
    with an int64 -> float16 Cast feeding the Add as tf2onnx writes masks."""
    w1 = (RNG.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float16)
    w2 = (RNG.standard_normal((4, 8, 3, 3)) * 0.3).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.ones(1, np.int64), "k")),
        helper.make_node("Cast", ["k"], ["kh"], name="cast", to=H16),
        helper.make_node("Add", ["c", "kh"], ["s"], name="add"),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", H16, [1, 3, 10, 10])],
                              [helper.make_tensor_value_info("y", H16, [1, 4, 10, 10])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((1, 3, 10, 10)).astype(np.float16)} for _ in range(n)]


def _quantize(proto: onnx.ModelProto, **options: object):
    model = ir.from_proto(proto)
    calib = load_data(_feeds(6), input_specs(model))
    stats = make_pass("quantize", {"fallback": "none", "require_speedup": False, **options}).call(
        model, Context(calib=calib))
    return model, stats


def test_a_float16_model_is_quantized_with_its_float16_interface() -> None:
    proto = _half_cnn()
    model, stats = _quantize(proto)
    assert stats.modified and stats.summary["float16_widened"] == 2 and stats.summary["quantized_nodes"] >= 2
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    assert [(v.name, v.type.tensor_type.elem_type) for v in written.graph.input] == [("x", H16)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in written.graph.output] == [("y", H16)]
    assert not any(i.data_type == H16 for i in written.graph.initializer)
    assert sum(n.op_type == "QuantizeLinear" for n in written.graph.node) >= 2
    for feed in _feeds(3):
        ref, out = run_ort(proto, feed)[0], run_ort(written, feed)[0]
        assert out.dtype == np.float16
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


def test_a_float16_model_whose_int8_is_slower_comes_back_as_given(monkeypatch) -> None:
    from onnxopt.passes.quantize import speed

    slower = speed.SpeedComparison(ratio=1.4, low=1.35, high=1.45, rounds=7, ms_a=1.0, ms_b=1.4, seconds=0.1)
    monkeypatch.setattr(speed, "measure", lambda *a, **k: slower)
    proto = _half_cnn()
    model, stats = _quantize(proto, require_speedup=True)
    assert not stats.modified and "float16_widened" in stats.summary
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)  # the copy given back kept its float16 types
    assert {i.name: i.data_type for i in written.graph.initializer} == {"w1": H16, "w2": H16}
    feed = _feeds(1)[0]
    np.testing.assert_array_equal(run_ort(proto, feed)[0], run_ort(written, feed)[0])


def test_a_dtype_set_on_a_clone_leaves_the_original_alone() -> None:
    """onnx_ir's clones share type objects: `set_dtype` replaces the type, where ``value.dtype = ...`` would
    change both copies (what broke the float16 model the speed check gives back)."""
    from onnxopt.graph import set_dtype

    model = ir.from_proto(_half_cnn())
    copy = model.clone()
    assert copy.graph.inputs[0].type is model.graph.inputs[0].type  # the hazard, as onnx_ir has it
    set_dtype(copy.graph.inputs[0], ir.DataType.FLOAT)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16 and copy.graph.inputs[0].dtype == ir.DataType.FLOAT


def _half_encoder() -> onnx.ModelProto:
    """An embedding Gather on a [1024, 64] float16 table -> MatMul -> Add -> Relu -> MatMul, all float16 (token ids
    in, float16 out): the layers dynamic and weight-only modes quantize."""
    table = (RNG.standard_normal((1024, 64)) * 0.5).astype(np.float16)
    w1 = (RNG.standard_normal((64, 128)) * 0.1).astype(np.float16)
    b1 = (RNG.standard_normal(128) * 0.1).astype(np.float16)
    w2 = (RNG.standard_normal((128, 32)) * 0.1).astype(np.float16)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
        helper.make_node("MatMul", ["e", "w1"], ["a"], name="mm1"),
        helper.make_node("Add", ["a", "b1"], ["ab"], name="bias"),
        helper.make_node("Relu", ["ab"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "half_encoder", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
                              [helper.make_tensor_value_info("y", H16, [1, 16, 32])],
                              [numpy_helper.from_array(a, n) for a, n in
                               ((table, "table"), (w1, "w1"), (b1, "b1"), (w2, "w2"))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _half_close(proto: onnx.ModelProto, written: onnx.ModelProto, cosine: float) -> None:
    for _ in range(3):
        feed = {"ids": RNG.integers(0, 1024, size=(1, 16)).astype(np.int64)}
        ref, out = run_ort(proto, feed)[0], run_ort(written, feed)[0]
        assert out.dtype == np.float16
        a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > cosine


def test_weight_only_quantizes_a_float16_model_in_float16() -> None:
    """MatMulNBits computes in its input's type: the MatMuls of a float16 model get float16 scales and the model
    stays float16 inside (no float32 copy of its weights); the embedding table's rows come back float16."""
    proto = _half_encoder()
    model = ir.from_proto(proto)
    # 8-bit blocks: close enough to the float16 model that a wrong scale type or layout shows
    stats = make_pass("quantize", {"mode": "weight-only", "bits": 8, "require_speedup": False}).call(model, Context())
    assert stats.summary["quantized_nodes"] == 2 and stats.summary["embeddings_quantized"] == 1
    assert "float16_widened" not in stats.summary
    assert stats.summary["weight_bytes_after"] < 0.6 * stats.summary["weight_bytes_before"]  # 8 of 16 bits
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    assert sum(n.op_type == "MatMulNBits" for n in written.graph.node) == 2
    assert not any(i.data_type == TensorProto.FLOAT for i in written.graph.initializer)
    _half_close(proto, written, 0.999)


def test_dynamic_mode_quantizes_a_float16_model_through_float32() -> None:
    """DynamicQuantizeLinear reads float32: a float16 model is widened first (exact), quantized, and keeps its
    float16 interface; its weights before are counted as given (float16), not as the widened copy."""
    proto = _half_encoder()
    model = ir.from_proto(proto)
    given = sum(i.raw_data.__len__() for i in proto.graph.initializer)
    stats = make_pass("quantize", {"mode": "dynamic", "require_speedup": False}).call(model, Context())
    assert stats.summary["float16_widened"] == 4 and stats.summary["quantized_nodes"] == 2
    assert stats.summary["weight_bytes_before"] == given
    assert stats.summary["weight_bytes_after"] < 0.6 * given
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    assert [(v.name, v.type.tensor_type.elem_type) for v in written.graph.output] == [("y", H16)]
    assert sum(n.op_type == "DynamicQuantizeLinear" for n in written.graph.node) == 2
    _half_close(proto, written, 0.99)


def test_a_float16_model_with_nothing_to_quantize_comes_back_as_given_without_a_widening_note() -> None:
    """Dynamic mode widens a float16 model before looking at its layers; a CNN has none it quantizes (Conv is
    not dynamic by default), so the model given comes back float16 and no note says it was quantized from
    float32."""
    proto = _half_cnn()
    model = ir.from_proto(proto)
    stats = make_pass("quantize", {"mode": "dynamic"}).call(model, Context())
    assert not stats.modified and "float16_widened" not in stats.summary
    assert not any("float16 model" in n for n in stats.notes)
    assert any("nothing quantized" in n for n in stats.notes)
    written = ir.to_proto(model)
    assert {i.name: i.data_type for i in written.graph.initializer} == {"w1": H16, "w2": H16}
