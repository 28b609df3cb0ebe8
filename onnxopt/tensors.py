"""Tensors of a serialized model (protobuf), checked before any of their bytes are read.

A model file can point its tensors anywhere: `check_external` confines every external-data reference
(initializers, sparse initializers' values and indices, tensors inside node attributes, in every
subgraph and function) to the model's own folder and checks the file is long enough; `check_sizes`
refuses in-file data whose length does not match the declared dims (raw_data longer or shorter than
dims x element size). `iter_tensors` yields them all with a label that names where they sit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxopt.errors import ModelError, safe_name

__all__ = ["iter_proto_graphs", "iter_tensors", "tensor_nbytes", "external_location", "check_external",
           "check_external_tensor", "check_sizes"]

# Element types narrower than a byte, packed (ONNX stores two 4-bit values per byte, and so on).
_PACKED_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)
}


def iter_proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A protobuf graph and every subgraph below it, without recursion."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _node_lists(proto: onnx.ModelProto) -> Iterator[list[onnx.NodeProto]]:
    """The nodes of every graph (main, subgraphs) and of every function body (and their subgraphs)."""
    for g in iter_proto_graphs(proto.graph):
        yield g.node
    for function in proto.functions:
        yield function.node
        for node in function.node:
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    for g in iter_proto_graphs(sub):
                        yield g.node


def iter_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto of the model with a label for messages ("initializer 'w'", ...)."""
    for g in iter_proto_graphs(proto.graph):
        for init in g.initializer:
            yield f"initializer '{safe_name(init.name)}'", init
        for sp in g.sparse_initializer:
            yield f"sparse initializer '{safe_name(sp.values.name)}' (values)", sp.values
            yield f"sparse initializer '{safe_name(sp.values.name)}' (indices)", sp.indices
    for nodes in _node_lists(proto):
        for node in nodes:
            for attr in node.attribute:
                where = f"attribute '{safe_name(attr.name)}' of node '{safe_name(node.name or node.op_type)}'"
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield where, attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from ((where, t) for t in attr.tensors)
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield from ((where, t) for t in (attr.sparse_tensor.values, attr.sparse_tensor.indices))
                elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                    for sp in attr.sparse_tensors:
                        yield from ((where, t) for t in (sp.values, sp.indices))


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's data from its dims and type (None for strings and unknown types)."""
    count = 1
    for d in tensor.dims:
        count *= int(d)
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # an unknown type number
        return None
    return count * itemsize


def external_location(tensor: onnx.TensorProto) -> tuple[str, int, int | None] | None:
    """(location, offset, length) of a tensor stored as external data, else None."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        name = safe_name(tensor.name)
        raise ModelError(f"tensor '{name}' has a non-numeric external-data offset or length") from None
    return entries.get("location", ""), offset, length


def check_external_tensor(where: str, tensor: onnx.TensorProto, base_dir: Path) -> Path | None:
    """The file that holds `tensor`'s external data, checked to lie inside `base_dir` and to be long
    enough; None when the tensor is stored in the model file. Raises ModelError otherwise."""
    ref = external_location(tensor)
    if ref is None:
        return None
    location, offset, length = ref
    shown = safe_name(location)
    if not location:
        raise ModelError(f"{where} is stored as external data without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise ModelError(
            f"{where} points at external data by absolute path '{shown}'; refusing to read files outside the "
            "model's folder"
        )
    base = base_dir.resolve()
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise ModelError(f"{where} points at external data '{shown}' outside the model's folder; refusing to read it")
    if not target.is_file():
        raise ModelError(f"external data file '{shown}' of {where} is missing")
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where} has a negative external-data offset or length")
    size = tensor_nbytes(tensor)
    if size is None:
        raise ModelError(f"{where} has a type that cannot be stored as external data")
    need = offset + (length if length is not None else size)
    have = target.stat().st_size
    if have < need:
        raise ModelError(f"external data file '{shown}' is too short for {where} ({have} bytes, need {need})")
    return target


def check_external(proto: onnx.ModelProto, base_dir: Path) -> list[Path]:
    """Check every external-data reference of the model (see `check_external_tensor`); the files they
    name, each once."""
    files: dict[Path, None] = {}
    for where, tensor in iter_tensors(proto):
        path = check_external_tensor(where, tensor, base_dir)
        if path is not None:
            files[path] = None
    return list(files)


def check_sizes(proto: onnx.ModelProto) -> None:
    """Refuse a tensor stored in the file whose raw_data length does not match its dims and type."""
    for where, tensor in iter_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            continue
        if any(int(d) < 0 for d in tensor.dims):
            raise ModelError(f"{where} has a negative dimension {list(tensor.dims)}")
        expected = tensor_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            raise ModelError(
                f"{where} holds {len(tensor.raw_data)} bytes of raw data, but its dims {list(tensor.dims)} "
                f"and type need {expected}"
            )
