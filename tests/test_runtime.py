"""ONNX Runtime sessions and tapped runs: one-line errors, what a TapSession taps, that it leaves the
model as it was, and that it runs only what is asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F32, I64, MODELS, make_model, save_model
from onnx import helper

from onnxopt.errors import ModelError, UsageError
from onnxopt.runtime import TapSession, provider_name, run, run_outputs, run_taps, session, tap_values

W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0]], np.float32)


def _model() -> ir.Model:
    """x[2,3] @ W -> h; relu(h) -> y; and a side branch: Reshape(x, shape) -> side (fails on bad shapes)."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"]),
         helper.make_node("Reshape", ["x", "shape"], ["side"])],
        [("x", F32, [2, 3]), ("shape", I64, [2])], [("y", F32, [2, 2])], {"W": W},
    )
    return ir.from_proto(proto)


def _feed(shape: tuple[int, int] = (3, 2)) -> dict[str, np.ndarray]:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    return {"x": x, "shape": np.array(shape, np.int64)}


def test_session_load_failure_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelError, match=r"^ONNX Runtime cannot load 'bad.onnx': ") as err:
        session(bad)
    assert "\n" not in str(err.value)


def test_unknown_or_unavailable_providers_are_usage_errors() -> None:
    assert provider_name("cpu") == "CPUExecutionProvider"
    with pytest.raises(UsageError, match="unknown provider 'tpu' \\(choose cpu or cuda\\)"):
        provider_name("tpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="has no CUDAExecutionProvider"):
            session(MODELS / "digits_cnn.onnx", provider="cuda")


def test_run_failures_are_one_line(tmp_path: Path) -> None:
    sess = session(save_model(_model(), tmp_path / "m.onnx"))
    assert [a.shape for a in run(sess, _feed())] == [(2, 2)]
    for feed, names in ((_feed((4, 4)), ["side"]), ({"x": _feed()["x"]}, None), (_feed(), ["nope"])):
        with pytest.raises(ModelError, match="^ONNX Runtime failed to run the model: ") as err:
            run_outputs(sess, feed, names)
        assert "\n" not in str(err.value)


def test_tap_values_finds_inputs_initializers_and_node_outputs() -> None:
    model = _model()
    assert [v.name for v in tap_values(model, ["x", "W", "h", "y"])] == ["x", "W", "h", "y"]
    with pytest.raises(ModelError, match="no tensor named nope, gone in the model"):
        tap_values(model, ["h", "nope", "gone"])


def test_tap_session_taps_inputs_initializers_and_inner_tensors() -> None:
    model, feed = _model(), _feed()
    h = feed["x"] @ W
    with TapSession(model, ["x", "W", "h", "side"]) as taps:
        got = taps.run(feed)
        np.testing.assert_allclose(got["h"], h, rtol=1e-6)
        np.testing.assert_allclose(got["y"], np.maximum(h, 0), rtol=1e-6)  # the model's outputs come too
        np.testing.assert_array_equal(got["x"], feed["x"])
        np.testing.assert_array_equal(got["W"], W)
        np.testing.assert_array_equal(got["side"], feed["x"].reshape(3, 2))
        only = taps.run(feed, ["W", "h"])
        assert set(only) == {"W", "h"}


def test_tap_session_leaves_the_model_as_it_was() -> None:
    model = _model()
    outputs = list(model.graph.outputs)
    with TapSession(model, ["h", "side"]):
        assert list(model.graph.outputs) == outputs
    assert [v.name for v in model.graph.outputs] == ["y"] and len(model.graph) == 3


def test_tap_session_runs_only_what_is_asked() -> None:
    """The side branch fails on this feed (6 elements into 4x4): a run that needs the model fails, but
    inputs and initializers are answered without running it, and a run fetches only what is asked."""
    model, bad, good = _model(), _feed((4, 4)), _feed()
    with TapSession(model, ["x", "W", "h"]) as taps:
        got = taps.run(bad, ["x", "W"])
        assert set(got) == {"x", "W"}
        np.testing.assert_array_equal(got["x"], bad["x"])
        with pytest.raises(ModelError, match="failed to run"):
            taps.run(bad, ["h"])
        assert set(taps.run(good, ["h", "W"])) == {"h", "W"}
        assert set(taps.run(good)) == {"x", "W", "h", "y"}


def test_tap_session_infers_types_it_needs_and_refuses_what_has_none() -> None:
    model = _model()
    for node in model.graph:
        node.outputs[0].type, node.outputs[0].shape = None, None
    model.graph.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    with TapSession(model, ["h"]) as taps:
        assert taps.run(_feed(), ["h"])["h"].shape == (2, 2)
    custom = ir.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F32, [2])], [("y", F32, [2])]))
    odd = ir.Node("custom.domain", "Mystery", [custom.graph.inputs[0]], name="odd")
    custom.graph.append(odd)
    odd.outputs[0].name = "mystery"
    with pytest.raises(ModelError, match="tensor 'mystery' has no type, even after shape inference"):
        TapSession(custom, ["mystery"])


def test_run_taps_streams_one_dict_per_feed() -> None:
    feeds = [_feed(), {**_feed(), "x": _feed()["x"] * 2}]
    results = list(run_taps(_model(), ["h"], feeds))
    assert len(results) == 2
    np.testing.assert_allclose(results[1]["h"], 2 * results[0]["h"], rtol=1e-6)


def test_onnx_runtime_prints_no_log_lines_when_a_run_fails(tmp_path: Path) -> None:
    """ORT writes '[E:onnxruntime:...]' lines of its own when a run fails, unless its loggers are at fatal only."""
    import subprocess
    import sys

    path = save_model(_model(), tmp_path / "m.onnx")
    code = (f"import numpy as np\nfrom onnxopt.runtime import session, run\ns = session({str(path)!r})\n"
            "try:\n    run(s, {'x': np.zeros((2, 3), np.float32), 'shape': np.array([4, 4])})\n"
            "except Exception as e:\n    print(type(e).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ModelError" and r.stderr == "", r.stderr


@pytest.mark.parametrize("threads", [0, -1, 100_000])
def test_sessions_refuse_thread_counts_out_of_range(threads: int) -> None:
    with pytest.raises(UsageError, match="threads"):
        session(MODELS / "digits_cnn.onnx", threads=threads)
