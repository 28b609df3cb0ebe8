"""The choice: the best trials measured again on held-out data, and the best of those built for good."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from onnxopt import io
from onnxopt.api import Result, optimize
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import ModelError
from onnxopt.pipeline import Pipeline
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.objectives import careful_latency, macs_of, macs_ratio, size_ratio
from onnxopt.tune.result import Finalist
from onnxopt.tune.study import TrialRecord
from onnxopt.tune.workers import Job

__all__ = ["FINALISTS", "finalist_ceiling", "finalists", "choose"]

FINALISTS = 6
"""Trials measured again on held-out data."""
_LATENCY_MARGIN = 0.02  # a latency ratio must be below 1 - margin to count as beating the original


def finalist_ceiling(objective: str) -> float:
    """Trials above this objective ratio cannot be finalists (a search latency is short, taken beside work)."""
    return 1.2 if objective == "latency" else 1.0


def finalists(trials: Sequence[TrialRecord], model_path: Path, job: Job, held: Dataset, constraint: Constraint,
               objective: str, workspace: Path) -> list[Finalist]:
    """The best feasible trials, rebuilt and measured on the held-out data (latency: careful, all together)."""
    ceiling = finalist_ceiling(objective)
    pool = sorted((t for t in trials if t.feasible and t.objective is not None and t.objective < ceiling),
                  key=lambda t: (t.objective, t.error, t.number))
    picked, seen = [], set()
    for t in pool:
        text = json.dumps(t.recipe, sort_keys=True)
        if text not in seen:
            seen.add(text)
            picked.append(t)
        if len(picked) == FINALISTS:
            break
    if not picked:
        return []
    reference = Reference(model_path, held, constraint, threads=job.threads)
    paths, measured = [], []
    for t in picked:
        path = Path(job.keep_dir or workspace) / f"trial{t.number}.onnx"
        if not path.is_file():  # built by another machine, or in an earlier run of the study
            model = io.load(model_path)
            ctx = Context(original_path=model_path, calib=job.calib, dims=dict(job.dims), threads=job.threads)
            Pipeline([tuple(step) for step in t.recipe]).run(model, ctx)
            io.save(model, path)
        paths.append(path)
        measured.append(reference.measure(path, threads=job.threads))
    spreads: list[tuple[float, float] | None] = [None] * len(paths)
    if objective == "latency":
        lats = careful_latency(model_path, paths, held.feeds[0], threads=job.threads)
        ratios = [lat.ratio for lat in lats]
        spreads = [(lat.low, lat.high) for lat in lats]
    elif objective == "size":
        ratios = [size_ratio(model_path, p) for p in paths]
    else:
        base = macs_of(model_path, job.dims)
        ratios = [macs_ratio(base, p, job.dims) for p in paths]
    limit = 1.0 - (_LATENCY_MARGIN if objective == "latency" else 0.0)
    return [Finalist(t.number, t.recipe, float(t.objective), float(t.error), r, s, m.error, m.rel_l2,
                     constraint.holds(m.error), r < limit)
            for t, m, r, s in zip(picked, measured, ratios, spreads)]


def choose(finalists: Sequence[Finalist], model_path: Path, calib: Dataset, held: Dataset, constraint: Constraint,
            objective: str, threads: int | None, dims: dict[str, int], batch: int | None,
            output: str | os.PathLike[str] | None, bench_runs: int, notes: list[str], *,
            details: bool = False) -> tuple[Finalist | None, Result | None]:
    """The best finalist that holds on held-out data and beats the original, built through `optimize`
    (with `details`, gathering what a drawn report needs)."""
    for f in sorted((f for f in finalists if f.holds and f.beats), key=lambda f: (f.objective, f.error)):
        try:
            result = optimize(str(model_path), [tuple(step) for step in f.recipe], calib=calib, data=held,
                              tolerance=constraint.validate_tolerance, metric=constraint.validate_metric,
                              dims=dims, batch=batch, latency_runs=bench_runs, threads=threads, output=output,
                              details=details)
        except ModelError as exc:
            notes.append(f"trial {f.number} left out: {exc}")
            continue
        if not result.passed:
            notes.append(f"trial {f.number} left out: its validation failed ({result.validation.describe()})")
            continue
        return f, result
    return None, None
