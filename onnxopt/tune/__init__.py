"""tune: accuracy-aware automatic compression across all passes.

``onnxopt tune MODEL --calib DATA [--data DATA] -o OUT --max-drop PTS | --tolerance X --metric M``,
and in Python `tune` (this package is callable: ``onnxopt.tune(model, calib=..., ...)``), which returns
a `TuneResult`. Given a constraint (an accuracy drop, or an output error against the original) and an
objective (latency on this machine, size or MACs, always as a ratio to the original), tune

1. measures the *sensitivity* of every layer to every action alone (quantize it, prune it, remove
   channels of its coupled group, factorize it at a rank), reusing tapped activations of the original
   (`sensitivity`);
2. searches over whole recipes -- which passes, their order, per-layer settings allotted from the
   sensitivities, distillation on or off -- with Optuna (TPE or NSGA-II, two objectives: the objective
   and the error, the constraint told to the sampler), trials evaluated by local worker processes or
   Ray tasks, the study kept in SQLite or any SQLAlchemy database and resumed when run again
   (`space`, `study`, `workers`);
3. measures the best candidates again on data the search did not use, times latency carefully, and
   builds the best one that holds the constraint and beats the original through ``onnxopt.optimize``
   (validated and timed like any optimize run), with a recipe that reproduces it exactly through
   ``onnxopt MODEL --recipe OUT.recipe.toml`` (`api`, `recipe`). When nothing qualifies, nothing is written.

Modules: `constraint` (the constraint and errors against the original's kept outputs), `objectives`
(latency, size and MAC ratios), `sensitivity`, `space`, `study` (the Optuna study), `workers` (trial
evaluation, local processes, Ray), `search` (the ask-run-tell loop), `choose` (finalists and the
choice), `result` (`TuneResult`), `recipe` (TOML), `api` (`tune`), `verb` (the command line).
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from onnxopt.tune.api import tune
from onnxopt.tune.result import TuneResult

__all__ = ["tune", "TuneResult"]


class _TuneModule(types.ModuleType):
    """``onnxopt.tune`` is this package; calling it calls `tune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


__signature__ = inspect.signature(tune)
sys.modules[__name__].__class__ = _TuneModule
