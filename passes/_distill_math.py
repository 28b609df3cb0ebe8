"""Numerics of the `distill` pass: features, streamed normal equations, constrained ridge solves.

Every layer is written in *row form*: one row per output channel, ``W[j] = [w_j | b_j]`` over the
layer's input features ``x`` plus a trailing constant 1, so the layer computes ``y_j = W[j] · [x, 1]``.
Grouped convolutions keep one set of statistics per group.

Statistics streamed over the transfer set (never the activations themselves), per group ``g``:
``G = Σ x̃ x̃ᵀ`` (x̃ = [x, 1]), ``H = Σ x̃ yᵀ`` against *all* teacher channels, ``q = Σ y²`` per
teacher channel and the row count ``n``. From these:

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
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "Normal",
    "conv_features",
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

MIN_CORRELATION = 0.5
"""A removed-channel student channel is paired with a teacher channel only above this correlation."""


class Normal:
    """Streamed normal equations of one layer: per group ``G``, ``H`` and the shared ``q``, ``n``."""

    def __init__(self, groups: int, features: int, teacher_channels: int) -> None:
        self.G = np.zeros((groups, features + 1, features + 1))
        self.H = np.zeros((groups, features + 1, teacher_channels))
        self.q = np.zeros(teacher_channels)
        self.n = 0

    @property
    def features(self) -> int:
        return self.G.shape[1] - 1

    def add(self, feats: np.ndarray, target: np.ndarray) -> None:
        """Add rows: `feats` [rows, groups * features], `target` [rows, teacher channels]."""
        rows = feats.shape[0]
        groups, f = self.G.shape[0], self.features
        y = target.astype(np.float64, copy=False)
        ones = np.ones((rows, 1))
        for g in range(groups):
            x = np.concatenate([feats[:, g * f : (g + 1) * f].astype(np.float64), ones], axis=1)
            self.G[g] += x.T @ x
            self.H[g] += x.T @ y
        self.q += np.einsum("ij,ij->j", y, y)
        self.n += rows

    def merged(self, other: Normal) -> Normal:
        """The statistics of both sets of rows."""
        out = Normal(self.G.shape[0], self.features, self.q.shape[0])
        out.G, out.H, out.q, out.n = self.G + other.G, self.H + other.H, self.q + other.q, self.n + other.n
        return out

    def ridge(self, group: int, strength: float) -> float:
        """λ for `group`: `strength` times the mean diagonal of the feature block of G."""
        f = self.features
        scale = float(np.mean(np.diag(self.G[group])[:f])) if f else 0.0
        return strength * scale


def conv_features(
    x: np.ndarray, kernel: tuple[int, ...], strides: tuple[int, ...], dilations: tuple[int, ...],
    pads: tuple[int, ...],
) -> np.ndarray:
    """im2col of an N-d convolution input [N, C, *S] -> [N * prod(out), C * prod(kernel)].

    Columns are ordered (channel, kernel...) like a Conv weight [M, C, *kernel] flattened per row,
    rows (sample, out positions...) like the output [N, M, *out] with the channel axis moved last.
    """
    nd = len(kernel)
    begin, end = pads[:nd], pads[nd:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end)])
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilations))
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    win = win[index]  # [N, C, *out, *kernel]
    n, c = win.shape[:2]
    out = win.shape[2 : 2 + nd]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return np.ascontiguousarray(win.transpose(order)).reshape(n * int(np.prod(out)), c * int(np.prod(kernel)))


def rows_error(normal: Normal, group_of: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(squared error, target energy) of row-form weights `rows` against teacher channels `targets`."""
    err = 0.0
    for g in np.unique(group_of):
        sel = group_of == g
        w, t = rows[sel], targets[sel]
        err += float(np.sum(normal.q[t]) - 2.0 * np.sum(w * normal.H[g][:, t].T) + np.sum((w @ normal.G[g]) * w))
    return max(err, 0.0), float(np.sum(normal.q[targets]))


def solve_rows(
    normal: Normal,
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
        lam = normal.ridge(g, ridge)
        damp = np.where(support < f, lam, 0.0)
        fixed = np.setdiff1d(np.arange(f + 1), support)
        lhs = normal.G[g][np.ix_(support, support)] + np.diag(damp)
        w0 = rows0[members]
        rhs = normal.H[g][support][:, targets[members]] + damp[:, None] * w0[:, support].T
        if fixed.size:  # entries held at a nonzero value (e.g. a bias that cannot move)
            rhs -= normal.G[g][np.ix_(support, fixed)] @ w0[:, fixed].T
        out[np.ix_(members, support)] = _solve(lhs, rhs).T
    return out


def _solve(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def bias_given_weights(normal: Normal, group_of: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
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
    normal: Normal, group_of: np.ndarray, rows0: np.ndarray, preset: np.ndarray | None = None
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


def _correlations(normal: Normal, group_of: np.ndarray, rows0: np.ndarray) -> np.ndarray:
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


def reduced_rank(normal: Normal, rows: np.ndarray, rank: int, *, bias_outside: bool) -> tuple[np.ndarray, np.ndarray]:
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
