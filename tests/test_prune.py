"""Tests of the prune pass: sparsity reached, threshold, N:M blocks, exclusions, shared weights,
activation criterion, sparse storage, fixtures (CNN, transformer, external data), bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, accuracy, digits_eval, make_model, run_ort
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt.cli import main
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.registry import make_pass
from onnxopt.sparse import densify

RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    """Random weights with no exact zeros and no ties."""
    w = RNG.standard_normal(shape).astype(np.float32)
    return np.where(w == 0, 1e-3, w).astype(np.float32)


def _mixed_model() -> onnx.ModelProto:
    """Conv(8->8, bias) -> Flatten -> Gemm(transB=1, bias) -> MatMul -> y."""
    inits = {
        "conv.w": _w(8, 8, 3, 3), "conv.b": _w(8),
        "fc.w": _w(32, 8 * 4 * 4), "fc.b": _w(32),
        "mm.w": _w(32, 16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
        helper.make_node("MatMul", ["g", "mm.w"], ["y"], name="mm"),
    ]
    return make_model(nodes, [("x", F32, [2, 8, 4, 4])], [("y", F32, [2, 16])], inits)


def _prune(model: ir.Model, options: dict, calib=None) -> onnxopt.PassStats:
    return make_pass("prune", options).call(model, Context(calib=calib))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {k: np.array(v.const_value.numpy()) for k, v in model.graph.initializers.items()}


def _feed() -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal((2, 8, 4, 4)).astype(np.float32)}


# ------------------------------------------------------------------ sparsity reached
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.85])
def test_layer_scope_reaches_target_in_every_tensor(sparsity: float) -> None:
    m = ir.from_proto(_mixed_model())
    stats = _prune(m, {"sparsity": sparsity, "scope": "layer"})
    w = _weights(m)
    for name in ("conv.w", "fc.w", "mm.w"):
        zeros = w[name].size - np.count_nonzero(w[name])
        assert abs(zeros - sparsity * w[name].size) <= 1, name
    assert stats.modified and len(stats.layers) == 3
    assert run_ort(m, _feed())[0].shape == (2, 16)


def test_global_scope_reaches_target_overall_and_allocates_unevenly() -> None:
    m = ir.from_proto(_mixed_model())
    stats = _prune(m, {"sparsity": 0.7, "scope": "global"})
    w = _weights(m)
    names = ("conv.w", "fc.w", "mm.w")
    total = sum(w[n].size for n in names)
    zeros = sum(w[n].size - np.count_nonzero(w[n]) for n in names)
    assert abs(zeros - 0.7 * total) <= 1
    per_layer = [r["sparsity"] for r in stats.layers]
    assert max(per_layer) - min(per_layer) > 0.01
    assert stats.summary["nonzero_after"] == total - zeros


def test_threshold_removes_exactly_the_weights_at_or_below_it() -> None:
    m = ir.from_proto(_mixed_model())
    before = _weights(m)
    _prune(m, {"threshold": 0.5})
    after = _weights(m)
    for name in ("conv.w", "fc.w", "mm.w"):
        small = np.abs(before[name]) <= 0.5
        assert np.all(after[name][small] == 0)
        np.testing.assert_array_equal(after[name][~small], before[name][~small])


def test_biases_untouched_and_sparsity_zero_changes_nothing() -> None:
    proto = _mixed_model()
    m = ir.from_proto(proto)
    before = _weights(m)
    _prune(m, {"sparsity": 0.9, "scope": "layer"})
    after = _weights(m)
    for name in ("conv.b", "fc.b"):
        np.testing.assert_array_equal(after[name], before[name])
    m0 = ir.from_proto(proto)
    stats = _prune(m0, {"sparsity": 0.0})
    assert not stats.modified
    feed = _feed()
    np.testing.assert_array_equal(run_ort(m0, feed)[0], run_ort(proto, feed)[0])


def test_idempotent() -> None:
    for options in ({"sparsity": 0.6}, {"sparsity": 0.6, "scope": "layer"}, {"pattern": "2:4"},
                    {"sparsity": 0.9, "storage": "sparse"}):
        m = ir.from_proto(_mixed_model())
        _prune(m, options)
        once = _weights(m)
        stats = _prune(m, options)
        assert not stats.modified, options
        for name, arr in _weights(m).items():
            np.testing.assert_array_equal(arr, once[name])


def test_float16_weights_keep_their_dtype_and_store_sparse(tmp_path: Path) -> None:
    w = _w(32, 16).astype(np.float16)
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [("x", onnx.TensorProto.FLOAT16, [2, 32])], [("y", onnx.TensorProto.FLOAT16, [2, 16])],
                       {"W": w})
    m = ir.from_proto(proto)
    stats = _prune(m, {"sparsity": 0.9, "storage": "sparse"})
    pruned = _weights(m)["W"]
    assert pruned.dtype == np.float16 and np.count_nonzero(pruned) == round(0.1 * w.size)
    assert stats.layers[0]["storage"] == "sparse"
    path = onnxopt.save(m, tmp_path / "fp16.onnx")
    assert len(onnx.load(str(path)).graph.sparse_initializer) == 1
    x = RNG.standard_normal((2, 32)).astype(np.float16)
    np.testing.assert_array_equal(run_ort(path, {"x": x})[0], run_ort(m, {"x": x})[0])


# ------------------------------------------------------------------ exclude, min_size, shared
def test_exclude_by_name_glob_and_op_type_and_min_size() -> None:
    m = ir.from_proto(_mixed_model())
    before = _weights(m)
    stats = _prune(m, {"sparsity": 0.5, "exclude": ["con*", "MatMul"]})
    after = _weights(m)
    np.testing.assert_array_equal(after["conv.w"], before["conv.w"])
    np.testing.assert_array_equal(after["mm.w"], before["mm.w"])
    assert np.count_nonzero(after["fc.w"]) < before["fc.w"].size
    assert {s["node"] for s in stats.skipped} == {"conv", "mm"}
    m2 = ir.from_proto(_mixed_model())
    stats = _prune(m2, {"sparsity": 0.5, "min_size": 600})
    assert [r["weight"] for r in stats.layers] == ["fc.w"]
    assert any("min_size" in s["reason"] for s in stats.skipped)


def _shared_model(extra_use: bool) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="mm2"),
    ]
    out = "b"
    if extra_use:
        nodes.append(helper.make_node("ReduceSum", ["W"], ["s"], name="sum", keepdims=0))
        nodes.append(helper.make_node("Add", ["b", "s"], ["c"], name="add"))
        out = "c"
    return make_model(nodes, [("x", F32, [3, 16])], [(out, F32, [3, 16])], {"W": _w(16, 16)})


def test_shared_weight_pruned_once_and_guarded_when_read_elsewhere() -> None:
    m = ir.from_proto(_shared_model(extra_use=False))
    stats = _prune(m, {"sparsity": 0.5})
    assert len(stats.layers) == 1 and stats.layers[0]["nodes"] == "mm1,mm2"
    w = _weights(m)["W"]
    assert np.count_nonzero(w) == 128
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(m, {"x": x})[0], (x @ w) @ w, rtol=1e-5, atol=1e-5)
    m2 = ir.from_proto(_shared_model(extra_use=True))
    before = _weights(m2)["W"]
    stats = _prune(m2, {"sparsity": 0.5})
    np.testing.assert_array_equal(_weights(m2)["W"], before)
    assert not stats.modified
    assert all("also read by sum" in s["reason"] for s in stats.skipped)


def test_weight_shared_with_an_excluded_node_stays_dense() -> None:
    m = ir.from_proto(_shared_model(extra_use=False))
    before = _weights(m)["W"]
    stats = _prune(m, {"sparsity": 0.5, "exclude": ["mm2"]})
    np.testing.assert_array_equal(_weights(m)["W"], before)
    assert any("excluded node mm2" in s["reason"] for s in stats.skipped)


# ------------------------------------------------------------------ N:M
def _blocks(w: np.ndarray, axis: int, m: int) -> np.ndarray:
    return np.moveaxis(w, axis, -1).reshape(-1, m)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    sparsity=st.floats(0.0, 0.99),
    scope=st.sampled_from(["global", "layer"]),
)
def test_sparsity_reached_property(rows: int, cols: int, sparsity: float, scope: str) -> None:
    proto = make_model([helper.make_node("MatMul", ["x", "A"], ["a"], name="mm1"),
                        helper.make_node("MatMul", ["a", "B"], ["y"], name="mm2")],
                       [("x", F32, [1, rows])], [("y", F32, [1, 3])], {"A": _w(rows, cols), "B": _w(cols, 3)})
    m = ir.from_proto(proto)
    _prune(m, {"sparsity": sparsity, "scope": scope})
    w = _weights(m)
    zeros = [a.size - np.count_nonzero(a) for a in w.values()]
    if scope == "layer":
        assert all(abs(z - sparsity * a.size) <= 1 for z, a in zip(zeros, w.values()))
    else:
        total = sum(a.size for a in w.values())
        assert abs(sum(zeros) - sparsity * total) <= 1
        if round(sparsity * total) <= total - len(w):  # LAMP keeps each tensor's largest weight
            assert all(np.count_nonzero(a) >= 1 for a in w.values())


def test_weights_inside_if_branches() -> None:
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")], "then", [],
                             [helper.make_tensor_value_info("t", F32, [2, 8])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "V"], ["e"], name="else_mm")], "else", [],
                              [helper.make_tensor_value_info("e", F32, [2, 8])])
    proto = make_model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other)],
                       [("x", F32, [2, 8]), ("c", onnx.TensorProto.BOOL, [])], [("y", F32, [2, 8])],
                       {"W": _w(8, 8), "V": _w(8, 8)})
    m = ir.from_proto(proto)
    stats = _prune(m, {"sparsity": 0.5, "scope": "layer"})
    w = _weights(m)
    assert np.count_nonzero(w["W"]) == 32 and np.count_nonzero(w["V"]) == 32
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(m, {"x": x, "c": np.array(True)})[0], x @ w["W"], rtol=1e-5, atol=1e-5)
    assert stats.summary["layers"] == 2
    m2 = ir.from_proto(proto)
    calib = load_data("random:2", input_specs(m2))
    stats = _prune(m2, {"sparsity": 0.5, "criterion": "activation"}, calib)
    assert not stats.modified and all("subgraph" in s["reason"] for s in stats.skipped)


def test_two_four_pattern_block_by_block() -> None:
    m = ir.from_proto(_mixed_model())
    before = _weights(m)
    stats = _prune(m, {"pattern": "2:4"})
    after = _weights(m)
    for name, axis in (("conv.w", 1), ("fc.w", 1), ("mm.w", 0)):
        b_before, b_after = _blocks(before[name], axis, 4), _blocks(after[name], axis, 4)
        assert np.all(np.count_nonzero(b_after, axis=1) == 2), name
        kept = np.sort(np.abs(b_after), axis=1)[:, 2:]
        largest = np.sort(np.abs(b_before), axis=1)[:, 2:]
        np.testing.assert_array_equal(kept, largest)
    assert stats.summary["sparsity"] == pytest.approx(0.5)


def test_nm_skips_a_reduction_axis_that_is_not_a_multiple_of_m() -> None:
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [("x", F32, [2, 6])], [("y", F32, [2, 4])], {"W": _w(6, 4)})
    m = ir.from_proto(proto)
    stats = _prune(m, {"pattern": "1:4"})
    assert not stats.modified
    assert "not a multiple of 4" in stats.skipped[0]["reason"]


# ------------------------------------------------------------------ activation criterion
def test_activation_criterion_keeps_weights_on_loud_inputs() -> None:
    w = np.full((8, 4), 1.0, dtype=np.float32)
    w[0] = 0.1  # small weights on input feature 0
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [("x", F32, ["n", 8])], [("y", F32, ["n", 4])], {"W": w})
    feeds = []
    for _ in range(4):
        x = RNG.standard_normal((16, 8)).astype(np.float32)
        x[:, 0] *= 100.0
        feeds.append({"x": x})
    calib = load_data(feeds, input_specs(ir.from_proto(proto)))
    mag = ir.from_proto(proto)
    _prune(mag, {"sparsity": 0.125, "scope": "layer"})
    act = ir.from_proto(proto)
    _prune(act, {"sparsity": 0.125, "scope": "layer", "criterion": "activation"}, calib)
    assert np.all(_weights(mag)["W"][0] == 0)
    assert np.all(_weights(act)["W"][0] != 0)
    assert np.count_nonzero(_weights(act)["W"]) == 28


@pytest.fixture(scope="module")
def digits_calib():
    m = onnxopt.load(MODELS / "digits_cnn.onnx")
    return load_data(MODELS / "digits_calib.npz", input_specs(m), batch=32)


def _pruned_cnn(options: dict, calib=None) -> ir.Model:
    m = onnxopt.load(MODELS / "digits_cnn.onnx")
    fold_model(m)
    _prune(m, options, calib)
    return m


def test_digits_cnn_accuracy_activation_not_worse_at_80(digits_calib) -> None:
    x, labels = digits_eval()
    base = accuracy(onnxopt.load(MODELS / "digits_cnn.onnx"), x, labels)
    mag = accuracy(_pruned_cnn({"sparsity": 0.8}), x, labels)
    act = accuracy(_pruned_cnn({"sparsity": 0.8, "criterion": "activation"}, digits_calib), x, labels)
    half = accuracy(_pruned_cnn({"sparsity": 0.5, "criterion": "activation"}, digits_calib), x, labels)
    assert act >= mag
    assert half >= base - 0.02
    assert act > 0.5  # far above chance (0.1) after zeroing four weights in five


# ------------------------------------------------------------------ sparse storage
@pytest.mark.parametrize("sparsity", [0.7, 0.9])
def test_sparse_storage_same_outputs_and_smaller_file(tmp_path: Path, sparsity: float) -> None:
    m = _pruned_cnn({"sparsity": sparsity, "scope": "layer", "storage": "sparse"})
    dense_path = tmp_path / "dense.onnx"
    sparse_path = tmp_path / "sparse.onnx"
    ir.save(m, dense_path)
    onnxopt.save(m, sparse_path)
    proto = onnx.load(str(sparse_path))
    assert len(proto.graph.sparse_initializer) > 0
    assert all(p.key != "onnxopt.sparse_initializers" for p in proto.metadata_props)
    onnx.checker.check_model(proto)
    assert sparse_path.stat().st_size < dense_path.stat().st_size
    x, _ = digits_eval()
    for a, b in zip(run_ort(dense_path, {"input": x}), run_ort(sparse_path, {"input": x})):
        np.testing.assert_array_equal(a, b)
    n_sparse = len(proto.graph.sparse_initializer)
    assert densify(proto) == n_sparse and len(proto.graph.sparse_initializer) == 0
    dense_back = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, arr in _weights(m).items():
        np.testing.assert_array_equal(dense_back[name], arr)


def test_sparse_storage_only_where_smaller_and_auto_threshold(tmp_path: Path) -> None:
    m = _pruned_cnn({"sparsity": 0.5, "scope": "layer", "storage": "sparse"})
    path = onnxopt.save(m, tmp_path / "half.onnx")
    assert len(onnx.load(str(path)).graph.sparse_initializer) == 0
    m = ir.from_proto(_mixed_model())
    stats = _prune(m, {"sparsity": 0.5, "scope": "layer", "storage": "auto"})
    assert "sparse_tensors" not in stats.summary
    assert any("storage=auto kept dense" in n for n in stats.notes)


# ------------------------------------------------------------------ fixtures
def test_transformer_block_activation_prune() -> None:
    m = onnxopt.load(MODELS / "digits_transformer.onnx")
    seq, labels = digits_eval("digits_seq_eval.npz")
    calib = load_data({"input": seq[:64]}, input_specs(m))
    stats = _prune(m, {"sparsity": 0.5, "criterion": "activation"}, calib)
    matmul_weights = {r["weight"] for r in stats.layers}
    assert {"block.attn.q.weight", "block.ffn.fc1.weight", "head.weight"} <= matmul_weights
    assert {s["node"] for s in stats.skipped} == {"block.attn.scores", "block.attn.context"}
    assert abs(stats.summary["nonzero_after"] - stats.summary["params"] / 2) <= 1
    for length in (5, 8):
        out = run_ort(m, {"input": seq[:3, :length]})[0]
        assert out.shape == (3, 10) and np.all(np.isfinite(out))
    assert accuracy(m, seq, labels) > 0.5


def test_model_with_external_data(tmp_path: Path) -> None:
    from models.resnet import build_resnet_tiny

    src = build_resnet_tiny(tmp_path / "tiny.onnx", batch="batch", external_data=True)
    assert (tmp_path / "tiny.onnx.data").exists()
    m = onnxopt.load(src)
    fold_model(m)
    stats = _prune(m, {"sparsity": 0.6, "scope": "layer", "exclude": ["conv1"]})
    out = onnxopt.save(m, tmp_path / "pruned.onnx", external_data=True)
    back = onnxopt.load(out)
    conv = np.asarray(back.graph.initializers["layer1.0.conv1.weight"].const_value.numpy())
    assert abs((conv.size - np.count_nonzero(conv)) - 0.6 * conv.size) <= 1
    x = RNG.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert run_ort(out, {"input": x})[0].shape == (2, 10)
    assert stats.summary["layers"] == len(stats.layers) > 10


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"sparsity": 1.0}, "prune.sparsity"),
        ({"sparsity": -0.1}, "prune.sparsity"),
        ({"threshold": -1.0}, "prune.threshold"),
        ({"sparsity": 0.5, "threshold": 0.1}, "prune.sparsity is read only when threshold is not set"),
        ({"pattern": "2:x"}, "prune.pattern"),
        ({"pattern": "4:2"}, "prune.pattern"),
        ({"pattern": "24"}, "prune.pattern"),
        ({"pattern": "2:4", "sparsity": 0.7}, "read only when threshold is not set and pattern=unstructured"),
        ({"scope": "row"}, "prune.scope"),
        ({"criterion": "taylor"}, "prune.criterion"),
        ({"storage": "zip"}, "prune.storage"),
        ({"min_size": -1}, "prune.min_size"),
        ({"exclude": 3}, "prune.exclude"),
        ({"threshold": 0.1, "criterion": "activation"}, "prune.threshold"),
    ],
)
def test_bad_options_are_one_line_usage_errors(options: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace(".", r"\.")) as info:
        make_pass("prune", options)
    assert "\n" not in str(info.value)


def test_activation_without_calibration_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--calib"):
        _prune(ir.from_proto(_mixed_model()), {"criterion": "activation"})


def test_nothing_prunable_warns_and_leaves_the_model(caplog: pytest.LogCaptureFixture) -> None:
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", F32, [2, 3])],
                       [("y", F32, [2, 3])])
    m = ir.from_proto(proto)
    with caplog.at_level(logging.WARNING):
        stats = _prune(m, {"sparsity": 0.5})
    assert not stats.modified and stats.summary["layers"] == 0
    assert "nothing to prune" in caplog.text
    assert ir.to_proto(m).graph == proto.graph


def test_cli_runs_prune_and_rejects_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([str(MODELS / "digits_cnn.onnx"), "--passes", "fold,prune", "--set", "prune.sparsity=0.8",
                 "--set", "prune.criterion=activation", "--calib", str(MODELS / "digits_calib.npz"),
                 "--data", str(MODELS / "digits_eval.npz"), "--bench-runs", "0", "-o", str(out),
                 "--report", str(report)])
    assert code == 0
    prune = json.loads(report.read_text())["passes"][1]
    assert prune["name"] == "prune" and abs(prune["summary"]["sparsity"] - 0.8) < 1e-4
    capsys.readouterr()
    code = main([str(MODELS / "digits_cnn.onnx"), "--passes", "prune", "--set", "prune.pattern=2:2",
                 "-o", str(tmp_path / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "prune.pattern" in err


def test_options_are_listed(capsys: pytest.CaptureFixture) -> None:
    assert main(["passes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["prune"]
    names = [o["name"] for o in doc["options"]]
    assert names == ["sparsity", "threshold", "scope", "criterion", "pattern", "exclude", "min_size", "storage",
                     "layers"]
    assert all(o["doc"] for o in doc["options"]) and not doc["exact"]


def test_sparse_storage_through_the_pipeline_and_reload(tmp_path: Path) -> None:
    out = tmp_path / "sparse.onnx"
    dense = tmp_path / "dense.onnx"
    passes = ["fold", ("prune", {"sparsity": 0.8, "scope": "layer", "storage": "sparse"})]
    res = onnxopt.optimize(MODELS / "digits_cnn.onnx", passes, output=out)
    res.save(out)
    onnxopt.optimize(MODELS / "digits_cnn.onnx", ["fold", ("prune", {"sparsity": 0.8, "scope": "layer"})],
                     validate=False).save(dense)
    assert len(onnx.load(str(out)).graph.sparse_initializer) > 0
    # 20 % of the values kept, each with an 8-byte index: 0.2 * (4 + 8) / 4 = 0.6 of the weight bytes.
    assert out.stat().st_size < 0.7 * dense.stat().st_size
    x, _ = digits_eval()
    np.testing.assert_array_equal(run_ort(out, {"input": x[:32]})[0], run_ort(dense, {"input": x[:32]})[0])
    # Re-read by onnxopt (onnx_ir keeps only dense initializers: they are densified on load).
    again = onnxopt.optimize(out, ["fold"], data=[{"input": x[:32]}])
    assert again.validation.outputs[0].max_abs == 0.0
