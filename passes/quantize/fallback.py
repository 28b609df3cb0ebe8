"""Sensitivity-driven mixed precision for the quantize pass (``fallback=auto``).

Given a builder that quantizes a copy of the float model with some compute nodes left in float, and
a tolerance on the relative L2 error ``‖y_float − y_q‖ / ‖y_float‖`` (worst output, over held feeds):

1. Quantize everything. Within tolerance: done.
2. Sensitivity of each compute node: the error of a model where *only* that node (with the Q/DQ
   of its inputs and output) is quantized.
3. Keep the ``k`` most sensitive nodes in float, ``k = 1, 2, 4, ...`` until the error is within
   tolerance, then bisect between ``k/2`` and ``k`` for the smallest such ``k``.
4. Sensitivities measured alone do not add up, so each kept node is tried quantized again (least
   sensitive first) and stays quantized when the tolerance still holds.

Costs ``N + O(log N) + k`` quantize-and-run rounds for ``N`` compute nodes; calibration runs once (the
ranges of the float model do not depend on which nodes are quantized).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.io import temp_model_file
from onnxopt.progress import progress
from onnxopt.runtime import run, session

__all__ = ["FallbackResult", "OutputError", "auto_fallback"]

logger = logging.getLogger(__name__)

Builder = Callable[[set[str]], ir.Model]


class OutputError:
    """Worst relative L2 error of a model's outputs against the float model's, on fixed feeds."""

    def __init__(self, reference: ir.Model, feeds: Sequence[dict[str, np.ndarray]], threads: int | None) -> None:
        self.feeds = list(feeds)
        self.threads = threads
        self.reference = self._outputs(reference)

    def _outputs(self, model: ir.Model) -> list[list[np.ndarray]]:
        with temp_model_file(model) as path:
            sess = session(path, threads=self.threads)
            return [run(sess, feed) for feed in self.feeds]

    def __call__(self, model: ir.Model) -> float:
        got = self._outputs(model)
        worst = 0.0
        for k in range(len(self.reference[0])):
            ref = np.concatenate([np.ravel(r[k]).astype(np.float64) for r in self.reference])
            out = np.concatenate([np.ravel(g[k]).astype(np.float64) for g in got])
            denom = float(np.linalg.norm(ref))
            err = float(np.linalg.norm(ref - out)) / denom if denom > 0 else float(np.linalg.norm(out))
            worst = max(worst, err)
        return worst


@dataclasses.dataclass
class FallbackResult:
    model: ir.Model
    float_nodes: list[str]
    error: float
    error_all_quantized: float
    sensitivity: dict[str, float]
    reached: bool


def auto_fallback(build: Builder, units: Sequence[str], error: OutputError, tolerance: float) -> FallbackResult:
    """Keep the fewest, most sensitive `units` in float so that `error` is within `tolerance`."""
    full = build(set())
    err_full = error(full)
    if err_full <= tolerance or not units:
        return FallbackResult(full, [], err_full, err_full, {}, err_full <= tolerance)
    everything = set(units)
    sensitivity = {}
    for unit in progress(list(units), desc="layer sensitivity"):
        sensitivity[unit] = error(build(everything - {unit}))
    order = sorted(units, key=lambda u: -sensitivity[u])
    tried: dict[int, tuple[ir.Model, float]] = {}

    def attempt(k: int) -> float:
        if k not in tried:
            model = build(set(order[:k]))
            tried[k] = (model, error(model))
            logger.debug("fallback k=%d error=%.4g", k, tried[k][1])
        return tried[k][1]

    k = 1
    while k < len(order) and attempt(k) > tolerance:
        k *= 2
    k = min(k, len(order))
    if attempt(k) > tolerance:
        best = min(tried, key=lambda n: tried[n][1])
        model, err = tried[best]
        return FallbackResult(model, order[:best], err, err_full, sensitivity, False)
    lo, hi = k // 2 + 1, k  # attempt(k // 2) failed (or k == 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if attempt(mid) <= tolerance:
            hi = mid
        else:
            lo = mid + 1
    model, err = tried[hi]
    kept = order[:hi]
    # 4. the greedy order is only a guess: try to quantize again each kept node, least sensitive first
    for unit in progress(sorted(kept, key=lambda u: sensitivity[u]), desc="fallback refinement"):
        trial = [u for u in kept if u != unit]
        candidate = build(set(trial))
        e = error(candidate)
        if e <= tolerance:
            kept, model, err = trial, candidate, e
    return FallbackResult(model, kept, err, err_full, sensitivity, True)
