"""Speed checks for passes that promise a faster model: is B faster than A here, at these shapes?

`compare(reference, candidate, feed)` answers with a `Measurement` (candidate time over reference
time, below 1 is faster). Passes ask it before handing back a rewrite: ``factorize`` for each layer
alone (the layer and nothing else as a tiny model, on a random input of the shape the layer sees in
the model: `tapped_shapes`) and for the whole model, ``channels`` for the whole model after the cut.

Method, made for a noisy two-core machine:

- both models run in one ONNX Runtime process with the threads the run will use, on the same feed;
- interleaved blocks: a block repeats one model until it lasts ``min_block_ms`` (10 ms for a layer, 50 ms
  for a whole model: a 0.05 ms layer run once is scheduler noise), the next block runs the other model;
  the order alternates block by block;
- the answer is the median of the per-block ratios; after ``min_blocks`` blocks the check stops as
  soon as every block of the last ``min_blocks`` falls on the same side of the caller's decision limit
  (a clear case costs five blocks), else it goes on to ``max_blocks`` or ``max_seconds``;
- the caller decides with a margin (``ratio <= limit``, e.g. 0.95 for "at least 5 % faster").

Answers are cached on disk (`SpeedCache`), keyed by this machine (CPU model, SIMD flags, core count),
the ONNX Runtime version, the thread count, the structure of both models (`structure_key`: ops,
attributes, wiring, weight shapes; not weight values, which do not change a dense kernel's time) and
the feed's shapes. Only decisive answers (every block on one side of the limit) are stored, entries
expire after `CACHE_DAYS` days, and an unreadable file is ignored and rewritten: a measurement
disturbed by a burst of load is simply taken again next time. The folder is `cache_dir()`:
``$ONNXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxopt``, else ``~/.cache/onnxopt``;
``ONNXOPT_CACHE_DIR=off`` turns the cache off.

The timer is replaceable (`use_timer`): `EstimateTimer` is a deterministic cost from MACs and node
counts, which the test suite installs so that decisions are reproducible and instantaneous.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_ir as ir

__all__ = [
    "Measurement",
    "Timer",
    "RuntimeTimer",
    "EstimateTimer",
    "SpeedCache",
    "compare",
    "use_timer",
    "current_timer",
    "cache_dir",
    "structure_key",
    "machine_key",
    "simd_width",
    "sample_feed",
    "timed_block",
    "tapped_shapes",
    "CACHE_DAYS",
    "MODEL_BLOCK_MS",
]

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
ModelLike = ir.Model | onnx.ModelProto | str | os.PathLike

METHOD = 1
"""Version of the timing method: bumping it retires every cached answer."""
CACHE_DAYS = 30
MODEL_BLOCK_MS = 50.0
"""Shortest timed block for a whole model (a layer alone: the timer's own, 10 ms)."""
_CACHE_FILE = "speed.json"
_CACHE_MAX_ENTRIES = 20000
_SMALL_TENSOR = 64  # weights up to this many elements (and integer tensors) count by value in a structure key


# ------------------------------------------------------------------------------ measurements
@dataclasses.dataclass(frozen=True)
class Measurement:
    """Candidate over reference latency: `ratio` is the median of the block ratios (below 1: faster)."""

    ratio: float
    reference_ms: float
    candidate_ms: float
    blocks: int
    low: float
    high: float
    source: str = "measured"  # measured, cached or estimated

    def decisive(self, limit: float) -> bool:
        """Every block fell on the same side of `limit`."""
        return self.high <= limit or self.low > limit

    def describe(self) -> str:
        """``0.0412 ms against 0.0387 ms (x1.06, 5 blocks x1.03-1.09)``, with the source when not measured."""
        spread = f"{self.blocks} blocks x{self.low:.2f}-{self.high:.2f}" if self.blocks > 1 else "1 block"
        note = "" if self.source == "measured" else f", {self.source}"
        return (f"{_ms(self.candidate_ms)} against {_ms(self.reference_ms)} "
                f"(x{self.ratio:.2f}, {spread}{note})")

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def _measurement(ratios: Sequence[float], ref_ms: Sequence[float], cand_ms: Sequence[float],
                 source: str = "measured") -> Measurement:
    return Measurement(ratio=float(statistics.median(ratios)), reference_ms=float(statistics.median(ref_ms)),
                       candidate_ms=float(statistics.median(cand_ms)), blocks=len(ratios),
                       low=float(min(ratios)), high=float(max(ratios)), source=source)


class Timer(Protocol):
    """Times a candidate model file against a reference model file on one feed."""

    cacheable: bool

    def measure(self, reference: Path, candidate: Path, feed: Feed, *, threads: int | None,
                limit: float, max_blocks: int | None = None, block_ms: float | None = None) -> Measurement: ...


@dataclasses.dataclass
class RuntimeTimer:
    """ONNX Runtime on this machine: interleaved blocks, median of block ratios (see the module doc)."""

    min_block_ms: float = 10.0
    min_blocks: int = 5
    max_blocks: int = 9
    max_seconds: float = 10.0
    warmup: int = 3
    cacheable: bool = True

    def measure(self, reference: Path, candidate: Path, feed: Feed, *, threads: int | None,
                limit: float, max_blocks: int | None = None, block_ms: float | None = None) -> Measurement:
        from onnxopt.runtime import session

        most = max(3, max_blocks or self.max_blocks)
        least = min(self.min_blocks, most)
        sessions = [session(reference, threads=threads), session(candidate, threads=threads)]
        feeds = [_feed_for(s, feed) for s in sessions]
        reps = [self._repeats(s, f, block_ms or self.min_block_ms) for s, f in zip(sessions, feeds)]
        ratios: list[float] = []
        per_run: list[list[float]] = [[], []]
        start = time.perf_counter()
        for block in range(most):
            order = (0, 1) if block % 2 == 0 else (1, 0)
            for i in order:
                per_run[i].append(timed_block(sessions[i], feeds[i], reps[i]))
            ratios.append(per_run[1][-1] / max(per_run[0][-1], 1e-12))
            done = len(ratios) >= least
            if done and _one_side(ratios[-least:], limit):
                break
            if done and time.perf_counter() - start > self.max_seconds:
                break
        return _measurement(ratios, per_run[0], per_run[1])

    def _repeats(self, sess: Any, feed: Feed, block_ms: float) -> int:
        """Runs per block so that a block lasts at least `block_ms` (after the warm-up runs)."""
        for _ in range(self.warmup):
            sess.run(None, feed)
        one = statistics.median(timed_block(sess, feed, 1) for _ in range(3))
        return max(1, math.ceil(block_ms / max(one, 1e-6)))


def _feed_for(sess: Any, feed: Feed) -> Feed:
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def timed_block(sess: Any, feed: Feed, repeats: int) -> float:
    """Milliseconds per run over `repeats` back-to-back runs."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, feed)
    return (time.perf_counter() - t0) * 1000.0 / repeats


def _one_side(ratios: Sequence[float], limit: float) -> bool:
    return all(r <= limit for r in ratios) or all(r > limit for r in ratios)


@dataclasses.dataclass
class EstimateTimer:
    """A deterministic stand-in for measuring: cost = nodes x `per_node_us` + MACs / `macs_per_us`.

    Not a prediction for any machine: tests install it (`use_timer`) so that speed decisions are
    reproducible and free. MACs are counted at the feed's shapes (symbolic input dims taken from it).
    """

    per_node_us: float = 3.0
    macs_per_us: float = 50_000.0
    cacheable: bool = False

    def cost_us(self, path: Path, feed: Feed) -> float:
        from onnxopt.analysis.stats import infer_shapes, macs_by_node
        from onnxopt.graph import count_nodes
        from onnxopt.io import load

        model = load(path, check=False)
        dims: dict[str, int] = {}
        for value in model.graph.inputs:
            if value.name in feed and value.shape is not None:
                for d, n in zip(value.shape.dims, np.shape(feed[value.name])):
                    if isinstance(d, ir.SymbolicDim) and d.value is not None:
                        dims[d.value] = int(n)
        infer_shapes(model)
        macs = sum(m or 0 for m in macs_by_node(model, dims).values())
        return count_nodes(model) * self.per_node_us + macs / self.macs_per_us

    def measure(self, reference: Path, candidate: Path, feed: Feed, *, threads: int | None,
                limit: float, max_blocks: int | None = None, block_ms: float | None = None) -> Measurement:
        ref, cand = self.cost_us(reference, feed) / 1000.0, self.cost_us(candidate, feed) / 1000.0
        ratio = cand / max(ref, 1e-12)
        return Measurement(ratio, ref, cand, blocks=1, low=ratio, high=ratio, source="estimated")


_TIMER: list[Timer] = [RuntimeTimer()]


def current_timer() -> Timer:
    return _TIMER[-1]


@contextlib.contextmanager
def use_timer(timer: Timer) -> Iterator[Timer]:
    """Make `timer` answer every speed check inside the block (tests: `EstimateTimer()`)."""
    _TIMER.append(timer)
    try:
        yield timer
    finally:
        _TIMER.remove(timer)


# ------------------------------------------------------------------------------ the check
def compare(reference: ModelLike, candidate: ModelLike, feed: Feed, *, threads: int | None = None,
            limit: float = 1.0, max_blocks: int | None = None, block_ms: float | None = None,
            cache: SpeedCache | None = None) -> Measurement:
    """Candidate latency over reference latency on `feed` (models: onnx_ir, protobuf or a file path).

    `limit` is the caller's decision threshold (keep the candidate when ``ratio <= limit``): timing
    stops early once every block is clearly on one side of it, and only such answers are cached.
    `max_blocks` and `block_ms` override the timer's (a whole model wants blocks of 50 ms).
    """
    timer = current_timer()
    store = (cache if cache is not None else SpeedCache.default()) if timer.cacheable else None
    key = None
    if store is not None and store.enabled:
        key = _cache_key(structure_key(reference), structure_key(candidate), feed, threads)
        hit = store.get(key)
        if hit is not None:
            logger.debug("speed check answered from the cache: %s", hit.describe())
            return hit
    with contextlib.ExitStack() as stack:
        paths = [stack.enter_context(_as_file(m, tag)) for m, tag in ((reference, "reference"),
                                                                      (candidate, "candidate"))]
        result = timer.measure(paths[0], paths[1], feed, threads=threads, limit=limit, max_blocks=max_blocks,
                               block_ms=block_ms)
    logger.debug("speed check: %s", result.describe())
    if key is not None and store is not None and result.decisive(limit):
        store.put(key, result)
    return result


@contextlib.contextmanager
def _as_file(model: ModelLike, tag: str) -> Iterator[Path]:
    if isinstance(model, (str, os.PathLike)):
        yield Path(model)
        return
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory(prefix="onnxopt-speed-") as tmp:
            path = Path(tmp) / f"{tag}.onnx"
            onnx.save(model, str(path))
            yield path
        return
    from onnxopt.io import temp_model_file

    with temp_model_file(model, f"{tag}.onnx") as path:
        yield path


# ------------------------------------------------------------------------------ shapes and feeds
def sample_feed(model: ir.Model, ctx: Any) -> Feed:
    """The feed a pass times at: the run's evaluation sample, else the first calibration feed, else a
    random feed from the declared input shapes (symbolic dims from ``ctx.dims``, default 1)."""
    sample = getattr(ctx, "sample", None)
    if sample:
        return sample
    calib = getattr(ctx, "calib", None)
    if calib is not None and len(calib):
        return calib.feeds[0]
    from onnxopt.data import input_specs, load_data

    return load_data("random:1", input_specs(model), dims=getattr(ctx, "dims", None) or {}).feeds[0]


def tapped_shapes(model: ir.Model, ctx: Any, names: Sequence[str], feed: Feed) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors `names` when `model` runs on `feed` (one run, through the context's
    tapping session, so a later tap of the same tensors reuses it)."""
    from onnxopt.data import Dataset

    if not names:
        return {}
    one = Dataset([feed], [None], "sample")
    shapes: dict[str, tuple[int, ...]] = {}
    for acts in ctx.activations(model, list(names), feeds=one, desc="timing: layer shapes"):
        shapes.update({name: tuple(int(d) for d in np.shape(acts[name])) for name in names if name in acts})
    return shapes


# ------------------------------------------------------------------------------ structure keys
def structure_key(model: ModelLike) -> str:
    """A hash of what decides a model's speed: opsets, graph inputs, nodes with their wiring and
    attributes, initializer names, types and shapes (values only for small or integer tensors)."""
    if isinstance(model, (str, os.PathLike)):
        from onnxopt.io import load

        model = load(model, check=False)
    elif isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    from onnxopt.graph import iter_graphs

    h = hashlib.sha256()
    h.update(repr(sorted(model.opset_imports.items())).encode())
    for graph in iter_graphs(model.graph):
        h.update(repr([_value_sig(v) for v in graph.inputs]).encode())
        for name in sorted(graph.initializers):
            value = graph.initializers[name]
            h.update(repr((name, _tensor_sig(value.const_value))).encode())
        for node in graph:
            h.update(repr((node.domain, node.op_type, [v.name if v is not None else "" for v in node.inputs],
                           [v.name for v in node.outputs],
                           sorted((k, _attr_sig(a)) for k, a in node.attributes.items()))).encode())
        h.update(repr([v.name for v in graph.outputs]).encode())
    return h.hexdigest()


def _value_sig(value: ir.Value) -> tuple[Any, ...]:
    dims = None if value.shape is None else tuple(str(d) for d in value.shape.dims)
    return value.name, str(value.dtype), dims


def _tensor_sig(tensor: Any) -> tuple[Any, ...]:
    if tensor is None:
        return ("none",)
    shape = tuple(int(d) for d in tensor.shape.dims)
    dtype = str(tensor.dtype)
    if math.prod(shape) <= _SMALL_TENSOR or not tensor.dtype.is_floating_point():
        return dtype, shape, hashlib.sha256(np.ascontiguousarray(tensor.numpy()).tobytes()).hexdigest()
    return dtype, shape


def _attr_sig(attr: Any) -> Any:
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return _tensor_sig(attr.value)
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return str(kind)  # the bodies are walked as graphs of their own
    if kind == ir.AttributeType.TENSORS:
        return [_tensor_sig(t) for t in attr.value]
    return repr(attr.value)


# ------------------------------------------------------------------------------ the cache
def cache_dir() -> Path | None:
    """Where speed answers are kept (None: caching is off)."""
    env = os.environ.get("ONNXOPT_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxopt"


def simd_width() -> int:
    """float32 lanes of this CPU's widest vector unit that ONNX Runtime uses: 16 (AVX-512), 8 (AVX/AVX2),
    4 otherwise (SSE, NEON)."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(threads: int | None) -> dict[str, Any]:
    """What a cached answer is valid for: this CPU, its cores, ONNX Runtime's version, the threads."""
    import onnxruntime as ort

    flags = sorted(f for f in _cpu_flags() if f.startswith(("avx", "fma", "sse4", "amx", "asimd", "sve")))
    return {"cpu": _cpu_model(), "arch": platform.machine(), "flags": flags, "cores": os.cpu_count(),
            "ort": ort.__version__, "threads": threads or 0, "method": METHOD}


def _cache_key(reference: str, candidate: str, feed: Feed, threads: int | None) -> str:
    shapes = sorted((k, str(np.asarray(v).dtype), tuple(np.shape(v))) for k, v in feed.items())
    doc = json.dumps([machine_key(threads), reference, candidate, shapes], sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


class SpeedCache:
    """Speed answers on disk, one JSON file: ``{"version": 1, "entries": {key: {..., "time": t}}}``.

    Read once per instance; every `put` rewrites the file atomically (a concurrent writer may win,
    which only costs a measurement later). Entries older than `CACHE_DAYS` days are neither used nor kept.
    """

    _default: SpeedCache | None = None

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._entries: dict[str, dict[str, Any]] | None = None

    @classmethod
    def default(cls) -> SpeedCache:
        """The cache in `cache_dir()` (re-read when ``ONNXOPT_CACHE_DIR`` changes)."""
        folder = cache_dir()
        if cls._default is None or cls._default.folder != folder:
            cls._default = SpeedCache(folder)
        return cls._default

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / _CACHE_FILE

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                try:
                    doc = json.loads(self.path.read_text())
                    if isinstance(doc, dict) and doc.get("version") == METHOD:
                        self._entries = {k: v for k, v in doc.get("entries", {}).items() if _fresh(v)}
                except (OSError, ValueError, AttributeError):
                    logger.debug("speed cache %s is unreadable; starting a new one", self.path)
        return self._entries

    def get(self, key: str) -> Measurement | None:
        entry = self._load().get(key)
        if entry is None or not _fresh(entry):
            return None
        try:
            fields = {f.name: entry[f.name] for f in dataclasses.fields(Measurement) if f.name != "source"}
            return Measurement(**fields, source="cached")
        except (KeyError, TypeError):
            return None

    def put(self, key: str, value: Measurement) -> None:
        entries = self._load()
        entries[key] = {**value.to_dict(), "time": time.time()}
        if len(entries) > _CACHE_MAX_ENTRIES:
            for old in sorted(entries, key=lambda k: entries[k].get("time", 0))[: len(entries) - _CACHE_MAX_ENTRIES]:
                del entries[old]
        self._write(entries)

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        if self.folder is None or self.path is None:
            return
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".speed-", suffix=".json", dir=self.folder)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": METHOD, "entries": entries}, f)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:  # a read-only home is no reason to fail a run
            logger.debug("speed cache not written to %s: %s", self.folder, exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _fresh(entry: Any) -> bool:
    return isinstance(entry, dict) and time.time() - float(entry.get("time", 0)) < CACHE_DAYS * 86400
