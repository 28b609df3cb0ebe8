"""Runs passes in order, keeps per-pass stats and timings, and wraps failures with context.

A step is a registered onnxopt pass (by name, ``(name, options)``, a ``{"name": ...}`` dict or an
instance) or an ``onnx_ir.passes`` pass instance, recorded under its class name with the
``modified`` it reported. After a step that modified the model, the context's cached activations
of it are dropped; when the pipeline ends, the context's sessions are released.

Before the first step the pipeline makes weights look the same to every pass, in one place
(`onnxopt.graph.prepare_weights`): Constant nodes become initializers under their own names (Paddle's
exports keep every weight in one), and an IR < 4 model, whose weights are all listed as graph inputs, is
raised to IR 4 with those weights constants (as ONNX Runtime reads them; ``Context.initializer_inputs``
="input" keeps them overridable). Both are exact, so every pass, built-in or a user's, finds weights as
initializers and may add new ones in a valid model; what was done is the first record's first notes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnx_ir.passes

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from onnxopt.context import Context
from onnxopt.errors import OnnxoptError, UsageError
from onnxopt.graph import prepare_weights
from onnxopt.registry import Pass, PassStats, call_pass, get_pass, make_pass, root_cause

__all__ = ["Pipeline", "PassRecord", "PassFailure", "PassSpec", "parse_passes", "read_recipe", "apply_sets"]

logger = logging.getLogger(__name__)

PassSpec = str | tuple[str, dict[str, Any]] | dict[str, Any] | Pass | onnx_ir.passes.PassBase
Step = Pass | onnx_ir.passes.PassBase


class PassFailure(RuntimeError):
    """A pass raised something that is not the user's error: a bug, reported with context."""


@dataclasses.dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    stats: PassStats
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.options, "seconds": self.seconds, **self.stats.to_dict()}


def _instantiate(spec: PassSpec) -> Step:
    if isinstance(spec, (Pass, onnx_ir.passes.PassBase)):
        return spec
    if isinstance(spec, str):
        return make_pass(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return make_pass(spec[0], spec[1])
    if isinstance(spec, dict) and "name" in spec:
        opts = {k: v for k, v in spec.items() if k != "name"}
        return make_pass(spec["name"], opts)
    raise UsageError(
        f"cannot read pass {spec!r}: give a name, (name, options), a Pass object or an onnx_ir pass"
    )


def _step_name(step: Step) -> str:
    """The registered name of an onnxopt pass, the class name of an onnx_ir pass."""
    registered = type(step).name if isinstance(step, Pass) else ""
    return registered or type(step).__name__


class Pipeline:
    """An ordered list of pass instances (onnxopt passes and onnx_ir passes)."""

    def __init__(self, passes: Sequence[PassSpec]) -> None:
        self.passes = [_instantiate(p) for p in passes]

    def run(self, model: ir.Model, ctx: Context | None = None) -> list[PassRecord]:
        """Run every step on `model` in place (its weights prepared first); release `ctx`'s tapping
        sessions at the end."""
        ctx = ctx if ctx is not None else Context()
        try:
            notes = prepare_weights(model, ctx.initializer_inputs)
            records = [self._run_step(step, model, ctx) for step in self.passes]
            if records:
                records[0].stats.notes[:0] = notes
            return records
        finally:
            ctx.close()

    def _run_step(self, step: Step, model: ir.Model, ctx: Context) -> PassRecord:
        name = _step_name(step)
        t0 = time.perf_counter()
        try:
            if isinstance(step, Pass):
                stats, options = call_pass(step, model, ctx), step.options()
            else:
                stats, options = _run_ir_pass(step, model), _public_attributes(step)
        except Exception as exc:
            cause = root_cause(exc)
            if isinstance(cause, OnnxoptError):
                raise type(cause)(f"pass '{name}': {cause}") from None
            raise PassFailure(f"pass '{name}' failed: {type(cause).__name__}: {cause}") from exc
        if stats is None:
            stats = PassStats()
        if not isinstance(stats, PassStats):
            raise PassFailure(f"pass '{name}' returned {type(stats).__name__}, not PassStats")
        if stats.modified:
            ctx.model_changed(model)
        model.graph.sort()
        seconds = time.perf_counter() - t0
        logger.info("pass %s: %.2fs modified=%s", name, seconds, stats.modified)
        return PassRecord(name, _jsonable(options), stats, seconds)


def _run_ir_pass(step: onnx_ir.passes.PassBase, model: ir.Model) -> PassStats:
    """Run an onnx_ir pass on `model` in place (a pass that returns a new model hands it over)."""
    result = step(model)
    if result.model is not model:
        _adopt(model, result.model)
    return PassStats(modified=bool(result.modified))


def _adopt(model: ir.Model, other: ir.Model) -> None:
    """Make `model` hold what `other` holds (a functional onnx_ir pass returns a new model)."""
    model.graph = other.graph
    model.ir_version = other.ir_version
    model.functions.clear()
    model.functions.update(other.functions)
    model.metadata_props.clear()
    model.metadata_props.update(other.metadata_props)


def _public_attributes(step: object) -> dict[str, Any]:
    """An onnx_ir pass's settings for the report: its public plain attributes."""
    plain = (bool, int, float, str, type(None))
    attrs = getattr(step, "__dict__", {})
    return {k: v for k, v in attrs.items() if not k.startswith("_") and isinstance(v, plain)}


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(options, default=str))


def parse_passes(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--passes needs at least one pass name")
    for n in names:
        get_pass(n)
    return names


def apply_sets(names: Sequence[str], sets: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Pair pass names with their ``--set PASS.KEY=VALUE`` options (strings, coerced later)."""
    options: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UsageError(f"--set '{item}': write it as PASS.KEY=VALUE (e.g. prune.sparsity=0.7)")
        lhs, value = item.split("=", 1)
        pname, key = lhs.split(".", 1)
        if pname not in options:
            raise UsageError(f"--set '{item}': pass '{pname}' is not in --passes ({', '.join(names)})")
        options[pname][key] = value
    return [(n, options[n]) for n in names]


def read_recipe(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """A TOML or JSON recipe: ``passes = [{name = "prune", sparsity = 0.5}, ...]``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"recipe '{p}' does not exist")
    try:
        if p.suffix.lower() == ".json":
            doc = json.loads(p.read_text())
        else:
            doc = tomllib.loads(p.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"recipe '{p}' cannot be parsed: {exc}") from None
    items = doc.get("passes") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not items:
        raise UsageError(f"recipe '{p}' needs a non-empty list 'passes'")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, {}))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
        else:
            raise UsageError(f"recipe '{p}': each pass needs a 'name' ({item!r})")
    return out

