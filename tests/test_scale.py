"""What keeps the command line within memory on big models, proved on small ones: validation runs one model
at a time, bench moves to child processes (or skips) above a size, the fusion check releases its session,
quantized weights are unmapped once read, and a one-file save streams its big weights."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import F32, MODELS, make_model, run_ort
from onnx import helper, numpy_helper
from onnxopt.passes.quantize import check
from onnxopt.passes.quantize.calib import quantize_array, weight_scales
from onnxopt.passes.quantize.dynamic import _int8_symmetric

import onnxopt
from onnxopt import api, bench, io, validate
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import ModelError
from onnxopt.registry import make_pass
from onnxopt.report import result_table

MLP = MODELS / "digits_mlp.onnx"
CNN = MODELS / "digits_cnn.onnx"


class LiveSessions:
    """Counts ONNX Runtime sessions of this process: made so far, alive now, most alive at once."""

    def __init__(self) -> None:
        self.created = 0
        self.alive = 0
        self.peak = 0

    def opened(self, sess: object) -> None:
        self.created += 1
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(sess, self._closed)

    def _closed(self) -> None:
        self.alive -= 1


@pytest.fixture
def live(monkeypatch: pytest.MonkeyPatch) -> LiveSessions:
    counter = LiveSessions()
    base = ort.InferenceSession

    class Counted(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            counter.opened(self)

    monkeypatch.setattr(ort, "InferenceSession", Counted)
    return counter


def _matmul_pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """Two MatMul models whose outputs differ by exactly 1.5x (rel L2 0.5, cosine 1)."""
    w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    paths = []
    for name, scale in (("a", 1.0), ("b", 1.5)):
        m = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", F32, ["n", 4])],
                       [("y", F32, ["n", 3])], {"w": w * np.float32(scale)})
        paths.append(tmp_path / f"{name}.onnx")
        paths[-1].write_bytes(m.SerializeToString())
    return paths[0], paths[1], w


# ---------------------------------------------------------------------------------------------- validation
def test_validation_runs_one_model_at_a_time(tmp_path: Path, live: LiveSessions) -> None:
    pa, pb, w = _matmul_pair(tmp_path)
    ds = load_data("random:4", input_specs(io.load(pa)), batch=5)
    cmp = validate.compare_models(pa, pb, ds)
    assert live.created == 2 and live.peak == 1 and live.alive == 0
    ref = np.concatenate([f["x"] @ w for f in ds.feeds])
    o = cmp.outputs[0]
    assert o.rel_l2 == pytest.approx(0.5, rel=1e-5) and o.cosine == pytest.approx(1.0, abs=1e-6)
    assert o.max_abs == pytest.approx(0.5 * np.abs(ref).max(), rel=1e-5) and cmp.samples == 20


def test_outputs_spilled_to_disk_compare_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa, pb, _ = _matmul_pair(tmp_path)
    x, labels = np.random.default_rng(1).normal(size=(12, 4)).astype(np.float32), np.arange(12) % 3
    data = tmp_path / "eval.npz"
    np.savez(data, x=x, labels=labels)
    ds = load_data(str(data), input_specs(io.load(pa)), batch=4)
    in_memory = validate.compare_models(pa, pb, ds)
    monkeypatch.setattr(validate, "HELD_OUTPUT_BYTES", 0)
    spilled = validate.compare_models(pa, pb, ds)
    assert spilled.to_dict() == in_memory.to_dict() and spilled.accuracy_a is not None


def test_held_outputs_go_to_disk_past_the_limit_and_come_back_once() -> None:
    outs = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.int64)]
    with validate.HeldOutputs(["a", "b"], limit=50) as held:
        held.add(outs)  # 56 bytes: past 50, so on disk
        held.add([np.zeros(2, np.float32)])  # 8 bytes: in memory
        assert held.spilled == 56 and held.in_memory == 8
        folder = Path(held._dir.name)
        back = held.take(0)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(back, outs))
        assert not list(folder.iterdir())  # read back and removed
        with pytest.raises(IndexError):
            held.take(0)
        assert np.array_equal(held.take(1)[0], np.zeros(2, np.float32))
    assert not folder.exists()


def test_optimize_never_holds_two_sessions_without_bench(live: LiveSessions) -> None:
    result = onnxopt.optimize(MLP, [("quantize", {"mode": "dynamic", "require_speedup": False})], latency_runs=0)
    # the fusion check, then the original, then the quantized model: one after the other
    assert live.created == 3 and live.peak == 1
    assert result.validation is not None and result.passes[0].stats.summary["integer_kernels"] > 0


# ---------------------------------------------------------------------------------------------- bench
def test_bench_times_models_in_child_processes_above_the_limit(monkeypatch: pytest.MonkeyPatch,
                                                               live: LiveSessions) -> None:
    monkeypatch.setattr(bench, "INTERLEAVE_LIMIT_BYTES", io.file_size(CNN))  # two CNNs exceed it, one does not
    res = bench.bench([CNN, CNN], runs=6, warmup=1, memory=False)
    assert res.method == bench.SEPARATE and live.created == 0
    assert [lat.runs for lat in res.latencies] == [6, 6] and all(lat.median_ms > 0 for lat in res.latencies)
    assert len(res.ratios) == 2 and res.ratios[0] == 1.0
    one = bench.bench([CNN], runs=3, warmup=0, memory=False)
    assert one.method == bench.INTERLEAVED and live.created == 1


def test_bench_interleaves_small_models_in_this_process(live: LiveSessions) -> None:
    res = bench.bench([CNN, MLP], runs=4, warmup=0, memory=False)
    assert res.method == bench.INTERLEAVED and live.created == 2 and live.peak == 2


def test_bench_child_failure_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_feed_for", lambda *a: {"wrong": np.zeros(1, np.float32)})
    with pytest.raises(ModelError, match="child process"):
        bench.bench([CNN, CNN], runs=2, warmup=0, memory=False, separate=True)


def test_table_bench_runs_in_children_or_is_skipped_by_size(monkeypatch: pytest.MonkeyPatch,
                                                           live: LiveSessions) -> None:
    monkeypatch.setattr(bench, "INTERLEAVE_LIMIT_BYTES", 1)
    result = onnxopt.optimize(MLP, [("quantize", {"mode": "dynamic", "require_speedup": False})], latency_runs=3)
    assert result.latency.method == bench.SEPARATE and len(result.latency.latencies) == 2
    assert live.peak == 1 and live.created == 3  # the timed sessions lived in child processes
    assert "latency (ORT CPU, median, separate processes)" in result_table(result)

    monkeypatch.setattr(api, "TABLE_LIMIT_BYTES", io.file_size(MLP) - 1)
    skipped = onnxopt.optimize(MLP, [("quantize", {"mode": "dynamic", "require_speedup": False})], latency_runs=3)
    assert skipped.latency.latencies == [] and "not timed" in skipped.latency.skipped
    assert live.created == 6 and live.peak == 1
    text = result_table(skipped)
    assert "latency: not timed" in text and "latency (ORT" not in text
    assert skipped.to_dict()["latency"]["skipped"] == skipped.latency.skipped


# ---------------------------------------------------------------------------------------------- fusion check
def _quantized_mlp(tmp_path: Path) -> Path:
    model = io.load(MLP)
    make_pass("quantize", {"mode": "dynamic", "check_fusion": False, "require_speedup": False}).call(model, None)
    return io.save(model, tmp_path / "q.onnx")


def test_fusion_check_releases_its_session_before_reading_the_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    live: LiveSessions) -> None:
    path = _quantized_mlp(tmp_path)
    real_load = onnx.load
    seen = []

    def load(*args: object, **kwargs: object) -> onnx.ModelProto:
        seen.append(live.alive)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(check.onnx, "load", load)
    report = check.fusion_report_file(path)
    assert seen == [0] and live.created == 1
    assert report.integer_kernels == sum(n for op, n in report.ops.items() if op in check.INTEGER_KERNELS) > 0


def test_static_quantize_drops_its_calibration_session_before_the_fusion_check(live: LiveSessions) -> None:
    model = io.load(CNN)
    calib = load_data("random:4", input_specs(model))
    stats = make_pass("quantize", {"require_speedup": False, "fallback": "none"}).call(model, Context(calib=calib))
    assert stats.summary["integer_kernels"] > 0
    assert live.created >= 2 and live.peak == 1


def test_fusion_check_skipped_with_a_note_above_the_limit(monkeypatch: pytest.MonkeyPatch,
                                                          live: LiveSessions) -> None:
    model = io.load(MLP)
    monkeypatch.setattr(check, "FUSION_CHECK_LIMIT_BYTES", io.weight_bytes(model) // 8)
    stats = make_pass("quantize", {"mode": "dynamic", "require_speedup": False}).call(model, None)
    assert live.created == 0 and "integer_kernels" not in stats.summary
    assert any(n.startswith("fusion not checked") for n in stats.notes)


# ---------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize(("shape", "axis"), [((300, 70), 1), ((300, 70), None), ((16, 3, 3, 3), 0),
                                             ((16, 3, 5), None), ((5000, 9), 1), ((7, 9), 0)])
def test_int8_weights_match_the_reference_quantizer(shape: tuple[int, ...], axis: int | None) -> None:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal(shape) * 3).astype(np.float32)
    w[1] = 0  # an all-zero row (and, for axis 0, channel) takes scale 1
    if len(shape) == 2:
        w[:, 2] = 0
    q, s = _int8_symmetric(w, axis)
    ref_s = weight_scales(w, axis)
    bshape = (1, -1) if axis == 1 else (-1,) + (1,) * (w.ndim - 1)
    ref_q = quantize_array(w, ref_s.reshape(bshape) if axis is not None else ref_s, 0, np.dtype(np.int8))
    assert q.dtype == np.int8 and np.array_equal(q, ref_q) and np.array_equal(s, ref_s) and s.shape == ref_s.shape


def _external_mlp(tmp_path: Path) -> Path:
    """A MatMul chain whose weights (1.5 MB) live in an external data file."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(size=(256, 1024)).astype(np.float32), rng.normal(size=(1024, 8)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                    helper.make_node("MatMul", ["r", "w2"], ["y"])], [("x", F32, ["n", 256])], [("y", F32, ["n", 8])],
                   {"w1": w1, "w2": w2})
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return path


def test_dynamic_quantize_unmaps_each_weight_it_read(tmp_path: Path) -> None:
    model = io.load(_external_mlp(tmp_path))
    originals = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in originals)
    make_pass("quantize", {"mode": "dynamic", "check_fusion": False}).call(model, None)
    assert all(t.raw is None for t in originals)  # read, quantized and unmapped


# ---------------------------------------------------------------------------------------------- save and size
def test_one_file_save_streams_big_weights_and_reads_back_the_same(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src = _external_mlp(tmp_path)
    model = io.load(src)
    protos = []
    real = io.ir.to_proto

    def to_proto(m: ir.Model) -> onnx.ModelProto:
        protos.append(real(m))
        return protos[-1]

    monkeypatch.setattr(io.ir, "to_proto", to_proto)
    out = io.save(model, tmp_path / "one.onnx", external_data=False)
    monkeypatch.undo()
    assert [len(p.graph.initializer) for p in protos] == [0]  # no weight went through a full-model proto
    assert list(model.graph.initializers) == ["w1", "w2"]  # the model in memory is as it was
    back = onnx.load(str(out))
    onnx.checker.check_model(back, full_check=True)
    stored = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    assert stored.keys() == original.keys() and all(np.array_equal(stored[k], original[k]) for k in stored)
    x = {"x": np.random.default_rng(4).normal(size=(2, 256)).astype(np.float32)}
    assert np.array_equal(run_ort(out, x)[0], run_ort(src, x)[0])
    assert np.array_equal(model.graph.initializers["w1"].const_value.numpy(), original["w1"])


def test_file_size_does_not_parse_a_model_without_external_data(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = _external_mlp(tmp_path)
    inline = io.save(io.load(src), tmp_path / "inline.onnx", external_data=False)
    expected_external = io.file_size(src)
    monkeypatch.setattr(io.onnx, "load", lambda *a, **k: pytest.fail("parsed"))
    assert io.file_size(inline) == inline.stat().st_size
    monkeypatch.undo()
    assert expected_external == src.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size


def test_big_file_checks_stub_weights_and_still_catch_shape_errors(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "WEIGHTLESS_CHECK_BYTES", 0)
    monkeypatch.setattr(validate, "_STUB_MIN_BYTES", 16)
    good = io.save(io.load(_external_mlp(tmp_path)), tmp_path / "good.onnx", external_data=False)
    validate.check_model_file(good, has_sparse=False)
    w = np.ones((5, 3), np.float32)  # [2, 4] @ [5, 3]: strict shape inference must refuse it
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", F32, [2, 4])],
                              [helper.make_tensor_value_info("y", F32, [2, 3])], [numpy_helper.from_array(w, "w")])
    bad = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    bad.ir_version = 8
    path = tmp_path / "bad.onnx"
    path.write_bytes(bad.SerializeToString())
    with pytest.raises(ModelError, match="shape inference|checker"):
        validate.check_model_file(path, has_sparse=False)


def test_counting_nonzeros_unmaps_the_weights_it_read(tmp_path: Path) -> None:
    from onnxopt.analysis import model_stats

    model = io.load(_external_mlp(tmp_path))
    tensors = [v.const_value for v in model.graph.initializers.values()]
    stats = model_stats(model, count_nonzero=True)
    assert stats.nonzero == sum(int(np.count_nonzero(t.numpy())) for t in tensors)
    for t in tensors:
        t.release()
    model_stats(model, count_nonzero=True)
    assert all(t.raw is None for t in tensors)
