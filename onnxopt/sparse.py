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
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

__all__ = [
    "SPARSE_KEY",
    "INDEX_BYTES",
    "sparse_nbytes",
    "marked_names",
    "mark_sparse",
    "apply_sparse_storage",
    "densify",
]

logger = logging.getLogger(__name__)

SPARSE_KEY = "onnxopt.sparse_initializers"
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


def _dense_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=values.dtype)
    if indices.ndim == 2:  # coordinate form [nnz, rank]
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    dense[indices.reshape(-1)] = values
    return dense.reshape(shape)


def densify(proto: onnx.ModelProto) -> int:
    """Turn every main-graph ``sparse_initializer`` of `proto` back into a dense initializer."""
    graph = proto.graph
    count = len(graph.sparse_initializer)
    for sparse in graph.sparse_initializer:
        graph.initializer.append(numpy_helper.from_array(_dense_array(sparse), sparse.values.name))
    del graph.sparse_initializer[:]
    return count
