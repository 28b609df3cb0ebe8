"""Feeds for calibration and evaluation, checked against the model's inputs.

A data spec is one of:

- a directory of ``.npz`` files, each one complete feed (keys = the model's input names);
- a single ``.npz`` whose arrays stack samples along the first (batch) axis, split into feeds
  of the model's batch size (or ``batch`` when the batch axis is dynamic);
- ``random:N``: N synthetic feeds drawn from the input types and shapes, symbolic dims from
  ``dims`` (default 1);
- in Python, also a list (or any iterable) of feed dicts.

An extra array ``labels`` in the same files carries class labels for accuracy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError

__all__ = ["InputSpec", "Dataset", "input_specs", "load_data", "DEFAULT_BATCH"]

DEFAULT_BATCH = 16
LABELS = "labels"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype}[{dims}]"

    def concrete_shape(self, dims: dict[str, int], batch: int | None = None) -> tuple[int, ...]:
        if self.shape is None:
            raise UsageError(f"input '{self.name}' has no declared shape; give data, not random:N")
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif isinstance(d, str) and d in dims:
                out.append(dims[d])
            elif i == 0 and batch is not None:
                out.append(batch)
            else:
                out.append(1)
        return tuple(out)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded)."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            # Negative sizes (-1, written by some exporters) mean "dynamic", like a missing name.
            shape = tuple(
                (d if d >= 0 else None) if isinstance(d, int) else (d.value if d.value is not None else None)
                for d in value.shape.dims
            )
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


@dataclasses.dataclass
class Dataset:
    """Feeds checked against a model's inputs, with optional labels per feed."""

    feeds: list[dict[str, np.ndarray]]
    labels: list[np.ndarray | None]
    source: str

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and all(lbl is not None for lbl in self.labels)

    @property
    def num_samples(self) -> int:
        total = 0
        for feed in self.feeds:
            first = next(iter(feed.values()))
            total += int(first.shape[0]) if first.ndim else 1
        return total

    def take(self, n: int) -> Dataset:
        return Dataset(self.feeds[:n], self.labels[:n], self.source)

    def split(self, first: int) -> tuple[Dataset, Dataset]:
        """The first `first` feeds and the rest (for held-out evaluation), labels kept with their feeds."""
        if not 0 <= first <= len(self.feeds):
            raise UsageError(f"cannot split {len(self.feeds)} feeds after the first {first}")
        a = Dataset(self.feeds[:first], self.labels[:first], self.source)
        b = Dataset(self.feeds[first:], self.labels[first:], self.source)
        return a, b


def load_data(
    spec: Any,
    inputs: Sequence[InputSpec],
    *,
    dims: dict[str, int] | None = None,
    batch: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Read `spec` (see module doc) into a Dataset matched against `inputs`."""
    dims = dict(dims or {})
    if isinstance(spec, Dataset):
        _check_all(spec.feeds, inputs, spec.source)
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if text.startswith("random:"):
            return _random(text, inputs, dims, batch, seed)
        path = Path(text)
        if path.is_dir():
            return _from_dir(path, inputs)
        if path.is_file():
            return _from_npz(path, inputs, dims, batch)
        raise UsageError(f"data '{text}' is neither random:N, a .npz file nor a directory of them")
    if isinstance(spec, dict):
        spec = [spec]
    if isinstance(spec, Iterable):
        feeds, labels = [], []
        for item in spec:
            if not isinstance(item, dict):
                raise UsageError("data must be feed dicts mapping input names to arrays")
            feed = {k: np.asarray(v) for k, v in item.items() if k != LABELS}
            feeds.append(feed)
            labels.append(np.asarray(item[LABELS]) if LABELS in item else None)
        if not feeds:
            raise UsageError("data holds no feeds")
        _check_all(feeds, inputs, "data")
        return Dataset(feeds, labels, "data")
    raise UsageError(f"cannot read data from a {type(spec).__name__}")


def _random(text: str, inputs: Sequence[InputSpec], dims: dict[str, int], batch: int | None, seed: int) -> Dataset:
    try:
        n = int(text.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"'{text}': random data is written random:N with N a whole number") from None
    if n <= 0:
        raise UsageError(f"'{text}': N must be at least 1")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for spec in inputs:
            shape = spec.concrete_shape(dims, batch)
            feed[spec.name] = _random_array(rng, spec.dtype, shape)
        feeds.append(feed)
    return Dataset(feeds, [None] * n, text)


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 10, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise UsageError(f"random data cannot be drawn for dtype {dtype}; give data files")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UsageError(f"cannot read data file '{path}': {exc}") from None


def _from_dir(path: Path, inputs: Sequence[InputSpec]) -> Dataset:
    files = sorted(path.glob("*.npz"))
    if not files:
        raise UsageError(f"data folder '{path}' holds no .npz files")
    feeds, labels = [], []
    for f in files:
        arrays = _read_npz(f)
        labels.append(arrays.pop(LABELS, None))
        _check_feed(arrays, inputs, str(f))
        feeds.append(arrays)
    return Dataset(feeds, labels, str(path))


def _from_npz(path: Path, inputs: Sequence[InputSpec], dims: dict[str, int], batch: int | None) -> Dataset:
    arrays = _read_npz(path)
    label_array = arrays.pop(LABELS, None)
    _check_names(arrays, inputs, str(path))
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if any(v is None for v in lengths.values()) or len(set(lengths.values())) != 1:
        raise UsageError(
            f"'{path}': arrays must stack samples along their first axis with equal lengths, "
            f"got {lengths}"
        )
    total = next(iter(lengths.values()))
    if label_array is not None and (label_array.ndim == 0 or label_array.shape[0] != total):
        raise UsageError(f"'{path}': labels hold {label_array.shape} entries for {total} samples")
    step = _batch_size(inputs, dims, batch)
    feeds, labels = [], []
    for start in range(0, total, step):
        feed = {k: v[start : start + step] for k, v in arrays.items()}
        _check_feed(feed, inputs, str(path))
        feeds.append(feed)
        labels.append(None if label_array is None else label_array[start : start + step])
    return Dataset(feeds, labels, str(path))


def _batch_size(inputs: Sequence[InputSpec], dims: dict[str, int], batch: int | None) -> int:
    for spec in inputs:
        if spec.shape:
            d = spec.shape[0]
            if isinstance(d, int):
                return d
            if isinstance(d, str) and d in dims:
                return dims[d]
    return batch or DEFAULT_BATCH


def _check_names(arrays: dict[str, np.ndarray], inputs: Sequence[InputSpec], where: str) -> None:
    names = {s.name for s in inputs}
    missing = sorted(names - set(arrays))
    extra = sorted(set(arrays) - names)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown array(s) {', '.join(extra)}")
        expect = "; ".join(s.describe() for s in inputs)
        raise UsageError(f"data '{where}' does not match the model: {' and '.join(parts)} (model takes {expect})")


def _check_feed(feed: dict[str, np.ndarray], inputs: Sequence[InputSpec], where: str) -> None:
    _check_names(feed, inputs, where)
    for spec in inputs:
        arr = feed[spec.name]
        if arr.dtype != spec.dtype:
            raise UsageError(
                f"data '{where}': input '{spec.name}' is {arr.dtype}, the model takes {spec.dtype}"
            )
        if spec.shape is None:
            continue
        if arr.ndim != len(spec.shape):
            raise UsageError(
                f"data '{where}': input '{spec.name}' has shape {list(arr.shape)}, "
                f"the model takes rank {len(spec.shape)} ({spec.describe()})"
            )
        for got, want in zip(arr.shape, spec.shape):
            if isinstance(want, int) and got != want:
                raise UsageError(
                    f"data '{where}': input '{spec.name}' has shape {list(arr.shape)}, "
                    f"the model takes {spec.describe()}"
                )


def _check_all(feeds: Sequence[dict[str, np.ndarray]], inputs: Sequence[InputSpec], where: str) -> None:
    for feed in feeds:
        _check_feed(feed, inputs, where)
