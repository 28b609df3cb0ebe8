"""Sensitivity: errors of single actions, measured on the changed part only, against whole-model oracles."""

from __future__ import annotations

import glob
import json

import numpy as np
import onnx_ir as ir
import pytest
from helpers import MODELS

from onnxopt import io
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.registry import run_pass
from onnxopt.runtime import run, session
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.sensitivity import (
    Action,
    Row,
    SharedTapsContext,
    changed_suffix,
    measure_sensitivity,
    plan_actions,
)
from onnxopt.tune.sensitivity import _node_key as node_key
from onnxopt.tune.space import Ladder, allot
from onnxopt.validate import compare_models

CNN = MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def folded(tmp_path_factory: pytest.TempPathFactory) -> tuple[ir.Model, object]:
    model = io.load(CNN)
    run_pass("fold", model)
    path = tmp_path_factory.mktemp("sens") / "base.onnx"
    io.save(model, path)
    return model, path


@pytest.fixture(scope="module")
def data():
    inputs = input_specs(io.load(CNN))
    calib = load_data(MODELS / "digits_calib.npz", inputs)
    evaluation = load_data(MODELS / "digits_eval.npz", inputs)
    return calib.take(4), evaluation.take(4)


def test_the_changed_part_alone_computes_the_candidates_outputs(folded, data) -> None:
    base, _ = folded
    candidate = base.clone()
    run_pass("prune", candidate, None, scope="layer",
             layers={"*": {"skip": True}, "branch_b.conv": {"skip": False, "sparsity": 0.9}})
    keys = {n.outputs[0].name: node_key(n) for n in base.graph}
    suffix, cut = changed_suffix(keys, candidate)
    assert "input" not in cut  # the stem, the residual block and the rest upstream are not run again
    assert len(list(suffix.graph)) < len(list(candidate.graph)) // 2
    ctx = Context()
    feeds = [dict(a) for a in ctx.activations(base, cut, feeds=data[1])]
    with io.temp_model_file(suffix) as sp, io.temp_model_file(candidate) as cp:
        s_sess, c_sess = session(sp), session(cp)
        for tapped, feed in zip(feeds, data[1].feeds):
            np.testing.assert_allclose(run(s_sess, tapped)[0], run(c_sess, feed)[0], rtol=1e-5, atol=1e-5)


def test_an_unchanged_copy_is_no_suffix(folded) -> None:
    base, _ = folded
    keys = {n.outputs[0].name: node_key(n) for n in base.graph}
    assert changed_suffix(keys, base.clone()) is None


@pytest.mark.parametrize("constraint", [Constraint("accuracy", 1.0), Constraint("cosine", 0.01)])
def test_each_row_equals_the_whole_model_error(folded, data, tmp_path, constraint) -> None:
    """Rows measured with shared taps and cut-out suffixes equal the error of the whole candidate built
    from scratch (a plain context, its own calibration run) and compared by validation."""
    base, base_path = folded
    calib, search = data
    actions = [Action("quantize", "fc1", ["fc1"], "Gemm", 1, 1.0, 32768),
               Action("quantize", "block1.conv1", ["block1.conv1"], "Conv", 1, 1.0, None),
               Action("channels", "block1.conv1", ["block1.conv1"], "group", 1, 0.25, None),
               Action("factorize", "fc1", ["fc1"], "Gemm", 2, 0.25, None),
               Action("prune", "block1.conv2", ["block1.conv2"], "Conv", 2, 0.75, None)]
    reference = Reference(base_path, search, constraint)
    table = measure_sensitivity(base, actions, reference, calib=calib, dims={})
    assert table.taps_reused >= 3  # quantize's and channels' calibration ran on the base's session
    for action, row in zip(actions, table.rows):
        assert row.measured, row.status
        fresh = base.clone()
        run_pass(action.pass_name, fresh, Context(calib=calib), **action.options())
        path = tmp_path / f"{action.pass_name}-{action.layer}.onnx"
        io.save(fresh, path)
        cmp = compare_models(base_path, path, search, metric="rel_l2")
        assert row.rel_l2 == pytest.approx(cmp.worst, rel=1e-4, abs=1e-6)
        assert row.error == pytest.approx(constraint.error_of(cmp), rel=1e-4, abs=1e-6)
    quantized = table.rows[0]
    assert quantized.macs_saved == 32768 and quantized.bytes_saved > 0  # fc1's float weight became int8


def test_shared_taps_fall_back_once_the_copy_changed(folded, data) -> None:
    base, _ = folded
    calib, _ = data
    ctx = SharedTapsContext(base, calib=calib)
    copy = base.clone()
    list(ctx.activations(copy, ["fc1.out"] if "fc1.out" in {v.name for n in base.graph for v in n.outputs}
                         else [next(iter(base.graph)).outputs[0].name]))
    assert ctx.reused == 1
    run_pass("prune", copy, None, sparsity=0.5)
    list(ctx.activations(copy, [next(iter(copy.graph)).outputs[0].name]))
    assert ctx.reused == 1
    ctx.close()


def test_plan_takes_the_heaviest_layers_first(folded) -> None:
    base, _ = folded
    actions, total = plan_actions(base, ["quantize", "factorize", "channels"], {}, max_layers=2)
    assert total == 9
    layers = list(dict.fromkeys(a.layer for a in actions if a.pass_name == "quantize"))
    assert layers == ["block1.conv1", "block1.conv2"]  # 147K MACs each, the largest
    assert {a.pass_name for a in actions} == {"quantize", "factorize", "channels"}
    options = next(a for a in actions if a.pass_name == "factorize").options()
    assert options["layers"]["*"] == {"skip": True}
    assert options["layers"][glob.escape("block1.conv1")]["rank_ratio"] == 0.5


def test_failed_actions_are_rows_not_errors(folded, data) -> None:
    base, base_path = folded
    calib, search = data
    bad = Action("quantize", "fc1", ["fc1"], "Gemm", 1, 1.0, None)
    reference = Reference(base_path, search, Constraint("rel_l2", 0.1))
    table = measure_sensitivity(base, [bad], reference, calib=calib.take(0), dims={})
    assert table.rows[0].status.startswith("failed: ") and "calibration data" in table.rows[0].status


# ------------------------------------------------------------------------------ the allotment
def _row(layer: str, level: int, value: float) -> Row:
    return Row("channels", layer, [layer], "Conv", level, value, None, status="measured")


def test_allot_takes_the_best_gain_per_error_within_the_budget() -> None:
    ladders = [Ladder("channels", "a", ["a"], [(_row("a", 1, 0.25), 0.01, 100.0), (_row("a", 2, 0.5), 0.05, 150.0)]),
               Ladder("channels", "b", ["b"], [(_row("b", 1, 0.25), 0.02, 100.0), (_row("b", 2, 0.5), 0.03, 300.0)])]
    assert allot(ladders, 0.005) == {}
    assert {k: r.value for k, r in allot(ladders, 0.011).items()} == {"a": 0.25}
    # b's second level (300 per 0.03) beats a's second (50 more per 0.04 more)
    assert {k: r.value for k, r in allot(ladders, 0.045).items()} == {"a": 0.25, "b": 0.5}
    assert {k: r.value for k, r in allot(ladders, 1.0).items()} == {"a": 0.5, "b": 0.5}


# ------------------------------------------------------------------------------ the constraint
def test_reference_agrees_with_validation(folded, data, tmp_path) -> None:
    base, base_path = folded
    calib, search = data
    model = base.clone()
    run_pass("quantize", model, Context(calib=calib), check_fusion=False)
    path = tmp_path / "q.onnx"
    io.save(model, path)
    for metric in ("rel_l2", "cosine", "top1"):
        measured = Reference(base_path, search, Constraint(metric, 0.1)).measure(path)
        cmp = compare_models(base_path, path, search, metric=metric)
        assert measured.error == pytest.approx(cmp.worst, rel=1e-6, abs=1e-9)
        assert measured.comparison.outputs[0].max_abs == pytest.approx(cmp.outputs[0].max_abs, rel=1e-6)
    drop = Reference(base_path, search, Constraint("accuracy", 1.0)).measure(path)
    cmp = compare_models(base_path, path, search, metric="accuracy")
    assert drop.error == pytest.approx((cmp.accuracy_a - cmp.accuracy_b) * 100)


@pytest.mark.parametrize(("args", "message"), [
    ((None, None, None), "give the constraint as --max-drop"),
    ((1.0, 0.1, None), "give the constraint as --max-drop"),
    ((1.0, None, "cosine"), "--metric goes with --tolerance"),
    ((None, 0.1, "max_abs"), "unknown constraint metric"),
    ((None, -1.0, "cosine"), "limit must be a number >= 0"),
])
def test_constraint_options(args, message) -> None:
    with pytest.raises(UsageError, match=message.replace("-", "\\-")):
        Constraint.from_options(*args)


def test_max_drop_needs_labels(folded, data) -> None:
    _, base_path = folded
    calib, _ = data
    unlabelled = calib.take(2)
    unlabelled.labels = [None, None]
    with pytest.raises(UsageError, match="labels"):
        Reference(base_path, unlabelled, Constraint("accuracy", 1.0))


# ------------------------------------------------------------------------------ the space
def _table() -> object:
    from onnxopt.tune.sensitivity import SensitivityTable

    rows = [Row("quantize", "a", ["a"], "Conv", 1, 1.0, 9000, status="measured", error=0.0, rel_l2=0.01,
                macs_saved=9000, bytes_saved=10),
            Row("quantize", "b", ["b"], "Conv", 1, 1.0, 500, status="measured", error=0.0, rel_l2=0.02,
                macs_saved=500, bytes_saved=10),
            Row("channels", "g", ["b", "c"], "group", 1, 0.25, 9000, ["d"], status="measured", error=0.5,
                rel_l2=0.1, macs_saved=3000, bytes_saved=10),
            Row("channels", "g", ["b", "c"], "group", 2, 0.5, 9000, ["d"], status="measured", error=9.0,
                rel_l2=0.6, macs_saved=6000, bytes_saved=10)]  # 9 points alone: past three times the limit, left out
    return SensitivityTable(rows, "accuracy", 4, 64, 1.0)


def test_space_recipes_from_parameters() -> None:
    from onnxopt.tune.space import SearchSpace

    space = SearchSpace(_table(), Constraint("accuracy", 1.0), "latency", ["quantize", "channels", "distill"])
    assert space.passes == ["channels", "quantize", "distill"]
    assert [lad.layer for lad in space.ladders["channels"]] == ["g"]
    assert [s[0].value for s in space.ladders["channels"][0].steps] == [0.25]  # the hard per-layer budget
    assert space.float_toggles == ["b", "a"]  # fewest MACs first
    hi = {f"{n}.budget": space.bounds[n][1] for n in space.ladders}
    params = {"channels": True, "quantize": True, **hi, "channels.round_to": 8, "channels.reconstruct": False,
              "quantize.calibrate": "minmax", "quantize.mode": "static", "distill": "before_quantize",
              "quantize.float.b": True}
    recipe = space.recipe(params)
    assert [name for name, _ in recipe] == ["fold", "channels", "distill", "quantize"]
    assert recipe[1][1]["layers"] == {"b": {"ratio": 0.25}, "c": {"ratio": 0.25}} and recipe[1][1]["ratio"] == 0.0
    assert recipe[3][1]["layers"] == {"b": {"skip": True}}  # kept float by its switch
    assert recipe[2][1] == {"layers": ["b", "c", "d"]}  # distill refits the cut group's producers and consumers
    assert space.recipe(params) == recipe  # deterministic: a stored trial rebuilds its model
    # nothing structural compressed: no distillation
    assert space.recipe({**params, "channels": False, "quantize": False}) == [("fold", {})]
    assert [n for n, _ in space.recipe({**params, "channels": False, "distill": "after_quantize"})] == \
        ["fold", "quantize"]
    lo = {f"{n}.budget": space.bounds[n][0] for n in space.ladders}
    assert space.recipe({**params, **lo}) == [("fold", {})]  # budgets below every step allot nothing


def test_the_searched_float_set_is_a_choice_of_the_space() -> None:
    """quantize.float_set=searched: the quantize pass's own set and range method, pinned (float_nodes with
    fallback=none, so the recipe builds the same model on any machine), whatever the budget; a starting point."""
    from onnxopt.tune.space import SearchSpace

    searched = {"float_nodes": ["b", "z"], "calibrate": "mse", "scores": {}, "targets_met": True, "seconds": 1.0}
    space = SearchSpace(_table(), Constraint("cosine", 0.01), "latency", ["quantize"], searched=searched)
    lo = space.bounds["quantize"][0]
    params = {"quantize": True, "quantize.budget": lo, "quantize.calibrate": "minmax", "quantize.mode": "static",
              "quantize.float_set": "searched", "quantize.float.a": True}
    step = dict(space.recipe(params))["quantize"]
    assert step["float_nodes"] == ["b", "z"] and step["calibrate"] == "mse" and step["fallback"] == "none"
    assert step["layers"] == {"a": {"skip": True}}  # the trial's float toggle still applies
    from onnxopt.tune.verb import _passes_text

    assert _passes_text(space.recipe(params)) == "fold,quantize(3 float, searched set)"
    assert _passes_text(space.recipe({**params, "quantize.mode": "dynamic"})).startswith("fold,quantize(dynamic")
    allotted = dict(space.recipe({**params, "quantize.float_set": "allotted"}))["quantize"]
    assert "float_nodes" not in allotted and allotted["calibrate"] == "minmax"
    assert "float_nodes" not in dict(space.recipe({**params, "quantize.mode": "dynamic"}))["quantize"]
    assert any(p.get("quantize.float_set") == "searched" and p["quantize"] for p in space.starting_points())
    assert all("quantize.float_set" in p for p in space.starting_points())  # none left to chance
    plain = SearchSpace(_table(), Constraint("cosine", 0.01), "latency", ["quantize"])
    assert not any("quantize.float_set" in p for p in plain.starting_points())


@pytest.mark.parametrize(("metric", "limit", "options", "tolerance"), [
    ("cosine", 0.01, {"target_cosine": 0.99, "target_argmax": 0.0}, None),
    ("top1", 0.02, {"target_cosine": 0.0, "target_argmax": 0.98}, None),
    ("accuracy", 1.0, {"target_cosine": 0.0, "target_argmax": 0.99}, None),
    ("rel_l2", 0.05, {"target_cosine": 0.0, "target_argmax": 0.0}, 0.05),
])
def test_the_pass_aims_at_the_constraint(metric, limit, options, tolerance) -> None:
    from onnxopt.tune.mixed import pass_targets

    got, tol = pass_targets(Constraint(metric, limit))
    assert got == pytest.approx(options) and tol == tolerance


def test_the_pass_search_runs_once_per_study(folded, data, monkeypatch) -> None:
    """The quantize pass's own search for the constraint, kept in the study: a resumed run reads it back."""
    import optuna

    from onnxopt.tune import mixed

    model, _ = folded
    study = optuna.create_study()
    before = ir.to_proto(model).SerializeToString()
    found = mixed.searched_float_set(study, model, data[0], Constraint("cosine", 1e-6), {}, None)
    assert ir.to_proto(model).SerializeToString() == before  # it works on a copy
    assert found is not None and found["calibrate"] in ("minmax", "mse")
    assert found["float_nodes"] and not found["targets_met"]  # a target int8 cannot meet: the closest set
    monkeypatch.setattr(mixed, "run_pass", lambda *a, **k: pytest.fail("searched twice"))
    assert mixed.searched_float_set(study, model, data[0], Constraint("cosine", 1e-6), {}, None) == found


def test_starting_points_set_every_float_toggle_and_try_each_alone() -> None:
    from onnxopt.tune.space import SearchSpace

    space = SearchSpace(_table(), Constraint("accuracy", 1.0), "latency", ["quantize", "channels"])
    points = space.starting_points()
    toggles = [f"quantize.float.{layer}" for layer in space.float_toggles]
    assert toggles and all(all(t in p for t in toggles) for p in points)  # none left to chance
    alone = [p for p in points if sum(p[t] for t in toggles) == 1]
    assert sorted(t for p in alone for t in toggles if p[t]) == sorted(toggles)
    assert all(p["quantize"] and not p["channels"] for p in alone)
    recipes = [space.recipe(p) for p in alone]
    assert all([name for name, _ in r] == ["fold", "quantize"] for r in recipes)
    assert sorted(next(iter(dict(r)["quantize"]["layers"])) for r in recipes) == sorted(space.float_toggles)
    assert SearchSpace(_table(), Constraint("accuracy", 1.0), "size", ["quantize"]).float_toggles == []


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_stuck_sampler_is_given_random_recipes_before_the_search_gives_up() -> None:
    """A sampler that proposes one recipe over and over (measured once, then repeats) gets a random draw
    every few repeats, so the budget goes to new recipes; only when those repeat too does the search stop."""
    import optuna

    from onnxopt.tune import search
    from onnxopt.tune.space import SearchSpace
    from onnxopt.tune.study import open_study
    from onnxopt.tune.workers import Outcome

    space = SearchSpace(_table(), Constraint("accuracy", 1.0), "latency", ["quantize", "channels"])
    fixed = {"quantize": True, "channels": False, "quantize.budget": space.bounds["quantize"][1],
             "channels.budget": space.bounds["channels"][1], "channels.round_to": 1,
             "channels.reconstruct": False, "quantize.calibrate": "minmax", "quantize.mode": "static",
             **{f"quantize.float.{layer}": False for layer in space.float_toggles}}
    study = open_study("sqlite:///:memory:", "stuck", sampler="tpe", seed=0)
    study.sampler = optuna.samplers.PartialFixedSampler(fixed, optuna.samplers.RandomSampler(seed=0))

    class Executor:
        slots = 1

        def __init__(self) -> None:
            self.submitted: list[str] = []

        def submit(self, number: int, recipe: object) -> None:
            self.submitted.append(json.dumps(recipe, sort_keys=True))
            self.number = number

        def next_done(self) -> Outcome:
            return Outcome(self.number, "complete", objective=1.0, error=0.0, rel_l2=0.0)

    executor, exhausted = Executor(), [False]
    outcomes = list(search._trials(study, space, executor, Constraint("accuracy", 1.0), 40, None, exhausted))
    assert len(set(executor.submitted)) == len(executor.submitted) > 1  # random draws measured new recipes
    repeats = [o for o in outcomes if o.reason.startswith("same recipe")]
    assert repeats and len(outcomes) == 40 and not exhausted[0]
    assert search.random_point(space, seed=3) == search.random_point(space, seed=3)


def test_a_transformer_space_chooses_how_gelu_fed_matmuls_are_quantized() -> None:
    """When the pass's own run found MatMuls reading a GELU output, dynamic trials draw gelu_matmuls, and the
    dynamic variant the pass picked is a starting point; without them the option is not drawn."""
    import optuna

    from onnxopt.tune.space import SearchSpace

    searched = {"float_nodes": [], "calibrate": "minmax", "scores": {}, "targets_met": False, "seconds": 1.0,
                "gelu_fed": True, "dynamic_pick": "blockwise"}
    space = SearchSpace(_table(), Constraint("cosine", 0.01), "latency", ["quantize"], matmul_weights=True,
                        searched=searched)
    drawn = space.suggest(optuna.create_study().ask())
    assert drawn["quantize.gelu_matmuls"] in ("dynamic", "float", "blockwise")
    pick = [p for p in space.starting_points() if p.get("quantize.mode") == "dynamic"]
    assert len(pick) == 1 and pick[0]["quantize.gelu_matmuls"] == "blockwise"
    step = dict(space.recipe(pick[0]))["quantize"]
    assert step["mode"] == "dynamic" and step["gelu_matmuls"] == "blockwise"
    static = dict(space.recipe({**pick[0], "quantize.mode": "static"}))["quantize"]
    assert "gelu_matmuls" not in static
    plain = SearchSpace(_table(), Constraint("cosine", 0.01), "latency", ["quantize"], matmul_weights=True,
                        searched={**searched, "gelu_fed": False})
    assert "quantize.gelu_matmuls" not in plain.suggest(optuna.create_study().ask())
