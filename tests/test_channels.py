"""The `channels` pass: options, exact removal of zero channels, recovery, transformer heads, bad input.

Parity tolerances: exact claims (zero filters removed) are checked to rtol 1e-4 / atol 1e-5 on
outputs of order 1-10; lossy settings are checked by accuracy on the held-out digits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, accuracy, digits_eval, make_model, run_ort
from onnx import helper
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt.analysis import model_stats
from onnxopt.cli import main as cli_main
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.graph import constant_array, set_weight
from onnxopt.registry import make_pass

RTOL, ATOL = 1e-4, 1e-5


def _folded(name: str | Path) -> ir.Model:
    """A fixture model by name (or any model by absolute path), with BatchNorm folded."""
    model = onnxopt.load(MODELS / name)
    fold_model(model)
    return model


def _weights(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {n.name: tuple(constant_array(n.inputs[1]).shape) for n in model.graph
            if n.op_type in ("Conv", "Gemm", "MatMul") and constant_array(n.inputs[1]) is not None}


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def _zero_rows(model: ir.Model, node: str, idx: list[int], axis: int = 0, bias: bool = False) -> None:
    n = _node(model, node)
    for k, ax in [(1, axis)] + ([(2, 0)] if bias else []):
        w = np.array(constant_array(n.inputs[k]))
        where = [slice(None)] * w.ndim
        where[ax] = idx
        w[tuple(where)] = 0
        set_weight(n.inputs[k], w)


def _channels(options: dict):
    """The pass as the structural tests knew it: MAC decisions and any channel count (round_to=1), unless a
    test says otherwise; the speed check and the default multiple have their own tests (tests/test_speed.py)."""
    return make_pass("channels", {"round_to": 1, "verify_speed": False, **options})


def _calib(model: ir.Model):
    return load_data(str(MODELS / "digits_calib.npz"), input_specs(model), batch=32)


# ------------------------------------------------------------------ bad input, one per option
@pytest.mark.parametrize("options, words", [
    ({"ratio": 1.0}, "channels.ratio"),
    ({"ratio": -0.1}, "channels.ratio"),
    ({"macs": 0.0}, "channels.macs"),
    ({"macs": 1.5}, "channels.macs"),
    ({"importance": "l3"}, "channels.importance"),
    ({"round_to": -1}, "channels.round_to"),
    ({"min_speedup": 1.0}, "channels.min_speedup"),
    ({"min_channels": 0}, "channels.min_channels"),
    ({"exclude": 5}, "channels.exclude"),
    ({"compensate": "maybe"}, "channels.compensate"),
    ({"reconstruct": "maybe"}, "channels.reconstruct"),
])
def test_bad_option_values_are_usage_errors(options, words) -> None:
    with pytest.raises(UsageError, match=words.replace(".", r"\.")):
        make_pass("channels", options, from_text=True)


@pytest.mark.parametrize("options", [{"importance": "activation"}, {"reconstruct": True}])
def test_calibration_options_need_calib(options) -> None:
    with pytest.raises(UsageError, match="--calib"):
        _channels(options).call(_folded("digits_cnn.onnx"), Context())


def test_cli_rejects_bad_ratio(tmp_path) -> None:
    code = cli_main([str(MODELS / "digits_cnn.onnx"), "--passes", "channels", "--set", "channels.ratio=1.5",
                     "-o", str(tmp_path / "out.onnx")])
    assert code == 2 and not (tmp_path / "out.onnx").exists()


def _single_conv() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="only")
    return make_model([node], [("x", F32, [1, 3, 4, 4])], [("y", F32, [1, 4, 4, 4])], {"w": w})


def test_nothing_prunable_warns_and_leaves_model_unchanged() -> None:
    proto = _single_conv()
    model = ir.from_proto(proto)
    stats = _channels({"ratio": 0.5}).call(model, Context())
    assert not stats.modified and any("unchanged" in n for n in stats.notes)
    assert any("graph output" in s["reason"] for s in stats.skipped)
    assert _weights(model) == {"only": (4, 3, 1, 1)}


def test_ratio_zero_removes_nothing() -> None:
    model = _folded("digits_cnn.onnx")
    before = _weights(model)
    stats = _channels({"ratio": 0.0}).call(model, Context())
    assert not stats.modified and _weights(model) == before


def test_unreachable_macs_target_names_the_blocking_groups() -> None:
    with pytest.raises(UsageError, match=r"blocked by .*only.*graph output"):
        _channels({"macs": 0.5}).call(ir.from_proto(_single_conv()), Context())
    model = _folded("digits_cnn.onnx")
    with pytest.raises(UsageError, match=r"cannot be met.*excluded"):
        _channels({"macs": 0.9, "exclude": ["Conv"]}).call(model, Context())


# ------------------------------------------------------------------ exactness through the pass
def test_zero_filters_are_removed_first_and_exactly() -> None:
    model = _folded("digits_cnn.onnx")
    # pw.conv feeds a zero-padded 3x3 conv, where a constant is not a bias: zero its bias too;
    # fc1 keeps its bias, which compensation moves into fc2
    _zero_rows(model, "pw.conv", [1, 5, 20], bias=True)
    _zero_rows(model, "fc1", [0, 7, 8, 40, 41, 63], axis=0)
    reference = ir.to_proto(model)
    # every other group is excluded, and ratio 0.1 removes exactly as many channels as were zeroed
    keep_out = ["stem.*", "block1.*", "branch_*"]
    stats = _channels({"ratio": 0.1, "importance": "l1", "exclude": keep_out}).call(model, Context())
    shapes = _weights(model)
    assert shapes["pw.conv"][0] == 32 - math.floor(0.1 * 32)
    assert shapes["fc1"][0] == 64 - math.floor(0.1 * 64)
    assert shapes["branch_a.conv"][1] == shapes["pw.conv"][0] and shapes["fc2"][1] == shapes["fc1"][0]
    assert stats.modified and any(s["reason"] == "excluded by channels.exclude" for s in stats.skipped)
    x, _ = digits_eval()
    for a, b in zip(run_ort(reference, {"input": x[:64]}), run_ort(model, {"input": x[:64]})):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_transformer_heads_and_ffn_units_removed() -> None:
    model = _folded("digits_transformer.onnx")
    head = list(range(24, 32))  # the last of 4 heads of width 8
    for proj in ("q", "k", "v"):
        _zero_rows(model, f"block.attn.{proj}.matmul", head, axis=1)
        bias = _node(model, f"block.attn.{proj}.add").inputs[1]
        b = np.array(constant_array(bias))
        b[head] = 0
        set_weight(bias, b)
    _zero_rows(model, "block.ffn.fc1.matmul", list(range(0, 64, 4)), axis=1)  # 16 of 64 hidden units
    reference = ir.to_proto(model)
    stats = _channels({"ratio": 0.25}).call(model, Context())
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    shapes = _weights(model)
    assert shapes["block.attn.q.matmul"] == (32, 24) and shapes["block.attn.out.matmul"] == (24, 32)
    assert shapes["block.ffn.fc1.matmul"] == (32, 48) and shapes["block.ffn.fc2.matmul"] == (48, 32)
    heads = [tuple(constant_array(n.inputs[1])) for n in model.graph if n.op_type == "Reshape"]
    assert (0, 0, 3, 8) in heads and (0, 0, 24) in heads
    x = np.load(MODELS / "digits_seq_eval.npz")["input"][:32]
    for seq in (8, 5):
        feed = {"input": np.ascontiguousarray(x[:, :seq])}
        np.testing.assert_allclose(run_ort(model, feed)[0], run_ort(reference, feed)[0], rtol=RTOL, atol=1e-4)
    assert stats.summary["units_removed"] == 1 + 16


# ------------------------------------------------------------------ options
def _producer_counts(model: ir.Model) -> dict[str, int]:
    return {k: v[0] for k, v in _weights(model).items() if _node(model, k).op_type == "Conv"}


def test_round_to_and_min_channels(resnet_tiny) -> None:
    before = _producer_counts(_folded(resnet_tiny))
    model = _folded(resnet_tiny)
    _channels({"ratio": 0.6, "round_to": 8}).call(model, Context())
    after = _producer_counts(model)
    assert any(after[k] < before[k] for k in before)
    assert all(after[k] % 8 == 0 for k in after)
    model = _folded(resnet_tiny)
    _channels({"ratio": 0.9, "min_channels": 6}).call(model, Context())
    after = _producer_counts(model)
    assert all(after[k] >= 6 for k in after) and any(after[k] < before[k] for k in before)


def test_exclude_leaves_matching_groups_alone() -> None:
    model = _folded("digits_cnn.onnx")
    before = _weights(model)
    _channels({"ratio": 0.5, "exclude": ["fc*", "branch_a.*"]}).call(model, Context())
    after = _weights(model)
    assert after["fc1"][0] == before["fc1"][0] and after["branch_a.conv"][0] == before["branch_a.conv"][0]
    assert after["pw.conv"][0] < before["pw.conv"][0] and after["branch_b.conv"][0] < before["branch_b.conv"][0]


def test_bn_importance_removes_the_smallest_scale() -> None:
    model = onnxopt.load(MODELS / "digits_cnn.onnx")  # BatchNorm still unfolded
    bn = _node(model, "branch_a.bn")
    gamma = np.array(constant_array(bn.inputs[1]))
    weak = [int(i) for i in np.argsort(np.abs(gamma))[:3]]
    gamma[weak[0]] = 1e-6
    set_weight(bn.inputs[1], gamma)
    keep = constant_array(bn.inputs[1]).copy()
    _channels({"ratio": 0.1, "importance": "bn", "exclude": ["stem.*", "block1.*", "pw.*", "branch_b.*",
                                                              "fc*"]}).call(model, Context())
    left = constant_array(_node(model, "branch_a.bn").inputs[1])
    assert left.size == 16 - 1 and 1e-6 not in left and set(np.round(left, 6)) <= set(np.round(keep, 6))


def test_activation_importance_removes_the_silent_channel() -> None:
    # fc1's unit 2 has the largest filter, but a bias that keeps its ReLU output at zero: filter norms
    # keep it, mean |activation| at fc2's input removes it.
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 4)).astype(np.float32)
    w1[:, 2] *= 10
    b1 = np.array([0, 0, -1000, 0], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")]
    proto = make_model(nodes, [("x", F32, [2, 8])], [("y", F32, [2, 3])],
                       {"w1": w1, "b1": b1, "w2": rng.normal(size=(4, 3)).astype(np.float32)})
    kept_bias = {}
    for importance in ("l2", "activation"):
        model = ir.from_proto(proto)
        calib = load_data("random:8", input_specs(model))
        _channels({"ratio": 0.25, "importance": importance}).call(model, Context(calib=calib))
        kept_bias[importance] = constant_array(_node(model, "fc1").inputs[2])
    assert kept_bias["l2"].size == kept_bias["activation"].size == 3
    assert -1000 in kept_bias["l2"] and -1000 not in kept_bias["activation"]


def test_macs_target_is_met_on_the_counted_model() -> None:
    model = _folded("digits_cnn.onnx")
    before = model_stats(model).macs
    stats = _channels({"macs": 0.4}).call(model, Context())
    after = model_stats(model).macs
    assert after <= 0.6 * before and stats.summary["macs_after"] == after


def test_reconstruct_recovers_accuracy() -> None:
    x, labels = digits_eval()
    accs = {}
    for mode in ("plain", "reconstruct"):
        model = _folded("digits_cnn.onnx")
        calib = _calib(model)
        options = {"ratio": 0.5, "reconstruct": mode == "reconstruct"}
        _channels(options).call(model, Context(calib=calib))
        onnx.checker.check_model(ir.to_proto(model), full_check=True)
        accs[mode] = accuracy(model, x, labels)
    assert accs["reconstruct"] > accs["plain"] + 0.1


def test_activation_importance_and_optimize_api(tmp_path) -> None:
    result = onnxopt.optimize(MODELS / "digits_cnn.onnx",
                              ["fold", ("channels", {"ratio": 0.3, "importance": "activation", "round_to": 1,
                                                     "verify_speed": False})],
                              calib=str(MODELS / "digits_calib.npz"), data=str(MODELS / "digits_eval.npz"),
                              tolerance=10.0)
    assert result.after.macs < result.before.macs and result.after.parameters < result.before.parameters
    out = result.save(tmp_path / "pruned.onnx")
    x, labels = digits_eval()
    assert accuracy(out, x, labels) > 0.5
    rec = result.passes[1].stats
    assert rec.summary["units_removed"] > 0 and rec.layers


def test_calibration_means_compensate_a_removed_head(tmp_path) -> None:
    """A head whose Q/K/V weights are zero still adds its V bias (softmax rows sum to 1); with
    --calib the measured channel means carry it into the output projection's bias exactly."""
    model = _folded("digits_transformer.onnx")
    for proj in ("q", "k", "v"):
        _zero_rows(model, f"block.attn.{proj}.matmul", list(range(8)), axis=1)
    reference = ir.to_proto(model)
    x = np.load(MODELS / "digits_seq_eval.npz")["input"][:64]
    np.savez(tmp_path / "calib.npz", input=x)
    calib = load_data(str(tmp_path / "calib.npz"), input_specs(model), batch=32)
    _channels({"ratio": 0.25, "exclude": ["block.ffn.*"]}).call(model, Context(calib=calib))
    assert _weights(model)["block.attn.v.matmul"] == (32, 24)
    feed = {"input": x}
    np.testing.assert_allclose(run_ort(model, feed)[0], run_ort(reference, feed)[0], rtol=RTOL, atol=1e-4)


# ------------------------------------------------------------------------------ regressions from real models
def _layers_in_if_branch(then_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """`y = If(cond, then: then_nodes -> t, else: -x)` over `x: [2, 8]`, with an 8x8 weight `w1`."""
    w1 = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("t", F32, [2, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                               [helper.make_tensor_value_info("e", F32, [2, 8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", F32, [2, 8]), ("cond", onnx.TensorProto.BOOL, [])], [("y", F32, [2, 8])],
                      {"w1": w1})


def test_layers_only_inside_subgraphs_are_named_in_the_note() -> None:
    # Silero VAD keeps every layer inside an If branch: the note must say so, not blame round_to.
    model = ir.from_proto(_layers_in_if_branch([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                                                helper.make_node("Relu", ["h"], ["r"], name="relu"),
                                                helper.make_node("MatMul", ["r", "w1"], ["t"], name="mm2")]))
    stats = _channels({"ratio": 0.5}).call(model, Context())
    assert not stats.modified
    assert "2 Conv/Gemm/MatMul nodes are inside If/Loop/Scan bodies" in stats.notes[0]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_macs_target_blocked_by_subgraphs_says_so() -> None:
    proto = _layers_in_if_branch([helper.make_node("MatMul", ["x", "w1"], ["t"], name="mm1")])
    with pytest.raises(UsageError, match="inside If/Loop/Scan bodies"):
        _channels({"macs": 0.5}).call(ir.from_proto(proto), Context())


def test_reconstruct_refits_a_gemm_with_a_scalar_c() -> None:
    # Gemm's C may be one broadcast scalar: the refit bias (one per output) used to be reshaped to C's
    # shape and crashed; now C becomes the per-output bias. fc1's last 8 columns are zero, so the cut
    # loses nothing and the refit must reproduce the model up to its ridge term.
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(8, 16)).astype(np.float32)
    w1[:, 8:] = 0
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="fc2")]
    proto = make_model(nodes, [("x", F32, [2, 8])], [("y", F32, [2, 4])],
                       {"w1": w1, "w2": rng.normal(size=(16, 4)).astype(np.float32), "c2": np.array(0.5, np.float32)})
    model = ir.from_proto(proto)
    calib = load_data("random:64", input_specs(model))
    options = {"ratio": 0.5, "reconstruct": True, "compensate": False}
    stats = _channels(options).call(model, Context(calib=calib))
    assert stats.summary["reconstructed_consumers"] == 1
    fc2 = _node(model, "fc2")
    assert constant_array(fc2.inputs[1]).shape == (8, 4)
    np.testing.assert_allclose(constant_array(fc2.inputs[2]), np.full(4, 0.5), atol=1e-2)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feed = {"x": rng.normal(size=(2, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feed)[0], run_ort(proto, feed)[0], atol=1e-2)


def test_reconstruct_refits_a_1d_conv_with_auto_pad() -> None:
    # conv1's last 4 filters are zero, so the cut loses nothing: the refit of conv2 (1-D, SAME_UPPER,
    # stride 2), unfolded with its auto_pad resolved, must reproduce the model up to its ridge term.
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(8, 3, 3)).astype(np.float32)
    w1[4:] = 0
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", auto_pad="SAME_UPPER", strides=[2])]
    inits = {"w1": w1, "w2": rng.normal(size=(5, 8, 4)).astype(np.float32), "b2": rng.normal(size=5).astype(np.float32)}
    proto = make_model(nodes, [("x", F32, ["N", 3, 11])], [("y", F32, ["N", 5, 6])], inits)
    model = ir.from_proto(proto)
    calib = load_data("random:64", input_specs(model), dims={"N": 4})
    stats = _channels({"ratio": 0.5, "reconstruct": True, "compensate": False}).call(
        model, Context(calib=calib))
    assert stats.summary["reconstructed_consumers"] == 1
    assert constant_array(_node(model, "conv2").inputs[1]).shape == (5, 4, 4)
    feed = {"x": rng.normal(size=(3, 3, 11)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(model, feed)[0], run_ort(proto, feed)[0], atol=1e-2)
