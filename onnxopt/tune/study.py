"""The Optuna study behind a tune run: storage, sampler, what a trial records, the Pareto front.

Two objectives, both minimized: the objective's ratio to the original and the constraint's error.
The constraint is told to the sampler too (``constraints_func``: the error minus the limit, feasible
at or below zero), so TPE and NSGA-II steer toward feasible recipes. Storage is any SQLAlchemy URL
(``sqlite:///tune.db`` by default beside the output): a rerun with the same storage and study name
loads the study and continues it, reusing its sensitivity table (a study attribute), and several
processes or machines can work on one study. A trial left running by a process that no longer
exists on this machine is marked failed when the study is opened again.

Every trial keeps, as user attributes, the recipe it stood for, its error, relative L2 error,
objective, state reason and where it ran, so the report and a resumed run read them back as is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Sequence
from typing import Any

from onnxopt.errors import UsageError, first_line
from onnxopt.tune.workers import Outcome

__all__ = ["SAMPLERS", "MEMORY", "TrialRecord", "open_study", "record_trials", "pareto_front", "tell", "mark_running"]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2")
_OPEN_ATTEMPTS = 5
MEMORY = "memory"
"""The storage name of a study kept in memory (not resumable)."""
_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "fail", "RUNNING": "running", "WAITING": "waiting"}


def _violation(trial: Any) -> Sequence[float]:
    """Optuna's constraint value of a trial: > 0 when it breaks the constraint."""
    return [float(trial.user_attrs.get("violation", 1.0))]


def open_study(storage: str, name: str, *, sampler: str = "tpe", seed: int | None = 0) -> Any:
    """Create or load the study `name` in `storage` (both objectives minimized)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler '{sampler}' (choose {', '.join(SAMPLERS)})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
        if sampler == "tpe":
            chosen = optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=_violation,
                                                n_startup_trials=8)
        else:
            chosen = optuna.samplers.NSGAIISampler(seed=seed, constraints_func=_violation, population_size=16)
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            backend = (optuna.storages.InMemoryStorage() if storage == MEMORY
                       else optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage)))
            study = optuna.create_study(storage=backend, study_name=name, sampler=chosen, load_if_exists=True,
                                        directions=["minimize", "minimize"])
            break
        except (ImportError, ValueError) as exc:
            raise UsageError(f"--storage '{storage}': {first_line(exc)}") from None
        except Exception as exc:  # SQLAlchemy's errors: a database that cannot be opened or written, or
            # two processes creating the same new database at once (the loser retries and finds it made)
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            if attempt == _OPEN_ATTEMPTS - 1 or "IntegrityError" not in type(exc).__name__:
                raise UsageError(f"--storage '{storage}': {first_line(exc)}") from None
            time.sleep(0.2 * (attempt + 1))
    if len(study.directions) != 2:
        raise UsageError(f"study '{name}' in '{storage}' is not a tune study (it has {len(study.directions)} "
                         "objectives); give another --study name")
    _fail_dead_trials(study)
    study.set_user_attr(f"{_ASKER}{socket.gethostname()}:{os.getpid()}", time.time())
    return study


def _engine_kwargs(storage: str) -> dict[str, Any]:
    # SQLite locks the whole file per write: wait for the other writer instead of failing at once.
    return {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}


def mark_running(trial: Any) -> None:
    """Record where a trial runs, so that a later run can tell a dead one from a live one."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ASKER = "asker:"
"""Study attribute prefix: ``asker:HOST:PID`` for every process that opened the study to run trials."""

_ORPHAN_SECONDS = 600.0
"""A running trial that never recorded its process is failed after this long when a process on another
machine may still be working on the study (it records itself milliseconds after it asks)."""


def _fail_dead_trials(study: Any) -> None:
    """Fail the trials left running by processes of this machine that no longer exist. A trial whose
    process died between asking for it and recording itself has no pid: it is failed when no process that
    opened the study could still be asking (all of them ran here and are gone), else once it is old."""
    import optuna

    here, me = socket.gethostname(), os.getpid()
    askers = [key[len(_ASKER):].rsplit(":", 1) for key in study.user_attrs if key.startswith(_ASKER)]
    remote = any(host != here for host, _ in askers)
    asking_here = any(host == here and pid.isdigit() and int(pid) != me and _alive(int(pid)) for host, pid in askers)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if "pid" not in t.user_attrs:
            age = time.time() - t.datetime_start.timestamp() if t.datetime_start is not None else 0.0
            dead = (not remote and not asking_here) or age > _ORPHAN_SECONDS
        else:
            dead = t.user_attrs.get("host") == here and isinstance(pid, int) and pid != me and not _alive(pid)
        if dead:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            logger.info("trial %d was left running by a process that ended; marked failed", t.number)


def tell(study: Any, trial: Any, outcome: Outcome, limit: float, recipe: Any) -> None:
    """Record `outcome` on `trial` (attributes first: the sampler reads the constraint from them)."""
    import optuna

    attrs = {"recipe": recipe, "reason": outcome.reason, "seconds": outcome.seconds, "detail": outcome.detail}
    if outcome.error is not None:
        attrs.update({"error": outcome.error, "rel_l2": outcome.rel_l2, "violation": outcome.error - limit})
    if outcome.objective is not None:
        attrs["objective"] = outcome.objective
    for key, value in attrs.items():
        trial.set_user_attr(key, json.loads(json.dumps(value, default=str)))
    if outcome.state == "complete" and outcome.objective is not None and outcome.error is not None:
        study.tell(trial, [outcome.objective, outcome.error])
    elif outcome.state == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


@dataclasses.dataclass
class TrialRecord:
    """A trial as the report shows it."""

    number: int
    state: str
    params: dict[str, Any]
    recipe: Any
    objective: float | None
    error: float | None
    rel_l2: float | None
    feasible: bool
    seconds: float | None
    reason: str
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def passes(self) -> list[str]:
        return [step[0] for step in self.recipe or []]


def record_trials(study: Any, limit: float) -> list[TrialRecord]:
    """Every trial of the study, oldest first."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        error = attrs.get("error")
        objective = attrs.get("objective")
        state = _STATES.get(t.state.name, t.state.name.lower())
        feasible = state == "complete" and error is not None and error <= limit + 1e-12
        reason = attrs.get("reason") or ("interrupted (its process ended)" if state == "fail" else "")
        out.append(TrialRecord(t.number, state, dict(t.params), attrs.get("recipe"), objective, error,
                               attrs.get("rel_l2"), feasible, attrs.get("seconds"), reason, attrs.get("detail", {})))
    return out


def pareto_front(trials: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The complete trials no other complete trial beats on both objective and error, by objective."""
    done = [t for t in trials if t.state == "complete" and t.objective is not None and t.error is not None
            and math.isfinite(t.objective) and math.isfinite(t.error)]
    front, seen = [], set()
    for t in sorted(done, key=lambda t: t.number):
        recipe = json.dumps(t.recipe, sort_keys=True)
        if recipe in seen:  # a repeated recipe took the earlier trial's figures: shown once
            continue
        seen.add(recipe)
        dominated = any(o.objective <= t.objective and o.error <= t.error and
                        (o.objective < t.objective or o.error < t.error) for o in done)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.objective, t.error, t.number))
