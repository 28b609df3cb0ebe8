"""tune's trials as Ray tasks (``--ray local``: a Ray instance started for the run), where Ray is installed."""

from __future__ import annotations

import os

import pytest
from helpers import MODELS

import onnxopt

pytestmark = pytest.mark.ray


def test_trials_run_as_ray_tasks() -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'onnxopt[ray]')")
    result = onnxopt.tune(MODELS / "digits_cnn.onnx", calib=MODELS / "digits_calib.npz",
                          data=MODELS / "digits_eval.npz", max_drop=1.0, objective="size", passes=["quantize"],
                          budget_trials=3, max_layers=2, bench_runs=0, workers=2, ray="local")
    evaluated = [t for t in result.trials if "pid" in t.detail]
    assert evaluated and all(t.detail["pid"] != os.getpid() for t in evaluated)
    assert result.study["ray"] == "local" and result.passed
    import ray

    assert not ray.is_initialized()  # a Ray instance tune started is shut down with it
