"""channels: structured removal of whole channels (filters, hidden units, attention heads).

Zeroing is not removal: the rewritten model has smaller weight tensors and smaller activations, so
ONNX Runtime runs fewer MACs. The channel dependency graph (`onnxopt.analysis.channel_groups`)
says which channels must go together; this pass scores, chooses and cuts.

Rewrite cases:

1. Importance of a unit (one coupled channel, a whole group of a grouped conv, a whole head):
   ``l1``/``l2`` -- sum over the group's producers of the norm of the unit's filter and bias
   (Li et al., "Pruning Filters for Efficient ConvNets"), so an all-zero filter scores 0 and goes
   first; ``bn`` -- ``|gamma| / sqrt(var + eps)`` of a BatchNorm in the group; ``activation`` --
   mean ``|x|`` of the unit's channels at the consumers' inputs on the calibration data.
2. Choice: ``ratio`` removes ``floor(ratio * n)`` of each group's ``n`` units; ``macs`` removes units
   globally in order of (importance / group-mean importance) per MAC saved until the model's MACs
   drop by the target fraction. Kept counts are rounded up to multiples of ``round_to`` and never
   fall below ``min_channels``; pinned units (graph outputs, unknown ops...) are never removed.
3. Compensation: a removed channel ``c`` leaves behind the constant ``m_c`` it holds (``relu(bias)``
   when its filter is zero, pushed through the pass-through ops) or, with calibration data, its
   mean. A consumer ``y = W x + b`` then gets ``b' = b + sum_c W[:, c] m_c`` (for a Conv the kernel is
   summed over its window; exact away from zero-padded borders).
4. Surgery: every parameter indexed by a space is sliced with the space's keep mask (producer
   filters and biases, BatchNorm/InstanceNorm parameters, per-channel constants, consumer input
   rows), and ``group`` of grouped convs, Reshape shape constants (head counts), Split sizes and Slice
   bounds are recomputed.
5. Reconstruction (``reconstruct=true``, needs ``--calib``): each consumer of a cut space, in graph
   order, is refitted by ridge least squares so that on the pruned model's inputs ``X'`` it
   reproduces its outputs ``Y`` in the model before the cut: ``[W'; b'] = (AᵀA + λI)⁻¹ AᵀY`` with
   ``A = [X' 1]`` (He et al. 2017, ThiNet); Conv inputs are unfolded into patches.

Lossy unless the removed channels are all zero; running it twice removes more channels.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import timing
from onnxopt.analysis import infer_shapes
from onnxopt.analysis.channel_groups import ChannelGraph, Consumer, Fixup, Group, build_channel_graph
from onnxopt.analysis.layers import linear_of
from onnxopt.context import Context
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import (
    constant_array,
    iter_graphs,
    new_initializer,
    only_used_by,
    opset_version,
    require_finite,
    set_weight,
)
from onnxopt.io import load, temp_model_file
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
from onnxopt.runtime import TapSession

from ._channels_fit import refit_consumer

__all__ = ["Channels", "remove_units", "add_to_bias"]

logger = logging.getLogger(__name__)

_MAX_LISTED = 6


@register_pass("channels")
class Channels(Pass):
    """Remove whole channels, hidden units and heads through a channel dependency graph (smaller, faster)."""

    exact = False
    idempotent = False
    speed = True

    ratio: float = option(0.3, "fraction of each group's channels to remove, in [0, 1)", when={"macs": None})
    macs: float | None = option(None, "instead of ratio: fraction of the model's MACs to remove, in (0, 1)")
    importance: Literal["l1", "l2", "bn", "activation"] = option(
        "l2", "channel score: filter norm (l1, l2), BatchNorm scale (bn) or mean |activation| (needs --calib)")
    round_to: int = option(
        0, "keep channel counts multiples of this; 0: the CPU's float SIMD width (16 with AVX-512, 8 with AVX2)")
    min_channels: int = option(1, "fewest channels (units) a group keeps")
    exclude: list[str] = option([], "producer node names (globs) or op types whose output channels are kept")
    compensate: bool = option(True, "fold removed channels' constant (or mean, with --calib) into consumer biases")
    reconstruct: bool = option(False, "refit consumer weights by least squares on --calib data")
    layers: dict[str, dict[str, Any]] = layers_option("ratio")
    verify_speed: bool = option(
        True, "time the cut model against the uncut one; keep the largest cut that is faster (false: MACs only)",
        untimed=False)
    min_speedup: float = option(0.05, "verify_speed: a cut must make the model this fraction faster, in [0, 1)",
                                when={"verify_speed": True})

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"channels.ratio: {self.ratio} is outside [0, 1) (allowed 0 <= ratio < 1)")
        if self.macs is not None and not 0.0 < self.macs < 1.0:
            raise UsageError(f"channels.macs: {self.macs} is outside (0, 1) (allowed 0 < macs < 1)")
        if self.round_to < 0:
            raise UsageError(f"channels.round_to: {self.round_to} must be 0 (the CPU's SIMD width) or more (e.g. 8)")
        if not 0.0 <= self.min_speedup < 1.0:
            raise UsageError(f"channels.min_speedup: {self.min_speedup} is outside [0, 1)")
        if self.min_channels < 1:
            raise UsageError(f"channels.min_channels: {self.min_channels} must be at least 1")
        if self.macs is not None and any("ratio" in v for v in self.layers.values()):
            raise UsageError("channels.layers: a per-layer ratio needs ratio mode; drop macs")

    # ------------------------------------------------------------------ driver
    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        ctx = ctx if ctx is not None else Context()
        if self.importance == "activation":
            ctx.require_calib("channels importance=activation")
        if self.reconstruct:
            ctx.require_calib("channels reconstruct=true")
        stats = PassStats()
        cg = build_channel_graph(model, ctx.dims)
        groups = cg.groups()
        candidates = self._candidates(groups, stats, exclude_patterns(self, model))
        stats.summary = {"groups": len(groups), "prunable_groups": len(candidates)}
        if not candidates:
            if self.macs is not None:
                raise UsageError(self._blocked_message(cg, groups, 0.0))
            msg = "channels: no prunable channel group; the model is unchanged"
            logger.warning(msg)
            stats.notes.append(msg + " (" + (_blockers(groups) if groups else _no_groups_reason(model)) + ")")
            return stats
        means = _channel_stats(cg, candidates, model, ctx) if (
            ctx.calib is not None and (self.compensate or self.importance == "activation")) else {}
        scores = {id(g): self._scores(cg, g, means, stats) for g in candidates}
        plan = self._plan(cg, groups, candidates, scores)
        removed_units = sum(len(units) for units in plan.values())
        if removed_units == 0:
            stats.notes.append("channels: nothing to remove at these settings; the model is unchanged")
            return stats
        if self.verify_speed:
            plan = _faster_plan(model, ctx, groups, candidates, plan, self, stats)
            if not any(plan.values()):
                return stats
        removed = {e for g in candidates for u in plan.get(id(g), []) for e in g.units[u]}
        # Reconstruction targets come from the model before surgery: one session tapping every
        # consumer's output, built now, serves each refit (ORT computes only the output asked for).
        teacher = _teacher_taps(model, cg, ctx) if self.reconstruct else None
        macs_before = cg.total_macs()
        try:
            masks, comp_applied = remove_units(model, cg, removed, means=means, compensate=self.compensate)
            if teacher is not None:
                _refit_consumers(model, cg, masks, comp_applied, teacher, ctx, stats)
        finally:
            if teacher is not None:
                teacher.close()
        infer_shapes(model)
        _report(stats, cg, candidates, plan, masks, macs_before, len(comp_applied))
        return stats

    # ------------------------------------------------------------------ candidates and scores
    def _candidates(self, groups: list[Group], stats: PassStats, exclude: list[str]) -> list[Group]:
        out = []
        for g in groups:
            if exclude and any(matches_any(p.node, exclude) for p in g.producers):
                stats.skip(g.name, "excluded by channels.exclude")
                continue
            if not g.prunable():
                stats.skip(g.name, next(iter(g.pinned.values()), "pinned"))
                continue
            out.append(g)
        return out

    def _scores(self, cg: ChannelGraph, g: Group, means: dict[str, tuple[np.ndarray, np.ndarray]],
                stats: PassStats) -> np.ndarray:
        if self.importance == "activation":
            score = _activation_scores(cg, g, means)
            if score is not None:
                return score
        if self.importance == "bn":
            score = _bn_scores(cg, g)
            if score is not None:
                return score
            stats.notes.append(f"channels: group {g.name} has no BatchNorm; scored by l2 instead")
        return _filter_scores(cg, g, 1 if self.importance == "l1" else 2)

    # ------------------------------------------------------------------ choice
    @property
    def multiple(self) -> int:
        """The channel multiple in force (`round_to`, or the CPU's SIMD width when it is 0)."""
        return self.round_to or timing.simd_width()

    def _keep_count(self, g: Group, keep: int) -> int:
        if self.multiple > 1 and _unit_width(g) == 1:
            keep = int(math.ceil(keep / self.multiple) * self.multiple)
        keep = max(keep, self.min_channels, g.size - len(g.prunable()), 1)
        return min(keep, g.size)

    def _plan(self, cg: ChannelGraph, groups: list[Group], candidates: list[Group],
              scores: dict[int, np.ndarray]) -> dict[int, list[int]]:
        if self.macs is None:
            plan = {}
            for g in candidates:
                ratio = layer_settings(self, *(p.node for p in g.producers))["ratio"]
                keep = self._keep_count(g, g.size - int(math.floor(ratio * g.size + 1e-9)))
                order = sorted(g.prunable(), key=lambda u: (scores[id(g)][u], u))
                plan[id(g)] = order[:g.size - keep]
            return plan
        return self._plan_macs(cg, groups, candidates, scores)

    def _plan_macs(self, cg: ChannelGraph, groups: list[Group], candidates: list[Group],
                   scores: dict[int, np.ndarray]) -> dict[int, list[int]]:
        total = cg.total_macs()
        if total <= 0:
            raise UsageError("channels.macs: the model has no counted MACs (Conv/Gemm/MatMul)")
        model_mac = _MacModel(cg, total)
        heap = []
        for g in candidates:
            s = scores[id(g)]
            mean = float(np.mean(s)) or 1.0
            for u in g.prunable():
                saving = max(model_mac.unit_saving(g.units[u]), 1e-9)
                heap.append(((s[u] / mean) / saving, id(g), u))
        heap.sort()
        by_id = {id(g): g for g in candidates}
        picked: dict[int, list[int]] = {id(g): [] for g in candidates}
        realized: dict[int, list[int]] = {id(g): [] for g in candidates}
        target = self.macs * total
        for _, gid, u in heap:
            if model_mac.removed >= target:
                break
            g = by_id[gid]
            picked[gid].append(u)
            keep = self._keep_count(g, g.size - len(picked[gid]))
            now = picked[gid][:g.size - keep]
            if len(now) != len(realized[gid]):
                model_mac.replace(realized[gid], now, g)
                realized[gid] = now
        if model_mac.removed < target * (1 - 1e-6):
            raise UsageError(self._blocked_message(cg, groups, model_mac.removed / total))
        return realized

    def _blocked_message(self, cg: ChannelGraph, groups: list[Group], reached: float) -> str:
        return (f"channels.macs={self.macs}: cannot be met, at most {reached:.1%} of MACs can be removed "
                f"with these settings; blocked by "
                f"{_blockers(groups, self.exclude) if groups else _no_groups_reason(cg.model)}")


def _report(stats: PassStats, cg: ChannelGraph, candidates: list[Group], plan: dict[int, list[int]],
            masks: dict[int, np.ndarray], macs_before: int, compensated: int) -> None:
    macs_after = cg.total_macs()
    for g in candidates:
        cut = plan.get(id(g), [])
        if cut:
            stats.layers.append({"group": g.name, "units": g.size, "removed": len(cut),
                                 "kept": g.size - len(cut), "nodes": [n.name for n in g.nodes()][:8]})
    stats.summary.update({
        "units_removed": sum(len(units) for units in plan.values()),
        "channels_removed": int(sum((~masks[i]).sum() for i in {p.space.index for p in cg.producers})),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "macs_removed": round(1 - macs_after / macs_before, 4) if macs_before else 0.0,
        "compensated_consumers": compensated,
    })
    stats.modified = True


# ====================================================================== helpers: speed
_LEVELS = (1.0, 0.5, 0.25)
"""Fractions of the planned removal tried, largest first, until the cut model is faster."""


def _faster_plan(model: ir.Model, ctx: Context, groups: list[Group], candidates: list[Group],
                 plan: dict[int, list[int]], p: Channels, stats: PassStats) -> dict[int, list[int]]:
    """The largest scaled-down `plan` (whole plan, half, quarter of each group's removal) whose cut model is
    at least `min_speedup` faster than `model`, or an empty plan, with the measurements in `stats`.

    A trial cuts a copy of the model with the same channel counts, without compensation: a dense kernel's
    time depends on the shapes, not on the values, so the real cut (scored, compensated, refitted) that
    follows runs as fast as its trial. Each answer comes from `onnxopt.timing.compare` (cached).
    """
    limit = 1.0 - p.min_speedup
    feed = timing.sample_feed(model, ctx)
    index = {id(g): i for i, g in enumerate(groups)}
    tried: list[str] = []
    last: dict[int, list[int]] | None = None
    with temp_model_file(model, "before.onnx") as before:
        for level in _LEVELS:
            sub = {}
            for g in candidates:
                units = plan.get(id(g), [])
                sub[id(g)] = units[: _scaled_count(p, g, len(units), level)]
            if not any(sub.values()) or sub == last:
                continue
            last = sub
            trial = load(before, check=False)
            trial_groups = build_channel_graph(trial, ctx.dims)
            tgroups = trial_groups.groups()
            if [g.name for g in tgroups] != [g.name for g in groups]:  # a saved copy must group alike
                stats.notes.append("channels: the cut was not timed (a copy of the model groups its channels "
                                   "differently); cut by MACs")
                return plan
            removed = {e for g in candidates for u in sub.get(id(g), []) for e in tgroups[index[id(g)]].units[u]}
            remove_units(trial, trial_groups, removed, compensate=False)
            infer_shapes(trial)
            result = timing.compare(before, trial, feed, threads=ctx.threads, limit=limit,
                                    block_ms=timing.MODEL_BLOCK_MS)
            del trial, trial_groups, tgroups
            label = f"{level:.0%} of the cut ({sum(map(len, sub.values()))} units)"
            if result.ratio <= limit:
                stats.summary["speed"] = f"{label}: {result.describe()}"
                if tried:
                    stats.notes.append(f"channels: larger cuts were not faster ({'; '.join(tried)}); "
                                       f"kept {label}: {result.describe()}")
                return sub
            tried.append(f"{label}: {result.describe()}")
    msg = (f"channels: no cut made the model at least {p.min_speedup:.0%} faster in ONNX Runtime "
           f"({'; '.join(tried)}); the model is unchanged (verify_speed=false cuts anyway)")
    logger.info(msg)
    stats.notes.append(msg)
    return {}


def _scaled_count(p: Channels, g: Group, removed: int, level: float) -> int:
    """Units removed from group `g` at `level` of a planned removal of `removed` units, rounded as planned."""
    if level >= 1.0:
        return removed
    keep = p._keep_count(g, g.size - int(math.floor(level * removed + 1e-9)))
    return min(removed, g.size - keep)


# ====================================================================== helpers: scoring
def _unit_width(g: Group) -> int:
    """Channels of the first producer that one unit covers (1, or a head's width)."""
    if not g.producers:
        return 1
    sp = g.producers[0].space
    return sum(1 for e in g.units[0] if sp.base <= e < sp.base + sp.size) or 1


def _filter_scores(cg: ChannelGraph, g: Group, order: int) -> np.ndarray:
    per_channel: dict[int, np.ndarray] = {}
    for p in g.producers:
        w = constant_array(p.node.inputs[p.weight_index])
        if w is None:
            continue
        require_finite(w, f"weight '{p.node.inputs[p.weight_index].name}'", "its channels cannot be ranked")
        moved = np.moveaxis(np.asarray(w, dtype=np.float64), p.axis, 0).reshape(w.shape[p.axis], -1)
        if p.bias_index is not None:
            b = np.asarray(constant_array(p.node.inputs[p.bias_index]), dtype=np.float64).reshape(-1)
            moved = np.concatenate([moved, b[:, None]], axis=1) if b.size == moved.shape[0] else moved
        norms = np.abs(moved).sum(1) if order == 1 else (moved ** 2).sum(1)
        per_channel[p.space.index] = per_channel.get(p.space.index, 0) + norms
    return _unit_sums(cg, g, per_channel, root=order == 2)


def _unit_sums(cg: ChannelGraph, g: Group, per_channel: dict[int, np.ndarray], *, root: bool = False) -> np.ndarray:
    scores = np.zeros(g.size)
    for k, unit in enumerate(g.units):
        total = 0.0
        for e in unit:
            space = cg.spaces[cg.elem_space[e]]
            vec = per_channel.get(space.index)
            if vec is not None:
                total += float(vec[e - space.base])
        scores[k] = math.sqrt(total) if root else total
    return scores


def _bn_scores(cg: ChannelGraph, g: Group) -> np.ndarray | None:
    ids = {s.index for s in g.spaces}
    per_channel: dict[int, np.ndarray] = {}
    for sl in cg.slices:
        if sl.node.op_type == "BatchNormalization" and sl.input_index == 1 and sl.space.index in ids:
            gamma = np.asarray(constant_array(sl.node.inputs[1]), dtype=np.float64)
            var = np.asarray(constant_array(sl.node.inputs[4]), dtype=np.float64)
            eps = sl.node.attributes.get_float("epsilon", 1e-5)
            per_channel[sl.space.index] = np.abs(gamma) / np.sqrt(var + eps)
    return _unit_sums(cg, g, per_channel) if per_channel else None


def _activation_scores(cg: ChannelGraph, g: Group, means: dict[str, tuple[np.ndarray, np.ndarray]]
                       ) -> np.ndarray | None:
    per_channel = {c.space.index: means[c.space.value.name][1] for c in g.consumers
                   if c.space.value.name in means}
    return _unit_sums(cg, g, per_channel) if per_channel else None


def _channel_stats(cg: ChannelGraph, groups: list[Group], model: ir.Model, ctx: Context
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and mean |x| of every consumer input of `groups`, over the calibration data."""
    spaces = {c.space.value.name: c.space for g in groups for c in g.consumers if c.space.value.name}
    if not spaces:
        return {}
    sums: dict[str, list[np.ndarray | int]] = {n: [0.0, 0.0, 0] for n in spaces}
    for acts in ctx.activations(model, list(spaces), desc="channels: statistics"):
        for name, space in spaces.items():
            a = np.moveaxis(np.asarray(acts[name], dtype=np.float64), space.axis, 0).reshape(space.size, -1)
            acc = sums[name]
            acc[0] = acc[0] + a.sum(1)
            acc[1] = acc[1] + np.abs(a).sum(1)
            acc[2] = int(acc[2]) + a.shape[1]
    return {n: (np.asarray(s) / max(1, c), np.asarray(a) / max(1, c)) for n, (s, a, c) in sums.items()}


def _no_groups_reason(model: ir.Model) -> str:
    """Why the channel graph has no group at all: no layer in the main graph, or layers only in subgraphs."""
    nested = sum(1 for g in iter_graphs(model.graph) if g is not model.graph
                 for n in g if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"))
    if nested:
        return f"{nested} Conv/Gemm/MatMul nodes are inside If/Loop/Scan bodies, which are not pruned"
    return "no Conv, Gemm or MatMul with a constant weight starts a channel space in the main graph"


def _blockers(groups: list[Group], exclude: list[str] | None = None) -> str:
    rows = []
    for g in groups:
        if exclude and any(matches_any(p.node, exclude) for p in g.producers):
            rows.append(f"'{g.name}' (excluded)")
        elif g.pinned and len(g.pinned) == g.size:
            rows.append(f"'{g.name}' ({next(iter(g.pinned.values()))})")
    more = f" and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return (", ".join(rows[:_MAX_LISTED]) + more) if rows else "min_channels/round_to limits"


class _MacModel:
    """MACs of the model as units are removed: each counted node scales by kept in/out fractions."""

    def __init__(self, cg: ChannelGraph, total: int) -> None:
        self.cg = cg
        self.total = total
        self.kept = {s.index: s.size for s in cg.spaces}
        self.removed = 0.0
        self._by_space: dict[int, list[int]] = {}
        for k, (_, _, sin, sout) in enumerate(cg.mac_nodes):
            for s in (sin, sout):
                if s is not None:
                    self._by_space.setdefault(s.index, []).append(k)

    def _node_macs(self, k: int) -> float:
        _, macs, sin, sout = self.cg.mac_nodes[k]
        f = 1.0
        for s in (sin, sout):
            if s is not None:
                f *= self.kept[s.index] / s.size
        return macs * f

    def unit_saving(self, unit: list[int]) -> float:
        saving = 0.0
        for s, n in self.cg.unit_counts(unit).items():
            for k in self._by_space.get(s, []):
                saving += self.cg.mac_nodes[k][1] * n / self.cg.spaces[s].size
        return saving

    def replace(self, old: list[int], new: list[int], g: Group) -> None:
        delta: dict[int, int] = {}
        for sign, units in ((1, old), (-1, new)):
            for u in units:
                for s, n in self.cg.unit_counts(g.units[u]).items():
                    delta[s] = delta.get(s, 0) + sign * n
        nodes = {k for s in delta for k in self._by_space.get(s, [])}
        before = sum(self._node_macs(k) for k in nodes)
        for s, d in delta.items():
            self.kept[s] += d
        after = sum(self._node_macs(k) for k in nodes)
        self.removed += before - after


# ====================================================================== helpers: compensation
def _compensations(cg: ChannelGraph, removed: set[int], means: dict[str, tuple[np.ndarray, np.ndarray]]
                   ) -> dict[int, tuple[Consumer, np.ndarray]]:
    """Bias change (full output length) per consumer, from the removed channels' constants or means."""
    out: dict[int, tuple[Consumer, np.ndarray]] = {}
    for c in cg.consumers:
        idx = np.array([i for i, e in enumerate(c.space.elements()) if e in removed], dtype=np.int64)
        if idx.size == 0:
            continue
        stat = means.get(c.space.value.name)
        m = stat[0][idx] if stat is not None else cg.consts(c.space)[idx]
        m = np.nan_to_num(m, nan=0.0)
        if not np.any(m):
            continue
        delta = _consumer_delta(c, idx, m)
        if delta is not None:
            prev = out.get(id(c.node))
            out[id(c.node)] = (c, delta if prev is None else prev[1] + delta)
    return out


def _consumer_delta(c: Consumer, idx: np.ndarray, m: np.ndarray) -> np.ndarray | None:
    """``W[:, idx] @ m`` per output channel, a conv's kernel summed over its window (None: not applicable)."""
    layer, _ = linear_of(c.node)
    if layer is None or layer.groups != 1:
        return None
    geometry = layer.geometry
    if c.kind == "convtranspose" and any(s != 1 for s in geometry.strides):  # type: ignore[union-attr]
        return None
    rows = layer.weights()
    per_input = rows.reshape(rows.shape[0], -1, math.prod(geometry.kernel) if geometry else 1).sum(-1)
    return per_input[:, idx] @ m


def _apply_compensations(graph: ir.Graph, cg: ChannelGraph, deltas: dict[int, tuple[Consumer, np.ndarray]],
                         masks: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    applied = {}
    for key, (c, delta) in deltas.items():
        out_space = cg.space_of(c.node.outputs[0])
        if out_space is not None:
            delta = delta[masks[out_space.index]]
        reason = add_to_bias(graph, c.node, delta.astype(np.float32))
        if reason:
            logger.warning("channels: no bias compensation for %s: %s", c.node.name or c.node.op_type, reason)
            continue
        applied[key] = delta
    return applied


def add_to_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> str | None:
    """Add a per-output-channel `delta` to the bias of a Conv/ConvTranspose/Gemm/MatMul (a MatMul's bias
    is the constant of the Add after it, created when missing); the reason when it cannot.

    A bias other nodes read too is copied for this node first."""
    layer, reason = linear_of(node)
    if layer is None:
        return reason or f"{node.op_type} is not a linear layer"
    return layer.write(graph, bias=layer.bias_values() + delta, copy_shared=True)


# ====================================================================== helpers: surgery
def remove_units(model: ir.Model, cg: ChannelGraph, removed: set[int], *,
                 means: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 compensate: bool = True) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Cut the elements `removed` (whole units of `cg`) out of `model`, compensating consumer biases.

    Returns the keep mask per space index and the bias change applied per consumer node id.
    """
    deltas = _compensations(cg, removed, means or {}) if compensate else {}
    masks = cg.keep_masks(removed)
    _cut(model, cg, masks)
    return masks, _apply_compensations(model.graph, cg, deltas, masks)


def _cut(model: ir.Model, cg: ChannelGraph, masks: dict[int, np.ndarray]) -> None:
    graph = model.graph
    for sl in cg.slices:
        mask = masks[sl.space.index]
        if mask.all():
            continue
        value = sl.node.inputs[sl.input_index]
        arr = constant_array(value)
        if arr is None or arr.ndim <= sl.axis or arr.shape[sl.axis] != mask.size:
            continue
        _replace_param(graph, sl.node, sl.input_index, np.compress(mask, arr, axis=sl.axis))
    for fx in cg.fixups:
        reason = _try_fixup(graph, fx, masks)
        if reason:
            raise ModelError(f"channels: cannot update {fx.node.name or fx.node.op_type}: {reason}")
    for space in cg.spaces:
        mask = masks[space.index]
        if mask.all() or space.value.shape is None:
            continue
        dims = list(space.value.shape.dims)
        dims[space.axis] = int(mask.sum())
        space.value.shape = ir.Shape(dims)


def _replace_param(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    value = node.inputs[index]
    if only_used_by(value, node):
        set_weight(value, array)
        return
    new = new_initializer(graph, value.name, array, origin=value.name)
    node.replace_input_with(index, new)


def _try_fixup(graph: ir.Graph, fx: Fixup, masks: dict[int, np.ndarray]) -> str | None:
    """Recompute a group count, Reshape shape, Split sizes or Slice bounds; the reason if it cannot."""
    node, kind, spaces, data = fx.node, fx.kind, fx.spaces, fx.data
    kept = [int(masks[s.index].sum()) for s in spaces]
    if all(masks[s.index].all() for s in spaces):
        return None
    if kind == "group":
        node.attributes["group"] = ir.AttrInt64("group", kept[0] // data["per_group"])
    elif kind == "reshape":
        if constant_array(node.inputs[1]) is None:
            return "its shape is no longer a constant"
        shape = np.asarray(constant_array(node.inputs[1])).copy()
        shape[data["index"]] = kept[0]
        _replace_param(graph, node, 1, shape.astype(np.int64))
    elif kind == "split":
        sizes = np.asarray(kept, dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            _replace_param(graph, node, 1, sizes)
        elif "split" in node.attributes or opset_version(graph, 17) < 13:
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in sizes])
        else:
            node.resize_inputs(2)
            node.replace_input_with(1, new_initializer(graph, f"{node.name or 'split'}.sizes", sizes))
    elif kind == "slice":
        mask = masks[spaces[0].index]
        k = data["k"]
        for index, bound in ((1, data["lo"]), (2, data["hi"])):
            arr = np.asarray(constant_array(node.inputs[index])).copy()
            arr[k] = int(mask[:bound].sum())
            _replace_param(graph, node, index, arr)
    return None


def _teacher_taps(model: ir.Model, cg: ChannelGraph, ctx: Context) -> TapSession:
    """A session on the model before surgery that taps every consumer's output."""
    names = sorted({c.node.outputs[0].name for c in cg.consumers if c.node.outputs and c.node.outputs[0].name})
    return TapSession(model, names, threads=ctx.threads)


def _refit_consumers(model: ir.Model, cg: ChannelGraph, masks: dict[int, np.ndarray],
                     comp: dict[int, np.ndarray], teacher: TapSession, ctx: Context, stats: PassStats) -> None:
    order = {id(n): k for k, n in enumerate(model.graph)}
    seen: set[int] = set()
    cut = [c for c in cg.consumers if not masks[c.space.index].all()]
    cut.sort(key=lambda c: order.get(id(c.node), 0))
    refitted = 0
    for c in cut:
        if id(c.node) in seen:
            continue
        seen.add(id(c.node))
        reason = refit_consumer(model, c, teacher, cg, masks, ctx, comp.get(id(c.node)))
        if reason:
            stats.skip(c.node, f"not reconstructed: {reason}")
        else:
            refitted += 1
    stats.summary["reconstructed_consumers"] = refitted

