"""Checks of an optimized model: the ONNX checker, strict shape inference, an ONNX Runtime
session, and numeric agreement with the original on the same feeds.

A `Comparison` is truthy when it passes its tolerance and prints the tolerance it was held to.
Metrics per output: max abs error, relative L2 error ``‖a−b‖/‖a‖``, cosine similarity, and top-1
agreement when the output looks like class scores ([N, C] floats, C > 1). With labels, accuracy of
both models.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import sparse
from onnxopt.data import Dataset
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.metrics import METRICS
from onnxopt.progress import progress
from onnxopt.runtime import run, session

__all__ = ["OutputDiff", "Comparison", "compare_models", "check_model_file", "METRICS"]



@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Comparison:
    outputs: list[OutputDiff]
    samples: int
    feeds: int
    accuracy_a: float | None = None
    accuracy_b: float | None = None
    metric: str = "rel_l2"
    tolerance: float | None = None

    @property
    def worst(self) -> float:
        """The chosen metric's worst value over outputs (for top1/accuracy: the loss, 0..1)."""
        if self.metric == "max_abs":
            return max((o.max_abs for o in self.outputs), default=0.0)
        if self.metric == "cosine":
            return 1.0 - min((o.cosine for o in self.outputs), default=1.0)
        if self.metric == "top1":
            vals = [o.top1 for o in self.outputs if o.top1 is not None]
            if not vals:
                raise UsageError("metric top1 needs an output that looks like class scores")
            return 1.0 - min(vals)
        if self.metric == "accuracy":
            if self.accuracy_a is None or self.accuracy_b is None:
                raise UsageError("metric accuracy needs data with labels")
            return max(0.0, self.accuracy_a - self.accuracy_b)
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def passed(self) -> bool:
        return self.tolerance is None or self.worst <= self.tolerance

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        tol = "no tolerance" if self.tolerance is None else f"{self.metric} <= {self.tolerance:g}"
        return f"{verdict}: worst {self.metric} {self.worst:.3g} ({tol}, {self.samples} samples)"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        d["worst"] = self.worst
        return d


def check_model_file(path: str | os.PathLike[str], *, has_sparse: bool | None = None) -> None:
    """Full ONNX checker and strict shape inference on a saved model; raises ModelError.

    onnx's shape inference types a sparse initializer as a sparse tensor and rejects it as a
    Conv/Gemm/MatMul input although ONNX Runtime reads it, so such a model is checked densified.
    A caller that knows whether the file holds sparse initializers says so in `has_sparse`, which
    spares reading the whole file once more to find out.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-infer-") as tmp:
        if has_sparse is not False:
            path = _densified(Path(path), Path(tmp))
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ModelError(f"the optimized model fails the ONNX checker: {first_line(exc)}") from None
        try:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True, data_prop=False
            )  # no data propagation: on a hostile model it materializes e.g. Range(0, 2**40) as a list of dims
        except Exception as exc:
            raise ModelError(f"the optimized model fails strict shape inference: {first_line(exc)}") from None


def _densified(path: Path, tmp: Path) -> Path:
    proto = onnx.load(str(path), load_external_data=False)
    if not proto.graph.sparse_initializer:
        return path
    sparse.densify(proto)
    dense = tmp / "dense.onnx"
    onnx.save(proto, str(dense))
    return dense


def looks_like_scores(arr: np.ndarray) -> bool:
    return arr.ndim == 2 and arr.shape[1] > 1 and np.issubdtype(arr.dtype, np.floating)


class _Acc:
    """Streaming sums for one output's metrics."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.err2 = 0.0
        self.ref2 = 0.0
        self.dot = 0.0
        self.b2 = 0.0
        self.agree = 0
        self.rows = 0
        self.scores = True

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise ModelError(f"output shapes differ: {list(a.shape)} vs {list(b.shape)}")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = a64 - b64
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.err2 += float(np.sum(diff * diff))
        self.ref2 += float(np.sum(a64 * a64))
        self.dot += float(np.sum(a64 * b64))
        self.b2 += float(np.sum(b64 * b64))
        if looks_like_scores(a) and self.scores:
            self.agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            self.rows += a.shape[0]
        else:
            self.scores = False

    def result(self, name: str) -> OutputDiff:
        rel = float(np.sqrt(self.err2 / self.ref2)) if self.ref2 > 0 else float(np.sqrt(self.err2))
        denom = np.sqrt(self.ref2 * self.b2)
        cos = float(self.dot / denom) if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        top1 = self.agree / self.rows if self.scores and self.rows else None
        return OutputDiff(name, self.max_abs, rel, cos, top1)


def compare_models(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    data: Dataset,
    *,
    metric: str = "rel_l2",
    tolerance: float | None = None,
    threads: int | None = None,
    desc: str = "validating",
) -> Comparison:
    """Run both models on every feed of `data` and compare outputs by name."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}' (choose {', '.join(METRICS)})")
    sa = session(path_a, threads=threads)
    sb = session(path_b, threads=threads)
    names_a = [o.name for o in sa.get_outputs()]
    names_b = [o.name for o in sb.get_outputs()]
    if names_a != names_b:
        raise ModelError(f"the models' outputs differ: {names_a} vs {names_b}")
    accs = {n: _Acc() for n in names_a}
    correct_a = correct_b = labelled = 0
    samples = 0
    for i, feed in enumerate(progress(data.feeds, desc=desc)):
        outs_a = run(sa, feed)
        outs_b = run(sb, feed)
        for name, a, b in zip(names_a, outs_a, outs_b):
            accs[name].add(np.asarray(a), np.asarray(b))
        first = next(iter(feed.values()))
        samples += int(first.shape[0]) if first.ndim else 1
        labels = data.labels[i] if i < len(data.labels) else None
        if labels is not None:
            score_out = next((k for k, o in enumerate(outs_a) if looks_like_scores(np.asarray(o))), None)
            if score_out is not None:
                lbl = np.asarray(labels).reshape(-1)
                correct_a += int(np.sum(np.argmax(outs_a[score_out], axis=1) == lbl))
                correct_b += int(np.sum(np.argmax(outs_b[score_out], axis=1) == lbl))
                labelled += lbl.shape[0]
    outputs = [accs[n].result(n) for n in names_a]
    acc_a = correct_a / labelled if labelled else None
    acc_b = correct_b / labelled if labelled else None
    return Comparison(outputs, samples, len(data), acc_a, acc_b, metric, tolerance)
