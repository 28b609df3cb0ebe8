"""Sparse storage of pruned weights: the model's ``sparse_initializer``, written at save time.

The in-memory graph (onnx_ir) holds every weight dense, so `prune` only *marks* the weights to
store sparse, in the model metadata prop ``onnxopt.sparse_initializers`` (a JSON list of names).
`apply_sparse_storage` turns a serialized model's marked initializers into sparse tensors and
drops the mark (`onnxopt.io.save` calls it when it writes a model as one file); `densify` does the
inverse, for tools that read only dense initializers (`onnxopt.io.load` calls it).

Size of one tensor with ``nnz`` nonzeros of ``b`` bytes each, stored sparse: ONNX requires INT64
indices, and the compact form keeps one linear index per value, so ``nnz * (b + 8)`` bytes against
``size * b`` dense. For float32 that is smaller only below 1/3 density, i.e. above 2/3 sparsity.
The conversion is checked again when saving (a later pass may have changed the weight), so a mark
never makes a tensor larger.

ONNX Runtime reads ``sparse_initializer`` and densifies it at load, so outputs are bit-identical to
the dense-zero model. Two limits of the ONNX tooling: onnx's strict shape inference types a sparse
initializer as a sparse tensor and rejects it as a Conv/Gemm/MatMul input, and onnx_ir drops
sparse initializers when it loads a model; both read the model fine after `densify`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxopt.errors import ModelError, safe_name
from onnxopt.tensors import check_external_tensor, external_location

__all__ = [
    "SPARSE_KEY",
    "INDEX_BYTES",
    "sparse_nbytes",
    "marked_names",
    "mark_sparse",
    "apply_sparse_storage",
    "densify",
    "DENSE_LIMIT",
]

logger = logging.getLogger(__name__)

SPARSE_KEY = "onnxopt.sparse_initializers"
DENSE_LIMIT = 2_000_000_000
"""A sparse initializer larger than this dense is refused (it could not be written as one tensor anyway)."""
INDEX_BYTES = 8
_FLOAT_PROTO_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def sparse_nbytes(nonzero: int, itemsize: int) -> int:
    """Bytes of the values and INT64 linear indices of a sparse tensor with `nonzero` entries."""
    return int(nonzero) * (int(itemsize) + INDEX_BYTES)


def _parse_mark(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        names = json.loads(text)
    except ValueError:
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def marked_names(model: ir.Model) -> list[str]:
    """The weights `model` asks to store sparse."""
    return _parse_mark(model.metadata_props.get(SPARSE_KEY))


def mark_sparse(model: ir.Model, names: Iterable[str]) -> bool:
    """Ask for the initializers `names` to be stored sparse when the model is saved; True if new."""
    before = set(marked_names(model))
    merged = before | set(names)
    if merged == before:
        return False
    model.metadata_props[SPARSE_KEY] = json.dumps(sorted(merged))
    return True


def _take_mark(proto: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    keep = []
    for prop in proto.metadata_props:
        if prop.key == SPARSE_KEY:
            names.update(_parse_mark(prop.value))
        else:
            keep.append((prop.key, prop.value))
    if names:
        del proto.metadata_props[:]
        for key, value in keep:
            proto.metadata_props.add(key=key, value=value)
    return names


def _try_sparse(init: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """The sparse form of `init` when it is a float tensor in the file and sparse is smaller."""
    if init.data_location == onnx.TensorProto.EXTERNAL or init.data_type not in _FLOAT_PROTO_TYPES:
        return None
    array = numpy_helper.to_array(init)
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    if sparse_nbytes(nonzero.size, array.dtype.itemsize) >= array.nbytes:
        return None
    values = numpy_helper.from_array(np.ascontiguousarray(flat[nonzero]), init.name)
    indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{init.name}.indices")
    return onnx.helper.make_sparse_tensor(values, indices, list(array.shape))


def apply_sparse_storage(proto: onnx.ModelProto) -> list[str]:
    """Move the marked main-graph initializers of `proto` into ``sparse_initializer`` where that
    is smaller; drop the mark. Returns the names stored sparse."""
    wanted = _take_mark(proto)
    if not wanted:
        return []
    graph = proto.graph
    inputs = {v.name for v in graph.input}
    moved: list[str] = []
    kept = []
    for init in graph.initializer:
        sparse = _try_sparse(init) if init.name in wanted and init.name not in inputs else None
        if sparse is None:
            kept.append(init)
        else:
            graph.sparse_initializer.append(sparse)
            moved.append(init.name)
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        gone = set(moved)
        infos = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    logger.debug("stored %d initializers sparse", len(moved))
    return moved


def _dense_array(sparse: onnx.SparseTensorProto, base_dir: str) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values, base_dir).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices, base_dir).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    size = 1
    for d in shape:
        size *= d
    if min(shape, default=1) < 0 or size * values.dtype.itemsize > DENSE_LIMIT:
        raise ModelError(f"sparse initializer '{safe_name(sparse.values.name)}' of shape {list(shape)} cannot be "
                         f"made dense (more than {DENSE_LIMIT:,} bytes, protobuf's limit)")
    if indices.size != values.size and not (indices.ndim == 2 and indices.shape[0] == values.size):
        raise ModelError(f"sparse initializer '{safe_name(sparse.values.name)}' has {values.size} values for "
                         f"{indices.shape[0] if indices.ndim else indices.size} indices")
    dense = np.zeros(size, dtype=values.dtype)
    try:
        if indices.ndim == 2:  # coordinate form [nnz, rank]
            indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
        dense[indices.reshape(-1)] = values
    except (ValueError, IndexError):
        raise ModelError(f"sparse initializer '{safe_name(sparse.values.name)}' has indices outside its "
                         f"shape {list(shape)}") from None
    return dense.reshape(shape)


def _check_sources(sparse: onnx.SparseTensorProto, base_dir: Path | None) -> None:
    """Refuse external values or indices outside the model's folder, before anything is read."""
    for part, tensor in (("values", sparse.values), ("indices", sparse.indices)):
        where = f"sparse initializer '{safe_name(sparse.values.name)}' ({part})"
        if external_location(tensor) is None:
            continue
        if base_dir is None:
            raise ModelError(f"{where} is stored as external data, and the model's folder is not known")
        check_external_tensor(where, tensor, base_dir)


def densify(proto: onnx.ModelProto, base_dir: str | os.PathLike[str] | None = None) -> int:
    """Turn every main-graph ``sparse_initializer`` of `proto` back into a dense initializer.

    Values or indices stored as external data are read from `base_dir` (the model's folder), after
    the same checks as dense external data (inside the folder, file long enough); without a
    `base_dir` such a model is refused: nothing is ever read relative to the current directory.
    """
    graph = proto.graph
    base = Path(base_dir) if base_dir is not None else None
    for sparse in graph.sparse_initializer:
        _check_sources(sparse, base)
    count = len(graph.sparse_initializer)
    for sparse in graph.sparse_initializer:
        dense = _dense_array(sparse, str(base) if base is not None else "")
        graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
    del graph.sparse_initializer[:]
    return count
