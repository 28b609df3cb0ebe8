"""ONNX Runtime sessions, always built from a file path, and runs that tap inner tensors.

`run_taps` is how passes see activations: it exposes the named tensors as extra graph outputs of
a temporary copy of the model and streams one result dict per feed, so callers can accumulate
statistics without holding every activation of every sample.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.io import temp_model_file

__all__ = ["session", "run", "run_taps", "provider_name", "tap_values"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
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
        raise ModelError(f"ONNX Runtime cannot load '{Path(path).name}': {first_line(exc)}") from None


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return sess.run(None, feed)
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
        raise ModelError(f"no tensor named {', '.join(missing[:5])} in the model")
    return [by_name[n] for n in names]


def run_taps(
    model: ir.Model,
    names: Sequence[str],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of the tensors `names` (plus the model outputs) as a dict."""
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
            raise ModelError(f"tensor '{value.name}' has no type, even after shape inference; it cannot be tapped")
        outputs.append(value)
        added.append(value)
    with contextlib.ExitStack() as stack:
        try:  # the taps live only in the temporary copy: the model's outputs are restored at once
            path = stack.enter_context(temp_model_file(model))
        finally:
            for value in added:
                outputs.remove(value)
        sess = session(path, threads=threads)
        out_names = [o.name for o in sess.get_outputs()]
        consts = {v.name: v.const_value.numpy() for v in values if v.const_value is not None}
        for feed in feeds:
            result = dict(zip(out_names, run(sess, feed)))
            for v in values:
                if v.is_graph_input():
                    result[v.name] = feed[v.name]
            result.update(consts)
            yield result
