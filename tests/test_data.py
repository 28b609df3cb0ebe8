"""Data specs, validation metrics, MAC counting and the benchmark helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, I64, MODELS, make_model
from onnx import helper

import onnxopt
from onnxopt.analysis import model_stats
from onnxopt.bench import bench
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.validate import compare_models

CNN = MODELS / "digits_cnn.onnx"


def _specs(path: Path = CNN):
    return input_specs(onnxopt.load(path))


def test_stacked_npz_is_split_into_batches_with_labels() -> None:
    ds = load_data(MODELS / "digits_eval.npz", _specs(), batch=50)
    assert len(ds) == 8 and ds.num_samples == 360
    assert ds.feeds[0]["input"].shape == (50, 1, 8, 8) and ds.feeds[-1]["input"].shape == (10, 1, 8, 8)
    assert ds.has_labels and ds.labels[-1].shape == (10,)


def test_folder_of_npz_feeds(tmp_path: Path) -> None:
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", input=np.full((2, 1, 8, 8), i, np.float32), labels=np.array([i, i]))
    ds = load_data(tmp_path, _specs())
    assert len(ds) == 3 and float(ds.feeds[2]["input"][0, 0, 0, 0]) == 2.0 and ds.has_labels


def test_random_feeds_follow_types_and_dims() -> None:
    proto = make_model([helper.make_node("Cast", ["ids"], ["f"], to=F32), helper.make_node("Add", ["f", "x"], ["y"])],
                       [("ids", I64, ["batch", "seq"]), ("x", F32, ["batch", "seq"])], [("y", F32, ["batch", "seq"])])
    specs = input_specs(ir.from_proto(proto))
    ds = load_data("random:3", specs, dims={"seq": 7})
    assert len(ds) == 3
    assert ds.feeds[0]["ids"].dtype == np.int64 and ds.feeds[0]["ids"].shape == (1, 7)
    assert ds.feeds[0]["x"].dtype == np.float32


@pytest.mark.parametrize("spec, needle", [("random:0", "at least 1"), ("random:x", "whole number")])
def test_bad_random_spec(spec: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        load_data(spec, _specs())


def test_unequal_stacks_and_label_counts_refused(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    np.savez(f, input=np.zeros((4, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(UsageError, match="labels"):
        load_data(f, _specs())


def test_compare_metrics_against_numpy(tmp_path: Path) -> None:
    # B = 1.5 * A exactly: rel L2 0.5, cosine 1, top-1 agreement 100 %, max abs = 0.5 max |A|.
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    a = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F32, ["n", 4])], [("y", F32, ["n", 3])],
                   {"w": w})
    b = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F32, ["n", 4])], [("y", F32, ["n", 3])],
                   {"w": w * 1.5})
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    pa.write_bytes(a.SerializeToString())
    pb.write_bytes(b.SerializeToString())
    ds = load_data("random:4", input_specs(ir.from_proto(a)), batch=5)
    ref = np.concatenate([f["x"] @ w for f in ds.feeds])
    cmp = compare_models(pa, pb, ds, tolerance=0.4)
    o = cmp.outputs[0]
    assert o.rel_l2 == pytest.approx(0.5, rel=1e-5) and o.cosine == pytest.approx(1.0, abs=1e-6)
    assert o.top1 == 1.0 and o.max_abs == pytest.approx(0.5 * np.abs(ref).max(), rel=1e-5)
    assert not cmp and "FAIL" in cmp.describe()
    assert compare_models(pa, pb, ds, metric="top1", tolerance=0.0)


def test_macs_and_params_of_known_layers() -> None:
    # Conv 3->8, 3x3, on 10x10 (pad 1): 8*10*10 * 3*3*3 MACs; Gemm 800->5: 800*5.
    w = np.ones((8, 3, 3, 3), np.float32)
    g = np.zeros((5, 800), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    proto = make_model(nodes, [("x", F32, ["N", 3, 10, 10])], [("y", F32, ["N", 5])], {"w": w, "g": g})
    stats = model_stats(ir.from_proto(proto))
    assert stats.macs == 8 * 100 * 27 + 800 * 5
    assert stats.parameters == w.size + g.size and stats.nonzero == w.size
    assert model_stats(ir.from_proto(proto), {"N": 4}).macs == 4 * stats.macs


def test_bench_interleaves_and_reports_percentiles() -> None:
    res = bench([CNN, CNN], runs=7, warmup=1, memory=False)
    assert [lat.runs for lat in res.latencies] == [7, 7]
    for lat in res.latencies:
        assert lat.min_ms <= lat.median_ms <= lat.p90_ms
    a, b = res.latencies
    assert res.ratios == pytest.approx([1.0, b.median_ms / a.median_ms])
    assert b.throughput == pytest.approx(b.batch / (b.median_ms / 1000.0))


def test_peak_memory_is_measured_in_a_child() -> None:
    res = bench([CNN], runs=2, warmup=0, memory=True)
    assert res.latencies[0].peak_mb is not None and res.latencies[0].peak_mb > 10


def test_bench_time_budget_stops_early_after_five_runs() -> None:
    res = bench([CNN], runs=10_000, warmup=0, memory=False, budget_s=0.0)
    assert res.latencies[0].runs == 5


def test_macs_inside_if_branches_are_counted() -> None:
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"{name}_y"], name=f"{name}.mm")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", F32, [2, 3])])

    w = np.ones((4, 3), np.float32)
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch("a"), else_branch=branch("b"))]
    proto = make_model(nodes, [("x", F32, [2, 4]), ("c", onnx.TensorProto.BOOL, [])], [("y", F32, [2, 3])],
                       {"w": w}, opset=13)
    stats = model_stats(ir.from_proto(proto))
    assert stats.macs == 2 * (2 * 3 * 4)  # both branches, each 2x4 @ 4x3


def test_split_keeps_labels_with_their_feeds_and_refuses_counts_out_of_range() -> None:
    feeds = [{"input": np.full((1, 1, 8, 8), i, np.float32)} for i in range(5)]
    ds = load_data([{**f, "labels": np.array([i])} for i, f in enumerate(feeds)], _specs())
    search, held = ds.split(2)
    assert (len(search), len(held)) == (2, 3) and search.source == held.source == ds.source
    assert [int(f["input"][0, 0, 0, 0]) for f in held] == [2, 3, 4]
    assert [int(lbl[0]) for lbl in held.labels] == [2, 3, 4] and held.has_labels
    assert [len(part) for part in ds.split(0)] == [0, 5] and [len(part) for part in ds.split(5)] == [5, 0]
    for bad in (-1, 6):
        with pytest.raises(UsageError, match=f"cannot split 5 feeds after the first {bad}"):
            ds.split(bad)


def test_integer_hints_follow_gather_tables_and_scalar_comparisons() -> None:
    from onnxopt.data import needs_probe, probe_random_sizes, random_sizes
    from onnxopt.errors import ModelError

    nodes = [helper.make_node("Cast", ["ids"], ["ids32"], to=onnx.TensorProto.INT32),
             helper.make_node("Gather", ["table", "ids32"], ["e"], axis=0),
             helper.make_node("Gather", ["wide", "cols"], ["w"], axis=1),
             helper.make_node("Constant", [], ["rates"], value=onnx.numpy_helper.from_array(
                 np.array([8000, 16000], np.int64))),
             helper.make_node("Equal", ["rate", "rates"], ["is_rate"]),
             helper.make_node("Equal", ["ids", "rates"], ["ignored"])]
    proto = make_model(nodes, [("ids", I64, ["batch", "seq"]), ("cols", I64, [3]), ("rate", I64, []),
                               ("other", I64, [2])],
                       [("e", F32, None), ("w", F32, None), ("is_rate", onnx.TensorProto.BOOL, None),
                        ("ignored", onnx.TensorProto.BOOL, None)],
                       {"table": np.zeros((3, 4), np.float32), "wide": np.zeros((2, 5), np.float32)})
    specs = {s.name: s for s in input_specs(ir.from_proto(proto))}
    assert specs["ids"].high == 3 and specs["ids"].choices is None  # not a scalar: no choices
    assert specs["cols"].high == 5 and specs["rate"].choices == (8000, 16000) and specs["other"].high is None
    ds = load_data("random:20", list(specs.values()), dims={"seq": 6})
    ids = np.concatenate([f["ids"].ravel() for f in ds])
    assert ids.min() >= 0 and ids.max() == 2
    assert {int(f["rate"]) for f in ds} == {8000, 16000}
    assert needs_probe(list(specs.values()))
    assert random_sizes(list(specs.values()), {}) == [{("ids", 1): 1}, *({("ids", 1): s} for s in (32, 64, 128,
                                                                                                   224, 320, 640))]
    calls = []

    def runs_from_64(feed: dict) -> None:
        calls.append(feed["ids"].shape)
        if feed["ids"].shape[1] < 64:
            raise ModelError("too short")

    sizes, note = probe_random_sizes(list(specs.values()), {}, None, runs_from_64)
    assert sizes == {("ids", 1): 64} and calls == [(1, 1), (1, 32), (1, 64)] and "seq=64" in note


def test_image_inputs_start_at_32_and_batches_are_never_laddered() -> None:
    from onnxopt.data import random_sizes

    proto = make_model([helper.make_node("Identity", ["img"], ["y"]), helper.make_node("Identity", ["st"], ["z"]),
                        helper.make_node("Identity", ["nhwc"], ["w"])],
                       [("img", F32, ["N", 3, "H", "W"]), ("st", F32, [2, "N", 8]), ("nhwc", F32, [1, "h", "w", 3])],
                       [("y", F32, None), ("z", F32, None), ("w", F32, None)])
    specs = input_specs(ir.from_proto(proto))
    attempts = random_sizes(specs, {"W": 48})
    assert attempts[0] == {("img", 2): 32, ("nhwc", 1): 32, ("nhwc", 2): 32}
    assert attempts[-1] == {("img", 2): 640, ("nhwc", 1): 640, ("nhwc", 2): 640} and len(attempts) == 6
    feed = load_data("random:1", specs, dims={"W": 48}, sizes=attempts[0]).feeds[0]
    assert feed["img"].shape == (1, 3, 32, 48) and feed["st"].shape == (2, 1, 8) and feed["nhwc"].shape == (1, 32,
                                                                                                            32, 3)


def test_labels_must_be_one_whole_class_index_per_sample(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    np.savez(tmp_path / "col.npz", input=x, labels=np.arange(4).reshape(4, 1))
    assert load_data(tmp_path / "col.npz", _specs()).labels[0].shape == (4,)
    for name, labels, needle in (("wide", np.zeros((4, 3), np.int64), r"shape \[4, 3\]"),
                                 ("frac", np.full(4, 0.5), "whole class indices")):
        np.savez(tmp_path / f"{name}.npz", input=x, labels=labels)
        with pytest.raises(UsageError, match=needle):
            load_data(tmp_path / f"{name}.npz", _specs())
    with pytest.raises(UsageError, match="batch 0"):
        load_data("random:1", _specs(), batch=0)


def test_comparison_counts_non_finite_values_and_compares_exact_outputs() -> None:
    from onnxopt.validate import Comparison, OutputAccumulator

    acc = OutputAccumulator("y")
    a = np.array([[1.0, 2.0, np.nan], [np.inf, 1.0, 0.5]], np.float32)
    b = np.array([[1.0, np.nan, np.nan], [np.inf, -np.inf, 0.5]], np.float32)
    acc.add(a, b)
    o = acc.result()
    assert (o.nonfinite_a, o.nonfinite_b, o.new_nonfinite, o.mismatches) == (2, 4, 2, 2)
    assert o.max_abs == 0.0 and np.isfinite(o.rel_l2)  # finite positions agree; nothing hidden in a max
    cmp = Comparison([o], samples=2, feeds=1, tolerance=1e9)
    assert not cmp.passed and "non-finite values differ" in cmp.describe()
    assert Comparison([o], samples=2, feeds=1).verdict == "not gated" and Comparison([o], 2, 1).drift
    text = OutputAccumulator("t")
    text.add(np.array(["a", "b", "c", "d"], object), np.array(["a", "x", "c", "d"], object))
    t = text.result()
    assert t.exact and t.mismatches == 1 and t.rel_l2 == 0.25
    assert not Comparison([t], 4, 1, tolerance=0.2) and Comparison([t], 4, 1, tolerance=0.25)
    assert "1 of 4 elements differ" in Comparison([t], 4, 1).warnings()[0]
