"""The pipeline: pass specs and their coercion, recipes, --set pairs, onnx_ir passes as steps, failures
wrapped with the pass name, what a PassRecord holds, and what every pass may rely on: weights in Constant
nodes and IR-3 weights listed as graph inputs are weights, and shapes are inferred without retyping a
sequence or materializing a Range."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes
import pytest
from helpers import F32, make_model, run_ort, save_model
from onnx import helper, numpy_helper
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxopt import optimize
from onnxopt.analysis.stats import infer_shapes
from onnxopt.context import Context
from onnxopt.errors import ModelError, UsageError
from onnxopt.pipeline import PassFailure, Pipeline, apply_sets, parse_passes, read_recipe
from onnxopt.registry import Pass, PassStats, make_pass
from onnxopt.runtime import TapSession, run_taps
from onnxopt.validate import check_model_file


def _model() -> ir.Model:
    """x -> Identity -> Relu -> y, plus a dead Neg."""
    proto = make_model(
        [helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"]),
         helper.make_node("Neg", ["x"], ["dead"])],
        [("x", F32, [2])], [("y", F32, [2])],
    )
    return ir.from_proto(proto)


# ---------------------------------------------------------------------------------------- specs
def test_specs_are_coerced_from_their_declared_types() -> None:
    steps = Pipeline([("fold", {"max_fold_mb": "2", "batchnorm": "false"}), {"name": "fold", "dedup": "off"},
                      "fold", make_pass("fold", {"constants": False})]).passes
    assert (steps[0].max_fold_mb, steps[0].batchnorm) == (2.0, False)
    assert steps[1].dedup is False
    assert steps[2].options() == make_pass("fold").options() and steps[3].constants is False


@pytest.mark.parametrize(
    "spec, needle",
    [
        (42, "cannot read pass 42"),
        (("fold",), "cannot read pass ('fold',)"),
        ({"nam": "fold"}, "cannot read pass {'nam': 'fold'}"),
        ("nope", "unknown pass 'nope'"),
        (("fold", {"max_fold_mb": "big"}), "option fold.max_fold_mb: 'big' is not a valid float"),
        (("fold", {"max_fold_mb": 0}), "fold.max_fold_mb must be positive"),
        ({"name": "fold", "speed": 1}, "pass 'fold' has no option 'speed'"),
    ],
)
def test_bad_specs_are_usage_errors(spec, needle) -> None:
    with pytest.raises(UsageError) as err:
        Pipeline([spec])
    assert needle in str(err.value)


def test_parse_passes() -> None:
    assert parse_passes(" fold, prune ,") == ["fold", "prune"]
    with pytest.raises(UsageError, match="--passes needs at least one pass name"):
        parse_passes(" , ")
    with pytest.raises(UsageError, match="unknown pass 'nope'"):
        parse_passes("fold,nope")


def test_apply_sets_pairs_each_pass_with_its_options() -> None:
    got = apply_sets(["fold", "prune"], ["prune.sparsity=0.7", "fold.dedup=false", "prune.exclude=a=b,c"])
    assert got == [("fold", {"dedup": "false"}), ("prune", {"sparsity": "0.7", "exclude": "a=b,c"})]
    for item, needle in (("sparsity", "PASS.KEY=VALUE"), ("prune.sparsity", "PASS.KEY=VALUE"),
                         ("nodot=1", "PASS.KEY=VALUE"), ("quantize.mode=static", "pass 'quantize' is not in")):
        with pytest.raises(UsageError, match=needle):
            apply_sets(["fold", "prune"], [item])


# ---------------------------------------------------------------------------------------- recipes
def test_read_recipe_toml_and_json_forms(tmp_path: Path) -> None:
    toml = tmp_path / "r.toml"
    toml.write_text('passes = ["fold"]\n[[more]]\n')
    assert read_recipe(toml) == [("fold", {})]
    toml.write_text('[[passes]]\nname = "prune"\nsparsity = 0.5\nexclude = ["Gemm"]\n\n[[passes]]\nname = "fold"\n')
    assert read_recipe(toml) == [("prune", {"sparsity": 0.5, "exclude": ["Gemm"]}), ("fold", {})]
    js = tmp_path / "r.json"
    js.write_text(json.dumps([{"name": "fold", "dedup": False}, "prune"]))
    assert read_recipe(js) == [("fold", {"dedup": False}), ("prune", {})]
    js.write_text(json.dumps({"passes": [{"name": "fold"}]}))
    assert read_recipe(str(js)) == [("fold", {})]


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("bad.toml", "passes = [", "cannot be parsed"),
        ("bad.json", "{passes: }", "cannot be parsed"),
        ("empty.toml", "passes = []", "needs a non-empty list 'passes'"),
        ("none.toml", 'other = "x"', "needs a non-empty list 'passes'"),
        ("scalar.json", '"fold"', "needs a non-empty list 'passes'"),
        ("noname.toml", "[[passes]]\nsparsity = 0.5\n", "each pass needs a 'name'"),
        ("number.json", '{"passes": [3]}', "each pass needs a 'name' (3)"),
    ],
)
def test_bad_recipes_are_one_line_usage_errors(tmp_path: Path, name: str, text: str, needle: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        read_recipe(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_missing_recipe_is_named(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="recipe '.*gone.toml' does not exist"):
        read_recipe(tmp_path / "gone.toml")


# ---------------------------------------------------------------------------------------- running
def test_records_hold_name_options_stats_and_time() -> None:
    model = _model()
    records = Pipeline([("fold", {"max_fold_mb": 8}), "fold"]).run(model, Context())
    first, second = records
    assert first.name == "fold" and first.options["max_fold_mb"] == 8.0 and first.options["dedup"] is True
    assert first.stats.modified and first.stats.summary["identity_removed"] == 1
    assert first.stats.summary["dead_nodes_removed"] == 1 and not second.stats.modified
    assert first.seconds >= 0
    d = first.to_dict()
    assert {"name", "options", "seconds", "modified", "summary", "layers", "skipped", "notes"} <= set(d)
    json.dumps(d)  # the report writes it as JSON
    assert [n.op_type for n in model.graph] == ["Relu"]


def test_onnx_ir_passes_run_as_steps_and_are_recorded_by_class_name() -> None:
    model = _model()
    records = Pipeline([RemoveUnusedNodesPass(), TopologicalSortPass(), RemoveUnusedNodesPass()]).run(model, Context())
    assert [r.name for r in records] == ["RemoveUnusedNodesPass", "TopologicalSortPass", "RemoveUnusedNodesPass"]
    assert [r.stats.modified for r in records] == [True, False, False]
    assert [n.op_type for n in model.graph] == ["Identity", "Relu"]


def test_a_functional_onnx_ir_pass_hands_its_model_over() -> None:
    model = _model()
    records = Pipeline([onnx_ir.passes.functionalize(RemoveUnusedNodesPass())]).run(model)  # no context needed
    assert records[0].stats.modified and [n.op_type for n in model.graph] == ["Identity", "Relu"]


class _Raises(Pass):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
        raise self.exc


class _ReturnsText(Pass):
    def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
        return "done"  # type: ignore[return-value]


class _IRRaises(onnx_ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        raise ModelError("the weights are gone")


def test_failures_are_wrapped_with_the_pass_name() -> None:
    with pytest.raises(UsageError, match=r"^pass '_Raises': give --calib$"):
        Pipeline([_Raises(UsageError("give --calib"))]).run(_model(), Context())
    with pytest.raises(PassFailure, match=r"^pass '_Raises' failed: KeyError: 'w'$"):
        Pipeline([_Raises(KeyError("w"))]).run(_model(), Context())
    with pytest.raises(PassFailure, match="pass '_ReturnsText' returned str, not PassStats"):
        Pipeline([_ReturnsText()]).run(_model(), Context())
    with pytest.raises(ModelError, match=r"^pass 'PassManager': the weights are gone$"):
        Pipeline([onnx_ir.passes.PassManager([_IRRaises()])]).run(_model(), Context())


def test_each_step_leaves_the_graph_sorted() -> None:
    class Reverse(Pass):
        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            nodes = list(model.graph)
            for node in nodes:
                model.graph.remove(node)
            model.graph.extend(reversed(nodes))
            return PassStats(modified=True)

    model = _model()
    Pipeline([Reverse()]).run(model, Context())
    order = [n.op_type for n in model.graph]
    assert order.index("Identity") < order.index("Relu")
    x = np.array([-1.0, 2.0], np.float32)
    assert np.array_equal(next(run_taps(model, ["y"], [{"x": x}]))["y"], np.maximum(x, 0))


# -------------------------------------------------------------------------------- weights as every pass sees them
RNG = np.random.default_rng(7)


def _low_rank(rows: int, cols: int, rank: int) -> np.ndarray:
    return (RNG.standard_normal((rows, rank)) @ RNG.standard_normal((rank, cols)) / np.sqrt(rank)).astype(np.float32)


def _cnn_weights() -> dict[str, np.ndarray]:
    """A Conv -> Relu -> Conv(1x1) -> GlobalAveragePool -> Flatten -> MatMul -> Add net, low-rank where
    factorize can gain and with BatchNorm-free bias so every pass has work."""
    return {
        "w1": (RNG.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32),
        "b1": (RNG.standard_normal(16) * 0.1).astype(np.float32),
        "w2": _low_rank(32, 16, 2).reshape(32, 16, 1, 1),
        "b2": (RNG.standard_normal(32) * 0.1).astype(np.float32),
        "fc": _low_rank(32, 48, 3),
        "fcb": (RNG.standard_normal(48) * 0.1).astype(np.float32),
        "shape": np.array([-1, 32], np.int64),
    }


def _cnn_nodes() -> list:
    return [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Reshape", ["g", "shape"], ["f"], name="flat"),
        helper.make_node("MatMul", ["f", "fc"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fcb"], ["y"], name="fc_bias"),
    ]


def _cnn_pair(folder: Path) -> tuple[Path, Path]:
    """The same net twice: weights as initializers, and as Constant nodes (as Paddle exports them)."""
    weights = _cnn_weights()
    io = ([("x", F32, ["n", 3, 8, 8])], [("y", F32, ["n", 48])])
    as_inits = make_model(_cnn_nodes(), *io, weights, opset=13)
    consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in weights.items()]
    as_consts = make_model(consts + _cnn_nodes(), *io, opset=13)
    return save_model(as_inits, folder / "inits.onnx"), save_model(as_consts, folder / "consts.onnx")


def _outputs(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_ort(path, feed)


COMPRESSION = {
    "prune": ["prune"],
    # MAC-only decisions: this model's channel counts are below the SIMD-width rounding channels applies by
    # default, and the speed checks would make the comparison depend on the machine.
    "channels": [("channels", {"round_to": 1, "verify_speed": False})],
    "factorize": [("factorize", {"verify_speed": False})],
    "quantize": [("quantize", {"require_speedup": False})],
    "distill": [("prune", {"sparsity": 0.7}), "distill"],
}


@pytest.mark.parametrize("case", sorted(COMPRESSION))
def test_constant_node_weights_are_compressed_like_initializers(case: str, tmp_path: Path) -> None:
    inits, consts = _cnn_pair(tmp_path)
    feeds = [{"x": RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    results = {}
    for kind, src in (("inits", inits), ("consts", consts)):
        res = optimize(src, COMPRESSION[case], calib=feeds, data=feeds[:1], output=tmp_path / f"{kind}.out.onnx")
        results[kind] = (res, res.save(tmp_path / f"{kind}.out.onnx"))
    (a, a_path), (b, b_path) = results["inits"], results["consts"]
    assert b.passes[-1].stats.modified and a.passes[-1].stats.modified, case
    assert b.passes[-1].stats.summary == a.passes[-1].stats.summary
    assert "Constant" not in b.after.op_histogram
    assert any("Constant nodes became initializers" in n for n in b.passes[0].stats.notes)
    for x, y in zip(_outputs(a_path, feeds[0]), _outputs(b_path, feeds[0]), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.real
@pytest.mark.parametrize("spec", [["prune"], [("channels", {"round_to": 1, "verify_speed": False})],
                                  [("factorize", {"verify_speed": False})], [("quantize", {"require_speedup": False})],
                                  [("prune", {"sparsity": 0.5}), ("distill", {"layers": ["MatMul"], "holdout": 0.0})]],
                         ids=["prune", "channels", "factorize", "quantize", "distill"])
def test_paddle_constant_weights_are_weights_for_every_pass(spec: list, tmp_path: Path) -> None:
    """PP-OCR's classifier keeps every weight in a Constant node; each pass changes it as it changes the same
    model with those weights as initializers."""
    from models import real
    from onnxopt.graph import lift_constant_nodes

    src = real.model_path("ppocr_cls")
    if src is None:
        pytest.skip("rapidocr-onnxruntime is not installed")
    lifted = ir.load(src)
    assert lift_constant_nodes(lifted) > 100
    inits = save_model(lifted, tmp_path / "inits.onnx")
    feeds = real.feeds("ppocr_cls", 4)
    outs = []
    for src_path, name in ((src, "consts"), (inits, "inits")):
        res = optimize(src_path, spec, calib=feeds, data=feeds[:1], output=tmp_path / f"{name}.out.onnx")
        assert res.passes[-1].stats.modified, (name, res.passes[-1].stats.notes)
        outs.append(_outputs(res.save(tmp_path / f"{name}.out.onnx"), feeds[0]))
    for x, y in zip(*outs, strict=True):
        np.testing.assert_array_equal(x, y)


def test_prune_alone_compresses_constant_node_weights(tmp_path: Path) -> None:
    _, consts = _cnn_pair(tmp_path)
    res = optimize(consts, [("prune", {"sparsity": 0.5})], validate=False)
    assert res.after.nonzero < 0.6 * res.before.nonzero


# ---------------------------------------------------------------------------------------- IR version < 4
def _ir3_model(folder: Path) -> Path:
    """An IR-3 model (opset 8): every weight also a graph input, as IR 3 requires; a Constant node too."""
    weights = _cnn_weights()
    nodes = [helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.float32(0.5), "s"))]
    nodes += _cnn_nodes()[:-1] + [helper.make_node("Add", ["m", "fcb"], ["ys"]),
                                  helper.make_node("Mul", ["ys", "scale"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", F32, ["n", 3, 8, 8])]
    inputs += [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
               for k, v in weights.items()]
    graph = helper.make_graph(nodes, "ir3", inputs, [helper.make_tensor_value_info("y", F32, ["n", 48])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 3
    onnx.checker.check_model(proto, full_check=True)
    return save_model(proto, folder / "ir3.onnx")


@pytest.mark.parametrize("passes", [["fold"], ["prune"], [("quantize", {"require_speedup": False})],
                                    [("factorize", {"verify_speed": False})],
                                    ["prune", "distill"]],
                         ids=["fold", "prune", "quantize", "factorize", "prune+distill"])
def test_ir3_weights_are_constants_and_the_output_is_valid(passes: list[str], tmp_path: Path) -> None:
    src = _ir3_model(tmp_path)
    feeds = [{"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    res = optimize(src, passes, calib=feeds, data=feeds, output=tmp_path / "out.onnx")
    out = res.save(tmp_path / "out.onnx")
    check_model_file(out)  # the checker and strict shape inference (validation ran them too)
    saved = onnx.load(str(out))
    assert saved.ir_version >= 4 and [i.name for i in saved.graph.input] == ["x"]
    stats = res.passes[-1].stats
    assert stats.modified or passes == ["fold"], stats.notes  # the pipeline lifted fold's one Constant itself
    assert not any("not a constant initializer" in s["reason"] for s in stats.skipped)
    first = res.passes[0].stats.notes[0]
    assert "IR version 3 raised to 4: its 7 weights listed as graph inputs are constants" in first


def test_ir3_weights_kept_as_inputs_on_request_are_left_alone(tmp_path: Path) -> None:
    src = _ir3_model(tmp_path)
    res = optimize(src, ["fold", "prune"], initializer_inputs="input", output=tmp_path / "out.onnx")
    out = res.save(tmp_path / "out.onnx")
    check_model_file(out)
    saved = onnx.load(str(out))
    assert saved.ir_version == 4 and {i.name for i in saved.graph.input} == {"x", *_cnn_weights()}
    prune = res.passes[1].stats
    assert not prune.modified and len(prune.skipped) == 3
    assert all("constant" in s["reason"] for s in prune.skipped), prune.skipped
    assert "weights stay graph inputs" in res.passes[0].stats.notes[0]
    with pytest.raises(UsageError, match="initializer_inputs is 'constant' or 'input'"):
        optimize(src, ["fold"], initializer_inputs="weights")


def test_ir3_models_do_not_print_a_line_per_weight(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _ir3_model(tmp_path)
    with caplog.at_level(logging.WARNING):
        for mode in ("constant", "input"):
            optimize(src, ["fold"], initializer_inputs=mode, validate=False)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 2, caplog.text


def test_taps_of_an_ir3_model_read_weights_listed_as_inputs(tmp_path: Path) -> None:
    model = ir.load(_ir3_model(tmp_path))
    w1 = np.asarray(model.graph.initializers["w1"].const_value.numpy())
    feed = {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    with TapSession(model, ["w1", "c1"]) as taps:
        got = taps.run(feed, ["w1", "c1"])
        everything = taps.run(feed)
    np.testing.assert_array_equal(got["w1"], w1)
    assert got["c1"].shape == (1, 16, 8, 8) and "w1" in everything


# ---------------------------------------------------------------------------------------- shapes as passes see them
def _sequence_model() -> onnx.ModelProto:
    """x -> SequenceConstruct(x, x) -> SequenceAt(1) -> MatMul(w): the sequence has no declared type."""
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
             helper.make_node("SequenceAt", ["seq", "one"], ["picked"]),
             helper.make_node("MatMul", ["picked", "w"], ["y"])]
    return make_model(nodes, [("x", F32, [4, 8])], [("y", F32, [4, 6])],
                      {"one": np.array(1, np.int64), "w": RNG.standard_normal((8, 6)).astype(np.float32)})


def test_shape_inference_keeps_a_sequence_a_sequence() -> None:
    model = ir.from_proto(_sequence_model())
    assert infer_shapes(model)
    seq = next(n for n in model.graph if n.op_type == "SequenceConstruct").outputs[0]
    assert isinstance(seq.type, ir.SequenceType) and seq.type.elem_type.dtype == ir.DataType.FLOAT
    picked = next(n for n in model.graph if n.op_type == "SequenceAt").outputs[0]
    assert isinstance(picked.type, ir.TensorType) and list(picked.shape) == [4, 8]


@pytest.mark.parametrize("passes", [["quantize"], ["prune", "distill"]], ids=lambda p: "+".join(p))
def test_passes_that_tap_a_sequence_model_run(passes: list[str], tmp_path: Path) -> None:
    src = save_model(_sequence_model(), tmp_path / "seq.onnx")
    res = optimize(src, passes, calib="random:4", output=tmp_path / "out.onnx")
    check_model_file(res.save(tmp_path / "out.onnx"))


def _range_bomb(folder: Path) -> Path:
    """Range(0, 2**40) feeding a Cast: data propagation would list 2**40 dims."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Cast", ["r"], ["c"], to=onnx.TensorProto.INT64),
             helper.make_node("Shape", ["c"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["x", "nf"], ["y"])]
    inits = {"start": np.array(0, np.int64), "limit": np.array(2**40, np.int64), "delta": np.array(1, np.int64)}
    graph = helper.make_graph(nodes, "bomb", [helper.make_tensor_value_info("x", F32, [1])],
                              [helper.make_tensor_value_info("y", F32, [1])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return save_model(proto, folder / "bomb.onnx")


def test_shape_inference_of_a_range_bomb_stays_small(tmp_path: Path) -> None:
    """In a child limited to 2 GB of address space: shape inference, the validation checker and inspect."""
    bomb = _range_bomb(tmp_path)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "import onnx_ir as ir\n"
        "from onnxopt.analysis.stats import infer_shapes\n"
        "from onnxopt.validate import check_model_file\n"
        "model = ir.load(sys.argv[1])\n"
        "assert infer_shapes(model)\n"
        "check_model_file(sys.argv[1])\n"
        "print('inferred', next(n for n in model.graph if n.op_type == 'Range').outputs[0].shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inferred [1099511627776]" in proc.stdout


# ---------------------------------------------------------------------------------------- non-finite numbers
def _mlp(w1: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", F32, ["n", 16])], [("y", F32, ["n", 8])],
                      {"w1": w1, "w2": RNG.standard_normal((16, 8)).astype(np.float32)})


def _nan_weight() -> np.ndarray:
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    w[3, 5] = np.nan
    return w


NON_FINITE = [
    # (case, weight of fc1, calibration data, passes, what the message names)
    ("factorize", "nan", None, ["factorize"], "weight 'w1' of fc1 holds 1 NaN or infinite value"),
    ("quantize-static", "nan", "random:4", ["quantize"], "holds"),
    ("quantize-dynamic", "nan", None, [("quantize", {"mode": "dynamic"})], "weight 'w1' holds 1 NaN"),
    ("quantize-weight-only", "nan", None, [("quantize", {"mode": "weight-only"})], "weight 'w1' holds 1 NaN"),
    ("prune", "nan", None, ["prune"], "weight 'w1' holds 1 NaN or infinite value; its magnitudes cannot be ranked"),
    ("channels", "nan", None, ["channels"], "weight 'w1' holds 1 NaN or infinite value; its channels cannot be ranked"),
    ("quantize-all-nan-activation", "all-nan", "random:4", ["quantize"], "activation 'h' on the calibration data"),
    ("distill-nan-calibration", "ok", "nan", ["prune", "distill"], "calibration data"),
    ("quantize-inf-calibration", "ok", "inf", ["quantize"], "feed 0, input 'x' holds 1 NaN or infinite value"),
    ("factorize-data-aware", "ok", "nan", [("factorize", {"data_aware": True})], "calibration data"),
    ("prune-activation", "ok", "nan", [("prune", {"criterion": "activation"})], "calibration data"),
]


@pytest.mark.parametrize(("case", "weight", "calib", "passes", "needle"), NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_weights_and_data_are_one_line_user_errors(case, weight, calib, passes, needle,
                                                              tmp_path: Path) -> None:
    w1 = {"nan": _nan_weight(), "all-nan": np.full((16, 16), np.nan, np.float32),
          "ok": RNG.standard_normal((16, 16)).astype(np.float32)}[weight]
    src = save_model(_mlp(w1), tmp_path / "m.onnx")
    if calib in ("nan", "inf"):
        x = RNG.standard_normal((8, 16)).astype(np.float32)
        x[0, 0] = np.nan if calib == "nan" else np.inf
        calib = [{"x": x}]
    with pytest.raises((ModelError, UsageError)) as err:
        optimize(src, passes, calib=calib, validate=False)
    text = str(err.value)
    assert needle in text and "NaN or infinite" in text and "\n" not in text, text
