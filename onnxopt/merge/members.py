"""Members of a merge: loading, names, opset reconciliation, agreeing types and prefixing.

A `Member` is one model being merged, held as a private onnx_ir copy (the caller's model is never
changed; external weights stay where they are). Before members can share a graph:

- names: a member's name comes from its file name (``m0``, ``m1``... in memory) or ``names``, and
  `prefix_names` puts ``<member>.`` before every node, value and initializer name, subgraphs included;
- opsets: `reconcile_opsets` raises every default-domain opset to the largest member opset (at least
  `MIN_OPSET`) with `onnxopt.graph.upgrade_opset` and checks each converted member with the ONNX
  checker; custom domains are unioned, one domain at two versions is an error;
- types: `reconcile` gives values that must agree (shared inputs, chain links, combined outputs) one
  type and shape: equal dtypes, equal ranks, equal fixed dims, a fixed dim beating a symbolic one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt import io
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import is_default_domain, iter_graphs, opset_version, upgrade_opset

__all__ = [
    "MIN_OPSET",
    "Dims",
    "Member",
    "load_members",
    "reconcile_opsets",
    "ir_version",
    "reconcile",
    "dims_of",
    "new_value",
    "detach_io",
    "prefix_names",
    "move_into",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 13
"""The lowest default opset of a merge: Softmax, ReduceSum and Unsqueeze have one meaning from here on."""

Dims = list[int | str | None]


@dataclasses.dataclass
class Member:
    """One model being merged: its name, where it came from, and (once detached) its real inputs and outputs."""

    name: str
    source: str
    model: ir.Model
    opset_before: int | None
    inputs: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    outputs: dict[str, ir.Value] = dataclasses.field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{self.name}."


# ------------------------------------------------------------------ loading


def _source_of(model: Any) -> str:
    return str(model) if isinstance(model, str | os.PathLike) else ""


def _member_names(sources: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """`names` checked, or names derived from the file names (``m<i>`` for in-memory models), made distinct."""
    if names is not None:
        if len(names) != len(sources):
            raise UsageError(f"merge.names: {len(names)} names for {len(sources)} members")
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", n)]
        if bad or len(set(names)) != len(names):
            raise UsageError(f"merge.names: {list(names)} must be distinct identifiers (letters, digits, _ and -)")
        return list(names)
    out: list[str] = []
    for i, src in enumerate(sources):
        base = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(src).stem) if src else f"m{i}"
        if not base or not re.match(r"[A-Za-z_]", base):
            base = f"m{i}_{base}"
        name, k = base, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out.append(name)
    return out


def _private_copy(model: ir.Model) -> ir.Model:
    """A clone whose initializers have tensor objects of their own (renaming one renames a tensor)
    and read the caller's data lazily, so external weights stay where they are."""
    copy = model.clone()
    for graph in iter_graphs(copy.graph):
        for value in graph.initializers.values():
            t = value.const_value
            if t is not None:
                value.const_value = ir.LazyTensor(lambda t=t: t, t.dtype, t.shape, name=t.name)
    return copy


def load_members(models: Sequence[Any], names: Sequence[str] | None) -> list[Member]:
    """Paths, ModelProtos or onnx_ir Models as members with private copies of their graphs."""
    sources = [_source_of(m) for m in models]
    members = []
    for model, source, name in zip(models, sources, _member_names(sources, names)):
        if isinstance(model, ir.Model):
            loaded = _private_copy(model)
        elif isinstance(model, onnx.ModelProto):  # never change the caller's model
            loaded = ir.from_proto(onnx.ModelProto.FromString(model.SerializeToString()))
        else:
            loaded = io.to_ir(model)
        members.append(Member(name, source or name, loaded, opset_version(loaded, None)))
    return members


# ------------------------------------------------------------------ opsets


def _upgrade_checked(member: Member, current: int, target: int) -> None:
    """Raise the member from opset `current` to `target`; ModelError naming both when the converter or the
    checker refuses the result."""
    reason = upgrade_opset(member.model, target)
    if reason is None:
        reason = _checker_reason(member.model)
    if reason is not None:
        raise ModelError(f"member '{member.name}': cannot convert from opset {current} to {target}: {reason}")
    logger.debug("member %s converted from opset %s to %s", member.name, current, target)


def _checker_reason(model: ir.Model) -> str | None:
    """Why the ONNX checker refuses `model` (None when it passes). It reads a file: external weights
    are resolved next to the model, so a temporary copy carries them."""
    with io.temp_model_file(model) as path:
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:  # the checker raises ValidationError and friends
            return first_line(exc, 200)
    return None


def reconcile_opsets(members: list[Member]) -> dict[str, int]:
    """Raise every member to the largest default opset (at least `MIN_OPSET`); union the other domains."""
    found = [v for v in (opset_version(m.model, None) for m in members) if v is not None]
    target = max([MIN_OPSET, *found])
    for m in members:
        current = opset_version(m.model, None)
        if current is not None and current != target:
            _upgrade_checked(m, current, target)
    opsets: dict[str, int] = {"": target}
    for m in members:
        for domain, version in m.model.opset_imports.items():
            if is_default_domain(domain):
                continue
            if opsets.setdefault(domain, version) != version:
                raise ModelError(f"member '{m.name}' imports domain '{domain}' version {version}, "
                                 f"another member version {opsets[domain]}; they cannot be reconciled")
    return opsets


def ir_version(members: list[Member], opsets: dict[str, int]) -> int:
    """The largest member IR version, raised to what the merged opsets (custom domains included) need."""
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                                ignore_unknown=True)
    return max([needed, *(m.model.ir_version for m in members)])


# ------------------------------------------------------------------ types and shapes


def dims_of(value: ir.Value) -> Dims | None:
    """The value's dims (ints, symbolic names, None for unknown), or None without a shape."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape.dims]


def _type_text(typ: ir.TypeProtocol) -> str:
    return typ.dtype.name.lower() if typ.dtype is not None else str(typ)


def reconcile(what: str, values: Sequence[tuple[str, ir.Value]], *, skip_axis: int | None = None) -> tuple[
        ir.TypeProtocol | None, Dims | None]:
    """One type and shape for (member name, value) pairs that must agree: equal dtypes and ranks, fixed dims
    equal (except on `skip_axis`), a fixed dim beating a symbolic one. ModelError names both members."""
    typ, owner = None, ""
    for name, v in values:
        if v.type is None:
            continue
        if typ is None:
            typ, owner = v.type, name
        elif v.type != typ:
            raise ModelError(f"{what}: member '{owner}' has {_type_text(typ)}, "
                             f"member '{name}' has {_type_text(v.type)}")
    shape: Dims | None = None
    for name, v in values:
        dims = dims_of(v)
        if dims is None:
            continue
        if shape is None:
            shape, owner = list(dims), name
            continue
        if len(dims) != len(shape):
            raise ModelError(f"{what}: member '{owner}' has rank {len(shape)}, member '{name}' rank {len(dims)}")
        for i, d in enumerate(dims):
            if skip_axis is not None and i == skip_axis % len(dims):
                continue
            if isinstance(d, int) and isinstance(shape[i], int) and d != shape[i]:
                raise ModelError(f"{what}: dimension {i} is {shape[i]} in member '{owner}' but {d} in member '{name}'")
            if isinstance(d, int) or shape[i] is None:
                shape[i] = d
    return typ, shape


def new_value(name: str, typ: ir.TypeProtocol | None, dims: Dims | None) -> ir.Value:
    return ir.Value(name=name, type=typ, shape=None if dims is None else ir.Shape(dims))


# ------------------------------------------------------------------ prefixing and moving


def detach_io(member: Member) -> None:
    """Record the member's real inputs and outputs by name, then free them from its graph."""
    g = member.model.graph
    member.inputs = {v.name: v for v in g.inputs if v.const_value is None}
    member.outputs = {v.name: v for v in g.outputs}
    g.inputs.clear()
    g.outputs.clear()


def prefix_names(member: Member) -> None:
    """Prefix every node, value and initializer name of the member (subgraphs included)."""
    p = member.prefix
    for graph in iter_graphs(member.model.graph):
        for init in list(graph.initializers.values()):
            init.name = p + init.name
        if graph is not member.model.graph:
            for v in graph.inputs:
                if v.name and not v.is_initializer():
                    v.name = p + v.name
        for k, node in enumerate(graph):
            node.name = p + (node.name or f"{node.op_type}_{k}")
            for out in node.outputs:
                if out.name:
                    out.name = p + out.name
    for name, v in member.inputs.items():
        v.name = p + name


def move_into(member: Member, graph: ir.Graph) -> None:
    """Move the member's nodes and initializers into the merged `graph`."""
    g = member.model.graph
    nodes = list(g)
    g.remove(nodes)
    graph.extend(nodes)
    for init in list(g.initializers.values()):
        g.initializers.pop(init.name)
        graph.register_initializer(init)
