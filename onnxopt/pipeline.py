"""Runs passes in order, keeps per-pass stats and timings, and wraps failures with context."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from onnxopt.context import Context
from onnxopt.errors import ModelError, OnnxoptError, UsageError
from onnxopt.registry import Pass, PassStats, get_pass, make_pass

__all__ = ["Pipeline", "PassRecord", "PassFailure", "PassSpec", "parse_passes", "read_recipe", "apply_sets"]

logger = logging.getLogger(__name__)

PassSpec = str | tuple[str, dict[str, Any]] | Pass


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


def _instantiate(spec: PassSpec) -> Pass:
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return make_pass(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return make_pass(spec[0], spec[1])
    if isinstance(spec, dict) and "name" in spec:
        opts = {k: v for k, v in spec.items() if k != "name"}
        return make_pass(spec["name"], opts)
    raise UsageError(f"cannot read pass {spec!r}: give a name, (name, options) or a Pass object")


class Pipeline:
    """An ordered list of pass instances."""

    def __init__(self, passes: Sequence[PassSpec]) -> None:
        self.passes = [_instantiate(p) for p in passes]

    def run(self, model: ir.Model, ctx: Context) -> list[PassRecord]:
        records = []
        for p in self.passes:
            name = type(p).name or type(p).__name__
            t0 = time.perf_counter()
            try:
                stats = p.call(model, ctx)
            except OnnxoptError as exc:
                raise type(exc)(f"pass '{name}': {exc}") from None
            except Exception as exc:
                raise PassFailure(f"pass '{name}' failed: {type(exc).__name__}: {exc}") from exc
            if stats is None:
                stats = PassStats()
            if not isinstance(stats, PassStats):
                raise PassFailure(f"pass '{name}' returned {type(stats).__name__}, not PassStats")
            model.graph.sort()
            seconds = time.perf_counter() - t0
            logger.info("pass %s: %.2fs modified=%s", name, seconds, stats.modified)
            records.append(PassRecord(name, _jsonable(p.options()), stats, seconds))
        return records


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


def check_model_usable(model: ir.Model) -> None:
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelError("the model has an empty graph")
