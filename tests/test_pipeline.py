"""The pipeline: pass specs and their coercion, recipes, --set pairs, onnx_ir passes as steps, failures
wrapped with the pass name, and what a PassRecord holds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes
import pytest
from helpers import F32, make_model
from onnx import helper
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from onnxopt.context import Context
from onnxopt.errors import ModelError, UsageError
from onnxopt.pipeline import PassFailure, Pipeline, apply_sets, parse_passes, read_recipe
from onnxopt.registry import Pass, PassStats, make_pass
from onnxopt.runtime import run_taps


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
