"""Low-rank factor math for the ``factorize`` pass: numpy only, float64 inside.

Three decompositions, each optionally *whitened* by a second-moment matrix of the layer input:

- `MatrixFactors` — truncated SVD of a matrix ``W`` [K, N] acting as ``y = x W``. With the input
  second moment ``C = E[xᵀx] = L Lᵀ`` (Cholesky) the SVD is taken of ``Lᵀ W = U S Vᵀ`` and the
  factors are ``A = L⁻ᵀ U_r √S_r``, ``B = √S_r V_rᵀ``. Then ``E‖x W − x A B‖² = Σ_{k>r} s_k²``:
  the truncation error is the output error on the data, which this choice minimises (Eckart–Young
  in the whitened space; SVD-LLM). Without ``C``, ``L = I`` and this is the plain SVD.
- `TuckerFactors` — Tucker-2 of a conv weight ``w`` [Cout, Cin, k...] along its two channel modes.
  Input mode: the SVD of ``Lᵀ W₍in₎`` (``W₍in₎`` [Cin, Cout·k...]) gives ``U``; the input is replaced
  by its projection ``P x`` with ``P = L U_r U_rᵀ L⁻¹`` = ``A Bᵀ``, ``A = L U_r``, ``B = L⁻ᵀ U_r``
  (a 1×1 conv with weight ``Bᵀ`` then the core with ``w ×_in A``). Output mode: the leading
  eigenvectors ``V_r`` of the output second moment (``W₍out₎ W₍out₎ᵀ`` without data, ``E[y yᵀ]``
  with data); the core becomes ``V_rᵀ (w ×_in A)`` and a 1×1 conv with ``V_r`` restores Cout.
- Spatial (Jaderberg) factors are a `MatrixFactors` of ``w`` rearranged to [Cin·kh, Cout·kw]; the
  whitening matrix is then the second moment of vertical input patches (`vertical_patch_moments`).

`lost(r)` is the fraction of (whitened) energy a rank drops: ``Σ_{k>r} s_k² / Σ_k s_k²``; for
Tucker-2 ``1 − kept_in·kept_out`` (the two projections treated as independent: an estimate).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "MatrixFactors",
    "TuckerFactors",
    "Moments",
    "whitener",
    "matrix_factors",
    "tucker_factors",
    "spatial_matrix",
    "spatial_weights",
    "channel_rows",
    "vertical_patch_moments",
    "explicit_pads",
]

_CHUNK_ROWS = 16384


@dataclasses.dataclass
class Moments:
    """A running second moment ``Σ xᵀx`` of row vectors, in float64."""

    dim: int
    total: np.ndarray | None = None
    count: int = 0

    def add(self, rows: np.ndarray) -> None:
        if self.total is None:
            self.total = np.zeros((self.dim, self.dim), dtype=np.float64)
        for start in range(0, rows.shape[0], _CHUNK_ROWS):
            part = np.asarray(rows[start : start + _CHUNK_ROWS], dtype=np.float64)
            self.total += part.T @ part
        self.count += rows.shape[0]

    def add_block(self, block: np.ndarray, rows: int) -> None:
        """Add a precomputed ``Σ xᵀx`` over `rows` vectors."""
        if self.total is None:
            self.total = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.total += block
        self.count += rows

    def mean(self) -> np.ndarray | None:
        if self.total is None or self.count == 0:
            return None
        return self.total / self.count


def whitener(second_moment: np.ndarray, damping: float) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``C + damping·mean(diag C)·I`` (never singular)."""
    dim = second_moment.shape[0]
    scale = float(np.trace(second_moment)) / dim if dim else 0.0
    jitter = max(damping * scale, 1e-12 * max(scale, 1.0), 1e-30)
    sym = 0.5 * (second_moment + second_moment.T)
    for attempt in range(6):
        try:
            return np.linalg.cholesky(sym + (jitter * 10**attempt) * np.eye(dim))
        except np.linalg.LinAlgError:
            continue
    return np.diag(np.sqrt(np.maximum(np.diag(sym), 0.0) + jitter))


def _cumulative_energy(s: np.ndarray) -> np.ndarray:
    energy = np.asarray(s, dtype=np.float64) ** 2
    total = float(energy.sum())
    if total <= 0.0:
        return np.ones_like(energy)
    return np.cumsum(energy) / total


@dataclasses.dataclass
class MatrixFactors:
    """``W ≈ A B`` for any rank up to ``full``; `u` already carries the un-whitening."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    cumulative: np.ndarray

    @property
    def full(self) -> int:
        return int(self.s.shape[0])

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        return self.u[:, :rank] * root[None, :], root[:, None] * self.vt[:rank]

    def lost(self, rank: int) -> float:
        return float(max(0.0, 1.0 - self.cumulative[rank - 1])) if rank > 0 else 1.0

    def rank_for_energy(self, energy: float) -> int:
        return int(min(self.full, np.searchsorted(self.cumulative, energy - 1e-12) + 1))


def matrix_factors(w: np.ndarray, chol: np.ndarray | None = None) -> MatrixFactors:
    """Truncatable SVD of ``W`` [K, N], whitened by ``chol`` (``L``, [K, K]) when given."""
    w64 = np.asarray(w, dtype=np.float64)
    target = w64 if chol is None else chol.T @ w64
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    if chol is not None:
        u = np.linalg.solve(chol.T, u)
    return MatrixFactors(u=u, s=s, vt=vt, cumulative=_cumulative_energy(s))


@dataclasses.dataclass
class TuckerFactors:
    """Tucker-2 factors of a conv weight; ranks (r_in, r_out) chosen later."""

    weight: np.ndarray
    in_a: np.ndarray
    in_b: np.ndarray
    in_cumulative: np.ndarray
    out_v: np.ndarray
    out_cumulative: np.ndarray

    @property
    def full(self) -> tuple[int, int]:
        return int(self.weight.shape[1]), int(self.weight.shape[0])

    def lost(self, r_in: int, r_out: int) -> float:
        kept = min(1.0, self.in_cumulative[r_in - 1]) * min(1.0, self.out_cumulative[r_out - 1])
        return float(max(0.0, 1.0 - kept))

    def weights(self, r_in: int, r_out: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(first 1×1 weight or None, core weight, last 1×1 weight or None); None = stage not needed."""
        cin, cout = self.full
        spatial = self.weight.shape[2:]
        ones = (1,) * len(spatial)
        core = self.weight
        first = last = None
        if r_in < cin:
            a = self.in_a[:, :r_in]
            core = np.einsum("oc...,cj->oj...", core, a)
            first = self.in_b[:, :r_in].T.reshape((r_in, cin) + ones)
        if r_out < cout:
            v = self.out_v[:, :r_out]
            core = np.einsum("oj...,ok->kj...", core, v)
            last = v.reshape((cout, r_out) + ones)
        return first, core, last


def _leading_eigvecs(second_moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh(0.5 * (second_moment + second_moment.T))
    order = np.argsort(vals)[::-1]
    vals = np.maximum(vals[order], 0.0)
    return vecs[:, order], np.sqrt(vals)


def _left_singular(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All left singular vectors of ``m`` [R, C] (square U, R×R) and R singular values, zero-padded.

    Only U is needed: the right factor is never formed at full size, which for a wide matrix
    (a 1-channel conv with a long kernel, [Cin, Cout·k] = [1, 66048]) would be C×C.
    """
    u, s, _ = np.linalg.svd(m, full_matrices=m.shape[0] > m.shape[1])
    return u, np.concatenate([s, np.zeros(m.shape[0] - s.shape[0])])


def tucker_factors(
    w: np.ndarray, chol_in: np.ndarray | None = None, out_moment: np.ndarray | None = None
) -> TuckerFactors:
    """Tucker-2 (HOSVD) of ``w`` [Cout, Cin, k...], whitened on either mode when data is given."""
    w64 = np.asarray(w, dtype=np.float64)
    cout, cin = w64.shape[:2]
    w_in = np.swapaxes(w64, 0, 1).reshape(cin, -1)
    target = w_in if chol_in is None else chol_in.T @ w_in
    u, s_in = _left_singular(target)
    if chol_in is None:
        in_a = in_b = u
    else:
        in_a = chol_in @ u
        in_b = np.linalg.solve(chol_in.T, u)
    if out_moment is None:
        out_v, s_out = _left_singular(w64.reshape(cout, -1))
    else:
        out_v, s_out = _leading_eigvecs(out_moment)
    return TuckerFactors(
        weight=w64,
        in_a=in_a,
        in_b=in_b,
        in_cumulative=_cumulative_energy(s_in),
        out_v=out_v,
        out_cumulative=_cumulative_energy(s_out),
    )


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """``w`` [Cout, Cin, kh, kw] as M [Cin·kh, Cout·kw] with ``M[(c,i),(o,j)] = w[o,c,i,j]``."""
    cout, cin, kh, kw = w.shape
    return np.asarray(w, dtype=np.float64).transpose(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def spatial_weights(a: np.ndarray, b: np.ndarray, w_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Factors of `spatial_matrix` as a kh×1 conv weight [r, Cin, kh, 1] and a 1×kw one [Cout, r, 1, kw]."""
    cout, cin, kh, kw = w_shape
    rank = a.shape[1]
    vertical = a.T.reshape(rank, cin, kh)[..., None]
    horizontal = b.reshape(rank, cout, kw).transpose(1, 0, 2)[:, :, None, :]
    return vertical, horizontal


def channel_rows(x: np.ndarray) -> np.ndarray:
    """[N, C, *spatial] as rows [N·spatial, C]."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def explicit_pads(
    auto_pad: str, pads: tuple[int, int], size: int, kernel: int, stride: int, dilation: int
) -> tuple[int, int]:
    """(begin, end) padding of one spatial axis, resolving ``auto_pad``."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        span = dilation * (kernel - 1) + 1
        total = max(0, (math.ceil(size / stride) - 1) * stride + span - size)
        small = total // 2
        return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    if auto_pad == "VALID":
        return 0, 0
    return pads


def vertical_patch_moments(
    x: np.ndarray, kh: int, stride: int, dilation: int, pads: tuple[int, int]
) -> tuple[np.ndarray, int]:
    """``Σ vᵀv`` over the vertical patches ``v`` [Cin·kh] a kh×1 conv reads from ``x`` [N, C, H, W].

    Built block by block (one C×C block per pair of kernel rows) so no patch matrix is stored.
    """
    n, c, h, width = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), pads, (0, 0)))
    out_h = (h + pads[0] + pads[1] - dilation * (kh - 1) - 1) // stride + 1
    if out_h <= 0:
        return np.zeros((c * kh, c * kh)), 0
    rows = []
    for i in range(kh):
        start = i * dilation
        piece = xp[:, :, start : start + stride * (out_h - 1) + 1 : stride, :]
        rows.append(np.asarray(channel_rows(piece), dtype=np.float64))
    block = np.zeros((c, kh, c, kh), dtype=np.float64)
    for i in range(kh):
        for j in range(i, kh):
            prod = rows[i].T @ rows[j]
            block[:, i, :, j] = prod
            block[:, j, :, i] = prod.T
    return block.reshape(c * kh, c * kh), rows[0].shape[0]
