"""ONNX Runtime sessions, always built from a file path, and runs that tap inner tensors.

`run_taps` is how passes see activations: it exposes the named tensors as extra graph outputs of
a temporary copy of the model and streams one result dict per feed, so callers can accumulate
statistics without holding every activation of every sample.

ONNX Runtime's own log lines (``[E:onnxruntime:...]`` when a run fails, ``[W:onnxruntime:...]`` on
load) never reach stderr: its default logger and every session log only fatal errors (severity 4;
severity 3 still lets the error lines of a failing run through), and what failed is raised as one
line (`ModelError`) instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import ModelError, UsageError, first_line, safe_name
from onnxopt.io import temp_model_file
from onnxopt.limits import check_threads

__all__ = ["session", "run", "run_outputs", "run_taps", "TapSession", "provider_name", "tap_values"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LOG_SEVERITY = 4
"""ONNX Runtime log severity for its default logger and every session: fatal only."""

ort.set_default_logger_severity(LOG_SEVERITY)


def provider_name(provider: str) -> str:
    if provider not in _PROVIDERS:
        raise UsageError(f"unknown provider '{provider}' (choose cpu or cuda)")
    name = _PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise UsageError(
            f"the installed onnxruntime has no {name} (it has {', '.join(ort.get_available_providers())})"
        )
    return name


def session(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    inter_threads: int | None = None,
    provider: str = "cpu",
    optimized_model_path: str | None = None,
    optimization: bool = True,
) -> ort.InferenceSession:
    """An ORT session on the model file at `path`; load failures become `ModelError`."""
    check_threads(threads)
    check_threads(inter_threads, "inter-op threads")
    opts = ort.SessionOptions()
    opts.log_severity_level = LOG_SEVERITY
    if threads:
        opts.intra_op_num_threads = threads
    if inter_threads:
        opts.inter_op_num_threads = inter_threads
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if not optimization:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model_path:
        opts.optimized_model_filepath = optimized_model_path
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=[provider_name(provider)])
    except UsageError:
        raise
    except Exception as exc:
        raise ModelError(f"ONNX Runtime cannot load '{safe_name(Path(path).name)}': {first_line(exc)}") from None


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_outputs(sess, feed, None)


def run_outputs(
    sess: ort.InferenceSession, feed: dict[str, np.ndarray], names: Sequence[str] | None
) -> list[np.ndarray]:
    """`sess.run` for the outputs `names` (None: all), with failures as one-line ModelErrors."""
    try:
        return sess.run(None if names is None else list(names), feed)
    except Exception as exc:
        raise ModelError(f"ONNX Runtime failed to run the model: {first_line(exc)}") from None


def tap_values(model: ir.Model, names: Sequence[str]) -> list[ir.Value]:
    """The main-graph values called `names` (graph inputs, node outputs or initializers)."""
    by_name: dict[str, ir.Value] = {v.name: v for v in model.graph.inputs if v.name}
    by_name.update({k: v for k, v in model.graph.initializers.items()})
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                by_name[out.name] = out
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ModelError(f"no tensor named {', '.join(safe_name(n) for n in missing[:5])} in the model")
    return [by_name[n] for n in names]


class TapSession:
    """One ONNX Runtime session on a temporary copy of `model` whose outputs also include the
    tensors `names`: build it once, then `run(feed, names)` per feed. Graph inputs and initializers
    are answered from the feed and the weights without running anything; a run fetches only the
    asked tensors. ONNX Runtime executes every node of the copy on each run whatever is fetched, so
    a session that taps many tensors costs one run of the model (plus keeping those tensors), which
    is why one session per model state serves callers that want a few tensors at a time.
    The model itself is left as it was (its outputs are restored once the copy is written).
    """

    def __init__(self, model: ir.Model, names: Sequence[str], *, threads: int | None = None) -> None:
        values = tap_values(model, names)
        if any(v.type is None for v in values):
            from onnxopt.analysis.stats import infer_shapes

            infer_shapes(model)
        outputs = model.graph.outputs
        added = []
        for value in values:
            if value in outputs or value.is_graph_input() or value.const_value is not None:
                continue
            if value.type is None:
                raise ModelError(
                    f"tensor '{safe_name(value.name)}' has no type, even after shape inference; it cannot be tapped"
                )
            outputs.append(value)
            added.append(value)
        self._stack = contextlib.ExitStack()
        try:
            path = self._stack.enter_context(temp_model_file(model))
        finally:
            for value in added:
                outputs.remove(value)
        try:
            self._sess = session(path, threads=threads)
        except BaseException:
            self._stack.close()
            raise
        self._outputs = [o.name for o in self._sess.get_outputs()]
        self._inputs = {v.name for v in values if v.is_graph_input() and v.const_value is None}
        self._consts = {v.name: v.const_value.numpy() for v in values if v.const_value is not None}

    def run(self, feed: dict[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The tapped tensors (all of them, plus the model outputs, or just `names`) for one feed."""
        if names is None:
            result = dict(zip(self._outputs, run_outputs(self._sess, feed, None)))
            result.update({n: feed[n] for n in self._inputs})
            result.update(self._consts)
            return result
        wanted = [n for n in names if n not in self._inputs and n not in self._consts]
        result = dict(zip(wanted, run_outputs(self._sess, feed, wanted))) if wanted else {}
        for n in names:
            if n in self._inputs:
                result[n] = feed[n]
            elif n in self._consts:
                result[n] = self._consts[n]
        return result

    def close(self) -> None:
        self._sess = None
        self._stack.close()

    def __enter__(self) -> TapSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_taps(
    model: ir.Model,
    names: Sequence[str],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of the tensors `names` (plus the model outputs) as a dict."""
    with TapSession(model, names, threads=threads) as taps:
        for feed in feeds:
            yield taps.run(feed)
