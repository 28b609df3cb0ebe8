"""`tune`: accuracy-aware search over whole recipes, and `TuneResult`.

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

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt import io
from onnxopt.api import Result, optimize
from onnxopt.context import Context
from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.errors import ModelError, UsageError
from onnxopt.pipeline import Pipeline
from onnxopt.progress import progress
from onnxopt.registry import run_pass
from onnxopt.runtime import run, session
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.objectives import OBJECTIVES, careful_latency, macs_of, macs_ratio, size_ratio
from onnxopt.tune.recipe import recipe_toml
from onnxopt.tune.sensitivity import SensitivityTable, measure_sensitivity, plan_actions
from onnxopt.tune.space import PASSES_FOR, SEARCH_PASSES, SearchSpace
from onnxopt.tune.study import MEMORY, TrialRecord, mark_running, open_study, pareto_front, record_trials, tell
from onnxopt.tune.workers import Job, Outcome, make_executor

__all__ = ["tune", "TuneResult", "DEFAULT_TRIALS"]

logger = logging.getLogger(__name__)

DEFAULT_TRIALS = 40
_FINALISTS = 6
_LATENCY_MARGIN = 0.02  # a latency ratio must be below 1 - margin to count as beating the original
_SENSITIVITY_SHARE = 0.4  # of --budget-minutes, at most, for the sensitivity table
_SENSITIVITY_RUN_S = 0.5  # sensitivity feeds: as many as the original runs in this long (2..8)
_MAX_REPEATS = 25  # trials in a row that allot an already measured recipe: the space is exhausted


@dataclasses.dataclass
class Finalist:
    """A trial measured again: held-out error and the careful objective."""

    number: int
    recipe: Any
    objective_search: float
    error_search: float
    objective: float
    objective_spread: tuple[float, float] | None
    error: float
    rel_l2: float
    holds: bool
    beats: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TuneResult:
    """What a tune run found: the sensitivity table, every trial, the Pareto front, the finalists and,
    when one qualified, the chosen model (`result`, an `onnxopt.Result`) with its recipe."""

    model: str
    constraint: Constraint
    objective: str
    threads: int | None
    sensitivity: SensitivityTable
    space: dict[str, Any]
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    finalists: list[Finalist]
    chosen: Finalist | None
    result: Result | None
    study: dict[str, Any]
    data: dict[str, Any]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)
    _calib_part: Dataset | None = None

    @property
    def passed(self) -> bool:
        return self.chosen is not None and self.result is not None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def recipe(self) -> list[tuple[str, dict[str, Any]]] | None:
        """The chosen recipe with every option as it ran (None when nothing qualified)."""
        if self.result is None:
            return None
        return [(r.name, dict(r.options)) for r in self.result.passes]

    def recipe_text(self, model_path: str | None = None, output: str | None = None, calib: str | None = None) -> str:
        """The recipe as TOML, with the command that reproduces the model in a comment."""
        if self.recipe is None or self.chosen is None:
            raise UsageError("nothing qualified, so there is no recipe")
        c = self.chosen
        command = (f"onnxopt {model_path or self.model} --recipe RECIPE --calib {calib or 'CALIB'}"
                   f" -o {output or 'OUT.onnx'}")
        comments = [
            f"onnxopt tune: trial {c.number} of study '{self.study.get('name')}'",
            f"{self.objective} {c.objective:.3f}x of the original; {self.constraint.describe()}: "
            f"{c.error:.4g} {self.constraint.unit()} on held-out data, {c.error_search:.4g} on search data",
            f"reproduce: {command}",
        ]
        return recipe_toml(self.recipe, comments)

    def save(self, path: str | os.PathLike[str], *, external_data: bool | None = None,
             model_path: str | None = None, calib: str | None = None) -> tuple[Path, Path]:
        """Write the chosen model to `path` and its recipe beside it (``OUT.recipe.toml``); when the
        calibration data was split for a held-out part, also the calibration part (``OUT.calib``)."""
        if self.result is None:
            raise UsageError("nothing qualified; nothing to write")
        target = Path(path)
        recipe_path = recipe_path_for(target)
        calib_text = calib
        if self._calib_part is not None:
            folder = target.with_name(target.name.removesuffix(".onnx") + ".calib")
            _write_feeds(self._calib_part, folder)
            calib_text = str(folder)
        text = self.recipe_text(model_path, str(target), calib_text).replace("RECIPE", str(recipe_path))
        out = self.result.save(target, external_data=external_data)
        tmp = recipe_path.with_name(f".{recipe_path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, recipe_path)
        return out, recipe_path

    def describe(self) -> str:
        """One line: what was chosen, or the best candidate's figures when nothing qualified."""
        unit = self.constraint.unit()
        if self.chosen is not None:
            c = self.chosen
            return (f"chose trial {c.number}: {self.objective} {c.objective:.3f}x of the original, "
                    f"{c.error:.4g} {unit} on held-out data ({self.constraint.describe()})")
        best = self.best_candidate()
        if best is None:
            return f"no candidate: {self._why_no_trial()}"
        if isinstance(best, Finalist):
            return (f"best candidate: trial {best.number}, {self.objective} {best.objective:.3f}x of the original, "
                    f"{best.error:.4g} {unit} on held-out data")
        objective = "-" if best.objective is None else f"{best.objective:.3f}x"
        return (f"best candidate: trial {best.number}, {self.objective} {objective} of the original, "
                f"{best.error:.4g} {unit} on search data")

    def _why_no_trial(self) -> str:
        rows = [r for r in self.sensitivity.rows if r.measured and r.error is not None]
        if not self.trials and rows:
            gentlest = min(rows, key=lambda r: (r.error, r.rel_l2 or 0.0))
            return (f"every action alone breaks the constraint or saves nothing; the gentlest, {gentlest.label} on "
                    f"{gentlest.layer}, has {gentlest.error:.4g} {self.constraint.unit()} alone")
        return f"no trial completed ({len(self.trials)} trials)"

    def best_candidate(self) -> Finalist | TrialRecord | None:
        """The finalist with the best objective, else the complete trial with the smallest error."""
        if self.finalists:
            return min(self.finalists, key=lambda f: (not f.holds, f.objective))
        done = [t for t in self.trials if t.state == "complete" and t.error is not None]
        return min(done, key=lambda t: (t.error, t.objective or math.inf)) if done else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema in docs/tune.md)."""
        return {
            "kind": "tune",
            "model": self.model,
            "constraint": self.constraint.to_dict(),
            "objective": {"name": self.objective, "threads": self.threads},
            "data": self.data,
            "study": self.study,
            "seconds": round(self.seconds, 3),
            "sensitivity": self.sensitivity.to_dict(),
            "space": self.space,
            "trials": [t.to_dict() for t in self.trials],
            "pareto": [{"number": t.number, "objective": t.objective, "error": t.error, "feasible": t.feasible,
                        "passes": t.passes()} for t in self.pareto],
            "finalists": [f.to_dict() for f in self.finalists],
            "chosen": self.chosen.to_dict() if self.chosen is not None else None,
            "verdict": "chosen" if self.passed else "nothing qualifies",
            "message": self.describe(),
            "notes": list(self.notes),
            "result": self.result.to_dict() if self.result is not None else None,
        }


def recipe_path_for(output: str | os.PathLike[str]) -> Path:
    """``OUT.recipe.toml`` for output ``OUT.onnx``."""
    target = Path(output)
    return target.with_name(target.name.removesuffix(".onnx") + ".recipe.toml")


def _write_feeds(data: Dataset, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(data))))
    for i, (feed, labels) in enumerate(zip(data.feeds, data.labels)):
        arrays = dict(feed) if labels is None else {**feed, "labels": labels}
        np.savez(folder / f"{i:0{width}d}.npz", **arrays)


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
) -> TuneResult:
    """Search for the recipe that minimizes `objective` under the constraint (see the module doc).

    The constraint is ``max_drop`` (accuracy points, labels needed) or ``tolerance`` with ``metric``
    (``rel_l2``, ``cosine``: 1-cosine, ``top1``: 1-agreement). `data` is split into a search part and a
    held-out part (the last `holdout` share of its feeds); without it the calibration data is split
    that way and the passes calibrate on its first part. `storage` is an SQLAlchemy URL (default:
    ``sqlite:///OUTPUT.tune.db`` with `output`, else in memory); a study of the same name in it is
    resumed. Trials run in `workers` processes, or as Ray tasks on the cluster `ray` (``local`` for
    one started here). With `output`, the chosen model is staged beside it (`TuneResult.save`).
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
        space = SearchSpace(table, constraint, objective, chosen_passes,
                            matmul_weights=_has_matmul_weights(base), wide_channels=_has_wide_convs(base))
        notes = list(table.notes)
        kept = workspace / "trials"
        kept.mkdir()
        job = Job(str(model_path), calib_ds, search, constraint, objective, threads, dims, key=key,
                  keep_dir=str(kept))
        finished_before = _finished(the_study)
        ran = 0
        if space.empty():
            notes.append("no action saves anything on this objective within the constraint: nothing to search")
        else:
            if not the_study.trials:
                for point in space.starting_points():
                    the_study.enqueue_trial(point, skip_if_exists=True)
            ran = _search(the_study, space, job, constraint, workers, ray, budget_trials, finished_before, deadline,
                          _Kept(kept, objective))
        trials = record_trials(the_study, constraint.limit)
        finalists = _finalists(trials, model_path, job, held, constraint, objective, workspace)
        chosen, result = _choose(finalists, model_path, calib_ds, held, constraint, objective, threads, dims, batch,
                                 output, bench_runs, notes)
        counts = {s: sum(1 for t in trials if t.state == s) for s in ("complete", "pruned", "fail", "running")}
        study_info = {"name": name, "storage": _shown_url(url), "sampler": sampler, "seed": seed,
                      "trials_total": len(trials), "trials_this_run": ran, "trials_before": finished_before,
                      **{f"trials_{k}": v for k, v in counts.items()}, "workers": workers, "ray": ray,
                      "budget_trials": budget_trials, "budget_minutes": budget_minutes}
        return TuneResult(str(model if isinstance(model, (str, os.PathLike)) else "<in-memory model>"), constraint,
                          objective, threads, table, space.to_dict(), trials, pareto_front(trials), finalists, chosen,
                          result, study_info, data_info, time.perf_counter() - t0, notes, calib_part)


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


# ------------------------------------------------------------------------------------ the search
def _finished(the_study: Any) -> int:
    """Trials that count toward ``--budget-trials``: every finished one but those an interrupt ended (a trial
    told to have failed carries its reason; one whose process died never was told)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in the_study.get_trials(deepcopy=False, states=states)
               if t.state != optuna.trial.TrialState.FAIL or "reason" in t.user_attrs)


class _Kept:
    """The models trials left for the finalists: only the best few by objective stay on disk."""

    def __init__(self, folder: Path, objective: str) -> None:
        self.folder = folder
        self.ceiling = _ceiling(objective)
        self.best: list[tuple[float, int]] = []

    def add(self, outcome: Outcome) -> None:
        path = self.folder / f"trial{outcome.number}.onnx"
        if not path.is_file():
            return
        if outcome.objective is None or outcome.objective >= self.ceiling:
            path.unlink()
            return
        self.best = sorted([*self.best, (outcome.objective, outcome.number)])
        for _, number in self.best[2 * _FINALISTS:]:
            (self.folder / f"trial{number}.onnx").unlink(missing_ok=True)
        self.best = self.best[:2 * _FINALISTS]


def _ceiling(objective: str) -> float:
    """Trials above this objective ratio cannot be finalists (a search latency is short, taken beside work)."""
    return 1.2 if objective == "latency" else 1.0


def _search(the_study: Any, space: SearchSpace, job: Job, constraint: Constraint, workers: int, ray: str | None,
            budget_trials: int | None, finished_before: int, deadline: float | None, kept: _Kept) -> int:
    """Run trials until the study holds `budget_trials` finished ones or the deadline passes; how many ran."""
    total = None if budget_trials is None else max(0, budget_trials - finished_before)
    if total == 0:
        return 0
    executor = make_executor(job, workers, ray)
    ran = 0
    try:
        for outcome in progress(_trials(the_study, space, executor, constraint, total, deadline),
                                desc="tune: trials", total=total):
            kept.add(outcome)
            ran += 1
    finally:
        executor.close()
    return ran


def _trials(the_study: Any, space: SearchSpace, executor: Any, constraint: Constraint, total: int | None,
            deadline: float | None) -> Iterator[Outcome]:
    """Ask, run and tell trials. Different parameters often allot the same recipe: such a trial takes the
    outcome of the earlier one at once, and a long run of them ends the search (the space is exhausted)."""
    in_flight: dict[int, tuple[Any, Any]] = {}
    known = _known_outcomes(the_study)
    started = repeats = 0

    def can_start() -> bool:
        return ((total is None or started < total) and (deadline is None or time.perf_counter() < deadline)
                and repeats < _MAX_REPEATS)

    while True:
        while len(in_flight) < executor.slots and can_start():
            trial = the_study.ask()
            mark_running(trial)
            recipe = json.loads(json.dumps(space.recipe(space.suggest(trial))))
            text = json.dumps(recipe, sort_keys=True)
            started += 1
            if text in known:
                repeats += 1
                outcome = dataclasses.replace(known[text], number=trial.number, seconds=0.0,
                                              reason=f"same recipe as trial {known[text].number}")
                tell(the_study, trial, outcome, constraint.limit, recipe)
                yield outcome
                continue
            repeats = 0
            in_flight[trial.number] = (trial, recipe)
            executor.submit(trial.number, [tuple(step) for step in recipe])
        if not in_flight:
            return
        outcome = executor.next_done()
        trial, recipe = in_flight.pop(outcome.number)
        tell(the_study, trial, outcome, constraint.limit, recipe)
        if outcome.state in ("complete", "pruned"):
            known.setdefault(json.dumps(recipe, sort_keys=True), outcome)
        logger.info("trial %d: %s objective=%s error=%s %s", outcome.number, outcome.state, outcome.objective,
                    outcome.error, outcome.reason)
        yield outcome


def _known_outcomes(the_study: Any) -> dict[str, Outcome]:
    """Outcomes of the study's finished trials (complete or pruned) by recipe, for repeated recipes."""
    known: dict[str, Outcome] = {}
    for t in the_study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        recipe = t.user_attrs.get("recipe")
        if state in ("complete", "pruned") and recipe is not None:
            a = t.user_attrs
            known.setdefault(json.dumps(recipe, sort_keys=True),
                             Outcome(t.number, state, a.get("objective"), a.get("error"), a.get("rel_l2"),
                                     a.get("detail", {}), a.get("reason", "")))
    return known


# ------------------------------------------------------------------------------------ the choice
def _finalists(trials: Sequence[TrialRecord], model_path: Path, job: Job, held: Dataset, constraint: Constraint,
               objective: str, workspace: Path) -> list[Finalist]:
    """The best feasible trials, rebuilt and measured on the held-out data (latency: careful, all together)."""
    ceiling = _ceiling(objective)
    pool = sorted((t for t in trials if t.feasible and t.objective is not None and t.objective < ceiling),
                  key=lambda t: (t.objective, t.error, t.number))
    picked, seen = [], set()
    for t in pool:
        text = json.dumps(t.recipe, sort_keys=True)
        if text not in seen:
            seen.add(text)
            picked.append(t)
        if len(picked) == _FINALISTS:
            break
    if not picked:
        return []
    reference = Reference(model_path, held, constraint, threads=job.threads)
    paths, measured = [], []
    for t in picked:
        path = Path(job.keep_dir or workspace) / f"trial{t.number}.onnx"
        if not path.is_file():  # built by another machine, or in an earlier run of the study
            model = io.load(model_path)
            ctx = Context(original_path=model_path, calib=job.calib, dims=dict(job.dims), threads=job.threads)
            Pipeline([tuple(step) for step in t.recipe]).run(model, ctx)
            io.save(model, path)
        paths.append(path)
        measured.append(reference.measure(path, threads=job.threads))
    spreads: list[tuple[float, float] | None] = [None] * len(paths)
    if objective == "latency":
        lats = careful_latency(model_path, paths, held.feeds[0], threads=job.threads)
        ratios = [lat.ratio for lat in lats]
        spreads = [(lat.low, lat.high) for lat in lats]
    elif objective == "size":
        ratios = [size_ratio(model_path, p) for p in paths]
    else:
        base = macs_of(model_path, job.dims)
        ratios = [macs_ratio(base, p, job.dims) for p in paths]
    limit = 1.0 - (_LATENCY_MARGIN if objective == "latency" else 0.0)
    return [Finalist(t.number, t.recipe, float(t.objective), float(t.error), r, s, m.error, m.rel_l2,
                     constraint.holds(m.error), r < limit)
            for t, m, r, s in zip(picked, measured, ratios, spreads)]


def _choose(finalists: Sequence[Finalist], model_path: Path, calib: Dataset, held: Dataset, constraint: Constraint,
            objective: str, threads: int | None, dims: dict[str, int], batch: int | None,
            output: str | os.PathLike[str] | None, bench_runs: int, notes: list[str]) -> tuple[Finalist | None,
                                                                                               Result | None]:
    """The best finalist that holds on held-out data and beats the original, built through `optimize`."""
    for f in sorted((f for f in finalists if f.holds and f.beats), key=lambda f: (f.objective, f.error)):
        try:
            result = optimize(str(model_path), [tuple(step) for step in f.recipe], calib=calib, data=held,
                              tolerance=constraint.validate_tolerance, metric=constraint.validate_metric,
                              dims=dims, batch=batch, latency_runs=bench_runs, threads=threads, output=output)
        except ModelError as exc:
            notes.append(f"trial {f.number} left out: {exc}")
            continue
        if not result.passed:
            notes.append(f"trial {f.number} left out: its validation failed ({result.validation.describe()})")
            continue
        return f, result
    return None, None
