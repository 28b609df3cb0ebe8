"""Context: one tapping session per model state, reused across calls and passes, dropped on change."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes
import pytest
from helpers import F32, make_model, save_model
from onnx import helper

import onnxopt.context
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import set_weight
from onnxopt.pipeline import Pipeline
from onnxopt.registry import Pass, PassStats
from onnxopt.runtime import TapSession

W1 = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 - 0.5
W2 = np.arange(8, dtype=np.float32).reshape(4, 2) / 10 - 0.3


def _model() -> ir.Model:
    """x[2,3] @ W1 -> h, relu(h) -> r, r @ W2 -> y."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        [("x", F32, [2, 3])], [("y", F32, [2, 2])], {"W1": W1, "W2": W2},
    )
    return ir.from_proto(proto)


def _feeds(n: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset([{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(n)], [None] * n, "test")


class _Counting(TapSession):
    built: list[list[str]] = []
    closed = 0

    def __init__(self, model: ir.Model, names, **kw) -> None:
        super().__init__(model, names, **kw)
        _Counting.built.append(list(names))

    def close(self) -> None:
        _Counting.closed += 1
        super().close()


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[_Counting]:
    _Counting.built, _Counting.closed = [], 0
    monkeypatch.setattr(onnxopt.context, "TapSession", _Counting)
    return _Counting


def _h(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    return feed["x"] @ np.asarray(model.graph.initializers["W1"].const_value.numpy())


def test_one_session_serves_every_call_on_an_unchanged_model(counting) -> None:
    model, data = _model(), _feeds()
    ctx = Context(calib=data)
    first = list(ctx.activations(model, ["h"]))
    again = list(ctx.activations(model, ["h"]))
    assert len(counting.built) == 1
    for feed, a, b in zip(data, first, again):
        np.testing.assert_allclose(a["h"], _h(model, feed), rtol=1e-6)
        np.testing.assert_array_equal(a["h"], b["h"])
        assert set(a) == {"h"}  # only what was asked


def test_a_new_name_rebuilds_once_with_the_union(counting) -> None:
    model, data = _model(), _feeds()
    ctx = Context(calib=data)
    list(ctx.activations(model, ["h"]))
    acts = list(ctx.activations(model, ["r", "x", "W2"]))
    assert counting.built == [["h"], ["W2", "h", "r", "x"]]
    list(ctx.activations(model, ["h"]))
    list(ctx.activations(model, ["r"]))
    assert len(counting.built) == 2 and counting.closed == 1  # the first session went when the union came
    np.testing.assert_allclose(acts[0]["r"], np.maximum(_h(model, data.feeds[0]), 0), rtol=1e-6)
    np.testing.assert_array_equal(acts[0]["x"], data.feeds[0]["x"])
    np.testing.assert_array_equal(acts[0]["W2"], W2)


def test_a_changed_weight_is_seen_even_without_being_told(counting) -> None:
    model, data = _model(), _feeds(1)
    ctx = Context(calib=data)
    before = next(ctx.activations(model, ["h"]))["h"]
    set_weight(model.graph.initializers["W1"], W1 * 2)
    after = next(ctx.activations(model, ["h"]))["h"]
    assert len(counting.built) == 2
    np.testing.assert_allclose(after, 2 * before, rtol=1e-6)
    np.testing.assert_allclose(after, _h(model, data.feeds[0]), rtol=1e-6)


def test_model_changed_drops_the_session_for_changes_made_in_place(counting) -> None:
    model, data = _model(), _feeds(1)
    w = np.array(W1)
    model.graph.initializers["W1"].const_value = ir.tensor(w, name="W1")
    ctx = Context(calib=data)
    before = next(ctx.activations(model, ["h"]))["h"]
    w *= 3  # the same tensor object: only the pass knows it changed
    ctx.model_changed(model)
    after = next(ctx.activations(model, ["h"]))["h"]
    assert len(counting.built) == 2 and counting.closed == 1
    np.testing.assert_allclose(after, 3 * before, rtol=1e-6)


def test_pipeline_invalidates_after_a_modifying_pass_and_releases_at_the_end(counting) -> None:
    seen: list[np.ndarray] = []

    class Tap(Pass):
        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            seen.append(next(ctx.activations(model, ["h"]))["h"])
            return PassStats()

    class Double(Pass):
        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            w = model.graph.initializers["W1"].const_value.numpy()
            w *= 2  # in place: invisible to the context's own check, so the pipeline's mark is what counts
            return PassStats(modified=True)

    model, data = _model(), _feeds(1)
    model.graph.initializers["W1"].const_value = ir.tensor(np.array(W1), name="W1")
    records = Pipeline([Tap(), Tap(), Double(), Tap()]).run(model, Context(calib=data))
    assert [r.stats.modified for r in records] == [False, False, True, False]
    assert len(counting.built) == 2 and counting.closed == 2
    np.testing.assert_array_equal(seen[0], seen[1])
    np.testing.assert_allclose(seen[2], 2 * seen[0], rtol=1e-6)


def test_each_model_object_has_its_own_session(counting) -> None:
    model, data = _model(), _feeds(1)
    copy = model.clone()
    set_weight(copy.graph.initializers["W1"], -W1)
    ctx = Context(calib=data)
    a = next(ctx.activations(model, ["h"]))["h"]
    b = next(ctx.activations(copy, ["h"]))["h"]
    next(ctx.activations(model, ["h"]))
    assert len(counting.built) == 2
    np.testing.assert_allclose(b, -a, rtol=1e-6)


def test_a_stream_outlives_the_session_a_later_call_replaces(counting) -> None:
    model, data = _model(), _feeds(4)
    ctx = Context(calib=data)
    pairs = list(zip(ctx.activations(model, ["h"]), ctx.activations(model, ["r"])))
    assert len(pairs) == 4 and len(counting.built) == 2
    for feed, (h, r) in zip(data, pairs):
        np.testing.assert_allclose(np.maximum(h["h"], 0), r["r"], rtol=1e-6)
        np.testing.assert_allclose(h["h"], _h(model, feed), rtol=1e-6)
    assert counting.closed == 1  # the first session closed once its stream ended
    ctx.close()
    assert counting.closed == 2


def test_original_activations_are_cached_and_survive_model_changed(counting, tmp_path) -> None:
    path = save_model(_model(), tmp_path / "m.onnx")
    data = _feeds(2)
    ctx = Context(original_path=path, calib=data)
    first = list(ctx.original_activations(["h"]))
    ctx.model_changed()  # the working models changed; the original did not
    again = list(ctx.original_activations(["h"]))
    assert len(counting.built) == 1
    np.testing.assert_array_equal(first[1]["h"], again[1]["h"])
    np.testing.assert_allclose(first[1]["h"], data.feeds[1]["x"] @ W1, rtol=1e-6)
    with ctx:
        pass
    assert counting.closed == 1


def test_bad_requests() -> None:
    model = _model()
    with pytest.raises(UsageError, match="prune needs calibration data"):
        next(Context().activations(model, ["h"], desc="prune"))
    with pytest.raises(ModelError, match="no tensor named nope"):
        next(Context(calib=_feeds(1)).activations(model, ["nope"]))
    with pytest.raises(UsageError, match="original model is not available"):
        next(Context(calib=_feeds(1)).original_activations(["h"]))
    # feeds given explicitly need no calibration data
    assert len(list(Context().activations(model, ["y"], feeds=_feeds(2)))) == 2


def test_a_pass_run_by_an_onnx_ir_manager_marks_the_model_changed(counting) -> None:
    class Triple(Pass):
        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            model.graph.initializers["W1"].const_value.numpy()[...] *= 3  # in place: only the mark tells
            return PassStats(modified=True)

    model, data = _model(), _feeds(1)
    model.graph.initializers["W1"].const_value = ir.tensor(np.array(W1), name="W1")
    ctx = Context(calib=data)
    before = next(ctx.activations(model, ["h"]))["h"]
    onnx_ir.passes.PassManager([Triple().as_ir_pass(ctx)])(model)
    np.testing.assert_allclose(next(ctx.activations(model, ["h"]))["h"], 3 * before, rtol=1e-6)
    assert len(counting.built) == 2
