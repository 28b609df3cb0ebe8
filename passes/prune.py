"""prune: zero the least important weights of Conv, ConvTranspose, Gemm and MatMul.

Prunable weights are constant float initializers read only by those ops in the weight role (see
`_prune_targets`); a weight shared by several of them is pruned once, biases are never touched,
nodes matching ``exclude`` and tensors below ``min_size`` stay dense. Rewrite cases:

1. ``threshold=θ``: the seed method, ``W' = W · 1[|W| > θ]`` in every prunable tensor.
2. ``sparsity=s, scope=layer``: in each tensor of n weights the ``round(s·n)`` lowest scores are
   zeroed, so every tensor reaches s to within half a weight.
3. ``sparsity=s, scope=global``: one ranking over all tensors of N weights in total; the
   ``round(s·N)`` lowest are zeroed. Raw scores are not comparable across layers (fan-in scaled
   weights are small in large layers, which would swallow the budget), so each tensor's scores are
   normalised first, LAMP style (Lee et al. 2021): with a tensor's squared scores sorted ascending,
   ``u_(i)² / Σ_{j≥i} u_(j)²``, the share of the remaining energy a weight holds. Every tensor's
   largest score becomes 1, so no tensor is emptied while other weights remain to be chosen.
4. ``pattern=N:M``: in every block of M consecutive weights along the reduction axis (Conv input
   channels, Gemm/MatMul K), the M−N lowest scores are zeroed (sparsity 1 − N/M), the layout
   sparse tensor cores run. Tensors whose reduction axis is not a multiple of M stay dense.

Scores: ``magnitude`` is ``|W_ij|``; ``activation`` (Wanda, Sun et al. 2023) is
``|W_ij| · ‖X_j‖₂``, the weight times the L2 norm of the input feature it multiplies, measured on
the calibration feeds (summed over batch, positions and every node sharing the weight). Weights
that are already zero rank first, so running the pass twice equals running it once.

``storage=sparse`` marks pruned tensors whose sparse form (values + INT64 indices) is smaller for
the model's ``sparse_initializer`` (see `onnxopt.sparse`); ``auto`` does so only when it saves at
least a tenth of the model's weight bytes. Zeros do not speed up ONNX Runtime's dense CPU kernels.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.analysis import infer_shapes
from onnxopt.analysis.layers import conv_geometry
from onnxopt.context import Context
from onnxopt.errors import UsageError
from onnxopt.graph import require_finite, set_weight
from onnxopt.io import weight_bytes
from onnxopt.registry import Pass, PassStats, exclude_patterns, layer_settings, layers_option, option, register_pass
from onnxopt.sparse import mark_sparse, sparse_nbytes

from ._prune_targets import Target, feature_scale, find_targets

__all__ = ["Prune", "parse_pattern"]

logger = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.5
AUTO_MIN_SAVING = 0.10
_ZIP_LEVEL = 6  # deflate's default, what zip uses
_ZIP_EXACT_BYTES = 1024 * 1024
_ZIP_CHUNK = 64 * 1024
_ZIP_CHUNKS = 8
_SPEED_NOTE = (
    "ONNX Runtime's CPU kernels are dense: unstructured zeros make the model no faster; they buy size "
    "when stored sparse or when the file is shipped compressed"
)
_NM_NOTE = "N:M zeros run faster only on hardware with sparse tensor cores (e.g. TensorRT on NVIDIA Ampere or newer)"

FeatureKey = tuple[str, int]


def parse_pattern(text: str) -> tuple[int, int] | None:
    """None for ``unstructured``, (N, M) for ``N:M`` with 0 < N < M; UsageError otherwise."""
    if text == "unstructured":
        return None
    head, sep, tail = text.partition(":")
    try:
        n, m = int(head), int(tail)
    except ValueError:
        n = m = 0
    if not sep or not 0 < n < m:
        raise UsageError(
            f"prune.pattern: '{text}' is not valid (allowed: unstructured, or N:M with 0 < N < M, e.g. 2:4)"
        )
    return n, m


@register_pass("prune")
class Prune(Pass):
    """Zero the least important Conv/ConvTranspose/Gemm/MatMul weights (magnitude or activation-aware, N:M)."""

    exact = False
    idempotent = True

    sparsity: float | None = option(
        None, f"fraction of prunable weights to zero, in [0, 1) ({DEFAULT_SPARSITY} when threshold is not given)",
        when={"threshold": None, "pattern": "unstructured"},
    )
    threshold: float | None = option(None, "instead of sparsity: zero every weight with |w| <= threshold",
                                     when={"criterion": "magnitude", "pattern": "unstructured"})
    scope: Literal["global", "layer"] = option(
        "global", "global: one ranking over all layers (LAMP-normalised scores); layer: the same sparsity per tensor",
        when={"threshold": None, "pattern": "unstructured"},
    )
    criterion: Literal["magnitude", "activation"] = option(
        "magnitude", "magnitude: |w|; activation: |w| x input activation norm on --calib data (Wanda)"
    )
    pattern: str = option("unstructured", "unstructured, or N:M: keep N of every M weights along the reduction axis")
    exclude: list[str] = option([], "node-name globs or op types to leave dense (often the first conv, the classifier)")
    min_size: int = option(0, "leave weights with fewer elements than this dense")
    storage: Literal["dense", "sparse", "auto"] = option(
        "dense", "dense: zeros in place; sparse: sparse_initializer where smaller; auto: sparse if it saves >= 10%"
    )
    layers: dict[str, dict[str, Any]] = layers_option("sparsity")

    def __post_init__(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise UsageError(f"prune.sparsity: {self.sparsity} is outside [0, 1) (allowed 0 <= sparsity < 1)")
        if self.threshold is not None and not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise UsageError(f"prune.threshold: {self.threshold} is not allowed (allowed: a finite number >= 0)")
        if self.sparsity is not None and self.threshold is not None:
            raise UsageError("prune: give sparsity or threshold, not both")
        for key, allowed in (("scope", ("global", "layer")), ("criterion", ("magnitude", "activation")),
                             ("storage", ("dense", "sparse", "auto"))):
            if getattr(self, key) not in allowed:
                raise UsageError(f"prune.{key}: '{getattr(self, key)}' is not allowed (allowed: {', '.join(allowed)})")
        nm = parse_pattern(self.pattern)
        if nm is not None and self.sparsity is not None:
            fixed = 1 - nm[0] / nm[1]
            raise UsageError(f"prune: pattern {self.pattern} fixes the sparsity at {fixed:g}; drop sparsity")
        if self.threshold is not None and (nm is not None or self.criterion != "magnitude"):
            raise UsageError("prune.threshold: works with criterion=magnitude and pattern=unstructured only")
        if self.min_size < 0:
            raise UsageError(f"prune.min_size: {self.min_size} is negative (allowed: 0 or more)")

    # ------------------------------------------------------------------ the pass
    def call(self, model: ir.Model, ctx: Context | None = None) -> PassStats:
        ctx = ctx if ctx is not None else Context()
        stats = PassStats()
        if self.criterion == "activation":
            ctx.require_calib("prune criterion=activation", "it weighs |w| by input activation norms")
        targets = find_targets(model, exclude_patterns(self, model), self.min_size, stats)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            targets = [t for t in targets if not _declined(t, _try_nm_layout(t, nm[1]), stats)]
        scales: dict[int, np.ndarray] = {}
        if self.criterion == "activation" and targets:
            targets, scales = _activation_scales(model, ctx, targets, stats)
        if not targets:
            return _nothing_prunable(stats)
        rows = [_apply(t, mask, zipped) for t, mask, zipped in self._layered_masks(targets, scales, nm)]
        marked = self._choose_storage(model, rows, stats)
        stats.layers = rows
        stats.summary = self._summary(rows, nm)
        stats.modified = marked or any(r["nonzero_after"] < r["nonzero_before"] for r in rows)
        stats.notes.append(_SPEED_NOTE if nm is None else _NM_NOTE)
        return stats

    def _layered_masks(
        self, targets: list[Target], scales: dict[int, np.ndarray], nm: tuple[int, int] | None
    ) -> Iterator[tuple[Target, np.ndarray, int]]:
        """`_masks`, except that a target whose ``layers`` entry sets its own sparsity is pruned alone at it."""
        own = {id(t): layer_settings(self, *(u.node for u in t.uses))["sparsity"] for t in targets}
        for t in (t for t in targets if own[id(t)] != self.sparsity):
            w = _weight(t)
            yield t, _lowest_mask(_scores(w, scales.get(id(t))), round(own[id(t)] * w.size)), _zipped(w)
        rest = [t for t in targets if own[id(t)] == self.sparsity]
        if rest:
            yield from self._masks(rest, scales, nm)

    def _masks(
        self, targets: list[Target], scales: dict[int, np.ndarray], nm: tuple[int, int] | None
    ) -> Iterator[tuple[Target, np.ndarray, int]]:
        """Each target with the mask of weights to zero and the zipped size of its weight before."""
        if self.threshold is not None:
            for t in targets:
                w = _weight(t)
                yield t, np.abs(w) <= self.threshold, _zipped(w)
            return
        if nm is not None:
            for t in targets:
                w = _weight(t)
                yield t, _nm_mask(_scores(w, scales.get(id(t))), t.reduction_axis() or 0, *nm), _zipped(w)
            return
        sparsity = self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY
        if self.scope == "layer":
            for t in targets:
                w = _weight(t)
                yield t, _lowest_mask(_scores(w, scales.get(id(t))), round(sparsity * w.size)), _zipped(w)
            return
        yield from _global_masks(targets, scales, sparsity)

    def _choose_storage(self, model: ir.Model, rows: list[dict], stats: PassStats) -> bool:
        """Fill each row's storage; mark the sparse ones. True when the marks changed."""
        for row in rows:
            row["storage"] = "dense"
            row["stored_bytes"] = row["bytes"]
        if self.storage == "dense":
            return False
        smaller = [r for r in rows if r["sparse_bytes"] < r["bytes"]]
        saving = sum(r["bytes"] - r["sparse_bytes"] for r in smaller)
        if self.storage == "auto" and saving < AUTO_MIN_SAVING * max(weight_bytes(model), 1):
            stats.notes.append(f"storage=auto kept dense: sparse storage would save {saving} bytes, "
                               f"under {AUTO_MIN_SAVING:.0%} of the weights")
            return False
        for row in smaller:
            row["storage"] = "sparse"
            row["stored_bytes"] = row["sparse_bytes"]
        changed = mark_sparse(model, [r["weight"] for r in smaller])
        if smaller:
            stats.notes.append(f"{len(smaller)} tensors are stored as sparse_initializer when the model is "
                               "saved as one file (with external data they stay dense)")
        dense_left = len(rows) - len(smaller)
        if dense_left:
            stats.notes.append(f"{dense_left} pruned tensors stay dense: their sparse form (values + INT64 "
                               "indices) would not be smaller")
        return changed

    def _summary(self, rows: list[dict], nm: tuple[int, int] | None) -> dict:
        params = sum(r["params"] for r in rows)
        after = sum(r["nonzero_after"] for r in rows)
        summary: dict = {"criterion": self.criterion}
        if self.threshold is not None:
            summary["threshold"] = self.threshold
        elif nm is not None:
            summary["pattern"] = self.pattern
        else:
            summary["scope"] = self.scope
            summary["target_sparsity"] = self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY
        summary.update({
            "sparsity": 1.0 - after / params if params else 0.0,
            "layers": len(rows),
            "params": params,
            "nonzero_before": sum(r["nonzero_before"] for r in rows),
            "nonzero_after": after,
            "weight_bytes_before": sum(r["bytes"] for r in rows),
            "weight_bytes_after": sum(r["stored_bytes"] for r in rows),
            "zipped_bytes_before": sum(r["zipped_before"] for r in rows),
            "zipped_bytes_after": sum(r["zipped_after"] for r in rows),
        })
        sparse = sum(1 for r in rows if r["storage"] == "sparse")
        if sparse:
            summary["sparse_tensors"] = sparse
        return summary


# ---------------------------------------------------------------------- helpers
def _declined(target: Target, reason: str | None, stats: PassStats) -> bool:
    if reason:
        for use in target.uses:
            stats.skip(use.node, reason)
    return reason is not None


def _nothing_prunable(stats: PassStats) -> PassStats:
    message = "prune: nothing to prune: no Conv/ConvTranspose/Gemm/MatMul weight qualifies"
    if stats.skipped:
        message += f" ({len(stats.skipped)} nodes skipped, reasons in the report)"
    logger.warning(message)
    stats.notes.append(message + "; the model is unchanged")
    stats.summary = {"layers": 0, "params": 0}
    return stats


def _weight(target: Target) -> np.ndarray:
    return require_finite(np.asarray(target.value.const_value.numpy()), f"weight '{target.name}'",
                          "its magnitudes cannot be ranked")


def _zipped(array: np.ndarray) -> int:
    """Deflate size of the tensor's bytes; above 1 MB estimated from 8 evenly spread 64 KB chunks
    (deflate looks back 32 KB only, so spread chunks compress like the whole)."""
    data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if data.size <= _ZIP_EXACT_BYTES:
        return len(zlib.compress(data.tobytes(), _ZIP_LEVEL))
    starts = np.linspace(0, data.size - _ZIP_CHUNK, _ZIP_CHUNKS).astype(np.int64)
    packed = sum(len(zlib.compress(data[s : s + _ZIP_CHUNK].tobytes(), _ZIP_LEVEL)) for s in starts)
    return int(round(packed * data.size / (_ZIP_CHUNK * _ZIP_CHUNKS)))


def _try_nm_layout(target: Target, m: int) -> str | None:
    """None when every block of M along the reduction axis lies inside one group, else why not."""
    axis = target.reduction_axis()
    if axis is None:
        return "weight is read with different reduction axes by its nodes; N:M needs one"
    length = target.shape[axis]
    for use in target.uses:
        if use.node.op_type == "ConvTranspose":
            length = target.shape[axis] // max(conv_geometry(use.node, target.shape).groups, 1)
    if length % m:
        return f"reduction axis has {length} weights per group, not a multiple of {m}"
    return None


def _scores(w: np.ndarray, scale: np.ndarray | None, *, normalize: bool = False) -> np.ndarray:
    """Importance of each weight (float32); weights already zero get -1 so they rank first."""
    score = np.abs(w.astype(np.float32))
    if scale is not None:
        score = score * scale.astype(np.float32)
    if normalize:
        score = _lamp(score)
    score[w == 0] = -1.0
    return score


def _lamp(score: np.ndarray) -> np.ndarray:
    """Each squared score over the sum of the squared scores not below it."""
    flat = np.square(score.reshape(-1))
    order = np.argsort(flat)
    ranked = flat[order].astype(np.float64)
    tail = np.cumsum(ranked[::-1])[::-1]
    out = np.empty_like(flat)
    out[order] = np.divide(ranked, tail, out=np.zeros_like(ranked), where=tail > 0)
    return out.astype(np.float32).reshape(score.shape)


def _lowest_mask(score: np.ndarray, k: int) -> np.ndarray:
    """True at the `k` lowest scores (ties broken by position)."""
    flat = score.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    k = min(max(int(k), 0), flat.size)
    if k:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    return mask.reshape(score.shape)


def _nm_mask(score: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True at the M-N lowest scores of every block of M consecutive weights along `axis`."""
    moved = np.moveaxis(score, axis, -1)
    blocks = moved.reshape(-1, m)
    lowest = np.argpartition(blocks, m - n - 1, axis=1)[:, : m - n]
    mask = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(mask, lowest, True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, axis)


def _global_masks(
    targets: list[Target], scales: dict[int, np.ndarray], sparsity: float
) -> Iterator[tuple[Target, np.ndarray, int]]:
    """One ranking of LAMP-normalised scores over all targets; the lowest round(s·N) are zeroed."""
    parts, zipped = [], []
    for t in targets:
        w = _weight(t)
        parts.append(_scores(w, scales.get(id(t)), normalize=True).reshape(-1))
        zipped.append(_zipped(w))
    sizes = [p.size for p in parts]
    allscores = np.concatenate(parts)
    del parts
    chosen = np.flatnonzero(_lowest_mask(allscores, round(sparsity * allscores.size)))  # ascending
    del allscores
    bounds = np.cumsum([0] + sizes)
    for i, t in enumerate(targets):
        lo, hi = np.searchsorted(chosen, [bounds[i], bounds[i + 1]])
        mask = np.zeros(sizes[i], dtype=bool)
        mask[chosen[lo:hi] - bounds[i]] = True
        yield t, mask.reshape(t.shape), zipped[i]


def _apply(target: Target, mask: np.ndarray, zipped_before: int) -> dict:
    """Zero `mask` in the target's weight (written only when a nonzero changes); its layer row."""
    w = _weight(target)
    before = int(np.count_nonzero(w))
    if np.any(mask & (w != 0)):
        w = w.copy()
        w[mask] = 0
        set_weight(target.value, w)
        zipped_after = _zipped(w)
    else:
        zipped_after = zipped_before
    after = int(np.count_nonzero(w))
    return {
        "weight": target.name,
        "nodes": ",".join(target.node_names),
        "op": ",".join(target.op_types),
        "shape": list(target.shape),
        "params": int(w.size),
        "nonzero_before": before,
        "nonzero_after": after,
        "sparsity": 1.0 - after / w.size if w.size else 0.0,
        "bytes": int(w.nbytes),
        "sparse_bytes": sparse_nbytes(after, w.dtype.itemsize),
        "zipped_before": zipped_before,
        "zipped_after": zipped_after,
    }


# ---------------------------------------------------------------------- activation criterion
def _activation_scales(
    model: ir.Model, ctx: Context, targets: list[Target], stats: PassStats
) -> tuple[list[Target], dict[int, np.ndarray]]:
    """Per-element input norms of each target, from one streaming pass over the calibration feeds."""
    infer_shapes(model)
    kept = [t for t in targets if not _declined(t, _try_tappable(model, t), stats)]
    keys = sorted({(u.feature.name, u.feature_axis) for t in kept for u in t.uses})
    norms = _feature_norms(model, ctx, keys) if keys else {}
    scales: dict[int, np.ndarray] = {}
    accepted = []
    for t in kept:
        squared = None
        for use in t.uses:
            s = feature_scale(use, t.shape, norms[(use.feature.name, use.feature_axis)])
            if s is None:
                squared = None
                break
            squared = np.square(s) if squared is None else squared + np.square(s)
        if squared is None:
            _declined(t, "activation norms do not match the weight's shape", stats)
            continue
        scales[id(t)] = np.sqrt(squared)
        accepted.append(t)
    return accepted, scales


def _try_tappable(model: ir.Model, target: Target) -> str | None:
    if not target.in_main_graph(model.graph):
        return "in a subgraph: activation statistics are taken in the main graph only"
    for use in target.uses:
        if not use.feature.name or use.feature.type is None:
            return "input type unknown (shape inference failed), so its activations cannot be read"
    return None


def _feature_norms(model: ir.Model, ctx: Context, keys: list[FeatureKey]) -> dict[FeatureKey, np.ndarray]:
    """L2 norm of each input feature over every calibration sample and position."""
    names = sorted({name for name, _ in keys})
    sums: dict[FeatureKey, np.ndarray] = {}
    for acts in ctx.activations(model, names, desc="prune: activation norms"):
        for name, axis in keys:
            x = np.asarray(acts[name], dtype=np.float64)
            ax = axis % x.ndim
            part = np.sum(np.square(x), axis=tuple(i for i in range(x.ndim) if i != ax))
            sums[(name, axis)] = part if (name, axis) not in sums else sums[(name, axis)] + part
    return {key: np.sqrt(require_finite(value, f"activation '{key[0]}' on the calibration data"))
            for key, value in sums.items()}
