"""Model I/O over onnx_ir: safe loading, atomic and checked writes, temp files for ONNX Runtime.

Loading checks what a hostile or broken file can do wrong (not ONNX, truncated, raw data that does
not match its dims, external data outside the model's folder or missing, checker failure) and raises
`ModelError` with one line, before any weight is read.

Writing goes through `Staging`: every file is first written into a hidden folder (``.onnxopt-*``)
beside its target, then all of them are renamed into place together, in the order they were added
(a report before the model it describes; a model's external data before the model), and the
staging folder is removed whatever happens. A rename never writes through a symlink: a target that
is a symlink is replaced by the new file and the file it pointed to is left alone. If a rename fails
half-way, the files already moved are put back as they were. `check_targets` refuses, before any
work, a target that is the input model or one of its external-data files (same path, symlink or
hard link: resolved paths and device/inode are compared), that collides with another target, that
exists and is not a regular file (a directory, a character device such as ``/dev/null``, a FIFO), or
whose folder cannot be written. Models past protobuf's 2 GB limit, or when asked, are written with
their weights in one external data file ``<name>.data``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import sys
import tempfile
import weakref
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import sparse, tensors
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import iter_graphs
from onnxopt.tensors import iter_proto_graphs

logger = logging.getLogger(__name__)

__all__ = [
    "load",
    "save",
    "to_ir",
    "temp_model_file",
    "file_size",
    "weight_bytes",
    "check_output_path",
    "check_targets",
    "data_file",
    "source_files",
    "Staging",
    "iter_proto_graphs",
    "release_mapping",
]

PROTOBUF_LIMIT = 2_000_000_000
# Above this many weight bytes a temporary copy for ONNX Runtime keeps its weights external,
# so serialization never builds one huge protobuf message in memory.
_TEMP_EXTERNAL_BYTES = 256 * 1024 * 1024
STAGING_PREFIX = ".onnxopt-"

# The files each loaded model was read from (the model file and its external data), by model and by path.
_SOURCES: weakref.WeakKeyDictionary[ir.Model, list[Path]] = weakref.WeakKeyDictionary()
_SOURCES_BY_PATH: dict[Path, list[Path]] = {}


def _external_tensors(model: ir.Model) -> Iterator[tuple[str, ir.ExternalTensor]]:
    for graph in iter_graphs(model.graph):
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield name, value.const_value


def _attribute_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Tensors held in node attributes (Constant values and the like), in every graph and function."""
    graphs: list[Any] = list(iter_graphs(model.graph))
    for function in model.functions.values():
        graphs.append(function)
        for node in function:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    graphs.extend(iter_graphs(attr.value))
                elif attr.type == ir.AttributeType.GRAPHS:
                    for g in attr.value:
                        graphs.extend(iter_graphs(g))
    for graph in graphs:
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from attr.value


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
    # Nothing is read from outside the file before every reference and size is checked.
    tensors.check_sizes(proto)
    external_files = tensors.check_external(proto, p.parent)
    try:
        # onnx_ir keeps only dense initializers: bring sparse ones in as dense tensors.
        sparse.densify(proto, p.parent)
        model = ir.serde.deserialize_model(proto)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"'{p}' could not be read as ONNX: {first_line(exc)}") from None
    del proto
    _set_base_dir(model, p.parent)
    if check:
        try:
            onnx.checker.check_model(str(p))
        except Exception as exc:
            raise ModelError(f"'{p}' fails the ONNX checker: {first_line(exc)}") from None
    sources = [p, *external_files]
    _SOURCES[model] = sources
    _SOURCES_BY_PATH[p.resolve()] = sources
    return model


def source_files(model: ir.Model | str | os.PathLike[str]) -> list[Path]:
    """The files a model was loaded from: the model file and every external-data file it references.

    For a path that `load` has not read, the file is parsed (without its weights) to find them; a file
    that cannot be parsed yields just itself (loading it will say what is wrong).
    """
    if isinstance(model, ir.Model):
        return list(_SOURCES.get(model, []))
    p = Path(model)
    known = _SOURCES_BY_PATH.get(p.resolve())
    if known is not None:
        return list(known)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # not there or not a model: nothing more to protect than the path itself
        return [p]
    found: dict[Path, None] = {}
    for _, tensor in tensors.iter_tensors(proto):
        ref = tensors.external_location(tensor) if tensor.data_location == onnx.TensorProto.EXTERNAL else None
        if ref is not None and ref[0] and (p.parent / ref[0]).is_file():
            found[(p.parent / ref[0]).resolve()] = None
    return [p, *found]


def _set_base_dir(model: ir.Model, base_dir: Path) -> None:
    for _, tensor in _external_tensors(model):
        tensor.base_dir = str(base_dir)
    for tensor in _attribute_tensors(model):
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


def data_file(target: str | os.PathLike[str]) -> Path:
    """Where a model written to `target` keeps its external data: ``<target>.data`` beside it."""
    t = Path(target)
    return _parent(t) / f"{t.name}.data"


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """The resolved path and, when the file exists, its (device, inode): what makes two paths one file."""
    try:
        st = os.stat(path)
        inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return path.resolve(), inode


def _same_file(a: tuple[Path, tuple[int, int] | None], b: tuple[Path, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _check_target(label: str, target: Path) -> None:
    """Refuse a target that exists and is not a regular file or a symlink, or whose folder cannot be written."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise UsageError(f"{label} '{target}' cannot be written ({exc.strerror})") from None
    if mode is not None and not stat.S_ISLNK(mode) and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UsageError(f"{label} '{target}' exists and is {kind}; give a file name")
    parent = _parent(target)
    if not parent.is_dir():
        raise UsageError(f"{label} folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{label} folder '{parent}' is not writable")
    if mode is not None and stat.S_ISREG(mode) and not os.access(target, os.W_OK):
        raise UsageError(f"{label} '{target}' exists and is not writable")
    try:  # the real test: permissions bits do not bind root, and /proc or /sys refuse anyway
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    except OSError as exc:
        raise UsageError(f"{label} folder '{parent}' is not writable ({exc.strerror})") from None


def check_targets(
    targets: Mapping[str, str | os.PathLike[str]], protected: Sequence[str | os.PathLike[str]] = ()
) -> None:
    """Refuse, with one line, targets that cannot be written safely: see the module doc.

    `targets` maps a label for messages ("output", "report") to a path; `protected` are files that
    must never be replaced (the input model and its external data, see `source_files`).
    """
    guarded = [(Path(p), _identity(Path(p))) for p in protected]
    seen: list[tuple[str, Path, tuple[Path, tuple[int, int] | None]]] = []
    for label, raw in targets.items():
        target = Path(raw)
        _check_target(label, target)
        ident = _identity(target)
        for k, (path, other) in enumerate(guarded):
            if _same_file(ident, other):
                what = "the input model" if k == 0 else f"the input model's external data file '{path.name}'"
                raise UsageError(f"{label} '{target}' is {what}; choose another path")
        for other_label, other_path, other in seen:
            if _same_file(ident, other):
                raise UsageError(f"{label} '{target}' is the same file as the {other_label} '{other_path}'")
        seen.append((label, target, ident))


def check_output_path(out: str | os.PathLike[str], model_path: str | os.PathLike[str] | None) -> Path:
    """Refuse an output path (or its ``.data`` file) that would overwrite the input model or one of
    its external-data files, is not a regular file, or cannot be written (see `check_targets`)."""
    o = Path(out)
    protected = source_files(model_path) if model_path is not None else []
    check_targets({"output": o, "output's external data": data_file(o)}, protected)
    return o


def _remove_folders(folders: dict[Path, Path]) -> None:
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
    folders.clear()


class Staging:
    """Files written into hidden folders beside their targets, then renamed into place together.

    ``add_*`` write a staged copy now; `commit` renames them all, in the order they were added, and
    puts back what was there if a rename fails; `discard` (also run by `commit`, on garbage collection
    and at exit) removes the staging folders. Usable as a context manager that discards on exit.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}
        self._moves: list[tuple[Path, Path]] = []
        self._finalizer = weakref.finalize(self, _remove_folders, self._folders)

    def folder(self, target: str | os.PathLike[str]) -> Path:
        """The staging folder beside `target` (created on first use; UsageError if it cannot be)."""
        parent = _parent(Path(target))
        key = parent.resolve()
        if key not in self._folders:
            try:
                self._folders[key] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
            except OSError as exc:
                raise UsageError(f"cannot write in folder '{parent}' ({exc.strerror or exc})") from None
        return self._folders[key]

    def add_bytes(self, target: str | os.PathLike[str], data: bytes, *, first: bool = False) -> Path:
        """Stage `data` for `target` (committed before everything added so far when `first`)."""
        staged = self.folder(target) / Path(target).name
        with _writing(staged):
            staged.write_bytes(data)
        move = (staged, Path(target))
        if first:
            self._moves.insert(0, move)
        else:
            self._moves.append(move)
        return staged

    def add_model(self, model: ir.Model, target: str | os.PathLike[str], *, external: bool) -> Path:
        """Write `model` staged for `target` (with ``<target>.data`` when `external`); the staged path."""
        t = Path(target)
        staged = self.folder(t) / t.name
        with _writing(staged):
            _write(model, staged, external)
        self.adopt(staged, t)
        return staged

    def adopt(self, staged: Path, target: str | os.PathLike[str]) -> None:
        """Take a model file already written into `folder(target)` (and its ``.data`` beside it)."""
        data = data_file(staged)
        if data.exists():
            self._moves.append((data, data_file(target)))
        self._moves.append((staged, Path(target)))

    def commit(self) -> None:
        """Rename every staged file into place in order; on failure restore the targets already replaced."""
        done: list[tuple[Path, Path | None]] = []
        try:
            for k, (staged, target) in enumerate(self._moves):
                backup = self._backup(target, k)
                try:
                    os.replace(staged, target)
                except OSError as exc:
                    if backup is not None:
                        os.unlink(backup)
                    raise UsageError(f"cannot write '{target}' ({exc.strerror or exc})") from None
                done.append((target, backup))
        except BaseException:
            _roll_back(done)
            raise
        finally:
            self._moves.clear()
            self.discard()

    def _backup(self, target: Path, k: int) -> Path | None:
        """A hard link to what `target` is now, in the staging folder, so that a failed commit can put it back."""
        if not os.path.lexists(target):
            return None
        try:  # a fresh folder of its own: no staged file can have its name
            backup = Path(tempfile.mkdtemp(prefix="previous-", dir=self.folder(target))) / str(k)
            os.link(target, backup, follow_symlinks=False)
        except OSError:
            return None
        return backup

    def discard(self) -> None:
        self._finalizer()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


# Errors of the place written to (full, read-only, no permission), not of onnxopt: the user's to fix.
_PLACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in _PLACE_ERRNOS:
            raise UsageError(f"cannot write '{path.parent.parent / path.name}' ({exc.strerror})") from None
        raise


def _roll_back(done: list[tuple[Path, Path | None]]) -> None:
    for target, backup in reversed(done):
        with contextlib.suppress(OSError):
            if backup is not None:
                os.replace(backup, target)
            else:
                os.unlink(target)


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


def _drop_value_info(proto: onnx.ModelProto) -> None:
    """Intermediate shapes are our own inference's by-product: ONNX Runtime infers them again, and
    in a small quantized model they are a tenth of the file."""
    for g in iter_proto_graphs(proto.graph):
        del g.value_info[:]


def save(
    model: ir.Model, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Write `model` atomically. ``external_data=None`` chooses it only past protobuf's limit.

    Files are first written to a hidden folder beside the target and then renamed into place
    (external data first, then the model), so a failure leaves nothing behind.
    """
    target = Path(path)
    external = external_data if external_data is not None else weight_bytes(model) > PROTOBUF_LIMIT
    with Staging() as staging:
        staging.add_model(model, target, external=external)
        staging.commit()
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
