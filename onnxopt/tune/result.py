"""`TuneResult`: what a tune run found, its JSON report, and writing the chosen model with its recipe."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt.api import Result
from onnxopt.data import Dataset
from onnxopt.errors import UsageError
from onnxopt.tune.constraint import Constraint
from onnxopt.tune.recipe import recipe_toml
from onnxopt.tune.sensitivity import SensitivityTable
from onnxopt.tune.study import TrialRecord

__all__ = ["Finalist", "TuneResult", "recipe_path_for"]


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
