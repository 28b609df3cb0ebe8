"""Sensitivity: the output error of each compression action applied alone to one layer.

Actions, per layer (Conv, ConvTranspose, Gemm, MatMul with a constant weight, in the main graph):

============  ==========================================  =====================================
pass          action (levels, most gentle first)          applied as
============  ==========================================  =====================================
quantize      int8 static for this node, the rest float   ``layers = {"*": skip, node: quantized}``
prune         zero a fraction s of its weights            ``scope=layer``, ``sparsity`` per layer
channels      remove a fraction r of its coupled group    ``ratio`` per group (its producers)
factorize     low rank at k of the full rank (data-aware) ``rank_ratio`` per layer
============  ==========================================  =====================================

Each action runs the real pass on a copy of the base model (through the ``layers`` option, so what
is measured is what a recipe later does) and the copy is compared with the base on a few feeds of
the search data. Two things keep that cheap:

1. *Tapped activations are reused.* Nodes upstream of the first node an action changed compute what
   the base computes, so only the changed part and everything after it runs: it is cut out of the
   copy (``onnx_ir.convenience.extract``) as a model whose inputs are the base tensors it reads, and
   fed with those tensors, tapped from the base once per layer through `Context.activations`, which
   keeps one tapping session of the base for every layer and action.
2. *The passes tap the base, not their copy.* A pass asks its context for calibration activations
   (quantize's ranges, channels' means, factorize's moments) before it changes anything; an
   unchanged copy computes exactly what the base computes, so the context answers from the base's
   session instead of building one per copy.

Layers are measured in order of their MACs (parameters when shapes are unknown), up to a number of
layers and a time budget; the rest are listed as not measured. Every row carries the constraint's
error, the relative L2 error (continuous where accuracy on a few samples moves in steps) and what the
action saves: MACs and weight bytes. The table is kept in the study and the JSON report.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.analysis import build_channel_graph, linear_of, macs_by_node
from onnxopt.analysis.layers import INTEGER_KERNELS
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError, first_line
from onnxopt.graph import iter_graphs
from onnxopt.io import temp_model_file, weight_bytes
from onnxopt.progress import progress
from onnxopt.registry import SKIP, run_pass, untimed_options
from onnxopt.tune.constraint import Reference

__all__ = ["LEVELS", "Action", "Row", "SensitivityTable", "plan_actions", "why_no_layers", "measure_sensitivity",
           "SharedTapsContext"]

logger = logging.getLogger(__name__)

LEVELS: dict[str, tuple[float, ...]] = {
    "quantize": (1.0,),
    "prune": (0.5, 0.75, 0.9),
    "channels": (0.25, 0.5),
    "factorize": (0.5, 0.25, 0.125),
}
"""The settings measured per pass, most gentle first (quantize: the one action of quantizing the node)."""

SETTING_KEY = {"prune": "sparsity", "channels": "ratio", "factorize": "rank_ratio"}
"""The per-layer option each pass's levels set."""

_PASS_OPTIONS: dict[str, dict[str, Any]] = {
    "quantize": {"check_fusion": False},
    "prune": {"scope": "layer"},
    "channels": {"ratio": 0.0, "round_to": 1, "reconstruct": True},
    "factorize": {"rank_by": "ratio", "data_aware": True},
}
"""Options of the measured pass runs besides the per-layer ones. Sensitivity runs skip the fusion count and
cut channels one by one (the search rounds them with its own ``channels.round_to``), with the consumers
refit by least squares on the calibration data: a cut is judged by the error left after the cheapest repair
the search can apply to it, or the per-layer bound would drop cuts that repaired cost nothing. Every run
also takes the passes' `untimed_options`: no timing of this machine decides what a measured pass writes."""


@dataclasses.dataclass
class Action:
    """One pass on one layer at one level: the options that do it through the pass's ``layers``."""

    pass_name: str
    layer: str
    nodes: list[str]
    op: str
    level: int
    value: float
    macs: int | None
    consumers: list[str] = dataclasses.field(default_factory=list)
    """Nodes whose inputs the action narrows (a channel group's consumers): what distillation refits too."""

    @property
    def setting(self) -> dict[str, float]:
        key = SETTING_KEY.get(self.pass_name)
        return {key: self.value} if key else {}

    @property
    def label(self) -> str:
        return "int8" if self.pass_name == "quantize" else f"{SETTING_KEY[self.pass_name]} {self.value:g}"

    def options(self) -> dict[str, Any]:
        own = {glob.escape(n): {SKIP: False, **self.setting} for n in self.nodes}
        options = _PASS_OPTIONS[self.pass_name]
        return {**options, **untimed_options(self.pass_name, options), "layers": {"*": {SKIP: True}, **own}}


@dataclasses.dataclass
class Row(Action):
    """An action of the table with what measuring it gave (or why it was not measured)."""

    status: str = "not measured"
    error: float | None = None
    rel_l2: float | None = None
    macs_saved: int | None = None
    bytes_saved: int | None = None
    seconds: float = 0.0

    @property
    def measured(self) -> bool:
        return self.status == "measured"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["pass"] = out.pop("pass_name")
        out["label"] = self.label
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        d = {**d, "pass_name": d["pass"]}
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclasses.dataclass
class SensitivityTable:
    """The rows, with how they were measured."""

    rows: list[Row]
    metric: str
    feeds: int
    samples: int
    seconds: float
    taps_reused: int = 0
    layers_total: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def measured(self, pass_name: str) -> list[Row]:
        return [r for r in self.rows if r.pass_name == pass_name and r.measured]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "feeds": self.feeds, "samples": self.samples, "seconds": round(self.seconds, 3),
                "taps_reused": self.taps_reused, "layers_total": self.layers_total, "notes": list(self.notes),
                "levels": {k: list(v) for k, v in LEVELS.items()}, "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityTable:
        return cls([Row.from_dict(r) for r in d["rows"]], d["metric"], d["feeds"], d["samples"], d["seconds"],
                   d.get("taps_reused", 0), d.get("layers_total", 0), list(d.get("notes", [])))


# ---------------------------------------------------------------------------------- the actions
def why_no_layers(base: ir.Model) -> str:
    """Why `plan_actions` found no layer to act on, in one clause: quantized weights, layers only inside
    control-flow bodies (which the passes do not rewrite), or no linear layer at all."""
    quantized = inside = 0
    kernels: set[str] = set()
    for graph in iter_graphs(base.graph):
        for node in graph:
            if node.op_type in INTEGER_KERNELS:
                kernels.add(node.op_type)
            linear, _ = linear_of(node)
            if linear is None:
                continue
            if graph is not base.graph:
                inside += 1
            elif linear.weight.quantized:
                quantized += 1
    parts = []
    if quantized:
        parts.append(f"its {quantized} linear layer(s) are already quantized")
    if kernels:
        parts.append(f"it runs integer kernels already ({', '.join(sorted(kernels))})")
    if inside:
        parts.append(f"{inside} linear layer(s) sit inside If/Loop/Scan bodies, which tune does not search (the "
                     "quantize pass quantizes the If branches the calibration data takes: onnxopt MODEL --passes "
                     "fold,quantize --calib DATA)")
    return "no layer to act on: " + ("; ".join(parts) if parts else
                                     "no Conv, ConvTranspose, Gemm or MatMul with a constant weight")


def plan_actions(base: ir.Model, passes: Sequence[str], dims: dict[str, int], *, max_layers: int = 48,
                 coverage: float = 0.97) -> tuple[list[Action], int]:
    """The actions to measure, the heaviest layers first, and how many layers the model has.

    Layers are taken by MACs (parameters when unknown) until they hold `coverage` of the total or
    `max_layers` are taken."""
    macs = macs_by_node(base, dims)
    layers = []
    for node in base.graph:
        linear, _ = linear_of(node)
        if linear is None or not node.name or linear.weight.quantized:
            continue
        weight = macs.get(node.name) or linear.weight.size
        layers.append((node, linear, int(weight), macs.get(node.name)))
    ranked = sorted(layers, key=lambda item: -item[2])
    total = sum(item[2] for item in ranked) or 1
    chosen, held = [], 0
    for item in ranked:
        if len(chosen) >= max_layers or held >= coverage * total:
            break
        chosen.append(item)
        held += item[2]
    names = {node.name for node, *_ in chosen}
    actions: list[Action] = []
    groups = _channel_groups(base, dims, names) if "channels" in passes else {}
    for node, linear, _, node_macs in chosen:
        for pass_name in ("quantize", "factorize", "prune"):
            if pass_name not in passes or (pass_name == "factorize" and not _factorable(linear)):
                continue
            for level, value in enumerate(LEVELS[pass_name], 1):
                actions.append(Action(pass_name, node.name, [node.name], node.op_type, level, value, node_macs))
        group = groups.pop(node.name, None)
        if group is not None:
            for level, value in enumerate(LEVELS["channels"], 1):
                actions.append(Action("channels", group[0], group[1], "group", level, value, node_macs, group[2]))
    return actions, len(layers)


def _factorable(linear: Any) -> bool:
    """What factorize substitutes: ungrouped convs, Gemm without transA, MatMul with a 2-D weight."""
    if linear.weight.shared() or min(linear.weight.shape) < 2:
        return False
    if linear.node.op_type == "Gemm":
        return not linear.trans_a
    if linear.node.op_type == "MatMul":
        return len(linear.weight.shape) == 2
    return linear.node.op_type == "Conv" and linear.groups == 1


def _channel_groups(base: ir.Model, dims: dict[str, int], names: set[str]
                    ) -> dict[str, tuple[str, list[str], list[str]]]:
    """Prunable channel groups with a chosen layer among their producers: that layer -> (group, producers,
    consumers)."""
    out: dict[str, tuple[str, list[str], list[str]]] = {}
    try:
        groups = build_channel_graph(base.clone(), dims).groups()
    except OnnxoptError as exc:
        logger.debug("no channel groups: %s", exc)
        return out
    for g in groups:
        producers = [p.node.name for p in g.producers]
        if len(g.prunable()) < 4 or not producers or not all(producers):
            continue
        lead = next((n for n in producers if n in names), None)
        if lead is not None and lead not in out:
            out[lead] = (g.name, sorted(set(producers)), sorted({c.node.name for c in g.consumers if c.node.name}))
    return out


# ---------------------------------------------------------------------------------- measuring
class SharedTapsContext(Context):
    """A context that answers activation requests on an unchanged copy of `base` from `base`'s own
    tapping session (a copy shares the base's weights, so it computes what the base computes)."""

    def __init__(self, base: ir.Model, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.base_key = _structure(base)
        self.reused = 0

    def activations(self, model: ir.Model, names: Sequence[str], *, feeds: Dataset | None = None,
                    desc: str = "calibrating") -> Iterator[dict[str, np.ndarray]]:
        if model is not self.base and _structure(model) == self.base_key:
            self.reused += 1
            model = self.base
        return super().activations(model, names, feeds=feeds, desc=desc)


def _attr_key(attr: Any) -> Any:
    value = attr.value
    if isinstance(value, (int, float, str, bytes)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str, bytes)) for v in value):
        return tuple(value)
    return id(value)


def _node_key(node: ir.Node) -> tuple[Any, ...]:
    """What a node computes given its inputs: op, attributes, input names and the identity of constants."""
    inputs = tuple(
        ("", None) if v is None else (v.name, id(v.const_value) if v.const_value is not None else None)
        for v in node.inputs
    )
    attrs = tuple(sorted((k, _attr_key(a)) for k, a in node.attributes.items()))
    return node.domain, node.op_type, inputs, tuple(v.name for v in node.outputs), attrs


def _structure(model: ir.Model) -> tuple[Any, ...]:
    return tuple(_node_key(n) for n in model.graph)


def _has_subgraphs(model: ir.Model) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in model.graph for a in n.attributes.values())


def changed_suffix(base_keys: dict[str, tuple[Any, ...]], candidate: ir.Model) -> tuple[ir.Model, list[str]] | None:
    """The part of `candidate` that differs from the base and all it feeds, as a model whose inputs are the
    base tensors it reads (their names); None when nothing upstream could be skipped or it cannot be cut."""
    if _has_subgraphs(candidate):
        return None
    graph = candidate.graph
    same: set[int] = set()
    for node in graph:
        key = _node_key(node)
        upstream_same = all(v is None or v.producer() is None or id(v.producer()) in same for v in node.inputs)
        if upstream_same and node.outputs and base_keys.get(node.outputs[0].name or "") == key:
            same.add(id(node))
    if not same or len(same) == len(graph):
        return None
    cut: dict[str, ir.Value] = {}
    for node in graph:
        if id(node) in same:
            continue
        for v in node.inputs:
            if v is not None and v.const_value is None and v.name and (
                    v.is_graph_input() or (v.producer() is not None and id(v.producer()) in same)):
                cut.setdefault(v.name, v)
    for v in graph.outputs:
        if v.producer() is not None and id(v.producer()) in same:
            cut.setdefault(v.name, v)
    if not cut or set(cut) <= {v.name for v in graph.inputs}:
        return None
    try:
        sub = ir.convenience.extract(graph, inputs=list(cut.values()), outputs=list(graph.outputs))
    except ValueError as exc:
        logger.debug("cannot cut the changed part out: %s", exc)
        return None
    model = ir.Model(sub, ir_version=candidate.ir_version, producer_name="onnxopt-tune",
                     functions=list(candidate.functions.values()))
    return model, list(cut)


class _CutFeeds:
    """Base tensors for a cut, tapped once per distinct cut (the last one is kept)."""

    def __init__(self, ctx: SharedTapsContext, data: Dataset) -> None:
        self.ctx, self.data = ctx, data
        self.key: tuple[str, ...] | None = None
        self.feeds: list[dict[str, np.ndarray]] = []

    def get(self, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        key = tuple(sorted(names))
        if key != self.key:
            self.feeds = [dict(a) for a in self.ctx.activations(self.ctx.base, list(key), feeds=self.data,
                                                                   desc="sensitivity: tapping")]
            self.key = key
        return self.feeds


def measure_sensitivity(
    base: ir.Model,
    actions: Sequence[Action],
    reference: Reference,
    *,
    calib: Dataset,
    dims: dict[str, int],
    threads: int | None = None,
    max_seconds: float | None = None,
    layers_total: int = 0,
) -> SensitivityTable:
    """Measure every action alone on `base` (see the module doc) against `reference` (the base's outputs)."""
    t0 = time.perf_counter()
    ctx = SharedTapsContext(base, calib=calib, dims=dict(dims), threads=threads)
    base_keys = {n.outputs[0].name: _node_key(n) for n in base.graph if n.outputs and n.outputs[0].name}
    base_bytes = weight_bytes(base)
    cuts = _CutFeeds(ctx, reference.data)
    rows: list[Row] = []
    try:
        for action in progress(actions, desc="sensitivity", total=len(actions)):
            row = Row(**dataclasses.asdict(action))
            rows.append(row)
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                row.status = "not measured (time budget)"
                continue
            _measure(row, action, base, base_keys, base_bytes, ctx, cuts, reference, threads)
    finally:
        ctx.close()
    table = SensitivityTable(rows, reference.constraint.metric, len(reference.data), reference.data.num_samples,
                             time.perf_counter() - t0, ctx.reused, layers_total)
    skipped = sum(1 for r in rows if r.status.startswith("not measured"))
    if skipped:
        table.notes.append(f"{skipped} actions not measured: the sensitivity time budget ran out")
    return table


def _measure(row: Row, action: Action, base: ir.Model, base_keys: dict[str, tuple[Any, ...]], base_bytes: int,
             ctx: SharedTapsContext, cuts: _CutFeeds, reference: Reference, threads: int | None) -> None:
    t = time.perf_counter()
    candidate = base.clone()
    try:
        stats = run_pass(action.pass_name, candidate, ctx, **action.options())
        if not stats.modified:
            row.status = "no change"
            reason = next((s["reason"] for s in stats.skipped if s["node"] in action.nodes), None)
            if reason:
                row.status = f"no change: {reason}"
            return
        candidate.graph.sort()
        row.macs_saved = _macs_saved(action, stats.summary)
        row.bytes_saved = _bytes_saved(action, stats, base_bytes, candidate)
        suffix = changed_suffix(base_keys, candidate)
        model, feeds = (suffix[0], cuts.get(suffix[1])) if suffix is not None else (candidate, None)
        with temp_model_file(model) as path:
            measured = reference.measure(path, feeds=feeds, threads=threads)
        row.error, row.rel_l2, row.status = measured.error, measured.rel_l2, "measured"
    except OnnxoptError as exc:
        row.status = f"failed: {first_line(exc)}"
    finally:
        row.seconds = round(time.perf_counter() - t, 4)


def _macs_saved(action: Action, summary: dict[str, Any]) -> int | None:
    if action.pass_name == "quantize":
        return action.macs  # the MACs that now run in int8
    if "macs_before" in summary and "macs_after" in summary:
        return int(summary["macs_before"]) - int(summary["macs_after"])
    return 0 if action.pass_name == "prune" else None


def _bytes_saved(action: Action, stats: Any, base_bytes: int, candidate: ir.Model) -> int:
    if action.pass_name == "prune":  # zeros save bytes when stored sparse
        return int(sum(max(0, r["bytes"] - r["sparse_bytes"]) for r in stats.layers))
    return base_bytes - weight_bytes(candidate)
