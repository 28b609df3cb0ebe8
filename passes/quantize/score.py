"""How close a quantized model's outputs are to the float model's: the targets the quantize pass holds.

Per output, pooled over feeds: cosine similarity, relative L2 error ``‖a−b‖/‖a‖``, and, for outputs
the graph says carry class scores (`onnxopt.analysis.outputs.class_outputs`; a sigmoid map, boxes or a
hidden state do not), the share of positions whose argmax along the last axis agrees (top-1 for a
classifier, per-timestep characters for a CTC recognizer).

`Targets` says what is good enough (default: cosine >= 0.99 on every output, argmax agreement >=
0.99 on class outputs); `Scores.shortfall` is how far a model is from them (0: within).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnxopt.analysis.outputs import class_outputs

__all__ = ["Targets", "OutputScore", "PooledBound", "Scores", "class_outputs", "pooled_totals", "score_bound",
           "score_outputs", "worst_slice"]

@dataclasses.dataclass(frozen=True)
class Targets:
    """Minimum cosine per output and minimum argmax agreement per class output."""

    cosine: float = 0.99
    argmax: float = 0.99
    rel_l2: float | None = None
    """A bound on every output's relative L2 error too (the run's --tolerance), or None."""


@dataclasses.dataclass
class OutputScore:
    name: str
    cosine: float
    rel_l2: float
    argmax: float | None = None


@dataclasses.dataclass
class Scores:
    outputs: list[OutputScore]

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    @property
    def argmax(self) -> float | None:
        vals = [o.argmax for o in self.outputs if o.argmax is not None]
        return min(vals) if vals else None

    def shortfall(self, targets: Targets) -> float:
        """How far below the targets (0 when every output meets them); comparable across candidates."""
        gap = max(0.0, targets.cosine - self.cosine)
        if self.argmax is not None:
            gap = max(gap, targets.argmax - self.argmax)
        if targets.rel_l2 is not None:
            gap = max(gap, self.rel_l2 - targets.rel_l2)
        return gap

    def scaled(self, emulated: Scores, real: Scores) -> Scores:
        """These (emulated) scores with each output's error (``1 - cosine``, rel L2, ``1 - argmax``) scaled by
        how the real kernels' error compares with the emulation's on a reference model (both all int8)."""
        out = []
        for mine, emu, ref in zip(self.outputs, emulated.outputs, real.outputs):
            cos = 1 - (1 - mine.cosine) * _ratio(1 - ref.cosine, 1 - emu.cosine)
            rel = mine.rel_l2 * _ratio(ref.rel_l2, emu.rel_l2)
            arg = None
            if mine.argmax is not None and emu.argmax is not None and ref.argmax is not None:
                arg = 1 - (1 - mine.argmax) * _ratio(1 - ref.argmax, 1 - emu.argmax)
            out.append(OutputScore(mine.name, min(cos, 1.0), max(rel, 0.0), arg if arg is None else min(arg, 1.0)))
        return Scores(out)

    def to_dict(self) -> dict[str, float | None]:
        return {"cosine": round(self.cosine, 6), "rel_l2": round(self.rel_l2, 6),
                "argmax": None if self.argmax is None else round(self.argmax, 6)}

    def describe(self) -> str:
        text = f"cosine {self.cosine:.4f}, rel_l2 {self.rel_l2:.3g}"
        return text + (f", argmax agreement {self.argmax:.2%}" if self.argmax is not None else "")


def _ratio(real: float, emulated: float) -> float:
    if emulated <= 0 or real <= 0:
        return 1.0
    return float(np.clip(real / emulated, 0.25, 4.0))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def score_outputs(names: Sequence[str], refs: Sequence[Sequence[np.ndarray]], outs: Sequence[Sequence[np.ndarray]],
                  classes: dict[str, int | None]) -> Scores:
    """Scores of `outs` against `refs` (per feed, a list of arrays in `names` order), pooled over feeds."""
    scores = []
    for k, name in enumerate(names):
        a = np.concatenate([np.ravel(r[k]).astype(np.float64) for r in refs])
        b = np.concatenate([np.ravel(o[k]).astype(np.float64) for o in outs])
        finite = np.isfinite(b).all()
        na = float(np.linalg.norm(a))
        rel = float(np.linalg.norm(a - b)) / na if na > 0 else float(np.linalg.norm(b))
        score = OutputScore(name, _cosine(a, b) if finite else 0.0, rel if finite else float("inf"))
        if name in classes:
            agree, total = _agreement([r[k] for r in refs], [o[k] for o in outs], classes[name])
            score.argmax = agree / total if total else None
        scores.append(score)
    return Scores(scores)


def _agreement(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray] | None,
               width: int | None) -> tuple[int, int]:
    """Positions whose argmax along the last axis agrees, and positions counted (arrays whose last axis is not
    a class axis of `width` are skipped); with `outs` None, 0 and the count."""
    agree = total = 0
    for i, r in enumerate(refs):
        ra = np.asarray(r)
        if ra.ndim == 0 or ra.shape[-1] < 2 or (width is not None and ra.shape[-1] != width):
            continue
        if outs is not None:
            agree += int(np.sum(ra.argmax(-1) == np.asarray(outs[i]).argmax(-1)))
        total += ra.size // ra.shape[-1]
    return agree, total


def score_bound(names: Sequence[str], refs: Sequence[Sequence[np.ndarray]], outs: Sequence[Sequence[np.ndarray]],
                unseen: Sequence[Sequence[np.ndarray]], classes: dict[str, int | None]) -> Scores:
    """The best scores `score_outputs` could still give once the feeds whose references are `unseen` are run
    too: `outs` are the outputs on the feeds of `refs` so far (`PooledBound` over them)."""
    bound = PooledBound(names, classes, pooled_totals(names, classes, [*refs, *unseen]))
    for ref, out in zip(refs, outs):
        bound.add(ref, out)
    return bound.scores()


def pooled_totals(names: Sequence[str], classes: dict[str, int | None],
                  refs: Sequence[Sequence[np.ndarray]]) -> list[tuple[float, int]]:
    """Per output, the squared norm of the reference pooled over all `refs` feeds and its argmax positions."""
    return [(float(sum(np.sum(np.square(np.asarray(r[k], dtype=np.float64))) for r in refs)),
             _agreement([r[k] for r in refs], None, classes[name])[1] if name in classes else 0)
            for k, name in enumerate(names)]


class PooledBound:
    """The pooled terms of `score_outputs` summed feed by feed (`add`), and the best scores they leave possible
    once the rest of the feeds, whose reference totals are given (`pooled_totals`), are run too (`scores`).

    Per output: an upper bound on the pooled cosine (the outputs still to come free, those seen fixed up to a
    positive scale: the cosine of the reference with its projection on those directions,
    ``sqrt((rest + dot²/|b|²) / |a|²)``), a lower bound on the relative L2 error (the seen error alone) and an
    upper bound on argmax agreement (every position still to come agreeing). A shortfall of these scores above 0
    means the full scores miss the targets too. Each feed is read once, so a run of feed after feed costs what
    scoring them all once does."""

    def __init__(self, names: Sequence[str], classes: dict[str, int | None],
                 totals: Sequence[tuple[float, int]]) -> None:
        self.names, self.classes, self.totals = list(names), classes, list(totals)
        n = len(self.names)
        self.seen, self.dot, self.got, self.err = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
        self.agree, self.rows = [0] * n, [0] * n
        self.finite = [True] * n

    def add(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        """One more feed: the reference outputs and the outputs scored against them."""
        for k, name in enumerate(self.names):
            a = np.ravel(ref[k]).astype(np.float64)
            b = np.ravel(out[k]).astype(np.float64)
            if not np.isfinite(b).all():
                self.finite[k] = False
                continue
            self.seen[k] += float(a @ a)
            self.dot[k] += float(a @ b)
            self.got[k] += float(b @ b)
            self.err[k] += float(np.sum(np.square(a - b)))
            if name in self.classes:
                agree, rows = _agreement([ref[k]], [out[k]], self.classes[name])
                self.agree[k] += agree
                self.rows[k] += rows

    def scores(self) -> Scores:
        scores = []
        for k, name in enumerate(self.names):
            total, positions = self.totals[k]
            if not self.finite[k]:
                scores.append(OutputScore(name, 0.0, float("inf")))
                continue
            rest = max(total - self.seen[k], 0.0)
            dot, got = self.dot[k], self.got[k]
            best = rest + (dot * dot / got if got > 0 and dot > 0 else 0.0)
            cosine = float(np.sqrt(best / total)) if total > 0 else 1.0
            rel = float(np.sqrt(self.err[k] / total)) if total > 0 else float(np.sqrt(self.got[k]))
            score = OutputScore(name, min(cosine, 1.0), rel)
            if name in self.classes:
                more = positions - self.rows[k]
                score.argmax = (self.agree[k] + more) / positions if positions else None
            scores.append(score)
        return Scores(scores)


def worst_slice(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> float | None:
    """Worst relative L2 error over the slices of the first non-trivial axis after the batch axis
    (pooled over feeds; slices whose reference is nearly empty are skipped), or None."""
    shape = np.asarray(refs[0]).shape
    axis = next((i for i in range(1, len(shape)) if shape[i] > 1), None)
    if axis is None or any(np.asarray(r).shape[axis] != shape[axis] for r in refs):
        return None
    pairs = []
    for i in range(shape[axis]):
        a = np.concatenate([np.take(np.asarray(r), i, axis=axis).ravel() for r in refs]).astype(np.float64)
        b = np.concatenate([np.take(np.asarray(o), i, axis=axis).ravel() for o in outs]).astype(np.float64)
        pairs.append((a, b))
    mean_norm = float(np.mean([np.linalg.norm(a) for a, _ in pairs]))
    errors = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in pairs
              if np.linalg.norm(a) >= 1e-2 * mean_norm and np.linalg.norm(a) > 0]
    return max(errors) if errors else None
