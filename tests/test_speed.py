"""Speed checks: the timing method and its cache (`onnxopt.timing`), factorize and channels deciding by
measured speed, the pipeline's per-pass latency with its WARNING line and ``--require-faster``.

Unmarked tests decide with scripted timers or the deterministic `EstimateTimer` the conftest installs;
tests marked ``speed`` time for real in ONNX Runtime, on pairs whose ratio is far from the decision limit
(5x and more) so that a busy two-core machine does not flip them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, make_model, run_ort
from onnx import helper

import onnxopt
from onnxopt import cli, registry, timing
from onnxopt.context import Context
from onnxopt.errors import UsageError
from onnxopt.graph import constant_array
from onnxopt.registry import Pass, PassStats, make_pass, register_pass

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ scripted timers
@dataclasses.dataclass
class Scripted:
    """A timer whose ratio is `rule(reference model, candidate model)`; counts its calls."""

    rule: object
    cacheable: bool = False
    calls: int = 0

    def measure(self, reference: Path, candidate: Path, feed: dict, *, threads: int | None, limit: float,
                max_blocks: int | None = None, block_ms: float | None = None) -> timing.Measurement:
        self.calls += 1
        ratio = float(self.rule(onnx.load(str(reference)), onnx.load(str(candidate))))
        return timing.Measurement(ratio, 1.0, ratio, blocks=5, low=ratio * 0.98, high=ratio * 1.02)


def _weights(proto: onnx.ModelProto) -> list[tuple[int, ...]]:
    return [tuple(t.dims) for t in proto.graph.initializer]


def _op_count(proto: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in proto.graph.node)


# ------------------------------------------------------------------------------ models
def _two_matmuls() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="big"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="small")]
    inits = {"w1": RNG.normal(size=(128, 128)).astype(np.float32), "w2": RNG.normal(size=(128, 16)).astype(np.float32)}
    return make_model(nodes, [("x", F32, [64, 128])], [("y", F32, [64, 16])], inits)


def _matmul_stack(n: int, width: int = 128) -> onnx.ModelProto:
    nodes, inits, x = [], {}, "x"
    for i in range(n):
        inits[f"w{i}"] = RNG.normal(size=(width, width)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Relu", [x], ["y"], name="relu"))
    return make_model(nodes, [("x", F32, [32, width])], [("y", F32, [32, width])], inits)


def _convs(channels: int = 64, size: int = 32) -> onnx.ModelProto:
    inits = {"w1": RNG.normal(size=(channels, 8, 3, 3)).astype(np.float32),
             "w2": RNG.normal(size=(channels, channels, 3, 3)).astype(np.float32),
             "w3": RNG.normal(size=(8, channels, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3", pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", F32, [1, 8, size, size])], [("y", F32, [1, 8, size, size])], inits)


def _factorize(proto: onnx.ModelProto, ctx: Context | None = None, **options) -> tuple[ir.Model, PassStats]:
    model = ir.from_proto(proto)
    return model, make_pass("factorize", options).call(model, ctx or Context())


# ------------------------------------------------------------------------------ the cache
def _scripted_cache(tmp_path: Path, ratio: float = 0.5, spread: float = 0.02) -> tuple[Scripted, timing.SpeedCache]:
    timer = Scripted(lambda a, b: ratio, cacheable=True)
    timer_measure = timer.measure

    def measure(*args, **kwargs):  # a chosen spread around the ratio
        m = timer_measure(*args, **kwargs)
        return dataclasses.replace(m, low=ratio - spread, high=ratio + spread)

    timer.measure = measure  # type: ignore[method-assign]
    return timer, timing.SpeedCache(tmp_path / "cache")


def test_decisive_answers_are_cached_by_structure_not_weight_values(tmp_path: Path) -> None:
    timer, cache = _scripted_cache(tmp_path)
    a, b = _matmul_stack(1), _matmul_stack(2)
    feed = {"x": np.zeros((32, 128), np.float32)}
    with timing.use_timer(timer):
        first = timing.compare(a, b, feed, limit=0.95, cache=cache)
        again = timing.compare(_matmul_stack(1), _matmul_stack(2), feed, limit=0.95, cache=cache)  # new weights
        other_threads = timing.compare(a, b, feed, threads=1, limit=0.95, cache=cache)
        other_shape = timing.compare(a, _matmul_stack(3), feed, limit=0.95, cache=cache)
    assert first.source == "measured" and again.source == "cached" and again.ratio == first.ratio
    assert other_threads.source == "measured" and other_shape.source == "measured"
    assert timer.calls == 3
    doc = json.loads(cache.path.read_text())
    assert doc["version"] == timing.METHOD and len(doc["entries"]) == 3


def test_an_undecided_answer_is_measured_again(tmp_path: Path) -> None:
    timer, cache = _scripted_cache(tmp_path, ratio=0.95, spread=0.1)  # blocks on both sides of the limit
    feed = {"x": np.zeros((32, 128), np.float32)}
    with timing.use_timer(timer):
        for _ in range(2):
            result = timing.compare(_matmul_stack(1), _matmul_stack(2), feed, limit=0.95, cache=cache)
            assert result.source == "measured"
    assert timer.calls == 2 and not cache.path.exists()


def test_expired_unreadable_or_other_version_caches_are_ignored(tmp_path: Path) -> None:
    timer, cache = _scripted_cache(tmp_path)
    feed = {"x": np.zeros((32, 128), np.float32)}
    a, b = _matmul_stack(1), _matmul_stack(2)
    with timing.use_timer(timer):
        timing.compare(a, b, feed, limit=0.95, cache=cache)
        doc = json.loads(cache.path.read_text())
        for entry in doc["entries"].values():
            entry["time"] = time.time() - (timing.CACHE_DAYS + 1) * 86400
        cache.path.write_text(json.dumps(doc))
        assert timing.compare(a, b, feed, limit=0.95, cache=timing.SpeedCache(cache.folder)).source == "measured"
        cache.path.write_text("{not json")
        assert timing.compare(a, b, feed, limit=0.95, cache=timing.SpeedCache(cache.folder)).source == "measured"
        assert json.loads(cache.path.read_text())["version"] == timing.METHOD  # rewritten whole
        cache.path.write_text(json.dumps({**json.loads(cache.path.read_text()), "version": -1}))
        assert timing.compare(a, b, feed, limit=0.95, cache=timing.SpeedCache(cache.folder)).source == "measured"
    assert timer.calls == 4


def test_cache_folder_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path / "here"))
    assert timing.cache_dir() == tmp_path / "here" and timing.SpeedCache.default().enabled
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", "off")
    assert timing.cache_dir() is None and not timing.SpeedCache.default().enabled
    monkeypatch.delenv("ONNXOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing.cache_dir() == tmp_path / "xdg" / "onnxopt"


def test_structure_key_sees_wiring_shapes_and_integer_constants_but_not_float_values() -> None:
    def reshape(shape: list[int], scale: float = 1.0) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                 helper.make_node("Reshape", ["h", "s"], ["y"], name="reshape")]
        inits = {"w": (RNG.normal(size=(16, 16)) * scale).astype(np.float32), "s": np.array(shape, np.int64)}
        return make_model(nodes, [("x", F32, [2, 16])], [("y", F32, None)], inits)

    key = timing.structure_key
    assert key(reshape([8, 4])) == key(reshape([8, 4], scale=3.0))
    assert key(reshape([8, 4])) != key(reshape([4, 8]))
    assert key(_matmul_stack(1)) != key(_matmul_stack(1, width=64))


def test_simd_width_is_a_vector_width() -> None:
    assert timing.simd_width() in (4, 8, 16)


# ------------------------------------------------------------------------------ factorize
def test_factorize_keeps_only_layers_faster_alone_and_says_why_with_times() -> None:
    # The big layer's chain is faster (0.5x), the small one's is not (1.3x): only the big one changes.
    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        if len(a.graph.node) > 1:  # the whole model
            return 0.9
        return 0.5 if (128, 128) in _weights(a) else 1.3

    timer = Scripted(rule)
    with timing.use_timer(timer):
        model, stats = _factorize(_two_matmuls(), rank_by="ratio", rank_ratio=0.125, min_saving=0.0)
    assert [r["node"] for r in stats.layers] == ["big"] and stats.layers[0]["speed_ratio"] == 0.5
    reasons = {s["node"]: s["reason"] for s in stats.skipped}
    assert "not faster in ONNX Runtime alone" in reasons["small"] and "ms against" in reasons["small"]
    assert "x1.30" in reasons["small"] and "needs <= x0.95" in reasons["small"]
    assert [n.op_type for n in model.graph].count("MatMul") == 3 and stats.summary["timed_layers"] == 2


def test_factorize_verify_speed_false_decides_on_macs_alone() -> None:
    timer = Scripted(lambda a, b: 5.0)
    with timing.use_timer(timer):
        _, stats = _factorize(_two_matmuls(), rank_by="ratio", rank_ratio=0.125, min_saving=0.0, verify_speed=False)
    assert timer.calls == 0 and len(stats.layers) == 2


def test_factorize_backs_off_when_the_whole_model_is_not_faster() -> None:
    # Every layer is faster alone, but the whole model is slower with more than one of them.
    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        if len(a.graph.node) == 1:  # a layer alone
            return 0.5
        chains = _op_count(b, "MatMul") - _op_count(a, "MatMul")
        return 0.9 if chains <= 1 else 1.2

    with timing.use_timer(Scripted(rule)):
        model, stats = _factorize(_matmul_stack(4), rank_by="ratio", rank_ratio=0.125)
    assert len(stats.layers) == 1
    dropped = [s for s in stats.skipped if "but the model was not faster" in s["reason"]]
    assert len(dropped) == 3 and "4 layers: " in dropped[0]["reason"]
    assert "kept 1 of 4" in stats.notes[-1] and "x0.90" in stats.summary["model_speed"]


def test_factorize_keeps_nothing_when_the_whole_model_gains_less_than_min_speedup() -> None:
    # Faster alone, but the whole model only 3 % faster with any of them: within a busy CPU's noise.
    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        return 0.5 if len(a.graph.node) == 1 else 0.97

    with timing.use_timer(Scripted(rule)):
        model, stats = _factorize(_matmul_stack(2), rank_by="ratio", rank_ratio=0.125)
    assert not stats.layers and not stats.modified
    assert [n.op_type for n in model.graph].count("MatMul") == 2
    assert "kept 0 of 2" in stats.notes[-1] and "not x0.95 or faster" in stats.notes[-1]
    with timing.use_timer(Scripted(rule)):  # a smaller bar lets the same gain through
        _, low = _factorize(_matmul_stack(2), rank_by="ratio", rank_ratio=0.125, min_speedup=0.02)
    assert len(low.layers) == 2


def test_factorize_macs_target_is_sought_among_layers_that_are_faster() -> None:
    # mm0 (nearly rank 8, so the cheapest to cut) is never faster factored; the target moves to the others.
    proto = _matmul_stack(3)
    low_rank = (RNG.normal(size=(128, 8)) @ RNG.normal(size=(8, 128)) + 1e-3 * RNG.normal(size=(128, 128)))
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(low_rank.astype(np.float32), "w0"))

    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        if len(a.graph.node) > 1:  # the whole model
            return 0.8
        return 2.0 if np.allclose(onnx.numpy_helper.to_array(a.graph.initializer[0]), low_rank) else 0.5

    with timing.use_timer(Scripted(rule)):
        _, plain = _factorize(proto, rank_by="macs", macs_target=0.6, verify_speed=False)
        _, timed = _factorize(proto, rank_by="macs", macs_target=0.6)
    assert "mm0" in {r["node"] for r in plain.layers}
    assert "mm0" not in {r["node"] for r in timed.layers} and timed.layers
    assert any(s["node"] == "mm0" and "not faster" in s["reason"] for s in timed.skipped)


def test_factorize_times_layers_at_the_shapes_of_the_sample_feed() -> None:
    shapes = []

    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        shapes.append(tuple(d.dim_value for d in a.graph.input[0].type.tensor_type.shape.dim))
        return 0.5

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    proto = make_model(nodes, [("x", F32, ["N", "T", 64])], [("y", F32, ["N", "T", 64])],
                       {"w": RNG.normal(size=(64, 64)).astype(np.float32)})
    sample = {"x": np.zeros((3, 7, 64), np.float32)}
    with timing.use_timer(Scripted(rule)):
        _factorize(proto, Context(sample=sample), rank_by="ratio", rank_ratio=0.25)
    assert shapes and all(s == (3, 7, 64) for s in shapes[:1])


# ------------------------------------------------------------------------------ channels
def _cut(proto: onnx.ModelProto, rule, **options) -> tuple[ir.Model, PassStats]:
    model = ir.from_proto(proto)
    with timing.use_timer(Scripted(rule)):
        stats = make_pass("channels", {"round_to": 1, **options}).call(model, Context())
    return model, stats


def _conv2_out(model: ir.Model) -> int:
    return next(constant_array(n.inputs[1]).shape[0] for n in model.graph if n.name == "conv2")


def test_channels_keeps_the_largest_cut_that_is_faster() -> None:
    # Half the planned cut is the largest one that runs faster.
    def rule(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
        kept = {t.name: tuple(t.dims) for t in b.graph.initializer}["w2"][0]
        return 1.1 if kept < 48 else 0.8

    model, stats = _cut(_convs(), rule, ratio=0.5, exclude=["conv1"])
    assert _conv2_out(model) == 48  # 64 - 32 planned, half of it cut
    assert "larger cuts were not faster" in stats.notes[-1] and "x1.10" in stats.notes[-1]
    assert stats.summary["speed"].startswith("50% of the cut")


def test_channels_declines_every_slower_cut_with_the_measurements() -> None:
    model, stats = _cut(_convs(), lambda a, b: 1.25, ratio=0.5, exclude=["conv1"])
    assert not stats.modified and _conv2_out(model) == 64
    note = stats.notes[-1]
    assert "no cut made the model at least 5% faster" in note and note.count("x1.25") == 3
    assert "verify_speed=false" in note


def test_channels_round_to_zero_is_the_simd_width() -> None:
    width = timing.simd_width()
    model = ir.from_proto(_convs(channels=4 * width))
    make_pass("channels", {"ratio": 0.3, "verify_speed": False, "exclude": ["conv1"]}).call(model, Context())
    assert _conv2_out(model) % width == 0 and _conv2_out(model) < 4 * width


# ------------------------------------------------------------------------------ the pipeline
def _heavy_branch(model: ir.Model, width: int = 256, depth: int = 24) -> None:
    """y = x + 0 * sum(x W^depth): the same output, `depth` large MatMuls more work."""
    graph = model.graph
    x = graph.inputs[0]
    out_node = graph.outputs[0].producer()
    h = x
    rng = np.random.default_rng(1)
    for i in range(depth):  # scaled by 1/sqrt(width): the norm stays near 1, no overflow, no denormals
        weight = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
        w = ir.Value(name=f"heavy.w{i}", const_value=ir.tensor(weight))
        graph.register_initializer(w)
        node = ir.Node("", "MatMul", [h, w], name=f"heavy.mm{i}")
        graph.insert_before(out_node, node)
        h = node.outputs[0]
    zero = ir.Value(name="heavy.zero", const_value=ir.tensor(np.zeros((), np.float32)))
    graph.register_initializer(zero)
    total = ir.Node("", "ReduceSum", [h], attributes=[ir.AttrInt64("keepdims", 0)], name="heavy.sum")
    scaled = ir.Node("", "Mul", [total.outputs[0], zero], name="heavy.mul")
    graph.insert_before(out_node, [total, scaled])
    old = out_node.inputs[0]
    added = ir.Node("", "Add", [old, scaled.outputs[0]], name="heavy.add")
    graph.insert_before(out_node, added)
    out_node.replace_input_with(0, added.outputs[0])


def _light() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Identity", ["r"], ["y"])]
    return make_model(nodes, [("x", F32, [16, 256])], [("y", F32, [16, 256])])


def _heavy(tmp_path: Path) -> Path:
    model = ir.from_proto(_light())
    _heavy_branch(model)
    path = tmp_path / "heavy.onnx"
    ir.save(model, path)
    return path


@pytest.fixture
def speed_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two speed passes for the gate: `bloat` adds a heavy branch, `trim` takes it out (outputs unchanged)."""
    registry.list_passes()  # the built-in passes register before the registry is copied
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_pass("bloat")
    class Bloat(Pass):
        """Add work that changes nothing."""
        speed = True

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            _heavy_branch(model)
            return PassStats(modified=True)

    @register_pass("trim")
    class Trim(Pass):
        """Take the heavy branch out again."""
        speed = True

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            add = next(n for n in model.graph if n.name == "heavy.add")
            add.outputs[0].replace_all_uses_with(add.inputs[0])
            for node in reversed([n for n in model.graph if n.name.startswith("heavy.")]):
                model.graph.remove(node, safe=True)
            for name in [k for k in model.graph.initializers if k.startswith("heavy.")]:
                del model.graph.initializers[name]
            return PassStats(modified=True)


@pytest.mark.speed
def test_require_faster_exits_1_on_a_slower_model_and_names_the_pass(tmp_path: Path, speed_passes,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "light.onnx"
    onnx.save(_light(), str(src))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = cli.main([str(src), "--passes", "fold,bloat", "-o", str(out), "--report", str(report),
                     "--require-faster"])
    captured = capsys.readouterr()
    assert code == 1 and out.is_file()  # the file is written, as with --tolerance
    warnings = [line for line in captured.err.splitlines() if line.startswith("onnxopt: WARNING:")]
    assert len(warnings) == 1 and "pass 'bloat'" in warnings[0] and "latency" in warnings[0]
    assert "--require-faster" in captured.err and "wrote" in captured.out
    latency = json.loads(report.read_text())["latency"]
    assert latency["slower"] is True and latency["suspect"] == "bloat"
    assert [p["after"] for p in latency["per_pass"]] == ["fold", "bloat"]
    assert latency["per_pass"][1]["step"] > 2.0


@pytest.mark.speed
def test_require_faster_exits_0_on_a_faster_model(tmp_path: Path, speed_passes,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = cli.main([str(_heavy(tmp_path)), "--passes", "trim,fold", "-o", str(out), "--report", str(report),
                     "--require-faster"])
    captured = capsys.readouterr()
    assert code == 0 and "WARNING" not in captured.err
    latency = json.loads(report.read_text())["latency"]
    assert latency["slower"] is False and latency["suspect"] is None
    assert [p["after"] for p in latency["per_pass"]] == ["trim", "fold"] and latency["per_pass"][0]["ratio"] < 0.5


def _fake_bench(monkeypatch: pytest.MonkeyPatch, medians: list[float]) -> None:
    from onnxopt import latency
    from onnxopt.bench import BenchResult, Latency

    def fake_bench(paths, **kwargs):
        assert len(paths) == len(medians)
        return BenchResult([Latency(str(p), 5, 1, m, m, m, m, 1.0 / m) for p, m in zip(paths, medians)], "cpu", None)

    monkeypatch.setattr(latency, "bench", fake_bench)


def _records(steps: list[Pass], changed: list[bool]) -> list:
    from onnxopt.pipeline import PassRecord

    return [PassRecord(type(s).name, {}, PassStats(modified=c), 0.0) for s, c in zip(steps, changed)]


def _verdict(tmp_path: Path, changed: list[bool], data=None):
    from onnxopt import latency

    pipeline = [make_pass("fold"), make_pass("factorize"), make_pass("quantize")]
    snapshots = [latency.Snapshot("fold", 0, False, tmp_path / "a.onnx"),
                 latency.Snapshot("factorize", 1, True, tmp_path / "b.onnx")]
    return latency.measure(tmp_path / "o.onnx", tmp_path / "f.onnx", snapshots, pipeline,
                           _records(pipeline, changed), runs=5, threads=None, dims={}, batch=None, data=data)


@pytest.mark.parametrize(("medians", "slower", "suspect"), [
    ([1.0, 0.8, 1.2, 1.1], True, "factorize"),    # fold helped, factorize cost 1.5x, quantize helped a little
    ([1.0, 0.8, 0.7, 1.0], False, None),          # back to the original's time: not slower
    ([1.0, 1.0, 1.01, 1.03], True, "quantize"),   # just past the margin; quantize's step is the larger
])
def test_the_verdict_blames_the_speed_pass_with_the_largest_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                 medians, slower, suspect) -> None:
    _fake_bench(monkeypatch, medians)
    two, verdict = _verdict(tmp_path, [True, True, True])
    assert len(two.latencies) == 2 and verdict.ratio == pytest.approx(medians[-1])
    assert verdict.slower is slower and (verdict.suspect.after if verdict.suspect else None) == suspect
    assert [p.after for p in verdict.per_pass] == ["fold", "factorize", "quantize"]
    line = verdict.warning()
    assert (line is not None) is slower
    if line:
        assert line.startswith("the optimized model is slower") and f"pass '{suspect}'" in line and "\n" not in line


def test_a_speed_pass_that_changed_nothing_is_not_blamed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_bench(monkeypatch, [1.0, 0.8, 1.2, 1.3])
    _, verdict = _verdict(tmp_path, [True, False, True])
    assert verdict.slower and verdict.suspect.after == "quantize"
    _, verdict = _verdict(tmp_path, [True, False, False])
    assert verdict.slower and verdict.suspect is None and verdict.warning() is None  # slower, but not theirs


def test_a_slower_verdict_is_confirmed_in_blocks_before_it_is_said(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from onnxopt.data import Dataset

    for name in ("o", "f"):
        onnx.save(_matmul_stack(1), str(tmp_path / f"{name}.onnx"))
    data = Dataset([{"x": np.zeros((32, 128), np.float32)}], [None], "test")
    _fake_bench(monkeypatch, [1.0, 0.8, 1.2, 1.1])  # the single runs say 1.1x
    with timing.use_timer(Scripted(lambda a, b: 0.99)):  # the blocks say it is not
        _, verdict = _verdict(tmp_path, [True, True, True], data)
    assert not verdict.slower and verdict.check is not None and verdict.ratio == pytest.approx(0.99)
    assert verdict.to_dict()["check"]["ratio"] == pytest.approx(0.99)
    with timing.use_timer(Scripted(lambda a, b: 1.3)):
        _, verdict = _verdict(tmp_path, [True, True, True], data)
    assert verdict.slower and "median of 5 interleaved blocks" in verdict.warning()


@pytest.mark.parametrize(("names", "points"), [
    (["fold", "factorize"], [0]),                      # the model before the first speed pass; the last is final
    (["factorize"], []),
    (["fold", "factorize", "quantize"], [0, 1]),
    (["factorize", "fold", "quantize", "fold"], [0, 2]),
    (["fold", "prune"], []),                           # no speed pass: original and final only
])
def test_snapshots_are_taken_around_speed_passes(names: list[str], points: list[int]) -> None:
    from onnxopt.latency import _snapshot_points

    assert _snapshot_points([make_pass(n) for n in names]) == points


def test_require_faster_needs_the_timing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([str(MODELS / "digits_mlp.onnx"), "--passes", "fold", "-o", str(tmp_path / "o.onnx"),
                     "--bench-runs", "0", "--require-faster"])
    assert code == 2 and "--require-faster" in capsys.readouterr().err
    assert "--require-faster" in _help(capsys) and "as with --tolerance" in _help(capsys)


def _help(capsys: pytest.CaptureFixture[str]) -> str:
    cli.main(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_without_speed_passes_no_snapshot_is_timed(tmp_path: Path) -> None:
    result = onnxopt.optimize(MODELS / "digits_mlp.onnx", ["fold"], data="random:2", latency_runs=5)
    assert result.speed is not None and result.speed.per_pass == () and result.speed.warning() is None
    assert len(result.latency.latencies) == 2


def test_speed_passes_are_declared_by_the_pass() -> None:
    passes = registry.list_passes()
    assert {name for name, cls in passes.items() if cls.speed} >= {"factorize", "channels", "quantize"}
    assert not passes["fold"].speed and not passes["prune"].speed


# ------------------------------------------------------------------------------ real timing
@pytest.mark.speed
def test_real_timing_keeps_a_cheap_chain_and_declines_a_dearer_one() -> None:
    def one_matmul(n: int) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        return make_model(nodes, [("x", F32, [64, n])], [("y", F32, [64, n])],
                          {"w": RNG.normal(size=(n, n)).astype(np.float32)})

    # 512 -> rank 32: 8x fewer MACs; 256 at full rank: twice the MACs.
    model, kept = _factorize(one_matmul(512), Context(threads=1), rank_by="ratio", rank_ratio=0.0625)
    assert kept.layers and kept.layers[0]["speed_ratio"] < 0.95 and kept.layers[0]["latency_ms"][1] > 0
    _, declined = _factorize(one_matmul(256), Context(threads=1), rank_by="ratio", rank_ratio=1.0, min_saving=-1.0)
    assert not declined.layers and "ms against" in declined.skipped[0]["reason"]
    x = RNG.normal(size=(64, 512)).astype(np.float32)
    assert run_ort(model, {"x": x})[0].shape == (64, 512)


@pytest.mark.speed
def test_real_timing_of_an_obvious_pair_is_decided_early_and_cached(tmp_path: Path) -> None:
    cache = timing.SpeedCache(tmp_path / "cache")
    feed = {"x": RNG.normal(size=(32, 256)).astype(np.float32)}
    first = timing.compare(_matmul_stack(1, 256), _matmul_stack(12, 256), feed, threads=1, limit=0.95, cache=cache)
    assert first.ratio > 3 and first.blocks == 5 and first.source == "measured"
    again = timing.compare(_matmul_stack(1, 256), _matmul_stack(12, 256), feed, threads=1, limit=0.95, cache=cache)
    assert again.source == "cached" and again.ratio == pytest.approx(first.ratio, rel=1e-5)


@pytest.mark.speed
def test_real_timing_keeps_a_channel_cut_that_pays() -> None:
    model = ir.from_proto(_convs(channels=128, size=48))
    stats = make_pass("channels", {"ratio": 0.75, "exclude": ["conv1"]}).call(model, Context(threads=1))
    assert stats.modified and _conv2_out(model) == 32 and stats.summary["speed"].startswith("100% of the cut")


def test_usage_errors_for_speed_options() -> None:
    with pytest.raises(UsageError, match="min_speedup"):
        make_pass("channels", {"min_speedup": 1.5})
    with pytest.raises(UsageError, match="verify_runs"):
        make_pass("factorize", {"verify_runs": 2})
