"""Calibration for the quantize pass: streamed ranges and the scale / zero-point math.

Ranges are accumulated over the calibration feeds without keeping activations:

- ``minmax``: running minimum and maximum of every tapped tensor (one sweep).
- ``percentile``, ``entropy``, ``mse``: a first sweep finds each tensor's min/max, a second fills a
  fixed histogram of ``BINS`` bins over that interval (memory per tensor is constant, whatever the
  number of samples). Then, per tensor:
  ``percentile`` clips at the ``p`` and ``100 - p`` percentiles (a side that does not cross zero keeps 0);
  ``mse`` picks, among ranges shrunk towards zero, the one whose quantize-dequantize round trip has the
  least expected squared error over the histogram;
  ``entropy`` picks the one whose quantized histogram has the least KL divergence from the original.

Quantization parameters of a real interval ``[lo, hi]`` (always widened to contain 0, so that zero
is exact):

- ``uint8`` asymmetric: ``scale = (hi - lo) / 255``, ``zero_point = round(-lo / scale)``;
- ``int8`` symmetric: ``scale = max(|lo|, |hi|) / 127``, ``zero_point = 0``;
- a non-negative tensor whose Relu was fused (``fused_relu``): its zero point is the type's lowest value
  (0 for uint8, -128 for int8, ``scale = hi / 255``), so QuantizeLinear's saturation *is* the Relu.

``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np

from onnxopt.graph import require_finite

__all__ = [
    "BINS",
    "Range",
    "QParams",
    "qparams",
    "quantize_array",
    "dequantize_array",
    "collect_minmax",
    "collect_ranges_and_samples",
    "collect_histograms",
    "choose_range",
    "weight_scales",
]

logger = logging.getLogger(__name__)

BINS = 2048
SAMPLES = 8192
HIST_VALUES = 1 << 18
"""Values of one tensor per feed that go into its histogram: a bigger tensor gives every k-th value (its exact
min and max come from the minmax sweep; the histogram only needs the spread inside them)."""
_SHRINK_STEPS = 64
ActType = Literal["uint8", "int8"]


@dataclasses.dataclass
class Range:
    lo: float
    hi: float

    def union(self, other: Range) -> Range:
        return Range(min(self.lo, other.lo), max(self.hi, other.hi))


@dataclasses.dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    dtype: np.dtype

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)


def qparams(rng: Range, act: ActType, *, fused_relu: bool = False) -> QParams:
    """Scale and zero point of the interval `rng` for activation type `act` (see module doc)."""
    lo, hi = min(float(rng.lo), 0.0), max(float(rng.hi), 0.0)
    dtype = np.dtype(np.uint8 if act == "uint8" else np.int8)
    info = np.iinfo(dtype)
    if fused_relu:
        scale = _safe_scale(hi / 255.0)
        return QParams(scale, int(info.min), dtype)
    if act == "int8":
        scale = _safe_scale(max(abs(lo), abs(hi)) / 127.0)
        return QParams(scale, 0, dtype)
    scale = _safe_scale((hi - lo) / 255.0)
    zp = int(np.clip(np.rint(-lo / scale), info.min, info.max))
    return QParams(scale, zp, dtype)


def _safe_scale(scale: float) -> float:
    scale = float(np.float32(scale))
    return scale if scale > 0 and np.isfinite(scale) else 1.0


def quantize_array(x: np.ndarray, scale: np.ndarray | float, zp: np.ndarray | int, dtype: np.dtype) -> np.ndarray:
    """QuantizeLinear in numpy (round half to even, saturate)."""
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32)) + np.asarray(zp)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize_array(q: np.ndarray, scale: np.ndarray | float, zp: np.ndarray | int) -> np.ndarray:
    return ((q.astype(np.int64) - np.asarray(zp, dtype=np.int64)) * np.asarray(scale, dtype=np.float32)).astype(
        np.float32
    )


def weight_scales(w: np.ndarray, axis: int | None, qmax: int = 127) -> np.ndarray:
    """Symmetric scales ``max|w| / qmax``: one per slice along `axis`, or a scalar when `axis` is None."""
    a = np.abs(np.asarray(w, dtype=np.float32))
    if axis is None:
        m = np.asarray(a.max() if a.size else 0.0, dtype=np.float32)
    else:
        others = tuple(i for i in range(a.ndim) if i != axis)
        m = a.max(axis=others) if others else a
    s = (m / np.float32(qmax)).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)


# ------------------------------------------------------------------------------ streaming sweeps
def collect_minmax(stream: Iterable[dict[str, np.ndarray]], names: Iterable[str]) -> dict[str, Range]:
    """Running min/max of each tensor in `names` over the feeds in `stream`."""
    wanted = list(names)
    out: dict[str, Range] = {}
    for result in stream:
        for name in wanted:
            x = result.get(name)
            if x is None or x.size == 0:
                continue
            lo, hi = float(np.min(x)), float(np.max(x))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                finite = x[np.isfinite(x)]
                if finite.size == 0:
                    require_finite(x, f"activation '{name}' on the calibration data",
                                   "no finite value to take its range from (a weight or input before it is not finite)")
                lo, hi = float(finite.min()), float(finite.max())
            r = Range(lo, hi)
            out[name] = out[name].union(r) if name in out else r
    return out


def collect_ranges_and_samples(
    stream: Iterable[dict[str, np.ndarray]], names: Iterable[str], feeds: int, samples: int = SAMPLES
) -> tuple[dict[str, Range], dict[str, np.ndarray]]:
    """`collect_minmax` plus, per tensor, about `samples` values taken at even strides from every feed
    (``samples / feeds`` per feed), so later checks can see how a tensor's values spread inside its range
    without keeping the activations."""
    wanted = list(names)
    per_feed = max(1, samples // max(feeds, 1))
    kept: dict[str, list[np.ndarray]] = {name: [] for name in wanted}

    def sampled(stream: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for result in stream:
            for name in wanted:
                x = result.get(name)
                if x is not None and x.size and np.issubdtype(x.dtype, np.floating):
                    flat = x.reshape(-1)
                    kept[name].append(np.array(flat[:: max(1, flat.size // per_feed)][:per_feed], np.float32))
            yield result

    ranges = collect_minmax(sampled(stream), wanted)
    return ranges, {k: np.concatenate(v) for k, v in kept.items() if v}


def collect_histograms(
    stream: Iterator[dict[str, np.ndarray]], bounds: dict[str, Range]
) -> dict[str, np.ndarray]:
    """Histograms of `BINS` bins over each tensor's known [min, max] (constant memory per tensor), of at most
    about `HIST_VALUES` values per tensor and feed."""
    hists = {name: np.zeros(BINS, dtype=np.int64) for name in bounds}
    for result in stream:
        for name, rng in bounds.items():
            x = result.get(name)
            if x is None or x.size == 0:
                continue
            hists[name] += _histogram(x.reshape(-1), *_hist_edges(rng))
    return hists


def _histogram(flat: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`np.histogram(flat, BINS, (lo, hi))` of every k-th value (at most about `HIST_VALUES`), by bin index and
    `np.bincount`: a fraction of numpy's cost, which checks the bins' monotonicity and casts on every call."""
    if flat.size > HIST_VALUES:
        flat = flat[:: flat.size // HIST_VALUES]
    flat = flat.astype(np.float64)  # float64: a range near +-3.4e38 overflows float32 arithmetic
    inside = np.isfinite(flat) & (flat >= lo) & (flat <= hi)
    if not inside.all():
        flat = flat[inside]
    idx = ((flat - lo) * (BINS / (hi - lo))).astype(np.intp)
    np.minimum(idx, BINS - 1, out=idx)  # the top edge belongs to the last bin, as in np.histogram
    return np.bincount(idx, minlength=BINS)


def _hist_edges(rng: Range) -> tuple[float, float]:
    lo, hi = min(rng.lo, 0.0), max(rng.hi, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


# ------------------------------------------------------------------------------ range choice
def choose_range(
    method: str, hist: np.ndarray, rng: Range, act: ActType, *, percentile: float = 99.99, fused_relu: bool = False
) -> Range:
    """The clipping interval `method` picks from a tensor's histogram over `rng`."""
    if method == "minmax" or hist.sum() == 0:
        return rng
    lo, hi = _hist_edges(rng)
    centers = lo + (np.arange(BINS) + 0.5) * (hi - lo) / BINS
    if method == "percentile":
        return _percentile_range(hist, centers, lo, hi, percentile)
    if method == "mse":
        candidates = _shrunk_ranges(lo, hi, 1.0 / _SHRINK_STEPS)
        errors = [_expected_mse(hist, centers, c, act, fused_relu) for c in candidates]
    elif method == "entropy":
        # KL only sees quantization when a level spans at least one bin: keep >= 256 bins in range.
        candidates = _shrunk_ranges(lo, hi, 256.0 / BINS)
        errors = [_kl_divergence(hist, centers, c, act, fused_relu) for c in candidates]
    else:
        raise ValueError(f"unknown calibration method {method}")
    return candidates[int(np.argmin(errors))]


def _percentile_range(hist: np.ndarray, centers: np.ndarray, lo: float, hi: float, p: float) -> Range:
    cdf = np.cumsum(hist) / hist.sum()
    tail = (100.0 - p) / 100.0
    lo_c = float(centers[int(np.searchsorted(cdf, tail, side="left"))]) if lo < 0 else 0.0
    hi_idx = min(int(np.searchsorted(cdf, 1.0 - tail, side="left")), BINS - 1)
    hi_c = float(centers[hi_idx]) if hi > 0 else 0.0
    return Range(min(lo_c, 0.0), max(hi_c, 0.0))


def _shrunk_ranges(lo: float, hi: float, smallest: float) -> list[Range]:
    fractions = np.linspace(1.0, smallest, _SHRINK_STEPS)
    return [Range(lo * f, hi * f) for f in fractions]


def _round_trip(centers: np.ndarray, rng: Range, act: ActType, fused_relu: bool) -> np.ndarray:
    qp = qparams(rng, act, fused_relu=fused_relu)
    q = quantize_array(centers, qp.scale, qp.zero_point, qp.dtype)
    return dequantize_array(q, qp.scale, qp.zero_point)


def _expected_mse(hist: np.ndarray, centers: np.ndarray, rng: Range, act: ActType, fused_relu: bool) -> float:
    err = centers - _round_trip(centers, rng, act, fused_relu)
    return float(np.sum(hist * err.astype(np.float64) ** 2))


def _kl_divergence(hist: np.ndarray, centers: np.ndarray, rng: Range, act: ActType, fused_relu: bool) -> float:
    """KL(P || Q): P the histogram with outliers folded onto the clip edges, Q its quantized version."""
    qp = qparams(rng, act, fused_relu=fused_relu)
    levels = quantize_array(centers, qp.scale, qp.zero_point, qp.dtype).astype(np.int64) - qp.qmin
    p = hist.astype(np.float64)
    # P: the clipped distribution, whose outliers pile up on the edges of the clip interval.
    below, above = centers < rng.lo, centers > rng.hi
    inside = np.where(below | above, 0.0, p)
    p_clip = inside.copy()
    p_clip[min(int(np.searchsorted(centers, rng.lo)), BINS - 1)] += p[below].sum()
    p_clip[max(int(np.searchsorted(centers, rng.hi, side="right")) - 1, 0)] += p[above].sum()
    # Q: the in-range histogram quantized: each level's mass spread evenly over its non-empty bins
    # (the outliers are not in it, so clipping them away costs divergence, as in TensorRT's method).
    nonzero = inside > 0
    n_levels = qp.qmax - qp.qmin + 1
    level_mass = np.bincount(levels, weights=inside, minlength=n_levels)
    level_bins = np.bincount(levels, weights=nonzero.astype(np.float64), minlength=n_levels)
    q = np.where(nonzero, level_mass[levels] / np.maximum(level_bins[levels], 1.0), 0.0)
    ps, qs = p_clip / p_clip.sum(), q / max(q.sum(), 1e-30)
    mask = ps > 0
    return float(np.sum(ps[mask] * np.log(ps[mask] / np.maximum(qs[mask], 1e-12))))
