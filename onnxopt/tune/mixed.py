"""The quantize pass's own mixed-precision search, aimed at the constraint and run once before the trials.

The sensitivity table measures each layer's int8 error alone, and the allotment adds those errors up. On a
network whose quantization error is spread over many layers (a CTC text recognizer: no layer alone is worth
more than a few points) the errors of a set are not the sum of its members', and the allotment does not
find the few layers that, kept float together, bring the outputs back. ``quantize fallback=auto`` measures
whole sets (groups, then a bisection of what it chose); run here once with the constraint as its target, it
gives one float set and the range method it chose, which the space offers as ``quantize.float_set =
searched``; on a transformer it also says whether some MatMuls read a GELU output (the space then offers
``quantize.gelu_matmuls``) and which dynamic variant the pass picked (a starting point; untimed here, the
pass picks the smallest variant that meets the targets). The recipe of a
searched trial lists the set as ``float_nodes`` with ``fallback=none``, so it builds the same model whatever
the machine's speed (the pass's search stops at a time budget). The result is kept in the study: a resumed
run reads it back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError, first_line
from onnxopt.registry import run_pass
from onnxopt.tune.constraint import Constraint

__all__ = ["STUDY_KEY", "pass_targets", "searched_float_set"]

logger = logging.getLogger(__name__)

STUDY_KEY = "quantize_search"


def pass_targets(constraint: Constraint) -> tuple[dict[str, float], float | None]:
    """The quantize pass's targets for `constraint` (its options, and the rel L2 bound it reads from the run's
    tolerance): cosine and rel L2 as given, agreement as the argmax agreement of class outputs."""
    options = {"target_cosine": 0.0, "target_argmax": 0.0}
    tolerance = None
    if constraint.metric == "cosine":
        options["target_cosine"] = max(0.0, 1.0 - constraint.limit)
    elif constraint.metric == "top1":
        options["target_argmax"] = max(0.0, 1.0 - constraint.limit)
    elif constraint.metric == "accuracy":  # top-1 agreement with the original bounds the drop in accuracy
        options["target_argmax"] = max(0.0, 1.0 - constraint.limit / 100.0)
    else:
        tolerance = constraint.limit
    return options, tolerance


def searched_float_set(the_study: Any, base: Any, calib: Dataset, constraint: Constraint, dims: dict[str, int],
                       threads: int | None) -> dict[str, Any] | None:
    """The study's result when it has one, else the pass run now on a copy of `base` (folded) and kept in the
    study: ``{"float_nodes", "calibrate", "scores", "targets_met", "seconds", "gelu_fed", "dynamic_pick"}``,
    or None when static quantization does not apply (nothing quantized, or the pass refused the model)."""
    stored = the_study.user_attrs.get(STUDY_KEY)
    if stored is not None:
        return stored or None
    options, tolerance = pass_targets(constraint)
    ctx = Context(calib=calib, dims=dict(dims), threads=threads, tolerance=tolerance)
    t0 = time.perf_counter()
    try:
        stats = run_pass("quantize", base.clone(), ctx, mode="static", fallback="auto", require_speedup=False,
                         require_targets=False, check_fusion=False, **options)
    except OnnxoptError as exc:
        logger.info("quantize's own search did not run: %s", first_line(exc))
        stats = None
    summary = stats.summary if stats is not None else {}
    found: dict[str, Any] = {}
    if summary.get("quantized_nodes") or "fallback_float_nodes" in summary or "scores_all_quantized" in summary:
        scores = summary.get("fallback_scores") or summary.get("scores_all_quantized") or {}
        found = {"float_nodes": list(summary.get("fallback_float_nodes", [])),
                 "calibrate": summary.get("calibrate_chosen") or summary.get("calibrate") or "minmax",
                 "scores": scores, "targets_met": summary.get("targets_met", True),
                 "seconds": round(time.perf_counter() - t0, 2),
                 # a transformer: whether some MatMuls read a GELU output, and the dynamic variant the pass chose
                 "gelu_fed": bool(summary.get("gelu_fed_matmuls")),
                 "dynamic_pick": summary.get("gelu_matmuls") if summary.get("mode") == "dynamic" else None}
    the_study.set_user_attr(STUDY_KEY, found)
    return found or None
