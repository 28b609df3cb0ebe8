"""The search loop: ask Optuna for trials, run them on an executor, tell the outcomes, within the budget."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onnxopt.progress import progress
from onnxopt.tune.choose import FINALISTS, finalist_ceiling
from onnxopt.tune.constraint import Constraint
from onnxopt.tune.space import SearchSpace
from onnxopt.tune.study import mark_running, tell
from onnxopt.tune.workers import Job, Outcome, make_executor

__all__ = ["Kept", "counted_trials", "random_point", "run_trials"]

logger = logging.getLogger(__name__)

_MAX_REPEATS = 25  # trials in a row that allot an already measured recipe: the space is exhausted
_RANDOM_AFTER = 5
"""After this many such trials in a row, the next one is drawn at random (the sampler is stuck near what it
measured; a random recipe may still be new), so the budget goes to new recipes before the search gives up."""


def counted_trials(the_study: Any) -> int:
    """Trials that count toward ``--budget-trials``: every finished one but those an interrupt ended (a trial
    told to have failed carries its reason; one whose process died never was told)."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return sum(1 for t in the_study.get_trials(deepcopy=False, states=states)
               if t.state != optuna.trial.TrialState.FAIL or "reason" in t.user_attrs)


class Kept:
    """The models trials left for the finalists: only the best few by objective stay on disk."""

    def __init__(self, folder: Path, objective: str) -> None:
        self.folder = folder
        self.ceiling = finalist_ceiling(objective)
        self.best: list[tuple[float, int]] = []

    def add(self, outcome: Outcome) -> None:
        path = self.folder / f"trial{outcome.number}.onnx"
        if not path.is_file():
            return
        if outcome.objective is None or outcome.objective >= self.ceiling:
            path.unlink()
            return
        self.best = sorted([*self.best, (outcome.objective, outcome.number)])
        for _, number in self.best[2 * FINALISTS:]:
            (self.folder / f"trial{number}.onnx").unlink(missing_ok=True)
        self.best = self.best[:2 * FINALISTS]


def run_trials(the_study: Any, space: SearchSpace, job: Job, constraint: Constraint, workers: int, ray: str | None,
            budget_trials: int | None, finished_before: int, deadline: float | None, kept: Kept
            ) -> tuple[int, str | None]:
    """Run trials until the study holds `budget_trials` finished ones, the deadline passes or the space is
    exhausted; how many ran, and a note when the space ran out first."""
    total = None if budget_trials is None else max(0, budget_trials - finished_before)
    if total == 0:
        return 0, None
    executor = make_executor(job, workers, ray)
    ran, exhausted = 0, [False]
    try:
        for outcome in progress(_trials(the_study, space, executor, constraint, total, deadline, exhausted),
                                desc="tune: trials", total=total):
            kept.add(outcome)
            ran += 1
    finally:
        executor.close()
    note = (f"the search stopped before its budget: {_MAX_REPEATS} trials in a row allotted recipes already "
            "measured (the space looks exhausted)") if exhausted[0] else None
    return ran, note


def _trials(the_study: Any, space: SearchSpace, executor: Any, constraint: Constraint, total: int | None,
            deadline: float | None, exhausted: list[bool]) -> Iterator[Outcome]:
    """Ask, run and tell trials. Different parameters often allot the same recipe: such a trial takes the
    outcome of the earlier one at once, and a long run of them ends the search (the space is exhausted)."""
    in_flight: dict[int, tuple[Any, Any]] = {}
    known = _known_outcomes(the_study)
    started = repeats = 0

    def can_start() -> bool:
        exhausted[0] = repeats >= _MAX_REPEATS
        return ((total is None or started < total) and (deadline is None or time.perf_counter() < deadline)
                and not exhausted[0])

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
                if repeats % _RANDOM_AFTER == 0:
                    the_study.enqueue_trial(random_point(space, seed=trial.number))
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


def random_point(space: SearchSpace, seed: int) -> dict[str, Any]:
    """Parameters of `space` drawn uniformly (Optuna's random sampler on a scratch study), reproducibly by `seed`."""
    import optuna

    scratch = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return space.suggest(scratch.ask())


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
