"""quantize: rewrite a float model into the integer forms ONNX Runtime fuses into integer kernels.

Modes and rewrite cases:

1. ``static`` (needs calibration data): QuantizeLinear/DequantizeLinear pairs around the activations
   of Conv, ConvTranspose, Gemm, MatMul and the data-movement and element-wise ops between them; weights
   become int8 initializers (symmetric, per channel on the op's output axis) feeding a
   DequantizeLinear, biases int32 with ``scale = scale_x * scale_w``. Relu/Clip(0, m) after a quantized
   producer is folded into that producer's range. See `static` for the op table (phase 1: mark),
   `qdq` for the insertion (phase 2) and `calib` for the scale / zero-point math and the calibration
   methods (``calibrate=auto``, the default, builds the all-int8 model with minmax and with mse ranges and
   keeps the ranges whose outputs agree better with the float model on the calibration feeds).
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
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.analysis import infer_shapes
from onnxopt.analysis.stats import macs_by_node
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import (
    all_names,
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
from onnxopt.registry import (
    Pass,
    PassStats,
    exclude_patterns,
    layers_option,
    matches_any,
    option,
    register_pass,
    run_pass,
)

from . import speed
from .affine import fold_affine
from .bias import apply_shift, bias_targets, input_means, weight_shift
from .branches import branch_sites, quantize_branches
from .calib import Range, choose_range, collect_histograms, collect_ranges_and_samples, weight_scales
from .check import INTEGER_KERNELS, fusion_check_skipped, fusion_report
from .cle import equalize_pairs
from .dynamic import apply_dynamic, apply_weight_only
from .embedding import quantize_embeddings
from .emulate import Emulator
from .fallback import Reference, groups_of, node_costs, search
from .gptq import accumulate_hessians, gptq_round
from .guard import collapsed_tensors, float_chain
from .half import is_half, widen
from .layout import gemm_declined, stored_from_nk, weight_axis, weight_nk
from .qdq import apply_static, group_qparams
from .recurrent import MS_DOMAIN, lstm_declined, quantize_lstm
from .regions import sensitive_regions
from .score import Scores, Targets
from .smooth import apply_smoothing, channel_absmax, smooth_targets
from .static import SUPPORTED_OPS, candidate_tensors, matmul_add_to_gemm, name_nodes, plan_static

__all__ = ["Quantize", "QUANTIZED_OPS"]

logger = logging.getLogger(__name__)

QUANTIZED_OPS = INTEGER_KERNELS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_PER_CHANNEL_OPSET = 13
_MIN_QDQ_OPSET = 10
_DYNAMIC_OPSET = 11
_TARGET_HEADROOM = 0.5
_SAME_SPEED = 1.1
"""Latency ratios within this factor of each other are one speed to the variant choice (two-core timing noise)."""
# calibrate=auto compares these methods (minmax first: the collapse guard reads its ranges).
_AUTO_CALIBRATION = ("minmax", "mse")
_GELU_BLOCKWISE = "dynamic, GELU-fed MatMuls 8-bit blockwise"
_BLOCKWISE_SIZE = 128
"""Weights per scale of the blockwise GELU-fed MatMuls, and the block the kernel quantizes its input by. On
all-MiniLM-L6-v2 (one thread, in-process interleaved, against fp32): 32 0.54x at token-state cosine 0.9939, 64
0.515x 0.9944, 128 0.486x 0.9941, 256 0.459x 0.9923; all-dynamic 0.40x 0.9803. 128 is as accurate as 32."""
_SPEED_CHECK_MAX_BYTES = 1 << 30
_SPEED_CACHE_MAX_BYTES = 256 << 20
_FOLDABLE = frozenset({"BatchNormalization", "Constant", "Identity", "Dropout"})


@dataclasses.dataclass
class _Applied:
    """What a static rewrite quantized: the compute nodes and their float input / weight names, every
    quantized node's name, and the fused activations (tensor -> clamp bound)."""

    compute: list[ir.Node]
    inputs: dict[int, str]
    weights: dict[int, str]
    nodes: list[str] = dataclasses.field(default_factory=list)
    fused: dict[str, float | None] = dataclasses.field(default_factory=dict)


@register_pass("quantize")
class Quantize(Pass):
    """Quantize to int8 QDQ (static, calibrated), dynamic int8, or blockwise int4/int8 weights (lossy)."""

    exact = False
    _shared_pins = None  # not annotated: a class attribute, not a dataclass field (an option)
    """Set on the pass an If branch's run uses (`_for_branch`): the main run's set of the `float_nodes` names some
    graph's run matched; a branch's run adds to it and leaves the note on the others to the main run."""
    # Not idempotent by that contract: whether int8 is written depends on a timing of this machine
    # (require_speedup), so a second run on a model the first left float can measure int8 faster and quantize
    # it. A quantized model is left as is (already quantized), which is the idempotence that matters.
    idempotent = False
    speed = True

    mode: Literal["static", "dynamic", "weight-only"] = option(
        "static", "static (needs --calib), dynamic or weight-only"
    )
    activations: Literal["uint8", "int8"] = option("uint8", "activation type: uint8 asymmetric or int8 symmetric",
                                                   when={"mode": "static"})
    calibrate: Literal["auto", "minmax", "percentile", "entropy", "mse"] = option(
        "auto", "how activation ranges are chosen; auto: minmax or mse ranges, whichever model's outputs agree "
        "better with the float model on the calibration feeds (all int8)", when={"mode": "static"})
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
    gelu_matmuls: Literal["dynamic", "float", "blockwise"] = option(
        "dynamic", "dynamic mode: the MatMuls that read a GELU output: dynamic int8 like the rest, float, or 8-bit "
        "blockwise weights with the input quantized per block of 128 (MatMulNBits; a GELU tail then costs a block "
        "its resolution, not the whole activation)", when={"mode": "dynamic"})
    fold: bool = option(True, "fold BatchNorm and constants and infer shapes first (what ORT needs to fuse)")
    bits: int = option(4, "weight-only: bits per weight, 4 or 8", when={"mode": "weight-only"})
    block_size: int = option(32, "weight-only: weights per scale along K (a power of two >= 16)",
                             when={"mode": "weight-only"})
    accuracy_level: int = option(4, "weight-only: MatMulNBits' lowest compute precision (0 kernel default, 1 fp32, "
                                 "2 fp16, 3 bf16, 4 int8: inputs quantized per block, integer products, fastest)",
                                 when={"mode": "weight-only"})
    fallback: Literal["none", "auto"] = option(
        "auto", "static, auto: keep the fewest layer groups float that bring the outputs on calibration feeds within "
        "target_cosine / target_argmax (and --tolerance as rel L2); none: quantize all that can be",
        when={"mode": "static"}, untimed="none",  # the search has a time budget
    )
    fallback_budget: float = option(
        30.0, "static, fallback=auto: the search's time budget in seconds; when it runs out the best set found so "
        "far is used (less: a shorter run, maybe more layers float)", when={"mode": "static", "fallback": "auto"})
    target_cosine: float = option(0.99, "static, fallback=auto: the cosine every output keeps against the float model "
                                  "(0: none)", when={"mode": "static", "fallback": "auto"})
    target_argmax: float = option(0.99, "static, fallback=auto: the argmax agreement class-score outputs keep",
                                  when={"mode": "static", "fallback": "auto"})
    require_targets: bool = option(
        True, "static, fallback=auto: write the float model when int8 misses the targets even with the layers the "
        "search keeps float (false: write the closest int8 model found)", when={"mode": "static", "fallback": "auto"})
    float_nodes: list[str] = option([], "static: node names kept float as fallback=auto keeps them, after the exact "
                                    "rewrites (its report lists them; with fallback=none this pins a set)",
                                    when={"mode": "static"})
    require_speedup: bool = option(True, "time int8 against float in ONNX Runtime (the run's threads); static mode "
                                   "writes the float model when int8 is not faster, the other modes say so",
                                   untimed=False)
    smooth_alpha: float = option(0.0, "static: SmoothQuant strength for LayerNorm -> MatMul/Gemm (0 = off, < 1)",
                                 when={"mode": "static"})
    gptq: bool = option(False, "static / weight-only: round Gemm/MatMul weights to minimize the layer output error",
                        when={"mode": ("static", "weight-only")})
    equalize: bool = option(False, "static: cross-layer equalize Conv -> [Relu] -> Conv pairs first (exact)",
                            when={"mode": "static"})
    bias_correction: bool = option(False, "static: shift each int32 bias by the mean output error it causes",
                                   when={"mode": "static"})
    check_fusion: bool = option(True, "load the result in ONNX Runtime and count the integer kernels it fuses")
    layers: dict[str, dict[str, Any]] = layers_option()

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"quantize.bits: {self.bits} is not allowed (allowed 4, 8)")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"quantize.block_size: {self.block_size} is not allowed (a power of two >= 16)")
        if self.accuracy_level not in range(5):
            raise UsageError(f"quantize.accuracy_level: {self.accuracy_level} is not allowed (allowed 0-4)")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"quantize.percentile: {self.percentile} is not allowed (50 < p <= 100)")
        if not 0.0 <= self.smooth_alpha < 1.0:
            raise UsageError(f"quantize.smooth_alpha: {self.smooth_alpha} is not allowed (0 <= alpha < 1)")
        if not self.concat_range_ratio > 1.0:
            raise UsageError(f"quantize.concat_range_ratio: {self.concat_range_ratio} is not allowed (> 1)")
        if not self.fallback_budget > 0.0:
            raise UsageError(f"quantize.fallback_budget: {self.fallback_budget} is not allowed (> 0)")
        if not 0.0 <= self.target_cosine <= 1.0:
            raise UsageError(f"quantize.target_cosine: {self.target_cosine} is not allowed (0 <= t <= 1)")
        if not 0.0 <= self.target_argmax <= 1.0:
            raise UsageError(f"quantize.target_argmax: {self.target_argmax} is not allowed (0 <= t <= 1)")

    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        if self.layers:  # a node its layers entry skips is excluded by name
            return dataclasses.replace(self, exclude=exclude_patterns(self, model), layers={}).call(model, ctx)
        stats = PassStats()
        found = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in QUANTIZED_OPS})
        if found:
            stats.notes.append(f"model is already quantized ({', '.join(found)}); left as is")
            stats.summary = {"already_quantized": True}
            return stats
        ctx = ctx or Context()
        in_branch = self._shared_pins is not None
        self._pins_found: set[str] = self._shared_pins if in_branch else set()
        if self.mode == "static":
            calib = ctx.require_calib("quantize mode=static", "or --set quantize.mode=dynamic, which needs none")
            load_data(calib, input_specs(model))
        # The model as given, to write back when nothing is quantized or int8 is not faster. Past the size the
        # speed check times, dynamic and weight-only modes keep no copy (it would keep every float weight alive).
        given_bytes = weight_bytes(model)
        keep_given = self.mode == "static" or given_bytes <= _SPEED_CHECK_MAX_BYTES
        given = model.clone() if keep_given else None
        # float16 in static and dynamic mode is computed in float32 (their integer kernels read float32); dynamic
        # mode widens only a model it keeps a copy of, to give back if nothing is quantized. weight-only's
        # MatMulNBits computes in float16 as is.
        if (self.mode == "static" or (self.mode == "dynamic" and given is not None)) and is_half(model):
            widened = widen(model)
            stats.summary["float16_widened"] = widened
            widen_note = (f"float16 model: quantized from float32 ({widened} float16 tensors widened, exact; inputs "
                          "and outputs stay float16), as ONNX Runtime's CPU provider computes most float16 nodes")
            stats.notes.append(widen_note)
            ctx.model_changed(model)
        self._float_reason: str | None = None
        folded_any = False
        if self.fold and (self.mode == "static" or _has_foldable(model)):
            folded = run_pass("fold", model)
            stats.summary["folded_batchnorm"] = folded.summary.get("batchnorm_folded", 0)
            folded_any = folded.modified
            if folded.modified:
                ctx.model_changed(model)
        # a widened float16 model's weights are counted as given, not as the float32 copy quantized from
        bytes_before = given_bytes if stats.summary.get("float16_widened") else weight_bytes(model)
        infer_shapes(model)
        self._measured: speed.SpeedComparison | None = None
        self._measured_single: speed.SpeedComparison | None = None
        self._transformer = False
        if self.mode == "static":
            # The model before static rewrites, for the dynamic variants of a transformer only: a copy of every
            # weight is not kept for the models that never compare modes.
            compares = self.fallback == "auto" and any(r.kind == "attention" for r in sensitive_regions(model.graph))
            prepared = model.clone() if compares else None
            counts = self._static(model, ctx, stats)
            if (prepared is not None and self._transformer and not self._float_reason
                    and counts.get("quantized_nodes")):
                counts = self._static_or_dynamic(model, prepared, given, ctx, stats, counts)
            if (self.fallback == "auto" and self.require_targets and stats.summary.get("targets_met") is False
                    and not self._float_reason):
                self._float_reason = ("int8 misses the accuracy targets on the calibration feeds (see the WARNING); "
                                      "wrote the float model (quantize.require_targets=false writes the closest int8 "
                                      "model found)")
            if stats.summary.get("mode") == "static" and not self._float_reason:
                # the whole model's fusion check below covers the branches: none per branch
                branches = quantize_branches(self._for_branch, model, ctx, stats, _WEIGHTED)
                if branches:
                    counts["if_branches_quantized"] = branches
                    self._measured = self._measured_single = None  # timed before the branches changed
                    ctx.model_changed(model)
            if not in_branch:
                self._say_unmatched(model, stats)
        elif self.mode == "dynamic":
            opset = opset_version(model)
            if opset < _DYNAMIC_OPSET and not _try_opset_upgrade(model, stats):
                raise ModelError(f"mode=dynamic needs opset {_DYNAMIC_OPSET} (DynamicQuantizeLinear); this model has "
                                 f"opset {opset} and onnx's version converter could not upgrade it")
            counts = self._dynamic(model, stats)
        else:
            hessians = self._weight_only_hessians(model, ctx) if self.gptq else None
            counts = apply_weight_only(model, stats, exclude=self.exclude, bits=self.bits, block_size=self.block_size,
                                       hessians=hessians, accuracy_level=self.accuracy_level)
            stats.summary.update({"mode": "weight-only", "bits": self.bits, "block_size": self.block_size,
                                  "accuracy_level": self.accuracy_level})
            counts["embeddings_quantized"] = quantize_embeddings(model.graph, stats, self.exclude)
        stats.summary.update(counts)
        stats.summary["weight_bytes_before"] = bytes_before
        stats.summary["weight_bytes_after"] = weight_bytes(model)
        quantized = any(v for k, v in counts.items() if isinstance(v, int) and k != "matmul_add_to_gemm")
        if not quantized:
            stats.notes.append(_why_nothing(model, self.mode))
            if given is not None:
                _restore(model, given, stats)
                if stats.summary.pop("float16_widened", None) is not None:  # given back as float16: nothing to say
                    stats.notes.remove(widen_note)
            else:  # a big model keeps the exact folds it got
                stats.modified = folded_any or bool(stats.summary.get("opset_upgraded"))
            return stats
        reason = self._float_reason or (self._speed_check(model, given, ctx, stats) if given is not None else None)
        if reason:
            stats.notes.append(reason)
            stats.summary["wrote_float_model"] = reason
            _restore(model, given, stats)
            return stats
        stats.modified = True
        if self.check_fusion and (skipped := fusion_check_skipped(model)):
            stats.notes.append(skipped)
        elif self.check_fusion:
            ctx.model_changed(model)  # a tapping session of the float model goes before ORT loads the result
            report = fusion_report(model, threads=ctx.threads)
            stats.summary.update({k: v for k, v in report.to_dict().items() if k != "ops"})
            stats.summary["ort_ops"] = report.ops
        return stats

    def _targets(self, ctx: Context, *, headroom: bool = True) -> Targets:
        """The targets the search aims at on the calibration feeds. Argmax agreement is counted on a few hundred
        positions at most, so the search aims halfway between `target_argmax` and perfect, for data the
        calibration never saw to still meet it; cosine and rel L2 are aimed at as given."""
        argmax = 1 - (1 - self.target_argmax) * (_TARGET_HEADROOM if headroom and self.target_argmax > 0 else 1.0)
        return Targets(self.target_cosine, argmax, ctx.tolerance)

    def _dynamic(self, model: ir.Model, stats: PassStats, gelu: str | None = None) -> dict[str, int]:
        """Dynamic mode: MatMul/Gemm (and Conv on request) with DynamicQuantizeLinear, LSTMs, embedding tables; the
        MatMuls that read a GELU output as `gelu` says (default: the `gelu_matmuls` option)."""
        gelu = gelu or self.gelu_matmuls
        exclude = list(self.exclude)
        fed = []
        if gelu != "dynamic":
            name_nodes(model.graph)  # excluded by name
            fed = [n.name for n in gelu_fed_matmuls(model.graph)]
            exclude += [glob.escape(n) for n in fed]
        counts = apply_dynamic(model.graph, stats, exclude=exclude, per_channel=self.per_channel,
                               conv=self.dynamic_conv)
        counts["lstm_quantized"] = len(self._lstms(model, stats, exclude, {}))
        counts["embeddings_quantized"] = quantize_embeddings(model.graph, stats, exclude)
        if gelu == "blockwise" and fed:
            # 8-bit blockwise weights with integer compute: the input is quantized per block along K
            blockwise = apply_weight_only(model, stats, exclude=self.exclude, bits=8, block_size=_BLOCKWISE_SIZE,
                                          accuracy_level=4)
            counts["blockwise_int8_matmuls"] = blockwise["quantized_nodes"]
        return counts

    def _static_or_dynamic(self, model: ir.Model, prepared: ir.Model, given: ir.Model, ctx: Context,
                           stats: PassStats, counts: dict[str, int]) -> dict[str, int]:
        """A transformer: build the dynamic model too, and keep whichever meets the targets and runs faster."""
        if opset_version(prepared) < _DYNAMIC_OPSET:
            return counts
        # Dynamic, and dynamic with the MatMuls that read a GELU output left float or blockwise: DynamicQuantizeLinear
        # gives a whole activation one scale, and a GELU output's long positive tail leaves its many small values few
        # levels.
        variants = {"dynamic": "dynamic"}
        stats.summary["gelu_fed_matmuls"] = len(gelu_fed_matmuls(prepared.graph))
        if stats.summary["gelu_fed_matmuls"]:
            variants["dynamic, GELU-fed MatMuls float"] = "float"
            variants[_GELU_BLOCKWISE] = "blockwise"
        built = {}
        for label, gelu in variants.items():
            candidate = prepared.clone()
            cand_stats = PassStats()
            built[label] = (candidate, cand_stats, self._dynamic(candidate, cand_stats, gelu))
        targets = self._targets(ctx)
        # The static step's reference is of the same float model (its rewrites are exact): reuse it.
        check = self._reference or Reference(prepared, ctx.require_calib("quantize").feeds, threads=ctx.threads)
        feed = ctx.require_calib("quantize").feeds[0]
        candidates = [("static", model)] + [(k, v[0]) for k, v in built.items()]
        rows = {}
        for label, candidate in candidates:
            # the static model's scores were measured when the fallback wrote it
            scores = self._static_scores if label == "static" and self._static_scores else check.scores(candidate)
            rows[label] = [scores.shortfall(targets), 1.0, scores, None, None]
        # Only the variants the choice is between are timed: those that meet the targets, when two or more do
        # (one alone, or the closest when none does, is chosen whatever its speed; the speed check times it).
        met = [label for label, row in rows.items() if row[0] == 0]
        for label, candidate in candidates:
            if self.require_speedup and len(met) > 1 and label in met:
                rows[label][3] = speed.measure(given, candidate, feed, threads=ctx.threads)
                rows[label][1] = rows[label][3].ratio if rows[label][3] else 1.0
        if self.require_speedup and ctx.threads != 1:
            # The variants that meet the targets are timed with one thread too and ranked on both ratios (their
            # geometric mean): with two threads on two cores the ranking alone moves by 10-30 % between runs.
            for label, candidate in candidates:
                row = rows[label]
                if row[0] == 0 and row[3] is not None:
                    row[4] = speed.measure(given, candidate, feed, threads=1)
                    if row[4] is not None:
                        row[1] = float(np.sqrt(row[3].ratio * row[4].ratio))
        sizes = {"static": weight_bytes(model), **{k: weight_bytes(v[0]) for k, v in built.items()}}
        pick = _pick_variant({k: (v[0], v[2].cosine, v[1], sizes[k]) for k, v in rows.items()})
        said = "; ".join(f"{k}: {v[2].describe()}" + (f", {v[3].ratio:.2f}x float latency" if v[3] else "")
                         + (f" ({v[4].ratio:.2f}x with one thread)" if v[4] else "") for k, v in rows.items())
        stats.summary["transformer_modes"] = {
            k: {**v[2].to_dict(), "latency_ratio": v[3].ratio if v[3] else None,
                **({"latency_ratio_one_thread": v[4].ratio} if v[4] else {})} for k, v in rows.items()}
        self._measured = rows[pick][3]
        self._measured_single = rows[pick][4]
        stats.summary["targets_met"] = rows[pick][0] == 0
        if pick == "static":
            stats.notes.append(f"transformer: static int8 kept ({said})")
            return counts
        stats.notes.append(f"transformer: {pick} chosen over static ({said}); quantize.fallback=none "
                           "keeps static int8")
        dyn, dyn_stats, dyn_counts = built[pick]
        model.graph = dyn.graph
        model.opset_imports.update(dyn.opset_imports)
        stats.layers, stats.skipped = dyn_stats.layers, dyn_stats.skipped
        stats.summary.update(dyn_stats.summary)
        stats.summary["mode"] = "dynamic"
        stats.summary["gelu_matmuls"] = variants[pick]  # mode=dynamic with this option builds the same model
        return dyn_counts

    def _speed_check(self, model: ir.Model, given: ir.Model, ctx: Context, stats: PassStats) -> str | None:
        """Time the int8 model against the float model given to the pass (ONNX Runtime, the run's threads).

        Returns why the float model is written instead (static mode, ``require_speedup``), else None; in the
        other modes a slower result is only said.
        """
        if not self.require_speedup:
            return None
        size = weight_bytes(given)
        if size > _SPEED_CHECK_MAX_BYTES:
            stats.notes.append(f"speed not checked: the model holds {size / 2**30:.1f} GB of weights")
            return None
        try:
            feed = (ctx.calib.feeds[0] if ctx.calib is not None and len(ctx.calib)
                    else load_data("random:1", input_specs(given), dims=ctx.dims).feeds[0])
            result = self._measured or speed.measure(given, model, feed, threads=ctx.threads,
                                                     cache=size <= _SPEED_CACHE_MAX_BYTES)
        except (ModelError, UsageError) as exc:
            stats.notes.append(f"speed not checked: {first_line(exc)}")
            return None
        if result is None:
            stats.notes.append(f"speed not checked: one float run takes more than {speed.MAX_RUN_S:g}s")
            return None
        threads = f"{ctx.threads} threads" if ctx.threads else "default threads"
        stats.summary["speed_ratio"] = round(result.ratio, 3)
        stats.summary["speed_quartiles"] = [round(result.low, 3), round(result.high, 3)]
        single = None
        if ctx.threads != 1 and (result.faster(speed.MARGIN) or result.undecided(speed.MARGIN)):
            # With several threads, one thread too (a server running one request per core): int8 that is only
            # faster while the threads share the float model's work must be faster there too; and
            # where the run's threads cannot tell (a small model timed with two threads on two cores), one
            # thread decides.
            single = self._measured_single or speed.measure(given, model, feed, threads=1,
                                                            cache=size <= _SPEED_CACHE_MAX_BYTES)
            if single is not None:
                stats.summary["speed_ratio_one_thread"] = round(single.ratio, 3)
        if result.faster(speed.MARGIN):
            # one thread must show the same margin: a gain of a few percent there is what two threads on two cores
            # move by between runs (PP-OCRv4 rec's dynamic variant, 0.96-0.98x with one thread, read 0.9-1.15x
            # with two)
            if single is None or single.faster(speed.MARGIN):
                return None
            result, threads = single, "one thread"
        elif single is not None and single.faster(speed.MARGIN) and not single.undecided(speed.MARGIN):
            stats.notes.append(f"speed: with {threads} int8 measured {result.describe()} of the float latency, "
                               f"which does not tell; with one thread {single.describe()}: int8 kept")
            return None
        said = (f"int8 is not faster than float on this machine: {result.describe()} of the float latency "
                f"(ONNX Runtime, {threads})")
        if single is not None and result is not single:
            said += f"; with one thread {single.describe()}"
        if self.mode == "static":
            return f"{said}; wrote the float model (quantize.require_speedup=false keeps int8)"
        stats.notes.append(f"{said}; the {self.mode} model is written for its size")
        stats.summary["slower_than_float"] = True
        return None

    # ------------------------------------------------------------------------------ static
    def _static(self, model: ir.Model, ctx: Context, stats: PassStats) -> dict[str, int]:
        self._reference: Reference | None = None
        self._all_int8_outputs: list[list[np.ndarray]] | None = None
        self._static_scores: Scores | None = None  # the written static model's, when the fallback measured them
        per_channel = self.per_channel and _try_opset_upgrade(model, stats)
        affine = fold_affine(model.graph, self.exclude) if self.fold else {}
        stats.summary.update(affine)
        gemms = matmul_add_to_gemm(model.graph, stats, self.exclude)
        if gemms:
            infer_shapes(model)
        if self.equalize:
            stats.summary["equalized_pairs"] = equalize_pairs(model.graph, stats)
        if gemms or self.equalize or any(affine.values()):
            ctx.model_changed(model)  # the rewrites above changed the model: tap it as it is now
        if self.smooth_alpha > 0:
            stats.summary["smoothed_layernorms"] = self._smooth(model, ctx, stats)
            ctx.model_changed(model)
        name_nodes(model.graph)
        candidates, samples = self._calibrate(model, ctx)
        stats.summary.update({"mode": "static", "calibrate": self.calibrate, "activations_type": self.activations,
                              "per_channel": per_channel, "calibration_feeds": len(ctx.calib or [])})
        # The collapse guard reads the widest ranges (minmax's when auto compares methods).
        kept = self._kept_float(model.graph, next(iter(candidates.values())), samples, stats)
        kept.update(self._pinned(model.graph))
        rounded = self._gptq(model, ctx, stats, per_channel) if self.gptq else {}
        float_model = model.clone()
        ctx.model_changed(model)  # its tapping session goes before other sessions load (it is rewritten next)
        ranges = (self._choose_ranges(float_model, ctx, stats, candidates, per_channel, kept, rounded)
                  if len(candidates) > 1 else next(iter(candidates.values())))
        if self.fallback == "auto":
            kept = self._measure_guard(float_model, ctx, stats, ranges, per_channel, kept, rounded)
        skipped = len(stats.skipped)
        counts, applied = self._apply(model, stats, ranges, per_channel, self.exclude, rounded, kept)
        if self.fallback == "auto" and applied.nodes:
            extra = self._fallback(model, float_model, ctx, stats, ranges, per_channel, kept, applied)
            self._static_scores = self._all_int8_scores
            if extra:
                first = (counts, applied, stats.skipped[skipped:], stats.layers)
                del stats.skipped[skipped:]
                rebuilt = float_model.clone()
                counts, applied = self._apply(rebuilt, stats, ranges, per_channel, self.exclude, rounded,
                                              {**kept, **extra})
                final = self._reference.scores(rebuilt)
                stats.summary["fallback_scores"] = final.to_dict()
                wanted = self._targets(ctx, headroom=False)
                if final.shortfall(wanted) > self._all_int8_scores.shortfall(wanted):
                    # The emulation misjudged these kernels: the float nodes it chose made the real outputs worse.
                    stats.notes.append(f"fallback=auto: with those {len(extra)} nodes float ONNX Runtime's int8 "
                                       f"kernels give {final.describe()} on the calibration feeds, further from the "
                                       f"targets than all int8 ({self._all_int8_scores.describe()}): all int8 kept")
                    stats.summary["fallback_reverted"] = True
                    stats.notes = [n for n in stats.notes if not n.startswith(_MISSED)]
                    if self._all_int8_scores.shortfall(wanted) > 0:
                        stats.notes.append(_missed(wanted, "the all-int8 model", self.require_targets))
                        stats.summary["targets_met"] = False
                    stats.summary["fallback_float_nodes"] = []
                    counts, applied, stats.skipped[skipped:], stats.layers = first
                else:
                    model.graph = rebuilt.graph
                    model.opset_imports.update(rebuilt.opset_imports)
                    self._static_scores = final
                    if final.shortfall(wanted) > 0:
                        stats.notes.append(f"fallback=auto: ONNX Runtime's int8 kernels give {final.describe()} on "
                                           "the calibration feeds, short of the targets its QDQ emulation met")
        counts["matmul_add_to_gemm"] = gemms
        if self.bias_correction:
            counts["bias_corrected"] = self._correct_biases(model, float_model, ctx, stats, applied)
            self._static_scores = None  # the biases changed the outputs
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
            if not only_used_by(w_value, node) or (node.op_type == "Gemm" and gemm_declined(node)):
                continue
            targets.append((node, w, x.name))
        if not targets:
            return {}
        names = sorted({t[2] for t in targets})
        hessians = accumulate_hessians(ctx.activations(model, names, desc="gptq"), names)
        rounded = {}
        for node, w, x_name in targets:
            w_nk = weight_nk(node, w)
            axis = weight_axis(node, w, per_channel)
            scales = weight_scales(w, axis)
            scales = np.broadcast_to(scales, (w_nk.shape[0],)) if axis is not None else np.full(w_nk.shape[0], scales)
            h = hessians.get(x_name)
            if h is None or h.shape != (w_nk.shape[1], w_nk.shape[1]):
                stats.skip(node, "gptq: input width does not match the weight")
                continue
            q = gptq_round(w_nk, h, scales)
            rounded[node.inputs[1].name] = stored_from_nk(node, q)
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

    def _calibrate(self, model: ir.Model, ctx: Context) -> tuple[dict[str, dict[str, Range]], dict[str, np.ndarray]]:
        """Each candidate tensor's range by calibration method (one method, or the methods `auto` compares, minmax
        first), and values sampled from each tensor (for the collapse guard)."""
        names = candidate_tensors(model.graph, self.exclude)
        feeds = len(ctx.calib or [])
        ranges, samples = collect_ranges_and_samples(ctx.activations(model, names, desc="calibrating (ranges)"),
                                                     names, feeds)
        methods = _AUTO_CALIBRATION if self.calibrate == "auto" and names else (self.calibrate,)
        found = {}
        hists = None
        for method in methods:
            if method == "minmax":
                found[method] = ranges
                continue
            if hists is None:
                label = "histograms" if self.calibrate == "auto" else self.calibrate
                hists = collect_histograms(ctx.activations(model, names, desc=f"calibrating ({label})"), ranges)
            found[method] = {n: choose_range(method, hists[n], r, self.activations, percentile=self.percentile)
                             for n, r in ranges.items()}
        return found, samples

    def _choose_ranges(self, float_model: ir.Model, ctx: Context, stats: PassStats,
                       candidates: dict[str, dict[str, Range]], per_channel: bool, kept: dict[str, str],
                       rounded: dict[str, np.ndarray]) -> dict[str, Range]:
        """calibrate=auto: build the all-int8 model with each method's ranges and keep the ranges whose outputs
        come closest to the targets on the calibration feeds (then the higher cosine, the lower rel L2)."""
        check = self._reference_for(float_model, ctx)
        targets = self._targets(ctx)
        scored, outputs = {}, {}
        for method, ranges in candidates.items():
            outputs[method] = self._trial_outputs(float_model, check, ranges, per_channel, rounded, kept)
            scored[method] = check.compare(outputs[method])
        best = min(scored, key=lambda m: (scored[m].shortfall(targets), -scored[m].cosine, scored[m].rel_l2))
        self._all_int8_outputs = outputs[best]
        stats.summary["calibrate_chosen"] = best
        stats.summary["calibrate_scores"] = {m: s.to_dict() for m, s in scored.items()}
        others = "; ".join(f"{m}: {s.describe()}" for m, s in scored.items() if m != best)
        stats.notes.append(f"calibrate=auto: {best} ranges ({scored[best].describe()} all int8 on "
                           f"{len(check.feeds)} calibration feeds; {others})")
        return candidates[best]

    def _measure_guard(self, float_model: ir.Model, ctx: Context, stats: PassStats, ranges: dict[str, Range],
                       per_channel: bool, kept: dict[str, str], rounded: dict[str, np.ndarray]) -> dict[str, str]:
        """`kept` without the collapse guard's float chains when the all-int8 model with them quantized too meets
        the targets on the calibration feeds: a tensor near the guard's line whose small values do not matter
        downstream (a residual branch beside a larger one) is quantized after all. Else `kept` as it is."""
        guarded = {name for name, why in kept.items() if why == _GUARDED}
        if not guarded:
            return kept
        check = self._reference_for(float_model, ctx)
        guarded_outputs = self._all_int8_outputs or self._trial_outputs(float_model, check, ranges, per_channel,
                                                                        rounded, kept)
        self._all_int8_outputs = guarded_outputs
        rest = {name: why for name, why in kept.items() if name not in guarded}
        outputs = self._trial_outputs(float_model, check, ranges, per_channel, rounded, rest)
        scores, base = check.compare(outputs), check.compare(guarded_outputs)
        targets = self._targets(ctx)
        harmless = (scores.shortfall(targets) == 0
                    and scores.rel_l2 <= max(_GUARD_LIFT_GROWTH * base.rel_l2, _GUARD_LIFT_FLOOR)
                    and (scores.argmax is None or base.argmax is None or scores.argmax >= base.argmax))
        measured = (f"measured on {len(check.feeds)} calibration feeds: all int8 gives {base.describe()} with them "
                    f"float, {scores.describe()} with the {len(guarded)} nodes the guard keeps quantized too")
        if not harmless:
            stats.notes.append(f"collapse guard, {measured}: they stay float")
            return kept
        self._all_int8_outputs = outputs
        stats.summary["collapse_guard_lifted"] = len(guarded)
        measured += f" (within {_describe(targets)}, the error about as small): quantized"
        said = next((i for i, n in enumerate(stats.notes) if n.startswith("collapse guard: ")), None)
        if said is None:
            stats.notes.append(f"collapse guard, {measured}")
        else:
            stats.notes[said] = stats.notes[said].replace(_GUARD_NOTE_END, f"; {measured}")
        return rest

    def _trial_outputs(self, float_model: ir.Model, check: Reference, ranges: dict[str, Range], per_channel: bool,
                       rounded: dict[str, np.ndarray], float_nodes: dict[str, str]) -> list[list[np.ndarray]]:
        """The calibration-feed outputs of the static model these ranges build with `float_nodes` float (built on
        a copy of `float_model`, run with ONNX Runtime's int8 kernels)."""
        trial = float_model.clone()
        self._apply(trial, PassStats(), ranges, per_channel, self.exclude, rounded, float_nodes)
        return [list(o) for o in check.outputs_of(trial)]

    def _reference_for(self, float_model: ir.Model, ctx: Context) -> Reference:
        """The float model's outputs on the calibration feeds, computed once per run."""
        if self._reference is None:
            self._reference = Reference(float_model, ctx.require_calib("quantize").feeds, threads=ctx.threads)
        return self._reference

    def _kept_float(self, graph: ir.Graph, ranges: dict[str, Range], samples: dict[str, np.ndarray],
                    stats: PassStats) -> dict[str, str]:
        """Nodes static mode keeps in float whatever else happens, by name, with the reason: range-sensitive
        regions (normalizations, softmax, GELU, attention scores) and the chains after collapsed tensors."""
        kept: dict[str, str] = {}
        kinds: dict[str, int] = {}
        for region in sensitive_regions(graph):
            kinds[region.kind] = kinds.get(region.kind, 0) + 1
            for node in region.nodes:
                kept[node.name] = f"range-sensitive ({region.kind}): kept in float"
        collapsed = collapsed_tensors(candidate_tensors(graph, self.exclude), ranges, samples, self.activations)
        for node in float_chain(graph, collapsed):
            kept.setdefault(node.name, _GUARDED)
        if kinds:
            stats.summary["range_sensitive_regions"] = dict(sorted(kinds.items()))
        self._transformer = "attention" in kinds
        if collapsed:
            stats.summary["collapsed_tensors"] = {k: round(v, 3) for k, v in sorted(collapsed.items())}
            worst = max(collapsed, key=collapsed.get)
            stats.notes.append(f"collapse guard: {len(collapsed)} tensors would lose most of their values in 8 bits "
                               f"(worst '{worst}': {collapsed[worst]:.0%}){_GUARD_NOTE_END}")
        return kept

    def _pinned(self, graph: ir.Graph) -> dict[str, str]:
        """The `float_nodes` the graph has (names as the pass names nodes), remembered as found for
        `_say_unmatched`, which names the others once every graph had its run."""
        names = {n.name for n in graph}
        found = [n for n in self.float_nodes if n in names]
        self._pins_found.update(found)
        return dict.fromkeys(found, "kept in float by the float_nodes option")

    def _say_unmatched(self, model: ir.Model, stats: PassStats) -> None:
        """One note naming the `float_nodes` that no graph's run matched: the main graph's, an If branch's (its
        own run), or a node of a subgraph no run reached."""
        found = self._pins_found | {n.name for n in model.graph.all_nodes()}
        missing = [n for n in self.float_nodes if n not in found]
        if missing:
            stats.notes.append(f"float_nodes: {len(missing)} name(s) match no node of the model "
                               f"({', '.join(repr(n) for n in missing[:5])}{', ...' if len(missing) > 5 else ''})")

    def _for_branch(self) -> Quantize:
        """The pass an If branch's run uses: the same options; its `float_nodes` are checked by the main run."""
        branch = dataclasses.replace(self, check_fusion=False)
        branch._shared_pins = self._pins_found
        return branch

    def _apply(self, model: ir.Model, stats: PassStats, ranges: dict[str, Range], per_channel: bool,
               exclude: list[str], rounded: dict[str, np.ndarray],
               kept: dict[str, str] | None = None) -> tuple[dict[str, int], _Applied]:
        plan = plan_static(model.graph, ranges, stats, exclude=exclude, per_channel=per_channel,
                           concat_range_ratio=self.concat_range_ratio, activations=self.activations,
                           float_nodes=kept)
        qps = group_qparams(plan, ranges, self.activations)
        applied = _Applied(list(plan.compute), {id(n): n.inputs[0].name for n in plan.compute},
                           {id(n): n.inputs[1].name for n in plan.compute},
                           [n.name for n in plan.compute + plan.others],
                           {name: f.clip_max for name, f in plan.fused.items()})
        stats.layers = [{"node": node.name or node.op_type, "op": node.op_type, "weight": node.inputs[1].name,
                         "axis": axis} for node, _, axis in plan.weights]
        counts = apply_static(model.graph, plan, qps, rounded, self.activations)
        counts["quantized_nodes"] = len(plan.compute) + len(plan.others)
        lstms = self._lstms(model, stats, exclude, kept or {})
        counts["lstm_quantized"] = len(lstms)
        applied.nodes.extend(lstms)
        return counts, applied

    def _lstms(self, model: ir.Model, stats: PassStats, exclude: list[str], kept: dict[str, str]) -> list[str]:
        """LSTM -> DynamicQuantizeLSTM (int8 weights); the names of the nodes rewritten."""
        taken = all_names(model.graph)
        done = []
        for node in list(model.graph):
            if not is_onnx_op(node, "LSTM"):
                continue
            if node.name in kept or matches_any(node, exclude):
                stats.skip(node, kept.get(node.name, "excluded by the exclude option"))
                continue
            reason = lstm_declined(node)
            if reason:
                stats.skip(node, reason)
                continue
            quantize_lstm(model.graph, node, taken)
            done.append(node.name)
        if done:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return done

    # ------------------------------------------------------------------------------ fallback=auto
    def _fallback(self, model: ir.Model, float_model: ir.Model, ctx: Context, stats: PassStats,
                  ranges: dict[str, Range], per_channel: bool, kept: dict[str, str],
                  applied: _Applied) -> dict[str, str]:
        """The nodes to keep in float so that the outputs meet the targets (none when all-int8 does)."""
        targets = self._targets(ctx)
        check = self._reference_for(float_model, ctx)
        outputs = self._all_int8_outputs or check.outputs_of(model)
        real = check.compare(outputs)
        self._all_int8_scores = real
        check.rank_feeds(outputs)
        stats.summary["scores_all_quantized"] = real.to_dict()
        if real.shortfall(targets) == 0:
            return {}
        macs = macs_by_node(float_model, ctx.dims)
        groups = groups_of(float_model.graph, applied.nodes, macs)
        floats = {name: v.const_value for name, v in float_model.graph.initializers.items()}
        lstms = {n.name: n for n in float_model.graph if is_onnx_op(n, "LSTM")}
        with Emulator(model, floats, applied.fused, lstms, threads=ctx.threads) as emulator:
            def emulated(extra: frozenset[str], quick: bool) -> Scores:
                on = self._sites(float_model, ranges, per_channel, {**kept, **dict.fromkeys(extra, "")})
                if quick:
                    return check.compare_quick(emulator.run(check.quick_feeds(), on))
                return check.compare(emulator.run(check.feeds, on))

            # the emulation's error, scaled to what the real kernels give on the all-int8 model
            base = {quick: emulated(frozenset(), quick) for quick in (False, True)}
            real_quick = check.compare_quick([list(outputs[i]) for i in check.quick])

            def evaluate(extra: frozenset[str], quick: bool) -> Scores:
                return emulated(extra, quick).scaled(base[quick], real_quick if quick else real)

            def decide(extra: frozenset[str]) -> Scores | None:
                # evaluate(extra, False), feed by feed, the screening feeds first; None once a miss is certain
                on = self._sites(float_model, ranges, per_channel, {**kept, **dict.fromkeys(extra, "")})
                order, got, bound = check.decision_order(), {}, check.bound()
                for i in order[:-1]:
                    got[i] = emulator.run([check.feeds[i]], on)[0]
                    bound.add(check.outputs[i], got[i])
                    if bound.scores().scaled(base[False], real).shortfall(targets) > 0:
                        return None
                got[order[-1]] = emulator.run([check.feeds[order[-1]]], on)[0]
                return check.compare([got[i] for i in range(len(order))]).scaled(base[False], real)

            result = search(evaluate, groups, targets, order=[n.name for n in float_model.graph],
                            budget_s=self.fallback_budget, costs=node_costs(applied.nodes, macs), decide=decide)
        stats.summary.update({"fallback_float_nodes": result.float_nodes, "fallback_groups": result.groups,
                              "fallback_evaluations": result.evaluations,
                              "fallback_seconds": round(result.seconds, 2),
                              "fallback_error": result.scores.rel_l2,
                              "error_all_quantized": result.scores_all_quantized.rel_l2})
        verdict = "met" if result.reached else "not met (the closest set found is kept)"
        stats.notes.append(
            f"fallback=auto: {len(result.float_nodes)} of {len(applied.nodes)} quantized nodes kept in float "
            f"({', '.join(result.groups) or 'single nodes'}) for {_describe(targets)} on {len(check.feeds)} "
            f"calibration feeds: {verdict}; all int8 gave {result.scores_all_quantized.describe()}, now "
            f"{result.scores.describe()} (emulated; {result.evaluations} evaluations, {result.seconds:.1f}s"
            + (f", stopped by its budget: quantize.fallback_budget={self.fallback_budget:g}"
               if result.stopped_early and result.seconds >= self.fallback_budget else "") + ")"
            + ("; the report lists them: quantize.float_nodes with fallback=none builds this set again"
               if result.float_nodes else ""))
        wanted = self._targets(ctx, headroom=False)
        if not result.reached and result.scores.shortfall(wanted) > 0:
            stats.notes.append(_missed(wanted, f"the closest int8 model found ({len(result.float_nodes)} nodes float: "
                                               f"{result.scores.describe()})", self.require_targets))
            stats.summary["targets_met"] = False
        reason = "kept in float by fallback=auto: the outputs miss the targets with it in int8"
        return dict.fromkeys(result.float_nodes, reason)

    def _sites(self, float_model: ir.Model, ranges: dict[str, Range], per_channel: bool,
               kept: dict[str, str]) -> set[str]:
        """The quantization sites (tensors, weights, constants, LSTMs) a build keeping `kept` float would have."""
        plan = plan_static(float_model.graph, ranges, PassStats(), exclude=self.exclude, per_channel=per_channel,
                           concat_range_ratio=self.concat_range_ratio, activations=self.activations,
                           float_nodes=kept)
        sites = set(plan.acts)
        sites.update(node.inputs[index].name for node, index, _ in plan.weights)
        sites.update(node.inputs[index].name for node, index in plan.consts)
        sites.update(n.name for n in float_model.graph if is_onnx_op(n, "LSTM") and n.name not in kept
                     and not matches_any(n, self.exclude))
        return sites


def _why_nothing(model: ir.Model, mode: str) -> str:
    """One sentence on why a mode found nothing to quantize in `model`."""
    wanted = {"static": SUPPORTED_OPS, "dynamic": frozenset({"MatMul", "Gemm", "Conv"})}.get(
        mode, frozenset({"MatMul", "Gemm"}))
    main = [n for n in model.graph if is_onnx_op(n, *wanted)]
    subgraphs = [g for g in iter_graphs(model.graph) if g is not model.graph]
    nested = [n for g in subgraphs for n in g if n.op_type in wanted]
    foreign = sorted({n.domain for g in iter_graphs(model.graph) for n in g if not is_default_domain(n.domain)})
    if nested and not main:
        if mode == "static" and branch_sites(model.graph, _WEIGHTED):
            where = "inside If branches no calibration feed took or that stayed float (see the notes on each branch)"
        else:
            where = f"inside If/Loop/Scan bodies, which mode={mode} does not rewrite here"
        return f"nothing quantized: the {len(nested)} {'/'.join(sorted({n.op_type for n in nested}))} nodes are {where}"
    if not main:
        extra = f" (its operators are from {', '.join(foreign)})" if foreign else ""
        return f"nothing quantized: the main graph has no node that mode={mode} quantizes{extra}"
    return "nothing quantized: every candidate node was declined (see skipped for the reasons)"


_MISSED = "WARNING: int8 misses"
_GUARDED = "reads a tensor that 8 bits would destroy (collapse guard): kept in float"
_GUARD_NOTE_END = "; they and the element-wise ops after them stay float"
_GUARD_LIFT_GROWTH = 1.25
_GUARD_LIFT_FLOOR = 0.02
"""The collapse guard's float nodes are quantized after all when that meets the targets and leaves the all-int8
rel L2 within `_GUARD_LIFT_GROWTH` times the guarded one, or below `_GUARD_LIFT_FLOOR` (about what int8 rounding
alone costs a healthy network): measured harmless, quantizing them costs about nothing. A collapse costs far
more (a decomposed LayerNorm's padded rows: 0.006 -> 0.041)."""
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM"})
"""Ops whose presence in an If branch makes the branch worth quantizing as a model of its own."""


def _missed(targets: Targets, closest: str, require: bool) -> str:
    """The warning of a static model that misses the targets, saying which model is written."""
    written = ("the float model is written unless another mode meets them (quantize.require_targets=false writes "
               f"{closest})" if require else f"{closest} is written")
    return (f"{_MISSED} {_describe(targets)} on the calibration feeds without keeping most of the model float; "
            f"{written}; quantize.target_cosine / target_argmax say what is enough")


def _describe(targets: Targets) -> str:
    parts = [f"cosine >= {targets.cosine:g}" if targets.cosine > 0 else "",
             f"argmax agreement >= {targets.argmax:g}" if targets.argmax > 0 else "",
             f"rel_l2 <= {targets.rel_l2:g}" if targets.rel_l2 is not None else ""]
    return ", ".join(p for p in parts if p) or "no target"


def _pick_variant(rows: dict[str, tuple[float, float, float, int]]) -> str:
    """Of variants (shortfall, cosine, latency ratio, weight bytes): among those that meet the targets (else the
    closest), the ones as fast as the fastest within timing noise (`_SAME_SPEED`); of those the smallest, then
    the most accurate. The ratio of a variant that meets the targets in a run with several threads is the
    geometric mean of its ratios with those threads and with one."""
    met = [k for k, row in rows.items() if row[0] == 0]
    pool = met or [min(rows, key=lambda k: rows[k][0])]
    fastest = min(rows[k][2] for k in pool)
    near = [k for k in pool if rows[k][2] <= fastest * _SAME_SPEED]
    return min(near, key=lambda k: (rows[k][3], -rows[k][1]))


def gelu_fed_matmuls(graph: ir.Graph) -> list[ir.Node]:
    """The MatMuls whose input is a GELU (range-sensitive activation) output, looking through element-wise ops
    by a constant."""
    gelu = {id(n) for r in sensitive_regions(graph) if r.kind == "activation" for n in r.nodes}
    return [n for n in graph if is_onnx_op(n, "MatMul") and n.inputs and id(_producer_node(n.inputs[0])) in gelu]


def _producer_node(value: ir.Value | None) -> ir.Node | None:
    """The node that computes `value`, looking through element-wise ops by a constant."""
    node = value.producer() if value is not None else None
    while is_onnx_op(node, "Mul", "Div", "Add", "Sub") and any(is_constant(v) for v in node.inputs):
        value = next((v for v in node.inputs if not is_constant(v)), None)
        node = value.producer() if value is not None else None
    return node


def _restore(model: ir.Model, given: ir.Model, stats: PassStats) -> None:
    """Put the model back as it was given to the pass (nothing quantized, or int8 not written)."""
    imports = dict(given.opset_imports)
    model.graph = given.graph
    model.opset_imports.clear()
    model.opset_imports.update(imports)
    model.ir_version = given.ir_version
    stats.modified = False
    stats.summary.pop("opset_upgraded", None)


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
