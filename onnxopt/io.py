"""Model I/O over onnx_ir: safe loading, atomic saving, temp files for ONNX Runtime.

Loading checks what a hostile or broken file can do wrong (not ONNX, truncated, external data
outside the model's folder or missing, checker failure) and raises `ModelError` with one line.
Saving writes into a temporary folder next to the target and renames into place, so a failure
never leaves half a file and never touches the input. Models past protobuf's 2 GB limit, or
when asked, are written with their weights in one external data file ``<name>.data``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import sparse
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import iter_graphs

logger = logging.getLogger(__name__)

__all__ = [
    "load",
    "save",
    "to_ir",
    "temp_model_file",
    "file_size",
    "weight_bytes",
    "check_output_path",
    "iter_proto_graphs",
    "release_mapping",
]

PROTOBUF_LIMIT = 2_000_000_000
# Above this many weight bytes a temporary copy for ONNX Runtime keeps its weights external,
# so serialization never builds one huge protobuf message in memory.
_TEMP_EXTERNAL_BYTES = 256 * 1024 * 1024


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    for graph in iter_graphs(model.graph):
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield name, value.const_value


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    base = base_dir.resolve()
    for name, tensor in _external_tensors(model):
        location = tensor.location
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise ModelError(
                f"initializer '{name}' points at external data by absolute path '{location}'; "
                "refusing to read files outside the model's folder"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelError(
                f"initializer '{name}' points at external data '{location}' outside the model's "
                "folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelError(f"external data file '{location}' of initializer '{name}' is missing")
        need = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if target.stat().st_size < need:
            raise ModelError(
                f"external data file '{location}' is too short for initializer '{name}' "
                f"({target.stat().st_size} bytes, need {need})"
            )


def load(path: str | os.PathLike[str], *, check: bool = True) -> ir.Model:
    """Load a model from a file with lazy (memory-mapped) external weights, checked."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise UsageError(f"model path '{p}' is not a file")
    if p.stat().st_size == 0:
        raise ModelError(f"'{p}' is empty, not an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"'{p}' is not a readable ONNX model ({first_line(exc)})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"'{p}' is not an ONNX model (no graph, IR version or opset)")
    try:
        # onnx_ir keeps only dense initializers: bring sparse ones in as dense tensors.
        sparse.densify(proto)
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:
        raise ModelError(f"'{p}' could not be read as ONNX: {first_line(exc)}") from None
    _set_base_dir(model, p.parent)
    _check_external_data(model, p.parent)
    if check:
        try:
            onnx.checker.check_model(str(p))
        except Exception as exc:
            raise ModelError(f"'{p}' fails the ONNX checker: {first_line(exc)}") from None
    return model


def _set_base_dir(model: ir.Model, base_dir: Path) -> None:
    for graph in iter_graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                tensor.base_dir = str(base_dir)


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, from shapes and dtypes only (no weight is read)."""
    total = 0
    for graph in iter_graphs(model.graph):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += int(value.const_value.nbytes)
    return total


def to_ir(model: Any) -> ir.Model:
    """Accept a path, an `onnx.ModelProto`, an `onnx_ir.Model` or an onnx-graphsurgeon Graph."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if type(model).__module__.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        return ir.serde.deserialize_model(gs.export_onnx(model))
    raise UsageError(
        f"cannot optimize a {type(model).__name__}: give a path, an onnx.ModelProto, "
        "an onnx_ir.Model or an onnx_graphsurgeon.Graph"
    )


def check_output_path(out: str | os.PathLike[str], model_path: str | os.PathLike[str] | None) -> Path:
    """Refuse an output path that would overwrite the input or cannot be written."""
    o = Path(out)
    if model_path is not None and o.resolve() == Path(model_path).resolve():
        raise UsageError(f"output '{o}' is the input model; choose another path")
    if o.is_dir():
        raise UsageError(f"output '{o}' is a directory; give a file name")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder '{parent}' is not writable")
    if o.exists() and not os.access(o, os.W_OK):
        raise UsageError(f"output '{o}' exists and is not writable")
    return o


def _inline_external(model: ir.Model, keep: Collection[ir.Value] = ()) -> None:
    """Bring external weights into memory so the model can be written as one file (`keep`: left as they are)."""
    kept = {id(v) for v in keep}
    for graph in iter_graphs(model.graph):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and id(value) not in kept:
                value.const_value = ir.tensor(np.array(tensor.numpy()), name=tensor.name)


def _write(model: ir.Model, path: Path, external: bool) -> None:
    if external:
        ir.save(model, path, external_data=f"{path.name}.data")
        return
    streamed = _streamed_initializers(model)
    _inline_external(model, keep=streamed)
    proto = _proto_without(model, streamed)
    _drop_value_info(proto)
    # Weights a pass asked to store sparse go to the model's sparse_initializer list.
    sparse.apply_sparse_storage(proto)
    with open(path, "wb") as fh:
        fh.write(proto.SerializeToString())
        del proto
        for value in streamed:
            _append_initializer(fh, value)


# Initializers of at least this many bytes are written one by one after the rest of a one-file model
# (`_append_initializer`), so that writing holds no second copy of every weight (``ir.to_proto`` then
# ``SerializeToString`` held two).
_STREAM_BYTES = 1 << 20
_RAW_DTYPES = frozenset({
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.INT8,
    ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32,
    ir.DataType.INT64, ir.DataType.UINT64, ir.DataType.BOOL,
})


def _streamed_initializers(model: ir.Model) -> list[ir.Value]:
    """The main graph's initializers that `_append_initializer` writes: big or external, plain numbers,
    not marked for sparse storage (those are converted in the serialized model)."""
    if sys.byteorder != "little":
        return []
    marked = set(sparse.marked_names(model))
    out = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if (isinstance(tensor, (ir.Tensor, ir.ExternalTensor)) and tensor.dtype in _RAW_DTYPES and name not in marked
                and (isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= _STREAM_BYTES)):
            out.append(value)
    return out


def _proto_without(model: ir.Model, values: list[ir.Value]) -> onnx.ModelProto:
    """``ir.to_proto(model)`` without the initializers `values` (taken out of the graph and put back)."""
    graph = model.graph
    for value in values:
        graph.initializers.pop(value.name)
    try:
        return ir.to_proto(model)
    finally:
        for value in values:
            graph.initializers.add(value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Protobuf tags (field number << 3 | length-delimited): ModelProto.graph = 7, GraphProto.initializer = 5,
# TensorProto.raw_data = 9.
_GRAPH_TAG, _INITIALIZER_TAG, _RAW_DATA_TAG = b"\x3a", b"\x2a", b"\x4a"


def _append_initializer(fh: BinaryIO, value: ir.Value) -> None:
    """Append `value` to a serialized ModelProto as one more graph initializer, its data written from memory
    (or the mapped external file) without a copy.

    Protobuf merges a message field that occurs twice and appends to repeated fields, so a serialized
    model followed by ``graph { initializer { ... } }`` reads as the model with that initializer added;
    TensorProto fields may come in any order, so the raw data goes last, straight from the array.
    """
    tensor = value.const_value
    header = onnx.TensorProto(name=value.name, data_type=tensor.dtype.value, dims=tensor.shape.numpy())
    if tensor.doc_string:
        header.doc_string = tensor.doc_string
    for key, text in tensor.metadata_props.items():
        entry = header.metadata_props.add()
        entry.key, entry.value = key, text
    array = np.ascontiguousarray(tensor.numpy())
    data = memoryview(array).cast("B") if array.size else b""
    head = header.SerializeToString() + _RAW_DATA_TAG + _varint(len(data))
    tensor_len = len(head) + len(data)
    fh.write(_GRAPH_TAG + _varint(1 + len(_varint(tensor_len)) + tensor_len) + _INITIALIZER_TAG + _varint(tensor_len))
    fh.write(head)
    fh.write(data)
    del data, array
    release_mapping(tensor)


def release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Unmap the data file of an external tensor that has been read, so the pages read leave this process's
    resident memory (onnx_ir maps the file once per tensor and keeps the mapping while the tensor lives;
    the tensor maps it again when read again). Callers drop their arrays of it first."""
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # an array still views the mapping: it is unmapped when that array goes
            logger.debug("tensor %s is still viewed; left mapped", tensor.name)


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


def _drop_value_info(proto: onnx.ModelProto) -> None:
    """Intermediate shapes are our own inference's by-product: ONNX Runtime infers them again, and
    in a small quantized model they are a tenth of the file."""
    for g in iter_proto_graphs(proto.graph):
        del g.value_info[:]


def save(
    model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Write `model` atomically. ``external_data=None`` chooses it only past protobuf's limit.

    Files are first written to a temporary folder beside the target and then renamed into
    place (external data first, then the model), so a failure leaves nothing behind.
    """
    target = Path(path)
    external = external_data if external_data is not None else weight_bytes(model) > PROTOBUF_LIMIT
    parent = target.parent if str(target.parent) else Path(".")
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=parent))
    try:
        staged = tmpdir / target.name
        _write(model, staged, external)
        data = tmpdir / f"{target.name}.data"
        if data.exists():
            os.replace(data, parent / data.name)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return target


@contextlib.contextmanager
def temp_model_file(model: ir.Model, name: str = "model.onnx") -> Iterator[Path]:
    """A path to a temporary copy of `model`, for ONNX Runtime (which must get a path)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="onnxopt-"))
    try:
        path = tmpdir / name
        has_external = any(True for _ in _external_tensors(model))
        external = has_external or weight_bytes(model) > _TEMP_EXTERNAL_BYTES
        if external:
            ir.save(model, path, external_data=f"{name}.data")
        else:
            ir.save(model, path)
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model file plus every external data file it references."""
    p = Path(path)
    total = p.stat().st_size
    if not _contains(p, b"location"):
        return total  # every external data reference has a "location" entry: this model has none
    proto = onnx.load(str(p), load_external_data=False)
    seen: set[str] = set()
    for g in iter_proto_graphs(proto.graph):
        for init in g.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                for entry in init.external_data:
                    if entry.key == "location" and entry.value not in seen:
                        seen.add(entry.value)
                        f = p.parent / entry.value
                        if f.is_file():
                            total += f.stat().st_size
    return total


def _contains(path: Path, needle: bytes, block: int = 16 << 20) -> bool:
    """Whether the file's bytes contain `needle`, read in blocks (a big model is not parsed nor held)."""
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            if needle in tail + chunk[: len(needle) - 1] or needle in chunk:
                return True
            tail = (tail + chunk[-(len(needle) - 1):])[-(len(needle) - 1):]
    return False
