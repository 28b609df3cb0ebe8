"""fold: each rewrite case checked against ONNX Runtime to float rounding, idempotence, guards."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes
import pytest
from helpers import F32, I64, MODELS, assert_same_outputs, make_model, run_ort
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.context import Context
from onnxopt.errors import UsageError
from onnxopt.registry import make_pass

NEWEST = onnx.defs.onnx_opset_version()
RNG = np.random.default_rng(0)


def _fold(proto: onnx.ModelProto, **options) -> tuple[ir.Model, onnxopt.PassStats]:
    model = ir.from_proto(proto)
    stats = make_pass("fold", options).call(model, Context())
    return model, stats


def _ops(model: ir.Model | onnx.ModelProto) -> list[str]:
    if isinstance(model, ir.Model):
        return [n.op_type for n in model.graph]
    return [n.op_type for n in model.graph.node]


def _bn_inits(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.g": RNG.uniform(0.5, 1.5, c).astype(np.float32),
        f"{prefix}.b": RNG.normal(0, 0.5, c).astype(np.float32),
        f"{prefix}.m": RNG.normal(0, 0.5, c).astype(np.float32),
        f"{prefix}.v": RNG.uniform(0.5, 2.0, c).astype(np.float32),
    }


def _bn(x: str, y: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}.g", f"{prefix}.b", f"{prefix}.m", f"{prefix}.v"],
                            [y], name=prefix, epsilon=1e-3)


def _conv_bn_model(opset: int) -> onnx.ModelProto:
    inits = {"w": RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), **_bn_inits("bn", 4)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        _bn("c", "b", "bn"),
        helper.make_node("Identity", ["b"], ["i"], name="ident"),
        helper.make_node("Relu", ["i"], ["y"], name="relu"),
    ]
    return make_model(nodes, [("x", F32, ["N", 3, 6, 6])], [("y", F32, ["N", 4, 6, 6])], inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13, 17, 21, NEWEST])
def test_conv_batchnorm_identity_folded_exactly_across_opsets(opset: int) -> None:
    proto = _conv_bn_model(opset)
    model, stats = _fold(proto)
    assert _ops(model) == ["Conv", "Relu"]
    assert stats.summary["batchnorm_folded"] == 1
    x = RNG.normal(size=(2, 3, 6, 6)).astype(np.float32)
    assert_same_outputs(proto, model, {"x": x})
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_digits_cnn_fold_is_exact_idempotent_and_keeps_names() -> None:
    proto = onnx.load(str(MODELS / "digits_cnn.onnx"))
    model, stats = _fold(proto)
    ops = _ops(model)
    assert "BatchNormalization" not in ops and "Dropout" not in ops
    assert stats.summary["batchnorm_folded"] == sum(1 for n in proto.graph.node if n.op_type == "BatchNormalization")
    # The BN outputs keep their names (now produced by the convs); graph I/O unchanged.
    names = {o.name for n in model.graph for o in n.outputs}
    assert "stem.bn.out" in names
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert [v.name for v in model.graph.outputs] == ["logits"]
    with np.load(MODELS / "digits_eval.npz") as d:
        x = d["input"][:64]
    assert_same_outputs(proto, model, {"input": x}, rtol=1e-4, atol=1e-5)
    second = make_pass("fold").call(model, Context())
    assert not second.modified
    assert len(model.graph) == len(ops)


def test_conv_transpose_grouped_batchnorm() -> None:
    inits = {"w": RNG.normal(0, 0.3, (4, 3, 2, 2)).astype(np.float32),
             "bias": RNG.normal(0, 0.1, 6).astype(np.float32), **_bn_inits("bn", 6)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "bias"], ["c"], name="ct", group=2, strides=[2, 2]),
             _bn("c", "y", "bn")]
    proto = make_model(nodes, [("x", F32, [1, 4, 3, 3])], [("y", F32, [1, 6, 6, 6])], inits)
    model, _ = _fold(proto)
    assert _ops(model) == ["ConvTranspose"]
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_batchnorm_with_alpha_beta(trans_b: int) -> None:
    w = RNG.normal(0, 0.3, (5, 8) if trans_b else (8, 5)).astype(np.float32)
    inits = {"w": w, "c": RNG.normal(0, 0.1, 5).astype(np.float32), **_bn_inits("bn", 5)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", transB=trans_b, alpha=0.7, beta=1.3),
             _bn("g", "y", "bn")]
    proto = make_model(nodes, [("x", F32, ["N", 8])], [("y", F32, ["N", 5])], inits)
    model, _ = _fold(proto)
    assert _ops(model) == ["Gemm"]
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(3, 8)).astype(np.float32)})


def test_matmul_batchnorm_gets_a_bias_add() -> None:
    inits = {"w": RNG.normal(0, 0.3, (8, 5)).astype(np.float32), **_bn_inits("bn", 5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["g"], name="mm"), _bn("g", "y", "bn")]
    proto = make_model(nodes, [("x", F32, [4, 8])], [("y", F32, [4, 5])], inits)
    model, _ = _fold(proto)
    assert _ops(model) == ["MatMul", "Add"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(4, 8)).astype(np.float32)})


def test_shared_weight_is_not_folded_and_reason_given() -> None:
    inits = {"w": RNG.normal(0, 0.3, (3, 3, 1, 1)).astype(np.float32), **_bn_inits("bn1", 3), **_bn_inits("bn2", 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="c1"),
        _bn("a", "a2", "bn1"),
        helper.make_node("Conv", ["a2", "w"], ["b"], name="c2"),
        _bn("b", "y", "bn2"),
    ]
    proto = make_model(nodes, [("x", F32, [1, 3, 4, 4])], [("y", F32, [1, 3, 4, 4])], inits)
    model, stats = _fold(proto)
    assert _ops(model).count("BatchNormalization") == 2
    assert any("shared" in s["reason"] for s in stats.skipped)
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_weights_in_constant_nodes_are_lifted_then_folded() -> None:
    w = RNG.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)
    bn = _bn_inits("bn", 4)
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))]
    nodes += [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in bn.items()]
    nodes += [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), _bn("c", "y", "bn")]
    proto = make_model(nodes, [("x", F32, [1, 3, 4, 4])], [("y", F32, [1, 4, 4, 4])], opset=11)
    model, stats = _fold(proto)
    assert _ops(model) == ["Conv"]
    assert "w" in model.graph.initializers
    assert stats.summary["constants_lifted"] == 5
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)})


def test_shape_arithmetic_folds_for_static_shapes_only() -> None:
    # Reshape target computed from Shape -> Gather -> Unsqueeze -> Concat, as exporters write it.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    static = make_model(nodes, [("x", F32, [2, 3, 4])], [("y", F32, [2, 12])], inits, opset=13)
    model, _ = _fold(static)
    assert _ops(model) == ["Reshape"]
    x = RNG.normal(size=(2, 3, 4)).astype(np.float32)
    assert_same_outputs(static, model, {"x": x})
    dynamic = make_model(nodes, [("x", F32, ["N", 3, 4])], [("y", F32, ["N", 12])], inits, opset=13)
    model, _ = _fold(dynamic)
    assert "Shape" in _ops(model)  # batch is dynamic: the shape must stay computed at run time
    assert_same_outputs(dynamic, model, {"x": RNG.normal(size=(5, 3, 4)).astype(np.float32)})


def test_fold_size_cap_and_growth_guard() -> None:
    nodes = [
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"], value=helper.make_tensor("v", F32, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w32"], ["m"]),
        helper.make_node("Add", ["m", "s"], ["y"]),
    ]
    inits = {"big_shape": np.array([4096, 4096], np.int64),
             "w16": RNG.normal(size=(256, 256)).astype(np.float16)}
    proto = make_model(nodes, [("x", F32, [1, 256])], [("y", F32, [1, 256])], inits, opset=13)
    model, stats = _fold(proto, max_fold_mb=8.0)
    ops = _ops(model)
    assert "ConstantOfShape" in ops  # 64 MB fp32 tensor over the 8 MB cap
    assert "Cast" in ops  # fp16 -> fp32 would double the weight bytes
    reasons = " ".join(s["reason"] for s in stats.skipped)
    assert "max_fold_mb" in reasons and "grow" in reasons
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 256)).astype(np.float32)}, rtol=1e-4, atol=1e-2)


def test_if_subgraphs_are_folded_and_model_stays_valid() -> None:
    def branch(name: str, scale: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_k"], value=helper.make_tensor("k", F32, [1], [scale])),
             helper.make_node("Identity", [f"{name}_k"], [f"{name}_k2"]),
             helper.make_node("Mul", ["x", f"{name}_k2"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", F32, [2])])

    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", -1.0))]
    proto = make_model(nodes, [("x", F32, [2]), ("cond", TensorProto.BOOL, [])], [("y", F32, [2])], opset=13)
    model, stats = _fold(proto)
    assert stats.modified
    sub = model.graph.node(0).attributes["then_branch"].value
    assert [n.op_type for n in sub] == ["Mul"]
    x = np.array([1.0, -3.0], np.float32)
    for cond in (True, False):
        assert_same_outputs(proto, model, {"x": x, "cond": np.array(cond)})


def test_graph_output_identity_keeps_output_name() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    proto = make_model(nodes, [("x", F32, [3])], [("y", F32, [3])])
    model, _ = _fold(proto)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert _ops(model) == ["Relu"]


def test_dropout_in_training_mode_is_kept() -> None:
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"], seed=1)]
    inits = {"ratio": np.array(0.5, np.float32), "train": np.array(True)}
    proto = make_model(nodes, [("x", F32, [3])], [("y", F32, [3])], inits, opset=13)
    model, _ = _fold(proto)
    assert _ops(model) == ["Dropout"]


def test_duplicate_initializers_are_stored_once() -> None:
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"])]
    proto = make_model(nodes, [("x", F32, [1, 8])], [("y", F32, [1, 8])], {"w1": w, "w2": w.copy()})
    model, stats = _fold(proto)
    assert len(model.graph.initializers) == 1
    assert stats.summary["initializers_deduplicated"] == 1
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 8)).astype(np.float32)})


def test_external_data_model_is_read_never_changed_and_output_matches(tmp_path) -> None:
    src = tmp_path / "ext.onnx"
    m = onnxopt.load(MODELS / "digits_cnn.onnx")
    ir.save(m, src, external_data="ext.onnx.data", size_threshold_bytes=0)
    data_hash = hashlib.sha256((tmp_path / "ext.onnx.data").read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    result = onnxopt.optimize(src, ["fold"], data=str(MODELS / "digits_eval.npz"), output=out)
    result.save(out)
    assert hashlib.sha256((tmp_path / "ext.onnx.data").read_bytes()).hexdigest() == data_hash
    assert result.validation.outputs[0].max_abs < 1e-4
    with np.load(MODELS / "digits_eval.npz") as d:
        x = d["input"][:16]
    np.testing.assert_allclose(run_ort(out, {"input": x})[0], run_ort(src, {"input": x})[0], rtol=1e-4, atol=1e-5)


def test_fold_option_validation() -> None:
    with pytest.raises(UsageError, match="max_fold_mb"):
        make_pass("fold", {"max_fold_mb": "-1"}, from_text=True)


def test_int64_shape_inputs_stay_untouched() -> None:
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    proto = make_model(nodes, [("x", F32, [2, 6]), ("shape", I64, [2])], [("y", F32, [None, None])], {})
    model, stats = _fold(proto)
    assert _ops(model) == ["Reshape"] and not stats.modified


def test_conv_transpose_bias_add_then_batchnorm_fold() -> None:
    # Paddle writes ConvTranspose + Add(bias [1,C,1,1]) + BatchNorm.
    inits = {"w": RNG.normal(0, 0.3, (4, 6, 2, 2)).astype(np.float32),
             "b": RNG.normal(0, 0.3, (1, 6, 1, 1)).astype(np.float32), **_bn_inits("bn", 6)}
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]),
             helper.make_node("Add", ["c", "b"], ["a"]), _bn("a", "y", "bn")]
    proto = make_model(nodes, [("x", F32, [1, 4, 3, 3])], [("y", F32, [1, 6, 6, 6])], inits, opset=12)
    model, stats = _fold(proto)
    assert _ops(model) == ["ConvTranspose"]
    assert stats.summary["bias_adds_folded"] == 1 and stats.summary["batchnorm_folded"] == 1
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)})


def test_nhwc_input_with_transposes_folds_exactly() -> None:
    # TensorFlow exports: NHWC input, Transpose to NCHW, Conv + BN + Relu, Transpose back.
    inits = {"w": RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), **_bn_inits("bn", 8)}
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]), _bn("c", "b", "bn"),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1])]
    proto = make_model(nodes, [("x", F32, ["N", 5, 5, 3])], [("y", F32, ["N", 5, 5, 8])], inits, opset=13)
    model, _ = _fold(proto)
    assert _ops(model) == ["Transpose", "Conv", "Relu", "Transpose"]
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(3, 5, 5, 3)).astype(np.float32)})


def test_transformer_fixture_folds_exactly_for_other_batch_and_seq() -> None:
    proto = onnx.load(str(MODELS / "digits_transformer.onnx"))
    model, _ = _fold(proto)
    assert [v.name for v in model.graph.inputs] == ["input"]
    for batch, seq in ((1, 8), (3, 5), (2, 16)):
        x = RNG.uniform(0, 1, (batch, seq, 8)).astype(np.float32)
        assert_same_outputs(proto, model, {"input": x}, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ regressions from real models
def _if_model(then_nodes: list[onnx.NodeProto], else_nodes: list[onnx.NodeProto], outs: list[str],
              then_inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """x [2, 3] -> r = Relu(x); If(cond) with both branches reading r from the outer scope."""
    def branch(name: str, nodes: list[onnx.NodeProto], suffix: str, inits: dict[str, np.ndarray]) -> onnx.GraphProto:
        outputs = [helper.make_tensor_value_info(o + suffix, F32, [2, 3]) for o in outs]
        return helper.make_graph(nodes, name, [], outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    then_g = branch("then", then_nodes, "_t", then_inits or {})
    else_g = branch("else", else_nodes, "_e", {})
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("If", ["cond"], [f"{o}_out" for o in outs], name="if", then_branch=then_g, else_branch=else_g),
    ]
    return make_model(nodes, [("x", F32, [2, 3]), ("cond", TensorProto.BOOL, [])],
                      [(f"{o}_out", F32, [2, 3]) for o in outs])


def _if_feeds() -> list[dict[str, np.ndarray]]:
    x = RNG.normal(0, 1, (2, 3)).astype(np.float32)
    return [{"x": x, "cond": np.array(c)} for c in (True, False)]


def test_identity_of_an_outer_value_ending_a_subgraph_stays() -> None:
    # Both branches end in Identity(r) of the outer Relu: r cannot become either branch's output.
    proto = _if_model([helper.make_node("Identity", ["r"], ["a_t"], name="it")],
                      [helper.make_node("Identity", ["r"], ["a_e"], name="ie")], ["a"])
    model, stats = _fold(proto)
    assert sorted(s["node"] for s in stats.skipped if "another scope" in s["reason"]) == ["ie", "it"]
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    for feeds in _if_feeds():
        assert_same_outputs(proto, out, feeds, rtol=0, atol=0)


def test_identity_in_a_subgraph_is_removed_when_its_input_is_local() -> None:
    # then: n = Neg(r); o1 = Identity(n); o2 = Identity(n): the first Identity goes (n takes its
    # name), the second stays because n is then already a branch output.
    then_nodes = [helper.make_node("Neg", ["r"], ["n"], name="neg"),
                  helper.make_node("Identity", ["n"], ["a_t"], name="i1"),
                  helper.make_node("Identity", ["n"], ["b_t"], name="i2")]
    else_nodes = [helper.make_node("Abs", ["r"], ["a_e"], name="abs"), helper.make_node("Neg", ["r"], ["b_e"])]
    proto = _if_model(then_nodes, else_nodes, ["a", "b"])
    model, stats = _fold(proto)
    then_g = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].value
    assert [n.op_type for n in then_g] == ["Neg", "Identity"]
    assert [v.name for v in then_g.outputs] == ["a_t", "b_t"]
    assert stats.summary["identity_removed"] == 1
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    for feeds in _if_feeds():
        assert_same_outputs(proto, out, feeds, rtol=0, atol=0)


def test_unused_subgraph_initializers_are_dropped() -> None:
    then_nodes = [helper.make_node("Add", ["r", "one"], ["a_t"], name="add")]
    else_nodes = [helper.make_node("Neg", ["r"], ["a_e"], name="neg")]
    proto = _if_model(then_nodes, else_nodes, ["a"],
                      then_inits={"one": np.ones((2, 3), np.float32), "unused": np.zeros(7, np.float32)})
    model, _ = _fold(proto)
    then_g = next(n for n in model.graph if n.op_type == "If").attributes["then_branch"].value
    assert sorted(then_g.initializers) == ["one"]
    for feeds in _if_feeds():
        assert_same_outputs(proto, ir.to_proto(model), feeds, rtol=0, atol=0)


def test_folded_transpose_is_stored_contiguous_and_deduplicated() -> None:
    # Transpose(w) folds to a strided view; hashing it for deduplication needs contiguous data.
    w = RNG.normal(0, 1, (3, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "wt2"], ["b"], name="mm2"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    proto = make_model(nodes, [("x", F32, [2, 4])], [("y", F32, [2, 3])], {"w": w, "wt2": np.ascontiguousarray(w.T)})
    model, stats = _fold(proto)
    assert "Transpose" not in _ops(model)
    assert stats.summary["initializers_deduplicated"] == 1
    assert_same_outputs(proto, ir.to_proto(model), {"x": RNG.normal(0, 1, (2, 4)).astype(np.float32)})


def test_declared_output_shapes_survive_shape_inference() -> None:
    # Inference would refine y's symbolic middle dim to 1; the model's interface must not change.
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    proto = make_model(nodes, [("x", F32, [1, 1, 4])], [("y", F32, [1, "n", 4])])
    model, stats = _fold(proto)
    assert stats.modified
    assert list(model.graph.outputs[0].shape) == [1, ir.SymbolicDim("n"), 4]


def test_nothing_to_fold_says_so() -> None:
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", F32, [2])], [("y", F32, [2])])
    model, stats = _fold(proto)
    assert not stats.modified
    assert stats.notes and "nothing to fold" in stats.notes[0]


def test_many_small_folds_cannot_add_up_to_a_bigger_model() -> None:
    # Six overlapping Slices of a weight that a MatMul still reads: folding them would add 192 KB
    # (32 KB each, so a per-node allowance of 64 KB would let all of them through).
    w = RNG.normal(size=(256, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm")]
    inits: dict[str, np.ndarray] = {"w": w, "axes": np.array([0], np.int64)}
    outs = ["y0"]
    for k in range(6):
        inits[f"s{k}"], inits[f"e{k}"] = np.array([16 * k], np.int64), np.array([16 * k + 128], np.int64)
        nodes += [helper.make_node("Slice", ["w", f"s{k}", f"e{k}", "axes"], [f"w{k}"], name=f"slice{k}"),
                  helper.make_node("MatMul", ["x2", f"w{k}"], [f"y{k + 1}"], name=f"mm{k}")]
        outs.append(f"y{k + 1}")
    nodes.append(helper.make_node("Sum", outs, ["y"], name="sum"))
    proto = make_model(nodes, [("x", F32, [2, 256]), ("x2", F32, [2, 128])], [("y", F32, [2, 64])], inits)
    model, stats = _fold(proto)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert weight_bytes <= sum(a.nbytes for a in inits.values()) + 4 * 1024
    assert _ops(model).count("Slice") == 6
    assert sum("grow" in s["reason"] for s in stats.skipped) == 6
    assert not _fold(ir.to_proto(model))[1].modified  # idempotent: the same decision again
    feed = {"x": RNG.normal(size=(2, 256)).astype(np.float32), "x2": RNG.normal(size=(2, 128)).astype(np.float32)}
    assert_same_outputs(proto, model, feed)


def test_slices_that_together_cover_a_weight_fold() -> None:
    # LSTM exports reorder gates by slicing one weight into pieces and concatenating them: once every
    # piece folds the weight is freed, so the fold is taken although each piece alone would grow.
    w = RNG.normal(size=(256, 64)).astype(np.float32)
    inits: dict[str, np.ndarray] = {"w": w, "axes": np.array([0], np.int64)}
    nodes, parts = [], []
    for k, (a, b) in enumerate([(0, 64), (128, 256), (64, 128)]):
        inits[f"s{k}"], inits[f"e{k}"] = np.array([a], np.int64), np.array([b], np.int64)
        nodes.append(helper.make_node("Slice", ["w", f"s{k}", f"e{k}", "axes"], [f"p{k}"], name=f"slice{k}"))
        parts.append(f"p{k}")
    nodes += [helper.make_node("Concat", parts, ["wr"], name="concat", axis=0),
              helper.make_node("MatMul", ["x", "wr"], ["y"], name="mm")]
    proto = make_model(nodes, [("x", F32, [2, 256])], [("y", F32, [2, 64])], inits)
    model, stats = _fold(proto)
    assert _ops(model) == ["MatMul"]
    assert sum(v.const_value.nbytes for v in model.graph.initializers.values()) == w.nbytes
    assert not _fold(ir.to_proto(model))[1].modified
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(2, 256)).astype(np.float32)}, rtol=0, atol=0)


def test_constant_chain_deeper_than_the_sweeps_folds_in_one_run() -> None:
    # Silero's padding sizes are computed by a chain of a dozen small ops; one run must fold it all.
    nodes = [helper.make_node("Add", [f"c{k}", "one"], [f"c{k + 1}"], name=f"add{k}") for k in range(12)]
    nodes.append(helper.make_node("Mul", ["x", "c12"], ["y"], name="mul"))
    proto = make_model(nodes, [("x", F32, [3])], [("y", F32, [3])],
                       {"c0": np.zeros(3, np.float32), "one": np.ones(3, np.float32)})
    model, stats = _fold(proto)
    assert _ops(model) == ["Mul"] and stats.summary["nodes_folded"] == 12
    assert not _fold(ir.to_proto(model))[1].modified
    assert_same_outputs(proto, model, {"x": RNG.normal(size=3).astype(np.float32)}, rtol=0, atol=0)


def test_dropping_only_unused_initializers_is_a_modification() -> None:
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F32, [2])], [("y", F32, [2])],
                       {"unused": np.ones(3, np.float32)})
    model, stats = _fold(proto)
    assert stats.modified and stats.summary["unused_initializers_removed"] == 1
    assert "unused" not in model.graph.initializers
    assert not _fold(ir.to_proto(model))[1].modified


def test_sweeps_repeat_until_nothing_changes_and_stop_there(monkeypatch) -> None:
    """Identity -> BN -> Identity -> BN: each sweep removes what the one before exposed."""
    sweeps: list[str] = []
    real = onnx_ir.passes.Sequential.call

    def counting(self, model):
        sweeps.append("sweep")
        return real(self, model)

    monkeypatch.setattr(onnx_ir.passes.Sequential, "call", counting)
    inits = {"w": RNG.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), **_bn_inits("bn1", 4), **_bn_inits("bn2", 4)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Identity", ["c"], ["i1"]),
             _bn("i1", "b1", "bn1"), helper.make_node("Identity", ["b1"], ["i2"]), _bn("i2", "y", "bn2")]
    proto = make_model(nodes, [("x", F32, [1, 3, 4, 4])], [("y", F32, [1, 4, 4, 4])], inits)
    model, stats = _fold(proto)
    assert _ops(model) == ["Conv"] and stats.summary["batchnorm_folded"] == 2
    assert 2 <= len(sweeps) <= 3  # the last sweep changes nothing and ends the loop
    assert_same_outputs(proto, model, {"x": RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)})


# ------------------------------------------------------------------------------ bounds on untrusted models
def _lying_model(op: str) -> onnx.ModelProto:
    """A 300-byte model whose one constant node would make 256 MB, its value_info declaring one number."""
    big = 1 << 26
    if op == "Expand":
        node = helper.make_node("Expand", ["c", "shape"], ["e"])
        inits = {"c": np.ones(1, np.float32), "shape": np.array([big], np.int64)}
    else:  # OneHot: indices [1], depth 2**26 -> [1, 2**26]
        node = helper.make_node("OneHot", ["idx", "depth", "vals"], ["e"], axis=-1)
        inits = {"idx": np.zeros(1, np.int64), "depth": np.array(big, np.int64), "vals": np.array([0, 1], np.float32)}
    nodes = [node, helper.make_node("ReduceSum", ["e"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "liar", [helper.make_tensor_value_info("x", F32, [])],
                              [helper.make_tensor_value_info("y", F32, [])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()],
                              value_info=[helper.make_tensor_value_info("e", F32, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("op", ["Expand", "OneHot"])
def test_fold_sizes_come_from_inference_not_from_declared_shapes(op: str) -> None:
    proto = _lying_model(op)
    assert proto.ByteSize() < 400
    model, stats = _fold(proto)
    assert op in _ops(model)
    reasons = [s["reason"] for s in stats.skipped if s["reason"].startswith("folded tensor would be")]
    assert reasons == ["folded tensor would be 256.0 MB (> max_fold_mb)"], stats.skipped
    assert sum(int(v.const_value.nbytes) for v in model.graph.initializers.values()) < 1024


def _slow_grid_sample(n: int) -> onnx.ModelProto:
    """`n` GridSamples of constant inputs (a per-pixel Python loop in onnx's reference evaluator)."""
    nodes, inits = [], {}
    for k in range(n):
        inits[f"img{k}"] = RNG.standard_normal((1, 1, 16, 16)).astype(np.float32)
        inits[f"grid{k}"] = RNG.uniform(-1, 1, (1, 128, 128, 2)).astype(np.float32)
        nodes.append(helper.make_node("GridSample", [f"img{k}", f"grid{k}"], [f"g{k}"], name=f"gs{k}", mode="linear"))
        nodes.append(helper.make_node("ReduceMax", [f"g{k}"], [f"m{k}"], keepdims=0))
    nodes.append(helper.make_node("Sum", ["x"] + [f"m{k}" for k in range(n)], ["y"]))
    return make_model(nodes, [("x", F32, [])], [("y", F32, [])], inits, opset=20)


def test_a_slow_evaluation_is_stopped_and_left_unfolded_with_the_reason() -> None:
    model, stats = _fold(_slow_grid_sample(1), eval_seconds=0.05)
    assert "GridSample" in _ops(model)
    assert {"node": "gs0", "reason": "evaluating GridSample took over 0.05 s (fold.eval_seconds); left as is"} \
        in stats.skipped


def test_once_the_evaluation_budget_is_spent_nodes_stay_with_the_reason() -> None:
    model, stats = _fold(_slow_grid_sample(2), eval_seconds=10.0, eval_budget=0.05)
    assert _ops(model).count("GridSample") == 2
    reasons = {s["node"]: s["reason"] for s in stats.skipped if s["node"].startswith("gs")}
    assert reasons["gs0"] == "evaluating GridSample took over 0.05 s (the rest of fold.eval_budget); left as is"
    assert reasons["gs1"] == "not evaluated: fold's evaluation budget of 0.05 s is spent (fold.eval_budget)"


@pytest.mark.parametrize("key", ["eval_seconds", "eval_budget", "max_fold_mb"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_fold_bounds_must_be_positive_and_finite(key: str, value: float) -> None:
    with pytest.raises(UsageError, match=f"fold.{key} must be positive and finite"):
        make_pass("fold", {key: value})
