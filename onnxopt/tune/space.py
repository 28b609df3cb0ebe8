"""The search space: whole recipes, drawn by Optuna, with per-layer settings allotted from the sensitivities.

A trial's parameters (a fixed set, so TPE's multivariate model and NSGA-II see every trial alike):

- per pass in the space, whether it runs (``channels``, ``factorize``, ``prune``, ``quantize``) and an
  *error budget* (``<pass>.budget``, log-uniform): the layers and levels it acts on are the ones a
  greedy allotment picks from the sensitivity table, best saving per unit of error first, until their
  errors alone add up to the budget (see `allot`). A small budget touches the safest layers only; the
  largest runs every measured action at its most aggressive level;
- pass options that change what the table cannot say: ``channels.round_to`` (kernel-friendly channel
  counts), ``channels.reconstruct``, ``quantize.calibrate``, ``quantize.mode`` (static or dynamic, for
  models with MatMul weights) and, for latency, ``quantize.float.<layer>`` for the eight measured layers
  with the fewest MACs (the conversions around a small integer kernel can cost more than it saves, which
  an error table cannot tell), and ``quantize.float_set``: ``allotted`` (the float layers the budget leaves)
  or ``searched`` (the set and range method the quantize pass's own search found for the constraint,
  `onnxopt.tune.mixed`; the budget then plays no part); on a transformer whose MatMuls read GELU outputs,
  ``quantize.gelu_matmuls`` for dynamic trials (dynamic int8, float or 8-bit blockwise);
- ``distill``: off, before quantize, or after it (refitting the layers the structural passes changed);
  ``order``: channels or factorize first.

Which passes are in the space depends on the objective: latency gains from channels, factorize and
quantize; size from prune, channels, factorize and quantize; MACs from channels and factorize. The
sensitivities also bound each layer (a *per-layer budget*): a level whose error alone is past three
times the constraint's limit is left out of the space, and so is one that saves nothing.

`SearchSpace.recipe` turns parameters into the recipe (``fold`` first, then the passes in order, each
with its ``layers`` table); it is deterministic, so a stored trial's parameters rebuild its model.
"""

from __future__ import annotations

import dataclasses
import glob
import math
from collections.abc import Sequence
from typing import Any

from onnxopt.registry import SKIP, untimed_options
from onnxopt.tune.constraint import Constraint
from onnxopt.tune.sensitivity import SETTING_KEY, Row, SensitivityTable

__all__ = ["SEARCH_PASSES", "PASSES_FOR", "Ladder", "SearchSpace", "allot"]

SEARCH_PASSES = ("channels", "factorize", "prune", "quantize", "distill")
PASSES_FOR: dict[str, tuple[str, ...]] = {
    "latency": ("channels", "factorize", "quantize", "distill"),
    "size": ("prune", "channels", "factorize", "quantize", "distill"),
    "macs": ("channels", "factorize", "distill"),
}
"""The passes that can move each objective (distill only repairs what the others did)."""

_HARD_FACTOR = 3.0
_FLOAT_TOGGLES = 8
_TINY = 1e-9
Recipe = list[tuple[str, dict[str, Any]]]


@dataclasses.dataclass
class Ladder:
    """One layer's measured levels in one pass (most gentle first) with the error and gain of each."""

    pass_name: str
    layer: str
    nodes: list[str]
    steps: list[tuple[Row, float, float]]  # (row, error used for allotting, gain)


def allot(ladders: Sequence[Ladder], budget: float) -> dict[str, Row]:
    """Greedy allotment: repeatedly raise the layer (to any higher level) with the largest gain per unit of
    added error while the errors of the chosen levels, added up, stay within `budget`."""
    chosen: dict[str, tuple[Row, float, float]] = {}
    spent = 0.0
    while True:
        best: tuple[float, Ladder, tuple[Row, float, float], float] | None = None
        for ladder in ladders:
            current = chosen.get(ladder.layer)
            level, err0, gain0 = (current[0].level, current[1], current[2]) if current else (0, 0.0, 0.0)
            for step in ladder.steps:
                row, err, gain = step
                added, more = max(err - err0, _TINY), gain - gain0
                if row.level <= level or more <= 0 or spent + added > budget:
                    continue
                score = more / added
                if best is None or score > best[0]:
                    best = (score, ladder, step, added)
        if best is None:
            return {layer: step[0] for layer, step in chosen.items()}
        _, ladder, step, added = best
        chosen[ladder.layer] = step
        spent += added


class SearchSpace:
    """Parameters of a trial and the recipe they stand for (see the module doc)."""

    def __init__(self, table: SensitivityTable, constraint: Constraint, objective: str, passes: Sequence[str], *,
                 matmul_weights: bool = False, wide_channels: bool = False,
                 searched: dict[str, Any] | None = None) -> None:
        self.constraint = constraint
        self.objective = objective
        self.ladders: dict[str, list[Ladder]] = {}
        self.unmeasured_quantize = any(r.pass_name == "quantize" and not r.measured for r in table.rows)
        allowed = [p for p in PASSES_FOR[objective] if p in passes]
        for name in ("channels", "factorize", "prune", "quantize"):
            if name in allowed:
                ladders = self._ladders(table, name)
                if ladders or (name == "quantize" and self.unmeasured_quantize):
                    self.ladders[name] = ladders
        self.distill = "distill" in allowed and bool(self.ladders)
        self.float_toggles = self._float_toggles() if objective == "latency" else []
        self.matmul_weights = matmul_weights
        self.wide_channels = wide_channels
        self.bounds = {name: _bounds(ladders) for name, ladders in self.ladders.items()}
        self.searched = searched if "quantize" in self.ladders else None

    @property
    def passes(self) -> list[str]:
        return list(self.ladders) + (["distill"] if self.distill else [])

    def empty(self) -> bool:
        return not self.ladders

    # ------------------------------------------------------------------ the ladders
    def _ladders(self, table: SensitivityTable, pass_name: str) -> list[Ladder]:
        by_layer: dict[str, Ladder] = {}
        hard = _HARD_FACTOR * self.constraint.limit + (_HARD_FACTOR if self.constraint.metric == "accuracy" else 0.0)
        for row in table.measured(pass_name):
            gain = self._gain(row)
            if gain is None or gain <= 0 or row.error is None or row.error > hard:
                continue
            err = self._allot_error(row)
            ladder = by_layer.setdefault(row.layer, Ladder(pass_name, row.layer, list(row.nodes), []))
            ladder.steps.append((row, err, gain))
        for ladder in by_layer.values():
            ladder.steps.sort(key=lambda s: s[0].level)
        return list(by_layer.values())

    def _float_toggles(self) -> list[str]:
        """The quantize layers with the fewest MACs, which the search may keep float whatever the budget: on
        a small layer the conversions around an integer kernel can cost more than its arithmetic saves."""
        ladders = sorted(self.ladders.get("quantize", []), key=lambda lad: (lad.steps[0][2], lad.layer))
        return [lad.layer for lad in ladders[:_FLOAT_TOGGLES]]

    def _allot_error(self, row: Row) -> float:
        """The error the allotment adds up: the constraint's own when it is continuous, else relative L2."""
        value = row.error if self.constraint.metric in ("rel_l2", "cosine") else row.rel_l2
        return max(float(value or 0.0), 0.0)

    def _gain(self, row: Row) -> float | None:
        value = row.bytes_saved if self.objective == "size" else row.macs_saved
        return None if value is None else float(value)

    # ------------------------------------------------------------------ parameters
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Draw every parameter of the space on an Optuna trial; the parameters as a dict."""
        for name in self.ladders:
            trial.suggest_categorical(name, [False, True])
            lo, hi = self.bounds[name]
            trial.suggest_float(f"{name}.budget", lo, hi, log=True)
        if "channels" in self.ladders:
            trial.suggest_categorical("channels.round_to", [1, 8] if self.wide_channels else [1])
            trial.suggest_categorical("channels.reconstruct", [False, True])
        if "quantize" in self.ladders:
            for layer in self.float_toggles:
                trial.suggest_categorical(f"quantize.float.{layer}", [False, True])
            trial.suggest_categorical("quantize.calibrate", ["minmax", "percentile"])
            if self.searched is not None:
                trial.suggest_categorical("quantize.float_set", ["allotted", "searched"])
            trial.suggest_categorical("quantize.mode", ["static", "dynamic"] if self.matmul_weights else ["static"])
            if self._gelu_choice():
                trial.suggest_categorical("quantize.gelu_matmuls", ["dynamic", "float", "blockwise"])
        if self.distill:
            trial.suggest_categorical("distill", ["off", "before_quantize", "after_quantize"])
        if "channels" in self.ladders and "factorize" in self.ladders:
            trial.suggest_categorical("order", ["channels,factorize", "factorize,channels"])
        return dict(trial.params)

    def starting_points(self) -> list[dict[str, Any]]:
        """Parameters worth trying first: each pass alone at its largest budget, the searched float set alone,
        all passes at middle budgets, then (latency) quantize alone with each float toggle on by itself. The
        toggles a point does not turn on are off, not drawn at random: whether keeping a small layer float
        pays is a matter of timing (on the digits CNN the stem float made int8 faster, the 1x1 conv after the
        depthwise one float made it slower than fp32), which each toggle's own trial measures."""
        off = {f"quantize.float.{layer}": False for layer in self.float_toggles}
        if self.searched is not None:  # the allotted set unless the point is the searched one
            off["quantize.float_set"] = "allotted"
        top = {f"{n}.budget": self.bounds[n][1] for n in self.ladders}
        points = []
        for name in self.ladders:
            points.append({**{n: n == name for n in self.ladders}, **top, **off})
        if self.searched is not None:
            points.append({**{n: n == "quantize" for n in self.ladders}, **top, **off,
                           "quantize.float_set": "searched", "quantize.mode": "static"})
        if len(self.ladders) > 1:
            point = {n: True for n in self.ladders}
            point.update({f"{n}.budget": math.sqrt(self.bounds[n][0] * self.bounds[n][1]) for n in self.ladders})
            points.append({**point, **off})
        if self._gelu_choice() and self.searched.get("dynamic_pick"):  # the variant the pass itself picked
            points.append({**{n: n == "quantize" for n in self.ladders}, **top, **off, "quantize.mode": "dynamic",
                           "quantize.gelu_matmuls": self.searched["dynamic_pick"]})
        alone = {**{n: n == "quantize" for n in self.ladders}, **top, **off, "quantize.mode": "static"}
        points += [{**alone, f"quantize.float.{layer}": True} for layer in self.float_toggles]
        return points

    # ------------------------------------------------------------------ recipes
    def recipe(self, params: dict[str, Any]) -> Recipe:
        """The recipe of `params` (deterministic).

        Distillation refits the layers the structural passes changed (and the consumers of removed
        channels), not every layer: on a large model refitting all of them takes many minutes a trial."""
        steps: Recipe = [("fold", {})]
        touched: set[str] = set()
        order = str(params.get("order", "channels,factorize")).split(",")
        for name in [*order, "prune"]:
            if name in self.ladders and params.get(name):
                options = self._structural(name, params, touched)
                if options is not None:
                    steps.append((name, options))
        quantize = self._quantize(params) if "quantize" in self.ladders and params.get("quantize") else None
        distill = params.get("distill", "off") if self.distill and touched else "off"
        refit = ("distill", {"layers": sorted(touched)})
        if distill == "before_quantize" or (distill == "after_quantize" and quantize is None):
            steps.append(refit)
        if quantize is not None:
            steps.append(("quantize", quantize))
            if distill == "after_quantize":
                steps.append(refit)
        return steps

    def allotted(self, name: str, params: dict[str, Any]) -> dict[str, Row]:
        return allot(self.ladders[name], float(params.get(f"{name}.budget", 0.0)))

    def _structural(self, name: str, params: dict[str, Any], touched: set[str]) -> dict[str, Any] | None:
        chosen = self.allotted(name, params)
        if not chosen:
            return None
        for row in chosen.values():
            touched.update(glob.escape(n) for n in (*row.nodes, *row.consumers))
            if name == "factorize":  # the chain's other nodes are named after the layer
                touched.update(f"{glob.escape(n)}.*" for n in row.nodes)
        key = SETTING_KEY[name]
        own = {glob.escape(node): {SKIP: False, key: row.value} for row in chosen.values() for node in row.nodes}
        if name == "channels":
            options = {"ratio": 0.0, "round_to": int(params.get("channels.round_to", 1)),
                       "reconstruct": bool(params.get("channels.reconstruct", False)),
                       "layers": {k: {key: v[key]} for k, v in own.items()}}
        elif name == "factorize":
            options = {"rank_by": "ratio", "data_aware": True, "layers": {"*": {SKIP: True}, **own}}
        else:
            options = {"scope": "layer", "storage": "sparse", "layers": {"*": {SKIP: True}, **own}}
        return {**options, **untimed_options(name, options)}

    def _quantize(self, params: dict[str, Any]) -> dict[str, Any] | None:
        mode = params.get("quantize.mode", "static")
        if mode == "static" and self.searched is not None and params.get("quantize.float_set") == "searched":
            return self._searched_quantize(params)
        chosen = {layer: row for layer, row in self.allotted("quantize", params).items()
                  if not params.get(f"quantize.float.{layer}")}
        kept_float = sorted({node for ladder in self.ladders["quantize"] if ladder.layer not in chosen
                             for node in ladder.nodes})
        if not chosen and not self.unmeasured_quantize:
            return None
        options: dict[str, Any] = {"mode": mode}
        if options["mode"] == "static":
            options["calibrate"] = params.get("quantize.calibrate", "minmax")
        elif self._gelu_choice():
            options["gelu_matmuls"] = params.get("quantize.gelu_matmuls", "dynamic")
        if kept_float:
            options["layers"] = {glob.escape(n): {SKIP: True} for n in kept_float}
        return {**options, **untimed_options("quantize", options)}

    def _gelu_choice(self) -> bool:
        """Whether dynamic trials choose how the MatMuls that read a GELU output are quantized."""
        return self.matmul_weights and self.searched is not None and bool(self.searched.get("gelu_fed"))

    def _searched_quantize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Static int8 with the searched float set and range method (and the float toggles the trial set)."""
        assert self.searched is not None
        options: dict[str, Any] = {"mode": "static", "calibrate": self.searched["calibrate"]}
        if self.searched["float_nodes"]:
            options["float_nodes"] = sorted(self.searched["float_nodes"])
        toggled = sorted({node for ladder in self.ladders["quantize"] if params.get(f"quantize.float.{ladder.layer}")
                          for node in ladder.nodes})
        if toggled:
            options["layers"] = {glob.escape(n): {SKIP: True} for n in toggled}
        return {**options, **untimed_options("quantize", options)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "layers": {name: [{"layer": lad.layer, "levels": [s[0].value for s in lad.steps]} for lad in ladders]
                       for name, ladders in self.ladders.items()},
            "budgets": {name: list(b) for name, b in self.bounds.items()},
            "float_toggles": list(self.float_toggles),
            "quantize_searched": self.searched,
        }


def _bounds(ladders: Sequence[Ladder]) -> tuple[float, float]:
    """Budget range: from half the smallest step's error to all layers at their last level (and a bit)."""
    errors = [err for lad in ladders for _, err, _ in lad.steps]
    positive = [e for e in errors if e > _TINY]
    lo = max(min(positive) / 2 if positive else 1e-6, 1e-7)
    hi = max(sum(max(max(err, _TINY) for _, err, _ in lad.steps) for lad in ladders) * 1.05, lo * 10)
    return lo, hi
