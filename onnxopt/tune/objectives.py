"""What tune minimizes, always as a ratio to the original model (below 1 is better).

- ``latency``: ONNX Runtime on this machine with the run's threads, one feed of the evaluation data.
  The models are timed in *blocks* of repeated runs, each block long enough to mean something
  (``min_block_s``), the models interleaved block by block in one process with the order alternating,
  and the ratio taken per block: load from other processes then hits both sides of each ratio alike.
  The median of the block ratios is the figure; `careful_latency` repeats the whole measurement in
  rounds and reports the spread, for the few finalists a choice rests on.
- ``size``: bytes on disk (external data included).
- ``macs``: multiply-accumulates counted from the graph (`onnxopt.analysis.model_stats`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.analysis import model_stats
from onnxopt.io import file_size, load
from onnxopt.runtime import run, session

__all__ = ["OBJECTIVES", "LatencyRatio", "latency_ratios", "careful_latency", "size_ratio", "macs_ratio", "macs_of"]

OBJECTIVES = ("latency", "size", "macs")


@dataclasses.dataclass
class LatencyRatio:
    """Median ratio of block times (candidate over original) and the spread of the per-round medians."""

    ratio: float
    low: float
    high: float
    blocks: int
    runs_per_block: int
    reference_ms: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def latency_ratios(
    reference: str | os.PathLike[str],
    candidates: Sequence[str | os.PathLike[str]],
    feed: dict[str, np.ndarray],
    *,
    threads: int | None = None,
    blocks: int = 5,
    min_block_s: float = 0.05,
    rounds: int = 1,
) -> list[LatencyRatio]:
    """Each candidate's latency over the reference's, timed in interleaved blocks (see the module doc)."""
    paths = [Path(reference), *(Path(c) for c in candidates)]
    sessions = [session(p, threads=threads) for p in paths]
    for sess in sessions:
        for _ in range(2):
            run(sess, feed)
    reps = max(1, math.ceil(min_block_s / max(min(_one_run(sess, feed) for sess in sessions), 1e-6)))
    per_round: list[list[list[float]]] = []  # round -> candidate -> block ratios
    reference_times: list[float] = []
    for r in range(rounds):
        ratios: list[list[float]] = [[] for _ in candidates]
        for b in range(blocks):
            order = list(range(len(paths)))
            if (b + r) % 2:
                order.reverse()
            times = {i: _time_runs(sessions[i], feed, reps) for i in order}
            reference_times.append(times[0] / reps)
            for k in range(len(candidates)):
                ratios[k].append(times[k + 1] / times[0] if times[0] > 0 else float("nan"))
        per_round.append(ratios)
    out = []
    for k in range(len(candidates)):
        everything = [x for rnd in per_round for x in rnd[k]]
        medians = [float(np.median(rnd[k])) for rnd in per_round]
        out.append(LatencyRatio(float(np.median(everything)), min(medians), max(medians), len(everything), reps,
                                float(np.median(reference_times)) * 1000.0))
    return out


def careful_latency(reference: str | os.PathLike[str], candidates: Sequence[str | os.PathLike[str]],
                    feed: dict[str, np.ndarray], *, threads: int | None = None) -> list[LatencyRatio]:
    """`latency_ratios` for a choice: longer blocks, more of them, three rounds."""
    return latency_ratios(reference, candidates, feed, threads=threads, blocks=7, min_block_s=0.1, rounds=3)


def _one_run(sess: Any, feed: dict[str, np.ndarray], span_s: float = 0.02) -> float:
    """Seconds per run, from as many runs as fill `span_s` (one run alone is mostly scheduler noise)."""
    runs, t0 = 0, time.perf_counter()
    while True:
        run(sess, feed)
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= span_s:
            return elapsed / runs


def _time_runs(sess: Any, feed: dict[str, np.ndarray], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        run(sess, feed)
    return time.perf_counter() - t0


def size_ratio(reference: str | os.PathLike[str], candidate: str | os.PathLike[str]) -> float:
    return file_size(candidate) / max(file_size(reference), 1)


def macs_of(path: str | os.PathLike[str], dims: dict[str, int] | None = None) -> int:
    return model_stats(load(path, check=False), dims, count_nonzero=False).macs


def macs_ratio(reference_macs: int, candidate: str | os.PathLike[str], dims: dict[str, int] | None = None) -> float:
    return macs_of(candidate, dims) / max(reference_macs, 1)
