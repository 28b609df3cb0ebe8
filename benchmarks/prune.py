"""Benchmark of the prune pass: accuracy, size on disk (plain, sparse, zipped) and latency.

Run from the repository root::

    python -m benchmarks.prune            # everything (about a minute on 2 cores)
    python -m benchmarks.prune --no-resnet

Tables printed:

1. digits CNN (folded) eval accuracy by criterion, scope and sparsity, plus 2:4;
2. the same for the digits transformer block;
3. digits CNN file sizes at several sparsities: dense zeros, ``storage=sparse``, and both zipped;
4. ResNet-18 (224x224, random weights, built on the fly): size and ONNX Runtime CPU latency of
   the model pruned to 80 % against the dense one, interleaved runs with one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnxopt.passes.fold import fold_model

import onnxopt
from onnxopt.bench import bench
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.io import file_size
from onnxopt.registry import make_pass
from onnxopt.report import human_bytes, table
from onnxopt.runtime import run, session
from onnxopt.sparse import SPARSE_KEY

MODELS = Path(__file__).resolve().parents[1] / "models"
CNN_EXCLUDE = ["stem.conv", "fc2"]


def _accuracy(model: ir.Model, data: Path, reshape: tuple[int, ...] | None = None) -> float:
    with np.load(data) as d:
        x, labels = d["input"], d["labels"]
    if reshape:
        x = x.reshape((x.shape[0],) + reshape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        onnxopt.save(model, path)
        logits = run(session(path, threads=1), {"input": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _pruned(path: Path, options: dict, calib, *, fold: bool = True) -> tuple[ir.Model, onnxopt.PassStats]:
    model = onnxopt.load(path)
    if fold:
        fold_model(model)
    stats = make_pass("prune", options).call(model, Context(calib=calib))
    return model, stats


def accuracy_table(name: str, path: Path, eval_npz: Path, calib, reshape=None, exclude=None) -> None:
    base = _accuracy(onnxopt.load(path), eval_npz, reshape)
    rows = [["(dense)", "-", "-", "-", f"{base * 100:.2f}%"]]
    settings = [(c, s, sp) for sp in (0.5, 0.8) for s in ("global", "layer") for c in ("magnitude", "activation")]
    for criterion, scope, sparsity in settings:
        for excl in ([], exclude) if exclude else ([],):
            opts = {"sparsity": sparsity, "scope": scope, "criterion": criterion, "exclude": excl}
            model, stats = _pruned(path, opts, calib)
            rows.append([criterion, scope, f"{sparsity:.0%}", ",".join(excl) or "-",
                         f"{_accuracy(model, eval_npz, reshape) * 100:.2f}%"])
    for criterion in ("magnitude", "activation"):
        model, stats = _pruned(path, {"pattern": "2:4", "criterion": criterion}, calib)
        rows.append([criterion, "2:4", f"{stats.summary['sparsity']:.0%}", "-",
                     f"{_accuracy(model, eval_npz, reshape) * 100:.2f}%"])
    print(f"\n{name}: eval accuracy after one-shot pruning (no fine-tuning)")
    print(table(rows, ["criterion", "scope", "sparsity", "exclude", "accuracy"]))


def _zipped(path: Path) -> int:
    zpath = path.with_suffix(".zip")
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, path.name)
    return zpath.stat().st_size


def _save_dense_and_sparse(model: ir.Model, dense: Path, sparse: Path) -> None:
    """The pruned model written by the same writer twice: as marked (sparse), then with the mark dropped."""
    onnxopt.save(model, sparse)
    model.metadata_props.pop(SPARSE_KEY, None)
    onnxopt.save(model, dense)


def size_table(tmp: Path) -> None:
    rows = []
    dense0 = tmp / "cnn.onnx"
    model = onnxopt.load(MODELS / "digits_cnn.onnx")
    fold_model(model)
    onnxopt.save(model, dense0)
    rows.append(["0%", human_bytes(file_size(dense0)), "-", human_bytes(_zipped(dense0)), "-"])
    for sparsity in (0.5, 0.7, 0.8, 0.9):
        model, _ = _pruned(MODELS / "digits_cnn.onnx", {"sparsity": sparsity, "storage": "sparse"}, None)
        dense, sparse = tmp / f"d{sparsity}.onnx", tmp / f"s{sparsity}.onnx"
        _save_dense_and_sparse(model, dense, sparse)
        rows.append([f"{sparsity:.0%}", human_bytes(file_size(dense)), human_bytes(sparse.stat().st_size),
                     human_bytes(_zipped(dense)), human_bytes(_zipped(sparse))])
    print("\ndigits CNN (folded, global magnitude): file size")
    print(table(rows, ["sparsity", "dense zeros", "storage=sparse", "dense zipped", "sparse zipped"]))


def resnet_table(tmp: Path, runs: int) -> None:
    from models.resnet import build_resnet18

    src = build_resnet18(tmp / "r18.onnx", image_size=224, batch=1)
    model = onnxopt.load(src)
    fold_model(model)
    dense = tmp / "r18_dense.onnx"
    onnxopt.save(model, dense)
    make_pass("prune", {"sparsity": 0.8, "storage": "sparse"}).call(model, Context())
    zeros = tmp / "r18_zeros.onnx"
    sparse = tmp / "r18_sparse.onnx"
    _save_dense_and_sparse(model, zeros, sparse)
    feed = load_data("random:1", input_specs(model))
    res = bench([dense, zeros, sparse], runs=runs, threads=1, data=feed, memory=False)
    rows = []
    for label, path, lat, ratio in zip(("dense", "80% zeros (dense storage)", "80% storage=sparse"),
                                       (dense, zeros, sparse), res.latencies, res.ratios):
        rows.append([label, human_bytes(file_size(path)), human_bytes(_zipped(path)),
                     f"{lat.median_ms:.2f}", f"{ratio:.3f}x"])
    print(f"\nResNet-18 224x224 (folded, global magnitude 80%): ONNX Runtime CPU, 1 thread, {runs} interleaved runs")
    print(table(rows, ["model", "file", "zipped", "median ms", "vs dense"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 size and latency table")
    p.add_argument("--runs", type=int, default=30, help="latency runs per model (default 30)")
    args = p.parse_args()
    cnn = onnxopt.load(MODELS / "digits_cnn.onnx")
    calib = load_data(MODELS / "digits_calib.npz", input_specs(cnn), batch=32)
    accuracy_table("digits CNN", MODELS / "digits_cnn.onnx", MODELS / "digits_eval.npz", calib,
                   exclude=CNN_EXCLUDE)
    tf = onnxopt.load(MODELS / "digits_transformer.onnx")
    with np.load(MODELS / "digits_calib.npz") as d:
        seq_calib = load_data({"input": d["input"].reshape(-1, 8, 8)}, input_specs(tf), batch=32)
    accuracy_table("digits transformer", MODELS / "digits_transformer.onnx", MODELS / "digits_seq_eval.npz",
                   seq_calib)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        size_table(tmp)
        if not args.no_resnet:
            resnet_table(tmp, args.runs)


if __name__ == "__main__":
    main()
