"""The data a drawn report needs beyond the before/after table: per-layer figures, output
distributions and profiles. Gathered only when a report is asked for (`collect_details`).

Per layer
    A layer is a main-graph node with weights (a float constant of two or more values, an
    initializer or a Constant node's, or a DequantizeLinear of a constant), in graph order. It is
    paired with the node of the same name in the optimized model; its parameters, MACs and weight
    bytes are counted in both. Its error is the error of *its tensor* in the optimized model
    against the original's on the evaluation feeds (relative L2, cosine, max abs). Names survive
    by contract, so that tensor is found by name: the optimized node's output when the original
    has a tensor of that name (after ``fold`` a Conv takes over the name of the BatchNorm/Relu it
    absorbed), else the layer's own output, else the first tensor downstream of it, along
    single-consumer nodes, that both models have. In the optimized model a tensor that was
    rewritten is read through its stand-in: the value that records it as ``onnxopt.origin``, or
    the output of the QuantizeLinear→DequantizeLinear pair right after it (what the next layer
    reads). Tapping a tensor makes it a graph output of a copy of the model, which keeps ONNX
    Runtime from fusing across it, so a quantized model is measured in its QDQ form there (equal
    to the fused kernels up to requantization rounding).

Per output
    The histogram of ``|optimized − original|`` over every value, on fixed log-spaced bins, with
    exact zeros counted apart, and an evenly spread subsample of (original, optimized) pairs for
    a scatter plot (at most `SCATTER_POINTS`, rounded to 5 significant digits).

Profiles
    `onnxopt.profile.profile_model` on each model, on the first evaluation feed.

Each section is a dict; a section without data holds only ``{"missing": "why"}``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import io
from onnxopt.analysis.stats import dim_values, infer_shapes, node_macs
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError, first_line
from onnxopt.graph import ORIGIN, is_onnx_op
from onnxopt.progress import progress
from onnxopt.runtime import TapSession
from onnxopt.validate import OutputAccumulator

__all__ = [
    "collect_details",
    "compare_details",
    "bench_details",
    "layer_sections",
    "profile_section",
    "SCATTER_POINTS",
    "PROFILE_RUNS",
    "HIST_LOG10_MIN",
    "HIST_LOG10_MAX",
    "HIST_BINS_PER_DECADE",
    "TAP_BUDGET_BYTES",
]

logger = logging.getLogger(__name__)

SCATTER_POINTS = 2000
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS_PER_DECADE = -12, 6, 4
TAP_BUDGET_BYTES = 512 << 20
"""Tensors tapped in one run of a model, at most (estimated from shapes): more take several runs."""

_CHAIN_STEPS = 8


# ====================================================================== layers and their counts
@dataclasses.dataclass
class _Layer:
    node: ir.Node
    key: str
    params: int
    bytes: int
    macs: int | None


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer or of a Constant node's output (weights of older exports), else None."""
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except (ValueError, TypeError):
        return None


def _weight_parts(value: ir.Value | None) -> tuple[int, int] | None:
    """(parameters, bytes) of a weight input: a float constant of 2+ values or a dequantized constant."""
    t = _const(value)
    if t is not None:
        return (t.size, t.nbytes) if t.dtype.is_floating_point() and t.size > 1 else None
    dq = value.producer() if value is not None else None
    if not is_onnx_op(dq, "DequantizeLinear") or _const(dq.inputs[0]) is None:
        return None
    parts = [t for t in (_const(v) for v in dq.inputs) if t is not None]
    return parts[0].size, sum(t.nbytes for t in parts)


def _layers(model: ir.Model, dims: dict[str, int]) -> list[_Layer]:
    """Main-graph nodes with weights, in graph order."""
    out = []
    for i, node in enumerate(model.graph):
        if is_onnx_op(node, "QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        parts = [p for p in (_weight_parts(v) for v in node.inputs) if p is not None]
        if not parts:
            continue
        macs = node_macs(node, dims)
        out.append(_Layer(node, node.name or f"{node.op_type}_{i}", sum(p for p, _ in parts),
                          sum(b for _, b in parts), None if macs is None else int(macs)))
    return out


def _paired_rows(before: list[_Layer], after: list[_Layer]) -> list[tuple[_Layer | None, _Layer | None]]:
    """Layers paired by node name, in the original's order; a new layer follows the last paired one
    before it in the optimized graph."""
    after_by_key = {lay.key: lay for lay in after if lay.node.name}
    paired = {lay.key for lay in before if lay.node.name and lay.key in after_by_key}
    inserted: dict[str | None, list[_Layer]] = {}
    anchor: str | None = None
    for lay in after:
        if lay.key in paired:
            anchor = lay.key
        else:
            inserted.setdefault(anchor, []).append(lay)
    rows: list[tuple[_Layer | None, _Layer | None]] = [(None, lay) for lay in inserted.get(None, [])]
    for lay in before:
        rows.append((lay, after_by_key.get(lay.key) if lay.key in paired else None))
        if lay.key in paired:
            rows.extend((None, new) for new in inserted.get(lay.key, []))
    return rows


# ====================================================================== which tensor to compare
class _Names:
    """Tensor lookup in one model: by name, and (optimized side) by the name a stand-in records."""

    def __init__(self, model: ir.Model) -> None:
        g = model.graph
        self.by_name: dict[str, ir.Value] = {v.name: v for v in g.inputs if v.name}
        self.by_origin: dict[str, ir.Value] = {}
        for node in g:
            for v in node.outputs:
                if not v.name:
                    continue
                self.by_name[v.name] = v
                origin = v.metadata_props.get(ORIGIN)
                if origin and origin != v.name:
                    self.by_origin[origin] = v

    def has(self, name: str) -> bool:
        return name in self.by_name

    def stand_in(self, name: str) -> ir.Value | None:
        """The value that carries tensor `name` onward in this model, or None."""
        v = self.by_origin.get(name)
        if v is not None:
            return v
        v = self.by_name.get(name)
        if v is None:
            return None
        uses = list(v.uses())
        if len(uses) == 1 and not v.is_graph_output() and is_onnx_op(uses[0].node, "QuantizeLinear"):
            q_uses = list(uses[0].node.outputs[0].uses())
            if len(q_uses) == 1 and is_onnx_op(q_uses[0].node, "DequantizeLinear"):
                return q_uses[0].node.outputs[0]
        return v


def _downstream(node: ir.Node) -> list[str]:
    """`node`'s first output and the tensors after it along nodes that are its only consumer."""
    names = []
    value = node.outputs[0] if node.outputs else None
    for _ in range(_CHAIN_STEPS):
        if value is None or not value.name:
            break
        names.append(value.name)
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output() or not uses[0].node.outputs:
            break
        value = uses[0].node.outputs[0]
    return names


def _float_value(v: ir.Value | None) -> bool:
    return v is not None and (v.dtype is None or v.dtype.is_floating_point())


def _pick_tensor(before: _Layer | None, after: _Layer | None, orig: _Names, opt: _Names) -> tuple[str, str] | str:
    """(tensor name, optimized value name) to compare for one row, or the reason there is none."""
    candidates: list[str] = []
    if after is not None and after.node.outputs:
        candidates.append(after.node.outputs[0].name)
    if before is not None:
        candidates.extend(_downstream(before.node))
    for name in dict.fromkeys(c for c in candidates if c):
        if not orig.has(name) or not _float_value(orig.by_name[name]):
            continue
        v = opt.stand_in(name)
        if v is not None and v.name and _float_value(v):
            return name, v.name
    if before is None:
        return "a new layer: the original has no tensor of the same name"
    return "no tensor of this layer (or after it) kept its name in the optimized model"


# ====================================================================== streaming statistics
def _hist_edges() -> np.ndarray:
    n = (HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_BINS_PER_DECADE
    return np.logspace(HIST_LOG10_MIN, HIST_LOG10_MAX, n + 1)


class _Distribution:
    """|error| histogram on fixed log bins and a subsample of (original, optimized) pairs, streamed."""

    def __init__(self, feeds: int) -> None:
        self.edges = _hist_edges()
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.zeros = self.below = self.above = self.values = 0
        self.per_feed = max(1, math.ceil(SCATTER_POINTS / max(1, feeds)))
        self.a: list[float] = []
        self.b: list[float] = []

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a64 = np.asarray(a, dtype=np.float64).ravel()
        b64 = np.asarray(b, dtype=np.float64).ravel()
        err = np.abs(b64 - a64)
        finite = err[np.isfinite(err)]
        self.values += err.size
        self.zeros += int(np.count_nonzero(finite == 0))
        nz = finite[finite > 0]
        self.below += int(np.count_nonzero(nz < self.edges[0]))
        self.above += int(np.count_nonzero(nz > self.edges[-1]) + (err.size - finite.size))
        self.counts += np.histogram(nz, bins=self.edges)[0]
        if a64.size:
            idx = np.unique(np.linspace(0, a64.size - 1, min(self.per_feed, a64.size)).round().astype(np.int64))
            self.a.extend(a64[idx].tolist())
            self.b.extend(b64[idx].tolist())

    def to_dict(self, name: str) -> dict[str, Any]:
        nonzero = np.flatnonzero(self.counts)
        lo, hi = (int(nonzero[0]), int(nonzero[-1]) + 1) if nonzero.size else (0, 0)
        keep = np.unique(np.linspace(0, len(self.a) - 1, min(SCATTER_POINTS, len(self.a))).round().astype(int)) \
            if self.a else np.zeros(0, dtype=int)
        return {
            "name": name,
            "values": self.values,
            "hist": {
                "log10_min": HIST_LOG10_MIN + lo / HIST_BINS_PER_DECADE,
                "bins_per_decade": HIST_BINS_PER_DECADE,
                "counts": self.counts[lo:hi].tolist(),
                "zeros": self.zeros,
                "below": self.below,
                "above": self.above,
            },
            "scatter": {
                "original": [_round(self.a[i]) for i in keep],
                "optimized": [_round(self.b[i]) for i in keep],
            },
        }


def _round(x: float) -> float | None:
    return float(f"{x:.5g}") if math.isfinite(x) else None


# ====================================================================== tapping both models
def _estimated_bytes(value: ir.Value, batch: int, dims: dict[str, int]) -> int:
    shape = dim_values(value.shape, dims) if value.shape is not None else None
    itemsize = np.dtype(value.dtype.numpy()).itemsize if value.dtype is not None else 4
    if shape is None:
        return 1 << 20
    if value.shape.dims and not isinstance(value.shape.dims[0], int):
        shape[0] = max(shape[0], batch)
    return math.prod(shape) * itemsize


def _groups(
    items: Sequence[tuple[str, str]], orig: _Names, batch: int, dims: dict[str, int]
) -> list[list[tuple[str, str]]]:
    """Tensor pairs grouped so that one feed's tensors of a group (both models) fit `TAP_BUDGET_BYTES`."""
    groups: list[list[tuple[str, str]]] = [[]]
    used = 0
    for a, b in items:
        size = 2 * _estimated_bytes(orig.by_name[a], batch, dims)
        if groups[-1] and used + size > TAP_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append((a, b))
        used += size
    return groups


def _batch_of(data: Dataset) -> int:
    first = next(iter(data.feeds[0].values()))
    return int(first.shape[0]) if first.ndim else 1


def _tap_pairs(
    original: ir.Model,
    optimized: ir.Model,
    pairs: list[tuple[str, str]],
    outputs: list[str],
    data: Dataset,
    *,
    threads: int | None,
    dims: dict[str, int],
    orig: _Names,
) -> tuple[dict[tuple[str, str], OutputAccumulator | None], dict[str, _Distribution]]:
    """Error sums per (original tensor, optimized tensor) pair (None: shapes differ) and distributions
    per model output, from one run of each model per feed and group of tensors."""
    sums: dict[tuple[str, str], OutputAccumulator | None] = {p: OutputAccumulator(p[0]) for p in pairs}
    dists = {name: _Distribution(len(data)) for name in outputs}
    items = list(dict.fromkeys([(o, o) for o in outputs] + list(pairs)))
    for group in _groups(items, orig, _batch_of(data), dims):
        names_a = list(dict.fromkeys(a for a, _ in group))
        names_b = list(dict.fromkeys(b for _, b in group))
        with TapSession(original, names_a, threads=threads) as ta, \
                TapSession(optimized, names_b, threads=threads) as tb:
            for feed in progress(data.feeds, desc="tapping layers", total=len(data)):
                ra, rb = ta.run(feed, names_a), tb.run(feed, names_b)
                for a, b in group:
                    if a == b and a in dists:
                        dists[a].add(ra[a], rb[b])
                    acc = sums.get((a, b))
                    if acc is None:
                        continue
                    try:
                        acc.add(np.asarray(ra[a]), np.asarray(rb[b]))
                    except OnnxoptError:  # the shapes differ: no error to give
                        sums[(a, b)] = None
    return sums, dists


# ====================================================================== sections
def _row(before: _Layer | None, after: _Layer | None) -> dict[str, Any]:
    lay = before or after
    assert lay is not None
    return {
        "name": lay.key,
        "op": before.node.op_type if before else None,
        "op_after": after.node.op_type if after else None,
        "status": "new" if before is None else ("kept" if after is not None else "removed"),
        "params_before": before.params if before else 0,
        "params_after": after.params if after else 0,
        "macs_before": before.macs if before else 0,
        "macs_after": after.macs if after else 0,
        "bytes_before": before.bytes if before else 0,
        "bytes_after": after.bytes if after else 0,
    }


def layer_sections(
    original: ir.Model,
    optimized: ir.Model,
    data: Dataset | None,
    *,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    no_data: str = "no evaluation data",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``layers`` and ``distributions`` sections for two models with the same inputs and outputs
    (shapes are inferred in place on both)."""
    dims = dict(dims or {})
    infer_shapes(original)
    infer_shapes(optimized)
    rows_of = _paired_rows(_layers(original, dims), _layers(optimized, dims))
    orig, opt = _Names(original), _Names(optimized)
    picks = [_pick_tensor(b, a, orig, opt) for b, a in rows_of]
    rows = [_row(b, a) for b, a in rows_of]
    out_values = [v for v in original.graph.outputs if v.name]
    outputs = [v.name for v in out_values if _float_value(v) and opt.has(v.name)]
    pairs = list(dict.fromkeys(p for p in picks if isinstance(p, tuple)))
    layers: dict[str, Any] = {"rows": rows}
    dists: dict[str, Any] = {}
    if data is None or len(data) == 0:
        for row, pick in zip(rows, picks):
            row["tensor"], row["error_missing"] = (pick[0] if isinstance(pick, tuple) else None), no_data
        return {**layers, "missing_errors": no_data}, {"missing": no_data}
    sums, distributions = _tap_pairs(original, optimized, pairs, outputs, data, threads=threads, dims=dims,
                                     orig=orig)
    for row, pick in zip(rows, picks):
        row["tensor"] = pick[0] if isinstance(pick, tuple) else None
        acc = sums.get(pick) if isinstance(pick, tuple) else None
        if acc is None:
            row["error_missing"] = pick if isinstance(pick, str) else "the tensor's shapes differ between the models"
            continue
        diff = acc.result()
        row.update(rel_l2=diff.rel_l2, cosine=diff.cosine, max_abs=diff.max_abs)
    layers.update(feeds=len(data), samples=data.num_samples, source=data.source)
    dists = {
        "feeds": len(data),
        "source": data.source,
        "outputs": [distributions[v.name].to_dict(v.name) if v.name in distributions
                    else {"name": v.name, "missing": "not a float output" if not _float_value(v)
                          else "the optimized model has no output of this name"}
                    for v in out_values],
    }
    return layers, dists


def profile_section(
    models: Sequence[tuple[str, str | os.PathLike[str]]],
    data: Dataset | None,
    *,
    runs: int,
    threads: int | None = None,
    no_runs: str = "timing skipped (no runs asked for)",
) -> dict[str, Any]:
    """ONNX Runtime profiles of (label, model file) pairs on the first feed of `data`."""
    from onnxopt.profile import profile_model

    if runs < 1:
        return {"missing": no_runs}
    if data is None or len(data) == 0:
        return {"missing": "no feed to run the models on"}
    feed = data.feeds[0]
    profiles = []
    try:
        for label, path in progress(list(models), desc="profiling"):
            profiles.append(profile_model(path, feed, runs=runs, threads=threads, label=label).to_dict())
    except (OnnxoptError, ValueError, OSError) as exc:
        logger.warning("profiling failed: %s", first_line(exc))
        return {"missing": f"ONNX Runtime's profiler failed: {first_line(exc)}"}
    return {"threads": threads, "batch": _batch_of(data), "models": profiles}


PROFILE_RUNS = 20
"""Profiled runs per model at most (fewer when the run's --bench-runs is smaller)."""


def collect_details(
    original: str | os.PathLike[str],
    optimized: ir.Model,
    optimized_path: str | os.PathLike[str],
    data: Dataset | None,
    *,
    validate: bool = True,
    bench_runs: int = 0,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``layers``, ``distributions`` and ``profile`` sections of an optimize run's report.

    `optimized` is the model in memory (its tensors keep their ``onnxopt.origin`` records) and
    `optimized_path` its saved file (profiled as written).
    """
    teacher = io.load(Path(original), check=False)
    layers, dists = layer_sections(teacher, optimized, data if validate else None, threads=threads, dims=dims,
                                   no_data="validation skipped with --no-validate")
    profile = profile_section([("original", original), ("optimized", optimized_path)], data,
                              runs=min(bench_runs, PROFILE_RUNS), threads=threads,
                              no_runs="timing skipped with --bench-runs 0")
    return {"layers": layers, "distributions": dists, "profile": profile}


def compare_details(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    data: Dataset,
    *,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The ``layers`` and ``distributions`` sections for two model files (``onnxopt compare``)."""
    a, b = io.load(Path(path_a), check=False), io.load(Path(path_b), check=False)
    layers, dists = layer_sections(a, b, data, threads=threads, dims=dims)
    return {"layers": layers, "distributions": dists}


def bench_details(
    paths: Sequence[str | os.PathLike[str]],
    data: Dataset | None,
    *,
    runs: int,
    threads: int | None = None,
    dims: dict[str, int] | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """The ``profile`` section for the models of ``onnxopt bench`` (labelled by file name), on the
    first feed of `data`, else on one random feed as `onnxopt.bench` times them."""
    if data is None:
        from onnxopt.data import input_specs, load_data

        data = load_data("random:1", input_specs(io.load(Path(paths[0]), check=False)), dims=dims or {}, batch=batch)
    labels = [Path(p).name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]
    return {"profile": profile_section(list(zip(labels, paths)), data, runs=min(runs, PROFILE_RUNS),
                                       threads=threads)}
