"""Latency of an optimize run, pass by pass: is the optimized model slower, and which pass did it?

When the run times its result (the table's latency row) and speed passes run (a pass class with
``speed = True``: factorize, channels, quantize), `run_passes` keeps a copy of the model before the
first speed pass (when passes ran before it) and after every speed pass that is not the last step.
`measure` then times the original, those copies and the final model interleaved, in one
`onnxopt.bench.bench` call (the runs rotate over the models, so load from other processes hits all
alike), and `Verdict` says whether the final model is slower than the original by more than
`SLOWER_MARGIN` (confirmed in interleaved blocks, `onnxopt.timing.compare`, before it is said),
naming the speed pass that changed the model and whose step cost the most. Speed passes that ran but
changed nothing are not blamed (and raise no warning). Without speed passes only the original and the
final model are timed, as before, and the verdict has no per-pass rows.

The command line prints `Verdict.warning` as one ``onnxopt: WARNING:`` line and, under ``--require-faster``,
exits 1 when the verdict is slower (the table is printed and the file written first, as with
``--tolerance``). The JSON report carries ``latency.slower``, ``latency.suspect`` and ``latency.per_pass``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxopt import io, timing
from onnxopt.bench import BenchResult, bench
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.pipeline import PassRecord, Pipeline, Step
from onnxopt.registry import Pass

__all__ = ["SLOWER_MARGIN", "Snapshot", "PassLatency", "Verdict", "run_passes", "measure", "is_speed_pass"]

SLOWER_MARGIN = 0.02
"""A result counts as slower past this fraction over the original's median (the noise of a short run)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The model as it was after pass `after` (step `index` of the pipeline), saved at `path`."""

    after: str
    index: int
    speed: bool
    path: Path


@dataclasses.dataclass(frozen=True)
class PassLatency:
    """Latency after a pass: `ratio` to the original, `step` to the model timed just before it; `speed`: a
    speed pass that changed the model (the ones a slowdown is blamed on)."""

    after: str
    speed: bool
    ratio: float
    step: float

    def to_dict(self) -> dict[str, Any]:
        return {"after": self.after, "speed_change": self.speed, "ratio": round(self.ratio, 4),
                "step": round(self.step, 4)}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the optimized model is slower than the original in the run's own measurement."""

    ratio: float
    slower: bool
    speed_passes: tuple[str, ...]
    per_pass: tuple[PassLatency, ...]
    suspect: PassLatency | None
    threads: int | None
    check: timing.Measurement | None = None

    def warning(self) -> str | None:
        """The warning (one line) when speed passes changed the model and the result is slower, else None."""
        if not self.slower or not self.speed_passes:
            return None
        threads = f"{self.threads} threads" if self.threads else "ONNX Runtime's default threads"
        how = (f"median of {self.check.blocks} interleaved blocks" if self.check is not None
               else "median of interleaved runs")
        text = f"the optimized model is slower than the original: latency {self.ratio:.3f}x ({how}, {threads})"
        if self.suspect is not None:
            text += f"; most likely from pass '{self.suspect.after}' ({self.suspect.step:.3f}x the model before it)"
        return text + "; --require-faster makes this exit 1"

    def to_dict(self) -> dict[str, Any]:
        return {"slower": self.slower, "margin": SLOWER_MARGIN,
                "check": None if self.check is None else self.check.to_dict(),
                "suspect": None if self.suspect is None else self.suspect.after,
                "per_pass": [p.to_dict() for p in self.per_pass]}


def is_speed_pass(step: Step) -> bool:
    return isinstance(step, Pass) and bool(getattr(type(step), "speed", False))


def _step_label(step: Step) -> str:
    return (type(step).name if isinstance(step, Pass) else "") or type(step).__name__


def run_passes(pipeline: Pipeline, model: ir.Model, ctx: Context,
               workdir: Path | None) -> tuple[list[PassRecord], list[Snapshot]]:
    """Run `pipeline` on `model`; with a `workdir` and speed passes among the steps, save the snapshots
    that `measure` times (see the module doc). Without them this is ``pipeline.run(model, ctx)``."""
    steps = pipeline.passes
    marks = _snapshot_points(steps) if workdir is not None else []
    if not marks:
        return pipeline.run(model, ctx), []
    assert workdir is not None
    records: list[PassRecord] = []
    snapshots: list[Snapshot] = []
    start = 0
    for end in [*marks, len(steps) - 1]:
        records += Pipeline(steps[start:end + 1]).run(model, ctx)
        start = end + 1
        if end < len(steps) - 1:
            path = workdir / f"after-{end:02d}-{_step_label(steps[end])}.onnx"
            io.save(model, path)
            snapshots.append(Snapshot(_step_label(steps[end]), end, is_speed_pass(steps[end]), path))
    return records, snapshots


def _snapshot_points(steps: list[Step]) -> list[int]:
    """Step indices after which the model is saved: the step before the first speed pass, every speed
    pass; never the last step (the final model is timed anyway)."""
    speed = [i for i, step in enumerate(steps) if is_speed_pass(step)]
    if not speed:
        return []
    points = ([speed[0] - 1] if speed[0] > 0 else []) + speed
    return [i for i in points if i < len(steps) - 1]


def measure(original: Path, final: Path, snapshots: list[Snapshot], steps: list[Step], records: list[PassRecord],
            *, runs: int, threads: int | None, dims: dict[str, int], batch: int | None,
            data: Dataset | None, skip_above: int | None = None) -> tuple[BenchResult, Verdict | None]:
    """Time the original, the snapshots and the final model interleaved (`steps` and `records`: the
    pipeline's passes and what they did); the two-model result for the table (original, final) and the
    verdict. A final model that the interleaved runs find slower is timed again against the original in
    blocks (`onnxopt.timing.compare`, the median of block ratios) before it is called slower: single runs
    of a model on a shared machine are noisy, and a gate must not fail on noise. With `skip_above`, models
    bigger than that are not timed: the result says why and there is no verdict."""
    paths = [original, *(s.path for s in snapshots), final]
    result = bench(paths, runs=runs, threads=threads, dims=dims, batch=batch, data=data, memory=False,
                   budget_s=10.0, skip_above=skip_above)
    if result.skipped:
        return result, None
    ratios = result.ratios
    changed = [bool(r.stats.modified) for r in records] + [False] * (len(steps) - len(records))
    acting = [i for i, step in enumerate(steps) if is_speed_pass(step) and changed[i]]
    indices = [s.index for s in snapshots] + ([len(steps) - 1] if steps else [])
    per_pass = []
    previous = 1.0
    for i, ratio in zip(indices, ratios[1:]):
        per_pass.append(PassLatency(_step_label(steps[i]), i in acting, ratio,
                                    ratio / previous if previous > 0 else float("nan")))
        previous = ratio
    final_ratio, check = ratios[-1], None
    if final_ratio > 1.0 + SLOWER_MARGIN and data is not None and len(data):
        check = timing.compare(original, final, data.feeds[0], threads=threads, limit=1.0 + SLOWER_MARGIN,
                               block_ms=timing.MODEL_BLOCK_MS)
        final_ratio = check.ratio
    slower = final_ratio > 1.0 + SLOWER_MARGIN
    blamed = [p for p in per_pass if p.speed]
    suspect = max(blamed, key=lambda p: p.step) if slower and blamed else None
    two = BenchResult([result.latencies[0], result.latencies[-1]], result.provider, result.threads,
                      method=result.method)
    speed_names = tuple(_step_label(steps[i]) for i in acting)
    rows = tuple(per_pass) if any(is_speed_pass(step) for step in steps) else ()
    return two, Verdict(final_ratio, slower, speed_names, rows, suspect, threads, check)


def speed_gate(result: Any, require_faster: bool) -> int:
    """The command line's end of it: print the verdict's warning as one ``onnxopt: WARNING:`` line on stderr
    (as the drift warnings are) and return 1 when `require_faster` and the optimized model was slower."""
    import sys

    verdict: Verdict | None = result.speed
    if verdict is None:
        return 0
    line = verdict.warning()
    if line:
        print(f"onnxopt: WARNING: {line}", file=sys.stderr)
    if require_faster and verdict.slower:
        print(f"onnxopt: the optimized model is slower than the original (latency {verdict.ratio:.3f}x, more than "
              f"{SLOWER_MARGIN:.0%} over it): exit 1 for --require-faster", file=sys.stderr)
        return 1
    return 0
