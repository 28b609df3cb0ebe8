"""Latency on ONNX Runtime: warm-up, then timed runs; with several models the runs interleave
in one process, so the ratio between them is measured under the same conditions.

Peak memory is measured honestly in a child process that only loads the model and runs it
once (its maximum resident set size), since one process cannot split its peak between models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.errors import ModelError
from onnxopt.io import load
from onnxopt.progress import progress
from onnxopt.runtime import provider_name, run, session

__all__ = ["Latency", "BenchResult", "bench", "peak_memory_mb"]


@dataclasses.dataclass
class Latency:
    model: str
    runs: int
    batch: int
    min_ms: float
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float
    peak_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchResult:
    latencies: list[Latency]
    provider: str
    threads: int | None

    @property
    def ratios(self) -> list[float]:
        """Median latency of each model over the first model's (below 1: faster)."""
        base = self.latencies[0].median_ms
        return [lat.median_ms / base if base > 0 else float("nan") for lat in self.latencies]

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "threads": self.threads,
            "models": [lat.to_dict() for lat in self.latencies],
            "ratios": self.ratios,
        }


def _feed_for(path: Path, dims: dict[str, int], batch: int | None, data: Dataset | None) -> dict[str, np.ndarray]:
    if data is not None:
        return data.feeds[0]
    model = load(path, check=False)
    return load_data("random:1", input_specs(model), dims=dims, batch=batch).feeds[0]


def bench(
    paths: Sequence[str | os.PathLike[str]],
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    provider: str = "cpu",
    dims: dict[str, int] | None = None,
    batch: int | None = None,
    data: Dataset | None = None,
    memory: bool = True,
    budget_s: float | None = None,
) -> BenchResult:
    """Time each model `runs` times after `warmup`, interleaving the models run by run.

    With `budget_s`, timing stops early once that many seconds have gone (after 5 runs at least).
    """
    provider_name(provider)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    paths = [Path(p) for p in paths]
    sessions = [session(p, threads=threads, provider=provider) for p in paths]
    feeds = [_feed_for(p, dims or {}, batch, data) for p in paths]
    for _ in range(warmup):
        for sess, feed in zip(sessions, feeds):
            run(sess, feed)
    times: list[list[float]] = [[] for _ in paths]
    order = list(range(len(paths)))
    start = time.perf_counter()
    for r in progress(range(runs), desc="benchmarking"):
        if budget_s is not None and r >= 5 and time.perf_counter() - start > budget_s:
            break
        rotated = order[r % len(order) :] + order[: r % len(order)]
        for i in rotated:
            t0 = time.perf_counter()
            run(sessions[i], feeds[i])
            times[i].append((time.perf_counter() - t0) * 1000.0)
    result = []
    for p, feed, ts in zip(paths, feeds, times):
        arr = np.asarray(ts)
        first = next(iter(feed.values()))
        nb = int(first.shape[0]) if first.ndim else 1
        med = float(np.median(arr))
        peak = peak_memory_mb(p, provider) if memory else None
        result.append(
            Latency(
                model=str(p),
                runs=len(ts),
                batch=nb,
                min_ms=float(arr.min()),
                median_ms=med,
                p90_ms=float(np.percentile(arr, 90)),
                mean_ms=float(arr.mean()),
                throughput=nb / (med / 1000.0) if med > 0 else float("inf"),
                peak_mb=peak,
            )
        )
    return BenchResult(result, provider, threads)


def peak_memory_mb(path: str | os.PathLike[str], provider: str = "cpu") -> float | None:
    """Peak RSS (MB) of a fresh process that loads `path` in ORT and runs it once."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "onnxopt.bench", str(path), provider],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def _peak_main(argv: Sequence[str]) -> int:
    path, provider = argv[0], argv[1]
    feed = _feed_for(Path(path), {}, None, None)
    sess = session(path, provider=provider)
    run(sess, feed)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": peak_kb / 1024.0}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_peak_main(sys.argv[1:]))
    except ModelError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
