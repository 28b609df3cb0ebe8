"""Least-squares fitting of linear layers from data: im2col, streamed second moments, ridge solves.

numpy only, float64 inside. What a pass that refits or whitens a layer needs from calibration runs:

- `im2col`: the input patches of an N-d convolution, one row per output position, columns ordered
  like a Conv weight row (channel, kernel...). Padding is explicit (begin..., end...), negative
  values crop; `onnxopt.analysis.layers.ConvGeometry.unfold` resolves ``auto_pad`` first.
- `Moments`: the statistics of a stream of rows, never the rows themselves: per group ``g`` of
  columns ``G = Σ x̃ᵀx̃`` and ``H = Σ x̃ᵀy`` (``x̃ = [x, 1]`` with ``intercept``, else ``x``), ``q = Σ y²``
  per target column and the row count ``n``. Rows are added in chunks, so a large batch never
  makes a float64 copy of more than `CHUNK_ROWS` rows.
- `ridge_solve`: ``(G + diag(λ))⁻¹ H`` (least squares when the system is singular); with ``λ = 0``
  it is the ordinary least-squares fit of ``Y`` on ``X``.

Worked example: a Conv ``W[M, C, 3, 3]`` refit to targets ``Y[n·h·w, M]``::

    m = Moments(C * 9, M, intercept=True)
    for x, y in batches: m.add(im2col(x, (3, 3), pads=(1, 1, 1, 1)), y)
    theta = ridge_solve(m.G[0], m.H[0], 1e-4 * np.trace(m.G[0]) / m.dim)   # [C·9 + 1, M]: W rows, then b
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["CHUNK_ROWS", "im2col", "Moments", "ridge_solve"]

CHUNK_ROWS = 16384
"""Rows converted to float64 and multiplied at once by `Moments.add`."""


def im2col(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None,
) -> np.ndarray:
    """Patches of an N-d convolution input ``x`` [N, C, *S] -> [N · prod(out), C · prod(kernel)].

    Columns are ordered (channel, kernel...) like a Conv weight ``[M, C, *kernel]`` flattened per
    row; rows (sample, output position...) like the output ``[N, M, *out]`` with the channel axis
    moved last. ``pads`` are (begin..., end...) per spatial axis; a negative pad crops.
    """
    nd = len(kernel)
    strides = tuple(strides) if strides else (1,) * nd
    dilations = tuple(dilations) if dilations else (1,) * nd
    pads = tuple(pads) if pads else (0,) * (2 * nd)
    begin, end = pads[:nd], pads[nd:]
    crop = tuple(slice(max(-b, 0), size - max(-e, 0)) for b, e, size in zip(begin, end, x.shape[2:]))
    xp = np.pad(x[(slice(None), slice(None), *crop)],
                [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)])
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


class Moments:
    """Streamed ``G = Σ x̃ᵀx̃``, ``H = Σ x̃ᵀy`` per column group, ``q = Σ y²`` and the row count ``n``.

    ``x`` rows have ``groups · features`` columns; group ``g`` is columns ``g·features .. (g+1)·features``
    (the features a grouped convolution's group reads). With ``intercept`` each group's rows get a
    trailing 1, so the last row/column of ``G`` and last row of ``H`` carry the sums for a bias.
    """

    def __init__(self, features: int, targets: int = 0, *, groups: int = 1, intercept: bool = False) -> None:
        self.intercept = intercept
        dim = features + int(intercept)
        self.G = np.zeros((groups, dim, dim))
        self.H = np.zeros((groups, dim, targets))
        self.q = np.zeros(targets)
        self.n = 0

    @property
    def features(self) -> int:
        """Columns per group, without the intercept."""
        return self.G.shape[1] - int(self.intercept)

    @property
    def dim(self) -> int:
        """Size of one group's ``G`` (features plus the intercept)."""
        return self.G.shape[1]

    @property
    def groups(self) -> int:
        return self.G.shape[0]

    @property
    def targets(self) -> int:
        return self.q.shape[0]

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Add rows `x` [rows, groups · features] and their targets `y` [rows, targets] (None: no targets)."""
        for start in range(0, x.shape[0], CHUNK_ROWS):
            part_y = None if y is None else np.asarray(y[start : start + CHUNK_ROWS], dtype=np.float64)
            self._add_chunk(x[start : start + CHUNK_ROWS], part_y)
        self.n += x.shape[0]

    def _add_chunk(self, x: np.ndarray, y: np.ndarray | None) -> None:
        f = self.features
        ones = np.ones((x.shape[0], 1)) if self.intercept else None
        for g in range(self.groups):
            part = np.asarray(x[:, g * f : (g + 1) * f], dtype=np.float64)
            if ones is not None:
                part = np.concatenate([part, ones], axis=1)
            self.G[g] += part.T @ part
            if y is not None:
                self.H[g] += part.T @ y
        if y is not None:
            self.q += np.einsum("ij,ij->j", y, y)

    def add_gram(self, gram: np.ndarray, rows: int) -> None:
        """Add a precomputed ``Σ xᵀx`` (one group, no targets) over `rows` rows."""
        self.G[0] += gram
        self.n += rows

    def merged(self, other: Moments) -> Moments:
        """The statistics of both sets of rows."""
        out = Moments(self.features, self.targets, groups=self.groups, intercept=self.intercept)
        out.G, out.H, out.q, out.n = self.G + other.G, self.H + other.H, self.q + other.q, self.n + other.n
        return out

    def second_moment(self, group: int = 0) -> np.ndarray | None:
        """``E[x̃ᵀx̃]`` of `group` (``G / n``), or None before any row."""
        return self.G[group] / self.n if self.n else None

    def ridge(self, strength: float, group: int = 0) -> float:
        """``strength`` times the mean diagonal of the feature block of `group`'s ``G`` (intercept excluded)."""
        f = self.features
        return strength * float(np.mean(np.diag(self.G[group])[:f])) if f else 0.0

    def solve(self, ridge: float | np.ndarray, group: int = 0) -> np.ndarray:
        """``(G + diag(ridge))⁻¹ H`` of `group`: one column of coefficients per target."""
        return ridge_solve(self.G[group], self.H[group], ridge)


def ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float | np.ndarray = 0.0) -> np.ndarray:
    """``(gram + diag(ridge))⁻¹ rhs``; `ridge` a number or one value per row of `gram`.

    Falls back to least squares when the system is singular.
    """
    lhs = gram + np.diag(np.broadcast_to(np.asarray(ridge, dtype=np.float64), gram.shape[:1]))
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]
