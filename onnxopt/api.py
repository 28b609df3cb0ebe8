"""`optimize`: the Python entry point behind the command line.

Flow: load (lazy weights) -> context (original model file, calibration feeds checked against the
inputs) -> passes in order -> save to a staging file -> validate (checker, strict shape inference,
ONNX Runtime parity against the original) -> `Result`, whose `save` renames the staged file into
place when it can, so a model is never serialized twice and a failure never leaves a partial file.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt import io, sparse
from onnxopt.analysis import ModelStats, model_stats
from onnxopt.analysis.stats import NONZERO_COUNT_LIMIT
from onnxopt.bench import BenchResult, bench
from onnxopt.context import Context
from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.pipeline import PassRecord, PassSpec, Pipeline
from onnxopt.progress import step
from onnxopt.validate import Comparison, check_model_file, compare_models

__all__ = ["optimize", "Result", "DEFAULT_EVAL"]

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
    details: dict[str, Any] | None = None
    _staged: Path | None = None
    _workspace: Any = None
    _stage: Any = None

    def save(self, path: str | os.PathLike[str], *, external_data: bool | None = None) -> Path:
        """Write the model to `path` atomically (external data past 2 GB or when asked)."""
        target = Path(path)
        staged = self._staged
        if (
            staged is not None
            and staged.exists()
            and staged.name == target.name
            and staged.parent.parent.resolve() == (target.parent if str(target.parent) else Path(".")).resolve()
            and (external_data is None or external_data == (staged.parent / f"{staged.name}.data").exists())
        ):
            data = staged.parent / f"{staged.name}.data"
            if data.exists():
                os.replace(data, target.parent / data.name)
            os.replace(staged, target)
            self._staged = None
            if self._stage is not None and self._stage is not self._workspace:
                self._stage.cleanup()
            return target
        return io.save(self.model, target, external_data=external_data)

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

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
        return {
            "before": {**self.before.to_dict(), "file_bytes": self.size_before},
            "after": {**self.after.to_dict(), "file_bytes": self.size_after},
            "passes": [r.to_dict() for r in self.passes],
            "validation": self.validation.to_dict() if self.validation is not None else None,  # falsy when failed
            "latency": self.latency.to_dict() if self.latency else None,
            **(self.details or {}),
        }


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
    details: bool = False,
) -> Result:
    """Run `passes` on `model` (path, ModelProto, onnx_ir.Model or graphsurgeon Graph).

    `calib` and `data` take any data spec (see `onnxopt.data`); validation runs on `data`, else
    on the calibration feeds, else on random feeds. With `output`, the optimized model is staged
    in that file's folder so `Result.save(output)` only renames it. The input is never changed.
    With `details`, the data a drawn report needs (per-layer counts and errors, output
    distributions, profiles; `onnxopt.report.collect`) is gathered into `Result.details`.
    """
    kind = _input_kind(model)
    target = Path(output) if output is not None else None
    if target is not None:
        io.check_output_path(target, model if kind == "path" else None)
    pipeline = Pipeline(passes)
    ws = _Workspace()
    # The optimized model is staged beside its target, so that saving it is a rename.
    stage = ws if target is None else _Workspace(target.parent if str(target.parent) else Path("."))
    try:
        if kind == "path":
            src_path = Path(model)
            with step("loading the model"):
                work = io.load(src_path)
        else:
            src_path = ws.path / "original.onnx"
            io.save(io.to_ir(model), src_path, external_data=None)
            work = io.load(src_path, check=False)
        inputs = input_specs(work)
        dims = dict(dims or {})
        calib_ds = load_data(calib, inputs, dims=dims, batch=batch) if calib is not None else None
        if data is not None:
            eval_ds: Dataset = load_data(data, inputs, dims=dims, batch=batch)
        elif calib_ds is not None:
            eval_ds = calib_ds.take(32)
        else:
            eval_ds = load_data(DEFAULT_EVAL, inputs, dims=dims, batch=batch)
        # Counting nonzeros reads every weight; decided once from the input so that a big model's
        # smaller output is not paged in just to count it.
        count_nonzero = io.weight_bytes(work) <= NONZERO_COUNT_LIMIT
        before = model_stats(work, dims, count_nonzero=count_nonzero)
        size_before = io.file_size(src_path)
        ctx = Context(original_path=src_path, calib=calib_ds, dims=dims, tolerance=tolerance, threads=threads)
        records = pipeline.run(work, ctx)
        staged = stage.path / (target.name if target is not None else "optimized.onnx")
        ext = external_data if external_data is not None else io.weight_bytes(work) > io.PROTOBUF_LIMIT
        with step("saving the model"):
            io.save(work, staged, external_data=ext)
        comparison = None
        if validate:
            check_model_file(staged, has_sparse=not ext and bool(sparse.marked_names(work)))
            comparison = compare_models(
                src_path, staged, eval_ds, metric=metric, tolerance=tolerance, threads=threads
            )
        after = model_stats(work, dims, count_nonzero=count_nonzero)
        size_after = io.file_size(staged)
        latency = None
        if latency_runs > 0:
            latency = bench([src_path, staged], runs=latency_runs, threads=threads, dims=dims,
                            batch=batch, data=eval_ds, memory=False, budget_s=10.0)
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
            details=extra,
            _staged=staged,
            _workspace=ws,
            _stage=stage,
        )
    except BaseException:
        ws.cleanup()
        stage.cleanup()
        raise
