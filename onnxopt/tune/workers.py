"""Trial evaluation: build a recipe's model, measure its error and objective, in this process or others.

`evaluate` is one trial: run the recipe's passes on the original (the same `Pipeline` and `Context`
as ``onnxopt.optimize``), save the model, then measure it against the original's outputs on the
search data, giving up early on hopeless trials (pruned): a size or MAC objective that does not beat
the original, or an error on the first quarter of the search data far past the limit. Latency is
timed last, under a lock that local workers share, so that two workers never time at once.

Executors run trials: `InlineExecutor` in this process (one worker), `PoolExecutor` in spawned
worker processes (``--workers N``; a worker that dies fails its trial and the pool is rebuilt), and
`RayExecutor` as Ray tasks (``--ray ADDRESS``, the optional ``ray`` extra), each task carrying the
model's bytes so that it runs on any machine of the cluster. Every executor hands back `Outcome`s
in the order trials finish.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from onnxopt import io
from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import OnnxoptError, UsageError, first_line
from onnxopt.pipeline import Pipeline
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.objectives import latency_ratios, macs_of, macs_ratio, size_ratio

__all__ = ["Job", "Outcome", "evaluate", "make_executor", "InlineExecutor", "PoolExecutor", "RayExecutor"]

Recipe = list[tuple[str, dict[str, Any]]]

_HOPELESS_FACTOR = 3.0
_HOPELESS_POINTS = 3.0


@dataclasses.dataclass
class Job:
    """What every trial shares: the original model, the data, the constraint and the objective."""

    model_path: str
    calib: Dataset
    search: Dataset
    constraint: Constraint
    objective: str
    threads: int | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    model_bytes: bytes | None = None
    key: str = ""
    keep_dir: str | None = None
    """Where a trial that holds the constraint leaves its model (``trial<N>.onnx``), for the finalists."""


@dataclasses.dataclass
class Outcome:
    """One trial's result: ``complete``, ``pruned`` (hopeless, stopped early) or ``fail`` (with the reason)."""

    number: int
    state: str
    objective: float | None = None
    error: float | None = None
    rel_l2: float | None = None
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ one trial
class _Worker:
    """Per process: the job, the original's outputs on the search data and its MACs, built once."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._tmp = None
        path = Path(job.model_path)
        if job.model_bytes is not None and not path.is_file():
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-tune-")
            path = Path(self._tmp.name) / "original.onnx"
            path.write_bytes(job.model_bytes)
        self.path = path
        self.reference = Reference(path, job.search, job.constraint, threads=job.threads)
        self.macs = macs_of(path, job.dims) if job.objective == "macs" else 0


_WORKERS: dict[str, _Worker] = {}
_LOCK: Any = None


def _worker_for(job: Job) -> _Worker:
    if job.key not in _WORKERS:
        _WORKERS.clear()
        _WORKERS[job.key] = _Worker(job)
    return _WORKERS[job.key]


def evaluate(job: Job, number: int, recipe: Recipe, lock: Any = None) -> Outcome:
    """Build `recipe` on the original and measure it (see the module doc); never raises for a bad trial."""
    t0 = time.perf_counter()
    try:
        outcome = _evaluate(_worker_for(job), number, recipe, lock)
    except OnnxoptError as exc:
        outcome = Outcome(number, "fail", reason=first_line(exc))
    except Exception as exc:  # a bug in a pass must not end the study; the reason keeps the traceback's end
        last = traceback.extract_tb(exc.__traceback__)[-1]
        outcome = Outcome(number, "fail", reason=f"{type(exc).__name__}: {first_line(exc)} "
                                                  f"({Path(last.filename).name}:{last.lineno})")
    outcome.seconds = round(time.perf_counter() - t0, 3)
    return outcome


def _evaluate(w: _Worker, number: int, recipe: Recipe, lock: Any) -> Outcome:
    job = w.job
    model = io.load(w.path)
    ctx = Context(original_path=w.path, calib=job.calib, dims=dict(job.dims), threads=job.threads)
    records = Pipeline(recipe).run(model, ctx)
    detail: dict[str, Any] = {"passes": {r.name: _short(r.stats.summary) for r in records}, "pid": os.getpid()}
    with tempfile.TemporaryDirectory(prefix="onnxopt-trial-") as tmp:
        path = Path(tmp) / "candidate.onnx"
        io.save(model, path)
        del model
        if job.objective in ("size", "macs"):
            ratio = size_ratio(w.path, path) if job.objective == "size" else macs_ratio(w.macs, path, job.dims)
            if ratio >= 1.0:
                return Outcome(number, "pruned", objective=ratio, detail=detail,
                               reason=f"{job.objective} {ratio:.3f}x: not smaller than the original")
        quick = max(1, len(job.search) // 4)
        if quick < len(job.search):
            early = w.reference.measure(path, first=quick, threads=job.threads)
            if _hopeless(job.constraint, early.error):
                return Outcome(number, "pruned", error=early.error, rel_l2=early.rel_l2, detail=detail,
                               reason=f"error {early.error:.4g} on the first {quick} feeds: hopeless")
        measured = w.reference.measure(path, threads=job.threads)
        detail["search"] = measured.to_dict()
        if job.objective == "latency":
            feed = job.search.feeds[0]
            with lock if lock is not None else contextlib.nullcontext():
                lat = latency_ratios(w.path, [path], feed, threads=job.threads, blocks=5, min_block_s=0.02,
                                     rounds=3)[0]
            ratio = lat.ratio
            detail["latency"] = lat.to_dict()
        elif job.objective == "size":
            ratio = size_ratio(w.path, path)
        else:
            ratio = macs_ratio(w.macs, path, job.dims)
        _keep(job, number, path, measured.error)
    return Outcome(number, "complete", objective=ratio, error=measured.error, rel_l2=measured.rel_l2, detail=detail)


def _keep(job: Job, number: int, path: Path, error: float) -> None:
    """Leave a model that holds the constraint in `Job.keep_dir` (when this machine has it), so that the
    finalists need not be built again."""
    if job.keep_dir and Path(job.keep_dir).is_dir() and job.constraint.holds(error):
        if not any(path.parent.glob("*.data")):  # one-file models only: a copy is then one rename
            os.replace(path, Path(job.keep_dir) / f"trial{number}.onnx")


def _hopeless(constraint: Constraint, error: float) -> bool:
    bound = _HOPELESS_FACTOR * constraint.limit
    if constraint.metric == "accuracy":
        bound += _HOPELESS_POINTS
    return error > bound


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    """A pass summary's plain numbers and strings (lists such as ``ort_ops`` left out)."""
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ------------------------------------------------------------------------------------ executors
class InlineExecutor:
    """Trials one at a time in this process."""

    slots = 1

    def __init__(self, job: Job) -> None:
        self.job = job
        self._done: list[Outcome] = []

    def submit(self, number: int, recipe: Recipe) -> None:
        self._done.append(evaluate(self.job, number, recipe))

    def next_done(self) -> Outcome:
        return self._done.pop(0)

    def close(self) -> None:
        _WORKERS.clear()


def _init_worker(job: Job, lock: Any) -> None:
    global _LOCK
    os.environ["ONNXOPT_NO_PROGRESS"] = "1"
    _LOCK = lock
    _worker_for(job)


def _evaluate_in_worker(job_key: str, number: int, recipe: Recipe) -> Outcome:
    worker = _WORKERS[job_key]
    return evaluate(worker.job, number, recipe, _LOCK)


class PoolExecutor:
    """Trials in `workers` spawned processes; each process loads the job once (its initializer)."""

    def __init__(self, job: Job, workers: int) -> None:
        self.job = job
        self.slots = workers
        self._mp = multiprocessing.get_context("spawn")
        self._lock = self._mp.Lock()
        self._pending: dict[concurrent.futures.Future[Outcome], int] = {}
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(max_workers=self.slots, mp_context=self._mp,
                                                      initializer=_init_worker, initargs=(self.job, self._lock))

    def submit(self, number: int, recipe: Recipe) -> None:
        try:
            future = self._pool.submit(_evaluate_in_worker, self.job.key, number, recipe)
        except concurrent.futures.process.BrokenProcessPool:
            self._rebuild()
            future = self._pool.submit(_evaluate_in_worker, self.job.key, number, recipe)
        self._pending[future] = number

    def next_done(self) -> Outcome:
        done, _ = concurrent.futures.wait(list(self._pending), return_when=concurrent.futures.FIRST_COMPLETED)
        future = next(iter(done))
        number = self._pending.pop(future)
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            self._rebuild()
            return Outcome(number, "fail", reason="its worker process died")

    def _rebuild(self) -> None:
        """A worker died: every trial in flight fails with it; the pool starts over."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()
        stale = list(self._pending.values())
        self._pending.clear()
        for number in stale:
            failed: concurrent.futures.Future[Outcome] = concurrent.futures.Future()
            failed.set_result(Outcome(number, "fail", reason="its worker process died"))
            self._pending[failed] = number

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _ray_evaluate(job: Job, number: int, recipe: Recipe) -> Outcome:
    os.environ["ONNXOPT_NO_PROGRESS"] = "1"
    return evaluate(job, number, recipe)


class RayExecutor:
    """Trials as Ray tasks on the cluster at `address` (``local``: a Ray instance started here)."""

    def __init__(self, job: Job, workers: int, address: str) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'onnxopt[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        self._owned = address == "local"
        self.slots = workers
        job = dataclasses.replace(job, model_bytes=Path(job.model_path).read_bytes())
        self._job = ray.put(job)
        self._remote = ray.remote(num_cpus=1)(_ray_evaluate)
        self._pending: dict[Any, int] = {}

    def submit(self, number: int, recipe: Recipe) -> None:
        self._pending[self._remote.remote(self._job, number, recipe)] = number

    def next_done(self) -> Outcome:
        ready, _ = self._ray.wait(list(self._pending), num_returns=1)
        ref = ready[0]
        number = self._pending.pop(ref)
        try:
            return self._ray.get(ref)
        except Exception as exc:  # a task that died (worker lost, node gone)
            return Outcome(number, "fail", reason=f"Ray task failed: {first_line(exc)}")

    def close(self) -> None:
        for ref in list(self._pending):
            self._ray.cancel(ref, force=True)
        if self._owned:
            self._ray.shutdown()


def make_executor(job: Job, workers: int, ray_address: str | None) -> InlineExecutor | PoolExecutor | RayExecutor:
    """The executor for ``--workers N`` / ``--ray ADDRESS``."""
    if ray_address:
        return RayExecutor(job, workers, ray_address)
    if workers <= 1:
        return InlineExecutor(job)
    return PoolExecutor(job, workers)
