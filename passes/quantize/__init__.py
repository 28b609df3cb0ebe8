"""quantize: rewrite a float model into the integer forms ONNX Runtime fuses into integer kernels.

Modes and rewrite cases:

1. ``static`` (needs calibration data): QuantizeLinear/DequantizeLinear pairs around the activations
   of Conv, ConvTranspose, Gemm, MatMul and the data-movement and element-wise ops between them; weights
   become int8 initializers (symmetric, per channel on the op's output axis) feeding a
   DequantizeLinear, biases int32 with ``scale = scale_x * scale_w``. Relu/Clip(0, m) after a quantized
   producer is folded into that producer's range. See `static` for the op table (phase 1: mark),
   `qdq` for the insertion (phase 2) and `calib` for the scale / zero-point math and the calibration
   methods.
2. ``dynamic`` (no data): ``x -> DynamicQuantizeLinear -> MatMulInteger(x_q, W_q) -> Cast -> Mul(x_s*w_s)``
   for MatMul and Gemm with constant weights, W int8 symmetric per output column, and the same with
   ``ConvInteger`` (the Conv's attributes, a scalar weight zero point 0, per-output-channel scales in the
   Mul, bias added after) for 1-D to 3-D Conv (`dynamic`).
3. ``weight-only``: MatMul ``[K, N]`` weights in blocks of ``block_size`` along K, ``bits`` 4 or 8,
   symmetric, as a ``com.microsoft.MatMulNBits`` (`dynamic`).

Before quantizing, the pass runs what ``fold`` does (BatchNorm folding, constant folding) and shape
inference, since unfolded BatchNorm keeps ONNX Runtime from fusing (in dynamic and weight-only modes
only when the graph has BatchNorm/Constant/Identity/Dropout nodes, so big MatMul models are not
scanned). Static mode rewrites ``MatMul + Add(bias)`` on 2-D inputs into Gemm (exact) so the bias
becomes int32 and ONNX Runtime fuses QGemm; ``fallback=auto`` keeps the most sensitive nodes in float
until ``--tolerance`` holds (`fallback`). Accuracy helpers, each an option: ``equalize``
(cross-layer equalization, `cle`), ``smooth_alpha`` (SmoothQuant-style migration of activation
outliers after LayerNormalization into MatMul weights, `smooth`), ``gptq`` (error-compensating
rounding of Gemm/MatMul weights, `gptq`), ``bias_correction`` (the mean output shift of weight
rounding added back into the int32 biases, `bias`). Models below opset 13 are upgraded with onnx's
version converter for per-channel DequantizeLinear (``axis`` exists from 13); when that fails,
weights fall back to per-tensor scales and the report says so. A model that already holds
quantization ops is left as is. After rewriting, the model is loaded in ONNX Runtime and the integer
kernels of its optimized graph are counted (``check_fusion``, `check`).

The modules of this package are the steps; this one holds the pass and the order of the steps.

The pass is lossy (``exact = False``); the pipeline's validation reports the output error.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.analysis import infer_shapes
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import (
    constant_array,
    is_constant,
    is_default_domain,
    is_onnx_op,
    iter_graphs,
    only_used_by,
    opset_version,
    upgrade_opset,
)
from onnxopt.io import weight_bytes
from onnxopt.registry import Pass, PassStats, matches_any, option, register_pass, run_pass

from .bias import apply_shift, bias_targets, input_means, weight_shift
from .calib import Range, choose_range, collect_histograms, collect_minmax, weight_scales
from .check import INTEGER_KERNELS, fusion_check_skipped, fusion_report
from .cle import equalize_pairs
from .dynamic import apply_dynamic, apply_weight_only
from .fallback import OutputError, auto_fallback
from .gptq import accumulate_hessians, gptq_round
from .layout import weight_axis
from .qdq import apply_static, group_qparams
from .smooth import apply_smoothing, channel_absmax, smooth_targets
from .static import SUPPORTED_OPS, candidate_tensors, matmul_add_to_gemm, name_nodes, plan_static, quantizable_nodes

__all__ = ["Quantize", "QUANTIZED_OPS"]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = INTEGER_KERNELS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_PER_CHANNEL_OPSET = 13
_MIN_QDQ_OPSET = 10
_DYNAMIC_OPSET = 11
_FALLBACK_FEEDS = 8
_FOLDABLE = frozenset({"BatchNormalization", "Constant", "Identity", "Dropout"})


@dataclasses.dataclass
class _Applied:
    """What a static rewrite quantized: the compute nodes and their float input / weight names."""

    compute: list[ir.Node]
    inputs: dict[int, str]
    weights: dict[int, str]


@register_pass("quantize")
class Quantize(Pass):
    """Quantize to int8 QDQ (static, calibrated), dynamic int8, or blockwise int4/int8 weights (lossy)."""

    exact = False
    idempotent = True
    speed = True

    mode: Literal["static", "dynamic", "weight-only"] = option(
        "static", "static (needs --calib), dynamic or weight-only"
    )
    activations: Literal["uint8", "int8"] = option("uint8", "activation type: uint8 asymmetric or int8 symmetric",
                                                   when={"mode": "static"})
    calibrate: Literal["minmax", "percentile", "entropy", "mse"] = option("minmax", "how activation ranges are chosen",
                                                                          when={"mode": "static"})
    percentile: float = option(99.99, "percentile kept by calibrate=percentile (50 < p <= 100)",
                               when={"calibrate": "percentile", "mode": "static"})
    per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)",
                               when={"mode": ("static", "dynamic")})
    dynamic_conv: bool = option(False, "dynamic mode: Conv to ConvInteger too (4x smaller weights, but ONNX Runtime's "
                                "ConvInteger CPU kernel runs several times slower than a float Conv)",
                                when={"mode": "dynamic"})
    exclude: list[str] = option([], "node-name globs and op types left in float")
    concat_range_ratio: float = option(32.0, "leave a Concat in float when its inputs' ranges differ more than this",
                                       when={"mode": "static"})
    fold: bool = option(True, "fold BatchNorm and constants and infer shapes first (what ORT needs to fuse)")
    bits: int = option(4, "weight-only: bits per weight, 4 or 8", when={"mode": "weight-only"})
    block_size: int = option(32, "weight-only: weights per scale along K (a power of two >= 16)",
                             when={"mode": "weight-only"})
    fallback: Literal["none", "auto"] = option(
        "none", "auto: keep the most sensitive layers in float until --tolerance (rel L2) holds",
        when={"mode": "static"},
    )
    smooth_alpha: float = option(0.0, "static: SmoothQuant strength for LayerNorm -> MatMul/Gemm (0 = off, < 1)",
                                 when={"mode": "static"})
    gptq: bool = option(False, "static / weight-only: round Gemm/MatMul weights to minimize the layer output error",
                        when={"mode": ("static", "weight-only")})
    equalize: bool = option(False, "static: cross-layer equalize Conv -> [Relu] -> Conv pairs first (exact)",
                            when={"mode": "static"})
    bias_correction: bool = option(False, "static: shift each int32 bias by the mean output error it causes",
                                   when={"mode": "static"})
    check_fusion: bool = option(True, "load the result in ONNX Runtime and count the integer kernels it fuses")

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"quantize.bits: {self.bits} is not allowed (allowed 4, 8)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"quantize.block_size: {self.block_size} is not allowed (a power of two >= 16)")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"quantize.percentile: {self.percentile} is not allowed (50 < p <= 100)")
        if not 0.0 <= self.smooth_alpha < 1.0:
            raise UsageError(f"quantize.smooth_alpha: {self.smooth_alpha} is not allowed (0 <= alpha < 1)")
        if not self.concat_range_ratio > 1.0:
            raise UsageError(f"quantize.concat_range_ratio: {self.concat_range_ratio} is not allowed (> 1)")

    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        stats = PassStats()
        found = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})
        if found:
            stats.notes.append(f"model is already quantized ({', '.join(found)}); left as is")
            stats.summary = {"already_quantized": True}
            return stats
        ctx = ctx or Context()
        if self.mode == "static":
            calib = ctx.require_calib("quantize mode=static", "or --set quantize.mode=dynamic, which needs none")
            load_data(calib, input_specs(model))
        if self.fold and (self.mode == "static" or _has_foldable(model)):
            folded = run_pass("fold", model)
            stats.summary["folded_batchnorm"] = folded.summary.get("batchnorm_folded", 0)
        bytes_before = weight_bytes(model)
        infer_shapes(model)
        if self.mode == "static":
            counts = self._static(model, ctx, stats)
        elif self.mode == "dynamic":
            opset = opset_version(model)
            if opset < _DYNAMIC_OPSET and not _try_opset_upgrade(model, stats):
                raise ModelError(f"mode=dynamic needs opset {_DYNAMIC_OPSET} (DynamicQuantizeLinear); this model has "
                                 f"opset {opset} and onnx's version converter could not upgrade it")
            counts = apply_dynamic(model.graph, stats, exclude=self.exclude, per_channel=self.per_channel,
                                   conv=self.dynamic_conv)
        else:
            hessians = self._weight_only_hessians(model, ctx) if self.gptq else None
            counts = apply_weight_only(model, stats, exclude=self.exclude, bits=self.bits, block_size=self.block_size,
                                       hessians=hessians)
        stats.summary.update(counts)
        stats.summary["weight_bytes_before"] = bytes_before
        stats.summary["weight_bytes_after"] = weight_bytes(model)
        stats.modified = any(v for v in counts.values() if isinstance(v, int)) or bool(
            stats.summary.get("opset_upgraded"))
        if not any(v for k, v in counts.items() if isinstance(v, int) and k != "matmul_add_to_gemm"):
            stats.notes.append(_why_nothing(model, self.mode))
        if self.check_fusion and stats.modified and (skipped := fusion_check_skipped(model)):
            stats.notes.append(skipped)
        elif self.check_fusion and stats.modified:
            ctx.model_changed(model)  # a tapping session of the float model goes before ORT loads the result
            report = fusion_report(model, threads=ctx.threads)
            stats.summary.update({k: v for k, v in report.to_dict().items() if k != "ops"})
            stats.summary["ort_ops"] = report.ops
        return stats

    # ------------------------------------------------------------------------------ static
    def _static(self, model: ir.Model, ctx: Context, stats: PassStats) -> dict[str, int]:
        if self.fallback == "auto" and ctx.tolerance is None:
            raise UsageError("quantize.fallback=auto needs --tolerance T (the relative L2 error the outputs may have)")
        per_channel = self.per_channel and _try_opset_upgrade(model, stats)
        gemms = matmul_add_to_gemm(model.graph, stats, self.exclude)
        if gemms:
            infer_shapes(model)
        if self.equalize:
            stats.summary["equalized_pairs"] = equalize_pairs(model.graph, stats)
        if self.smooth_alpha > 0:
            stats.summary["smoothed_layernorms"] = self._smooth(model, ctx, stats)
        ranges = self._calibrate(model, ctx)
        stats.summary.update({"mode": "static", "calibrate": self.calibrate, "activations_type": self.activations,
                              "per_channel": per_channel, "calibration_feeds": len(ctx.calib or [])})
        rounded = self._gptq(model, ctx, stats, per_channel) if self.gptq else {}
        float_model = model.clone() if self.bias_correction else None
        if self.fallback == "auto":
            counts, applied = self._with_fallback(model, ctx, stats, ranges, per_channel, rounded)
        else:
            counts, applied = self._apply(model, stats, ranges, per_channel, self.exclude, rounded)
        counts["matmul_add_to_gemm"] = gemms
        if float_model is not None:
            counts["bias_corrected"] = self._correct_biases(model, float_model, ctx, stats, applied)
        return counts

    def _weight_only_hessians(self, model: ir.Model, ctx: Context) -> dict[str, np.ndarray]:
        """``XᵀX`` of the inputs of the MatMul/Gemm nodes, for GPTQ rounding in weight-only mode."""
        ctx.require_calib("quantize gptq=true", "GPTQ rounds against the calibration inputs")
        names = sorted({n.inputs[0].name for n in model.graph if n.op_type in ("MatMul", "Gemm")
                        and n.inputs[0] is not None and n.inputs[0].name and is_constant(n.inputs[1])
                        and not matches_any(n, self.exclude)})
        return accumulate_hessians(ctx.activations(model, names, desc="gptq"), names) if names else {}

    def _smooth(self, model: ir.Model, ctx: Context, stats: PassStats) -> int:
        """Migrate activation outliers after LayerNormalization into the MatMul weights (exact in float)."""
        targets = smooth_targets(model.graph, self.exclude, stats)
        if not targets:
            return 0
        names = [ln.outputs[0].name for ln, _ in targets]
        absmax = channel_absmax(ctx.activations(model, names, desc="smoothing"), names)
        done = 0
        for ln, users in targets:
            x_max = absmax.get(ln.outputs[0].name)
            gamma = constant_array(ln.inputs[1])
            if x_max is None or gamma is None or gamma.shape != x_max.shape:
                stats.skip(ln, "smooth: LayerNorm scale is not per channel of its output's last axis")
                continue
            apply_smoothing(ln, users, x_max, self.smooth_alpha)
            done += 1
        return done

    def _gptq(self, model: ir.Model, ctx: Context, stats: PassStats, per_channel: bool) -> dict[str, np.ndarray]:
        """int8 weights of the Gemm/MatMul layers rounded GPTQ-style, by weight name."""
        targets = []
        for node in model.graph:
            if node.op_type not in ("Gemm", "MatMul") or matches_any(node, self.exclude):
                continue
            w_value, x = node.inputs[1], node.inputs[0]
            w = constant_array(w_value)
            if w is None or w.ndim != 2 or w.dtype != np.float32 or x is None or not x.name:
                continue
            if not only_used_by(w_value, node) or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
                continue
            targets.append((node, w, x.name))
        if not targets:
            return {}
        names = sorted({t[2] for t in targets})
        hessians = accumulate_hessians(ctx.activations(model, names, desc="gptq"), names)
        rounded = {}
        for node, w, x_name in targets:
            by_rows = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            w_nk = w if by_rows else w.T
            axis = weight_axis(node, w, per_channel)
            scales = weight_scales(w, axis)
            scales = np.broadcast_to(scales, (w_nk.shape[0],)) if axis is not None else np.full(w_nk.shape[0], scales)
            h = hessians.get(x_name)
            if h is None or h.shape != (w_nk.shape[1], w_nk.shape[1]):
                stats.skip(node, "gptq: input width does not match the weight")
                continue
            q = gptq_round(w_nk, h, scales)
            rounded[node.inputs[1].name] = q if by_rows else np.ascontiguousarray(q.T)
        stats.summary["gptq_layers"] = len(rounded)
        return rounded

    def _correct_biases(self, model: ir.Model, float_model: ir.Model, ctx: Context, stats: PassStats,
                        applied: _Applied) -> int:
        targets = bias_targets(applied.compute)
        names = {applied.inputs[id(n)]: n.op_type for n in targets}
        if not targets:
            return 0
        means = input_means(ctx.activations(float_model, list(names), desc="bias correction"), names)
        done = 0
        for node in targets:
            w_value = float_model.graph.initializers.get(applied.weights[id(node)])
            mu = means.get(applied.inputs[id(node)])
            if w_value is None or mu is None:
                continue
            delta = weight_shift(node, np.asarray(w_value.const_value.numpy()), mu)
            if delta is not None and apply_shift(node, delta, stats):
                done += 1
                for row in stats.layers:
                    if row["node"] == (node.name or node.op_type):
                        row["bias_shift_max"] = float(np.max(np.abs(delta)))
        return done

    def _calibrate(self, model: ir.Model, ctx: Context) -> dict[str, Range]:
        names = candidate_tensors(model.graph, self.exclude)
        ranges = collect_minmax(ctx.activations(model, names, desc="calibrating (ranges)"), names)
        if self.calibrate != "minmax":
            hists = collect_histograms(ctx.activations(model, names, desc=f"calibrating ({self.calibrate})"), ranges)
            ranges = {n: choose_range(self.calibrate, hists[n], r, self.activations, percentile=self.percentile)
                      for n, r in ranges.items()}
        return ranges

    def _apply(self, model: ir.Model, stats: PassStats, ranges: dict[str, Range], per_channel: bool,
               exclude: list[str], rounded: dict[str, np.ndarray]) -> tuple[dict[str, int], _Applied]:
        plan = plan_static(model.graph, ranges, stats, exclude=exclude, per_channel=per_channel,
                           concat_range_ratio=self.concat_range_ratio)
        qps = group_qparams(plan, ranges, self.activations)
        applied = _Applied(list(plan.compute), {id(n): n.inputs[0].name for n in plan.compute},
                           {id(n): n.inputs[1].name for n in plan.compute})
        stats.layers = [{"node": node.name or node.op_type, "op": node.op_type, "weight": node.inputs[1].name,
                         "axis": axis} for node, _, axis in plan.weights]
        counts = apply_static(model.graph, plan, qps, rounded)
        counts["quantized_nodes"] = len(plan.compute) + len(plan.others)
        return counts, applied

    def _with_fallback(self, model: ir.Model, ctx: Context, stats: PassStats, ranges: dict[str, Range],
                       per_channel: bool, rounded: dict[str, np.ndarray]) -> tuple[dict[str, int], _Applied]:
        name_nodes(model.graph)
        base = model.clone()
        compute, others = quantizable_nodes(base.graph, self.exclude)
        units = compute + others  # element-wise and data-movement nodes can be the sensitive ones too

        def build(float_nodes: set[str]) -> ir.Model:
            candidate = base.clone()
            exclude = self.exclude + [glob.escape(n) for n in sorted(float_nodes)]
            self._apply(candidate, PassStats(), ranges, per_channel, exclude, rounded)
            return candidate

        feeds = (ctx.calib.feeds if ctx.calib is not None else [])[:_FALLBACK_FEEDS]
        result = auto_fallback(build, units, OutputError(base, feeds, ctx.threads), float(ctx.tolerance))
        exclude = self.exclude + [glob.escape(n) for n in result.float_nodes]
        counts, applied = self._apply(model, stats, ranges, per_channel, exclude, rounded)
        kept = set(result.float_nodes)
        for row in stats.skipped:
            if row["node"] in kept:
                row["reason"] = "kept in float by fallback=auto (among the most sensitive layers)"
        for row in stats.layers:
            row["sensitivity"] = result.sensitivity.get(row["node"])
        stats.summary.update({"fallback_float_nodes": result.float_nodes, "fallback_error": result.error,
                              "error_all_quantized": result.error_all_quantized})
        verdict = "holds" if result.reached else "could not be reached"
        stats.notes.append(f"fallback=auto: {len(result.float_nodes)} of {len(units)} quantized nodes kept in float; "
                           f"rel_l2 {result.error:.4g} on {len(feeds)} calibration feeds (all quantized: "
                           f"{result.error_all_quantized:.4g}); tolerance {ctx.tolerance:g} {verdict}")
        return counts, applied


def _why_nothing(model: ir.Model, mode: str) -> str:
    """One sentence on why a mode found nothing to quantize in `model`."""
    wanted = {"static": SUPPORTED_OPS, "dynamic": frozenset({"MatMul", "Gemm", "Conv"})}.get(
        mode, frozenset({"MatMul", "Gemm"}))
    main = [n for n in model.graph if is_onnx_op(n, *wanted)]
    subgraphs = [g for g in iter_graphs(model.graph) if g is not model.graph]
    nested = [n for g in subgraphs for n in g if n.op_type in wanted]
    foreign = sorted({n.domain for g in iter_graphs(model.graph) for n in g if not is_default_domain(n.domain)})
    if nested and not main:
        return (f"nothing quantized: the {len(nested)} {'/'.join(sorted({n.op_type for n in nested}))} nodes are "
                "inside If/Loop/Scan bodies, which this pass does not rewrite")
    if not main:
        extra = f" (its operators are from {', '.join(foreign)})" if foreign else ""
        return f"nothing quantized: the main graph has no node that mode={mode} quantizes{extra}"
    return "nothing quantized: every candidate node was declined (see skipped for the reasons)"


def _has_foldable(model: ir.Model) -> bool:
    """Whether `fold` has work in a MatMul model (checked cheaply, so big models skip its weight scan)."""
    return any(n.op_type in _FOLDABLE for n in model.graph.all_nodes())


def _try_opset_upgrade(model: ir.Model, stats: PassStats) -> bool:
    """Make per-channel DequantizeLinear legal (opset >= 13); False when weights must stay per-tensor."""
    opset = opset_version(model)
    if opset >= _PER_CHANNEL_OPSET:
        return True
    reason = upgrade_opset(model, _PER_CHANNEL_OPSET)
    if reason is None and opset_version(model) < _PER_CHANNEL_OPSET:
        reason = "the model imports no opset of the default domain"
    if reason is not None:
        if opset < _MIN_QDQ_OPSET:
            raise ModelError(f"opset {opset} has no QuantizeLinear and upgrading failed: {reason}")
        stats.notes.append(f"opset {opset} could not be upgraded to 13 ({reason}); weights use per-tensor scales")
        return False
    infer_shapes(model)
    stats.summary["opset_upgraded"] = True
    stats.notes.append(f"opset upgraded from {opset} to {_PER_CHANNEL_OPSET} for per-channel DequantizeLinear")
    return True
