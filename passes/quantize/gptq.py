"""Error-compensating weight rounding (GPTQ-style) for the quantize pass (``gptq=true``, static mode).

For a Gemm/MatMul weight seen as ``W [N, K]`` (one row per output channel) and its input ``X [M, K]``,
round-to-nearest minimizes each weight's error alone; GPTQ (Frantar et al., 2022) minimizes the
layer's output error ``‖XWᵀ − XW'ᵀ‖²`` instead, using ``H = XᵀX`` accumulated over the calibration
feeds (streamed; K x K per layer). Columns are rounded in order, and each column's rounding error is
spread over the columns not yet rounded:

    U = chol(H⁻¹)ᵀ (upper),   for k = 0..K-1:
        q_k = clip(round(W[:, k] / s), -127, 127)
        e   = (W[:, k] - s q_k) / U[k, k]
        W[:, k+1:] -= e ⊗ U[k, k+1:]

with the per-channel scales ``s`` of round-to-nearest kept (so the stored format does not change) and
``H`` damped by 1 % of its mean diagonal. Inputs that never fire (``H[k, k] = 0``) get weight 0.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

__all__ = ["accumulate_hessians", "gptq_round"]

logger = logging.getLogger(__name__)

_DAMP = 0.01


def accumulate_hessians(stream: Iterator[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """``Σ xᵀx`` over every row of each named input (last axis = K), streamed over the feeds."""
    hessians: dict[str, np.ndarray] = {}
    for result in stream:
        for name in names:
            x = np.asarray(result[name], dtype=np.float64)
            rows = x.reshape(-1, x.shape[-1])
            h = rows.T @ rows
            hessians[name] = hessians[name] + h if name in hessians else h
    return hessians


def gptq_round(w_nk: np.ndarray, hessian: np.ndarray, scales: np.ndarray, qmax: int = 127,
               qmin: int | None = None) -> np.ndarray:
    """Integers ``W_q [N, K]`` (int8 range [qmin, qmax]) for ``W [N, K]``, rounded to minimize the output error.

    `scales` is per row ``[N]`` or per element ``[N, K]`` (blockwise scales expanded along K).
    """
    qmin = -qmax if qmin is None else qmin
    w = np.asarray(w_nk, dtype=np.float64).copy()
    h = np.asarray(hessian, dtype=np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices_from(h)] += _DAMP * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        logger.debug("H is not positive definite after damping; rounding to nearest")
        full = np.broadcast_to(np.asarray(scales, dtype=np.float64).reshape(w.shape[0], -1), w.shape)
        return np.clip(np.rint(w / full), qmin, qmax).astype(np.int8)
    s_all = np.broadcast_to(np.asarray(scales, dtype=np.float64).reshape(w.shape[0], -1), w.shape)
    q = np.zeros(w.shape, dtype=np.int8)
    for k in range(w.shape[1]):
        s = s_all[:, k]
        qk = np.clip(np.rint(w[:, k] / s), qmin, qmax)
        q[:, k] = qk
        err = (w[:, k] - qk * s) / upper[k, k]
        w[:, k + 1 :] -= np.outer(err, upper[k, k + 1 :])
    return q
