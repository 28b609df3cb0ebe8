"""Static quantization inside If branches: each branch a calibration feed takes is quantized as a model of its
own and grafted back (weights inside the branch, read from the main graph, or in Constant nodes; a nested If;
new names that the main graph already uses); a branch no feed takes stays float and the pass says so."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from helpers import F32, run_ort
from onnx import TensorProto, helper, numpy_helper

from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.graph import iter_graphs
from onnxopt.registry import make_pass

RNG = np.random.default_rng(3)
MECHANICS = {"fallback": "none", "require_speedup": False}


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _conv(x: str, w: str, y: str, name: str) -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [y], name=name, pads=[1, 1, 1, 1])


def _branchy() -> onnx.ModelProto:
    """y = If(mode == 1): then: conv(inner weight) -> relu -> conv(weight of the main graph) -> nested If on the
    same condition, whose branches hold a conv with a Constant-node weight; else: one conv. The main graph also
    holds a tensor named ``x_quantized``, a name the branch's rewrite would give its input."""
    nested_then = helper.make_graph(
        [helper.make_node("Constant", [], ["wn"], value=numpy_helper.from_array(_w(4, 4, 3, 3), "wn")),
         _conv("t2", "wn", "n_out", "nested_conv")],
        "nested_then", [], [helper.make_tensor_value_info("n_out", F32, None)])
    nested_else = helper.make_graph([helper.make_node("Identity", ["t2"], ["n_id"])], "nested_else", [],
                                    [helper.make_tensor_value_info("n_id", F32, None)])
    then = helper.make_graph(
        [_conv("x", "w_in", "t0", "then_conv1"), helper.make_node("Relu", ["t0"], ["t1"], name="then_relu"),
         _conv("t1", "w_outer", "t2", "then_conv2"),
         helper.make_node("If", ["cond"], ["t3"], name="nested_if", then_branch=nested_then,
                          else_branch=nested_else)],
        "then", [], [helper.make_tensor_value_info("t3", F32, None)],
        initializer=[numpy_helper.from_array(_w(4, 3, 3, 3), "w_in")])
    other = helper.make_graph([_conv("x", "w_else", "e0", "else_conv")], "else", [],
                              [helper.make_tensor_value_info("e0", F32, None)],
                              initializer=[numpy_helper.from_array(_w(4, 3, 3, 3), "w_else")])
    graph = helper.make_graph(
        [helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
         helper.make_node("Identity", ["x"], ["x_quantized"], name="keep")],
        "branchy",
        [helper.make_tensor_value_info("x", F32, [1, 3, 12, 12]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", F32, [1, 4, 12, 12]),
         helper.make_tensor_value_info("x_quantized", F32, [1, 3, 12, 12])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "one"),
                     numpy_helper.from_array(_w(4, 4, 3, 3), "w_outer")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _feeds(modes: list[int]) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((1, 3, 12, 12)).astype(np.float32), "mode": np.array([m], np.int64)}
            for m in modes]


def _quantize(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **options: object):
    model = ir.from_proto(proto)
    calib = load_data(feeds, input_specs(model))
    stats = make_pass("quantize", {**MECHANICS, **options}).call(model, Context(calib=calib))
    return model, stats


def _branch(model: ir.Model, name: str) -> ir.Graph:
    node = next(n for n in model.graph if n.op_type == "If")
    return node.attributes[name].value


def _ops(graph: ir.Graph) -> list[str]:
    return [n.op_type for g in iter_graphs(graph) for n in g]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_branch_the_feeds_take_is_quantized_and_the_other_stays_float() -> None:
    proto = _branchy()
    model, stats = _quantize(proto, _feeds([1] * 6))
    assert stats.modified and stats.summary["if_branches_quantized"] == 1
    then_ops, else_ops = _ops(_branch(model, "then_branch")), _ops(_branch(model, "else_branch"))
    int8_weights = [v for g in iter_graphs(_branch(model, "then_branch")) for v in g.initializers.values()
                    if v.dtype == ir.DataType.INT8 and len(v.shape) == 4]
    assert then_ops.count("QuantizeLinear") >= 3 and len(int8_weights) == 3  # the nested If's conv's weight too
    assert "QuantizeLinear" not in else_ops
    assert any("else_branch: no calibration feed takes this branch; left float" in n for n in stats.notes)
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)  # SSA across scopes: the renamed x_quantized
    # No copy of the main graph's weight stays in the branch: it is read from outside or quantized.
    assert "w_outer" not in _branch(model, "then_branch").initializers and "w_outer" not in model.graph.initializers
    nested = next(n for n in _branch(model, "then_branch") if n.op_type == "If")
    assert "QuantizeLinear" in _ops(nested.attributes["then_branch"].value)
    for feed in _feeds([1, 1, 1, 0]):
        ref, out = run_ort(proto, feed), run_ort(written, feed)
        assert _cosine(ref[0], out[0]) > 0.99
        np.testing.assert_array_equal(ref[1], out[1])
        if feed["mode"][0] == 0:  # the float branch is the branch as given
            np.testing.assert_array_equal(ref[0], out[0])


def test_feeds_taking_both_branches_quantize_both() -> None:
    model, stats = _quantize(_branchy(), _feeds([1, 0, 1, 0, 1, 0]))
    assert stats.summary["if_branches_quantized"] == 2
    assert "QuantizeLinear" in _ops(_branch(model, "else_branch"))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_a_branch_whose_int8_is_slower_stays_float(monkeypatch) -> None:
    from onnxopt.passes.quantize import speed

    slower = speed.SpeedComparison(ratio=1.4, low=1.35, high=1.45, rounds=7, ms_a=1.0, ms_b=1.4, seconds=0.1)
    monkeypatch.setattr(speed, "measure", lambda *a, **k: slower)
    proto = _branchy()
    model, stats = _quantize(proto, _feeds([1] * 4), require_speedup=True)
    assert not stats.modified
    assert "QuantizeLinear" not in _ops(_branch(model, "then_branch"))
    assert any("then_branch: int8 is not faster" in n for n in stats.notes)


def test_a_main_graph_weight_changed_inside_the_branch_stays_a_copy() -> None:
    """conv -> BatchNormalization inside the branch, the conv reading a weight of the main graph and kept float:
    the fold changes the branch's copy of that weight (same name); the graft keeps the changed copy, renamed,
    instead of wiring the conv back to the original weight."""
    w, scale = _w(4, 3, 3, 3), np.linspace(0.5, 2.0, 4).astype(np.float32)
    stats_bn = ((scale, "bn_s"), (np.full(4, 0.1, np.float32), "bn_b"), (np.zeros(4, np.float32), "bn_m"),
                (np.ones(4, np.float32), "bn_v"))
    bn = [numpy_helper.from_array(a, n) for a, n in stats_bn]
    then = helper.make_graph(
        [_conv("x", "w_outer", "c", "conv"),
         helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["b"], name="bn"),
         _conv("b", "w_in", "t", "conv_in")],
        "then", [], [helper.make_tensor_value_info("t", F32, None)],
        initializer=[*bn, numpy_helper.from_array(_w(4, 4, 3, 3), "w_in")])
    other = helper.make_graph([_conv("x", "w_outer", "e", "else_conv")], "else", [],
                              [helper.make_tensor_value_info("e", F32, None)])
    graph = helper.make_graph(
        [helper.make_node("Equal", ["mode", "one"], ["cond"], name="is_one"),
         helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other),
         _conv("x", "w_outer", "z", "main_conv")],
        "bn_branch",
        [helper.make_tensor_value_info("x", F32, [1, 3, 12, 12]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info(n, F32, [1, 4, 12, 12]) for n in ("y", "z")],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(w, "w_outer")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, stats = _quantize(proto, _feeds([1] * 4), exclude=["conv", "main_conv"])
    assert stats.summary["if_branches_quantized"] == 1
    written = ir.to_proto(model)
    onnx.checker.check_model(written, full_check=True)
    for feed in _feeds([1, 1]):
        ref, out = run_ort(proto, feed), run_ort(written, feed)
        assert _cosine(ref[0], out[0]) > 0.999
        np.testing.assert_array_equal(ref[1], out[1])


def test_float_nodes_pinned_in_branches_are_kept_float_and_only_unknown_names_are_said() -> None:
    """A pinned set names nodes of the main graph and of If branches (each branch has its own run); a name is
    reported as matching nothing once, and only when no graph has it, not by every run that lacks it."""
    model, stats = _quantize(_branchy(), _feeds([1, 0, 1, 0, 1, 0]),
                             float_nodes=["then_conv2", "else_conv", "nested_conv", "nope"])
    said = [n for n in stats.notes if "match no node" in n]
    assert len(said) == 1 and "1 name(s)" in said[0] and "'nope'" in said[0]
    then, other = _branch(model, "then_branch"), _branch(model, "else_branch")
    assert {n.name for n in then if n.op_type == "Conv"} >= {"then_conv2"}
    assert not any(n.op_type == "QuantizeLinear" for n in other)  # its one conv pinned: nothing left to quantize
    nested = next(n for n in then if n.op_type == "If")
    assert "QuantizeLinear" not in _ops(nested.attributes["then_branch"].value)
    assert "QuantizeLinear" in _ops(then)  # the branch's first conv is still int8
    # the same pass run again (tune reuses a configured pass) says it again: nothing carries over between runs
    feeds = _feeds([1, 0, 1, 0])
    again = make_pass("quantize", {**MECHANICS, "float_nodes": ["then_conv2", "nope"]})
    for _ in range(2):
        model = ir.from_proto(_branchy())
        notes = again.call(model, Context(calib=load_data(feeds, input_specs(model)))).notes
        assert sum("match no node" in n for n in notes) == 1
