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
from onnxopt.io import iter_proto_graphs
from onnxopt.metrics import METRICS
from onnxopt.progress import progress
from onnxopt.runtime import run, session

__all__ = ["OutputDiff", "Comparison", "compare_models", "check_model_file", "METRICS", "HeldOutputs",
           "HELD_OUTPUT_BYTES", "hold_outputs"]



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

    A model file above `WEIGHTLESS_CHECK_BYTES` (weights inside it) is read once and checked with its
    big weights as references of the same name, type and shape (`_stub_weights`): the checker and shape
    inference look only at those, and on the file itself each would parse every weight again (and shape
    inference write a full copy). Reading the weights is ONNX Runtime's part of validation.
    """
    with tempfile.TemporaryDirectory(prefix="onnxopt-infer-") as tmp:
        path = _checkable(Path(path), Path(tmp), has_sparse)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ModelError(f"the optimized model fails the ONNX checker: {first_line(exc)}") from None
        try:
            onnx.shape_inference.infer_shapes_path(
                str(path), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True, data_prop=True
            )
        except Exception as exc:
            raise ModelError(f"the optimized model fails strict shape inference: {first_line(exc)}") from None


# A model file bigger than this is checked with its big weights stubbed out (see `check_model_file`).
WEIGHTLESS_CHECK_BYTES = 64 * 1024 * 1024
_STUB_MIN_BYTES = 1024 * 1024
_STUB_FILE = "weights.stub"


def _checkable(path: Path, tmp: Path, has_sparse: bool | None) -> Path:
    """The file to check for the model at `path`: itself, or a copy in `tmp` densified and/or stubbed."""
    big = path.stat().st_size > WEIGHTLESS_CHECK_BYTES
    if has_sparse is False and not big:
        return path
    proto = onnx.load(str(path), load_external_data=False)
    changed = False
    if proto.graph.sparse_initializer:
        sparse.densify(proto)
        changed = True
    if big:
        changed = _stub_weights(proto, tmp) or changed
    if not changed:
        return path
    checked = tmp / "checked.onnx"
    onnx.save(proto, str(checked))
    return checked


def _stub_weights(proto: onnx.ModelProto, tmp: Path) -> bool:
    """Replace the raw data of big initializers by an external reference to an empty file in `tmp` (the
    checker asks that the file exists, shape inference reads no weight). Not when the model already has
    external data (its references must stay valid); False when nothing was replaced."""
    graphs = list(iter_proto_graphs(proto.graph))
    inits = [t for g in graphs for t in g.initializer]
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in inits):
        return False
    stubbed = False
    for t in inits:
        if len(t.raw_data) >= _STUB_MIN_BYTES:
            n = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", _STUB_FILE), ("offset", "0"), ("length", str(n))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            stubbed = True
    if stubbed:
        (tmp / _STUB_FILE).touch()
    return stubbed


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
    """Run both models on every feed of `data` and compare outputs by name.

    The models run one after the other, never both loaded at once: model A runs on every feed and its
    session is released, keeping only its outputs (`hold_outputs`: in memory up to `HELD_OUTPUT_BYTES`,
    on disk beyond), then model B runs and is compared feed by feed.
    """
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}' (choose {', '.join(METRICS)})")
    held = hold_outputs(path_a, data, threads=threads, desc=desc)  # A's session is gone on return
    sb = session(path_b, threads=threads)
    names_a = held.names
    names_b = [o.name for o in sb.get_outputs()]
    if names_a != names_b:
        raise ModelError(f"the models' outputs differ: {names_a} vs {names_b}")
    accs = {n: _Acc() for n in names_a}
    correct_a = correct_b = labelled = 0
    samples = 0
    for i, feed in enumerate(progress(data.feeds, desc=desc)):
        outs_a = held.take(i)
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
    del sb
    held.close()
    outputs = [accs[n].result(n) for n in names_a]
    acc_a = correct_a / labelled if labelled else None
    acc_b = correct_b / labelled if labelled else None
    return Comparison(outputs, samples, len(data), acc_a, acc_b, metric, tolerance)


def hold_outputs(path: str | os.PathLike[str], data: Dataset, *, threads: int | None = None,
                 desc: str = "validating") -> HeldOutputs:
    """Run the model at `path` on every feed of `data` and keep its outputs; its session is gone on return."""
    sess = session(path, threads=threads)
    held = HeldOutputs([o.name for o in sess.get_outputs()])
    for feed in progress(data.feeds, desc=f"{desc} (original)"):
        held.add(run(sess, feed))
    del sess
    return held


# Outputs of the first model kept in memory for the comparison, in bytes; the rest go to a temporary folder.
HELD_OUTPUT_BYTES = 256 * 1024 * 1024


class HeldOutputs:
    """The outputs (called `names`) of one model for a sequence of feeds, in memory up to `HELD_OUTPUT_BYTES`
    and in .npz files beyond; `take(i)` hands feed i's outputs back once (read back from disk when they were
    spilled). The files go with `close`, or with the object."""

    def __init__(self, names: list[str], limit: int | None = None) -> None:
        self.names = names
        self.limit = HELD_OUTPUT_BYTES if limit is None else limit
        self.in_memory = 0
        self.spilled = 0
        self._items: list[list[Any] | Path | None] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def add(self, outputs: list[Any]) -> None:
        nbytes = sum(o.nbytes for o in outputs if isinstance(o, np.ndarray))
        spillable = all(isinstance(o, np.ndarray) and o.dtype != object for o in outputs)
        if self.in_memory + nbytes <= self.limit or not spillable:
            self._items.append(list(outputs))
            self.in_memory += nbytes
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="onnxopt-outputs-")
        path = Path(self._dir.name) / f"{len(self._items)}.npz"
        np.savez(path, *outputs)
        self._items.append(path)
        self.spilled += nbytes

    def take(self, i: int) -> list[Any]:
        item = self._items[i]
        self._items[i] = None
        if isinstance(item, Path):
            with np.load(item) as npz:
                out = [npz[f"arr_{k}"] for k in range(len(npz.files))]
            item.unlink()
            return out
        if item is None:
            raise IndexError(f"outputs of feed {i} were already taken")
        return item

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> HeldOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
