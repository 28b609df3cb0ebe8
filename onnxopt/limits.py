"""Bounds on the numbers a user gives, in one place, checked the same way by every verb and the API.

This module imports nothing heavy (the command line checks its arguments before onnx or ONNX Runtime
load). Each ``check_*`` returns the value or raises `UsageError` with one line naming the option.

==================  =====================================================================================
number              allowed
==================  =====================================================================================
``--threads``       1 .. `max_threads()` = max(256, 4 x CPU count): ONNX Runtime crashes (segfault) when
                    asked for ~100,000 threads, and more threads than that never help
``--batch``         1 .. `MAX_DIM`
``--dims NAME=N``   N a whole number 1 .. `MAX_DIM` (1,000,000); ``1e3`` is read as 1000
``random:N``        N in 1 .. `MAX_RANDOM_FEEDS` (10,000); the feeds drawn at once at most
                    `MAX_RANDOM_BYTES` (256 MiB)
``--tolerance``     finite, >= 0; at most 1 for the metrics that are a loss in 0..1 (cosine, top1, accuracy)
``--bench-runs``    0 .. 1,000,000 (0 skips timing)
``--drift-*``       0 .. 1 (0 turns the warning off)
recipe values       finite numbers, nested at most `MAX_RECIPE_DEPTH` (16) levels
==================  =====================================================================================
"""

from __future__ import annotations

import math
import os

from onnxopt.errors import UsageError

__all__ = [
    "MAX_DIM",
    "MAX_RANDOM_FEEDS",
    "MAX_RANDOM_BYTES",
    "MAX_RUNS",
    "MAX_RECIPE_DEPTH",
    "UNIT_METRICS",
    "DRIFT_COSINE",
    "DRIFT_TOP1",
    "DRIFT_ATOL",
    "max_threads",
    "check_threads",
    "check_batch",
    "check_dim",
    "check_tolerance",
    "check_runs",
    "check_fraction",
]

MAX_DIM = 1_000_000
MAX_RANDOM_FEEDS = 10_000
MAX_RANDOM_BYTES = 256 << 20
MAX_RUNS = 1_000_000
MAX_RECIPE_DEPTH = 16
UNIT_METRICS = ("cosine", "top1", "accuracy")
"""Metrics whose tolerance is a loss between 0 and 1 (1 - cosine, 1 - agreement, accuracy drop)."""
DRIFT_COSINE = 0.99
"""Default: an output whose cosine similarity to the original falls below this is severe drift."""
DRIFT_TOP1 = 0.99
"""Default: an output whose argmax (or, for a non-float output, element) agreement falls below this."""
DRIFT_ATOL = 1e-6
"""A float output whose largest absolute difference is at most this never drifts: that is float32 rounding
(on outputs that are all near zero, such as a detector's probabilities on random noise, cosine and argmax
of rounding noise mean nothing)."""


def max_threads() -> int:
    """The most intra-op threads a session may be asked for: max(256, 4 x CPU count)."""
    return max(256, 4 * (os.cpu_count() or 1))


def check_threads(threads: int | None, option: str = "--threads") -> int | None:
    if threads is None:
        return None
    cap = max_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cap:
        raise UsageError(f"{option} {threads}: give a whole number of threads from 1 to {cap}")
    return threads


def check_batch(batch: int | None, option: str = "--batch") -> int | None:
    if batch is None:
        return None
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_DIM:
        raise UsageError(f"{option} {batch}: give a whole number of samples from 1 to {MAX_DIM}")
    return batch


def check_dim(name: str, value: object, option: str = "--dims") -> int:
    """A symbolic dimension's size: a whole number 1..MAX_DIM (a float that is whole, like 1e3, is accepted)."""
    number = value
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if not isinstance(number, int) or isinstance(number, bool):
        raise UsageError(f"{option} '{name}={value}': write it as NAME=N with N a positive whole number")
    if not 1 <= number <= MAX_DIM:
        raise UsageError(f"{option} '{name}={value}': N must be between 1 and {MAX_DIM:,}")
    return number


def check_tolerance(tolerance: float | None, metric: str) -> float | None:
    if tolerance is None:
        return None
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance):
        raise UsageError(f"--tolerance {tolerance}: give a finite number")
    if tolerance < 0:
        raise UsageError(f"--tolerance {tolerance}: give a number >= 0 (the largest {metric} allowed)")
    if metric in UNIT_METRICS and tolerance > 1:
        raise UsageError(f"--tolerance {tolerance}: metric {metric} is a loss between 0 and 1; give at most 1")
    return float(tolerance)


def check_runs(runs: int, option: str = "--bench-runs") -> int:
    if not isinstance(runs, int) or isinstance(runs, bool) or not 0 <= runs <= MAX_RUNS:
        raise UsageError(f"{option} {runs}: give a whole number from 0 to {MAX_RUNS:,}")
    return runs


def check_fraction(value: float, option: str) -> float:
    """A threshold between 0 and 1 (0 turns its check off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UsageError(f"{option} {value}: give a number from 0 to 1 (0 turns the warning off)")
    return float(value)
