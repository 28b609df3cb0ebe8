"""distill: teacher-guided layer-wise reconstruction of a compressed model, in closed form.

The model as it was before the pipeline (or the file given as ``teacher``) is the teacher, the
model being optimized the student, and the calibration feeds the transfer set. No training
framework: every layer is refit by ridge least squares from statistics streamed over ONNX Runtime
runs of both models (``XᵀX`` and ``XᵀY``, never the activations themselves).

Rewrite cases, in topological order (layers whose inputs do not depend on each other's refit are
fitted from the same runs, a *wave*):

1. **Dense layer** (Conv, Gemm, MatMul with a constant weight; a MatMul's bias is the constant of the
   Add right after it): its output, computed from the student's *own* inputs ``X``, is fitted to the
   teacher tensor it stands for (the name it kept, or its ``onnxopt.origin``; when the student
   computes that tensor without the teacher's activation, as a QDQ graph whose clamp stands for a
   Relu does, the activation's input):
   ``W = argmin ‖X̃W − Y‖² + λ‖W − W0‖²`` with ``X̃ = [X, 1]``, ``λ = ridge · mean diag(XᵀX)`` and the
   bias left free. Pulling toward the current weights ``W0`` (not toward zero) makes a layer that
   already matches its teacher a fixed point and keeps directions the transfer set never excites; a
   layer whose error is already below ``1e-5`` (relative L2) is left as is, so an uncompressed model
   comes out unchanged.
2. **Pruned layer** (zeros in the weight): the same fit per output channel over its nonzero entries
   only (masked least squares), so every zero stays exactly zero.
3. **Removed channels** (fewer output channels than the teacher tensor): each student channel is
   paired with the teacher filter it was copied from (the teacher row, BatchNorm folded, holding
   its values), else with the teacher channel its current output correlates with best (greedy,
   at least 0.5); channels without a partner keep their weights.
4. **Factorized layer** ``X → A → B`` (A's output has no teacher tensor and feeds only a pointwise B,
   with nothing in between): the pair is refit jointly by reduced-rank regression, the best rank-r
   map for ``r`` = A's output channels: ``W_r = V Vᵀ W`` with ``V`` the top eigenvectors of the
   fitted output covariance, ``A = Vᵀ W``, ``B = V``, and the bias in B.
5. **Quantized layer** (weight read through DequantizeLinear): refit in float, re-quantized with
   the same scale and zero point, then *bias correction*: the bias is refit for the re-quantized
   weights, ``b = ȳ − x̄·Ŵ``.

A refit is kept only when (a) fitted on the transfer feeds minus every ``1/holdout``-th one, it
lowers the layer's error on those held-out feeds, and (b) refit on all feeds, it lowers the error
on all of them (errors come from the statistics, after re-quantization). Otherwise the layer keeps
its weights and is listed as skipped with the reason.

With ``logits`` a final step fits the classifier head (the last layer, whose output is a 2-D graph
output) to the teacher's soft outputs: it minimizes ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``
over the head's free weights by gradient descent from the least-squares fit (same hold-out check),
holding the head's input features for at most ``max_samples`` samples.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt.analysis import infer_shapes
from onnxopt.analysis.fitting import Moments
from onnxopt.analysis.layers import Linear, linear_of
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import is_constant, origin_of, prepare_weights, require_finite
from onnxopt.io import load
from onnxopt.progress import progress
from onnxopt.registry import Pass, PassStats, matches_any, option, register_pass, run_pass
from onnxopt.runtime import TapSession, run_taps

from ._distill_fit import Fit, Pair, try_fit_soft, try_refit_linear, try_refit_pair

__all__ = ["Distill"]

logger = logging.getLogger(__name__)

_IM2COL_ROWS = 4096
_NOT_REFIT = ("ConvTranspose", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits")
_ACTIVATIONS = frozenset({"Relu", "Clip", "LeakyRelu", "Elu", "Selu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                          "Softplus", "Gelu"})


class _TeacherWeights:
    """The teacher's layer weights in row form with BatchNorm folded (as students have them), read on demand.

    Used to pair channels when a pass removed some: surviving filters keep their values.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._layers: dict[str, Linear] | None = None

    def rows(self, weight_name: str) -> np.ndarray | None:
        if self._layers is None:
            model = load(self.path, check=False)
            run_pass("fold", model)
            self._layers = {}
            for node in model.graph:
                layer, _ = _refittable(node)
                if layer is not None:
                    self._layers[layer.weight.name] = layer
        layer = self._layers.get(weight_name)
        return None if layer is None else layer.weights()


@dataclasses.dataclass
class _Unit:
    """What one refit touches: a single layer or a factor pair, and its teacher tensor."""

    layer: Linear | Pair
    teacher: str
    normal: Moments | None = None  # statistics of the feeds the refit is fitted on
    check: Moments | None = None  # statistics of the held-out feeds it is checked on
    failed: str | None = None

    @property
    def first(self) -> Linear:
        return self.layer.a if isinstance(self.layer, Pair) else self.layer

    @property
    def last(self) -> Linear:
        return self.layer.b if isinstance(self.layer, Pair) else self.layer


@register_pass("distill")
class Distill(Pass):
    """Refit Conv/Gemm/MatMul weights layer by layer to match the teacher's tensors (needs --calib)."""

    exact = False
    idempotent = False

    ridge: float = option(1e-2, "pull toward the current weights, relative to the mean diagonal of XᵀX (>= 0)")
    max_samples: int = option(1024, "calibration samples used at most (the transfer set)")
    layers: list[str] = option([], "refit only these layers (node names or op types, globs); empty: all")
    holdout: float = option(0.25, "share of transfer feeds held out to check each refit generalizes, in [0, 1)")
    logits: bool = option(False, "finally fit the classifier head to the teacher's soft outputs")
    T: float = option(4.0, "temperature of the soft outputs for the logits step (> 0)", when={"logits": True})
    teacher: str | None = option(None, "teacher model file (default: the model before the pipeline)")

    def __post_init__(self) -> None:
        if not (self.ridge >= 0 and np.isfinite(self.ridge)):
            raise UsageError(f"distill.ridge: {self.ridge} is not allowed (allowed: a finite number >= 0)")
        if self.max_samples < 1:
            raise UsageError(f"distill.max_samples: {self.max_samples} is not allowed (allowed: >= 1)")
        if not 0 <= self.holdout < 1:
            raise UsageError(f"distill.holdout: {self.holdout} is not allowed (allowed: 0 <= holdout < 1)")
        if not (self.T > 0 and np.isfinite(self.T)):
            raise UsageError(f"distill.T: {self.T} is not allowed (allowed: a finite number > 0)")

    def call(self, model: ir.Model, ctx: Context) -> PassStats:
        stats = PassStats()
        calib = ctx.require_calib("distill", "the transfer set: inputs the teacher and student both run on")
        teacher = self._load_teacher(ctx)
        _check_interface(model, teacher)
        transfer = _transfer_set(calib, self.max_samples)
        infer_shapes(model)
        model.graph.sort()
        teacher_values = _values_by_name(teacher)
        units = self._units(model, teacher_values, stats)
        waves = _waves(model, units)
        weights = _TeacherWeights(self._teacher_path(ctx))
        # The teacher does not change: one session tapping every paired tensor serves all waves.
        with TapSession(teacher, sorted({u.teacher for u in units}), threads=ctx.threads) as teacher_taps:
            for k, wave in enumerate(waves):
                _accumulate(model, teacher_taps, wave, transfer, self.holdout, ctx.threads,
                            f"distill {k + 1}/{len(waves)}")
                for unit in wave:
                    self._refit(model.graph, unit, stats, weights)
            if self.logits:
                self._fit_logits(model, teacher_taps, units, transfer, ctx.threads, stats)
        stats.modified = bool(stats.layers)
        if not units:
            stats.notes.append("nothing to refit: no Conv/Gemm/MatMul with a constant weight in the main graph "
                               "(layers inside If/Loop bodies and other operators are left as they are)")
        elif not stats.modified:
            stats.notes.append("no layer changed: each already matched its teacher, or its refit did not lower "
                               "the held-out error (see skipped)")
        stats.summary = _summary(stats.layers, len(units), transfer.num_samples, self.holdout, len(transfer))
        return stats

    # ------------------------------------------------------------------ setup
    def _teacher_path(self, ctx: Context) -> Path:
        path = Path(self.teacher) if self.teacher else ctx.original_path
        if path is None:
            raise UsageError("distill needs a teacher: run it after other passes or give distill.teacher=MODEL")
        return path

    def _load_teacher(self, ctx: Context) -> ir.Model:
        path = self._teacher_path(ctx)
        if not self.teacher:
            return ctx.original_model()  # loaded once per pipeline, shapes inferred
        teacher = load(path, check=False)
        prepare_weights(teacher, ctx.initializer_inputs)  # weights read as the student's are
        infer_shapes(teacher)
        return teacher

    def _units(self, model: ir.Model, teacher_values: dict[str, ir.Value], stats: PassStats) -> list[_Unit]:
        """Every layer to refit, with its teacher tensor; factor pairs joined; the rest skipped with a reason."""
        found: list[tuple[Linear, str | None, str | None]] = []
        names: list[str] = []
        for node in model.graph:
            layer, reason = _refittable(node)
            if layer is None:
                if reason:
                    stats.skip(node, reason)
                continue
            names.append(layer.name)
            if self.layers and not matches_any(node, self.layers):
                stats.skip(node, "not selected by distill.layers")
                continue
            name, reason = _teacher_tensor(layer, teacher_values)
            found.append((layer, name, reason))
        if self.layers and not found:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UsageError(f"distill.layers: {','.join(self.layers)} matches no layer (layers: {shown or 'none'})")
        by_input = {id(layer.x): layer for layer, name, _ in found if name is not None}
        units: list[_Unit] = []
        paired: set[int] = set()
        for layer, name, reason in found:
            if id(layer.node) in paired:
                continue
            if name is not None:
                units.append(_Unit(layer, name))
                continue
            partner = by_input.get(id(layer.y))
            why = _try_pair(layer, partner)
            if why is None and partner is not None:
                paired.add(id(partner.node))
                units.append(_Unit(Pair(layer, partner), _teacher_tensor(partner, teacher_values)[0] or ""))
            elif partner is None:
                stats.skip(layer.node, reason or "no teacher tensor")
            else:
                stats.skip(layer.node, f"{reason}; not a factor pair with {partner.name}: {why}")
        return units

    # ------------------------------------------------------------------ refit
    def _refit(self, graph: ir.Graph, unit: _Unit, stats: PassStats, weights: _TeacherWeights) -> None:
        if unit.failed or unit.normal is None:
            stats.skip(unit.first.node, unit.failed or "no transfer data reached it")
            return
        fit = Fit(unit.normal, unit.check, self.ridge)
        if isinstance(unit.layer, Pair):
            reason = try_refit_pair(graph, unit.layer, fit, stats, unit.teacher)
        else:
            reason = try_refit_linear(graph, unit.layer, fit, stats, unit.teacher, weights.rows)
        if reason:
            stats.skip(unit.first.node, reason)
        else:
            row = stats.layers[-1]
            logger.debug("refit %s: relative error %.4g -> %.4g", row["layer"], row["rel_err_before"],
                         row["rel_err_after"])

    def _fit_logits(
        self, model: ir.Model, teacher: TapSession, units: list[_Unit], transfer: Dataset, threads: int | None,
        stats: PassStats,
    ) -> None:
        head = _head(model, units)
        if head is None:
            stats.notes.append("logits: no classifier head (a layer whose output is a 2-D graph output)")
            return
        feats, logits, held = [], [], []
        names_s, names_t = [head.x.name], [head.y.name]
        runs = _paired_runs(model, teacher, names_s, names_t, transfer, threads, "distill logits")
        for index, (got_s, got_t) in enumerate(runs):
            x = head.features(got_s[head.x.name])
            feats.append(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1))
            logits.append(head.target(got_t[head.y.name]))
            held.append(np.full(x.shape[0], len(transfer) > 1 and _held_out(index, self.holdout)))
        x, z_t = np.concatenate(feats), np.concatenate(logits).astype(np.float64)
        reason = try_fit_soft(model.graph, head, x, z_t, np.concatenate(held), self.T, self.ridge, stats)
        if reason:
            stats.notes.append(f"logits: {reason}")


# ---------------------------------------------------------------------- setup helpers
def _refittable(node: ir.Node) -> tuple[Linear | None, str | None]:
    """The layer view of `node` when distill can refit it, else the reason ((None, None): not a layer)."""
    if node.op_type in _NOT_REFIT:
        return None, f"{node.op_type} is not refit (only Conv, Gemm and MatMul, float or QDQ)"
    layer, reason = linear_of(node)
    if layer is None:
        return None, reason
    if is_constant(layer.x):
        return None, "its input is a constant"
    if layer.bias_reason:
        return None, f"bias: {layer.bias_reason}"
    for kind, param in (("weight", layer.weight), ("bias", layer.bias)):
        shared = param.shared() if param is not None else None
        if shared:
            return None, f"{kind}: {shared}"
    if layer.bias is not None and layer.bias.size != layer.out_channels:
        return None, "bias is not one value per output channel"
    return layer, None


def _describe_io(values: list[ir.Value]) -> str:
    parts = []
    for v in values:
        dims = "?" if v.shape is None else ",".join(str(d) for d in v.shape.dims)
        parts.append(f"{v.name} {v.dtype}[{dims}]")
    return "; ".join(parts)


def _io_signature(values: list[ir.Value]) -> list[tuple]:
    sig = []
    for v in values:
        if v.const_value is not None:
            continue
        dims = None if v.shape is None else tuple(d if isinstance(d, int) else None for d in v.shape.dims)
        sig.append((v.name, v.dtype, None if dims is None else len(dims), dims))
    return sig


def _check_interface(student: ir.Model, teacher: ir.Model) -> None:
    """Raise when the student's graph inputs or outputs differ from the teacher's."""
    for kind, s_vals, t_vals in (("inputs", student.graph.inputs, teacher.graph.inputs),
                                 ("outputs", student.graph.outputs, teacher.graph.outputs)):
        if _io_signature(list(s_vals)) != _io_signature(list(t_vals)):
            raise ModelError(
                f"the student's {kind} ({_describe_io(list(s_vals))}) do not match the teacher's "
                f"({_describe_io(list(t_vals))})"
            )


def _transfer_set(calib: Dataset, max_samples: int) -> Dataset:
    """The first `max_samples` calibration samples (the last feed cut along the batch axis)."""
    feeds, labels, total = [], [], 0
    for feed, label in zip(calib.feeds, calib.labels):
        if total >= max_samples:
            break
        sizes = {a.shape[0] if a.ndim else None for a in feed.values()}
        size = sizes.pop() if len(sizes) == 1 else None
        if size is not None and total + size > max_samples:
            keep = max_samples - total
            feed = {k: a[:keep] for k, a in feed.items()}
            label = None if label is None else label[:keep]
            size = keep
        feeds.append(feed)
        labels.append(label)
        total += size or 1
    return Dataset(feeds, labels, calib.source)


def _values_by_name(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs if v.name}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def _teacher_tensor(layer: Linear, teacher_values: dict[str, ir.Value]) -> tuple[str | None, str | None]:
    """The teacher tensor `layer`'s output stands for, or why there is none."""
    name = origin_of(layer.y) or ""
    tv = teacher_values.get(name)
    if tv is None:
        return None, f"no teacher tensor '{name}'"
    source = tv.producer()
    while source is not None and source.op_type in _ACTIVATIONS and source.inputs and source.inputs[0] is not None:
        # The student computes this tensor without the activation (a quantized graph lets its QDQ clamp
        # stand for a Relu): compare before the teacher's activation.
        tv = source.inputs[0]
        name, source = tv.name or "", tv.producer()
    if tv.type is None:
        return None, f"teacher tensor '{name}' has no known type"
    s_shape, t_shape = layer.y.shape, tv.shape
    if s_shape is None or t_shape is None:
        return name, None
    if s_shape.rank() != t_shape.rank():
        return None, f"teacher tensor '{name}' has rank {t_shape.rank()}, the student's {s_shape.rank()}"
    axis = layer.channel_axis % s_shape.rank()
    for i, (a, b) in enumerate(zip(s_shape.dims, t_shape.dims)):
        if not (isinstance(a, int) and isinstance(b, int)):
            continue
        if (i == axis and a > b) or (i != axis and a != b):
            return None, f"teacher tensor '{name}' has shape {list(t_shape.dims)}, the student's {list(s_shape.dims)}"
    return name, None


def _try_pair(a: Linear, b: Linear | None) -> str | None:
    """None when `a` -> `b` is a factor pair the pass can refit jointly, else the reason."""
    if b is None:
        return "no teacher tensor and no factor partner"
    if a.groups != 1 or (b.geometry is not None and not b.geometry.pointwise):
        return "factor pair is not (any layer) -> (pointwise layer)"
    users = list(a.y.uses())
    if len(users) != 1 or users[0].node is not b.node or a.y.is_graph_output():
        return "first factor's output is used elsewhere too"
    if np.any(a.weight.read() == 0) or np.any(b.weight.read() == 0):
        return "factor pair with zeroed weights is not refit"
    return None


def _waves(model: ir.Model, units: list[_Unit]) -> list[list[_Unit]]:
    """Units grouped by how many refit layers lie upstream of their input (topological order)."""
    weight_nodes = set()
    for unit in units:
        weight_nodes.add(id(unit.first.node))
        weight_nodes.add(id(unit.last.node))
    depth: dict[int, int] = {}
    for node in model.graph:
        d_in = max((depth.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        d_out = d_in + (1 if id(node) in weight_nodes else 0)
        for out in node.outputs:
            depth[id(out)] = d_out
    levels: dict[int, list[_Unit]] = {}
    for unit in units:
        levels.setdefault(depth.get(id(unit.first.x), 0), []).append(unit)
    return [levels[k] for k in sorted(levels)]


# ---------------------------------------------------------------------- streaming
def _paired_runs(
    student: ir.Model, teacher: TapSession, names_s: list[str], names_t: list[str], feeds: Dataset,
    threads: int | None, desc: str,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    s_runs = run_taps(student, names_s, feeds, threads=threads)
    t_runs = (teacher.run(feed, names_t) for feed in feeds)
    try:
        yield from progress(zip(s_runs, t_runs), desc=desc, total=len(feeds))
    finally:
        s_runs.close()


def _held_out(index: int, share: float) -> bool:
    """Whether feed `index` is held out: every 1/share-th feed (none when share is 0)."""
    return int((index + 1) * share) > int(index * share)


def _accumulate(student: ir.Model, teacher: TapSession, wave: list[_Unit], feeds: Dataset, holdout: float,
                threads: int | None, desc: str) -> None:
    names_s = sorted({u.first.x.name for u in wave})
    names_t = sorted({u.teacher for u in wave})
    runs = _paired_runs(student, teacher, names_s, names_t, feeds, threads, desc)
    for index, (got_s, got_t) in enumerate(runs):
        held = len(feeds) > 1 and _held_out(index, holdout)
        for unit in wave:
            if unit.failed is None:
                unit.failed = _try_add_batch(unit, got_s[unit.first.x.name], got_t[unit.teacher], held)


def _try_add_batch(unit: _Unit, x: np.ndarray, y: np.ndarray, held: bool) -> str | None:
    """Add one feed's rows to the unit's statistics; return the reason when they do not fit together."""
    layer = unit.first
    if layer.op != "Conv":
        return _try_add_rows(unit, layer.features(x), unit.last.target(y), held)
    if len(x) != len(y):
        return f"{len(x)} input samples but {len(y)} teacher samples"
    step = max(1, _IM2COL_ROWS // max(int(np.prod(x.shape[2:])), 1))  # unfold a few samples at a time
    for start in range(0, len(x), step):
        try:
            feats = layer.features(x[start : start + step])
        except ValueError as exc:
            return f"cannot form input features: {exc}"
        reason = _try_add_rows(unit, feats, unit.last.target(y[start : start + step]), held)
        if reason:
            return reason
    return None


def _try_add_rows(unit: _Unit, feats: np.ndarray, target: np.ndarray, held: bool) -> str | None:
    if feats.shape[0] != target.shape[0]:
        return f"{feats.shape[0]} input rows but {target.shape[0]} teacher rows (shapes differ)"
    require_finite(feats, f"input of {unit.first.name} on the calibration data", "a refit needs finite features")
    require_finite(target, f"teacher tensor '{unit.teacher}' on the calibration data", "a refit needs finite targets")
    groups = unit.first.groups
    if unit.normal is None:
        unit.normal = Moments(feats.shape[1] // groups, target.shape[1], groups=groups, intercept=True)
        unit.check = Moments(feats.shape[1] // groups, target.shape[1], groups=groups, intercept=True)
    elif target.shape[1] != unit.normal.q.shape[0]:
        return "teacher channel count changed between feeds"
    (unit.check if held else unit.normal).add(feats, target)  # type: ignore[union-attr]
    return None


# ---------------------------------------------------------------------- logits
def _head(model: ir.Model, units: list[_Unit]) -> Linear | None:
    outputs = {id(v) for v in model.graph.outputs}
    for unit in reversed(units):
        layer = unit.last
        if id(layer.y) in outputs and layer.y.shape is not None and layer.y.shape.rank() == 2:
            return layer
    return None


def _summary(rows: list[dict], units: int, samples: int, holdout: float, feeds: int) -> dict:
    refit = [r for r in rows if "rel_err_before" in r]
    held = sum(_held_out(i, holdout) for i in range(feeds)) if feeds > 1 else 0
    summary: dict = {"layers_refit": len(refit), "layers_considered": units, "samples": samples,
                     "held_out_feeds": held}
    if refit:
        summary["mean_rel_err_before"] = float(np.mean([r["rel_err_before"] for r in refit]))
        summary["mean_rel_err_after"] = float(np.mean([r["rel_err_after"] for r in refit]))
    if any("kl_before" in r for r in rows):
        summary["logits_fitted"] = True
    return summary
