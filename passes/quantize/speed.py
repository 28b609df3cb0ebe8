"""Is one model faster than another in ONNX Runtime? Interleaved timing that holds up on a busy machine.

Both sessions run the same feed with the same threads. Each is repeated in *blocks* of enough runs
to last at least ``block_s`` (a 1 ms model timed once is scheduler noise); the blocks alternate, the
model that goes first changes every round, and each round gives one ratio ``t_b / t_a``. The answer
is the median of those ratios with its quartiles, so a burst of load from another process moves a
round or two, not the answer. `decide` repeats the measurement while the median falls near the margin or
the quartiles straddle it, and only calls ``b`` faster when the pooled median is below ``1 - margin``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.io import temp_model_file
from onnxopt.runtime import run, session

__all__ = ["SpeedComparison", "interleave", "compare_sessions", "compare_files", "decide", "measure", "MARGIN",
           "MAX_RUN_S"]

logger = logging.getLogger(__name__)

BLOCK_S = 0.05
ROUNDS = 7
WARMUP = 2
MARGIN = 0.05
"""int8 counts as faster only when its median ratio is below ``1 - MARGIN``."""
REPEATS = 2
"""How many more measurements an undecided answer gets (see `decide`)."""
CLEAR_ROUNDS = 4
"""`decide` stops after this many rounds (each order twice) when every round's ratio lies at least two margins
on the same side of the line: the quartile test of the full measurement could not answer otherwise."""
MAX_RUN_S = 5.0
"""A model whose one float run takes longer is not timed (the check would cost minutes)."""


@dataclasses.dataclass
class SpeedComparison:
    """Latency of ``b`` over ``a``: the median round ratio (below 1: ``b`` is faster) and its quartiles."""

    ratio: float
    low: float
    high: float
    rounds: int
    ms_a: float
    ms_b: float
    seconds: float

    def faster(self, margin: float) -> bool:
        return self.ratio <= 1.0 - margin

    def undecided(self, margin: float) -> bool:
        """The median lies within 2 margins of ``1 - margin``, or the quartiles lie on both sides of it; a lower
        quartile above the line is an answer (not faster), however near the median is: a model that int8 leaves
        at 1.0x would otherwise be timed three times over with every thread count, for the same answer."""
        line = 1.0 - margin
        if self.low > line:
            return False
        return abs(self.ratio - line) < 2 * margin or self.low <= line <= self.high

    def describe(self) -> str:
        return f"{self.ratio:.2f}x (quartiles {self.low:.2f}-{self.high:.2f}, {self.rounds} rounds)"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _block(sess: Any, feed: dict[str, np.ndarray], reps: int) -> float:
    """Seconds per run over `reps` runs."""
    t0 = time.perf_counter()
    for _ in range(reps):
        run(sess, feed)
    return (time.perf_counter() - t0) / reps


def _reps(sess: Any, feed: dict[str, np.ndarray], block_s: float) -> int:
    for _ in range(WARMUP):
        run(sess, feed)
    one = _block(sess, feed, 2)
    return max(1, int(np.ceil(block_s / max(one, 1e-6))))


def interleave(sessions: Sequence[Any], feed: dict[str, np.ndarray], *, block_s: float = BLOCK_S,
               rounds: int = ROUNDS, budget_s: float | None = None,
               settled: Callable[[list[list[float]]], bool] | None = None) -> list[list[float]]:
    """Seconds per run of each session in each round (rounds rotate which session goes first).

    Stops early, after at least three rounds, once `budget_s` is spent, or once `settled` (given the times so
    far) says the answer is known.
    """
    reps = [_reps(s, feed, block_s) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    n = len(sessions)
    for r in range(rounds):
        for k in [(r + i) % n for i in range(n)]:
            times[k].append(_block(sessions[k], feed, reps[k]))
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
        if settled is not None and settled(times):
            break
    return times


def _summary(a: list[float], b: list[float], seconds: float) -> SpeedComparison:
    ratios = np.asarray(b) / np.asarray(a)
    return SpeedComparison(float(np.median(ratios)), float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75)),
                           len(ratios), float(np.median(a)) * 1e3, float(np.median(b)) * 1e3, seconds)


def compare_sessions(sess_a: Any, sess_b: Any, feed: dict[str, np.ndarray], *, block_s: float = BLOCK_S,
                     rounds: int = ROUNDS, budget_s: float | None = None) -> SpeedComparison:
    """Latency of session `sess_b` over `sess_a` on `feed`, interleaved."""
    t0 = time.perf_counter()
    a, b = interleave([sess_a, sess_b], feed, block_s=block_s, rounds=rounds, budget_s=budget_s)
    return _summary(a, b, time.perf_counter() - t0)


def compare_files(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str], feed: dict[str, np.ndarray], *,
                  threads: int | None = None, block_s: float = BLOCK_S, rounds: int = ROUNDS,
                  budget_s: float | None = None) -> SpeedComparison:
    """`compare_sessions` on two model files (sessions built with `threads` intra-op threads)."""
    return compare_sessions(session(path_a, threads=threads), session(path_b, threads=threads), feed,
                            block_s=block_s, rounds=rounds, budget_s=budget_s)


def decide(sess_a: Any, sess_b: Any, feed: dict[str, np.ndarray], *, margin: float = 0.05,
           budget_s: float | None = None, block_s: float = BLOCK_S) -> SpeedComparison:
    """`compare_sessions`, measured again (and pooled, at most `REPEATS` times) while the answer is undecided:
    the median lies within 2 margins of ``1 - margin``, or the quartiles of the round ratios lie on both
    sides of it (a 0.2 ms model timed with two threads on two cores gave a median of 1.25 with quartiles
    0.77-1.49, and 0.82 in the next run, on a quiet machine). An answer clear from the first `CLEAR_ROUNDS`
    rounds ends the measurement there."""
    t0 = time.perf_counter()
    line = 1.0 - margin

    def clear(times: list[list[float]]) -> bool:  # every round far on one side of the line
        ratios = np.asarray(times[1]) / np.asarray(times[0])
        return len(ratios) >= CLEAR_ROUNDS and (ratios.max() <= line - 2 * margin or ratios.min() >= line + 2 * margin)

    a, b = interleave([sess_a, sess_b], feed, block_s=block_s, rounds=ROUNDS, budget_s=budget_s, settled=clear)
    for _ in range(REPEATS):
        if not _summary(a, b, 0.0).undecided(margin):
            break
        a2, b2 = interleave([sess_a, sess_b], feed, block_s=block_s, rounds=ROUNDS + 2, budget_s=budget_s)
        a, b = a + a2, b + b2
    result = _summary(a, b, time.perf_counter() - t0)
    logger.debug("speed: %s", result.describe())
    return result


# ------------------------------------------------------------------------------ the pass's check
class _FloatSide:
    """The float model's file and session, kept for the next check of the same model with the same threads
    (``tune`` quantizes one model many times with different settings)."""

    def __init__(self, key: tuple[Any, ...], model: ir.Model, threads: int | None) -> None:
        self.key = key
        self._stack = contextlib.ExitStack()
        path = self._stack.enter_context(temp_model_file(model))
        self.session = session(path, threads=threads)

    def close(self) -> None:
        self.session = None
        self._stack.close()


_cache: list[_FloatSide] = []


def _fingerprint(model: ir.Model, threads: int | None) -> tuple[Any, ...]:
    """What identifies a float model for the cache: its nodes and wiring, and its weight tensors by identity."""
    nodes = tuple((n.op_type, n.name, tuple(v.name if v is not None else "" for v in n.inputs)) for n in model.graph)
    weights = tuple((name, id(v.const_value)) for name, v in model.graph.initializers.items())
    return threads, nodes, weights


def _float_side(model: ir.Model, threads: int | None, cache: bool) -> _FloatSide:
    key = _fingerprint(model, threads)
    if _cache and _cache[0].key == key:
        return _cache[0]
    while _cache:
        _cache.pop().close()
    side = _FloatSide(key, model, threads)
    if cache:
        _cache.append(side)
    return side


def measure(float_model: ir.Model, quantized: ir.Model, feed: dict[str, np.ndarray], *,
            threads: int | None, cache: bool = True) -> SpeedComparison | None:
    """Latency of `quantized` over `float_model` on `feed` (`decide`), or None when one float run takes longer
    than `MAX_RUN_S`. With `cache`, the float session is kept for the next call on the same model."""
    side = _float_side(float_model, threads, cache)
    try:
        return _measure(side.session, quantized, feed, threads)
    finally:
        if not cache:
            side.close()


def _measure(float_sess: Any, quantized: ir.Model, feed: dict[str, np.ndarray],
             threads: int | None) -> SpeedComparison | None:
    t0 = time.perf_counter()
    run(float_sess, feed)
    one = time.perf_counter() - t0
    if one > MAX_RUN_S:
        return None
    with temp_model_file(quantized) as path:
        q_sess = session(path, threads=threads)
        return decide(float_sess, q_sess, feed, margin=MARGIN, budget_s=max(2.0, 40 * one))
