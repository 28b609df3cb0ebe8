"""The constraint a tuned model must hold, and its error against the original's outputs kept in memory.

A constraint is a metric and a limit. ``accuracy``: the drop in accuracy, in points (``--max-drop``,
needs labels); ``rel_l2``, ``cosine`` and ``top1``: the worst output's relative L2 error, ``1 - cosine``
and ``1 - top-1 agreement`` (``--tolerance X --metric M``), the numbers `onnxopt.validate.Comparison`
reports, so the figure the search steers by is the one the final validation prints.

`Reference` runs the original model once on fixed feeds and keeps its outputs; the error of any other
model with the same outputs (a whole candidate, or the part of one downstream of a change, fed with
the original's tensors) then costs one run of that model. Besides the constraint's own figure it
reports the relative L2 error, which stays continuous where accuracy on a few samples moves in steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from onnxopt.data import Dataset
from onnxopt.errors import UsageError
from onnxopt.runtime import run, session
from onnxopt.validate import Comparison, OutputDiff, looks_like_scores

__all__ = ["CONSTRAINT_METRICS", "Constraint", "Measured", "Reference"]

CONSTRAINT_METRICS = ("rel_l2", "cosine", "top1")
"""Metrics of ``--tolerance`` in tune (``accuracy`` comes from ``--max-drop``)."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """``error <= limit``; for ``accuracy`` the error is the drop in points, else `Comparison.worst`."""

    metric: str
    limit: float

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", *CONSTRAINT_METRICS):
            choices = ", ".join(("accuracy", *CONSTRAINT_METRICS))
            raise UsageError(f"unknown constraint metric '{self.metric}' (choose {choices})")
        if not (math.isfinite(self.limit) and self.limit >= 0):
            raise UsageError(f"the constraint's limit must be a number >= 0, got {self.limit}")

    @classmethod
    def from_options(cls, max_drop: float | None, tolerance: float | None, metric: str | None) -> Constraint:
        """The constraint of ``--max-drop PTS`` or ``--tolerance X --metric M``."""
        if (max_drop is None) == (tolerance is None):
            raise UsageError("give the constraint as --max-drop PTS (needs labels) or --tolerance X --metric M")
        if max_drop is not None:
            if metric not in (None, "accuracy"):
                raise UsageError("--max-drop bounds the accuracy drop; --metric goes with --tolerance")
            return cls("accuracy", float(max_drop))
        return cls(metric or "rel_l2", float(tolerance))  # type: ignore[arg-type]

    def holds(self, error: float | None) -> bool:
        return error is not None and math.isfinite(error) and error <= self.limit + 1e-12

    @property
    def validate_metric(self) -> str:
        """The metric `onnxopt.optimize` validates with."""
        return self.metric

    @property
    def validate_tolerance(self) -> float:
        """The tolerance `onnxopt.optimize` validates with (accuracy as a fraction, not points)."""
        return self.limit / 100.0 if self.metric == "accuracy" else self.limit

    def error_of(self, cmp: Comparison) -> float:
        """The constraint's error in a comparison of the original (a) with a candidate (b)."""
        if self.metric == "accuracy":
            if cmp.accuracy_a is None or cmp.accuracy_b is None:
                raise UsageError("--max-drop needs evaluation data with labels and a class-score output")
            return (cmp.accuracy_a - cmp.accuracy_b) * 100.0
        return dataclasses.replace(cmp, metric=self.metric).worst

    def describe(self) -> str:
        if self.metric == "accuracy":
            return f"accuracy drop <= {self.limit:g} pt"
        if self.metric == "cosine":
            return f"output cosine >= {1 - self.limit:g}"
        if self.metric == "top1":
            return f"top-1 agreement >= {(1 - self.limit) * 100:g}%"
        return f"output rel L2 <= {self.limit:g}"

    def unit(self) -> str:
        return {"accuracy": "pt", "cosine": "1-cos", "top1": "1-top1"}.get(self.metric, "rel L2")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit, "unit": self.unit(), "text": self.describe()}


@dataclasses.dataclass
class Measured:
    """A candidate against the reference: the constraint's error, the relative L2 error, the comparison."""

    error: float
    rel_l2: float
    comparison: Comparison

    def to_dict(self) -> dict[str, Any]:
        cmp = self.comparison
        return {"error": self.error, "rel_l2": self.rel_l2, "samples": cmp.samples,
                "accuracy_original": cmp.accuracy_a, "accuracy": cmp.accuracy_b,
                "outputs": [o.to_dict() for o in cmp.outputs]}


class Reference:
    """The original model's outputs on `data`, computed once; `measure` compares another model with them."""

    def __init__(self, path: str | os.PathLike[str], data: Dataset, constraint: Constraint, *,
                 threads: int | None = None) -> None:
        self.data = data
        self.constraint = constraint
        sess = session(path, threads=threads)
        self.names = [o.name for o in sess.get_outputs()]
        self.outputs = [run(sess, feed) for feed in data.feeds]
        if constraint.metric == "accuracy" and not self._labelled():
            raise UsageError("--max-drop needs evaluation data with labels (an array 'labels') and a model with a "
                             "class-score output [N, C]")

    def _labelled(self) -> bool:
        return self.data.has_labels and any(looks_like_scores(np.asarray(o)) for o in self.outputs[0])

    def measure(self, path: str | os.PathLike[str], *, feeds: Iterable[dict[str, np.ndarray]] | None = None,
                first: int | None = None, threads: int | None = None) -> Measured:
        """The error of the model at `path` on the reference feeds (the first `first` of them), or on `feeds`
        given in their place (inner tensors of the original that stand for its inputs, same order)."""
        count = len(self.outputs) if first is None else max(1, min(first, len(self.outputs)))
        sess = session(path, threads=threads)
        names = [o.name for o in sess.get_outputs()]
        if sorted(names) != sorted(self.names):
            raise UsageError(f"the candidate's outputs {names} differ from the original's {self.names}")
        inputs = feeds if feeds is not None else self.data.feeds
        got = []
        for feed, _ in zip(inputs, range(count)):
            by_name = dict(zip(names, run(sess, feed)))
            got.append([by_name[n] for n in self.names])
        return self.compare(got)

    def compare(self, got: Sequence[Sequence[np.ndarray]]) -> Measured:
        """`Measured` for candidate outputs `got` (per feed, in the reference's output order)."""
        ref = self.outputs[:len(got)]
        diffs = [_output_diff(name, [r[k] for r in ref], [g[k] for g in got]) for k, name in enumerate(self.names)]
        samples = sum(_batch(feed) for feed in self.data.feeds[:len(got)])
        acc_a, acc_b = self._accuracies(ref, got)
        cmp = Comparison(diffs, samples, len(got), acc_a, acc_b, metric="rel_l2")
        return Measured(self.constraint.error_of(cmp), cmp.worst, cmp)

    def _accuracies(self, ref: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]]
                    ) -> tuple[float | None, float | None]:
        labels = self.data.labels[:len(got)]
        if not labels or any(lbl is None for lbl in labels):
            return None, None
        k = next((i for i, o in enumerate(ref[0]) if looks_like_scores(np.asarray(o))), None)
        if k is None:
            return None, None
        truth = np.concatenate([np.asarray(lbl).reshape(-1) for lbl in labels])
        a = np.concatenate([np.argmax(r[k], axis=1) for r in ref])
        b = np.concatenate([np.argmax(g[k], axis=1) for g in got])
        return float(np.mean(a == truth)), float(np.mean(b == truth))


def _batch(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim else 1


def _output_diff(name: str, ref: list[np.ndarray], got: list[np.ndarray]) -> OutputDiff:
    """Max abs, relative L2, cosine and top-1 agreement of one output over all feeds, as validation defines them."""
    a = np.concatenate([np.ravel(x) for x in ref]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in got]).astype(np.float64)
    if a.shape != b.shape:
        raise UsageError(f"output '{name}' has {b.size} values, the original's {a.size}")
    diff = a - b
    err, norm_a, norm_b = float(np.linalg.norm(diff)), float(np.linalg.norm(a)), float(np.linalg.norm(b))
    rel = err / norm_a if norm_a > 0 else err
    cos = float(np.dot(a, b)) / (norm_a * norm_b) if norm_a * norm_b > 0 else (1.0 if err == 0 else 0.0)
    top1 = None
    if all(looks_like_scores(np.asarray(x)) for x in ref):
        agree = sum(int(np.sum(np.argmax(x, 1) == np.argmax(y, 1))) for x, y in zip(ref, got))
        top1 = agree / sum(x.shape[0] for x in ref)
    return OutputDiff(name, float(np.max(np.abs(diff))) if diff.size else 0.0, rel, cos, top1)
