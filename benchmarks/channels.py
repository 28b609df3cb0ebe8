"""Benchmark of the channels pass: MACs, parameters, accuracy and ONNX Runtime CPU latency.

Run from the repository root::

    python -m benchmarks.channels              # everything (a few minutes on 2 cores)
    python -m benchmarks.channels --no-resnet

Tables printed:

1. digits CNN (folded): ratio 0.3 / 0.5 and macs 0.5, without and with ``reconstruct`` (calibrated
   on ``digits_calib.npz``), eval accuracy on ``digits_eval.npz``, MACs, parameters and the median
   latency ratio against the folded model (batch 64, interleaved runs, one thread);
2. the digits transformer: FFN hidden units and attention heads, same columns;
3. ResNet-18 (224x224, random weights, built on the fly): ``macs=0.5`` (and with ``round_to=8``),
   latency ratio against the folded model, interleaved runs with one thread.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt.analysis import model_stats
from onnxopt.bench import bench
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.registry import make_pass
from onnxopt.report import human_count, table
from onnxopt.runtime import run, session

MODELS = Path(__file__).resolve().parents[1] / "models"
MAC_ONLY = {"round_to": 1, "verify_speed": False}
"""The tables study cuts chosen by MACs at any channel count (the options before the speed check existed)."""


def _accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    logits = run(session(path, threads=1), {"input": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _folded(path: Path) -> ir.Model:
    model = onnxopt.load(path)
    fold_model(model)
    return model


def _rows(src: Path, configs: list[dict], calib_x: np.ndarray, x: np.ndarray, labels: np.ndarray,
          tmp: Path, runs: int) -> list[list[str]]:
    base = _folded(src)
    base_path = tmp / "folded.onnx"
    onnxopt.save(base, base_path)
    base_stats = model_stats(base)
    np.savez(tmp / "calib.npz", input=calib_x)
    calib = load_data(str(tmp / "calib.npz"), input_specs(base), batch=32)
    feed = load_data(str(tmp / "calib.npz"), input_specs(base), batch=64)
    rows = [["folded", "-", human_count(base_stats.macs), human_count(base_stats.parameters),
             f"{_accuracy(base_path, x, labels):.2%}", "1.00"]]
    for k, options in enumerate(configs):
        model = _folded(src)
        stats = make_pass("channels", {**MAC_ONLY, **options}).call(model, Context(calib=calib))
        path = tmp / f"pruned{k}.onnx"
        onnxopt.save(model, path)
        after = model_stats(model)
        ratio = bench([base_path, path], runs=runs, threads=1, data=feed, memory=False).ratios[1]
        label = ", ".join(f"{key}={val}" for key, val in options.items())
        rows.append([label, f"{stats.summary.get('macs_removed', 0):.1%}", human_count(after.macs),
                     human_count(after.parameters), f"{_accuracy(path, x, labels):.2%}", f"{ratio:.2f}"])
    return rows


HEADER = ["channels options", "MACs cut", "MACs", "params", "accuracy", "latency ratio"]


def digits_cnn(tmp: Path, runs: int) -> str:
    with np.load(MODELS / "digits_eval.npz") as d:
        x, labels = d["input"], d["labels"]
    with np.load(MODELS / "digits_calib.npz") as d:
        calib = d["input"]
    configs = [{"ratio": 0.3}, {"ratio": 0.3, "reconstruct": True}, {"ratio": 0.3, "round_to": 8, "reconstruct": True},
               {"ratio": 0.5}, {"ratio": 0.5, "reconstruct": True},
               {"ratio": 0.5, "importance": "activation", "reconstruct": True},
               {"macs": 0.5}, {"macs": 0.5, "reconstruct": True}, {"macs": 0.5, "round_to": 8, "reconstruct": True}]
    return table(_rows(MODELS / "digits_cnn.onnx", configs, calib, x, labels, tmp, runs), HEADER)


def digits_transformer(tmp: Path, runs: int) -> str:
    with np.load(MODELS / "digits_seq_eval.npz") as d:
        x, labels = d["input"], d["labels"]
    with np.load(MODELS / "digits_calib.npz") as d:
        calib = d["input"].reshape(-1, 8, 8)
    configs = [{"ratio": 0.25}, {"ratio": 0.25, "reconstruct": True}, {"ratio": 0.5},
               {"ratio": 0.5, "reconstruct": True}]
    return table(_rows(MODELS / "digits_transformer.onnx", configs, calib, x, labels, tmp, runs), HEADER)


def resnet18(tmp: Path, runs: int) -> str:
    from models.resnet import build_resnet18

    src = tmp / "resnet18.onnx"
    build_resnet18(src, image_size=224, batch=1)
    base = _folded(src)
    base_path = tmp / "resnet18_folded.onnx"
    onnxopt.save(base, base_path)
    macs0 = model_stats(base, count_nonzero=False).macs
    rows = [["folded", human_count(macs0), "-", "1.00", "-"]]
    for k, options in enumerate([{"macs": 0.5}, {"macs": 0.5, "round_to": 8}]):
        model = _folded(src)
        make_pass("channels", {**MAC_ONLY, **options}).call(model, Context())
        path = tmp / f"resnet18_{k}.onnx"
        onnxopt.save(model, path)
        macs = model_stats(model, count_nonzero=False).macs
        result = bench([base_path, path], runs=runs, threads=1, memory=False)
        base_ms, ms = (lat.median_ms for lat in result.latencies)
        rows.append([", ".join(f"{a}={b}" for a, b in options.items()), human_count(macs),
                     f"{1 - macs / macs0:.1%}", f"{result.ratios[1]:.2f}", f"{ms:.1f} vs {base_ms:.1f}"])
    return table(rows, ["channels options", "MACs", "MACs cut", "latency ratio", "median ms (pruned vs folded)"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-resnet", action="store_true", help="skip ResNet-18 (builds a 47 MB model)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print("digits CNN (latency: batch 64, 1 thread, interleaved)")
        print(digits_cnn(tmp, args.runs))
        print("\ndigits transformer (latency: batch 64, seq 8, 1 thread, interleaved)")
        print(digits_transformer(tmp, args.runs))
        if not args.no_resnet:
            print("\nResNet-18 224x224, batch 1 (latency: 1 thread, interleaved)")
            print(resnet18(tmp, args.runs))


if __name__ == "__main__":
    main()
