"""factorize: exact substitutions at full (or exact) rank against ONNX Runtime, rank choice, data-aware
whitening, skips with reasons, bad options."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, digits_eval, make_model, run_ort
from onnx import helper
from onnxopt.passes.factorize import FACTORIZED
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt import cli
from onnxopt.analysis.stats import macs_by_node
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.graph import origin_of
from onnxopt.registry import make_pass

RNG = np.random.default_rng(0)
# Float32 rounding of a chain of two or three products of O(1) values: relative to the output scale.
RTOL = 1e-4


def _factorize(model: onnx.ModelProto | ir.Model, ctx: Context | None = None, **options):
    """Run factorize deciding on MACs alone unless a test asks for the speed check (tests/test_speed.py)."""
    options.setdefault("verify_speed", False)
    m = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    stats = make_pass("factorize", options).call(m, ctx or Context())
    return m, stats


def _close(a: np.ndarray, b: np.ndarray, rtol: float = RTOL) -> None:
    assert a.shape == b.shape
    scale = float(np.abs(a).max()) or 1.0
    np.testing.assert_allclose(b, a, rtol=0, atol=rtol * scale)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------ exact cases
def _matmul_model() -> onnx.ModelProto:
    inits = {"w": RNG.normal(size=(24, 16)).astype(np.float32), "b": RNG.normal(size=16).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    return make_model(nodes, [("x", F32, ["N", 5, 24])], [("y", F32, ["N", 5, 16])], inits)


def _gemm_model(trans_b: int, alpha: float, beta: float) -> onnx.ModelProto:
    shape = (16, 24) if trans_b else (24, 16)
    inits = {"w": RNG.normal(size=shape).astype(np.float32), "c": RNG.normal(size=16).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)]
    return make_model(nodes, [("x", F32, ["N", 24])], [("y", F32, ["N", 16])], inits)


def _conv_model(w: np.ndarray, spatial: tuple[int, ...], bias: bool = True, **attrs) -> onnx.ModelProto:
    cout, cin = w.shape[:2]
    inits = {"w": w.astype(np.float32)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = RNG.normal(size=cout).astype(np.float32)
        inputs.append("b")
    nodes = [helper.make_node("Conv", inputs, ["c"], name="conv", **attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    out_shape = ["N", cout, *(f"s{i}" for i in range(len(spatial)))]
    return make_model(nodes, [("x", F32, ["N", cin, *spatial])], [("y", F32, out_shape)], inits)


@pytest.mark.parametrize("case", ["matmul", "gemm", "gemm_transb_alpha_beta"])
def test_svd_full_rank_is_exact(case: str) -> None:
    if case == "matmul":
        proto, feed = _matmul_model(), {"x": RNG.normal(size=(3, 5, 24)).astype(np.float32)}
    else:
        proto = _gemm_model(1, 0.7, 1.3) if case.endswith("beta") else _gemm_model(0, 1.0, 1.0)
        feed = {"x": RNG.normal(size=(4, 24)).astype(np.float32)}
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=1.0, min_saving=-1.0)
    op = "MatMul" if case == "matmul" else "Gemm"
    assert _ops(model).count(op) == 2
    assert stats.layers[0]["ranks"] == [16]
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])
    assert [o.name for o in model.graph.outputs] == ["y"]


CONV_GEOMETRY = {
    "pads": dict(pads=[1, 1, 1, 1]),
    "stride2_asym_pads": dict(strides=[2, 2], pads=[0, 1, 1, 0]),
    "dilation2": dict(dilations=[2, 2], pads=[2, 1, 2, 1]),
    "same_upper_stride2": dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower": dict(auto_pad="SAME_LOWER", strides=[2, 1]),
    "valid_stride_hw": dict(auto_pad="VALID", strides=[1, 2], dilations=[1, 2]),
}


@pytest.mark.parametrize("geometry", list(CONV_GEOMETRY))
def test_conv1x1_full_rank_is_exact(geometry: str) -> None:
    attrs = {k: v for k, v in CONV_GEOMETRY[geometry].items() if k != "dilations"}
    w = RNG.normal(size=(12, 10, 1, 1))
    proto = _conv_model(w, (9, 8), **attrs)
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=1.0, min_saving=-1.0)
    assert _ops(model) == ["Conv", "Conv", "Relu"] and stats.layers[0]["kind"] == "svd"
    feed = {"x": RNG.normal(size=(2, 10, 9, 8)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])


def _tucker_weight(cout: int, cin: int, kernel: tuple[int, ...], r_out: int, r_in: int) -> np.ndarray:
    core = RNG.normal(size=(r_out, r_in, *kernel))
    u_out = RNG.normal(size=(cout, r_out))
    u_in = RNG.normal(size=(cin, r_in))
    return np.einsum("kj...,ok,cj->oc...", core, u_out, u_in) / np.sqrt(r_in * r_out)


@pytest.mark.parametrize("geometry", list(CONV_GEOMETRY))
def test_tucker_at_exact_rank_is_exact(geometry: str) -> None:
    """A weight of Tucker rank (4, 4): factoring at that rank changes nothing but rounding."""
    w = _tucker_weight(16, 12, (3, 3), 4, 4)
    proto = _conv_model(w, (9, 10), **CONV_GEOMETRY[geometry])
    model, stats = _factorize(proto, rank_by="energy", energy=1.0 - 1e-9, round_to=1)
    assert _ops(model) == ["Conv", "Conv", "Conv", "Relu"]
    assert stats.layers[0]["ranks"] == [4, 4] and stats.layers[0]["kind"] == "tucker"
    shapes = [list(model.graph.initializers[n.inputs[1].name].shape) for n in model.graph if n.op_type == "Conv"]
    assert shapes == [[4, 12, 1, 1], [4, 4, 3, 3], [16, 4, 1, 1]]
    feed = {"x": RNG.normal(size=(2, 12, 9, 10)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])


@pytest.mark.parametrize("spatial", [(11,), (5, 6, 7)])
def test_tucker_other_spatial_ranks(spatial: tuple[int, ...]) -> None:
    kernel = (3,) * len(spatial)
    w = _tucker_weight(12, 12, kernel, 4, 4)
    n = len(spatial)
    proto = _conv_model(w, spatial, strides=[2] * n, pads=[1] * (2 * n))
    model, _ = _factorize(proto, rank_by="ratio", rank_ratio=1 / 3, round_to=1, min_saving=-1.0)
    assert _ops(model).count("Conv") == 3
    feed = {"x": RNG.normal(size=(1, 12, *spatial)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])


@pytest.mark.parametrize("geometry", list(CONV_GEOMETRY))
def test_spatial_at_exact_rank_is_exact(geometry: str) -> None:
    """A weight whose [Cin·kh, Cout·kw] matrix has rank 5: kh×1 then 1×kw reproduces it."""
    cout, cin, kh, kw = 12, 8, 3, 5
    m = RNG.normal(size=(cin * kh, 5)) @ RNG.normal(size=(5, cout * kw)) / np.sqrt(5)
    w = m.reshape(cin, kh, cout, kw).transpose(2, 0, 1, 3)
    attrs = dict(CONV_GEOMETRY[geometry])
    if "pads" in attrs and geometry == "pads":
        attrs["pads"] = [1, 2, 1, 2]
    proto = _conv_model(w, (10, 11), **attrs)
    model, stats = _factorize(proto, method="spatial", rank_by="energy", energy=1.0 - 1e-9, round_to=1)
    assert stats.layers[0]["ranks"] == [5] and stats.layers[0]["kind"] == "spatial"
    kernels = [tuple(n.attributes.get_ints("kernel_shape")) for n in model.graph if n.op_type == "Conv"]
    assert kernels == [(kh, 1), (1, kw)]
    feed = {"x": RNG.normal(size=(2, cin, 10, 11)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])


def test_data_aware_is_exact_when_inputs_span_the_rank() -> None:
    """Inputs confined to a 4-D subspace: whitened SVD at rank 4 reproduces the layer, plain SVD cannot."""
    rng = np.random.default_rng(1)
    proto = _matmul_model()
    basis = rng.normal(size=(4, 24))
    feeds = [{"x": (rng.normal(size=(8, 5, 4)) @ basis).astype(np.float32)} for _ in range(4)]
    test = {"x": (rng.normal(size=(8, 5, 4)) @ basis).astype(np.float32)}
    ref = run_ort(proto, test)[0]
    errors = {}
    for aware in (False, True):
        model = ir.from_proto(proto)
        calib = load_data(feeds, input_specs(model))
        model, stats = _factorize(model, Context(calib=calib), rank_by="ratio", rank_ratio=0.25, round_to=1,
                                  data_aware=aware, **({"damping": 1e-6} if aware else {}))
        assert stats.layers[0]["ranks"] == [4]
        errors[aware] = _rel(ref, run_ort(model, test)[0])
    assert errors[True] < 1e-4 < 0.1 < errors[False]


@pytest.mark.parametrize("method", ["tucker", "spatial"])
@pytest.mark.parametrize("geometry", ["same_upper_stride2", "stride2_asym_pads"])
def test_data_aware_conv_at_exact_rank_is_exact(method: str, geometry: str) -> None:
    """Whitening changes which subspace is kept, not exactness: at the weight's exact rank it still reproduces."""
    if method == "tucker":
        w, ranks = _tucker_weight(16, 12, (3, 3), 4, 4), [4, 4]
    else:
        m = RNG.normal(size=(12 * 3, 5)) @ RNG.normal(size=(5, 16 * 3)) / np.sqrt(5)
        w, ranks = m.reshape(12, 3, 16, 3).transpose(2, 0, 1, 3), [5]
    proto = _conv_model(w, (9, 10), **CONV_GEOMETRY[geometry])
    model = ir.from_proto(proto)
    feeds = [{"x": RNG.normal(size=(2, 12, 9, 10)).astype(np.float32)} for _ in range(3)]
    model, stats = _factorize(model, Context(calib=load_data(feeds, input_specs(model))), method=method,
                              rank_by="energy", energy=1.0 - 1e-9, round_to=1, data_aware=True, damping=1e-3)
    assert stats.layers[0]["ranks"] == ranks and stats.layers[0]["error_of"].startswith("output")
    feed = {"x": RNG.normal(size=(2, 12, 9, 10)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])


# ------------------------------------------------------------------------------ guards and skips
def test_layer_that_would_not_shrink_is_skipped_with_reason() -> None:
    proto = _gemm_model(0, 1.0, 1.0)
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=1.0)
    assert _ops(model) == ["Gemm"] and not stats.modified
    assert stats.skipped and "would keep" in stats.skipped[0]["reason"]


def test_grouped_and_shared_weights_are_left_alone() -> None:
    w = RNG.normal(size=(8, 2, 3, 3)).astype(np.float32)
    shared = RNG.normal(size=(16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="grouped", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c"], ["f"], name="flat"),
        helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["g"], name="slice"),
        helper.make_node("MatMul", ["g", "m"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "m"], ["y"], name="mm2"),
    ]
    inits = {"w": w, "m": shared, "s0": np.array([0]), "s1": np.array([16]), "ax": np.array([1])}
    proto = make_model(nodes, [("x", F32, ["N", 8, 4, 4])], [("y", F32, ["N", 16])], inits)
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=0.25)
    assert not stats.modified and _ops(model) == [n.op_type for n in proto.graph.node]
    reasons = {s["node"]: s["reason"] for s in stats.skipped}
    assert "grouped convolution" in reasons["grouped"]
    assert "shared" in reasons["mm1"] and "shared" in reasons["mm2"]


def test_second_run_leaves_factorized_layers_alone() -> None:
    proto = _matmul_model()
    model, first = _factorize(proto, rank_by="ratio", rank_ratio=0.25)
    assert first.modified and _ops(model).count("MatMul") == 2
    assert all(n.metadata_props.get(FACTORIZED) == "svd" for n in model.graph if n.op_type == "MatMul")
    again, second = _factorize(model, rank_by="ratio", rank_ratio=0.25)
    assert not second.modified and _ops(again).count("MatMul") == 2
    assert {s["reason"] for s in second.skipped} == {"already factorized"}


def test_names_survive_and_origins_are_recorded() -> None:
    proto = _conv_model(RNG.normal(size=(16, 16, 3, 3)), (6, 6), pads=[1, 1, 1, 1])
    model, _ = _factorize(proto, rank_by="ratio", rank_ratio=0.25)
    last = model.graph.node(-2)
    assert last.name == "conv" and last.outputs[0].name == "c"
    new_weights = [n.inputs[1] for n in model.graph if n.op_type == "Conv"]
    assert {origin_of(v) for v in new_weights} == {"w"} and "w" not in model.graph.initializers


@pytest.mark.parametrize(
    "key,value",
    [("rank_ratio", "0"), ("rank_ratio", "1.5"), ("energy", "0"), ("energy", "1.01"), ("method", "cp"),
     ("rank_by", "size"), ("round_to", "0"), ("min_saving", "1"), ("macs_target", "0"), ("damping", "-1"),
     ("verify_runs", "1"), ("min_speedup", "1")],
)
def test_bad_options_raise_usage_error(key: str, value: str) -> None:
    with pytest.raises(UsageError, match=key):
        make_pass("factorize", {key: value}, from_text=True)


@pytest.mark.parametrize("setting", ["factorize.rank_ratio=1.5", "factorize.energy=0", "factorize.method=cp"])
def test_cli_bad_option_is_one_line_exit_2(setting: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([str(MODELS / "digits_mlp.onnx"), "--passes", "factorize", "--set", setting,
                     "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and setting.split("=")[0].split(".")[1] in err
    assert not (tmp_path / "out.onnx").exists()


def test_cli_runs_factorize_with_calibration(tmp_path) -> None:
    out = tmp_path / "out.onnx"
    code = cli.main([str(MODELS / "digits_mlp.onnx"), "--passes", "fold,factorize",
                     "--set", "factorize.data_aware=true", "--set", "factorize.rank_by=ratio",
                     "--set", "factorize.rank_ratio=0.25", "--set", "factorize.verify_speed=false",
                     "--calib", str(MODELS / "digits_mlp_eval.npz"), "-o", str(out)])
    assert code == 0
    model = onnxopt.load(out)
    assert sum(n.op_type == "Gemm" for n in model.graph) > 3


def test_data_aware_needs_calibration() -> None:
    with pytest.raises(UsageError, match="--calib"):
        _factorize(_matmul_model(), data_aware=True)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, labels = digits_eval()
    ref = onnxopt.load(MODELS / "digits_cnn.onnx")
    return x, labels, run_ort(ref, {"input": x})[0]


def _digits_cnn(data_aware: bool, **options) -> tuple[ir.Model, onnxopt.PassStats]:
    model = onnxopt.load(MODELS / "digits_cnn.onnx")
    fold_model(model)
    calib = load_data(str(MODELS / "digits_calib.npz"), input_specs(model), batch=64) if data_aware else None
    return _factorize(model, Context(calib=calib), data_aware=data_aware, **options)


@pytest.mark.parametrize("method", ["tucker", "spatial"])
def test_digits_cnn_data_aware_beats_plain_at_same_ranks(digits, method: str) -> None:
    x, _, ref = digits
    results = {}
    for aware in (False, True):
        model, stats = _digits_cnn(aware, method=method, rank_by="ratio", rank_ratio=0.5)
        results[aware] = (model, stats, run_ort(model, {"input": x})[0])
    plain, aware = results[False], results[True]
    assert [r["ranks"] for r in plain[1].layers] == [r["ranks"] for r in aware[1].layers]
    assert plain[1].summary["macs_after"] == aware[1].summary["macs_after"] < plain[1].summary["macs_before"]
    assert any(s["reason"].startswith("depthwise") for s in plain[1].skipped)
    assert _rel(ref, aware[2]) < _rel(ref, plain[2])


def test_digits_cnn_macs_target_is_reached(digits) -> None:
    x, _, ref = digits
    before = sum(m for m in macs_by_node(_digits_cnn(False, rank_by="ratio", rank_ratio=1.0)[0]).values() if m)
    model, stats = _digits_cnn(False, rank_by="macs", macs_target=0.6)
    after = sum(m for m in macs_by_node(model).values() if m)
    assert stats.modified and after <= 0.6 * before
    assert run_ort(model, {"input": x})[0].shape == ref.shape


@pytest.mark.parametrize("ratio", [1.0, 0.375])
def test_transformer_matmuls_with_dynamic_seq(ratio: float) -> None:
    ref = onnxopt.load(MODELS / "digits_transformer.onnx")
    matmuls = sum(n.op_type == "MatMul" for n in ref.graph)
    model, stats = _factorize(onnxopt.load(MODELS / "digits_transformer.onnx"), rank_by="ratio", rank_ratio=ratio,
                              round_to=2, min_saving=-1.0 if ratio == 1.0 else 0.2)
    assert stats.layers and all(r["op"] == "MatMul" for r in stats.layers)
    assert sum(n.op_type == "MatMul" for n in model.graph) == matmuls + len(stats.layers)
    if ratio < 1.0:
        assert all(r["params_after"] < r["params_before"] and 0 < r["est_rel_error"] < 1 for r in stats.layers)
    for seq in (5, 16):
        feed = {"input": RNG.random((3, seq, 8)).astype(np.float32)}
        a, b = run_ort(ref, feed)[0], run_ort(model, feed)[0]
        assert a.shape == b.shape and np.isfinite(b).all()
        if ratio == 1.0:
            _close(a, b)


# ------------------------------------------------------------------------------ regressions from real models
def test_one_channel_conv_with_a_long_kernel_decomposes() -> None:
    # A 1-channel conv (an STFT basis, [Cout, 1, k]) unfolds to a [1, Cout·k] matrix: only its left
    # singular vectors may be formed, a full right factor of 48000² would not fit in memory.
    w = RNG.normal(size=(4, 1, 12000)).astype(np.float32)
    proto = _conv_model(w, (12000,), bias=False)
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=0.5, round_to=1, min_saving=-1.0)
    assert stats.modified
    x = RNG.normal(size=(1, 1, 12000)).astype(np.float32)
    assert run_ort(model, {"x": x})[0].shape == (1, 4, 1)


def _if_matmul_model() -> onnx.ModelProto:
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="mm_then")], "then", [],
                               [helper.make_tensor_value_info("t", F32, [2, 8])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                               [helper.make_tensor_value_info("e", F32, [2, 8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [("x", F32, [2, 8]), ("cond", onnx.TensorProto.BOOL, [])], [("y", F32, [2, 8])],
                      {"w": w})


def test_layers_inside_subgraphs_are_listed_as_skipped() -> None:
    model, stats = _factorize(_if_matmul_model(), rank_by="ratio", rank_ratio=0.25, min_saving=-1.0)
    assert not stats.modified
    assert [s["node"] for s in stats.skipped] == ["mm_then"]
    assert "If/Loop/Scan" in stats.skipped[0]["reason"]


def test_no_layer_at_all_is_a_note() -> None:
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", F32, [2])], [("y", F32, [2])])
    _, stats = _factorize(proto)
    assert not stats.modified and not stats.skipped
    assert "no Conv, Gemm or MatMul" in stats.notes[0]


@pytest.mark.parametrize(("opset", "domain"), [(9, ""), (10, ""), (11, ""), (9, "ai.onnx")])
def test_gemm_chain_is_valid_at_old_opsets(opset: int, domain: str) -> None:
    # Before opset 11 Gemm requires C: the stage without a bias must not be a two-input Gemm,
    # also when the model names its default domain by the alias "ai.onnx".
    inits = {"w": RNG.normal(size=(24, 16)).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w"] + ([] if opset >= 11 else ["c"]), ["y"], name="gemm")]
    if opset < 11:
        inits["c"] = RNG.normal(size=16).astype(np.float32)
    proto = make_model(nodes, [("x", F32, ["N", 24])], [("y", F32, ["N", 16])], inits, opset=opset)
    proto.opset_import[0].domain = domain
    model, stats = _factorize(proto, rank_by="ratio", rank_ratio=1.0, min_saving=-1.0)
    assert stats.modified
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    if opset < 11:
        assert all(len(n.input) == 3 for n in out.graph.node if n.op_type == "Gemm")
    feed = {"x": RNG.normal(size=(4, 24)).astype(np.float32)}
    _close(run_ort(proto, feed)[0], run_ort(model, feed)[0])
