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
(see ``_lowrank``). ``verify_speed=true`` (the default) times each candidate alone in ONNX Runtime (the
layer and its chain as two one-input models at the input shape the layer sees on the run's sample feed,
`onnxopt.timing.compare`) and keeps only the substitutions that run at least ``min_speedup`` faster;
then it times the whole model against the model before the pass and drops the substitutions with the
smallest measured gain until the model is ``min_speedup`` faster too (`_SpeedCheck`): a smaller gain is
inside what a shared 2-core CPU's timing moves between runs.

Names survive: the last node of a chain takes the original node's name and output name; new weights
record the original weight name as their origin.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper
from onnx_ir.convenience import convert_attributes

from onnxopt import timing
from onnxopt.analysis import infer_shapes
from onnxopt.analysis.fitting import Moments
from onnxopt.analysis.layers import ConvGeometry, Linear, linear_of
from onnxopt.analysis.stats import dim_values, macs_by_node
from onnxopt.context import Context
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import (
    all_names,
    constant_array,
    is_onnx_op,
    iter_graphs,
    new_initializer,
    opset_version,
    require_finite,
    take_over_output,
    unique_name,
)
from onnxopt.io import load, temp_model_file
from onnxopt.progress import progress
from onnxopt.registry import (
    Pass,
    PassStats,
    exclude_patterns,
    layer_settings,
    layers_option,
    matches_any,
    option,
    register_pass,
)

from . import _lowrank as lr

__all__ = ["Factorize", "FACTORIZED"]

logger = logging.getLogger(__name__)

FACTORIZED = "onnxopt.factorized"
"""Metadata prop on every node a substitution creates (value: the substitution kind)."""

Ranks = lr.Ranks


# ------------------------------------------------------------------------------ the pass
@register_pass("factorize")
class Factorize(Pass):
    """Low-rank substitution of Conv, Gemm and MatMul (SVD, Tucker-2, spatial) where it pays."""

    exact = False
    idempotent = False
    speed = True

    method: Literal["tucker", "spatial"] = option("tucker", "k×k convs: tucker (1×1, k×k, 1×1) or spatial (k×1, 1×k)")
    rank_by: Literal["ratio", "energy", "macs"] = option(
        "energy", "rank choice: ratio (rank_ratio), energy (keep that energy), macs (global macs_target)")
    rank_ratio: float = option(0.5, "rank_by=ratio: fraction of each full rank to keep, in (0, 1]",
                               when={"rank_by": "ratio"})
    energy: float = option(0.9, "rank_by=energy: fraction of squared singular values to keep, in (0, 1]",
                           when={"rank_by": "energy"})
    macs_target: float = option(0.5, "rank_by=macs: fraction of the model's MACs to reach, in (0, 1]",
                                when={"rank_by": "macs"})
    round_to: int = option(4, "round ranks up to a multiple of this (>= 1)")
    min_saving: float = option(
        0.2, "substitute only if a layer's MACs drop by this fraction, in [-1, 1) (below 0 lets layers grow)")
    data_aware: bool = option(False, "whiten by calibration activations (needs --calib)")
    damping: float = option(0.01, "data_aware: ridge added to the activation second moment, × its mean diagonal",
                            when={"data_aware": True})
    verify_speed: bool = option(
        True, "keep a substitution only if it runs faster in ONNX Runtime, alone and in the model (false: MACs only)",
        untimed=False)
    verify_runs: int = option(9, "verify_speed: most interleaved timing blocks per check (>= 3)",
                              when={"verify_speed": True})
    min_speedup: float = option(0.05, "verify_speed: keep a layer only if this fraction faster alone, and the "
                                "whole model with the kept layers this fraction faster, in [0, 1)",
                                when={"verify_speed": True})
    exclude: list[str] = option([], "node names (globs) or op types to leave alone")
    layers: dict[str, dict[str, Any]] = layers_option("rank_ratio", "energy")

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
        if self.verify_speed and layers:
            chosen = _SpeedCheck(model, ctx, self, stats).choose(layers)
        else:
            chosen = self._choose(model, ctx, layers, stats)
        for layer, ranks in chosen:
            stats.layers.append(layer.row(ranks, self.data_aware))
            _apply(model.graph, layer, ranks)
        stats.modified = bool(chosen)
        stats.summary = {**_summary(stats.layers, self), **stats.summary}
        return stats

    # -------------------------------------------------------------------------- candidates
    def _collect(self, model: ir.Model, ctx: Context, stats: PassStats) -> list[_Layer]:
        layers: list[_Layer] = []
        exclude = exclude_patterns(self, model)
        for node in list(model.graph):
            if not is_onnx_op(node, "Conv", "Gemm", "MatMul"):
                continue
            if node.metadata_props.get(FACTORIZED):
                stats.skip(node, "already factorized")
                continue
            if matches_any(node, exclude):
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
                if is_onnx_op(node, "Conv", "Gemm", "MatMul"):
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
            own = layer_settings(self, layer.node)
            if self.rank_by == "ratio":
                ranks = layer.plan.ranks_for_ratio(own["rank_ratio"], self.round_to)
            else:
                ranks = layer.plan.ranks_for_energy(own["energy"], self.round_to)
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
        ladders = [lr.ladder(layer.plan, self.round_to, self.min_saving) for layer in layers]
        for layer, ladder in zip(layers, ladders):
            if not ladder:
                cheapest = min(layer.plan.grid(self.round_to), key=layer.plan.cost)
                stats.skip(layer.node, _try_saving(layer, cheapest, self.min_saving) or "no rank saves enough")
        position, current = lr.descend([layer.plan for layer in layers], ladders, total, target)
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
    if lr.saves_enough(layer.plan, ranks, min_saving):
        return None
    unit = "MACs" if layer.shapes_known else "parameters"
    return (f"rank {'x'.join(map(str, ranks))} would keep {layer.plan.cost(ranks) / max(layer.orig_cost, 1):.0%} "
            f"of its {unit} (needs <= {1.0 - min_saving:.0%})")


# ------------------------------------------------------------------------------ layers
@dataclasses.dataclass
class _Stage:
    """One node of a substitution (or of an original layer, for timing)."""

    op_type: str
    weight: np.ndarray
    attrs: dict[str, Any]
    suffix: str


class _Layer:
    """A candidate node: its layer view, shapes, activation statistics and decomposition plan.

    `kind` is ``svd`` (Gemm, MatMul, 1×1 Conv: ``y = x W``), ``tucker`` or ``spatial`` (k×k Conv).
    """

    def __init__(self, linear: Linear, kind: str, dims: dict[str, int]) -> None:
        self.linear = linear
        self.node = linear.node
        self.kind = kind
        self.geometry = linear.geometry
        self.raw = require_finite(np.asarray(linear.weight.value.const_value.numpy()),
                                  f"weight '{linear.weight.name}' of {self.node.name or self.node.op_type}")
        self.dtype = self.raw.dtype
        self.moments: dict[str, Moments] = {}
        self.in_shape = dim_values(self.node.inputs[0].shape, dims)
        self.out_shape = dim_values(self.node.outputs[0].shape, dims)
        self.shapes_known = self.in_shape is not None and self.out_shape is not None
        self.speed: timing.Measurement | None = None
        self.plan = self._plan()

    def _plan(self) -> lr.MatrixPlan | lr.TuckerPlan:
        shapes = (self.in_shape, self.out_shape) if self.shapes_known else (None, None)
        if self.kind == "svd":
            return lr.MatrixPlan(self.linear.weights().T, lr.positions(shapes[1], conv=self.geometry is not None))
        return (lr.TuckerPlan if self.kind == "tucker" else lr.SpatialPlan)(self.raw, *shapes)

    @property
    def orig_cost(self) -> int:
        return self.plan.cost(())

    def bias(self) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[2] if len(inputs) > 2 else None

    # ------------------------------------------------------------------ data
    def tap_names(self) -> list[str]:
        names = [self.node.inputs[0].name]
        return names + [self.node.outputs[0].name] if self.kind == "tucker" else names

    def _add(self, key: str, dim: int, rows: np.ndarray) -> None:
        self.moments.setdefault(key, Moments(dim)).add(rows)

    def accumulate(self, acts: dict[str, np.ndarray]) -> None:
        x = acts[self.node.inputs[0].name]
        plan = self.plan
        if isinstance(plan, lr.SpatialPlan):
            assert self.geometry is not None
            pads = self.geometry.explicit_pads(x.shape[2:])
            block, count = lr.vertical_patch_moments(x, plan.kh, self.geometry.strides[0],
                                                     self.geometry.dilations[0], (pads[0], pads[len(pads) // 2]))
            self.moments.setdefault("in", Moments(plan.cin * plan.kh)).add_gram(block, count)
        elif isinstance(plan, lr.TuckerPlan):
            y = acts[self.node.outputs[0].name]
            bias = self.bias()
            if bias is not None and bias.const_value is not None:
                y = y - np.asarray(bias.const_value.numpy()).reshape((1, -1) + (1,) * (y.ndim - 2))
            self._add("in", plan.cin, lr.channel_rows(x))
            self._add("out", plan.cout, lr.channel_rows(y))
        else:
            self._add("in", plan.k, lr.channel_rows(x) if self.geometry is not None else x.reshape(-1, plan.k))

    def decompose(self, damping: float | None) -> None:
        moments = {key: require_finite(m.second_moment(), f"activation statistics of {self.node.name or self.kind}")
                   for key, m in self.moments.items()}
        self.plan.decompose(damping, moments.get("in"), moments.get("out"))

    # ------------------------------------------------------------------ substitution
    def stages(self, ranks: Ranks) -> list[_Stage]:
        plan, geo = self.plan, self.geometry
        if isinstance(plan, lr.SpatialPlan):
            assert geo is not None
            vertical, horizontal = plan.weights(ranks)
            return [_Stage("Conv", vertical, geo.attributes(axes=(0,)), "v"),
                    _Stage("Conv", horizontal, geo.attributes(axes=(1,)), "h")]
        assert plan.factors is not None
        if isinstance(plan, lr.TuckerPlan):
            assert geo is not None and isinstance(plan.factors, lr.TuckerFactors)
            first, core, last = plan.factors.weights(*ranks)
            out = [] if first is None else [_Stage("Conv", first, _pointwise(geo), "in")]
            out.append(_Stage("Conv", core, geo.attributes(), "core"))
            return out if last is None else [*out, _Stage("Conv", last, _pointwise(geo), "out")]
        assert isinstance(plan.factors, lr.MatrixFactors)
        a, b = plan.factors.factors(ranks[0])
        if self.node.op_type == "MatMul":
            return [_Stage("MatMul", a, {}, "u"), _Stage("MatMul", b, {}, "v")]
        if self.node.op_type == "Gemm":
            return [_Stage("Gemm", a, {}, "u"), _Stage("Gemm", b, {"beta": self.linear.beta}, "v")]
        assert geo is not None
        ones = [1] * geo.rank
        return [_Stage("Conv", a.T.reshape(a.shape[1], plan.k, *ones), geo.attributes(), "u"),
                _Stage("Conv", b.T.reshape(plan.n, b.shape[0], *ones), _pointwise(geo), "v")]

    def original_stage(self) -> _Stage:
        attrs = {k: a.value for k, a in self.node.attributes.items()}
        return _Stage(self.node.op_type, self.raw, attrs, "orig")

    def row(self, ranks: Ranks, data_aware: bool) -> dict[str, Any]:
        lost = self.plan.lost(ranks)
        return {
            "node": self.node.name or self.node.outputs[0].name,
            "op": self.node.op_type,
            "kind": self.kind,
            "weight_shape": list(self.raw.shape),
            "ranks": list(ranks),
            "params_before": int(self.raw.size),
            "params_after": self.plan.params(ranks),
            "macs_before": self.orig_cost if self.shapes_known else None,
            "macs_after": self.plan.cost(ranks) if self.shapes_known else None,
            "energy_kept": round(1.0 - lost, 6),
            "est_rel_error": round(math.sqrt(lost), 6),
            "error_of": "output on calibration data" if data_aware else "weight",
            "speed_ratio": None if self.speed is None else round(self.speed.ratio, 3),
            "latency_ms": None if self.speed is None else [round(self.speed.reference_ms, 5),
                                                           round(self.speed.candidate_ms, 5)],
        }


def _pointwise(geometry: ConvGeometry) -> dict[str, Any]:
    return {"kernel_shape": (1,) * geometry.rank}


# ------------------------------------------------------------------------------ eligibility
def _try_layer(node: ir.Node, method: str, dims: dict[str, int]) -> _Layer | str:
    """A factorable layer for `node`, or the reason it is left alone."""
    linear, reason = linear_of(node)
    if linear is None:
        return reason or "not a linear layer"
    if linear.weight.quantized:
        return "weight is not a constant initializer"
    if linear.weight.shared():
        return "weight is shared with other nodes"
    shape = linear.weight.shape
    if node.op_type == "MatMul":
        return "weight has rank 1 already" if min(shape) < 2 else _Layer(linear, "svd", dims)
    if node.op_type == "Gemm":
        if linear.trans_a:
            return "Gemm with transA=1 is left alone"
        return "weight is not a matrix of rank 2 or more" if min(shape) < 2 else _Layer(linear, "svd", dims)
    if linear.groups != 1:
        kind = "depthwise" if shape[1] == 1 else "grouped"
        return f"{kind} convolution (group={linear.groups}) is left alone"
    cout, cin = shape[:2]
    assert linear.geometry is not None
    if all(k == 1 for k in linear.geometry.kernel):
        if min(cin, cout) < 2:
            return "1×1 conv with a single input or output channel"
        return _Layer(linear, "svd", dims)
    if method == "spatial":
        if len(shape) != 4:
            return f"spatial method needs a 2-D conv, this one has {len(shape) - 2} spatial axes"
        return _Layer(linear, "spatial", dims)
    if cin == 1 and cout == 1:
        return "single-channel conv"
    return _Layer(linear, "tucker", dims)


# ------------------------------------------------------------------------------ data
def _gather_moments(model: ir.Model, ctx: Context, layers: list[_Layer], calib: Any) -> None:
    names = sorted({name for layer in layers for name in layer.tap_names()})
    for acts in ctx.activations(model, names, feeds=calib, desc="factorize: activation statistics"):
        for layer in layers:
            layer.accumulate(acts)


# ------------------------------------------------------------------------------ rewrite
def _apply(graph: ir.Graph, layer: _Layer, ranks: Ranks, node: ir.Node | None = None) -> None:
    """Insert the chain for `layer` at `ranks` before its node (or `node`, the same layer in a copy of the
    model) and let it take over the output."""
    node = node or layer.node
    bias = node.inputs[2] if len(node.inputs) > 2 else None
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
        if i == len(stages) - 1 and bias is not None:
            inputs.append(bias)
        op_type, attrs = stage.op_type, stage.attrs
        if op_type == "Gemm" and len(inputs) == 2 and opset_version(graph, 11) < 11:
            op_type, attrs = "MatMul", {}  # Gemm's C is optional from opset 11 only; 2-D x·W is a MatMul
        new = ir.Node("", op_type, inputs, attributes=convert_attributes(attrs),
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
def _micro_model(stages: list[_Stage], in_shape: list[int], dtype: np.dtype, bias: np.ndarray | None,
                 opset: int) -> onnx.ModelProto:
    """The chain of `stages` alone, as a model from "x" (`in_shape`) to "y"."""
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
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, in_shape)],
                              [helper.make_tensor_value_info("y", elem, None)], inits)
    # At least opset 11, where Gemm's C is optional: the timing does not depend on the opset.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 11))])
    model.ir_version = 8
    return model


def _random_input(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(tuple(shape)).astype(dtype)


class _SpeedCheck:
    """verify_speed: a substitution stays only when it runs faster, first alone, then in the whole model.

    Alone: the layer and its chain as two one-input models at the input shape the layer sees on the
    run's sample feed (tapped once), timed by `onnxopt.timing.compare` with the limit ``1 - min_speedup``.
    With ``rank_by=macs`` the layers that are not faster leave the allocation, which is redone (at most
    `_ROUNDS` times) so the target is sought among the others. Whole model: the model with every kept
    substitution against the model before the pass, with the same limit; when it is not that much faster,
    the substitutions with the smallest measured gain go first (half of them at a time) until it is, or
    none is left.
    """

    _ROUNDS = 3

    def __init__(self, model: ir.Model, ctx: Context, p: Factorize, stats: PassStats) -> None:
        self.model, self.ctx, self.p, self.stats = model, ctx, p, stats
        self.limit = 1.0 - p.min_speedup
        self.feed: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def choose(self, layers: list[_Layer]) -> list[tuple[_Layer, Ranks]]:
        self.feed = timing.sample_feed(self.model, self.ctx)
        try:
            self.shapes = timing.tapped_shapes(self.model, self.ctx,
                                               sorted({la.node.inputs[0].name for la in layers}), self.feed)
        except ModelError as exc:  # layers are then timed at their declared shapes (symbolic dims: --dims)
            self.stats.notes.append(f"factorize: layer shapes not tapped ({exc}); timing at declared shapes")
        declined: dict[int, tuple[_Layer, str]] = {}
        timed: dict[tuple[int, Ranks], timing.Measurement | str] = {}
        kept: list[tuple[_Layer, Ranks]] = []
        for _ in range(self._ROUNDS):
            round_stats = PassStats()
            chosen = self.p._choose(self.model, self.ctx, [la for la in layers if id(la) not in declined],
                                    round_stats)
            kept, slow = [], 0
            for layer, ranks in progress(chosen, desc="factorize: timing layers"):
                key = (id(layer), tuple(ranks))
                if key not in timed:
                    timed[key] = self._time_layer(layer, ranks)
                result = timed[key]
                if isinstance(result, str):
                    declined[id(layer)] = (layer, result)
                    slow += 1
                elif result.ratio > self.limit:
                    declined[id(layer)] = (layer, f"not faster in ONNX Runtime alone: {result.describe()}; "
                                                  f"needs <= x{self.limit:.2f}")
                    slow += 1
                else:
                    layer.speed = result
                    kept.append((layer, ranks))
            if not slow or self.p.rank_by != "macs":
                break
        self.stats.skipped.extend(round_stats.skipped)
        self.stats.notes.extend(round_stats.notes)
        for layer, reason in declined.values():
            self.stats.skip(layer.node, reason)
        self.stats.summary["timed_layers"] = len({key[0] for key in timed})
        return self._whole_model(kept)

    def _time_layer(self, layer: _Layer, ranks: Ranks) -> timing.Measurement | str:
        shape = self.shapes.get(layer.node.inputs[0].name) or layer.in_shape
        if shape is None:
            return "input shape unknown, cannot time the layer"
        opset = opset_version(self.model, 17) or 17
        bias = constant_array(layer.bias())
        stages = [dataclasses.replace(s, weight=np.ascontiguousarray(s.weight, dtype=layer.dtype))
                  for s in layer.stages(ranks)]
        original = _micro_model([layer.original_stage()], list(shape), layer.dtype, bias, opset)
        factored = _micro_model(stages, list(shape), layer.dtype, bias, opset)
        feed = {"x": _random_input(shape, layer.dtype)}
        try:
            return timing.compare(original, factored, feed, threads=self.ctx.threads, limit=self.limit,
                                  max_blocks=self.p.verify_runs)
        except ModelError as exc:
            return f"cannot be timed alone in ONNX Runtime: {exc}"

    def _whole_model(self, kept: list[tuple[_Layer, Ranks]]) -> list[tuple[_Layer, Ranks]]:
        """The largest set of kept substitutions, by measured gain, with which the model is `limit` faster."""
        if not kept:
            return kept
        kept = sorted(kept, key=lambda lr_: -_gain(lr_[0]))
        index = {id(node): i for i, node in enumerate(self.model.graph)}
        tried: list[str] = []
        with temp_model_file(self.model, "before.onnx") as before:
            n = len(kept)
            while n > 0:
                trial = load(before, check=False)
                nodes = list(trial.graph)
                for layer, ranks in kept[:n]:
                    _apply(trial.graph, layer, ranks, nodes[index[id(layer.node)]])
                result = timing.compare(before, trial, self.feed, threads=self.ctx.threads, limit=self.limit,
                                        max_blocks=self.p.verify_runs, block_ms=timing.MODEL_BLOCK_MS)
                del trial, nodes
                if result.ratio <= self.limit:
                    self.stats.summary["model_speed"] = result.describe()
                    break
                tried.append(f"{n} layers: {result.describe()}")
                n = n // 2
        for layer, _ in kept[n:]:
            assert layer.speed is not None
            self.stats.skip(layer.node, f"faster alone (x{layer.speed.ratio:.2f}) but the model was not faster "
                                        f"with it ({'; '.join(tried)})")
        if tried:
            self.stats.notes.append(f"factorize: the whole model was not x{self.limit:.2f} or faster with every "
                                    f"substitution that was faster alone ({'; '.join(tried)}); kept {n} of "
                                    f"{len(kept)}")
        return kept[:n]


def _gain(layer: _Layer) -> float:
    """Milliseconds a substitution saved alone."""
    return 0.0 if layer.speed is None else layer.speed.reference_ms - layer.speed.candidate_ms
