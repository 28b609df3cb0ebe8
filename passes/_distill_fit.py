"""Refits of the `distill` pass: row form of a layer, constrained ridge solves on streamed statistics, the
checks that keep a refit only when it helps.

Every layer is written in *row form*: one row per output channel, ``W[j] = [w_j | b_j]`` over the
layer's input features ``x`` plus a trailing constant 1, so the layer computes ``y_j = W[j] · [x, 1]``
(`rows_of`: the linear-layer view's ``[out, in]`` weights with its bias as the last column; grouped
convolutions keep one set of statistics per group).

Statistics streamed over the transfer set (never the activations themselves) are a
`onnxopt.analysis.fitting.Moments` with an intercept, per group ``g``: ``G = Σ x̃ x̃ᵀ`` (x̃ = [x, 1]),
``H = Σ x̃ yᵀ`` against *all* teacher channels, ``q = Σ y²`` per teacher channel and the row count
``n``. From these:

- reconstruction error of any row form ``W`` against teacher channel ``t``:
  ``e = q_t − 2 W·H[:, t] + W G Wᵀ`` (no second pass over the data);
- proximal ridge refit with a support mask ``S`` (pruned zeros stay zero):
  ``W_S = (G_SS + λ D)⁻¹ (H_St + λ D W0_S)``, ``D`` the identity on weights and 0 on the bias, so
  the fit is pulled toward the current weights, not toward zero: a layer that already matches its
  teacher is a fixed point;
- reduced-rank regression for a factor pair ``x → A (rank r) → B``: with the dense fit ``W`` and the
  centred covariance ``Gc``, the best rank-``r`` map is ``V Vᵀ W`` where ``V`` are the top ``r``
  eigenvectors of ``W Gc Wᵀ``; ``A = Vᵀ W`` and ``B = V``;
- the student-to-teacher channel map when a pass removed channels: first the teacher filter each
  student filter was copied from (shared exact values, `weight_map`), then for the rest the
  correlation of the student channel as it is before the refit (``W0 x̃``) with every teacher
  channel, assigned greedily (`channel_map`);
- the soft-target fit of a classifier head, ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, by
  gradient descent (`fit_soft_targets`).

`try_refit_linear`, `try_refit_pair` and `try_fit_soft` propose a refit on the fitting feeds, keep it
only when it lowers the error on the held-out feeds and then on all of them (`Fit`), write it and
add a row to the pass stats; otherwise they return the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.fitting import Moments, ridge_solve
from onnxopt.analysis.layers import Linear
from onnxopt.graph import origin_of
from onnxopt.registry import PassStats

__all__ = [
    "MATCHED_REL_L2",
    "Pair",
    "Fit",
    "try_refit_linear",
    "try_refit_pair",
    "try_fit_soft",
    "rows_of",
    "stored_rows",
    "quantize_weights",
    "write_rows",
    "bias_is_free",
    "rows_error",
    "solve_rows",
    "channel_map",
    "weight_map",
    "reduced_rank",
    "bias_given_weights",
    "fit_soft_targets",
    "soft_loss",
]

logger = logging.getLogger(__name__)

MATCHED_REL_L2 = 1e-5
"""A layer whose relative L2 error to its teacher tensor is below this already matches it."""
MIN_CORRELATION = 0.5
"""A removed-channel student channel is paired with a teacher channel only above this correlation."""


# ---------------------------------------------------------------------- row form of a layer
def bias_is_free(layer: Linear) -> bool:
    """Whether a refit may set the layer's bias: it has one, or is a Conv or a Gemm with beta != 0."""
    if layer.bias is not None:
        return True
    if layer.op == "Gemm":
        return layer.beta != 0.0
    return layer.op == "Conv"


def rows_of(layer: Linear) -> np.ndarray:
    """Current weights as rows ``[w_j | b_j]`` (zero bias when there is none)."""
    return np.concatenate([layer.weights(), layer.bias_values()[:, None]], axis=1)


def stored_rows(layer: Linear, rows: np.ndarray) -> np.ndarray:
    """`rows` as they read back once stored (re-quantized weights and bias)."""
    return np.concatenate([layer.roundtrip_weights(rows[:, :-1]), layer.roundtrip_bias(rows[:, -1])[:, None]],
                          axis=1)


def quantize_weights(layer: Linear, rows: np.ndarray) -> np.ndarray:
    """`rows` with only the weights passed through storage (the bias is refit after)."""
    out = rows.copy()
    out[:, :-1] = layer.roundtrip_weights(rows[:, :-1])
    return out


def write_rows(layer: Linear, rows: np.ndarray, graph: ir.Graph) -> None:
    """Store row-form weights; a bias is created only when the layer may have one and it is nonzero."""
    bias = rows[:, -1]
    keep_bias = layer.bias is not None or (bias_is_free(layer) and bool(np.any(bias != 0)))
    reason = layer.write(graph, weights=rows[:, :-1], bias=bias if keep_bias else None)
    assert reason is None, reason  # layers with shared parameters are never refit


# ---------------------------------------------------------------------- statistics
def rows_error(normal: Moments, group_of: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(squared error, target energy) of row-form weights `rows` against teacher channels `targets`."""
    err = 0.0
    for g in np.unique(group_of):
        sel = group_of == g
        w, t = rows[sel], targets[sel]
        err += float(np.sum(normal.q[t]) - 2.0 * np.sum(w * normal.H[g][:, t].T) + np.sum((w @ normal.G[g]) * w))
    return max(err, 0.0), float(np.sum(normal.q[targets]))


def solve_rows(
    normal: Moments,
    group_of: np.ndarray,
    rows0: np.ndarray,
    targets: np.ndarray,
    free: np.ndarray,
    ridge: float,
) -> np.ndarray:
    """Proximal ridge refit of every row; `free` [rows, features + 1] marks the entries that may move.

    Rows that share a group and a support are solved together (one factorization, many targets).
    Entries outside the support keep their current value (zero, for pruned weights).
    """
    out = rows0.copy()
    keys: dict[tuple[int, bytes], list[int]] = {}
    for j in range(rows0.shape[0]):
        keys.setdefault((int(group_of[j]), np.packbits(free[j]).tobytes()), []).append(j)
    f = normal.features
    for (g, _), members in keys.items():
        support = np.flatnonzero(free[members[0]])
        if support.size == 0:
            continue
        lam = normal.ridge(ridge, g)
        damp = np.where(support < f, lam, 0.0)
        fixed = np.setdiff1d(np.arange(f + 1), support)
        gram = normal.G[g][np.ix_(support, support)]
        w0 = rows0[members]
        rhs = normal.H[g][support][:, targets[members]] + damp[:, None] * w0[:, support].T
        if fixed.size:  # entries held at a nonzero value (e.g. a bias that cannot move)
            rhs -= normal.G[g][np.ix_(support, fixed)] @ w0[:, fixed].T
        out[np.ix_(members, support)] = ridge_solve(gram, rhs, damp).T
    return out


def bias_given_weights(normal: Moments, group_of: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The least-squares bias of every row for its (fixed, e.g. re-quantized) weights: ȳ − x̄·w."""
    f = normal.features
    n = max(normal.n, 1)
    out = np.empty(rows.shape[0])
    for j, (g, t) in enumerate(zip(group_of, targets)):
        out[j] = (normal.H[g][f, t] - normal.G[g][f, :f] @ rows[j, :f]) / n
    return out


def weight_map(student: np.ndarray, teacher: np.ndarray, min_share: float = 0.9) -> np.ndarray:
    """Teacher row each student weight row was copied from (−1 when unsure), by shared exact values.

    A pass that removes channels keeps the surviving filters' values (minus removed inputs): the row
    holding at least `min_share` of a student row's nonzero values, and no other row, is its origin.
    """
    m = student.shape[0]
    mapping = np.full(m, -1)
    t_vals = teacher.ravel()
    t_rows = np.repeat(np.arange(teacher.shape[0]), teacher.shape[1])
    keep = t_vals != 0
    t_vals, t_rows = t_vals[keep], t_rows[keep]
    order = np.argsort(t_vals, kind="stable")
    t_vals, t_rows = t_vals[order], t_rows[order]
    for j in range(m):
        vals = student[j][student[j] != 0]
        if vals.size == 0:
            continue
        lo = np.searchsorted(t_vals, vals, side="left")
        hi = np.searchsorted(t_vals, vals, side="right")
        counts = np.zeros(teacher.shape[0])
        for a, b in zip(lo, hi):
            if b > a:
                counts[np.unique(t_rows[a:b])] += 1
        best = int(np.argmax(counts))
        if counts[best] >= min_share * vals.size and np.sum(counts >= min_share * vals.size) == 1:
            mapping[j] = best
    values, seen = mapping[mapping >= 0], set()
    for t in values:  # a teacher row claimed twice is no evidence for either claimant
        if t in seen:
            mapping[mapping == t] = -1
        seen.add(int(t))
    return mapping


def channel_map(
    normal: Moments, group_of: np.ndarray, rows0: np.ndarray, preset: np.ndarray | None = None
) -> np.ndarray:
    """Teacher channel of each student row (−1 when none correlates).

    Same channel count: the identity. Fewer student channels: rows already paired in `preset` (from
    `weight_map`) keep their teacher channel; the others are assigned greedily on the correlation
    between the student's current outputs ``rows0 · x̃`` and the remaining teacher channels.
    """
    m, c_t = rows0.shape[0], normal.q.shape[0]
    if m == c_t:
        return np.arange(m)
    mapping = np.full(m, -1) if preset is None else preset.copy()
    taken = np.zeros(c_t, dtype=bool)
    taken[mapping[mapping >= 0]] = True
    corr = _correlations(normal, group_of, rows0)
    for flat in np.argsort(-corr, axis=None):
        j, t = divmod(int(flat), c_t)
        if mapping[j] >= 0 or taken[t]:
            continue
        if corr[j, t] < MIN_CORRELATION:
            break
        mapping[j], taken[t] = t, True
    return mapping


def _correlations(normal: Moments, group_of: np.ndarray, rows0: np.ndarray) -> np.ndarray:
    """Correlation of every student row's current output with every teacher channel, from the statistics."""
    n = max(normal.n, 1)
    f = normal.features
    corr = np.zeros((rows0.shape[0], normal.q.shape[0]))
    for g in np.unique(group_of):
        sel = group_of == g
        w = rows0[sel]
        mean_s = (w @ normal.G[g][f]) / n
        var_s = np.sum((w @ normal.G[g]) * w, axis=1) / n - mean_s**2
        mean_t = normal.H[g][f] / n
        var_t = normal.q / n - mean_t**2
        cov = (w @ normal.H[g]) / n - np.outer(mean_s, mean_t)
        denom = np.sqrt(np.outer(np.maximum(var_s, 0.0), np.maximum(var_t, 0.0)))
        corr[sel] = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
    return corr


def reduced_rank(normal: Moments, rows: np.ndarray, rank: int, *, bias_outside: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-`rank` factorization ``rows ≈ B @ A`` of a dense fit (one group).

    With ``bias_outside`` the rank limit applies to the weights only (the bias lives in B's bias and is
    refit afterwards): A is [rank, features] and the projection uses the centred covariance. Otherwise
    the bias column goes through the factors: A is [rank, features + 1].
    """
    f = normal.features
    n = max(normal.n, 1)
    g = normal.G[0]
    if bias_outside:
        mean = g[f, :f] / n
        cov = g[:f, :f] - n * np.outer(mean, mean)
        w = rows[:, :f]
    else:
        cov, w = g, rows
    fitted = w @ cov @ w.T
    vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
    v = vecs[:, np.argsort(vals)[::-1][:rank]]
    return v.T @ w, v


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def soft_loss(x: np.ndarray, rows: np.ndarray, teacher_logits: np.ndarray, temperature: float) -> float:
    """``T² · mean KL(softmax(z_t / T) ‖ softmax(z_s / T))`` of row-form weights on features `x` [n, f + 1]."""
    p = _softmax(teacher_logits / temperature)
    z = x @ rows.T / temperature
    log_q = z - z.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    log_p = np.log(np.maximum(p, 1e-300))
    return float(temperature**2 * np.mean(np.sum(p * (log_p - log_q), axis=1)))


def fit_soft_targets(
    x: np.ndarray, rows0: np.ndarray, teacher_logits: np.ndarray, free: np.ndarray, temperature: float,
    ridge: float, *, iterations: int = 300,
) -> np.ndarray:
    """Minimize ``T² · KL(teacher ‖ student)`` at temperature T over the free entries of `rows0`.

    Convex in the weights; plain gradient descent with backtracking from the current weights, plus a
    proximal term ``ridge · mean(x²) · ‖W − W0‖² / 2`` on the weights (not the bias).
    """
    n, f1 = x.shape
    p = _softmax(teacher_logits / temperature)
    lam = ridge * float(np.mean(x[:, : f1 - 1] ** 2)) if f1 > 1 else 0.0
    damp = np.ones(f1)
    damp[-1] = 0.0

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        prox = w - rows0
        value = soft_loss(x, w, teacher_logits, temperature) + 0.5 * lam * float(np.sum(prox**2 * damp))
        q = _softmax(x @ w.T / temperature)
        grad = temperature * (q - p).T @ x / n + lam * prox * damp
        return value, grad * free

    w = rows0.copy()
    value, grad = loss_grad(w)
    step = 1.0 / max(float(np.mean(x**2)) * f1, 1e-12)
    for _ in range(iterations):
        norm2 = float(np.sum(grad**2))
        if norm2 <= 1e-20:
            break
        while step > 1e-12:
            trial = w - step * grad
            t_value, t_grad = loss_grad(trial)
            if t_value <= value - 0.5 * step * norm2:
                break
            step *= 0.5
        else:
            break
        if value - t_value <= 1e-9 * max(abs(value), 1e-12):
            w, value, grad = trial, t_value, t_grad
            break
        w, value, grad = trial, t_value, t_grad
        step *= 2.0
    return w


# ---------------------------------------------------------------------- refits
@dataclasses.dataclass
class Pair:
    """A factorized layer: A's output feeds only the pointwise B, and only B has a teacher tensor."""

    a: Linear
    b: Linear


def _kind(layers: list[Linear], masked: bool) -> str:
    parts = ["low-rank" if len(layers) == 2 else ("masked" if masked else "dense")]
    if any(layer.weight.quantized for layer in layers):
        parts.append("quantized")
    return "+".join(parts)


class Fit:
    """The statistics a refit uses: fitted on `part` and checked on `check`, then refit on both."""

    def __init__(self, part: Moments, check: Moments | None, ridge: float) -> None:
        self.part = part
        self.check = check if check is not None and check.n > 0 and part.n > 0 else None
        self.total = part.merged(check) if check is not None and check.n > 0 else part
        self.ridge = ridge


def _layer_row(name: str, op: str, teacher: str, kind: str, fit: Fit, errors: dict[str, float],
               mapped: int, channels: int) -> dict:
    return {"layer": name, "op": op, "teacher": teacher, "kind": kind, "rows": fit.total.n, **errors,
            "channels_paired": f"{mapped}/{channels}"}


def _rel(err: float, energy: float) -> float:
    return float(np.sqrt(err / max(energy, 1e-300)))


def _judge(fit: Fit, propose, error) -> tuple[object, dict[str, float], str | None]:
    """Run `propose(normal)` on the fitting feeds, keep it only if `error` drops on the held-out ones, refit on all.

    `error(normal, candidate)` gives (squared error, energy); candidate None means the current weights.
    """
    errors: dict[str, float] = {}
    if fit.check is not None:
        held_before, energy = error(fit.check, None)
        held_after, _ = error(fit.check, propose(fit.part))
        errors = {"held_out_err_before": _rel(held_before, energy), "held_out_err_after": _rel(held_after, energy)}
        if held_after >= held_before:
            return None, errors, (f"refit does not generalize: held-out transfer error "
                                  f"{errors['held_out_err_before']:.3g} -> {errors['held_out_err_after']:.3g}")
    before, energy = error(fit.total, None)
    candidate = propose(fit.total)
    after, _ = error(fit.total, candidate)
    errors = {"rel_err_before": _rel(before, energy), "rel_err_after": _rel(after, energy), **errors}
    if after >= before:
        return None, errors, (f"refit does not lower the error (relative {errors['rel_err_before']:.3g} -> "
                              f"{errors['rel_err_after']:.3g})")
    return candidate, errors, None


def _mapping(normal: Moments, group_of: np.ndarray, rows0: np.ndarray,
             preset: np.ndarray | None = None) -> tuple[np.ndarray, str | None]:
    mapping = channel_map(normal, group_of, rows0, preset)
    if not np.any(mapping >= 0):
        return mapping, "no student channel correlates with a teacher channel"
    return mapping, None


def _already_matched(normal: Moments, group_of: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> str | None:
    err, energy = rows_error(normal, group_of, rows, targets)
    if err <= MATCHED_REL_L2**2 * energy:
        return f"already matches the teacher (relative error {_rel(err, energy):.1e})"
    return None


def try_refit_linear(graph: ir.Graph, layer: Linear, fit: Fit, stats: PassStats, teacher: str,
                      teacher_rows: Callable[[str], np.ndarray | None]) -> str | None:
    """Refit one layer (dense, masked and/or quantized); return the reason when it is left as is."""
    rows0 = rows_of(layer)
    group_of = layer.row_groups()
    preset = None
    if rows0.shape[0] < fit.total.q.shape[0]:
        original = teacher_rows(origin_of(layer.weight.value) or "")
        if original is not None and original.shape[0] == fit.total.q.shape[0]:
            preset = weight_map(rows0[:, :-1], original)
    mapping, reason = _mapping(fit.total, group_of, rows0, preset)
    if reason:
        return reason
    sel = np.flatnonzero(mapping >= 0)
    targets, groups, current = mapping[sel], group_of[sel], rows0[sel]
    reason = _already_matched(fit.total, groups, current, targets)
    if reason:
        return reason
    free = current != 0
    free[:, -1] = bias_is_free(layer)

    def propose(normal: Moments) -> np.ndarray:
        new = rows0.copy()
        new[sel] = solve_rows(normal, groups, current, targets, free, fit.ridge)
        new = quantize_weights(layer, new)
        if bias_is_free(layer):
            new[sel, -1] = bias_given_weights(normal, groups, new[sel], targets)
        return stored_rows(layer, new)

    def error(normal: Moments, candidate: np.ndarray | None) -> tuple[float, float]:
        rows = current if candidate is None else candidate[sel]
        return rows_error(normal, groups, rows, targets)

    new, errors, reason = _judge(fit, propose, error)
    if reason:
        return reason
    write_rows(layer, new, graph)  # type: ignore[arg-type]
    masked = bool(np.any(~free[:, :-1]))
    stats.layers.append(_layer_row(layer.name, layer.op, teacher, _kind([layer], masked), fit, errors,
                                   sel.size, rows0.shape[0]))
    return None


def _pair_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row form of B ∘ A from the factors' rows (A: [r, f + 1], B: [m, r + 1])."""
    rank = a.shape[0]
    eff = b[:, :rank] @ a
    eff[:, -1] += b[:, -1]
    return eff


def try_refit_pair(graph: ir.Graph, pair: Pair, fit: Fit, stats: PassStats, teacher: str) -> str | None:
    """Refit a factor pair by reduced-rank regression; return the reason when it is left as is."""
    a0, b0 = rows_of(pair.a), rows_of(pair.b)
    rows0, rank = _pair_rows(a0, b0), a0.shape[0]
    group_of = np.zeros(rows0.shape[0], dtype=int)
    mapping, reason = _mapping(fit.total, group_of, rows0)
    if reason:
        return reason
    if not np.all(mapping >= 0):
        return "not every output channel of the factor pair has a teacher channel"
    reason = _already_matched(fit.total, group_of, rows0, mapping)
    if reason:
        return reason
    bias_outside = bias_is_free(pair.b)
    bias_inside = not bias_outside and bias_is_free(pair.a)
    free = np.ones_like(rows0, dtype=bool)
    free[:, -1] = bias_outside or bias_inside

    def propose(normal: Moments) -> tuple[np.ndarray, np.ndarray]:
        dense = solve_rows(normal, group_of, rows0, mapping, free, fit.ridge)
        a_rows, b_mat = reduced_rank(normal, dense, rank, bias_outside=not bias_inside)
        if a_rows.shape[1] == normal.features:
            a_rows = np.concatenate([a_rows, np.zeros((rank, 1))], axis=1)
        a_new = stored_rows(pair.a, a_rows)
        b_new = quantize_weights(pair.b, np.concatenate([b_mat, np.zeros((b_mat.shape[0], 1))], axis=1))
        if bias_outside:
            b_new[:, -1] = bias_given_weights(normal, group_of, b_new[:, :rank] @ a_new, mapping)
        return a_new, stored_rows(pair.b, b_new)

    def error(normal: Moments, candidate: tuple[np.ndarray, np.ndarray] | None) -> tuple[float, float]:
        rows = rows0 if candidate is None else _pair_rows(*candidate)
        return rows_error(normal, group_of, rows, mapping)

    new, errors, reason = _judge(fit, propose, error)
    if reason:
        return reason
    a_new, b_new = new  # type: ignore[misc]
    write_rows(pair.a, a_new, graph)
    write_rows(pair.b, b_new, graph)
    stats.layers.append(_layer_row(f"{pair.a.name}+{pair.b.name}", f"{pair.a.op}+{pair.b.op}", teacher,
                                   _kind([pair.a, pair.b], False), fit, errors, rows0.shape[0], rows0.shape[0]))
    return None


def try_fit_soft(graph: ir.Graph, head: Linear, x: np.ndarray, z_t: np.ndarray, held: np.ndarray,
                  temperature: float, ridge: float, stats: PassStats) -> str | None:
    """Fit the head to the teacher's soft outputs; return the reason when it is left as is."""
    rows0 = rows_of(head)
    if rows0.shape[0] != z_t.shape[1]:
        return "head and teacher logits differ in size"
    free = rows0 != 0
    free[:, -1] = bias_is_free(head)
    row: dict = {"layer": head.name, "op": head.op, "teacher": head.y.name, "kind": f"soft targets T={temperature:g}",
                 "rows": x.shape[0]}
    if held.any() and (~held).any():
        fitted = stored_rows(head, fit_soft_targets(x[~held], rows0, z_t[~held], free, temperature, ridge))
        before = soft_loss(x[held], rows0, z_t[held], temperature)
        after = soft_loss(x[held], fitted, z_t[held], temperature)
        row.update(held_out_kl_before=before, held_out_kl_after=after)
        if not after < before:
            return f"soft-target fit does not generalize: held-out KL {before:.4g} -> {after:.4g}"
    before = soft_loss(x, rows0, z_t, temperature)
    fitted = stored_rows(head, fit_soft_targets(x, rows0, z_t, free, temperature, ridge))
    after = soft_loss(x, fitted, z_t, temperature)
    if not after < before:
        return f"soft-target fit does not lower the loss ({before:.4g} -> {after:.4g})"
    write_rows(head, fitted, graph)
    agree = [float(np.mean(np.argmax(x @ w.T, axis=1) == np.argmax(z_t, axis=1))) for w in (rows0, fitted)]
    row.update(kl_before=before, kl_after=after, teacher_top1_before=agree[0], teacher_top1_after=agree[1])
    stats.layers.append(row)
    return None


