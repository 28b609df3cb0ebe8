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

A *plan* (`MatrixPlan`, `TuckerPlan`, `SpatialPlan`) is one layer's decomposition with its rank
arithmetic: the ranks on offer (`grid`, multiples of ``round_to``), the ranks for a ratio or an
energy, and the MACs (``rows`` = output positions, or parameters when shapes are unknown),
parameters and energy lost at any ranks; ``()`` stands for the layer unfactored.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

__all__ = [
    "Ranks",
    "MatrixPlan",
    "TuckerPlan",
    "SpatialPlan",
    "MatrixFactors",
    "TuckerFactors",
    "whitener",
    "matrix_factors",
    "tucker_factors",
    "spatial_matrix",
    "spatial_weights",
    "channel_rows",
    "vertical_patch_moments",
    "round_rank",
    "rank_steps",
    "positions",
    "saves_enough",
    "ladder",
    "descend",
]

Ranks = tuple[int, ...]


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


# ------------------------------------------------------------------------------ plans: ranks and costs
def round_rank(value: float, full: int, round_to: int) -> int:
    """`value` rounded up to a multiple of `round_to`, within [1, full]."""
    rank = max(1, math.ceil(value - 1e-9))
    rank = math.ceil(rank / round_to) * round_to
    return max(1, min(full, rank))


def rank_steps(full: int, round_to: int) -> list[int]:
    """The multiples of `round_to` below `full`, and `full`."""
    return sorted({min(full, r) for r in range(round_to, full + round_to, round_to)})


def positions(shape: list[int] | None, *, conv: bool) -> int:
    """Output positions of a conv map (N × spatial), or the rows a MatMul/Gemm sees (all but the last
    axis); 1 when the shape is unknown (costs then count parameters)."""
    if shape is None:
        return 1
    if conv:
        return shape[0] * math.prod(shape[2:])
    return math.prod(shape[:-1]) if len(shape) > 1 else 1


class MatrixPlan:
    """``y = x W`` with W [K, N] over `rows` rows, factored by SVD into ``x A B`` (A [K, r], B [r, N])."""

    def __init__(self, matrix: np.ndarray, rows: int) -> None:
        self.matrix = matrix
        self.k, self.n = matrix.shape
        self.rows = rows
        self.factors: MatrixFactors | None = None

    def full_ranks(self) -> Ranks:
        return (min(self.k, self.n),)

    def grid(self, round_to: int) -> list[Ranks]:
        return [(r,) for r in rank_steps(self.full_ranks()[0], round_to)]

    def ranks_for_ratio(self, ratio: float, round_to: int) -> Ranks:
        full = self.full_ranks()[0]
        return (round_rank(ratio * full, full, round_to),)

    def ranks_for_energy(self, energy: float, round_to: int) -> Ranks:
        assert self.factors is not None
        full = self.full_ranks()[0]
        return (round_rank(self.factors.rank_for_energy(energy), full, round_to),)

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.rows * self.k * self.n
        return self.rows * ranks[0] * (self.k + self.n)

    def params(self, ranks: Ranks) -> int:
        return ranks[0] * (self.k + self.n)

    def lost(self, ranks: Ranks) -> float:
        assert self.factors is not None
        return self.factors.lost(ranks[0])

    def decompose(self, damping: float | None, in_moment: np.ndarray | None = None,
                  out_moment: np.ndarray | None = None) -> None:
        """Factor the weight, whitened by the input second moment when `damping` is given (data-aware)."""
        chol = whitener(in_moment, damping) if damping is not None and in_moment is not None else None
        self.factors = matrix_factors(self.matrix, chol)


class SpatialPlan(MatrixPlan):
    """kh×kw conv weight [Cout, Cin, kh, kw] as kh×1 (Cin→r) then 1×kw (r→Cout): SVD of `spatial_matrix`.

    Costs count the positions of the intermediate map (strided in height only) and of the output.
    """

    def __init__(self, weight: np.ndarray, in_shape: list[int] | None, out_shape: list[int] | None) -> None:
        super().__init__(spatial_matrix(weight), 1)
        self.shape = tuple(weight.shape)
        self.cout, self.cin, self.kh, self.kw = weight.shape
        self.p_mid = self.p_out = 1
        if in_shape is not None and out_shape is not None:
            n, _, h_out, w_out = out_shape
            self.p_mid, self.p_out = n * h_out * in_shape[3], n * h_out * w_out

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.p_out * self.cout * self.cin * self.kh * self.kw
        return self.p_mid * ranks[0] * self.cin * self.kh + self.p_out * self.cout * ranks[0] * self.kw

    def weights(self, ranks: Ranks) -> tuple[np.ndarray, np.ndarray]:
        """The kh×1 and 1×kw conv weights at rank ``ranks[0]``."""
        assert self.factors is not None
        a, b = self.factors.factors(ranks[0])
        return spatial_weights(a, b, self.shape)


class TuckerPlan:
    """k×k conv weight [Cout, Cin, k...] as 1×1 (Cin→r1), core (r1→r2), 1×1 (r2→Cout)."""

    def __init__(self, weight: np.ndarray, in_shape: list[int] | None, out_shape: list[int] | None) -> None:
        self.weight = weight
        self.cout, self.cin = weight.shape[:2]
        self.kk = math.prod(weight.shape[2:])
        self.p_in = positions(in_shape, conv=True)
        self.p_out = positions(out_shape, conv=True)
        self.factors: TuckerFactors | None = None

    def full_ranks(self) -> Ranks:
        return (self.cin, self.cout)

    def grid(self, round_to: int) -> list[Ranks]:
        grid = set()
        for r_in in rank_steps(self.cin, round_to):
            r_out = round_rank(r_in * self.cout / self.cin, self.cout, round_to)
            grid.add((r_in, r_out))
        for r_out in rank_steps(self.cout, round_to):
            r_in = round_rank(r_out * self.cin / self.cout, self.cin, round_to)
            grid.add((r_in, r_out))
        return sorted(grid)

    def ranks_for_ratio(self, ratio: float, round_to: int) -> Ranks:
        return (round_rank(ratio * self.cin, self.cin, round_to), round_rank(ratio * self.cout, self.cout, round_to))

    def ranks_for_energy(self, energy: float, round_to: int) -> Ranks:
        assert self.factors is not None
        r_in = int(np.searchsorted(self.factors.in_cumulative, energy - 1e-12) + 1)
        r_out = int(np.searchsorted(self.factors.out_cumulative, energy - 1e-12) + 1)
        return (round_rank(r_in, self.cin, round_to), round_rank(r_out, self.cout, round_to))

    def cost(self, ranks: Ranks) -> int:
        if not ranks:
            return self.p_out * self.cout * self.cin * self.kk
        r_in, r_out = ranks
        total = self.p_out * r_out * r_in * self.kk
        if r_in < self.cin:
            total += self.p_in * self.cin * r_in
        if r_out < self.cout:
            total += self.p_out * r_out * self.cout
        return total

    def params(self, ranks: Ranks) -> int:
        r_in, r_out = ranks
        total = r_out * r_in * self.kk
        total += self.cin * r_in if r_in < self.cin else 0
        total += r_out * self.cout if r_out < self.cout else 0
        return total

    def lost(self, ranks: Ranks) -> float:
        assert self.factors is not None
        return self.factors.lost(*ranks)

    def decompose(self, damping: float | None, in_moment: np.ndarray | None = None,
                  out_moment: np.ndarray | None = None) -> None:
        """Tucker-2, whitened by the input and output second moments when `damping` is given (data-aware)."""
        chol = out = None
        if damping is not None:
            chol = whitener(in_moment, damping) if in_moment is not None else None
            out = out_moment
        self.factors = tucker_factors(self.weight, chol, out)


# ------------------------------------------------------------------------------ choosing ranks for a MAC budget
Plan = MatrixPlan | TuckerPlan


def saves_enough(plan: Plan, ranks: Ranks, min_saving: float) -> bool:
    """Whether `ranks` cut the plan's cost by at least `min_saving` (a fraction of the unfactored cost)."""
    original = plan.cost(())
    return original > 0 and plan.cost(ranks) <= (1.0 - min_saving) * original


def ladder(plan: Plan, round_to: int, min_saving: float) -> list[Ranks]:
    """Rank choices that save enough, from the most expensive to the cheapest."""
    options = [r for r in plan.grid(round_to) if saves_enough(plan, r, min_saving)]
    return sorted(options, key=plan.cost, reverse=True)


def _step_price(plan: Plan, ladder: list[Ranks], at: int) -> float:
    """Energy lost per MAC saved by moving one step down `ladder` from position `at` (-1: unfactored)."""
    cost_now = plan.cost(()) if at < 0 else plan.cost(ladder[at])
    lost_now = 0.0 if at < 0 else plan.lost(ladder[at])
    nxt = ladder[at + 1]
    saved = cost_now - plan.cost(nxt)
    return (plan.lost(nxt) - lost_now) / saved if saved > 0 else math.inf


def descend(plans: list[Plan], ladders: list[list[Ranks]], total: float, target: float) -> tuple[list[int], float]:
    """From `total` MACs, repeatedly take the step (one plan one rung down its ladder) that loses the
    least energy per MAC saved, until `target` is reached or no step is left.

    Returns each plan's rung (-1: left unfactored) and the MACs then left.
    """
    position = [-1] * len(plans)
    heap = [(_step_price(plan, rungs, -1), i) for i, (plan, rungs) in enumerate(zip(plans, ladders)) if rungs]
    heapq.heapify(heap)
    current = total
    while current > target and heap:
        _, i = heapq.heappop(heap)
        plan, rungs = plans[i], ladders[i]
        before = plan.cost(()) if position[i] < 0 else plan.cost(rungs[position[i]])
        position[i] += 1
        current -= before - plan.cost(rungs[position[i]])
        if position[i] + 1 < len(rungs):
            heapq.heappush(heap, (_step_price(plan, rungs, position[i]), i))
    return position, current
