"""factorize: replace weight-heavy Conv, Gemm and MatMul nodes by thinner low-rank chains.

Rewrite cases (the weight is a float constant initializer used by this node only):

1. ``Gemm`` (``transA=0``) and ``MatMul`` with a constant 2-D right operand compute ``y = x W (+ c)``
   with ``W`` [K, N] (for Gemm ``W = alpha·B`` or ``alpha·Bᵀ``). A truncated SVD ``W ≈ A B``,
   ``A = U_r √S_r`` [K, r], ``B = √S_r V_rᵀ`` [r, N], becomes two Gemm / MatMul nodes; the bias ``c``
   and ``beta`` stay on the second (below opset 11, where Gemm needs C, a stage without one is a
   MatMul). MACs per row: ``K·N → r·(K + N)``.
2. ``Conv`` 1×1 (group 1), either method: the same SVD of ``W`` [Cin, Cout] as a 1×1 conv Cin→r that
   carries the strides, pads and ``auto_pad`` (a 1×1 kernel reads no neighbours, and a bias-free
   projection of a zero pad is zero) and a 1×1 conv r→Cout with the bias.
3. ``Conv`` k×k, ``method=tucker``: Tucker-2 of ``w`` [Cout, Cin, k...] along its channel modes:
   1×1 (Cin→r1), k×k core (r1→r2, with the original strides, pads, ``auto_pad`` and dilations),
   1×1 (r2→Cout, with the bias). A mode kept at full rank drops its 1×1 stage. Any spatial rank.
4. ``Conv`` kh×kw (2-D), ``method=spatial``: SVD of ``M[(c,i),(o,j)] = w[o,c,i,j]`` [Cin·kh, Cout·kw]
   gives a kh×1 conv (Cin→r; stride, dilation and pads of the height axis) then a 1×kw conv (r→Cout;
   those of the width axis, and the bias). ``auto_pad`` carries over unchanged: along the axis where
   a stage has kernel 1 and stride 1, SAME adds no padding.

Grouped and depthwise convolutions are left alone (a cross-group factor would break the grouping),
and so are layers inside If/Loop/Scan bodies (listed as skipped with that reason).

Rank choice: ``rank_by=ratio`` keeps ``rank_ratio`` of each full rank; ``energy`` the smallest rank
that keeps that fraction of squared singular values (per mode for Tucker); ``macs`` starts from the
unfactored model and repeatedly takes the step (one layer to its next lower rank) that loses the
least energy per MAC saved, until the model's MACs reach ``macs_target``. Ranks are rounded up to a
multiple of ``round_to``. A layer is substituted only when its MACs (parameters when shapes are
unknown) drop by at least ``min_saving``; otherwise it is listed as skipped with the numbers.

``data_aware=true`` (needs calibration data) decomposes in the space the layer sees: every weight is
whitened by the second moment ``E[xᵀx] = L Lᵀ`` of its input (input channels, or vertical patches
for the spatial method) and Tucker's output mode uses ``E[y yᵀ]`` of the layer output, so at equal
rank the truncation minimises the error of the layer's output on data instead of on the weights
(see ``_lowrank``). ``verify_speed=true`` times each candidate alone in ONNX Runtime (the layer and its chain
as two one-input models at the layer's input shape, interleaved runs) and keeps only the substitutions
that run at least ``min_speedup`` faster.

Names survive: the last node of a chain takes the original node's name and output name; new weights
record the original weight name as their origin.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from onnxopt.analysis import infer_shapes
from onnxopt.analysis.stats import dim_values, macs_by_node
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import UsageError
from onnxopt.graph import (
    all_names,
    constant_array,
    new_initializer,
    only_used_by,
    opset_version,
    take_over_output,
    unique_name,
)
from onnxopt.io import is_constant, iter_graphs
from onnxopt.progress import progress
from onnxopt.registry import Pass, PassStats, matches_any, option, register_pass

from . import _lowrank as lr

__all__ = ["Factorize", "FACTORIZED"]

logger = logging.getLogger(__name__)

FACTORIZED = "onnxopt.factorized"
"""Metadata prop on every node a substitution creates (value: the substitution kind)."""

Ranks = tuple[int, ...]


# ------------------------------------------------------------------------------ the pass
@register_pass("factorize")
class Factorize(Pass):
    """Low-rank substitution of Conv, Gemm and MatMul (SVD, Tucker-2, spatial) where it pays."""

    exact = False
    idempotent = False

    method: Literal["tucker", "spatial"] = option("tucker", "k×k convs: tucker (1×1, k×k, 1×1) or spatial (k×1, 1×k)")
    rank_by: Literal["ratio", "energy", "macs"] = option(
        "energy", "rank choice: ratio (rank_ratio), energy (keep that energy), macs (global macs_target)")
    rank_ratio: float = option(0.5, "rank_by=ratio: fraction of each full rank to keep, in (0, 1]")
    energy: float = option(0.9, "rank_by=energy: fraction of squared singular values to keep, in (0, 1]")
    macs_target: float = option(0.5, "rank_by=macs: fraction of the model's MACs to reach, in (0, 1]")
    round_to: int = option(4, "round ranks up to a multiple of this (>= 1)")
    min_saving: float = option(
        0.2, "substitute only if a layer's MACs drop by this fraction, in [-1, 1) (below 0 lets layers grow)")
    data_aware: bool = option(False, "whiten by calibration activations (needs --calib)")
    damping: float = option(0.01, "data_aware: ridge added to the activation second moment, × its mean diagonal")
    verify_speed: bool = option(False, "time each candidate in ONNX Runtime; keep only faster substitutions")
    verify_runs: int = option(30, "verify_speed: timed runs per layer (>= 3)")
    min_speedup: float = option(0.05, "verify_speed: keep a layer only if this fraction faster alone, in [0, 1)")
    exclude: list[str] = option([], "node names (globs) or op types to leave alone")

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method in ("tucker", "spatial"), "tucker or spatial"),
            ("rank_by", self.rank_by in ("ratio", "energy", "macs"), "ratio, energy or macs"),
            ("rank_ratio", 0.0 < self.rank_ratio <= 1.0, "a number in (0, 1]"),
            ("energy", 0.0 < self.energy <= 1.0, "a number in (0, 1]"),
            ("macs_target", 0.0 < self.macs_target <= 1.0, "a number in (0, 1]"),
            ("round_to", self.round_to >= 1, "an integer >= 1"),
            ("min_saving", -1.0 <= self.min_saving < 1.0, "a number in [-1, 1)"),
            ("damping", self.damping >= 0.0, "a number >= 0"),
            ("verify_runs", self.verify_runs >= 3, "an integer >= 3"),
            ("min_speedup", 0.0 <= self.min_speedup < 1.0, "a number in [0, 1)"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise UsageError(f"factorize.{key}: {getattr(self, key)!r} is not allowed (allowed: {allowed})")

    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        ctx = ctx or Context()
        stats = PassStats()
        infer_shapes(model)
        layers = self._collect(model, ctx, stats)
        if self.data_aware:
            calib = ctx.require_calib("factorize data_aware=true")
            if layers:
                _gather_moments(model, ctx, layers, calib)
        for layer in progress(layers, desc="factorize: decomposing"):
            layer.decompose(self.damping if self.data_aware else None)
        chosen = self._choose(model, ctx, layers, stats)
        if self.verify_speed:
            chosen = _keep_faster(chosen, model, ctx, self.verify_runs, 1.0 - self.min_speedup, stats)
        for layer, ranks in chosen:
            stats.layers.append(layer.row(ranks, self.data_aware))
            _apply(model.graph, layer, ranks)
        stats.modified = bool(chosen)
        stats.summary = _summary(stats.layers, self)
        return stats

    # -------------------------------------------------------------------------- candidates
    def _collect(self, model: ir.Model, ctx: Context, stats: PassStats) -> list[_Layer]:
        layers: list[_Layer] = []
        for node in list(model.graph):
            if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
                continue
            if node.metadata_props.get(FACTORIZED):
                stats.skip(node, "already factorized")
                continue
            if matches_any(node, self.exclude):
                stats.skip(node, "excluded by factorize.exclude")
                continue
            result = _try_layer(node, self.method, ctx.dims)
            if isinstance(result, str):
                stats.skip(node, result)
            else:
                layers.append(result)
        for graph in iter_graphs(model.graph):
            if graph is model.graph:
                continue
            for node in graph:
                if node.op_type in ("Conv", "Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
                    stats.skip(node, "inside an If/Loop/Scan body; only main-graph layers are factorized")
        if not layers and not stats.skipped:
            stats.notes.append("factorize: no Conv, Gemm or MatMul in the model; the model is unchanged")
        return layers

    # -------------------------------------------------------------------------- rank choice
    def _choose(self, model: ir.Model, ctx: Context, layers: list[_Layer],
                stats: PassStats) -> list[tuple[_Layer, Ranks]]:
        if self.rank_by == "macs":
            return self._choose_by_macs(model, ctx, layers, stats)
        chosen = []
        for layer in layers:
            if self.rank_by == "ratio":
                ranks = layer.ranks_for_ratio(self.rank_ratio, self.round_to)
            else:
                ranks = layer.ranks_for_energy(self.energy, self.round_to)
            reason = _try_saving(layer, ranks, self.min_saving)
            if reason:
                stats.skip(layer.node, reason)
            else:
                chosen.append((layer, ranks))
        return chosen

    def _choose_by_macs(self, model: ir.Model, ctx: Context, layers: list[_Layer],
                        stats: PassStats) -> list[tuple[_Layer, Ranks]]:
        total = sum(m for m in macs_by_node(model, ctx.dims).values() if m)
        target = self.macs_target * total
        for layer in [la for la in layers if not la.shapes_known]:
            stats.skip(layer.node, "shapes unknown, so its MACs cannot count toward macs_target")
        layers = [la for la in layers if la.shapes_known]
        ladders = [_ladder(layer, self.round_to, self.min_saving) for layer in layers]
        position = [-1] * len(layers)
        heap: list[tuple[float, int]] = []
        for i, ladder in enumerate(ladders):
            if ladder:
                heapq.heappush(heap, (_step_price(layers[i], ladders[i], -1), i))
            else:
                cheapest = min(layers[i].grid(self.round_to), key=layers[i].cost)
                stats.skip(layers[i].node, _try_saving(layers[i], cheapest, self.min_saving) or "no rank saves enough")
        current = total
        while current > target and heap:
            _, i = heapq.heappop(heap)
            before = layers[i].orig_cost if position[i] < 0 else layers[i].cost(ladders[i][position[i]])
            position[i] += 1
            current -= before - layers[i].cost(ladders[i][position[i]])
            if position[i] + 1 < len(ladders[i]):
                heapq.heappush(heap, (_step_price(layers[i], ladders[i], position[i]), i))
        if current > target:
            stats.notes.append(f"factorize: macs_target {self.macs_target:g} not reached; "
                               f"the model keeps {current / max(total, 1):.1%} of its MACs at the lowest ranks")
        chosen = []
        for i, layer in enumerate(layers):
            if position[i] >= 0:
                chosen.append((layer, ladders[i][position[i]]))
            elif ladders[i]:
                stats.skip(layer.node, "not needed to reach macs_target")
        return chosen


def _summary(rows: list[dict[str, Any]], p: Factorize) -> dict[str, Any]:
    summary: dict[str, Any] = {"layers_factorized": len(rows), "method": p.method, "rank_by": p.rank_by,
                               "data_aware": p.data_aware}
    if rows:
        summary["params_before"] = sum(r["params_before"] for r in rows)
        summary["params_after"] = sum(r["params_after"] for r in rows)
        known = [r for r in rows if r["macs_before"] is not None]
        summary["macs_before"] = sum(r["macs_before"] for r in known)
        summary["macs_after"] = sum(r["macs_after"] for r in known)
    return summary


def _try_saving(layer: _Layer, ranks: Ranks, min_saving: float) -> str | None:
    """None when `ranks` save enough; else the reason the layer stays."""
    cost = layer.cost(ranks)
    limit = (1.0 - min_saving) * layer.orig_cost
    if cost <= limit and layer.orig_cost > 0:
        return None
    unit = "MACs" if layer.shapes_known else "parameters"
    return (f"rank {'x'.join(map(str, ranks))} would keep {cost / max(layer.orig_cost, 1):.0%} of its {unit} "
            f"(needs <= {1.0 - min_saving:.0%})")


def _ladder(layer: _Layer, round_to: int, min_saving: float) -> list[Ranks]:
    """Rank choices that save enough, from the most expensive to the cheapest."""
    options = [r for r in layer.grid(round_to) if _try_saving(layer, r, min_saving) is None]
    return sorted(options, key=layer.cost, reverse=True)


def _step_price(layer: _Layer, ladder: list[Ranks], at: int) -> float:
    """Energy lost per MAC saved by moving one step down `ladder` from position `at` (-1: unfactored)."""
    cost_now = layer.orig_cost if at < 0 else layer.cost(ladder[at])
    lost_now = 0.0 if at < 0 else layer.lost(ladder[at])
    nxt = ladder[at + 1]
    saved = cost_now - layer.cost(nxt)
    return (layer.lost(nxt) - lost_now) / saved if saved > 0 else math.inf


def _round_rank(value: float, full: int, round_to: int) -> int:
    rank = max(1, math.ceil(value - 1e-9))
    rank = math.ceil(rank / round_to) * round_to
    return max(1, min(full, rank))


def _steps(full: int, round_to: int) -> list[int]:
    return sorted({min(full, r) for r in range(round_to, full + round_to, round_to)})


# ------------------------------------------------------------------------------ layers
@dataclasses.dataclass
class _Stage:
    """One node of a substitution (or of an original layer, for timing)."""

    op_type: str
    weight: np.ndarray
    attrs: dict[str, Any]
    suffix: str


@dataclasses.dataclass
class _Conv:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str

    def attrs(self, axes: str = "all") -> dict[str, Any]:
        """Attributes of the whole conv, or of its height (`h`) / width (`w`) part for spatial stages."""
        n = len(self.kernel)
        if axes == "all":
            out: dict[str, Any] = {"kernel_shape": self.kernel, "strides": self.strides, "dilations": self.dilations}
            pads = self.pads
        else:
            keep = 0 if axes == "h" else 1
            pick = [i == keep for i in range(n)]
            out = {
                "kernel_shape": tuple(k if p else 1 for k, p in zip(self.kernel, pick)),
                "strides": tuple(s if p else 1 for s, p in zip(self.strides, pick)),
                "dilations": tuple(d if p else 1 for d, p in zip(self.dilations, pick)),
            }
            pads = tuple(v if pick[i % n] else 0 for i, v in enumerate(self.pads))
        if self.auto_pad != "NOTSET":
            out["auto_pad"] = self.auto_pad
        elif any(pads):
            out["pads"] = pads
        return out

    def pointwise(self) -> dict[str, Any]:
        return {"kernel_shape": (1,) * len(self.kernel)}


class _Layer:
    """A candidate node with its weight, geometry and costs; subclasses know one decomposition."""

    kind = ""

    def __init__(self, node: ir.Node, weight: np.ndarray, dims: dict[str, int]) -> None:
        self.node = node
        self.raw = weight
        self.dtype = weight.dtype
        self.moments: dict[str, lr.Moments] = {}
        self.in_shape = dim_values(node.inputs[0].shape, dims)
        self.out_shape = dim_values(node.outputs[0].shape, dims)
        self.shapes_known = self.in_shape is not None and self.out_shape is not None
        self.speed_ratio: float | None = None

    # the decomposition interface; `ranks` is () for the original layer
    def full_ranks(self) -> Ranks:
        raise NotImplementedError

    def grid(self, round_to: int) -> list[Ranks]:
        raise NotImplementedError

    def ranks_for_ratio(self, ratio: float, round_to: int) -> Ranks:
        raise NotImplementedError

    def ranks_for_energy(self, energy: float, round_to: int) -> Ranks:
        raise NotImplementedError

    def cost(self, ranks: Ranks) -> int:
        raise NotImplementedError

    def params(self, ranks: Ranks) -> int:
        raise NotImplementedError

    def lost(self, ranks: Ranks) -> float:
        raise NotImplementedError

    def stages(self, ranks: Ranks) -> list[_Stage]:
        raise NotImplementedError

    def tap_names(self) -> list[str]:
        raise NotImplementedError

    def accumulate(self, acts: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def decompose(self, damping: float | None) -> None:
        raise NotImplementedError

    @property
    def orig_cost(self) -> int:
        return self.cost(())

    def original_stage(self) -> _Stage:
        attrs = {k: a.value for k, a in self.node.attributes.items()}
        return _Stage(self.node.op_type, self.raw, attrs, "orig")

    def bias(self) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[2] if len(inputs) > 2 else None

    def row(self, ranks: Ranks, data_aware: bool) -> dict[str, Any]:
        lost = self.lost(ranks)
        return {
            "node": self.node.name or self.node.outputs[0].name,
            "op": self.node.op_type,
            "kind": self.kind,
            "weight_shape": list(self.raw.shape),
            "ranks": list(ranks),
            "params_before": int(self.raw.size),
            "params_after": self.params(ranks),
            "macs_before": self.orig_cost if self.shapes_known else None,
            "macs_after": self.cost(ranks) if self.shapes_known else None,
            "energy_kept": round(1.0 - lost, 6),
            "est_rel_error": round(math.sqrt(lost), 6),
            "error_of": "output on calibration data" if data_aware else "weight",
            "speed_ratio": None if self.speed_ratio is None else round(self.speed_ratio, 3),
        }


def _positions(shape: list[int] | None, skip_last: bool = False) -> int:
    """Rows a MatMul sees (all but the last axis) or positions of a conv map (N × spatial)."""
    if shape is None:
        return 1
    if skip_last:
        return math.prod(shape[:-1]) if len(shape) > 1 else 1
    return shape[0] * math.prod(shape[2:])


class _MatrixLayer(_Layer):
    """Gemm, MatMul and 1×1 Conv: ``y = x W`` with W [K, N], factored by SVD into two nodes."""

    kind = "svd"

    def __init__(self, node: ir.Node, weight: np.ndarray, matrix: np.ndarray, dims: dict[str, int],
                 conv: _Conv | None = None) -> None:
        super().__init__(node, weight, dims)
        self.matrix = matrix
        self.conv = conv
        self.k, self.n = matrix.shape
        self.rows = _positions(self.out_shape, skip_last=conv is None) if self.shapes_known else 1
        self.factors: lr.MatrixFactors | None = None

    def full_ranks(self) -> Ranks:
        return (min(self.k, self.n),)

    def grid(self, round_to: int) -> list[Ranks]:
        return [(r,) for r in _steps(self.full_ranks()[0], round_to)]

    def ranks_for_ratio(self, ratio: float, round_to: int) -> Ranks:
        full = self.full_ranks()[0]
        return (_round_rank(ratio * full, full, round_to),)

    def ranks_for_energy(self, energy: float, round_to: int) -> Ranks:
        assert self.factors is not None
        full = self.full_ranks()[0]
        return (_round_rank(self.factors.rank_for_energy(energy), full, round_to),)

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.rows * self.k * self.n
        return self.rows * ranks[0] * (self.k + self.n)

    def params(self, ranks: Ranks) -> int:
        return ranks[0] * (self.k + self.n)

    def lost(self, ranks: Ranks) -> float:
        assert self.factors is not None
        return self.factors.lost(ranks[0])

    def tap_names(self) -> list[str]:
        return [self.node.inputs[0].name]

    def accumulate(self, acts: dict[str, np.ndarray]) -> None:
        x = acts[self.node.inputs[0].name]
        rows = lr.channel_rows(x) if self.conv is not None else x.reshape(-1, self.k)
        self.moments.setdefault("in", lr.Moments(self.k)).add(rows)

    def decompose(self, damping: float | None) -> None:
        chol = None
        if damping is not None and (m := self.moments.get("in")) is not None and m.mean() is not None:
            chol = lr.whitener(m.mean(), damping)
        self.factors = lr.matrix_factors(self.matrix, chol)

    def stages(self, ranks: Ranks) -> list[_Stage]:
        assert self.factors is not None
        a, b = self.factors.factors(ranks[0])
        op = self.node.op_type
        if op == "MatMul":
            return [_Stage("MatMul", a, {}, "u"), _Stage("MatMul", b, {}, "v")]
        if op == "Gemm":
            beta = self.node.attributes.get_float("beta", 1.0)
            return [_Stage("Gemm", a, {}, "u"), _Stage("Gemm", b, {"beta": beta}, "v")]
        assert self.conv is not None
        first = a.T.reshape(a.shape[1], self.k, *([1] * len(self.conv.kernel)))
        last = b.T.reshape(self.n, b.shape[0], *([1] * len(self.conv.kernel)))
        return [_Stage("Conv", first, self.conv.attrs(), "u"), _Stage("Conv", last, self.conv.pointwise(), "v")]


class _TuckerLayer(_Layer):
    """k×k Conv as 1×1 (Cin→r1), k×k core (r1→r2), 1×1 (r2→Cout)."""

    kind = "tucker"

    def __init__(self, node: ir.Node, weight: np.ndarray, conv: _Conv, dims: dict[str, int]) -> None:
        super().__init__(node, weight, dims)
        self.conv = conv
        self.cout, self.cin = weight.shape[:2]
        self.kk = math.prod(weight.shape[2:])
        self.p_in = _positions(self.in_shape) if self.shapes_known else 1
        self.p_out = _positions(self.out_shape) if self.shapes_known else 1
        self.factors: lr.TuckerFactors | None = None

    def full_ranks(self) -> Ranks:
        return (self.cin, self.cout)

    def grid(self, round_to: int) -> list[Ranks]:
        grid = set()
        for r_in in _steps(self.cin, round_to):
            r_out = _round_rank(r_in * self.cout / self.cin, self.cout, round_to)
            grid.add((r_in, r_out))
        for r_out in _steps(self.cout, round_to):
            r_in = _round_rank(r_out * self.cin / self.cout, self.cin, round_to)
            grid.add((r_in, r_out))
        return sorted(grid)

    def ranks_for_ratio(self, ratio: float, round_to: int) -> Ranks:
        return (_round_rank(ratio * self.cin, self.cin, round_to), _round_rank(ratio * self.cout, self.cout, round_to))

    def ranks_for_energy(self, energy: float, round_to: int) -> Ranks:
        assert self.factors is not None
        r_in = int(np.searchsorted(self.factors.in_cumulative, energy - 1e-12) + 1)
        r_out = int(np.searchsorted(self.factors.out_cumulative, energy - 1e-12) + 1)
        return (_round_rank(r_in, self.cin, round_to), _round_rank(r_out, self.cout, round_to))

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.p_out * self.cout * self.cin * self.kk
        r_in, r_out = ranks
        total = self.p_out * r_out * r_in * self.kk
        if r_in < self.cin:
            total += self.p_in * self.cin * r_in
        if r_out < self.cout:
            total += self.p_out * r_out * self.cout
        return total

    def params(self, ranks: Ranks) -> int:
        r_in, r_out = ranks
        total = r_out * r_in * self.kk
        total += self.cin * r_in if r_in < self.cin else 0
        total += r_out * self.cout if r_out < self.cout else 0
        return total

    def lost(self, ranks: Ranks) -> float:
        assert self.factors is not None
        return self.factors.lost(*ranks)

    def tap_names(self) -> list[str]:
        return [self.node.inputs[0].name, self.node.outputs[0].name]

    def accumulate(self, acts: dict[str, np.ndarray]) -> None:
        x = acts[self.node.inputs[0].name]
        y = acts[self.node.outputs[0].name]
        bias = self.bias()
        if bias is not None and bias.const_value is not None:
            y = y - np.asarray(bias.const_value.numpy()).reshape((1, -1) + (1,) * (y.ndim - 2))
        self.moments.setdefault("in", lr.Moments(self.cin)).add(lr.channel_rows(x))
        self.moments.setdefault("out", lr.Moments(self.cout)).add(lr.channel_rows(y))

    def decompose(self, damping: float | None) -> None:
        chol = out = None
        if damping is not None:
            m_in, m_out = self.moments.get("in"), self.moments.get("out")
            if m_in is not None and m_in.mean() is not None:
                chol = lr.whitener(m_in.mean(), damping)
            if m_out is not None:
                out = m_out.mean()
        self.factors = lr.tucker_factors(self.raw, chol, out)

    def stages(self, ranks: Ranks) -> list[_Stage]:
        assert self.factors is not None
        first, core, last = self.factors.weights(*ranks)
        out = []
        if first is not None:
            out.append(_Stage("Conv", first, self.conv.pointwise(), "in"))
        out.append(_Stage("Conv", core, self.conv.attrs(), "core"))
        if last is not None:
            out.append(_Stage("Conv", last, self.conv.pointwise(), "out"))
        return out


class _SpatialLayer(_MatrixLayer):
    """kh×kw Conv as kh×1 (Cin→r) then 1×kw (r→Cout): SVD of the [Cin·kh, Cout·kw] rearrangement."""

    kind = "spatial"

    def __init__(self, node: ir.Node, weight: np.ndarray, conv: _Conv, dims: dict[str, int]) -> None:
        super().__init__(node, weight, lr.spatial_matrix(weight), dims, conv)
        self.cout, self.cin, self.kh, self.kw = weight.shape
        if self.shapes_known:
            assert self.in_shape is not None and self.out_shape is not None
            n, _, h_out, w_out = self.out_shape
            self.p_mid = n * h_out * self.in_shape[3]
            self.p_out = n * h_out * w_out
        else:
            self.p_mid = self.p_out = 1

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.p_out * self.cout * self.cin * self.kh * self.kw
        return self.p_mid * ranks[0] * self.cin * self.kh + self.p_out * self.cout * ranks[0] * self.kw

    def accumulate(self, acts: dict[str, np.ndarray]) -> None:
        assert self.conv is not None
        x = acts[self.node.inputs[0].name]
        pads = self.conv.pads
        n_sp = len(self.conv.kernel)
        pad_h = lr.explicit_pads(self.conv.auto_pad, (pads[0], pads[n_sp]), x.shape[2], self.kh,
                                 self.conv.strides[0], self.conv.dilations[0])
        block, count = lr.vertical_patch_moments(x, self.kh, self.conv.strides[0], self.conv.dilations[0], pad_h)
        self.moments.setdefault("in", lr.Moments(self.cin * self.kh)).add_block(block, count)

    def stages(self, ranks: Ranks) -> list[_Stage]:
        assert self.factors is not None and self.conv is not None
        a, b = self.factors.factors(ranks[0])
        vertical, horizontal = lr.spatial_weights(a, b, self.raw.shape)
        return [_Stage("Conv", vertical, self.conv.attrs("h"), "v"),
                _Stage("Conv", horizontal, self.conv.attrs("w"), "h")]


# ------------------------------------------------------------------------------ eligibility
def _try_layer(node: ir.Node, method: str, dims: dict[str, int]) -> _Layer | str:
    """A factorable layer for `node`, or the reason it is left alone."""
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return "fewer than two inputs"
    weight_value = node.inputs[1]
    if not is_constant(weight_value):
        return "weight is not a constant initializer"
    assert weight_value is not None
    if not only_used_by(weight_value, node):
        return "weight is shared with other nodes"
    w = np.asarray(weight_value.const_value.numpy())
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not float"
    if node.op_type == "MatMul":
        return _try_matmul(node, w, dims)
    if node.op_type == "Gemm":
        return _try_gemm(node, w, dims)
    return _try_conv(node, w, method, dims)


def _try_matmul(node: ir.Node, w: np.ndarray, dims: dict[str, int]) -> _Layer | str:
    if w.ndim != 2:
        return f"weight has rank {w.ndim}, not 2"
    if min(w.shape) < 2:
        return "weight has rank 1 already"
    return _MatrixLayer(node, w, w.astype(np.float64), dims)


def _try_gemm(node: ir.Node, w: np.ndarray, dims: dict[str, int]) -> _Layer | str:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1 is left alone"
    if w.ndim != 2 or min(w.shape) < 2:
        return "weight is not a matrix of rank 2 or more"
    matrix = w.T if node.attributes.get_int("transB", 0) else w
    alpha = node.attributes.get_float("alpha", 1.0)
    return _MatrixLayer(node, w, alpha * matrix.astype(np.float64), dims)


def _conv_geometry(node: ir.Node, w: np.ndarray) -> _Conv:
    n = w.ndim - 2
    kernel = tuple(node.attributes.get_ints("kernel_shape", None) or w.shape[2:])
    return _Conv(
        kernel=tuple(int(k) for k in kernel),
        strides=tuple(int(s) for s in node.attributes.get_ints("strides", None) or (1,) * n),
        pads=tuple(int(p) for p in node.attributes.get_ints("pads", None) or (0,) * (2 * n)),
        dilations=tuple(int(d) for d in node.attributes.get_ints("dilations", None) or (1,) * n),
        auto_pad=node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET",
    )


def _try_conv(node: ir.Node, w: np.ndarray, method: str, dims: dict[str, int]) -> _Layer | str:
    if w.ndim < 3:
        return f"conv weight has rank {w.ndim}"
    group = node.attributes.get_int("group", 1)
    if group != 1:
        kind = "depthwise" if w.shape[1] == 1 else "grouped"
        return f"{kind} convolution (group={group}) is left alone"
    conv = _conv_geometry(node, w)
    if tuple(w.shape[2:]) != conv.kernel:
        return "kernel_shape does not match the weight"
    cout, cin = w.shape[:2]
    if all(k == 1 for k in conv.kernel):
        if min(cin, cout) < 2:
            return "1×1 conv with a single input or output channel"
        matrix = w.reshape(cout, cin).T.astype(np.float64)
        return _MatrixLayer(node, w, matrix, dims, conv)
    if method == "spatial":
        if w.ndim != 4:
            return f"spatial method needs a 2-D conv, this one has {w.ndim - 2} spatial axes"
        return _SpatialLayer(node, w, conv, dims)
    if cin == 1 and cout == 1:
        return "single-channel conv"
    return _TuckerLayer(node, w, conv, dims)


# ------------------------------------------------------------------------------ data
def _gather_moments(model: ir.Model, ctx: Context, layers: list[_Layer], calib: Any) -> None:
    names = sorted({name for layer in layers for name in layer.tap_names()})
    for acts in ctx.activations(model, names, feeds=calib, desc="factorize: activation statistics"):
        for layer in layers:
            layer.accumulate(acts)


# ------------------------------------------------------------------------------ rewrite
def _attributes(values: dict[str, Any]) -> list[ir.Attr]:
    attrs: list[ir.Attr] = []
    for key, value in values.items():
        if isinstance(value, bool) or isinstance(value, int):
            attrs.append(ir.AttrInt64(key, int(value)))
        elif isinstance(value, float):
            attrs.append(ir.AttrFloat32(key, value))
        elif isinstance(value, str):
            attrs.append(ir.AttrString(key, value))
        else:
            attrs.append(ir.AttrInt64s(key, [int(v) for v in value]))
    return attrs


def _apply(graph: ir.Graph, layer: _Layer, ranks: Ranks) -> None:
    """Insert the chain for `layer` at `ranks` before its node and let it take over the output."""
    node = layer.node
    weight = node.inputs[1]
    assert weight is not None
    out = node.outputs[0]
    base = node.name or out.name or node.op_type
    current = node.inputs[0]
    stages = layer.stages(ranks)
    created: list[ir.Node] = []
    taken = all_names(graph)  # one walk of the graph per layer; the set also sees nodes not inserted yet
    for i, stage in enumerate(stages):
        array = np.ascontiguousarray(stage.weight, dtype=layer.dtype)
        w_init = new_initializer(graph, f"{weight.name}.{stage.suffix}", array, origin=weight.name, taken=taken)
        inputs: list[ir.Value | None] = [current, w_init]
        if i == len(stages) - 1 and layer.bias() is not None:
            inputs.append(layer.bias())
        op_type, attrs = stage.op_type, stage.attrs
        if op_type == "Gemm" and len(inputs) == 2 and opset_version(graph, 11) < 11:
            op_type, attrs = "MatMul", {}  # Gemm's C is optional from opset 11 only; 2-D x·W is a MatMul
        new = ir.Node("", op_type, inputs, attributes=_attributes(attrs),
                      name=unique_name(graph, f"{base}.{stage.suffix}", taken))
        new.metadata_props[FACTORIZED] = layer.kind
        new.outputs[0].name = unique_name(graph, f"{out.name}.{stage.suffix}", taken)
        new.outputs[0].type = out.type
        created.append(new)
        current = new.outputs[0]
    logger.debug("factorize %s: %s at ranks %s", base, layer.kind, ranks)
    graph.insert_before(node, created)
    take_over_output(graph, node, current)
    created[-1].name = node.name
    if not weight.uses() and weight.name in graph.initializers:
        del graph.initializers[weight.name]


# ------------------------------------------------------------------------------ speed check
def _stage_nodes(stages: list[_Stage], bias: np.ndarray | None) -> tuple[list[onnx.NodeProto], list[Any]]:
    nodes, inits = [], []
    current = "x"
    for i, stage in enumerate(stages):
        w_name, out = f"w{i}", ("y" if i == len(stages) - 1 else f"t{i}")
        inputs = [current, w_name]
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(stage.weight), w_name))
        if i == len(stages) - 1 and bias is not None:
            inputs.append("b")
            inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(bias), "b"))
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in stage.attrs.items()}
        nodes.append(helper.make_node(stage.op_type, inputs, [out], **attrs))
        current = out
    return nodes, inits


def _micro_model(stages: list[_Stage], in_shape: list[int], dtype: np.dtype, bias: np.ndarray | None,
                 opset: int) -> onnx.ModelProto:
    nodes, inits = _stage_nodes(stages, bias)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    # At least opset 11, where Gemm's C is optional: the timing does not depend on the opset.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 11))])
    model.ir_version = 8
    return model


def _try_time(layer: _Layer, ranks: Ranks, opset: int, threads: int, runs: int) -> float | str:
    """Latency ratio factored / original of the layer alone, or the reason it cannot be timed."""
    from onnxopt.bench import bench

    if layer.in_shape is None:
        return "input shape unknown, cannot time the layer"
    bias = constant_array(layer.bias())
    stages = [dataclasses.replace(s, weight=np.ascontiguousarray(s.weight, dtype=layer.dtype))
              for s in layer.stages(ranks)]
    # Both micro models read the same "x": one feed, so bench need not load each model back for one.
    x = np.random.default_rng(0).standard_normal(layer.in_shape).astype(layer.dtype)
    feed = Dataset([{"x": x}], [None], "random:1")
    with tempfile.TemporaryDirectory(prefix="onnxopt-factorize-") as tmp:
        paths = []
        for tag, chain in (("orig", [layer.original_stage()]), ("lowrank", stages)):
            path = Path(tmp) / f"{tag}.onnx"
            onnx.save(_micro_model(chain, layer.in_shape, layer.dtype, bias, opset), str(path))
            paths.append(path)
        result = bench(paths, runs=runs, warmup=3, threads=threads, memory=False, data=feed)
    return result.ratios[1]


def _keep_faster(chosen: list[tuple[_Layer, Ranks]], model: ir.Model, ctx: Context, runs: int, limit: float,
                 stats: PassStats) -> list[tuple[_Layer, Ranks]]:
    opset = opset_version(model, 17)
    threads = ctx.threads or 1
    kept = []
    for layer, ranks in progress(chosen, desc="factorize: timing layers"):
        ratio = _try_time(layer, ranks, opset, threads, runs)
        if isinstance(ratio, str):
            stats.skip(layer.node, ratio)
        elif ratio > limit:
            stats.skip(layer.node, f"not faster in ONNX Runtime (latency ×{ratio:.2f} alone, needs <= ×{limit:.2f})")
        else:
            layer.speed_ratio = ratio
            kept.append((layer, ranks))
    return kept
