"""merge: ensembles, chain and soup against the members run separately in ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, I64, MODELS, make_model, run_ort, save_model
from onnx import helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import ModelError, UsageError
from onnxopt.merge import ENSEMBLE_MODES, merge, merge_models

# Float rounding: the merged graph reorders no arithmetic inside a member; combining adds one
# sum/division, so results agree to a few float32 ulps.
RTOL, ATOL = 1e-5, 1e-6
SEEDS = [MODELS / f"digits_mlp_seed{s}.onnx" for s in (1, 2, 3)]
FINETUNED = [MODELS / f"digits_mlp_ft{s}.onnx" for s in (1, 2, 3)]


def _linear(op_after: str, opset: int, seed: int, *, batch: str = "batch", in_name: str = "x",
            dtype: int = F32, width: int = 4, out: int = 5) -> onnx.ModelProto:
    """x [batch, width] -> MatMul -> Add -> op_after -> y [batch, out]; names collide across members."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", [in_name, "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["z"], name="add"),
        helper.make_node(op_after, ["z"], ["y"], name="act"),
    ]
    inits = {"W": rng.standard_normal((width, out)).astype(np.float32),
             "b": rng.standard_normal(out).astype(np.float32)}
    return make_model(nodes, [(in_name, dtype, [batch, width])], [("y", F32, [batch, out])], inits, opset=opset)


@pytest.fixture(scope="module")
def members() -> list[onnx.ModelProto]:
    """Three members at opsets 11, 13 and 17 with dynamic batch (two dim names) and colliding names."""
    return [_linear("Relu", 11, 0), _linear("Tanh", 13, 1, batch="N"), _linear("Sigmoid", 17, 2)]


def _feeds(rows: int, width: int = 4) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(rows).standard_normal((rows, width)).astype(np.float32)}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _expected(mode: str, outs: list[np.ndarray], weights: list[float] | None) -> np.ndarray:
    stacked = np.stack(outs)
    w = None if weights is None else np.asarray(weights, np.float64) / sum(weights)
    if mode == "mean":
        return stacked.mean(axis=0)
    if mode == "weighted":
        return np.tensordot(w, stacked, axes=1)
    if mode == "max":
        return stacked.max(axis=0)
    if mode == "softvote":
        return np.tensordot(w if w is not None else np.full(len(outs), 1 / len(outs)), _softmax(stacked), axes=1)
    if mode == "concat":
        return np.concatenate(outs, axis=-1)
    if mode == "stack":
        return stacked
    votes = np.zeros_like(outs[0])
    for o in outs:
        votes[np.arange(len(o)), o.argmax(axis=-1)] += 1
    scores = stacked.sum(axis=0)
    masked = np.where(votes == votes.max(axis=-1, keepdims=True), scores, -np.inf)
    result = votes.copy()
    result[np.arange(len(o)), masked.argmax(axis=-1)] += 0.5
    return result


@pytest.mark.parametrize("mode", ENSEMBLE_MODES)
def test_ensemble_equals_members_run_separately(members: list[onnx.ModelProto], mode: str) -> None:
    weights = [1.0, 2.0, 3.0] if mode in ("weighted", "softvote") else None
    merged = merge(members, combine=mode, weights=weights)
    assert isinstance(merged, onnx.ModelProto)
    onnx.checker.check_model(merged, full_check=True)
    assert merged.opset_import[0].version == 17
    assert [i.name for i in merged.graph.input] == ["x"]
    assert [o.name for o in merged.graph.output] == ["y"]
    for rows in (1, 7):  # dynamic batch
        feeds = _feeds(rows)
        outs = [run_ort(m, feeds)[0] for m in members]
        got = run_ort(merged, feeds)[0]
        want = _expected(mode, outs, weights)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_vote_ties_go_to_largest_summed_score() -> None:
    # Two members disagree on every row: each class gets one vote, the larger summed score wins.
    a, b = _linear("Relu", 21, 3, out=3), _linear("Relu", 17, 4, out=3)  # opset 21: ReduceMax takes axes as input
    merged = merge([a, b], combine="vote")
    assert merged.opset_import[0].version == 21
    feeds = _feeds(64)
    oa, ob = run_ort(a, feeds)[0], run_ort(b, feeds)[0]
    got = run_ort(merged, feeds)[0]
    np.testing.assert_array_equal(got, _expected("vote", [oa, ob], None))
    np.testing.assert_array_equal(np.floor(got).sum(axis=-1), np.full(64, 2.0))
    ca, cb, summed = oa.argmax(-1), ob.argmax(-1), oa + ob
    rows = np.flatnonzero(ca != cb)
    assert rows.size > 0
    sa, sb = summed[rows, ca[rows]], summed[rows, cb[rows]]
    winner = np.where(sa > sb, ca[rows], np.where(sa < sb, cb[rows], np.minimum(ca[rows], cb[rows])))
    np.testing.assert_array_equal(got.argmax(-1)[rows], winner)


def test_names_prefixed_and_members_kept(members: list[onnx.ModelProto]) -> None:
    merged, report = merge_models(members, combine="mean", keep_members=True, names=["r", "t", "s"])
    proto = ir.to_proto(merged)
    names = [n.name for n in proto.graph.node]
    assert len(names) == len(set(names))
    for prefix in ("r.", "t.", "s."):
        assert {f"{prefix}mm", f"{prefix}add", f"{prefix}act"} <= set(names)
        assert f"{prefix}W" in {i.name for i in proto.graph.initializer}
    assert [o.name for o in proto.graph.output] == ["y", "r.y", "t.y", "s.y"]
    assert report.opset == 17 and len(report.notes) == 2  # two members converted
    feeds = _feeds(3)
    got = run_ort(merged, feeds)
    for member, kept in zip(members, got[1:]):
        np.testing.assert_allclose(kept, run_ort(member, feeds)[0], rtol=RTOL, atol=ATOL)
    assert proto.ir_version >= 8
    assert "onnxopt.merge" in {p.key for p in proto.metadata_props}


def test_subgraphs_prefixed_and_single_outputs_pass_through() -> None:
    then = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"], name="mul")], "then", [],
                             [helper.make_tensor_value_info("t", F32, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("e", F32, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Identity", ["s"], ["aux"], name="id")]
    inits = {"k": np.float32(2.0), "zero": np.float32(0.0)}
    branchy = make_model(nodes, [("x", F32, [4])], [("y", F32, [4]), ("aux", F32, [])], inits, opset=17)
    plain = make_model([helper.make_node("Relu", ["x"], ["y"], name="mul")], [("x", F32, [4])], [("y", F32, [4])],
                       opset=17)
    merged = merge([branchy, plain], combine="mean", names=["a", "b"])
    branches = {a.name: a.g for a in next(n for n in merged.graph.node if n.op_type == "If").attribute}
    body = branches["then_branch"]
    assert body.node[0].name == "a.mul" and list(body.node[0].input) == ["x", "a.k"]
    assert [o.name for o in merged.graph.output] == ["y", "aux"]
    for x in (np.array([1, -2, 3, 4], np.float32), np.array([-5, 1, 0, 2], np.float32)):
        y, aux = run_ort(merged, {"x": x})
        want_a = run_ort(branchy, {"x": x})
        np.testing.assert_allclose(y, (want_a[0] + np.maximum(x, 0)) / 2, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(aux, want_a[1], rtol=RTOL, atol=ATOL)


def test_identical_initializers_stored_once() -> None:
    a = _linear("Relu", 17, 5)
    b = _linear("Tanh", 17, 5)  # same seed: same W and b
    merged, report = merge_models([a, b], combine="concat")
    assert report.initializers_deduplicated == 2
    assert len(merged.graph.initializers) == 2
    feeds = _feeds(4)
    want = np.concatenate([run_ort(a, feeds)[0], run_ort(b, feeds)[0]], axis=-1)
    np.testing.assert_allclose(run_ort(merged, feeds)[0], want, rtol=RTOL, atol=ATOL)


def test_input_map_renames_a_member_input() -> None:
    a, b = _linear("Relu", 17, 6), _linear("Relu", 17, 7, in_name="data")
    merged = merge([a, b], combine="max", input_map=["1:data=x"])
    assert [i.name for i in merged.graph.input] == ["x"]
    feeds = _feeds(5)
    want = np.maximum(run_ort(a, feeds)[0], run_ort(b, {"data": feeds["x"]})[0])
    np.testing.assert_allclose(run_ort(merged, feeds)[0], want, rtol=RTOL, atol=ATOL)


def test_fixed_dim_wins_over_symbolic() -> None:
    a, b = _linear("Relu", 17, 8), _linear("Relu", 17, 9, batch=3)  # type: ignore[arg-type]
    merged = merge([a, b], combine="mean")
    dims = [d.dim_value or d.dim_param for d in merged.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 4]


def test_chain_feeds_outputs_into_next_inputs() -> None:
    a = _linear("Relu", 13, 10)  # x [batch,4] -> y [batch,5]
    b = _linear("Tanh", 17, 11, in_name="features", width=5, out=3)
    merged = merge([a, b], combine="chain", input_map=["y=features"])
    assert [i.name for i in merged.graph.input] == ["x"]
    assert [o.name for o in merged.graph.output] == ["y"]
    for rows in (1, 6):
        feeds = _feeds(rows)
        want = run_ort(b, {"features": run_ort(a, feeds)[0]})[0]
        np.testing.assert_allclose(run_ort(merged, feeds)[0], want, rtol=RTOL, atol=ATOL)
    # one output into one input connects without a map; keep_members exposes the first stage
    auto = merge([a, b], combine="chain", keep_members=True, names=["enc", "head"])
    feeds = _feeds(2)
    out, first = run_ort(auto, feeds)
    np.testing.assert_allclose(first, run_ort(a, feeds)[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out, run_ort(b, {"features": first})[0], rtol=RTOL, atol=ATOL)


def test_chain_of_three() -> None:
    stages = [_linear("Relu", 17, 20), _linear("Tanh", 17, 21, in_name="h1", width=5, out=4),
              _linear("Sigmoid", 13, 22, in_name="h2", width=4, out=2)]
    merged = merge(stages, combine="chain", input_map=["1:y=h1", "2:y=h2"])
    feeds = _feeds(3)
    want = run_ort(stages[2], {"h2": run_ort(stages[1], {"h1": run_ort(stages[0], feeds)[0]})[0]})[0]
    np.testing.assert_allclose(run_ort(merged, feeds)[0], want, rtol=RTOL, atol=ATOL)
    assert len(merged.graph.node) == 9


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_soup_averages_weights() -> None:
    soup, report = merge_models(FINETUNED, combine="soup", weights=[1, 1, 2])
    proto = ir.to_proto(soup)
    base = onnx.load(str(FINETUNED[0]))
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in base.graph.node]
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    parts = [_weights(p) for p in FINETUNED]
    got = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(got) == set(parts[0])
    for name, arr in got.items():
        want = (parts[0][name] + parts[1][name] + 2 * parts[2][name]) / 4
        np.testing.assert_allclose(arr, want, rtol=1e-6, atol=1e-7)
    assert report.parameters == sum(a.size for a in parts[0].values())
    # members at different opsets are converted, then averaged
    newer = onnx.version_converter.convert_version(onnx.load(str(FINETUNED[1])), 17)
    mixed = merge([onnx.load(str(FINETUNED[0])), newer], combine="soup")
    assert mixed.opset_import[0].version == 17
    for t in mixed.graph.initializer:
        want = (parts[0][t.name] + parts[1][t.name]) / 2
        np.testing.assert_allclose(onnx.numpy_helper.to_array(t), want, rtol=1e-6, atol=1e-7)
    # soup of identical models is the model itself
    same = merge([FINETUNED[0], FINETUNED[0]], combine="soup")
    x = np.load(MODELS / "digits_mlp_eval.npz")["input"][:16]
    np.testing.assert_allclose(run_ort(same, {"input": x})[0], run_ort(base, {"input": x})[0], rtol=RTOL, atol=ATOL)


def test_digits_ensemble_at_least_best_member_and_soup_reported() -> None:
    with np.load(MODELS / "digits_mlp_eval.npz") as d:
        x, labels = d["input"], d["labels"]

    def acc(model: object) -> float:
        return float(np.mean(run_ort(model, {"input": x})[0].argmax(-1) == labels))

    best = max(acc(p) for p in SEEDS)
    for mode in ("mean", "softvote", "vote"):
        assert acc(merge(SEEDS, combine=mode)) >= best, mode
    soup = merge(FINETUNED, combine="soup")
    assert acc(soup) >= min(acc(p) for p in FINETUNED) - 0.02


def test_merged_model_runs_through_other_passes(tmp_path: Path) -> None:
    merged = merge(SEEDS, combine="softvote", output=tmp_path / "ens.onnx")
    result = onnxopt.optimize(tmp_path / "ens.onnx", ["fold"], data=str(MODELS / "digits_mlp_eval.npz"))
    assert result.validation is not None and result.validation.outputs[0].max_abs < 1e-5
    assert isinstance(merged, ir.Model)


def test_cli_writes_merged_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ens.onnx"
    code = main(["merge", *map(str, SEEDS), "-o", str(out), "--combine", "weighted", "--weights", "1,1,2"])
    assert code == 0 and out.exists()
    assert "merged (weighted)" in capsys.readouterr().out
    x = np.load(MODELS / "digits_mlp_eval.npz")["input"][:8]
    outs = [run_ort(p, {"input": x})[0] for p in SEEDS]
    np.testing.assert_allclose(run_ort(out, {"input": x})[0], _expected("weighted", outs, [1, 1, 2]),
                               rtol=RTOL, atol=ATOL)
    ext = tmp_path / "ext.onnx"
    code = main(["merge", *map(str, SEEDS), "-o", str(ext), "--combine", "stack", "--json", "--external-data",
                 "--names", "a,b,c", "--keep-members"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (tmp_path / "ext.onnx.data").exists()
    assert [m["name"] for m in report["members"]] == ["a", "b", "c"] and report["combine"] == "stack"
    got = run_ort(ext, {"input": x})
    assert [o.shape for o in got] == [(3, 8, 10), (8, 10), (8, 10), (8, 10)]
    np.testing.assert_allclose(got[0], np.stack(outs), rtol=RTOL, atol=ATOL)


def test_merge_verb_as_a_command(tmp_path: Path) -> None:
    out = tmp_path / "vote.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxopt", "merge", *map(str, SEEDS), "-o", str(out), "--combine", "vote",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["output"] == str(out) and [m["name"] for m in report["members"]] == [p.stem for p in SEEDS]
    x = np.load(MODELS / "digits_mlp_eval.npz")["input"][:16]
    outs = [run_ort(p, {"input": x})[0] for p in SEEDS]
    np.testing.assert_array_equal(run_ort(out, {"input": x})[0], _expected("vote", outs, None))
    r = subprocess.run([sys.executable, "-m", "onnxopt", "merge", str(SEEDS[0]), "-o", str(tmp_path / "one.onnx"),
                        "--combine", "mean"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "onnxopt: error: merge: give at least two models (got 1)"


def test_caller_models_unchanged(members: list[onnx.ModelProto], tmp_path: Path) -> None:
    before = [m.SerializeToString() for m in members]
    irm = ir.from_proto(members[2])
    merge([*members[:2], irm], combine="stack")
    assert [m.SerializeToString() for m in members] == before
    assert irm.graph.node(0).name == "mm" and irm.graph.initializers["W"].const_value.name == "W"
    # an in-memory member whose weights live in an external data file
    onnxopt.save(onnxopt.load(SEEDS[0]), tmp_path / "ext.onnx", external_data=True)
    external = onnxopt.load(tmp_path / "ext.onnx")
    merge([external, SEEDS[1]], combine="mean", output=tmp_path / "merged.onnx")
    assert isinstance(external.graph.initializers["fc1.weight"].const_value, ir.ExternalTensor)
    x = np.load(MODELS / "digits_mlp_eval.npz")["input"][:4]
    want = (run_ort(SEEDS[0], {"input": x})[0] + run_ort(SEEDS[1], {"input": x})[0]) / 2
    np.testing.assert_allclose(run_ort(tmp_path / "merged.onnx", {"input": x})[0], want, rtol=RTOL, atol=ATOL)
    # the same file as a path, converted to the other member's opset 17: its weights stay in the external file
    newer = onnx.version_converter.convert_version(onnx.load(str(SEEDS[1])), 17)
    merged = merge([str(tmp_path / "ext.onnx"), newer], combine="mean")
    assert merged.opset_imports[""] == 17
    assert isinstance(merged.graph.initializers["ext.fc1.weight"].const_value, ir.ExternalTensor)
    onnxopt.save(merged, tmp_path / "merged17.onnx")
    np.testing.assert_allclose(run_ort(tmp_path / "merged17.onnx", {"input": x})[0], want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ bad input


def _int_input() -> onnx.ModelProto:
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=F32)]
    return make_model(nodes, [("x", I64, ["batch", 4])], [("y", F32, ["batch", 4])], opset=17)


def _save(tmp_path: Path, name: str, model: onnx.ModelProto) -> str:
    return str(save_model(model, tmp_path / name))


@pytest.mark.parametrize(
    ("second", "extra", "message"),
    [
        (lambda: _int_input(), [], "has float, member 'b' has int64"),
        (lambda: _linear("Relu", 17, 1, width=6), [], "dimension 1 is 4"),
        (lambda: _linear("Relu", 17, 1), ["--weights", "1,2,3"], "3 weights for 2 members"),
        (lambda: _linear("Relu", 17, 1), ["--weights", "0,0"], "positive sum"),
        (lambda: _linear("Relu", 17, 1), ["--weights", "1,x"], "comma-separated"),
        (lambda: _linear("Relu", 17, 1), ["--names", "a,a"], "distinct"),
        (lambda: _linear("Relu", 17, 1), ["--axis", "2"], "out of range"),
        (lambda: _linear("Relu", 17, 1), ["--input-map", "nope=x"], "not an input"),
        (lambda: _linear("Relu", 17, 1), ["--input-map", "9:x=x"], "names no member"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  second, extra, message) -> None:
    a = _save(tmp_path, "a.onnx", _linear("Relu", 17, 0))
    b = _save(tmp_path, "b.onnx", second())
    out = tmp_path / "out.onnx"
    combine = "weighted" if "--weights" in extra else ("softvote" if "--axis" in extra else "mean")
    code = main(["merge", a, b, "-o", str(out), "--combine", combine, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_soup_on_different_architectures_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soup.onnx"
    code = main(["merge", str(SEEDS[0]), str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--combine", "soup"])
    assert code == 2 and "architecture" in capsys.readouterr().err and not out.exists()
    relu, tanh = _linear("Relu", 17, 0), _linear("Tanh", 17, 1)
    with pytest.raises(ModelError, match="node 2 'act': op Relu vs Tanh"):
        merge([relu, tanh], combine="soup")
    with pytest.raises(ModelError, match="weight 'W'"):
        merge([relu, _linear("Relu", 17, 1, out=6)], combine="soup")


def test_chain_input_map_naming_missing_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path, "a.onnx", _linear("Relu", 17, 0))
    b = _save(tmp_path, "b.onnx", _linear("Relu", 17, 1, in_name="features", width=5))
    out = tmp_path / "chain.onnx"
    code = main(["merge", a, b, "-o", str(out), "--combine", "chain", "--input-map", "missing=features"])
    assert code == 2 and "missing" in capsys.readouterr().err and not out.exists()
    with pytest.raises(UsageError, match="no input 'nope'"):
        merge([a, b], combine="chain", input_map=["1:y=nope"])
    with pytest.raises(ModelError, match="dimension 1"):  # y is [batch,5], the next input wants 4
        merge([a, a], combine="chain")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"combine": "blend"}, "unknown mode 'blend'"),
        ({"combine": "weighted"}, "needs one weight per member"),
        ({"combine": "mean", "weights": [1, 1]}, "takes no weights"),
        ({"combine": "weighted", "weights": [1, -1]}, "non-negative"),
        ({"combine": "soup", "keep_members": True}, "keep_members"),
        ({"combine": "soup", "input_map": ["x=x"]}, "input_map"),
        ({"combine": "mean", "names": ["a"]}, "1 names for 2 members"),
        ({"combine": "mean", "names": ["a b", "c"]}, "identifiers"),
        ({"combine": "concat", "axis": -3}, "out of range"),
        ({"combine": "mean", "input_map": ["x"]}, "FROM=TO"),
    ],
)
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        merge([_linear("Relu", 17, 0), _linear("Relu", 17, 1)], **kwargs)  # type: ignore[arg-type]


def test_one_model_and_non_float_vote_are_errors() -> None:
    with pytest.raises(UsageError, match="at least two"):
        merge([_linear("Relu", 17, 0)], combine="mean")
    ints = [make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", I64, ["n", 3])], [("y", I64, ["n", 3])],
                       opset=17) for _ in range(2)]
    with pytest.raises(ModelError, match="needs float outputs"):
        merge(ints, combine="vote")
    feeds = {"x": np.arange(6, dtype=np.int64).reshape(2, 3)}
    np.testing.assert_array_equal(run_ort(merge(ints, combine="max"), feeds)[0], feeds["x"])


def test_opset_conflicts_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _linear("Relu", 13, 0), _linear("Relu", 17, 1)
    custom = [onnx.ModelProto.FromString(m.SerializeToString()) for m in (a, b)]
    custom[0].opset_import.append(helper.make_opsetid("com.example", 1))
    custom[1].opset_import.append(helper.make_opsetid("com.example", 2))
    with pytest.raises(ModelError, match="domain 'com.example' version 2"):
        merge(custom, combine="mean", check=False)

    def refuse(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError("no adapter for op X")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    with pytest.raises(ModelError, match="cannot convert from opset 13 to 17: no adapter"):
        merge([a, b], combine="mean")
