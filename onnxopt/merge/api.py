"""`merge_models` and `merge`: several models in, one checked model out (modes in `onnxopt.merge`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateHashedInitializersPass, RemoveUnusedNodesPass

from onnxopt import io
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import count_initializers, iter_graphs
from onnxopt.merge.combine import COMBINE_MODES, WEIGHTED_MODES, assemble, parse_map
from onnxopt.merge.members import Member, load_members, reconcile_opsets
from onnxopt.merge.soup import soup

__all__ = ["merge", "merge_models", "MergeReport", "METADATA_KEY"]

logger = logging.getLogger(__name__)

METADATA_KEY = "onnxopt.merge"
"""Metadata prop of a merged model: JSON with the mode, the member names and the normalized weights."""


@dataclasses.dataclass
class MergeReport:
    """What `merge_models` did, as data."""

    combine: str
    members: list[dict[str, Any]]
    opset: int
    nodes: int
    parameters: int
    initializers_deduplicated: int = 0
    weights: list[float] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ option checks


def _checked_options(combine: str, weights: Sequence[float] | None, count: int, keep_members: bool,
                     input_map: Any, axis: Any) -> list[float] | None:
    """The normalized weights, once every option is known to be valid with the others (before any model is read)."""
    if combine not in COMBINE_MODES:
        raise UsageError(f"merge.combine: unknown mode '{combine}' (allowed {', '.join(COMBINE_MODES)})")
    if count < 2:
        raise UsageError(f"merge: give at least two models (got {count})")
    norm = _normalized_weights(combine, weights, count)
    if keep_members and combine == "soup":
        raise UsageError("merge.keep_members: soup writes one model; there are no member outputs to keep")
    if input_map and combine == "soup":
        raise UsageError("merge.input_map: soup members must already share their inputs")
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
        raise UsageError(f"merge.axis: {axis!r} is not a whole number")
    return norm


def _normalized_weights(combine: str, weights: Sequence[float] | None, n: int) -> list[float] | None:
    """Weights divided by their sum; None when the mode takes none."""
    if weights is None:
        if combine == "weighted":
            raise UsageError("merge.weights: combine 'weighted' needs one weight per member (--weights w1,w2,...)")
        return [1.0 / n] * n if combine in ("softvote", "soup") else None
    if combine not in WEIGHTED_MODES:
        raise UsageError(f"merge.weights: combine '{combine}' takes no weights "
                         f"(allowed with {', '.join(WEIGHTED_MODES)})")
    vals = [float(w) for w in weights]
    if len(vals) != n:
        raise UsageError(f"merge.weights: {len(vals)} weights for {n} members (give one per member)")
    if not all(np.isfinite(vals)) or min(vals) < 0 or sum(vals) <= 0:
        raise UsageError(f"merge.weights: {vals} must be finite and non-negative with a positive sum")
    total = sum(vals)
    return [v / total for v in vals]


# ------------------------------------------------------------------ figures and checks


def _parameters(model: ir.Model) -> int:
    return sum(int(v.const_value.size) for g in iter_graphs(model.graph) for v in g.initializers.values()
               if v.const_value is not None)


def _member_row(m: Member) -> dict[str, Any]:
    return {"name": m.name, "source": m.source, "opset": m.opset_before,
            "nodes": sum(1 for _ in m.model.graph), "parameters": _parameters(m.model)}


def _check(model: ir.Model) -> None:
    """The merged model must pass the full checker and load in ONNX Runtime."""
    from onnxopt.runtime import session

    with io.temp_model_file(model) as path:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ModelError(f"the merged model fails the ONNX checker: {first_line(exc)}") from None
        session(path)


# ------------------------------------------------------------------ public


def merge_models(
    models: Sequence[Any],
    *,
    combine: str,
    weights: Sequence[float] | None = None,
    keep_members: bool = False,
    input_map: Sequence[str] | Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    axis: int = -1,
    check: bool = True,
) -> tuple[ir.Model, MergeReport]:
    """Merge `models` (paths, ModelProtos or onnx_ir Models, never changed) into one onnx_ir Model, with a report.

    With `check`, the merged model passes the full ONNX checker and loads in ONNX Runtime.
    """
    norm = _checked_options(combine, weights, len(models), keep_members, input_map, axis)
    members = load_members(models, names)
    entries = parse_map(input_map, [m.name for m in members])
    rows = [_member_row(m) for m in members]
    opsets = reconcile_opsets(members)
    notes = [f"member '{m.name}' converted from opset {m.opset_before} to {opsets['']}"
             for m in members if m.opset_before is not None and m.opset_before != opsets[""]]
    if combine == "soup":
        model, changed = soup(members, norm or [], opsets)
        notes.append(f"{changed} weights averaged")
    else:
        model = assemble(members, combine, norm, keep_members, entries, int(axis), opsets)
    RemoveUnusedNodesPass()(model)
    before = count_initializers(model)
    DeduplicateHashedInitializersPass()(model)
    RemoveUnusedNodesPass()(model)
    meta = {"combine": combine, "members": [m.name for m in members], "weights": norm}
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    if check:
        _check(model)
    logger.debug("merged %d members (%s): %d nodes", len(members), combine, sum(1 for _ in model.graph))
    report = MergeReport(combine=combine, members=rows, opset=opsets[""], nodes=sum(1 for _ in model.graph),
                         parameters=_parameters(model), initializers_deduplicated=before - count_initializers(model),
                         weights=norm, notes=notes)
    return model, report


def merge(
    models: Sequence[Any],
    *,
    combine: str,
    weights: Sequence[float] | None = None,
    keep_members: bool = False,
    input_map: Sequence[str] | Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    axis: int = -1,
    output: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    check: bool = True,
) -> Any:
    """Merge several models into one (see `onnxopt.merge` for the modes).

    Returns an ``onnx.ModelProto`` when every member was given as one, else an ``onnx_ir.Model``.
    With `output`, the model is also written there atomically (nothing is written on error).
    """
    if output is not None:
        io.check_output_path(output, None)
        for m in models:
            if isinstance(m, str | os.PathLike):
                io.check_output_path(output, m)
    model, _ = merge_models(models, combine=combine, weights=weights, keep_members=keep_members,
                            input_map=input_map, names=names, axis=axis, check=check)
    if output is not None:
        io.save(model, output, external_data=external_data)
    if models and all(isinstance(m, onnx.ModelProto) for m in models):
        return ir.to_proto(model)
    return model
