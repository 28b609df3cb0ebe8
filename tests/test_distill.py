"""distill: refits against ONNX Runtime, every rewrite case, the constraints it keeps, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import F32, MODELS, accuracy, assert_same_outputs, digits_eval, make_model, run_ort
from onnx import TensorProto, helper
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt.analysis.fitting import im2col
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import new_initializer, record_origin, set_weight
from onnxopt.registry import make_pass

CNN = MODELS / "digits_cnn.onnx"
MLP = MODELS / "digits_mlp.onnx"
TRANSFORMER = MODELS / "digits_transformer.onnx"
CALIB = MODELS / "digits_calib.npz"


def _calib_images() -> np.ndarray:
    with np.load(CALIB) as d:
        return d["input"]


def _mlp_calib(model: ir.Model):
    x = _calib_images().reshape(-1, 64)
    return load_data([{"input": x[i : i + 32]} for i in range(0, len(x), 32)], input_specs(model))


def _mlp_eval() -> tuple[np.ndarray, np.ndarray]:
    return digits_eval("digits_mlp_eval.npz")


def _folded(path: Path) -> ir.Model:
    model = onnxopt.load(path)
    fold_model(model)
    return model


def _distill(model: ir.Model, teacher: Path, calib, **options) -> onnxopt.PassStats:
    return make_pass("distill", options).call(model, Context(original_path=teacher, calib=calib))


def _weight(model: ir.Model, name: str) -> np.ndarray:
    return np.array(model.graph.initializers[name].const_value.numpy())


def _add_noise(model: ir.Model, scale: float, seed: int = 0) -> None:
    _add_noise_named(model, [k for k in model.graph.initializers if k.endswith("weight")], scale, seed)


def _add_noise_named(model: ir.Model, names: list[str], scale: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        value = model.graph.initializers[name]
        w = value.const_value.numpy()
        set_weight(value, (w + rng.normal(0, scale * w.std(), w.shape)).astype(np.float32))


def _logit_error(model: ir.Model, teacher: Path, x: np.ndarray) -> float:
    ref = run_ort(teacher, {"input": x})[0]
    out = run_ort(model, {"input": x})[0]
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------------------ im2col
@pytest.mark.parametrize(
    ("kernel", "strides", "dilations", "pads", "group"),
    [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1), ((3, 2), (2, 1), (1, 2), (0, 1, 2, 0), 1),
     ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 4), ((3,), (2,), (2,), (1, 2), 2)],
)
def test_conv_features_times_weight_equal_onnx_runtime(kernel, strides, dilations, pads, group) -> None:
    rng = np.random.default_rng(1)
    cin, cout = 4, 8
    spatial = (7, 6)[: len(kernel)]
    w = rng.normal(size=(cout, cin // group, *kernel)).astype(np.float32)
    x = rng.normal(size=(2, cin, *spatial)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides),
                            dilations=list(dilations), pads=list(pads), group=group)
    proto = make_model([node], [("x", F32, list(x.shape))], [("y", F32, [f"d{i}" for i in range(x.ndim)])], {"w": w})
    y = run_ort(proto, {"x": x})[0]
    feats = im2col(x, kernel, strides, dilations, pads)
    f = feats.shape[1] // group
    per = cout // group
    rows = [feats[:, g * f : (g + 1) * f] @ w[g * per : (g + 1) * per].reshape(per, -1).T for g in range(group)]
    got = np.concatenate(rows, axis=1)
    np.testing.assert_allclose(got, np.moveaxis(y, 1, -1).reshape(-1, cout), rtol=1e-4, atol=1e-4)


def test_strided_grouped_conv_and_transposed_gemm_are_refit_to_the_teacher(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(0, 0.3, (6, 2, 3, 3)).astype(np.float32), "b1": rng.normal(0, 0.1, 6).astype(np.float32),
             "w2": rng.normal(0, 0.2, (5, 96)).astype(np.float32), "b2": rng.normal(0, 0.1, 5).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv", group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Transpose", ["f"], ["ft"], name="t", perm=[1, 0]),
        helper.make_node("Gemm", ["ft", "w2", "b2"], ["y"], name="gemm", transA=1, transB=1),
    ]
    teacher = tmp_path / "teacher.onnx"
    onnx.save(make_model(nodes, [("x", F32, ["N", 4, 7, 7])], [("y", F32, ["N", 5])], inits), str(teacher))
    student = onnxopt.load(teacher)
    _add_noise_named(student, ["w1", "w2"], 0.5)
    x = rng.normal(size=(256, 4, 7, 7)).astype(np.float32)
    calib = load_data([{"x": x[i : i + 32]} for i in range(0, 256, 32)], input_specs(student))
    held = {"x": rng.normal(size=(64, 4, 7, 7)).astype(np.float32)}
    ref = run_ort(teacher, held)[0]
    err_before = np.linalg.norm(run_ort(student, held)[0] - ref) / np.linalg.norm(ref)
    stats = _distill(student, teacher, calib, ridge=1e-4)
    assert {r["layer"] for r in stats.layers} == {"conv", "gemm"}
    err_after = np.linalg.norm(run_ort(student, held)[0] - ref) / np.linalg.norm(ref)
    assert err_after < 0.05 * err_before


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("path", [CNN, TRANSFORMER])
def test_uncompressed_model_is_left_unchanged(path: Path) -> None:
    model = _folded(path)
    if path == CNN:
        calib = load_data(str(CALIB), input_specs(model))
        feed = {"input": digits_eval()[0][:64]}
    else:
        x = _calib_images().reshape(-1, 8, 8)
        calib = load_data([{"input": x[i : i + 32]} for i in range(0, 128, 32)], input_specs(model))
        feed = {"input": digits_eval("digits_seq_eval.npz")[0][:64]}
    before = {k: np.array(v.const_value.numpy()) for k, v in model.graph.initializers.items()}
    stats = _distill(model, path, calib)
    assert stats.summary["layers_refit"] == 0 and not stats.modified
    assert all("already matches" in s["reason"] for s in stats.skipped if "weight" not in s["reason"])
    for k, v in model.graph.initializers.items():
        np.testing.assert_array_equal(v.const_value.numpy(), before[k])
    assert_same_outputs(onnxopt.load(path), model, feed, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ dense refit
def test_noisy_cnn_recovers_accuracy_and_every_layer_error_drops() -> None:
    model = _folded(CNN)
    _add_noise(model, 0.3)
    x, labels = digits_eval()
    before = accuracy(model, x, labels)
    nodes = len(model.graph)
    stats = _distill(model, CNN, load_data(str(CALIB), input_specs(model)), max_samples=64)
    after = accuracy(model, x, labels)
    assert len(model.graph) == nodes
    assert stats.summary["layers_refit"] == 9
    assert all(r["rel_err_after"] < r["rel_err_before"] for r in stats.layers)
    assert after > before and after >= accuracy(CNN, x, labels) - 0.02


def test_transformer_layers_refit_with_matmul_bias_adds() -> None:
    model = _folded(TRANSFORMER)
    _add_noise(model, 0.3)
    x = _calib_images().reshape(-1, 8, 8)
    calib = load_data([{"input": x[i : i + 32]} for i in range(0, 128, 32)], input_specs(model))
    held = digits_eval("digits_seq_eval.npz")[0]
    err_before = _logit_error(model, TRANSFORMER, held)
    stats = _distill(model, TRANSFORMER, calib)
    teachers = {r["teacher"] for r in stats.layers}
    assert {"block.attn.q.add.out", "block.ffn.fc2.add.out", "logits"} <= teachers
    assert {s["node"] for s in stats.skipped} == {"block.attn.scores", "block.attn.context"}
    assert all(r["rel_err_after"] < r["rel_err_before"] for r in stats.layers)
    assert _logit_error(model, TRANSFORMER, held) < 0.5 * err_before


# ------------------------------------------------------------------------------ masked refit
def _prune_smallest(model: ir.Model, sparsity: float) -> dict[str, np.ndarray]:
    masks = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            value = node.inputs[1]
            w = value.const_value.numpy()
            keep = np.abs(w) > np.quantile(np.abs(w), sparsity)
            set_weight(value, np.where(keep, w, 0).astype(np.float32))
            masks[value.name] = keep
    return masks


def test_pruned_zeros_stay_exactly_zero_and_accuracy_improves() -> None:
    model = _folded(CNN)
    masks = _prune_smallest(model, 0.8)
    x, labels = digits_eval()
    before = accuracy(model, x, labels)
    stats = _distill(model, CNN, load_data(str(CALIB), input_specs(model)), max_samples=64)
    assert stats.layers and all(r["kind"] == "masked" for r in stats.layers)
    for name, keep in masks.items():
        w = _weight(model, name)
        assert np.all(w[~keep] == 0), name
    assert accuracy(model, x, labels) > before


# ------------------------------------------------------------------------------ removed channels
def _drop_hidden_units(model: ir.Model, keep: np.ndarray) -> None:
    fc1, fc2 = model.graph.initializers["fc1.weight"], model.graph.initializers["fc2.weight"]
    bias = model.graph.initializers["fc1.bias"]
    set_weight(fc1, fc1.const_value.numpy()[keep])
    set_weight(bias, bias.const_value.numpy()[keep])
    set_weight(fc2, fc2.const_value.numpy()[:, keep])


def test_removed_channels_are_paired_with_their_teacher_channels() -> None:
    model = onnxopt.load(MLP)
    keep = np.sort(np.random.default_rng(0).choice(128, 64, replace=False))
    _drop_hidden_units(model, keep)
    x, labels = _mlp_eval()
    before = accuracy(model, x, labels)
    stats = _distill(model, MLP, _mlp_calib(model))
    rows = {r["layer"]: r for r in stats.layers}
    assert rows["fc2"]["channels_paired"] == "64/64"
    assert rows["fc2"]["rel_err_after"] < 0.5 * rows["fc2"]["rel_err_before"]
    assert rows["fc2"]["held_out_err_after"] < rows["fc2"]["held_out_err_before"]
    assert accuracy(model, x, labels) > before
    # fc1 only lost rows: it already matches the teacher's kept units, so it is not touched
    assert any(s["node"] == "fc1" and "already matches" in s["reason"] for s in stats.skipped)


def test_channel_pairing_survives_noise_on_the_kept_filters() -> None:
    model = onnxopt.load(MLP)
    keep = np.sort(np.random.default_rng(1).choice(128, 64, replace=False))
    _drop_hidden_units(model, keep)
    fc1 = model.graph.initializers["fc1.weight"]
    w = fc1.const_value.numpy()
    noisy = (w + np.random.default_rng(2).normal(0, 0.3 * w.std(), w.shape)).astype(np.float32)
    set_weight(fc1, noisy)
    stats = _distill(model, MLP, _mlp_calib(model), layers=["fc1"])
    row = next(r for r in stats.layers if r["layer"] == "fc1")
    assert row["channels_paired"] == "64/64"
    teacher_w = _weight(onnxopt.load(MLP), "fc1.weight")[keep]
    got = _weight(model, "fc1.weight")
    seen = _calib_images().reshape(-1, 64).std(axis=0) > 0.05  # pixels the transfer set lets one identify
    assert np.linalg.norm((got - teacher_w)[:, seen]) < 0.3 * np.linalg.norm((noisy - teacher_w)[:, seen])


# ------------------------------------------------------------------------------ factor pairs
def _factorize_fc1(model: ir.Model, rank: int) -> None:
    """fc1 (64->128) becomes fc1.u (64->rank, no bias) -> fc1 (rank->128, bias) by truncated SVD."""
    graph = model.graph
    fc1 = next(n for n in graph if n.name == "fc1")
    w = fc1.inputs[1].const_value.numpy()  # [128, 64] (transB)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    first = (np.sqrt(s[:rank])[:, None] * vt[:rank]).astype(np.float32)  # [rank, 64]
    second = (u[:, :rank] * np.sqrt(s[:rank])).astype(np.float32)  # [128, rank]
    wu = ir.Value(name="fc1.weight.u", shape=ir.Shape(first.shape), type=ir.TensorType(ir.DataType.FLOAT),
                  const_value=ir.tensor(first, name="fc1.weight.u"))
    graph.register_initializer(wu)
    node_u = ir.Node("", "Gemm", [fc1.inputs[0], wu], attributes=[ir.AttrInt64("transB", 1)], name="fc1.u")
    node_u.outputs[0].name = "fc1.out.u"
    node_u.outputs[0].shape = ir.Shape(["batch", rank])
    node_u.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph.insert_before(fc1, node_u)
    fc1.replace_input_with(0, node_u.outputs[0])
    set_weight(fc1.inputs[1], second)


def test_factor_pair_is_refit_jointly_at_its_rank() -> None:
    model = onnxopt.load(MLP)
    _factorize_fc1(model, 6)
    x, labels = _mlp_eval()
    before, err_before = accuracy(model, x, labels), _logit_error(model, MLP, x)
    nodes = [(n.op_type, n.name) for n in model.graph]
    stats = _distill(model, MLP, _mlp_calib(model), layers=["fc1*"])
    row = next(r for r in stats.layers if r["kind"] == "low-rank")
    assert row["layer"] == "fc1.u+fc1" and row["rel_err_after"] < row["rel_err_before"]
    assert [(n.op_type, n.name) for n in model.graph] == nodes
    assert _weight(model, "fc1.weight.u").shape == (6, 64) and _weight(model, "fc1.weight").shape == (128, 6)
    assert _logit_error(model, MLP, x) < err_before
    assert accuracy(model, x, labels) >= before


# ------------------------------------------------------------------------------ quantized weights
def _qdq_mlp(bits: int) -> ir.Model:
    """The MLP with every weight stored int8 per output channel (at `bits` of precision) behind DequantizeLinear."""
    model = onnxopt.load(MLP)
    graph = model.graph
    for node in [n for n in graph if n.op_type == "Gemm"]:
        weight = node.inputs[1]
        w = weight.const_value.numpy()  # [out, in]
        scale = (np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None]), -128, 127).astype(np.int8)
        inputs = [new_initializer(graph, f"{weight.name}.q", q), new_initializer(graph, f"{weight.name}.scale", scale),
                  new_initializer(graph, f"{weight.name}.zp", np.zeros(len(scale), np.int8))]
        dq = ir.Node("", "DequantizeLinear", inputs, attributes=[ir.AttrInt64("axis", 0)], name=f"{weight.name}.dq")
        dq.outputs[0].name = f"{weight.name}.dq.out"
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        graph.initializers.pop(weight.name)
    return model


def test_quantized_layers_are_refit_in_float_and_requantized() -> None:
    model = _qdq_mlp(3)
    scales = {k: _weight(model, k) for k in model.graph.initializers if k.endswith(".scale")}
    x, labels = _mlp_eval()
    err_before = _logit_error(model, MLP, x)
    q_before = _weight(model, "fc2.weight.q")
    stats = _distill(model, MLP, _mlp_calib(model))
    assert stats.layers and all("quantized" in r["kind"] for r in stats.layers)
    for name, scale in scales.items():
        np.testing.assert_array_equal(_weight(model, name), scale)
    q_after = _weight(model, "fc2.weight.q")
    assert q_after.dtype == np.int8 and not np.array_equal(q_after, q_before)
    assert np.all(q_after[q_before == 0] == 0)  # zero codes are kept as pruned entries
    assert [n.op_type for n in model.graph].count("DequantizeLinear") == 3
    assert _logit_error(model, MLP, x) < err_before


# ------------------------------------------------------------------------------ names, options
def test_student_tensor_is_paired_through_its_recorded_origin() -> None:
    model = onnxopt.load(MLP)
    _add_noise(model, 0.3)
    fc2 = next(n for n in model.graph if n.name == "fc2")
    fc2.outputs[0].name = "fc2.renamed"
    record_origin(fc2.outputs[0], "fc2.out")
    stats = _distill(model, MLP, _mlp_calib(model))
    assert next(r for r in stats.layers if r["layer"] == "fc2")["teacher"] == "fc2.out"


def test_layer_without_the_teachers_activation_is_compared_before_it() -> None:
    """A QDQ graph lets its clamp stand for a Relu: fc1 then outputs 'relu1.out' itself."""
    model = onnxopt.load(MLP)
    relu = next(n for n in model.graph if n.name == "relu1")
    fc1 = next(n for n in model.graph if n.name == "fc1")
    relu.outputs[0].replace_all_uses_with(fc1.outputs[0])
    model.graph.remove(relu, safe=True)
    fc1.outputs[0].name = "relu1.out"
    _add_noise(model, 0.3)
    stats = _distill(model, MLP, _mlp_calib(model), layers=["fc1"])
    assert [r["teacher"] for r in stats.layers] == ["fc1.out"]


def test_layers_option_refits_only_the_selected_layers() -> None:
    model = onnxopt.load(MLP)
    _add_noise(model, 0.3)
    before = {k: _weight(model, k) for k in ("fc1.weight", "fc2.weight", "fc3.weight")}
    stats = _distill(model, MLP, _mlp_calib(model), layers=["fc2"])
    assert [r["layer"] for r in stats.layers] == ["fc2"]
    np.testing.assert_array_equal(_weight(model, "fc1.weight"), before["fc1.weight"])
    np.testing.assert_array_equal(_weight(model, "fc3.weight"), before["fc3.weight"])
    assert not np.array_equal(_weight(model, "fc2.weight"), before["fc2.weight"])


def test_max_samples_bounds_the_transfer_set() -> None:
    model = onnxopt.load(MLP)
    _add_noise(model, 0.3)
    stats = _distill(model, MLP, _mlp_calib(model), max_samples=40)
    assert stats.summary["samples"] == 40
    assert all(r["rows"] == 40 for r in stats.layers)


def test_logits_step_fits_the_head_to_soft_targets_and_keeps_zeros() -> None:
    model = onnxopt.load(MLP)
    _add_noise(model, 0.5)
    head = model.graph.initializers["fc3.weight"]
    w = head.const_value.numpy()
    set_weight(head, np.where(np.abs(w) > np.median(np.abs(w)), w, 0).astype(np.float32))
    zeros = _weight(model, "fc3.weight") == 0
    stats = _distill(model, MLP, _mlp_calib(model), logits=True, T=2.0, holdout=0.0)
    soft = [r for r in stats.layers if r["kind"].startswith("soft")]
    assert len(soft) == 1 and soft[0]["layer"] == "fc3" and soft[0]["kl_after"] < soft[0]["kl_before"]
    assert np.all(_weight(model, "fc3.weight")[zeros] == 0)


def test_optimize_pipeline_uses_the_original_model_as_teacher(tmp_path: Path) -> None:
    x, labels = _mlp_eval()
    calib = [{"input": _calib_images().reshape(-1, 64)[i : i + 32]} for i in range(0, 128, 32)]
    result = onnxopt.optimize(str(MLP), ["fold", "distill"], calib=calib, data={"input": x, "labels": labels})
    assert result.passes[1].name == "distill"
    assert result.validation is not None and result.validation.accuracy_b == pytest.approx(
        result.validation.accuracy_a, abs=1e-9)
    # After a lossy pass the student differs from the model before the pipeline, so layers are refit:
    # a teacher taken from the pipeline's current model would already match and refit nothing.
    result = onnxopt.optimize(str(MLP), ["fold", ("prune", {"sparsity": 0.7, "scope": "layer"}), "distill"],
                              calib=calib)
    distill = result.passes[2].stats
    assert distill.summary["layers_refit"] > 0
    assert all(r["rel_err_after"] < r["rel_err_before"] for r in distill.layers)


# ------------------------------------------------------------------------------ bad input
def test_no_calibration_data_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--calib"):
        _distill(onnxopt.load(MLP), MLP, None)


@pytest.mark.parametrize(
    ("key", "value"), [("ridge", -0.1), ("max_samples", 0), ("T", 0.0), ("holdout", 1.0), ("ridge", "x")]
)
def test_bad_option_values_are_usage_errors(key: str, value) -> None:
    with pytest.raises(UsageError, match=f"distill.*{key}"):
        make_pass("distill", {key: value})


def test_layers_that_match_nothing_and_a_missing_teacher_are_usage_errors() -> None:
    model = onnxopt.load(MLP)
    with pytest.raises(UsageError, match="distill.layers: nope matches no layer .*fc1"):
        _distill(model, MLP, _mlp_calib(model), layers=["nope"])
    with pytest.raises(UsageError, match="does not exist"):
        make_pass("distill", {"teacher": "missing-teacher.onnx"}).call(model, Context(calib=_mlp_calib(model)))
    with pytest.raises(UsageError, match="distill.logits"):
        make_pass("distill", {"logits": "maybe"}, from_text=True)


def test_student_that_does_not_match_the_teacher_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="inputs .* do not match the teacher"):
        model = onnxopt.load(MLP)
        _distill(model, CNN, _mlp_calib(model))


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    from onnxopt.cli import main

    out = tmp_path / "o.onnx"
    cases = [
        [str(MLP), "--passes", "fold,distill", "-o", str(out)],
        [str(MLP), "--passes", "distill", "-o", str(out), "--calib", "random:4", "--set", "distill.ridge=-1"],
        [str(MLP), "--passes", "distill", "-o", str(out), "--calib", "random:4", "--set", f"distill.teacher={CNN}"],
    ]
    for argv in cases:
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert len(err.splitlines()) == 1 and "distill" in err, err
    assert not out.exists()


def test_runtime_session_accepts_the_distilled_file(tmp_path: Path) -> None:
    model = _qdq_mlp(4)
    assert _distill(model, MLP, _mlp_calib(model), layers=["fc3"]).layers
    path = tmp_path / "d.onnx"
    onnxopt.save(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": _mlp_eval()[0][:4]})[0].shape == (4, 10)
    assert TensorProto.INT8 in {i.data_type for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_refit_of_a_conv_with_auto_pad(tmp_path: Path, auto_pad: str) -> None:
    # A stride-2 conv with SAME padding: the refit must pad its input rows as ORT does.
    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", auto_pad=auto_pad, strides=[2, 2])]
    proto = make_model(nodes, [("x", F32, ["n", 3, 7, 7])], [("y", F32, ["n", 6, 4, 4])], {"w": w})
    teacher = tmp_path / "teacher.onnx"
    onnx.save(proto, str(teacher))
    student = ir.from_proto(proto)
    noisy = w + rng.normal(0, 0.2, w.shape).astype(np.float32)
    set_weight(student.graph.initializers["w"], noisy)
    feeds = [{"x": rng.normal(size=(8, 3, 7, 7)).astype(np.float32)} for _ in range(4)]
    calib = load_data(feeds, input_specs(student))
    x = rng.normal(size=(4, 3, 7, 7)).astype(np.float32)
    before = np.abs(run_ort(student, {"x": x})[0] - run_ort(proto, {"x": x})[0]).max()
    stats = make_pass("distill", {"holdout": 0.0}).call(student, Context(original_path=teacher, calib=calib))
    after = np.abs(run_ort(student, {"x": x})[0] - run_ort(proto, {"x": x})[0]).max()
    # Ridge pulls towards the current weights, so the fit is close, not exact; a wrong padding of the
    # border rows would leave an error of the order of the noise.
    assert stats.modified and after < before / 20
