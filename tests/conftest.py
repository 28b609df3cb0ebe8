"""Shared test helpers: paths to fixture models, a tiny-graph builder, ORT runs and parity checks."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXOPT_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _speed_checks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Speed checks (factorize, channels) answer from a deterministic estimate instead of the clock, and
    nothing is cached in the user's folder; tests marked `speed` time for real, with a private cache."""
    from onnxopt import timing

    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "speed-cache"))
    if request.node.get_closest_marker("speed"):
        yield
        return
    with timing.use_timer(timing.EstimateTimer()):
        yield


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def resnet_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.resnet import build_resnet_tiny

    path = tmp_path_factory.mktemp("resnet") / "resnet_tiny.onnx"
    build_resnet_tiny(path, batch="batch")
    return path


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[tuple[str, int, Sequence[int | str | None]]],
    outputs: Sequence[tuple[str, int, Sequence[int | str | None] | None]],
    initializers: dict[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    ir_version: int | None = None,
) -> onnx.ModelProto:
    """Build a small checked model. `inputs`/`outputs` are (name, TensorProto dtype, shape)."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, None if s is None else list(s)) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(onnx.IR_VERSION, _ir_for_opset(opset))
    if any(s is None for _, _, s in outputs):  # outputs given without a shape: take the inferred one
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, new in zip(model.graph.output, inferred.graph.output):
            out.CopyFrom(new)
    onnx.checker.check_model(model, full_check=True)
    return model


def _ir_for_opset(opset: int) -> int:
    table = {11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}
    return table.get(opset, onnx.IR_VERSION)


def save_model(model: onnx.ModelProto | ir.Model, path: Path) -> Path:
    if isinstance(model, ir.Model):
        ir.save(model, path)
    else:
        onnx.save(model, str(path))
    return path


def run_ort(model: onnx.ModelProto | ir.Model | Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ONNX Runtime (CPU) for one feed; in-memory models are serialized for ORT."""
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_same_outputs(a, b, feeds: dict[str, np.ndarray], *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Both models give the same outputs (to float rounding by default) on `feeds`."""
    outs_a, outs_b = run_ort(a, feeds), run_ort(b, feeds)
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


def digits_eval(name: str = "digits_eval.npz") -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name) as d:
        return d["input"], d["labels"]


def accuracy(model, x: np.ndarray, labels: np.ndarray, input_name: str = "input") -> float:
    logits = run_ort(model, {input_name: x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


F32 = TensorProto.FLOAT
I64 = TensorProto.INT64
