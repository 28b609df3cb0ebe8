"""Where a model's time goes, from ONNX Runtime's own profiler (`SessionOptions.enable_profiling`).

ONNX Runtime writes a Chrome-trace JSON file with one event per kernel call (``cat == "Node"``,
name ``<node>_kernel_time``, ``args.op_name``, ``dur`` in microseconds) and one per run
(``cat == "Session"``, name ``model_run``). `profile_model` runs a model a few times on one feed
with profiling on, drops the warm-up runs, and reports per node the median over runs of its kernel
time, per op type the sum of those medians, and the median run. Node names are those of the graph
ONNX Runtime executes, after its own optimizations (a fused QDQ group runs as one ``QLinearConv`` node, for example).

Times on a busy machine are noise in absolute terms; what a profile shows well is the share of
each op type and which nodes dominate, and that is what the report draws.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxopt.errors import ModelError, first_line
from onnxopt.runtime import provider_name, run

__all__ = ["NodeTime", "Profile", "profile_model", "summarize_trace"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeTime:
    name: str
    op: str
    ms: float


@dataclasses.dataclass
class Profile:
    """Milliseconds per run (medians over runs): whole runs, per op type (largest first), the slowest nodes."""

    label: str
    runs: int
    run_ms: float
    by_op: dict[str, float]
    nodes: list[NodeTime]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize_trace(events: list[dict[str, Any]], *, warmup: int, label: str, top: int = 10) -> Profile:
    """A `Profile` of the runs after the first `warmup` in an ONNX Runtime trace: per node the median
    over runs of its kernel time in a run (a run the machine interrupted does not drag it), per op
    type the sum of its nodes' medians, and the median run."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    timed = runs[warmup:]
    if not timed:
        raise ValueError("the trace holds no run after the warm-up")
    starts = [e["ts"] for e in timed]
    per_node: dict[str, np.ndarray] = {}
    op_of: dict[str, str] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        k = bisect.bisect_right(starts, e.get("ts", -1)) - 1
        if k < 0 or e["ts"] > timed[k]["ts"] + timed[k]["dur"]:
            continue
        node = name[: -len("_kernel_time")]
        per_node.setdefault(node, np.zeros(len(timed)))[k] += float(e.get("dur", 0))
        op_of[node] = e.get("args", {}).get("op_name", "?")
    median = {node: float(np.median(us)) for node, us in per_node.items()}
    by_op: dict[str, float] = defaultdict(float)
    for node, us in median.items():
        by_op[op_of[node]] += us
    slowest = sorted(median.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return Profile(
        label=label,
        runs=len(timed),
        run_ms=_ms(float(np.median([e["dur"] for e in timed]))),
        by_op={op: _ms(us) for op, us in sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0]))},
        nodes=[NodeTime(name, op_of[name], _ms(us)) for name, us in slowest],
    )


def _ms(us: float) -> float:
    """Microseconds as milliseconds, to 4 significant digits (a profile is not more precise)."""
    return float(f"{us / 1000.0:.4g}")


def profile_model(
    path: str | os.PathLike[str],
    feed: dict[str, np.ndarray],
    *,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    provider: str = "cpu",
    budget_s: float = 5.0,
    label: str | None = None,
    top: int = 10,
) -> Profile:
    """Profile `runs` runs of the model file at `path` on `feed` (fewer once `budget_s` has gone, 3 at least)."""
    if runs < 1:
        raise ValueError("runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="onnxopt-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "trace")
        if threads:
            opts.intra_op_num_threads = threads
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider_name(provider)])
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load '{Path(path).name}': {first_line(exc)}") from None
        for _ in range(warmup):
            run(sess, feed)
        start = time.perf_counter()
        for r in range(runs):
            if r >= 3 and time.perf_counter() - start > budget_s:
                break
            run(sess, feed)
        trace = Path(sess.end_profiling())
        if not trace.is_absolute():
            trace = Path(tmp) / trace.name
        events = json.loads(trace.read_text())
    return summarize_trace(events, warmup=warmup, label=label or Path(path).name, top=top)
