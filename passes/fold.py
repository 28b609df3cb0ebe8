"""fold: constant and BatchNorm folding, Identity/Dropout removal, dead code, duplicate weights.

Rewrite cases, swept in order by an ``onnx_ir.passes.PassManager`` until a sweep changes nothing (so
running it twice equals running it once):

1. ``Constant`` nodes become initializers (exporters such as Paddle's store every weight that way,
   and later passes look for initializers).
2. Inference ``Dropout`` (mask unused, not in training mode) and ``Identity`` are removed. An
   Identity that yields a graph (or If/Loop body) output stays unless its input is made in that
   same graph and is no output yet: the input then takes the output's name.
   ``Conv``/``ConvTranspose`` followed by ``Add`` of a per-channel constant takes it as its bias.
3. ``BatchNormalization`` after Conv / ConvTranspose / Gemm / 2-D MatMul with constant weights is
   folded into them. With ``s = gamma / sqrt(var + eps)``: ``W' = W * s`` on the output-channel
   axis and ``b' = (b - mean) * s + beta`` (for MatMul a bias Add is inserted).
4. Nodes whose inputs are all constant are evaluated (onnx's reference evaluator) and replaced by
   initializers, as are ``Shape``/``Size`` of tensors with a static shape. A fold that would
   create a tensor larger than ``max_fold_mb``, or grow the file (a ``Cast`` of fp16 weights to
   fp32, an ``Expand`` of a constant, a ``Slice`` of a weight that other nodes still read), is
   declined with the reason. A weight read by several such nodes counts as freed only when all
   of them fold (see `_within_growth`), and each fold may add at most 4 KB. Output sizes come from
   onnx's inference on the node's actual constant inputs, never from shapes the model declares (a
   file can declare anything: a 300-byte ``Expand`` whose value_info says [1] may make gigabytes).
   An evaluation may take ``eval_seconds`` and all of them ``eval_budget`` seconds; a node past
   either stays unfolded, with the reason.
5. Dead nodes and unused initializers are dropped; identical initializers are stored once.

All rewrites are exact up to float rounding (BN folding reorders one multiply-add).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator
from onnx_ir.passes.common import DeduplicateHashedInitializersPass, RemoveUnusedNodesPass

from onnxopt.analysis import infer_shapes
from onnxopt.context import Context
from onnxopt.errors import UsageError, first_line
from onnxopt.graph import (
    count_initializers,
    count_nodes,
    is_constant,
    is_default_domain,
    is_onnx_op,
    iter_graphs,
    lift_constant_nodes,
    new_initializer,
    only_used_by,
    opset_version,
    set_weight,
    take_over_output,
)
from onnxopt.registry import Pass, PassStats, option, register_pass, root_cause

__all__ = ["Fold", "fold_model"]

logger = logging.getLogger(__name__)

# Ops never folded: quantization boundaries are what quantized models are made of, random ops
# are not deterministic, and control flow carries subgraphs.
_NEVER_FOLD = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    "Constant",
}
# Sweeps of all rewrites at most; each sweep but the last changes something (the pass manager stops early).
_MAX_SWEEPS = 8
# A fold may add this much (an Expand or Range of a few numbers); more than that is declined.
_GROW_SLACK_BYTES = 4 * 1024


@register_pass("fold")
class Fold(Pass):
    """Fold constants and BatchNorm, drop Identity/Dropout, dead nodes and duplicate weights (exact)."""

    exact = True
    idempotent = True

    batchnorm: bool = option(True, "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul")
    constants: bool = option(True, "evaluate nodes whose inputs are all constant")
    max_fold_mb: float = option(64.0, "largest tensor (MB) constant folding may create", when={"constants": True})
    eval_seconds: float = option(2.0, "longest one node's evaluation may take; a slower node stays unfolded",
                                 when={"constants": True})
    eval_budget: float = option(30.0, "seconds all evaluations of one run may take together",
                                when={"constants": True})
    dedup: bool = option(True, "store identical initializers once")

    def __post_init__(self) -> None:
        for key in ("max_fold_mb", "eval_seconds", "eval_budget"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"fold.{key} must be positive and finite, got {value}")

    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        stats = PassStats()
        counts = dict.fromkeys(("constants_lifted", "identity_removed", "bias_adds_folded", "batchnorm_folded",
                                "nodes_folded", "dead_nodes_removed", "unused_initializers_removed",
                                "initializers_deduplicated"), 0)
        nodes_before = count_nodes(model)
        max_bytes = int(self.max_fold_mb * 1024 * 1024)
        steps = [
            _Step(counts, lambda m: {"constants_lifted": lift_constant_nodes(m)}),
            _Step(counts, lambda m: {"identity_removed": _remove_identities(m, stats)}),
            _Step(counts, _infer_shapes),
            _Step(counts, lambda m: {"bias_adds_folded": _fold_bias_adds(m, stats)}),
        ]
        if self.batchnorm:
            steps.append(_Step(counts, lambda m: {"batchnorm_folded": _fold_batchnorms(m, stats)}))
        if self.constants:
            budget = _Budget(self.eval_seconds, self.eval_budget)
            steps.append(_Step(counts, lambda m: {"nodes_folded": _fold_constants(m, stats, max_bytes, budget)}))
        steps.append(_Step(counts, _remove_dead))
        try:  # every sweep runs all steps; the sweeps stop when one changes nothing
            ir.passes.PassManager(steps, steps=_MAX_SWEEPS, early_stop=True)(model)
        except Exception as exc:
            raise root_cause(exc) from None
        if self.dedup:  # once, after folding: hashing reads every weight
            before = count_initializers(model)
            with _counted_dedup_skips() as skipped:
                DeduplicateHashedInitializersPass()(model)
            RemoveUnusedNodesPass()(model)
            counts["initializers_deduplicated"] += before - count_initializers(model)
            if skipped.count:
                stats.notes.append(f"{skipped.count} initializers that are graph inputs or outputs were not "
                                   "deduplicated (a feed or a reader outside may tell them apart)")
        stats.summary = {k: v for k, v in counts.items() if v} or {"nodes": nodes_before}
        stats.summary["nodes_removed"] = nodes_before - count_nodes(model)
        stats.modified = any(counts.values())
        if not stats.modified:
            stats.notes.append("fold: nothing to fold (no Constant node, Identity, foldable BatchNorm or bias Add, "
                               "constant subexpression, dead node or duplicate weight); the model is unchanged")
        # Reasons are repeated once per sweep; keep each (node, reason) once.
        seen: set[tuple[str, str]] = set()
        stats.skipped = [s for s in stats.skipped if not ((s["node"], s["reason"]) in seen
                                                          or seen.add((s["node"], s["reason"])))]
        return stats


class _Step(ir.passes.InPlacePass):
    """One rewrite of the fold sweep as an onnx_ir pass: `rewrite` returns its counts by summary key,
    which are added to ``counts``; the step modified the model when one of them is positive."""

    def __init__(self, counts: dict[str, int], rewrite: Callable[[ir.Model], dict[str, int]]) -> None:
        self.counts, self.rewrite = counts, rewrite

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        done = self.rewrite(model)
        for key, n in done.items():
            self.counts[key] += n
        return ir.passes.PassResult(model, any(n > 0 for n in done.values()))


class _DedupSkips(logging.Filter):
    """Drops (and counts) onnx_ir's warning line per initializer it leaves out of deduplication."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Skipped deduplication"):
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _counted_dedup_skips() -> Iterator[_DedupSkips]:
    """An IR-3 model lists every weight as a graph input; one summary note beats a line per weight."""
    log = logging.getLogger(DeduplicateHashedInitializersPass.__module__)
    counter = _DedupSkips()
    log.addFilter(counter)
    try:
        yield counter
    finally:
        log.removeFilter(counter)


def _infer_shapes(model: ir.Model) -> dict[str, int]:
    infer_shapes(model)
    return {}


def _remove_dead(model: ir.Model) -> dict[str, int]:
    """Drop dead nodes and initializers nothing reads (in subgraphs too)."""
    inits_before, nodes_before = count_initializers(model), count_nodes(model)
    RemoveUnusedNodesPass()(model)
    _remove_unused_subgraph_initializers(model)
    return {"dead_nodes_removed": nodes_before - count_nodes(model),
            "unused_initializers_removed": inits_before - count_initializers(model)}


def fold_model(model: ir.Model) -> PassStats:
    """Run `fold` with default options (for passes that want folded input without a user step)."""
    return Fold().call(model, None)


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    """Drop initializers of If/Loop/Scan bodies that nothing reads (onnx_ir cleans the main graph only)."""
    for graph in iter_graphs(model.graph):
        if graph is model.graph:
            continue
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
                del graph.initializers[name]


# ------------------------------------------------------------------------------ 2. identities
def _is_inference_dropout(node: ir.Node) -> bool:
    if not is_onnx_op(node, "Dropout"):
        return False
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2]
        if not is_constant(mode) or bool(np.asarray(mode.const_value.numpy()).item()):
            return False
    return True


def _remove_identities(model: ir.Model, stats: PassStats) -> int:
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if _is_inference_dropout(node):
                ident = ir.Node("", "Identity", [node.inputs[0]], name=node.name)
                node.outputs[0].replace_all_uses_with(ident.outputs[0], replace_graph_outputs=True)
                ident.outputs[0].name = node.outputs[0].name
                ident.outputs[0].shape = node.outputs[0].shape
                ident.outputs[0].type = node.outputs[0].type
                graph.insert_before(node, ident)
                graph.remove(node, safe=True)
    removed = 0
    for graph in iter_graphs(model.graph):
        for node in list(graph):
            if not is_onnx_op(node, "Identity"):
                continue
            reason = _try_remove_identity(graph, node)
            if reason:
                stats.skip(node, reason)
            else:
                removed += 1
    return removed


def _try_remove_identity(graph: ir.Graph, node: ir.Node) -> str | None:
    """Drop an Identity, its consumers reading its input; return the reason when it must stay.

    An Identity whose output is an output of its graph can only go when its input can take the
    output's name: the input must be made by a node of the same graph and be no graph's output or
    input yet (subgraphs of If/Loop often end in an Identity of an outer value, or of a value that
    is already another output).
    """
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        return "not a one-input Identity"
    src, out = node.inputs[0], node.outputs[0]
    if out.is_graph_output():
        producer = src.producer()
        if producer is None or producer.graph is not graph:
            return "output is a graph output and its input comes from another scope"
        if src.is_graph_output() or src.is_graph_input() or src.is_initializer():
            return "output is a graph output and its input already is a graph output or input"
        name, shape, typ = out.name, out.shape, out.type
        out.replace_all_uses_with(src, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        src.name = name
        src.shape, src.type = shape if shape is not None else src.shape, typ if typ is not None else src.type
        return None
    if src.shape is None and out.shape is not None:
        src.shape = out.shape
    if src.type is None:
        src.type = out.type
    out.replace_all_uses_with(src)
    graph.remove(node, safe=True)
    return None


# ------------------------------------------------------------------------------ 3. bias Add, BatchNorm
def _fold_bias_adds(model: ir.Model, stats: PassStats) -> int:
    """Conv/ConvTranspose followed by Add of a per-channel constant: the constant joins the bias.

    Exporters write a convolution's bias this way (Paddle's ConvTranspose + Add), and it keeps a
    following BatchNorm from folding.
    """
    folded = 0
    for graph in iter_graphs(model.graph):
        for add in list(graph):
            if not is_onnx_op(add, "Add") or len(add.inputs) != 2:
                continue
            for k in (0, 1):
                conv_out, const = add.inputs[k], add.inputs[1 - k]
                src = conv_out.producer() if conv_out is not None else None
                if src is None or src.op_type not in ("Conv", "ConvTranspose") or not is_constant(const):
                    continue
                if _try_fold_bias_add(graph, src, add, const):
                    folded += 1
                break
    return folded


def _try_fold_bias_add(graph: ir.Graph, src: ir.Node, add: ir.Node, const: ir.Value) -> bool:
    weight = src.inputs[1]
    if src.graph is not graph or not is_constant(weight) or not only_used_by(src.outputs[0], add):
        return False
    w_shape = weight.const_value.shape
    channels = w_shape[0] if src.op_type == "Conv" else w_shape[1] * src.attributes.get_int("group", 1)
    c = np.asarray(const.const_value.numpy())
    rank = len(w_shape)
    if c.ndim > rank or not np.issubdtype(c.dtype, np.floating):
        return False
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(c.shape) if i != 1) or c.shape[1] not in (1, channels):
        return False
    per_channel = np.broadcast_to(c.reshape(-1), (channels,)).astype(c.dtype)
    bias = src.inputs[2] if len(src.inputs) > 2 else None
    if bias is not None:
        if not is_constant(bias) or not only_used_by(bias, src):
            return False
        set_weight(bias, np.asarray(bias.const_value.numpy()) + per_channel)
    else:
        bias = new_initializer(graph, f"{src.name or weight.name}.bias", per_channel.copy())
        src.resize_inputs(3)
        src.replace_input_with(2, bias)
    take_over_output(graph, add, src.outputs[0])
    return True


def _bn_scale_shift(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    if len(bn.inputs) < 5 or not all(is_constant(v) for v in bn.inputs[1:5]):
        return None
    gamma, beta, mean, var = (np.asarray(v.const_value.numpy(), dtype=np.float64) for v in bn.inputs[1:5])
    eps = bn.attributes.get_float("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    return scale, shift


def _fold_batchnorms(model: ir.Model, stats: PassStats) -> int:
    folded = 0
    for graph in iter_graphs(model.graph):
        for bn in list(graph):
            if not is_onnx_op(bn, "BatchNormalization"):
                continue
            if bn.attributes.get_int("training_mode", 0) or any(o.uses() or o.is_graph_output()
                                                                 for o in bn.outputs[1:]):
                stats.skip(bn, "BatchNormalization in training mode")
                continue
            src = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if src is None:
                stats.skip(bn, "input is not produced by a node")
                continue
            reason = _try_fold_bn(graph, src, bn)
            if reason:
                stats.skip(bn, reason)
            else:
                folded += 1
    return folded


def _try_fold_bn(graph: ir.Graph, src: ir.Node, bn: ir.Node) -> str | None:
    """Fold `bn` into its producer `src`; return the reason when it cannot."""
    if not is_onnx_op(src, "Conv", "ConvTranspose", "Gemm", "MatMul"):
        return f"preceded by {src.op_type}, which BatchNorm does not fold into"
    if src.graph is not graph:
        return "producer is in another graph"
    if not only_used_by(src.outputs[0], bn):
        return f"output of {src.name or src.op_type} is used elsewhere too"
    ss = _bn_scale_shift(bn)
    if ss is None:
        return "BatchNorm parameters are not constant"
    scale, shift = ss
    weight = src.inputs[1]
    if not is_constant(weight):
        return "weight is not a constant initializer"
    if not only_used_by(weight, src):
        return "weight is shared with other nodes"
    w = np.asarray(weight.const_value.numpy())
    if not np.issubdtype(w.dtype, np.floating):
        return f"weight dtype {w.dtype} is not float"
    bias_value = src.inputs[2] if len(src.inputs) > 2 else None
    if bias_value is not None and (not is_constant(bias_value) or not only_used_by(bias_value, src)):
        return "bias is not a constant used only here"
    channels = scale.shape[0]
    if src.op_type == "Conv":
        if w.shape[0] != channels:
            return "channel count mismatch"
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        axis_len = w.shape[0]
    elif src.op_type == "ConvTranspose":
        group = src.attributes.get_int("group", 1)
        cout_g = w.shape[1]
        if cout_g * group != channels:
            return "channel count mismatch"
        s = scale.reshape(group, 1, cout_g)  # channel g*cout_g + j scales w[g*cin_g + i, j]
        wg = w.reshape((group, w.shape[0] // group, cout_g) + w.shape[2:])
        new_w = (wg * s.reshape(s.shape + (1,) * (w.ndim - 2))).reshape(w.shape)
        axis_len = channels
    elif src.op_type == "Gemm":
        if src.attributes.get_int("transA", 0) not in (0, 1) or w.ndim != 2:
            return "unsupported Gemm form"
        trans_b = src.attributes.get_int("transB", 0)
        out_dim = w.shape[0] if trans_b else w.shape[1]
        if out_dim != channels:
            return "channel count mismatch"
        alpha = src.attributes.get_float("alpha", 1.0)
        beta_attr = src.attributes.get_float("beta", 1.0)
        new_w = (w * scale[:, None]) if trans_b else (w * scale[None, :])
        new_w = new_w * alpha
        axis_len = channels
    else:  # MatMul: only [M, K] x [K, N] -> [M, N], where BN's channel axis is N
        out_shape = src.outputs[0].shape
        if w.ndim != 2 or out_shape is None or out_shape.rank() != 2:
            return "MatMul output is not 2-D, so BatchNorm's channel axis is not the weight's"
        if w.shape[1] != channels:
            return "channel count mismatch"
        new_w = w * scale[None, :]
        axis_len = channels
    if bias_value is not None:
        b = np.asarray(bias_value.const_value.numpy(), dtype=np.float64)
        if src.op_type == "Gemm":
            b = b * beta_attr
            try:
                b = np.broadcast_to(b, (channels,)) if b.ndim <= 1 else b
            except ValueError:
                return "Gemm bias does not broadcast per channel"
            if b.shape != (channels,):
                return "Gemm bias is not per channel"
        elif b.shape != (axis_len,):
            return "bias is not per channel"
        new_b = b * scale + shift
    else:
        new_b = shift
    set_weight(weight, new_w.astype(w.dtype))
    bias_np = new_b.astype(w.dtype)
    if src.op_type == "MatMul":
        bias_init = new_initializer(graph, f"{bn.name or bn.outputs[0].name}.folded_bias", bias_np)
        add = ir.Node("", "Add", [src.outputs[0], bias_init], name=f"{bn.name}.bias" if bn.name else None)
        graph.insert_after(src, add)
        take_over_output(graph, bn, add.outputs[0])
        return None
    if bias_value is not None:
        set_weight(bias_value, bias_np)
    else:
        bias_value = new_initializer(graph, f"{src.name or weight.name}.bias", bias_np)
        src.resize_inputs(3)
        src.replace_input_with(2, bias_value)
    if src.op_type == "Gemm":
        src.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
        src.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    take_over_output(graph, bn, src.outputs[0])
    return None


# ------------------------------------------------------------------------------ 4. constants
def _static_dims(value: ir.Value | None) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    dims = list(value.shape.dims)
    if all(isinstance(d, int) for d in dims):
        return dims
    return None


def _fold_shape_node(node: ir.Node) -> np.ndarray | None:
    dims = _static_dims(node.inputs[0])
    if dims is None:
        return None
    if node.op_type == "Size":
        return np.asarray(math.prod(dims), dtype=np.int64)
    rank = len(dims)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start = max(0, min(rank, start + rank if start < 0 else start))
    end = max(0, min(rank, end + rank if end < 0 else end))
    return np.asarray(dims[start:end], dtype=np.int64)


def _predicted_elems(node: ir.Node) -> int | None:
    """For ops that can blow a small input up, the output size computed from their inputs."""
    vals = [np.asarray(v.const_value.numpy()) if v is not None else None for v in node.inputs]
    try:
        if node.op_type == "ConstantOfShape":
            return int(np.prod(vals[0])) if vals[0].size else 1
        if node.op_type == "Expand":
            return int(np.prod(np.broadcast_shapes(vals[0].shape, tuple(int(x) for x in vals[1]))))
        if node.op_type == "Tile":
            return int(vals[0].size * np.prod(vals[1]))
        if node.op_type == "Range":
            start, limit, delta = (float(np.asarray(v).item()) for v in vals[:3])
            return max(0, int(math.ceil((limit - start) / delta))) if delta else None
    except (ValueError, TypeError, OverflowError):
        return None
    return None


_T = TypeVar("_T")


class _Timeout(BaseException):
    """Raised inside an evaluation that ran past its deadline (a BaseException, so no ``except Exception``
    in the evaluator swallows it)."""


class _Budget:
    """Seconds an evaluation may take (`per_node`) and all of them together (`left`)."""

    def __init__(self, per_node: float, total: float) -> None:
        self.per_node, self.total, self.left = per_node, total, total

    def reason_spent(self) -> str | None:
        if self.left > 0:
            return None
        return f"not evaluated: fold's evaluation budget of {self.total:g} s is spent (fold.eval_budget)"

    def run(self, fn: Callable[[], _T]) -> _T:
        """`fn()`, stopped past ``min(per_node, left)`` seconds with `_Timeout` saying which bound it met."""
        limit = min(self.per_node, self.left)
        start = time.monotonic()
        try:
            return _with_deadline(fn, limit)
        except _Timeout:
            bound = "fold.eval_seconds" if limit == self.per_node else "the rest of fold.eval_budget"
            raise _Timeout(f"took over {limit:.3g} s ({bound})") from None
        finally:
            self.left -= time.monotonic() - start


def _with_deadline(fn: Callable[[], _T], seconds: float) -> _T:
    """`fn()`, interrupted at its next Python call once `seconds` have passed.

    onnx's reference evaluator is Python (a GridSample calls a function per output pixel), so a check on
    every call event stops it on time; a tracer already set (a debugger, coverage) keeps running.
    """
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Timeout
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def _fold_constants(model: ir.Model, stats: PassStats, max_bytes: int, budget: _Budget) -> int:
    """Fold constant subexpressions graph by graph, one level of each chain per round, to the end."""
    folded = 0
    opset = opset_version(model)
    for graph in iter_graphs(model.graph):
        while (n := _fold_round(graph, opset, stats, max_bytes, budget)) > 0:
            folded += n
    return folded


def _try_evaluate(node: ir.Node, opset: int, stats: PassStats, budget: _Budget) -> list[np.ndarray] | None:
    """The node's outputs from onnx's reference evaluator within the budget, or None (the reason recorded)."""
    spent = budget.reason_spent()
    if spent:
        stats.skip(node, spent)
        return None
    try:
        return budget.run(lambda: _evaluate(node, opset))
    except _Timeout as stop:
        stats.skip(node, f"evaluating {node.op_type} {stop}; left as is")
    except Exception as exc:  # an op the reference evaluator lacks: leave the node
        stats.skip(node, f"cannot evaluate {node.op_type}: {first_line(exc, 120)}")
    return None


def _fold_round(graph: ir.Graph, opset: int, stats: PassStats, max_bytes: int, budget: _Budget) -> int:
    """Fold every node of `graph` whose inputs are constant now; growth is decided for all of them at once."""
    folded = 0
    pending: list[_Candidate] = []
    for node in list(graph):
        if not is_default_domain(node.domain) or node.op_type in _NEVER_FOLD:
            continue
        if any(o.is_graph_output() for o in node.outputs):
            continue
        if node.op_type in ("Shape", "Size"):
            array = _fold_shape_node(node)
            if array is not None:
                _replace_with_initializers(graph, node, [array])
                folded += 1
            continue
        candidate = _try_candidate(node, opset, max_bytes, stats, budget)
        if candidate is not None:
            pending.append(candidate)
    for cand in _within_growth(pending, stats):
        arrays = cand.arrays if cand.arrays is not None else _try_evaluate(cand.node, opset, stats, budget)
        if arrays is None:
            continue
        _replace_with_initializers(graph, cand.node, arrays)
        folded += 1
    return folded


class _Candidate:
    """A node whose inputs are all constant, with the bytes its outputs will take."""

    def __init__(self, node: ir.Node, out_bytes: int, arrays: list[np.ndarray] | None) -> None:
        self.node, self.out_bytes, self.arrays = node, out_bytes, arrays


def _try_candidate(
    node: ir.Node, opset: int, max_bytes: int, stats: PassStats, budget: _Budget
) -> _Candidate | None:
    if not node.inputs or not all(v is None or is_constant(v) for v in node.inputs):
        return None
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
        return None
    arrays = None
    out_bytes = _inferred_bytes(node, opset)
    if out_bytes is None and (elems := _predicted_elems(node)) is not None:
        dtype = node.outputs[0].dtype
        out_bytes = elems * (int(dtype.itemsize) if dtype is not None else 4)
    if out_bytes is None:  # the size depends on the values (NonZero, Unique...): evaluate now to learn it
        arrays = _try_evaluate(node, opset, stats, budget)
        if arrays is None:
            return None
        out_bytes = sum(a.nbytes for a in arrays)
    if out_bytes > max_bytes:
        stats.skip(node, f"folded tensor would be {out_bytes / 2**20:.1f} MB (> max_fold_mb)")
        return None
    return _Candidate(node, out_bytes, arrays)


# Constant inputs up to this many bytes are given to the node's shape inference with their values (a
# shape, repeats, a depth); larger ones with their type only.
_INFER_DATA_BYTES = 64 * 1024


def _inferred_bytes(node: ir.Node, opset: int) -> int | None:
    """Bytes of the node's outputs as onnx's shape inference computes them from its constant inputs
    (types, and values of the small ones); None when it cannot tell. What the model declares for the
    outputs is not read: a file can declare anything."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
        types, data = {}, {}
        for k, v in enumerate(node.inputs):
            if v is None:
                continue
            tensor = v.const_value
            types[f"i{k}"] = onnx.helper.make_tensor_type_proto(int(tensor.dtype), list(tensor.shape.numpy()))
            if tensor.nbytes <= _INFER_DATA_BYTES:
                data[f"i{k}"] = ir.serde.serialize_tensor(tensor)
        outs = onnx.shape_inference.infer_node_outputs(
            schema, _node_proto(node), types, data, opset_imports=[onnx.helper.make_opsetid("", opset)])
    except Exception as exc:  # no schema, or inference that fails on these inputs
        logger.debug("no inferred size for %s: %s", node.name or node.op_type, exc)
        return None
    total = 0
    for k in range(len(node.outputs)):
        tp = outs.get(f"o{k}")
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tp.tensor_type.shape.dim]
        if any(d < 0 for d in dims):
            return None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type).itemsize
        total += math.prod(dims) * itemsize
    return total


def _within_growth(pending: list[_Candidate], stats: PassStats) -> list[_Candidate]:
    """The candidates whose folding does not grow the model, decided per group of shared weights.

    Candidates that read the same constant (larger than ``_GROW_SLACK_BYTES``; small shared
    constants such as Slice axes do not join groups) fold or stay together: a weight is freed only
    when every node reading it folds. A group is folded when its outputs take at most its freed
    inputs plus ``_GROW_SLACK_BYTES`` per node. LSTM exports that slice one weight into gate pieces
    and concatenate them fold (the pieces cover the weight); Slices of a weight that a MatMul still
    reads do not. The same graph gives the same decision, so folding again changes nothing.
    """
    parent = list(range(len(pending)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_reader: dict[int, int] = {}
    for i, cand in enumerate(pending):
        for v in _const_inputs(cand.node):
            if int(v.const_value.nbytes) > _GROW_SLACK_BYTES:
                j = first_reader.setdefault(id(v), i)
                parent[find(i)] = find(j)
    groups: dict[int, list[_Candidate]] = {}
    for i, cand in enumerate(pending):
        groups.setdefault(find(i), []).append(cand)
    accepted = []
    for members in groups.values():
        growth = _group_growth(members)
        if growth <= _GROW_SLACK_BYTES * len(members):
            accepted.extend(members)
            continue
        shared = f" (with {len(members) - 1} other nodes reading the same weights)" if len(members) > 1 else ""
        for cand in members:
            stats.skip(cand.node, f"folding would grow the model by {growth / 2**20:.2f} MB{shared}")
    kept = {id(c) for c in accepted}
    return [c for c in pending if id(c) in kept]


def _const_inputs(node: ir.Node) -> list[ir.Value]:
    return list({id(v): v for v in node.inputs if v is not None}.values())


def _group_growth(members: list[_Candidate]) -> int:
    """Bytes the group's outputs add minus the bytes of inputs that only the group reads."""
    ids = {id(c.node) for c in members}
    inputs = {id(v): v for c in members for v in _const_inputs(c.node)}
    freed = sum(int(v.const_value.nbytes) for v in inputs.values()
                if not v.is_graph_output() and all(id(u.node) in ids for u in v.uses()))
    return sum(c.out_bytes for c in members) - freed


def _node_proto(node: ir.Node) -> onnx.NodeProto:
    """`node` alone as protobuf, inputs named ``i0, i1...`` (missing ones empty) and outputs ``o0, o1...``."""
    return onnx.helper.make_node(
        node.op_type,
        [f"i{k}" if v is not None else "" for k, v in enumerate(node.inputs)],
        [f"o{k}" for k in range(len(node.outputs))],
        **{a.name: a.value if not isinstance(a.value, ir.TensorProtocol) else ir.serde.serialize_tensor(a.value)
           for a in node.attributes.values()},
    )


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray]:
    proto = _node_proto(node)
    feeds = {f"i{k}": np.asarray(v.const_value.numpy()) for k, v in enumerate(node.inputs) if v is not None}
    ev = ReferenceEvaluator(proto, opsets={"": opset})
    results = ev.run(None, feeds)
    return [np.asarray(r) for r in results]


def _replace_with_initializers(graph: ir.Graph, node: ir.Node, arrays: list[np.ndarray]) -> None:
    for out, array in zip(node.outputs, arrays):
        if not out.uses():
            continue
        dtype = out.dtype
        if dtype is not None and array.dtype != dtype.numpy():
            array = array.astype(dtype.numpy())
        if not array.flags.c_contiguous:  # a folded Transpose is a strided view
            array = array.copy(order="C")
        init = ir.Value(name=out.name, shape=ir.Shape(array.shape),
                        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                        const_value=ir.tensor(array, name=out.name))
        graph.register_initializer(init)
        out.replace_all_uses_with(init)
    graph.remove(node, safe=True)
