"""What tune minimizes, always as a ratio to the original model (below 1 is better).

- ``latency``: ONNX Runtime on this machine with the run's threads, one feed of the evaluation data.
  The models are timed in *blocks* of repeated runs, each block long enough to mean something
  (``min_block_s``), the models interleaved block by block in one process with the order alternating.
  In each round the figure is the ratio of each model's fastest block: other processes can only add
  time to a block (a busy machine takes the process off the CPU for longer than a block lasts), so the
  fastest block is the least disturbed one, where a median of per-block ratios can follow a run of
  disturbed blocks. The measurement is the median of the rounds' figures (a lucky or unlucky round
  cannot decide it), with their spread and the median block ratio beside it. `careful_latency` takes
  longer blocks, for the few finalists a choice rests on. With one ONNX Runtime thread (``--threads 1``)
  blocks are timed in CPU time of this process, which a loaded machine does not stretch; with more
  threads, in wall time.
- ``size``: bytes on disk (external data included).
- ``macs``: multiply-accumulates counted from the graph (`onnxopt.analysis.model_stats`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
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
    """A candidate's latency over the reference's: ``ratio`` is the median over rounds of the ratio of their
    fastest blocks in the round, ``low``/``high`` its spread over the rounds, ``median`` the median of all
    per-block ratios."""

    ratio: float
    median: float
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
    clock = _clock(threads)
    reps = max(1, math.ceil(min_block_s / max(min(_one_run(sess, feed, clock) for sess in sessions), 1e-6)))
    times = np.zeros((rounds, blocks, len(paths)))  # seconds per block
    for r in range(rounds):
        for b in range(blocks):
            order = list(range(len(paths)))
            if (b + r) % 2:
                order.reverse()
            for i in order:
                times[r, b, i] = _time_runs(sessions[i], feed, reps, clock)
    out = []
    best = times.min(axis=1)  # round -> model: the fastest block
    for k in range(1, len(paths)):
        per_round = best[:, k] / best[:, 0]
        out.append(LatencyRatio(float(np.median(per_round)), float(np.median(times[:, :, k] / times[:, :, 0])),
                                float(per_round.min()), float(per_round.max()), rounds * blocks, reps,
                                float(times[:, :, 0].min() / reps * 1000.0)))
    return out


def careful_latency(reference: str | os.PathLike[str], candidates: Sequence[str | os.PathLike[str]],
                    feed: dict[str, np.ndarray], *, threads: int | None = None) -> list[LatencyRatio]:
    """`latency_ratios` for a choice: longer blocks, more of them, three rounds."""
    return latency_ratios(reference, candidates, feed, threads=threads, blocks=7, min_block_s=0.1, rounds=3)


def _clock(threads: int | None) -> Callable[[], float]:
    """The clock blocks are timed with: with one ONNX Runtime thread, the CPU time of this process, which
    other processes cannot stretch (the run computes in this thread and waits for nothing); otherwise the
    wall clock, since several threads' CPU times add up (and spinning threads burn CPU while they wait)."""
    return time.process_time if threads == 1 else time.perf_counter


def _one_run(sess: Any, feed: dict[str, np.ndarray], clock: Callable[[], float], span_s: float = 0.02) -> float:
    """Seconds per run, from as many runs as fill `span_s` (one run alone is mostly scheduler noise)."""
    runs, t0 = 0, clock()
    while True:
        run(sess, feed)
        runs += 1
        elapsed = clock() - t0
        if elapsed >= span_s:
            return elapsed / runs


def _time_runs(sess: Any, feed: dict[str, np.ndarray], reps: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(reps):
        run(sess, feed)
    return clock() - t0


def size_ratio(reference: str | os.PathLike[str], candidate: str | os.PathLike[str]) -> float:
    return file_size(candidate) / max(file_size(reference), 1)


def macs_of(path: str | os.PathLike[str], dims: dict[str, int] | None = None) -> int:
    return model_stats(load(path, check=False), dims, count_nonzero=False).macs


def macs_ratio(reference_macs: int, candidate: str | os.PathLike[str], dims: dict[str, int] | None = None) -> float:
    return macs_of(candidate, dims) / max(reference_macs, 1)
