"""Checks of an optimized model: the ONNX checker, strict shape inference, an ONNX Runtime
session, and numeric agreement with the original on the same feeds.

A `Comparison` is truthy unless it fails its tolerance. Without a tolerance its verdict is
``not gated`` (never "pass"): the numbers are reported, nothing was held to a bar.

Metrics per floating-point output: max abs error, relative L2 error ``‖a−b‖/‖a‖``, cosine
similarity, and top-1 (argmax) agreement on class scores ([N, C] floats, C > 1, that the original's
graph says carry class scores: `onnxopt.analysis.outputs.class_outputs`; a pooled embedding of that
shape is not one), all over the positions where both outputs are finite. Non-finite values (NaN, ±Inf) are
counted per output and model; a position where the optimized output is non-finite and the original
is not (or where they differ in any non-finite way) fails the comparison under any tolerance and is
severe drift without one. Outputs that are not floating point (integers, booleans, strings) are
compared for exact equality: they report how many elements differ, and that fraction stands for
every metric (so ``--tolerance 0`` fails on any change). With labels, accuracy of both models.

Severe drift, reported whatever the tolerance (a WARNING line and ``drift`` in the JSON report): an
output whose cosine similarity is below `drift_cosine` (default 0.99), whose top-1 agreement (or,
not floating point, element agreement) is below `drift_top1` (default 0.99), or that turns finite
values non-finite. A threshold of 0 turns that check off. Differences of at most 1e-6 (`DRIFT_ATOL`)
are float rounding and never drift.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import sparse
from onnxopt.data import Dataset
from onnxopt.errors import ModelError, UsageError, first_line, safe_name
from onnxopt.limits import DRIFT_ATOL, DRIFT_COSINE, DRIFT_TOP1
from onnxopt.metrics import METRICS
from onnxopt.progress import progress
from onnxopt.runtime import run, session
from onnxopt.tensors import iter_proto_graphs

__all__ = ["OutputDiff", "OutputAccumulator", "Comparison",
           "compare_models", "check_model_file", "METRICS", "HeldOutputs",
           "HELD_OUTPUT_BYTES", "hold_outputs"]


@dataclasses.dataclass
class OutputDiff:
    name: str
    max_abs: float
    rel_l2: float
    cosine: float
    top1: float | None
    exact: bool = False
    """A non-floating-point output compared for equality: the metrics above are its mismatch fraction
    (cosine: 1 - fraction)."""
    elements: int = 0
    mismatches: int = 0
    """Elements that differ (exact outputs), or positions whose non-finite values differ (float outputs)."""
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    new_nonfinite: int = 0
    """Positions non-finite in the optimized output where the original is finite."""

    @property
    def nonfinite_broken(self) -> bool:
        """True when the outputs differ in their non-finite values (a failure under any tolerance)."""
        return not self.exact and self.mismatches > 0

    def drift_reasons(self, cosine_min: float, top1_min: float) -> list[str]:
        """Why this output drifted severely (empty when it did not)."""
        reasons = []
        if self.exact:
            agree = 1.0 - (self.mismatches / self.elements if self.elements else 0.0)
            if top1_min > 0 and agree < top1_min:
                reasons.append(f"{self.mismatches} of {self.elements} elements differ "
                               f"(agreement {agree * 100:.2f}% < {top1_min * 100:g}%)")
            return reasons
        if self.nonfinite_broken:
            reasons.append(f"non-finite values: original {self.nonfinite_a}, optimized {self.nonfinite_b} "
                           f"({self.new_nonfinite} where the original is finite)")
        if self.max_abs <= DRIFT_ATOL:  # float rounding, whatever cosine and argmax of it say
            return reasons
        if cosine_min > 0 and self.cosine < cosine_min:
            reasons.append(f"cosine {self.cosine:.4f} < {cosine_min:g}")
        if top1_min > 0 and self.top1 is not None and self.top1 < top1_min:
            reasons.append(f"top-1 agreement {self.top1 * 100:.2f}% < {top1_min * 100:g}%")
        return reasons

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
    drift_cosine: float = DRIFT_COSINE
    drift_top1: float = DRIFT_TOP1

    @property
    def gated(self) -> bool:
        """True when a tolerance was given: only then is there a pass or a FAIL."""
        return self.tolerance is not None

    @property
    def worst(self) -> float:
        """The chosen metric's worst value over outputs (for cosine/top1/accuracy: the loss, 0..1)."""
        exact = [o.rel_l2 for o in self.outputs if o.exact]
        floats = [o for o in self.outputs if not o.exact]
        if self.metric == "max_abs":
            return max([o.max_abs for o in floats] + exact, default=0.0)
        if self.metric == "cosine":
            return max([1.0 - o.cosine for o in floats] + exact, default=0.0)
        if self.metric == "top1":
            vals = [o.top1 for o in floats if o.top1 is not None]
            if not vals:
                raise UsageError("metric top1 needs an output that carries class scores ([N, C] floats from a "
                                 "Softmax or a Gemm/MatMul)")
            return 1.0 - min(vals)
        if self.metric == "accuracy":
            if self.accuracy_a is None or self.accuracy_b is None:
                raise UsageError("metric accuracy needs data with labels (an array 'labels' in --data)")
            return max(0.0, self.accuracy_a - self.accuracy_b)
        return max([o.rel_l2 for o in floats] + exact, default=0.0)

    @property
    def broken_outputs(self) -> list[OutputDiff]:
        """Outputs whose non-finite values differ from the original's: a FAIL under any tolerance."""
        return [o for o in self.outputs if o.nonfinite_broken]

    @property
    def passed(self) -> bool:
        """False only when a tolerance was given and the optimized model does not meet it."""
        if not self.gated:
            return True
        return not self.broken_outputs and self.worst <= self.tolerance

    @property
    def verdict(self) -> str:
        if not self.gated:
            return "not gated"
        return "pass" if self.passed else "FAIL"

    def __bool__(self) -> bool:
        return self.passed

    @property
    def drift(self) -> list[dict[str, Any]]:
        """Outputs that drifted severely (see the module doc), with their figures."""
        found = []
        for o in self.outputs:
            reasons = o.drift_reasons(self.drift_cosine, self.drift_top1)
            if reasons:
                found.append({"output": o.name, "cosine": o.cosine, "top1": o.top1, "mismatches": o.mismatches,
                              "new_nonfinite": o.new_nonfinite, "reasons": reasons})
        return found

    def warnings(self) -> list[str]:
        """One line per output that drifted severely."""
        return [f"output '{safe_name(d['output'])}' drifted: {'; '.join(d['reasons'])}" for d in self.drift]

    def describe(self) -> str:
        worst = f"worst {self.metric} {self.worst:.3g}"
        if not self.gated:
            return f"not gated: {worst} (no --tolerance, {self.samples} samples)"
        broken = self.broken_outputs
        if broken:
            names = ", ".join(f"'{safe_name(o.name)}'" for o in broken)
            return (f"FAIL: non-finite values differ from the original's in output {names}; "
                    f"{worst} (tolerance {self.tolerance:g}, {self.samples} samples)")
        sign = "<=" if self.passed else ">"
        return f"{self.verdict}: {worst} {sign} {self.tolerance:g} ({self.samples} samples)"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gated"] = self.gated
        d["verdict"] = self.verdict
        d["passed"] = self.passed if self.gated else None
        d["worst"] = self.worst
        d["drift"] = self.drift
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
                str(path), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True, data_prop=False
            )  # no data propagation: on a hostile model it materializes e.g. Range(0, 2**40) as a list of dims
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
        sparse.densify(proto, path.parent)
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


def _is_float(arr: np.ndarray) -> bool:
    return bool(np.issubdtype(arr.dtype, np.floating))


class OutputAccumulator:
    """Streaming sums for one output's metrics."""

    def __init__(self, name: str, *, scores: bool = True) -> None:
        self.name = name
        self.max_abs = 0.0
        self.err2 = 0.0
        self.ref2 = 0.0
        self.dot = 0.0
        self.b2 = 0.0
        self.agree = 0
        self.rows = 0
        self.scores = scores
        self.exact: bool | None = None
        self.elements = 0
        self.mismatches = 0
        self.nonfinite_a = 0
        self.nonfinite_b = 0
        self.new_nonfinite = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise ModelError(f"output '{safe_name(self.name)}' shapes differ: {list(a.shape)} vs {list(b.shape)}")
        exact = not (_is_float(a) and _is_float(b))
        self.exact = exact if self.exact is None else self.exact or exact
        self.elements += int(a.size)
        if self.exact:
            self.mismatches += int(np.count_nonzero(np.asarray(a != b)))
            self.scores = False
            return
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        fa, fb = np.isfinite(a64), np.isfinite(b64)
        if not (fa.all() and fb.all()):
            # Count non-finite values, never let them reach a max or a sum: compare the rest.
            self.nonfinite_a += int(np.count_nonzero(~fa))
            self.nonfinite_b += int(np.count_nonzero(~fb))
            self.new_nonfinite += int(np.count_nonzero(fa & ~fb))
            same = ~fa & ~fb & ((a64 == b64) | (np.isnan(a64) & np.isnan(b64)))
            self.mismatches += int(np.count_nonzero((~fa | ~fb) & ~same))
            both = fa & fb
            a64, b64 = np.where(both, a64, 0.0), np.where(both, b64, 0.0)
        diff = a64 - b64
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.err2 += float(np.sum(diff * diff))
        self.ref2 += float(np.sum(a64 * a64))
        self.dot += float(np.sum(a64 * b64))
        self.b2 += float(np.sum(b64 * b64))
        if looks_like_scores(a) and self.scores:
            self.agree += int(np.sum(np.argmax(a64, axis=1) == np.argmax(b64, axis=1)))
            self.rows += a.shape[0]
        else:
            self.scores = False

    def result(self) -> OutputDiff:
        counts = {"elements": self.elements, "mismatches": self.mismatches, "nonfinite_a": self.nonfinite_a,
                  "nonfinite_b": self.nonfinite_b, "new_nonfinite": self.new_nonfinite}
        if self.exact:
            frac = self.mismatches / self.elements if self.elements else 0.0
            return OutputDiff(self.name, frac, frac, 1.0 - frac, None, exact=True, **counts)
        rel = float(np.sqrt(self.err2 / self.ref2)) if self.ref2 > 0 else float(np.sqrt(self.err2))
        denom = np.sqrt(self.ref2 * self.b2)
        cos = float(self.dot / denom) if denom > 0 else (1.0 if self.err2 == 0 else 0.0)
        top1 = self.agree / self.rows if self.scores and self.rows else None
        return OutputDiff(self.name, self.max_abs, rel, cos, top1, **counts)


def compare_models(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    data: Dataset,
    *,
    metric: str = "rel_l2",
    tolerance: float | None = None,
    threads: int | None = None,
    desc: str = "validating",
    drift_cosine: float = DRIFT_COSINE,
    drift_top1: float = DRIFT_TOP1,
    classes: Collection[str] | None = None,
) -> Comparison:
    """Run both models on every feed of `data` and compare outputs by name.

    `classes` names the outputs that carry class scores (``class_outputs`` of model A's graph): top-1
    agreement is counted on those only. None counts it on every [N, C] float output.

    The models run one after the other, never both loaded at once: model A runs on every feed and its
    session is released, keeping only its outputs (`hold_outputs`: in memory up to `HELD_OUTPUT_BYTES`,
    on disk beyond), then model B runs and is compared feed by feed.

    Raises UsageError for nothing to compare on (no samples) and for a metric the data or outputs
    cannot give (accuracy without labels, top1 without class scores), so a caller learns it before
    it writes anything.
    """
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}' (choose {', '.join(METRICS)})")
    if data.num_samples == 0:
        raise UsageError(f"no samples to validate on: data '{data.source}' holds none")
    held = hold_outputs(path_a, data, threads=threads, desc=desc)  # A's session is gone on return
    sb = session(path_b, threads=threads)
    names_a = held.names
    names_b = [o.name for o in sb.get_outputs()]
    if names_a != names_b:
        shown_a, shown_b = ([safe_name(n) for n in names] for names in (names_a, names_b))
        raise ModelError(f"the models' outputs differ: {shown_a} vs {shown_b}")
    accs = {n: OutputAccumulator(n, scores=classes is None or n in classes) for n in names_a}
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
            score_out = _labelled_output(names_a, outs_a, classes)
            if score_out is not None:
                lbl = np.asarray(labels).reshape(-1)
                rows = np.asarray(outs_a[score_out]).shape[0]
                if lbl.shape[0] != rows:
                    raise UsageError(f"labels of feed {i} hold {lbl.shape[0]} entries for {rows} rows of output "
                                     f"'{safe_name(names_a[score_out])}'")
                correct_a += int(np.sum(np.argmax(outs_a[score_out], axis=1) == lbl))
                correct_b += int(np.sum(np.argmax(outs_b[score_out], axis=1) == lbl))
                labelled += lbl.shape[0]
    del sb
    held.close()
    outputs = [accs[n].result() for n in names_a]
    acc_a = correct_a / labelled if labelled else None
    acc_b = correct_b / labelled if labelled else None
    comparison = Comparison(outputs, samples, len(data), acc_a, acc_b, metric, tolerance, drift_cosine, drift_top1)
    _ = comparison.worst  # a metric the outputs or data cannot give fails here, before anything is written
    return comparison


def _labelled_output(names: list[str], outs: list[Any], classes: Collection[str] | None) -> int | None:
    """The output that labels are checked against: the first class-score output, else (labels say the model
    classifies) the first [N, C] float output."""
    shaped = [k for k, o in enumerate(outs) if looks_like_scores(np.asarray(o))]
    return next((k for k in shaped if classes is None or names[k] in classes), shaped[0] if shaped else None)


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
