"""Latency on ONNX Runtime: warm-up, then timed runs; with several models the runs interleave
in one process, so the ratio between them is measured under the same conditions.

Interleaving holds every model's session at once. When the model files together exceed
`INTERLEAVE_LIMIT_BYTES`, each model is timed instead in its own child process, one after the
other, on the same feed (`BenchResult.method` says which): the parent holds no session, and the
machine holds one model at a time. Their ratio is then less reliable on a busy machine, since the
models do not share the same moments. Above `TABLE_LIMIT_BYTES` in one model, the latency row of
``onnxopt.optimize``'s table is skipped with the reason (`BenchResult.skipped`): loading such a model
twice more and running it a few times would cost more than the rest of the job and say little;
``onnxopt bench ORIGINAL OPTIMIZED`` times them on request.

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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.errors import ModelError
from onnxopt.io import file_size, load
from onnxopt.progress import progress
from onnxopt.report import human_bytes
from onnxopt.runtime import provider_name, run, session

__all__ = ["Latency", "BenchResult", "bench", "peak_memory_mb", "INTERLEAVE_LIMIT_BYTES", "TABLE_LIMIT_BYTES",
           "INTERLEAVED", "SEPARATE"]

# Models whose files (with external data) add up to more than this are timed in separate child processes.
INTERLEAVE_LIMIT_BYTES = 1 << 30
# `bench(..., skip_above=TABLE_LIMIT_BYTES)` (the optimize table) skips a model bigger than this.
TABLE_LIMIT_BYTES = 2 << 30
INTERLEAVED = "interleaved in one process"
SEPARATE = "one child process per model, one after the other"


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
    method: str = INTERLEAVED
    skipped: str | None = None  # why nothing was timed (then `latencies` is empty)

    @property
    def interleaved(self) -> bool:
        return self.method == INTERLEAVED

    @property
    def ratios(self) -> list[float]:
        """Median latency of each model over the first model's (below 1: faster)."""
        if not self.latencies:
            return []
        base = self.latencies[0].median_ms
        return [lat.median_ms / base if base > 0 else float("nan") for lat in self.latencies]

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "threads": self.threads,
            "method": self.method,
            "interleaved": self.interleaved,
            "skipped": self.skipped,
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
    separate: bool | None = None,
    skip_above: int | None = None,
) -> BenchResult:
    """Time each model `runs` times after `warmup`, interleaving the models run by run.

    With `budget_s`, timing stops early once that many seconds have gone (after 5 runs at least).
    `separate` times each model in its own child process instead (None: when the files add up to more
    than `INTERLEAVE_LIMIT_BYTES`). With `skip_above`, nothing is timed when a model file (with its
    external data) is bigger than that many bytes, and `BenchResult.skipped` says why.
    """
    provider_name(provider)
    if runs < 1:
        raise ValueError("runs must be at least 1")
    paths = [Path(p) for p in paths]
    sizes = [file_size(p) for p in paths]
    if skip_above is not None and max(sizes, default=0) > skip_above:
        reason = (f"not timed: a model file holds {human_bytes(max(sizes))}, above the {human_bytes(skip_above)} "
                  "timed here (onnxopt bench times them on request)")
        return BenchResult([], provider, threads, method="", skipped=reason)
    if separate is None:
        separate = len(paths) > 1 and sum(sizes) > INTERLEAVE_LIMIT_BYTES
    feeds = [_feed_for(p, dims or {}, batch, data) for p in paths]
    if separate:
        times = _times_in_children(paths, feeds, runs=runs, warmup=warmup, threads=threads, provider=provider,
                                   budget_s=budget_s)
    else:
        times = _times_interleaved(paths, feeds, runs=runs, warmup=warmup, threads=threads, provider=provider,
                                   budget_s=budget_s)
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
    return BenchResult(result, provider, threads, method=SEPARATE if separate else INTERLEAVED)


def _times_interleaved(paths: list[Path], feeds: list[dict[str, np.ndarray]], *, runs: int, warmup: int,
                       threads: int | None, provider: str, budget_s: float | None) -> list[list[float]]:
    """Milliseconds per run of each model, all sessions in this process, the models alternating run by run."""
    sessions = [session(p, threads=threads, provider=provider) for p in paths]
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
    return times


def _times_in_children(paths: list[Path], feeds: list[dict[str, np.ndarray]], *, runs: int, warmup: int,
                       threads: int | None, provider: str, budget_s: float | None) -> list[list[float]]:
    """Milliseconds per run of each model, each timed in a child process of its own, one after the other."""
    share = None if budget_s is None else budget_s / len(paths)
    times = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for i, (path, feed) in enumerate(progress(list(zip(paths, feeds)), desc="benchmarking")):
            feed_file = Path(tmp) / f"feed{i}.npz"
            np.savez(feed_file, *feed.values())
            spec = {"model": str(path), "feed": str(feed_file), "inputs": list(feed), "runs": runs,
                    "warmup": warmup, "threads": threads, "provider": provider, "budget_s": share}
            proc = subprocess.run([sys.executable, "-m", "onnxopt.bench", "--time", json.dumps(spec)],
                                  capture_output=True, text=True, check=False)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise ModelError(f"timing '{path.name}' in a child process failed: {detail}")
            times.append([float(t) for t in json.loads(lines[-1])["times_ms"]])
    return times


def _time_main(spec: dict[str, Any]) -> int:
    """Child side of `_times_in_children`: time one model on one feed, print the run times as JSON."""
    with np.load(spec["feed"]) as npz:
        feed = {name: npz[f"arr_{k}"] for k, name in enumerate(spec["inputs"])}
    times = _times_interleaved([Path(spec["model"])], [feed], runs=spec["runs"], warmup=spec["warmup"],
                               threads=spec["threads"], provider=spec["provider"], budget_s=spec["budget_s"])
    print(json.dumps({"times_ms": times[0]}))
    return 0


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
        if sys.argv[1:2] == ["--time"]:
            sys.exit(_time_main(json.loads(sys.argv[2])))
        sys.exit(_peak_main(sys.argv[1:]))
    except ModelError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)
