"""The quantize pass's own choices: calibration ranges (``calibrate=auto``), the feeds its fallback search
screens on, and the variant it keeps on a transformer."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, make_model, run_ort
from onnx import helper
from onnxopt.passes.quantize import _pick_variant
from onnxopt.passes.quantize.fallback import QUICK_FEEDS, Reference

from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.registry import make_pass

RNG = np.random.default_rng(7)


def _quantize(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **options: object):
    model = ir.from_proto(proto)
    calib = load_data(feeds, input_specs(model))
    stats = make_pass("quantize", {"require_speedup": False, **options}).call(model, Context(calib=calib))
    return model, stats


def _mlp(rng: np.random.Generator) -> onnx.ModelProto:
    w1 = (rng.standard_normal((64, 64)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((64, 16)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [("x", F32, [4, 64])], [("y", F32, [4, 16])], {"w1": w1, "w2": w2})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibrate_auto_writes_the_model_of_the_method_it_names(seed: int) -> None:
    # Heavy-tailed inputs (Student's t, 2 degrees of freedom), where the two methods' ranges differ.
    rng = np.random.default_rng(seed)
    proto = _mlp(rng)
    calib = [{"x": rng.standard_t(2, (4, 64)).astype(np.float32)} for _ in range(8)]
    auto, stats = _quantize(proto, calib, fallback="none")
    scores = stats.summary["calibrate_scores"]
    assert set(scores) == {"minmax", "mse"}
    chosen = stats.summary["calibrate_chosen"]
    other = next(m for m in scores if m != chosen)
    better_argmax = (scores[chosen]["argmax"] or 0) > (scores[other]["argmax"] or 0)
    assert better_argmax or scores[chosen]["cosine"] >= scores[other]["cosine"]
    assert any(f"calibrate=auto: {chosen} ranges" in n for n in stats.notes)
    explicit, _ = _quantize(proto, calib, fallback="none", calibrate=chosen)
    for feed in calib[:3]:
        np.testing.assert_array_equal(run_ort(auto, feed)[0], run_ort(explicit, feed)[0])


def test_screening_runs_on_the_feeds_the_int8_model_gets_most_wrong() -> None:
    proto = make_model([helper.make_node("Identity", ["x"], ["y"], name="id")], [("x", F32, [1, 8])],
                       [("y", F32, [1, 8])])
    feeds = [{"x": RNG.standard_normal((1, 8)).astype(np.float32)} for _ in range(6)]
    ref = Reference(ir.from_proto(proto), feeds, threads=1)
    assert ref.quick == list(range(QUICK_FEEDS))  # before ranking: the first feeds
    outputs = [list(o) for o in ref.outputs]
    outputs[4] = [o + 1.0 for o in outputs[4]]
    outputs[2] = [o + 0.3 for o in outputs[2]]
    ref.rank_feeds(outputs)
    assert ref.quick == [2, 4]
    assert [f["x"].tobytes() for f in ref.quick_feeds()] == [feeds[2]["x"].tobytes(), feeds[4]["x"].tobytes()]
    assert ref.compare_quick([outputs[2], outputs[4]]).cosine < 1.0


def test_variant_choice_fastest_within_noise_then_smallest() -> None:
    # (shortfall, cosine, latency ratio, weight bytes)
    rows = {"float-ish": (0.0, 0.999, 0.70, 100), "blockwise": (0.0, 0.995, 0.66, 50), "broken": (0.01, 0.9, 0.3, 10)}
    assert _pick_variant(rows) == "blockwise"  # 'broken' misses the targets; the other two are one speed
    rows = {"fast": (0.0, 0.995, 0.50, 100), "small": (0.0, 0.999, 0.70, 50)}
    assert _pick_variant(rows) == "fast"  # clearly faster beats smaller
    rows = {"a": (0.02, 0.97, 0.5, 10), "b": (0.01, 0.98, 0.9, 10)}
    assert _pick_variant(rows) == "b"  # nothing meets the targets: the closest



def test_the_reference_feed_count_does_not_move_with_the_machines_load() -> None:
    """With a count of ``budget // one``, a model near a step (0.12-0.13 s a run against a 1 s budget) got 8 or
    7 feeds by the load of the moment, and two runs of one command searched on different data."""
    from onnxopt.passes.quantize.fallback import MAX_FEEDS, MIN_FEEDS, _feed_count

    assert {_feed_count(t, 1.0) for t in (0.001, 0.10, 0.13, 0.2, 0.25)} == {MAX_FEEDS}
    assert _feed_count(0.4, 1.0) == MIN_FEEDS and _feed_count(10.0, 1.0) == MIN_FEEDS
    assert MIN_FEEDS < _feed_count(0.3, 1.0) < MAX_FEEDS
