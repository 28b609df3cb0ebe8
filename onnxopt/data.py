"""Feeds for calibration and evaluation, checked against the model's inputs.

A data spec is one of:

- a directory of ``.npz`` files, each one complete feed (keys = the model's input names);
- a single ``.npz`` whose arrays stack samples along the first (batch) axis, split into feeds
  of the model's batch size (or ``batch`` when the batch axis is dynamic);
- ``random:N``: N synthetic feeds drawn from the input types and shapes (see below);
- in Python, also a list (or any iterable) of feed dicts.

An extra array ``labels`` in the same files carries class labels for accuracy: whole numbers, one per
sample (shape ``[N]`` or ``[N, 1]``).

Random feeds, the rules in one place (they must run the original model, which knows nothing of
them; `input_specs` reads the hints from the graph, `random_sizes` the sizes to try):

- Symbolic dims take ``dims[name]`` when given; the batch (the first axis, and any name that is some
  input's first axis) is ``batch`` or 1.
- Image-like inputs (rank 4, floating point, a fixed channel count of 1-4 at axis 1 (NCHW) or axis 3
  (NHWC)) have their symbolic height and width at 32 (a 1x1 picture exercises nothing of a vision
  model); other symbolic lengths (axes after a symbolic batch: a sequence, a number of audio samples)
  at 1. When the original fails on that, `probe_random_sizes` tries every one of them at 32, 64, 128,
  224, 320 and 640 in turn (`LADDER`), and the first size the original runs at wins.
- Integer inputs that index a constant table (they reach ``Gather``'s indices, directly or through
  Cast/Unsqueeze/Squeeze/Reshape/Flatten/Identity, and the table is a constant: token ids and token
  types of a BERT-style encoder) are drawn inside the table, ``0 <= i < rows``; an integer scalar
  compared (Equal/Less/Greater/LessOrEqual/GreaterOrEqual) with constants (a sample rate) is drawn
  from those constants; other integers from 0..9, booleans at random, floats from a standard normal.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import ModelError, UsageError, first_line, safe_name
from onnxopt.graph import is_onnx_op
from onnxopt.limits import MAX_RANDOM_BYTES, MAX_RANDOM_FEEDS

__all__ = [
    "InputSpec",
    "Dataset",
    "input_specs",
    "load_data",
    "random_sizes",
    "probe_random_sizes",
    "needs_probe",
    "Sizes",
    "DEFAULT_BATCH",
    "LADDER",
]

DEFAULT_BATCH = 16
LABELS = "labels"
LADDER = (32, 64, 128, 224, 320, 640)
"""Sizes tried, in order, for symbolic image heights/widths and sequence lengths of random feeds."""
IMAGE_START = LADDER[0]
_PASS_THROUGH = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity")
_COMPARISONS = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")
_MAX_CHOICES = 16

Sizes = dict[tuple[str, int], int]
"""Sizes chosen for symbolic dims of random feeds, by (input name, axis)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None
    high: int | None = None
    """Integer draws fall in 0 <= x < high (the rows of the table the input indexes)."""
    choices: tuple[Any, ...] | None = None
    """Draws take one of these values (the constants a scalar input is compared with)."""

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{safe_name(self.name)} {self.dtype}[{dims}]"

    def concrete_shape(
        self, dims: dict[str, int], batch: int | None = None, sizes: Sizes | None = None
    ) -> tuple[int, ...]:
        if self.shape is None:
            raise UsageError(f"input '{safe_name(self.name)}' has no declared shape; give data, not random:N")
        out = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int):
                out.append(d)
            elif isinstance(d, str) and d in dims:
                out.append(dims[d])
            elif sizes and (self.name, i) in sizes:
                out.append(sizes[(self.name, i)])
            elif i == 0 and batch is not None:
                out.append(batch)
            else:
                out.append(1)
        return tuple(out)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded), with hints for random draws."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        dtype = np.dtype(value.dtype.numpy() if value.dtype is not None else np.float32)
        shape = None
        if value.shape is not None:
            # Negative sizes (-1, written by some exporters) mean "dynamic", like a missing name.
            shape = tuple(
                (d if d >= 0 else None) if isinstance(d, int) else (d.value if d.value is not None else None)
                for d in value.shape.dims
            )
        high = choices = None
        if np.issubdtype(dtype, np.integer):
            high, choices = _integer_hints(value, scalar=shape is not None and all(d == 1 for d in shape))
        specs.append(InputSpec(value.name, dtype, shape, high, choices))
    return specs


def _constant_of(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a constant value: an initializer that is not a graph input, or a Constant node's output."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    node = value.producer()
    if is_onnx_op(node, "Constant") and "value" in node.attributes:
        return node.attributes["value"].value
    return None


def _reached_uses(value: ir.Value) -> Iterator[tuple[ir.Node, int]]:
    """The uses of `value` and of what it becomes through shape- and type-only ops (an explicit stack)."""
    stack, seen = [value], {id(value)}
    while stack:
        v = stack.pop()
        for use in v.uses():
            node, index = use.node, use.idx
            if is_onnx_op(node, *_PASS_THROUGH) and index == 0:
                for out in node.outputs:
                    if id(out) not in seen:
                        seen.add(id(out))
                        stack.append(out)
            else:
                yield node, index


def _integer_hints(value: ir.Value, *, scalar: bool) -> tuple[int | None, tuple[Any, ...] | None]:
    """(rows of the smallest constant table the input indexes, constants a scalar input is compared with)."""
    rows: list[int] = []
    compared: list[Any] = []
    for node, index in _reached_uses(value):
        if is_onnx_op(node, "Gather") and index == 1:
            table = _constant_of(node.inputs[0])
            if table is not None and table.shape is not None and len(table.shape) > 0:
                attr = node.attributes.get("axis")
                axis = int(attr.value) if attr is not None else 0
                size = table.shape[axis % len(table.shape)]
                if isinstance(size, int) and size > 0:
                    rows.append(size)
        elif scalar and is_onnx_op(node, *_COMPARISONS) and len(node.inputs) == 2:
            other = _constant_of(node.inputs[1 - index])
            if other is not None and other.size <= _MAX_CHOICES:
                compared.extend(np.asarray(other.numpy()).reshape(-1).tolist())
    choices = tuple(dict.fromkeys(compared)) if compared else None
    return (min(rows) if rows else None), choices


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
        return sum(_feed_samples(feed) for feed in self.feeds)

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
    sizes: Sizes | None = None,
) -> Dataset:
    """Read `spec` (see module doc) into a Dataset matched against `inputs`.

    `sizes` fixes symbolic dims of random feeds by (input, axis) (see `probe_random_sizes`).
    """
    dims = dict(dims or {})
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UsageError(f"batch {batch}: give a whole number of samples, at least 1")
    if isinstance(spec, Dataset):
        _check_all(spec.feeds, inputs, spec.source)
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if text.startswith("random:"):
            return _random(text, inputs, dims, batch, seed, sizes)
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
            labels.append(_checked_labels(item[LABELS], _feed_samples(feed), "data") if LABELS in item else None)
        if not feeds:
            raise UsageError("data holds no feeds")
        _check_all(feeds, inputs, "data")
        return Dataset(feeds, labels, "data")
    raise UsageError(f"cannot read data from a {type(spec).__name__}")


def random_count(text: str) -> int:
    """N of a ``random:N`` spec, checked (1..MAX_RANDOM_FEEDS)."""
    try:
        n = int(text.split(":", 1)[1])
    except ValueError:
        raise UsageError(f"'{text}': random data is written random:N with N a whole number") from None
    if n <= 0:
        raise UsageError(f"'{text}': N must be at least 1")
    if n > MAX_RANDOM_FEEDS:
        raise UsageError(f"'{text}': at most {MAX_RANDOM_FEEDS:,} random feeds")
    return n


def _random(
    text: str, inputs: Sequence[InputSpec], dims: dict[str, int], batch: int | None, seed: int, sizes: Sizes | None
) -> Dataset:
    n = random_count(text)
    shapes = {spec.name: spec.concrete_shape(dims, batch, sizes) for spec in inputs}
    per_feed = sum(_nbytes(shapes[spec.name], spec.dtype) for spec in inputs)
    if per_feed * n > MAX_RANDOM_BYTES:
        shown = ", ".join(f"{safe_name(k)}{list(v)}" for k, v in shapes.items())
        raise UsageError(f"'{text}' would draw {per_feed * n / 2**20:,.0f} MiB of random feeds ({shown}); "
                         f"the limit is {MAX_RANDOM_BYTES / 2**20:.0f} MiB: lower --dims, --batch or N")
    rng = np.random.default_rng(seed)
    feeds = [{spec.name: _random_array(rng, spec, shapes[spec.name]) for spec in inputs} for _ in range(n)]
    return Dataset(feeds, [None] * n, text)


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count * max(int(dtype.itemsize), 1)


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    dtype = spec.dtype
    if spec.choices:
        return np.asarray(rng.choice(np.asarray(spec.choices), size=shape)).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, spec.high if spec.high is not None else 10, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    raise UsageError(f"random data cannot be drawn for dtype {dtype}; give data files")


def _is_image(spec: InputSpec) -> tuple[int, int] | None:
    """The (height, width) axes of an image-like input: rank 4, floating point, 1-4 fixed channels."""
    shape = spec.shape
    if shape is None or len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        return None
    for channels, spatial in ((1, (2, 3)), (3, (1, 2))):
        c = shape[channels]
        if isinstance(c, int) and 1 <= c <= 4 and any(not isinstance(shape[a], int) for a in spatial):
            return spatial
    return None


def random_sizes(inputs: Sequence[InputSpec], dims: dict[str, int]) -> list[Sizes]:
    """The sizes to try, in order, for the symbolic dims of random feeds that no `dims` entry fixes:
    first image heights/widths at 32 with other lengths at 1, then every one of them at each `LADDER`
    size. Empty when there is nothing to choose (only batch axes are symbolic)."""
    batch_names = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}
    image: list[tuple[str, int]] = []
    lengths: list[tuple[str, int]] = []
    for spec in inputs:
        if not spec.shape:
            continue
        spatial = _is_image(spec)
        batched = not isinstance(spec.shape[0], int)
        for axis, d in enumerate(spec.shape):
            if axis == 0 or isinstance(d, int) or d in batch_names or (isinstance(d, str) and d in dims):
                continue
            if spatial is not None and axis in spatial:
                image.append((spec.name, axis))
            elif isinstance(d, str) or batched:
                lengths.append((spec.name, axis))
    if not image and not lengths:
        return []
    attempts = [{**{k: IMAGE_START for k in image}, **{k: 1 for k in lengths}}]
    for size in LADDER:
        attempt = {k: size for k in (*image, *lengths)}
        if attempt not in attempts:
            attempts.append(attempt)
    return attempts


def needs_probe(inputs: Sequence[InputSpec]) -> bool:
    """True when random feeds rest on a guess the original may not accept: a symbolic size other
    than the batch (chosen here or by the user's --dims), an integer or boolean input, a scalar input."""
    return bool(random_sizes(inputs, {})) or any(
        not np.issubdtype(s.dtype, np.floating) or (s.shape is not None and len(s.shape) == 0) for s in inputs
    )


def _size_names(inputs: Sequence[InputSpec], sizes: Sizes) -> str:
    """``height=32, width=32`` (named dims) or ``x[2]=32`` (unnamed ones), each name once."""
    by_name = {s.name: s for s in inputs}
    shown: dict[str, int] = {}
    for (name, axis), size in sizes.items():
        d = by_name[name].shape[axis] if by_name[name].shape else None
        shown[safe_name(d) if isinstance(d, str) else f"{safe_name(name)}[{axis}]"] = size
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def probe_random_sizes(
    inputs: Sequence[InputSpec],
    dims: dict[str, int],
    batch: int | None,
    try_feed: Callable[[dict[str, np.ndarray]], object],
) -> tuple[Sizes, str | None]:
    """The sizes of the first `random_sizes` attempt whose random feed the original runs
    (`try_feed` raises when it cannot), and a note when they are not the plain defaults.

    Nothing is run when random feeds involve no guess. When every attempt fails: a ModelError that
    says the original failed on random feeds, with the shapes used and the fix (--dims, --data).
    """
    if not needs_probe(inputs):
        return {}, None
    attempts = random_sizes(inputs, dims)
    first_error = ""
    first_shapes = ""
    for k, sizes in enumerate(attempts or [{}]):
        feed = _random("random:1", inputs, dims, batch, 0, sizes).feeds[0]
        try:
            try_feed(feed)
        except Exception as exc:  # ModelError from ONNX Runtime, or anything it raises
            if k == 0:
                first_error = first_line(exc, 240)
                first_shapes = ", ".join(f"{safe_name(n)}{list(a.shape)}" for n, a in feed.items())
            continue
        if k == 0 and not any(s == IMAGE_START for s in sizes.values()):
            return sizes, None
        return sizes, (f"random feeds: {_size_names(inputs, sizes)} (the first size the original runs at; "
                       "set it with --dims NAME=N)")
    tried = f"; also tried sizes {LADDER[0]}-{LADDER[-1]} for {_size_names(inputs, attempts[-1])}" if attempts else ""
    raise ModelError(
        f"the original model fails on random feeds ({first_shapes}{tried}): {first_error}; "
        "give the real sizes with --dims NAME=N or real inputs with --data"
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise UsageError(f"cannot read data file '{path}': {first_line(exc)}") from None


def _feed_samples(feed: dict[str, np.ndarray]) -> int:
    first = next(iter(feed.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _checked_labels(labels: Any, samples: int, where: str) -> np.ndarray:
    """Labels as a 1-D integer array of `samples` entries ([N] or [N, 1] given), else UsageError."""
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 0 and samples == 1:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.shape[0] != samples:
        raise UsageError(f"data '{where}': labels have shape {list(np.shape(labels))}; give one class index per "
                         f"sample, shape [{samples}]")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    raise UsageError(f"data '{where}': labels must be whole class indices, got {arr.dtype}")


def _from_dir(path: Path, inputs: Sequence[InputSpec]) -> Dataset:
    files = sorted(path.glob("*.npz"))
    if not files:
        raise UsageError(f"data folder '{path}' holds no .npz files")
    feeds, labels = [], []
    for f in files:
        arrays = _read_npz(f)
        label = arrays.pop(LABELS, None)
        _check_feed(arrays, inputs, str(f))
        labels.append(None if label is None else _checked_labels(label, _feed_samples(arrays), str(f)))
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
            f"got {({safe_name(k): v for k, v in lengths.items()})}"
        )
    total = next(iter(lengths.values()))
    if label_array is not None:
        if label_array.ndim == 0 or label_array.shape[0] != total:
            raise UsageError(f"'{path}': labels hold {label_array.shape} entries for {total} samples")
        label_array = _checked_labels(label_array, total, str(path))
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
            parts.append(f"missing input(s) {', '.join(safe_name(m) for m in missing)}")
        if extra:
            parts.append(f"unknown array(s) {', '.join(safe_name(e) for e in extra)}")
        expect = "; ".join(s.describe() for s in inputs)
        raise UsageError(f"data '{where}' does not match the model: {' and '.join(parts)} (model takes {expect})")


def _check_feed(feed: dict[str, np.ndarray], inputs: Sequence[InputSpec], where: str) -> None:
    _check_names(feed, inputs, where)
    for spec in inputs:
        arr = feed[spec.name]
        if arr.dtype != spec.dtype:
            raise UsageError(
                f"data '{where}': input '{safe_name(spec.name)}' is {arr.dtype}, the model takes {spec.dtype}"
            )
        if spec.shape is None:
            continue
        if arr.ndim != len(spec.shape):
            raise UsageError(
                f"data '{where}': input '{safe_name(spec.name)}' has shape {list(arr.shape)}, "
                f"the model takes rank {len(spec.shape)} ({spec.describe()})"
            )
        for got, want in zip(arr.shape, spec.shape):
            if isinstance(want, int) and got != want:
                raise UsageError(
                    f"data '{where}': input '{safe_name(spec.name)}' has shape {list(arr.shape)}, "
                    f"the model takes {spec.describe()}"
                )


def _check_all(feeds: Sequence[dict[str, np.ndarray]], inputs: Sequence[InputSpec], where: str) -> None:
    for feed in feeds:
        _check_feed(feed, inputs, where)
