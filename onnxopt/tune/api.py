"""`tune`: accuracy-aware search over whole recipes.

Flow: load the model and data -> split the evaluation data into a search part and a held-out part
-> open (or resume) the Optuna study -> the sensitivity table (measured, or read back from the
study) -> the search space -> trials on the executor until the budget is spent -> the finalists
(feasible on the search data and better than the original there) rebuilt and measured again on the
held-out data, latency timed carefully -> the best that holds the constraint on held-out data and
beats the original, built through `onnxopt.optimize` (validated on the held-out data and timed like
any optimize run) -> `TuneResult`. When no finalist qualifies, `TuneResult.chosen` is None and
nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt import io
from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.registry import run_pass
from onnxopt.runtime import run, session
from onnxopt.tune.choose import choose, finalists
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.mixed import searched_float_set
from onnxopt.tune.objectives import OBJECTIVES
from onnxopt.tune.result import TuneResult
from onnxopt.tune.search import Kept, counted_trials, run_trials
from onnxopt.tune.sensitivity import SensitivityTable, measure_sensitivity, plan_actions, why_no_layers
from onnxopt.tune.space import PASSES_FOR, SEARCH_PASSES, SearchSpace
from onnxopt.tune.study import MEMORY, open_study, pareto_front, record_trials
from onnxopt.tune.workers import Job

__all__ = ["tune", "TuneResult", "DEFAULT_TRIALS"]

logger = logging.getLogger(__name__)

DEFAULT_TRIALS = 40
_SENSITIVITY_SHARE = 0.4  # of --budget-minutes, at most, for the sensitivity table
_SENSITIVITY_RUN_S = 0.5  # sensitivity feeds: as many as the original runs in this long (2..8)


# ------------------------------------------------------------------------------------ tune
def tune(
    model: Any,
    *,
    calib: Any,
    data: Any = None,
    max_drop: float | None = None,
    tolerance: float | None = None,
    metric: str | None = None,
    objective: str = "latency",
    budget_trials: int | None = None,
    budget_minutes: float | None = None,
    workers: int = 1,
    storage: str | None = None,
    study: str | None = None,
    ray: str | None = None,
    sampler: str = "tpe",
    seed: int | None = 0,
    holdout: float = 0.5,
    passes: Sequence[str] | None = None,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    batch: int | None = None,
    output: str | os.PathLike[str] | None = None,
    bench_runs: int = 50,
    max_layers: int = 48,
    details: bool = False,
) -> TuneResult:
    """Search for the recipe that minimizes `objective` under the constraint (see the module doc).

    The constraint is ``max_drop`` (accuracy points, labels needed) or ``tolerance`` with ``metric``
    (``rel_l2``, ``cosine``: 1-cosine, ``top1``: 1-agreement). `data` is split into a search part and a
    held-out part (the last `holdout` share of its feeds); without it the calibration data is split
    that way and the passes calibrate on its first part. `storage` is an SQLAlchemy URL (default:
    ``sqlite:///OUTPUT.tune.db`` with `output`, else in memory); a study of the same name in it is
    resumed. Trials run in `workers` processes, or as Ray tasks on the cluster `ray` (``local`` for
    one started here). With `output`, the chosen model is staged beside it (`TuneResult.save`). With
    `details`, the chosen model's run also gathers what a drawn report needs (per-layer errors, output
    distributions, profiles: `optimize(details=True)`).
    """
    t0 = time.perf_counter()
    constraint = Constraint.from_options(max_drop, tolerance, metric)
    _check_arguments(objective, budget_trials, budget_minutes, workers, holdout, passes, bench_runs)
    chosen_passes = [p for p in (passes or SEARCH_PASSES) if p in PASSES_FOR[objective]]
    if budget_trials is None and budget_minutes is None:
        budget_trials = DEFAULT_TRIALS
    deadline = t0 + budget_minutes * 60.0 if budget_minutes is not None else None
    with tempfile.TemporaryDirectory(prefix="onnxopt-tune-") as tmp:
        workspace = Path(tmp)
        model_path = _model_file(model, workspace)
        original = io.load(model_path)
        inputs = input_specs(original)
        dims = dict(dims or {})
        calib_ds = load_data(calib, inputs, dims=dims, batch=batch)
        calib_part: Dataset | None = None
        if data is not None:
            search, held = _split(load_data(data, inputs, dims=dims, batch=batch), holdout, "--data")
        else:
            calib_ds, held = _split(calib_ds, holdout, "--calib (no --data given)")
            search = calib_part = calib_ds
        data_info = {"calib_feeds": len(calib_ds), "calib_samples": calib_ds.num_samples,
                     "search_feeds": len(search), "search_samples": search.num_samples,
                     "held_out_feeds": len(held), "held_out_samples": held.num_samples,
                     "held_out_from": "--data" if data is not None else "--calib"}
        key = _study_key(model_path, calib_ds, search, constraint, objective, chosen_passes, threads, max_layers)
        name = study or f"{Path(str(model_path)).stem}-{key[:12]}"
        url = storage or (f"sqlite:///{Path(str(output)).with_suffix('').as_posix()}.tune.db"
                          if output is not None else MEMORY)
        the_study = open_study(url, name, sampler=sampler, seed=seed)
        base = io.load(model_path)
        run_pass("fold", base)
        table = _sensitivity(the_study, base, workspace, search, calib_ds, constraint, chosen_passes, dims, threads,
                             max_layers, budget_minutes)
        notes = list(table.notes)
        searched = None
        if "quantize" in chosen_passes and "quantize" in PASSES_FOR[objective] and any(
                r.pass_name == "quantize" for r in table.rows):
            searched = searched_float_set(the_study, base, calib_ds, constraint, dims, threads)
            notes += [_searched_note(searched)] if searched is not None else []
        space = SearchSpace(table, constraint, objective, chosen_passes, matmul_weights=_has_matmul_weights(base),
                            wide_channels=_has_wide_convs(base), searched=searched)
        kept = workspace / "trials"
        kept.mkdir()
        job = Job(str(model_path), calib_ds, search, constraint, objective, threads, dims, key=key,
                  keep_dir=str(kept))
        finished_before = counted_trials(the_study)
        ran = 0
        if space.empty():
            notes.append(why_no_layers(base) if table.layers_total == 0 else
                         "no action saves anything on this objective within the constraint: nothing to search")
        else:
            if not the_study.trials:
                for point in space.starting_points():
                    the_study.enqueue_trial(point, skip_if_exists=True)
            ran, stopped = run_trials(the_study, space, job, constraint, workers, ray, budget_trials,
                                      finished_before, deadline, Kept(kept, objective))
            notes += [stopped] if stopped else []
        trials = record_trials(the_study, constraint.limit)
        measured = finalists(trials, model_path, job, held, constraint, objective, workspace)
        chosen, result = choose(measured, model_path, calib_ds, held, constraint, objective, threads, dims, batch,
                                 output, bench_runs, notes, details=details)
        counts = {s: sum(1 for t in trials if t.state == s) for s in ("complete", "pruned", "fail", "running")}
        study_info = {"name": name, "storage": _shown_url(url), "sampler": sampler, "seed": seed,
                      "trials_total": len(trials), "trials_this_run": ran, "trials_before": finished_before,
                      **{f"trials_{k}": v for k, v in counts.items()}, "workers": workers, "ray": ray,
                      "budget_trials": budget_trials, "budget_minutes": budget_minutes}
        return TuneResult(str(model if isinstance(model, (str, os.PathLike)) else "<in-memory model>"), constraint,
                          objective, threads, table, space.to_dict(), trials, pareto_front(trials), measured, chosen,
                          result, study_info, data_info, time.perf_counter() - t0, notes, calib_part)


def _searched_note(searched: dict[str, Any]) -> str:
    scores = searched.get("scores") or {}
    said = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if isinstance(v, (int, float)))
    return (f"quantize's own search for the constraint ({searched.get('seconds', 0):.0f} s): "
            f"{len(searched['float_nodes'])} nodes float, calibrate={searched['calibrate']}"
            f"{' (targets not met on the calibration feeds)' if not searched.get('targets_met', True) else ''}"
            f"{f'; {said} on the calibration feeds' if said else ''}; offered as quantize.float_set=searched")


def _check_arguments(objective: str, budget_trials: int | None, budget_minutes: float | None, workers: int,
                     holdout: float, passes: Sequence[str] | None, bench_runs: int) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective '{objective}' (choose {', '.join(OBJECTIVES)})")
    if budget_trials is not None and budget_trials < 1:
        raise UsageError("--budget-trials must be at least 1")
    if budget_minutes is not None and not budget_minutes > 0:
        raise UsageError("--budget-minutes must be a positive number")
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if not 0.0 < holdout < 1.0:
        raise UsageError(f"--holdout {holdout}: the held-out share must lie strictly between 0 and 1")
    if bench_runs < 0:
        raise UsageError("--bench-runs must be 0 or more")
    for name in passes or ():
        if name not in SEARCH_PASSES:
            raise UsageError(f"--passes: tune searches over {', '.join(SEARCH_PASSES)}, not '{name}'")


def _model_file(model: Any, workspace: Path) -> Path:
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        io.load(path)  # a clear error for a missing or broken file
        return path
    path = workspace / "original.onnx"
    io.save(io.to_ir(model), path)
    return path


def _split(data: Dataset, holdout: float, where: str) -> tuple[Dataset, Dataset]:
    """The search part (first feeds) and the held-out part (the last `holdout` share, at least one feed)."""
    if len(data) < 2:
        raise UsageError(f"{where} holds {len(data)} feed: tune needs at least 2 to keep a held-out part "
                         "(give more samples, or a smaller --batch)")
    first = min(max(1, round(len(data) * (1.0 - holdout))), len(data) - 1)
    return data.split(first)


def _digest(data: Dataset) -> str:
    h = hashlib.sha256()
    for feed, labels in zip(data.feeds, data.labels):
        for k in sorted(feed):
            h.update(k.encode())
            h.update(np.ascontiguousarray(feed[k]).tobytes())
        if labels is not None:
            h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _study_key(model_path: Path, calib: Dataset, search: Dataset, constraint: Constraint, objective: str,
               passes: Sequence[str], threads: int | None, max_layers: int) -> str:
    """What makes two runs the same study: the model, the data, the constraint, objective, passes, threads."""
    h = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps([_digest(calib), _digest(search), constraint.to_dict(), objective, sorted(passes),
                         threads, max_layers]).encode())
    return h.hexdigest()


def _shown_url(url: str) -> str:
    """The storage URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _has_matmul_weights(model: Any) -> bool:
    return any(n.op_type == "MatMul" and len(n.inputs) > 1 and n.inputs[1] is not None
               and n.inputs[1].const_value is not None for n in model.graph)


def _has_wide_convs(model: Any) -> bool:
    """Whether some layer has 16 or more output channels, where multiples of 8 can matter to kernels."""
    return any(n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1 and n.inputs[1] is not None
               and n.inputs[1].const_value is not None and max(n.inputs[1].const_value.shape) >= 16
               for n in model.graph)


# ------------------------------------------------------------------------------------ sensitivity
def _sensitivity(the_study: Any, base: Any, workspace: Path, search: Dataset, calib: Dataset,
                 constraint: Constraint, passes: Sequence[str], dims: dict[str, int], threads: int | None,
                 max_layers: int, budget_minutes: float | None) -> SensitivityTable:
    """The study's table when it has one (a resumed run), else measured now and kept in the study."""
    stored = the_study.user_attrs.get("sensitivity")
    if stored:
        table = SensitivityTable.from_dict(stored)
        table.notes.append("sensitivity table read back from the study")
        return table
    base_path = workspace / "base.onnx"
    io.save(base, base_path)
    n = _sensitivity_feeds(base_path, search, threads)
    reference = Reference(base_path, search.take(n), constraint, threads=threads)
    actions, layers_total = plan_actions(base, passes, dims, max_layers=max_layers)
    limit = budget_minutes * 60.0 * _SENSITIVITY_SHARE if budget_minutes is not None else None
    table = measure_sensitivity(base, actions, reference, calib=calib.take(max(n, 2)), dims=dims, threads=threads,
                                max_seconds=limit, layers_total=layers_total)
    the_study.set_user_attr("sensitivity", table.to_dict())
    return table


def _sensitivity_feeds(path: Path, search: Dataset, threads: int | None) -> int:
    """How many search feeds the sensitivity uses: as many as the model runs in half a second, 2 to 8."""
    sess = session(path, threads=threads)
    feed = search.feeds[0]
    run(sess, feed)
    t = time.perf_counter()
    run(sess, feed)
    one = time.perf_counter() - t
    return max(1, min(len(search), 8, max(2, int(_SENSITIVITY_RUN_S / max(one, 1e-6)))))


