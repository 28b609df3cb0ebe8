"""`optimize`: the Python entry point behind the command line.

Flow: check every number and target (`onnxopt.limits`, `io.check_targets`) -> load (lazy weights)
-> data (random feeds sized so that the original runs on them, `data.probe_random_sizes`; no
samples, or accuracy without labels, refused here) -> context (original model file, calibration
feeds checked against the inputs) -> passes in order -> save to a staging file beside the output
-> validate (checker, strict shape inference, ONNX Runtime parity against the original) ->
`Result`, whose `save` renames the staged file into place (with companion files such as a report,
committed first), so a model is never serialized twice and a failure never leaves a partial file.
Everything that can fail on the user's input fails before `Result.save`, the only step that writes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt import io, sparse
from onnxopt.analysis import ModelStats, class_outputs, model_stats
from onnxopt.analysis.stats import NONZERO_COUNT_LIMIT
from onnxopt.bench import TABLE_LIMIT_BYTES, BenchResult
from onnxopt.context import Context
from onnxopt.data import Dataset, InputSpec, Sizes, input_specs, load_data, needs_probe, probe_random_sizes
from onnxopt.errors import UsageError
from onnxopt.latency import Verdict, measure, run_passes
from onnxopt.limits import (
    DRIFT_COSINE,
    DRIFT_TOP1,
    check_batch,
    check_dim,
    check_fraction,
    check_runs,
    check_threads,
    check_tolerance,
)
from onnxopt.metrics import METRICS
from onnxopt.pipeline import PassRecord, PassSpec, Pipeline
from onnxopt.progress import step
from onnxopt.validate import Comparison, check_model_file, compare_models

__all__ = ["optimize", "Result", "DEFAULT_EVAL", "random_feed_sizes"]

DEFAULT_EVAL = "random:8"


@dataclasses.dataclass
class Result:
    """The optimized model with what each pass did and how it compares to the original."""

    model: ir.Model
    passes: list[PassRecord]
    validation: Comparison | None
    before: ModelStats
    after: ModelStats
    size_before: int
    size_after: int
    latency: BenchResult | None
    input_kind: str
    feeds_note: str | None = None
    """How random feeds were sized, when that was chosen for the user (the command line prints it)."""
    speed: Verdict | None = None
    details: dict[str, Any] | None = None
    """The data a drawn report needs (`optimize(details=True)`; `onnxopt.report.collect`)."""
    _staged: Path | None = None
    _workspace: Any = None
    _staging: io.Staging | None = None
    _target: Path | None = None
    _external: bool = False
    _sources: list[Path] = dataclasses.field(default_factory=list)

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        external_data: bool | None = None,
        companions: Mapping[str | os.PathLike[str], bytes] | None = None,
    ) -> Path:
        """Write the model to `path` atomically (external data past 2 GB or when asked).

        `companions` ({path: bytes}, e.g. a JSON report) are written in the same commit, before the
        model: when any write fails, none is left. Every path is checked first (never the input model
        or its external data, never one another, never a directory or a device).
        """
        target = Path(path)
        extra = {f"file '{p}'": Path(p) for p in companions or {}}
        io.check_targets({"output": target, "output's external data": io.data_file(target), **extra}, self._sources)
        staging = self._staging
        if (
            staging is not None
            and self._target is not None
            and _same_place(target, self._target)
            and (external_data is None or external_data == self._external)
        ):
            self._staging = None
        else:
            staging = io.Staging()
            ext = external_data if external_data is not None else io.weight_bytes(self.model) > io.PROTOBUF_LIMIT
            staging.add_model(self.model, target, external=ext)
        try:
            for p, content in reversed(list((companions or {}).items())):
                staging.add_bytes(p, content, first=True)
            staging.commit()
        finally:
            staging.discard()
        return target

    def discard(self) -> None:
        """Remove the staged files now (also done when the Result is collected, and at exit)."""
        if self._staging is not None:
            self._staging.discard()
        if self._workspace is not None:
            self._workspace.cleanup()

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

    @property
    def slower(self) -> bool:
        """The optimized model ran slower than the original in this run's timing (`onnxopt.latency`)."""
        return self.speed is not None and self.speed.slower

    def to_proto(self) -> onnx.ModelProto:
        return ir.to_proto(self.model)

    def to_graphsurgeon(self) -> Any:
        import onnx_graphsurgeon as gs

        return gs.import_onnx(self.to_proto())

    @property
    def output(self) -> Any:
        """The optimized model in the kind it was given (path in: onnx_ir.Model out)."""
        if self.input_kind == "proto":
            return self.to_proto()
        if self.input_kind == "graphsurgeon":
            return self.to_graphsurgeon()
        return self.model

    def to_dict(self) -> dict[str, Any]:
        validation = self.validation.to_dict() if self.validation is not None else None  # falsy when failed
        if validation is not None:
            validation["feeds"] = self.feeds_note
        return {
            "before": {**self.before.to_dict(), "file_bytes": self.size_before},
            "after": {**self.after.to_dict(), "file_bytes": self.size_after},
            "passes": [r.to_dict() for r in self.passes],
            "validation": validation,
            "latency": {**self.latency.to_dict(), **(self.speed.to_dict() if self.speed else {})}
            if self.latency else None,
            **(self.details or {}),
        }


def _same_place(a: Path, b: Path) -> bool:
    """True when `a` and `b` name the same entry of the same folder (a symlink is not followed)."""
    pa = a.parent if str(a.parent) else Path(".")
    pb = b.parent if str(b.parent) else Path(".")
    return a.name == b.name and pa.resolve() == pb.resolve()


def _input_kind(model: Any) -> str:
    if isinstance(model, onnx.ModelProto):
        return "proto"
    if isinstance(model, ir.Model):
        return "ir"
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        return "graphsurgeon"
    return "path"


class _Workspace:
    """A temporary folder that lives as long as the Result that needs its files."""

    def __init__(self, parent: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=".onnxopt-" if parent else "onnxopt-", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def cleanup(self) -> None:
        self._finalizer()


def _checked_numbers(
    metric: str, tolerance: float | None, dims: dict[str, Any] | None, batch: int | None, latency_runs: int,
    threads: int | None, drift_cosine: float, drift_top1: float,
) -> dict[str, int]:
    """Every number of an `optimize` call in range (`onnxopt.limits`); the dims as ints."""
    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}' (choose {', '.join(METRICS)})")
    check_tolerance(tolerance, metric)
    check_batch(batch)
    check_runs(latency_runs, "latency runs")
    check_threads(threads)
    check_fraction(drift_cosine, "--drift-cosine")
    check_fraction(drift_top1, "--drift-top1")
    return {name: check_dim(name, value) for name, value in (dims or {}).items()}


def _is_random(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("random:")


def random_feed_sizes(
    original: str | os.PathLike[str], inputs: Sequence[InputSpec], dims: dict[str, int], batch: int | None,
    threads: int | None,
) -> tuple[Sizes, str | None]:
    """Sizes of random feeds' symbolic dims that the `original` model runs at (see
    `onnxopt.data.probe_random_sizes`), and a note when they were chosen for the user. A session on
    the original is opened only when random feeds rest on a guess, and closed before returning."""
    if not needs_probe(inputs):
        return {}, None
    from onnxopt.runtime import run, session

    held = [session(original, threads=threads)]  # a model ONNX Runtime cannot load fails here, as itself
    try:
        return probe_random_sizes(inputs, dims, batch, lambda feed: run(held[0], feed))
    finally:
        held.clear()


def _check_eval_data(data: Dataset, metric: str) -> None:
    if data.num_samples == 0:
        raise UsageError(f"no samples to validate on: data '{data.source}' holds none")
    if metric == "accuracy" and not data.has_labels:
        raise UsageError(f"--metric accuracy needs labels: data '{data.source}' has no array 'labels'")


def optimize(
    model: Any,
    passes: Sequence[PassSpec] = ("fold",),
    *,
    calib: Any = None,
    data: Any = None,
    validate: bool = True,
    tolerance: float | None = None,
    metric: str = "rel_l2",
    dims: dict[str, int] | None = None,
    batch: int | None = None,
    latency_runs: int = 0,
    threads: int | None = None,
    output: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    also_writes: Mapping[str, str | os.PathLike[str]] | None = None,
    drift_cosine: float = DRIFT_COSINE,
    drift_top1: float = DRIFT_TOP1,
    initializer_inputs: str = "constant",
    details: bool = False,
) -> Result:
    """Run `passes` on `model` (path, ModelProto, onnx_ir.Model or graphsurgeon Graph).

    `calib` and `data` take any data spec (see `onnxopt.data`); validation runs on `data`, else
    on the calibration feeds, else on random feeds. With `output`, the optimized model is staged
    in that file's folder so `Result.save(output)` only renames it; `output` and the files in
    `also_writes` ({label: path}, e.g. a report the caller writes with `Result.save(companions=)`)
    are checked before any work. `drift_cosine`/`drift_top1` set what the comparison calls severe
    drift (0 turns a check off). The input is never changed.
    `initializer_inputs` says how an IR < 4 model's weights, all listed as graph inputs, are read:
    "constant" (as ONNX Runtime reads them) or "input" (overridable; passes leave them alone). With
    `details`, the data a drawn report needs (per-layer counts and errors, output distributions,
    profiles; `onnxopt.report.collect`) is gathered into `Result.details`.
    """
    if initializer_inputs not in ("constant", "input"):
        raise UsageError(f"initializer_inputs is 'constant' or 'input', not {initializer_inputs!r}")
    dims = _checked_numbers(metric, tolerance, dims, batch, latency_runs, threads, drift_cosine, drift_top1)
    if tolerance is not None and not validate:
        raise UsageError("a tolerance needs validation: drop --no-validate or --tolerance")
    kind = _input_kind(model)
    target = Path(output) if output is not None else None
    pipeline = Pipeline(passes)
    ws = _Workspace()
    staging = io.Staging()
    try:
        if kind == "path":
            src_path = Path(model)
            with step("loading the model"):
                work = io.load(src_path)
        else:
            src_path = ws.path / "original.onnx"
            io.save(io.to_ir(model), src_path, external_data=None)
            work = io.load(src_path, check=False)
        sources = io.source_files(work) if kind == "path" else []
        if target is not None:
            targets = {"output": target, "output's external data": io.data_file(target), **(also_writes or {})}
            io.check_targets(targets, sources)
            staging.folder(target)
        inputs = input_specs(work)
        sizes, feeds_note = {}, None
        if _is_random(calib) or _is_random(data) or (data is None and calib is None and (validate or latency_runs)):
            sizes, feeds_note = random_feed_sizes(src_path, inputs, dims, batch, threads)
        calib_ds = load_data(calib, inputs, dims=dims, batch=batch, sizes=sizes) if calib is not None else None
        if data is not None:
            eval_ds: Dataset = load_data(data, inputs, dims=dims, batch=batch, sizes=sizes)
        elif calib_ds is not None:
            eval_ds = calib_ds.take(32)
        else:
            eval_ds = load_data(DEFAULT_EVAL, inputs, dims=dims, batch=batch, sizes=sizes)
        if validate:
            _check_eval_data(eval_ds, metric)
        # Counting nonzeros reads every weight; decided once from the input so that a big model's
        # smaller output is not paged in just to count it.
        count_nonzero = io.weight_bytes(work) <= NONZERO_COUNT_LIMIT
        before = model_stats(work, dims, count_nonzero=count_nonzero)
        size_before = io.file_size(src_path)
        ctx = Context(original_path=src_path, calib=calib_ds, dims=dims, tolerance=tolerance, threads=threads,
                      sample=eval_ds.feeds[0], initializer_inputs=initializer_inputs)  # type: ignore[arg-type]
        classes = set(class_outputs(work.graph))  # read from the original graph, before the passes change it
        records, snapshots = run_passes(pipeline, work, ctx, ws.path if latency_runs > 0 else None)
        ext = external_data if external_data is not None else io.weight_bytes(work) > io.PROTOBUF_LIMIT
        with step("saving the model"):
            if target is not None:
                staged = staging.add_model(work, target, external=ext)
            else:
                staged = ws.path / "optimized.onnx"
                io.save(work, staged, external_data=ext)
        comparison = None
        if validate:
            check_model_file(staged, has_sparse=not ext and bool(sparse.marked_names(work)))
            comparison = compare_models(src_path, staged, eval_ds, metric=metric, tolerance=tolerance,
                                        threads=threads, drift_cosine=drift_cosine, drift_top1=drift_top1,
                                        classes=classes)
        after = model_stats(work, dims, count_nonzero=count_nonzero)
        size_after = io.file_size(staged)
        latency, speed = None, None
        if latency_runs > 0:
            latency, speed = measure(src_path, staged, snapshots, pipeline.passes, records, runs=latency_runs,
                                     threads=threads, dims=dims, batch=batch, data=eval_ds,
                                     skip_above=TABLE_LIMIT_BYTES)
        extra = None
        if details:
            from onnxopt.report.collect import collect_details

            extra = collect_details(src_path, work, staged, eval_ds, validate=validate, bench_runs=latency_runs,
                                    threads=threads, dims=dims)
        return Result(
            model=work,
            passes=records,
            validation=comparison,
            before=before,
            after=after,
            size_before=size_before,
            size_after=size_after,
            latency=latency,
            input_kind=kind,
            feeds_note=feeds_note,
            speed=speed,
            details=extra,
            _staged=staged,
            _workspace=ws,
            _staging=staging if target is not None else None,
            _target=target,
            _external=ext,
            _sources=sources,
        )
    except BaseException:
        ws.cleanup()
        staging.discard()
        raise
