"""What a pass may need besides the model: calibration data, the original model, activations.

Activations are read through one ONNX Runtime session per model state (`TapSession`: a temporary
copy of the model whose outputs include the tapped tensors). The session is reused by every later
call on the same, unchanged model, across passes; a call that asks for a tensor the session does
not tap rebuilds it once, tapping the union. It is dropped when the model changes: the pipeline
says so after every pass that reports ``modified``, a pass that changes the model and taps it again
in the same call says so with `Context.model_changed`, and the context also compares a snapshot of
the model (nodes, wiring, attributes, names, weight tensors by identity) before it reuses a
session. The original model's session is cached the same way. `Context.close` releases them all.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.data import Dataset
from onnxopt.errors import UsageError
from onnxopt.graph import InitializerInputs, iter_graphs, prepare_weights, require_finite
from onnxopt.progress import progress
from onnxopt.runtime import TapSession

__all__ = ["Context"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Context:
    """Shared by the passes of one pipeline run.

    ``original_path`` is a file of the model as it was before the first pass (the teacher for
    distillation, the reference for validation); ``calib`` the checked calibration feeds; ``sample``
    one evaluation feed, the shapes a speed check times at (never data to fit on);
    ``initializer_inputs`` how an IR < 4 model's weights listed as graph inputs are read ("constant",
    as ONNX Runtime reads them, or "input": overridable, left alone), see `onnxopt.graph.weights_from_inputs`.
    """

    original_path: Path | None = None
    calib: Dataset | None = None
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    tolerance: float | None = None
    threads: int | None = None
    sample: dict[str, np.ndarray] | None = None
    initializer_inputs: InitializerInputs = "constant"
    _original: ir.Model | None = dataclasses.field(default=None, repr=False, compare=False)
    _calib_checked: bool = dataclasses.field(default=False, repr=False, compare=False)
    _taps: dict[int, _CachedTaps] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def require_calib(self, who: str, hint: str = "") -> Dataset:
        """The calibration feeds, checked once to hold only finite numbers; UsageError naming `who` without them."""
        if self.calib is None or len(self.calib) == 0:
            extra = f" ({hint})" if hint else ""
            raise UsageError(f"{who} needs calibration data: give --calib DATA (e.g. random:32){extra}")
        if not self._calib_checked:
            for i, feed in enumerate(self.calib.feeds):
                for name, array in feed.items():
                    require_finite(array, f"calibration data '{self.calib.source}': feed {i}, input '{name}'",
                                   "statistics of it would be meaningless", error=UsageError)
            self._calib_checked = True
        return self.calib

    def activations(
        self,
        model: ir.Model,
        names: Sequence[str],
        *,
        feeds: Dataset | None = None,
        desc: str = "calibrating",
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the named tensors of the *current* model, one dict per calibration feed."""
        data = feeds if feeds is not None else self.require_calib(desc)
        yield from self._stream(model, names, data, desc)

    def original_model(self) -> ir.Model:
        """The model as it was before the pipeline (loaded once, lazily, shapes inferred), with its weights
        read as the pipeline reads the model's (`onnxopt.graph.prepare_weights`): names match."""
        if self.original_path is None:
            raise UsageError("the original model is not available to this pass")
        if self._original is None:
            from onnxopt.analysis.stats import infer_shapes
            from onnxopt.io import load

            self._original = load(self.original_path, check=False)
            prepare_weights(self._original, self.initializer_inputs)
            infer_shapes(self._original)
        return self._original

    def original_activations(
        self, names: Sequence[str], *, feeds: Dataset | None = None, desc: str = "teacher"
    ) -> Iterator[dict[str, np.ndarray]]:
        """Stream the named tensors of the model as it was before the pipeline."""
        teacher = self.original_model()
        data = feeds if feeds is not None else self.require_calib(desc)
        yield from self._stream(teacher, names, data, desc)

    def model_changed(self, model: ir.Model | None = None) -> None:
        """Say that `model` (None: every model but the original) changed: its tapping session goes."""
        for key, entry in list(self._taps.items()):
            target = entry.model()
            if model is None and target is not None and target is self._original:
                continue
            if model is None or target is model or target is None:
                self._drop(key)

    def close(self) -> None:
        """Release every tapping session (the context stays usable: sessions are built again)."""
        for key in list(self._taps):
            self._drop(key)

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the session cache
    def _stream(
        self, model: ir.Model, names: Sequence[str], data: Dataset, desc: str
    ) -> Iterator[dict[str, np.ndarray]]:
        wanted = list(dict.fromkeys(names))
        entry = self._session_for(model, wanted)
        entry.users += 1
        try:
            for feed in progress(data, desc=desc, total=len(data)):
                yield entry.session.run(feed, wanted)
        finally:
            entry.users -= 1
            if entry.retired:
                entry.release()

    def _session_for(self, model: ir.Model, names: list[str]) -> _CachedTaps:
        """The cached session of `model` if it is still current and taps `names`, else a new one."""
        for key, old in list(self._taps.items()):
            if old.model() is None:
                self._drop(key)
        key = id(model)
        entry = self._taps.get(key)
        tapped: set[str] = set()
        if entry is not None:
            if not entry.snapshot.matches(model):
                logger.debug("model changed since its tapping session was built; building a new one")
                self._drop(key)
                entry = None
            elif set(names) <= entry.names:
                return entry
            else:
                tapped = entry.names
        union = sorted(tapped | set(names))
        session = TapSession(model, union, threads=self.threads)
        if entry is not None:
            self._drop(key)
        fresh = _CachedTaps(weakref.ref(model), session, set(union), _Snapshot(model))
        self._taps[key] = fresh
        return fresh

    def _drop(self, key: int) -> None:
        entry = self._taps.pop(key, None)
        if entry is not None:
            entry.retired = True
            if entry.users == 0:
                entry.release()


@dataclasses.dataclass(eq=False)
class _CachedTaps:
    """One tapping session of one model state; released once retired and no stream reads it."""

    model: weakref.ReferenceType[ir.Model]
    session: TapSession
    names: set[str]
    snapshot: _Snapshot
    users: int = 0
    retired: bool = False

    def release(self) -> None:
        self.session.close()


class _Snapshot:
    """What a model computes, by identity: its nodes with their wiring, attributes and output names,
    its graph inputs and outputs, initializers with their tensors, and the opsets.

    Equal snapshots mean a session built for the first still computes what the model computes,
    unless a tensor's array was changed in place. Objects are held by weak reference, so an id
    reused by a new object after the old one died is not mistaken for the old one.
    """

    def __init__(self, model: ir.Model) -> None:
        self._key, objects = _state_key(model)
        self._refs = [_weak(o) for o in objects]

    def matches(self, model: ir.Model) -> bool:
        key, _ = _state_key(model)
        return key == self._key and all(ref() is not None for ref in self._refs)


def _weak(obj: object) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # an object without weak references is held strongly
        return lambda: obj


def _state_key(model: ir.Model) -> tuple[tuple[Any, ...], list[object]]:
    objects: list[object] = []

    def ref(obj: object | None) -> int:
        if obj is None:
            return 0
        objects.append(obj)
        return id(obj)

    parts: list[Any] = [tuple(sorted(model.opset_imports.items()))]
    for graph in iter_graphs(model.graph):
        parts.append((ref(graph), tuple((ref(v), v.name) for v in graph.inputs),
                      tuple((ref(v), v.name) for v in graph.outputs)))
        parts.append(frozenset((name, ref(v), ref(v.const_value)) for name, v in graph.initializers.items()))
        parts.append(frozenset(
            (ref(node), node.domain, node.op_type,
             tuple(ref(v) for v in node.inputs),
             tuple((ref(v), v.name) for v in node.outputs),
             tuple(sorted((k, ref(a)) for k, a in node.attributes.items())))
            for node in graph
        ))
    return tuple(parts), objects
