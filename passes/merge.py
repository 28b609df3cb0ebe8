"""merge: ensembles, composition and weight averaging of several ONNX models in one graph.

``onnxopt merge A.onnx B.onnx [C.onnx ...] -o OUT --combine MODE`` and `merge` in Python.

Combine modes. Parallel ensembles share the graph inputs (matched by name, renamed with an input
map) and combine each output name that several members produce; with members' outputs
``x_1 .. x_n`` of that name and normalized weights ``w_i = v_i / Σ v``:

- ``mean``      ``Sum(x_i) / n``
- ``weighted``  ``Sum(w_i · x_i)``
- ``max``       ``Max(x_i)`` elementwise
- ``softvote``  ``Sum(w_i · Softmax(x_i, axis))`` (equal weights unless given)
- ``vote``      hard voting on ``axis``: ``votes_c = #{i : argmax x_i = c}``; the winner is the
  most-voted class, ties broken by the largest ``Sum(x_i)``; the output is ``votes + 0.5 ·
  onehot(winner)``, so its argmax is the ensemble's class and its floor the vote counts
- ``concat``    ``Concat(x_i, axis)``
- ``stack``     ``Concat(Unsqueeze(x_i, 0), 0)``: a new leading member axis

An output produced by one member only passes through under its name. ``keep_members`` also
exposes each member's own outputs as ``<member>.<output>``.

``chain`` (sequential fusion) feeds each member's outputs into the next member's inputs: an
input map ``out=in`` names the pairs; without one, equal names connect, else a member with one
output feeds a member with one input. Inputs left unconnected become graph inputs; the graph
outputs are the last member's.

``soup`` (weight averaging) checks that every member has the first member's architecture node by
node (see `passes._merge_soup`) and writes the first member with every float weight replaced by
``Σ w_i W_i``: one model's cost.

Hygiene: every member's node, value and initializer names get the prefix ``<member>.`` (member
names come from the file names or ``names``); shared inputs are reconciled (dtypes must be equal,
fixed dims must agree, a fixed dim wins over a symbolic one); default-domain opsets are raised to
the largest member opset (at least 13) with onnx's version converter, and an impossible
conversion is a clear error; custom domains are unioned (a version conflict is an error);
identical initializers are stored once (content hash); dead nodes are dropped; the IR version is
the largest needed; metadata ``onnxopt.merge`` records the mode, members and weights.
All modes except ``soup`` are exact: merged outputs equal the combination of the members run
separately, to float rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import DeduplicateHashedInitializersPass, RemoveUnusedNodesPass
from onnxopt.passes._merge_soup import average_weights, pair_weights

from onnxopt import __version__, io
from onnxopt.cli import Parser, register_verb
from onnxopt.errors import ModelError, UsageError, first_line
from onnxopt.graph import all_names, new_initializer, opset_version, unique_name

__all__ = ["merge", "merge_models", "MergeReport", "COMBINE_MODES", "ENSEMBLE_MODES"]

logger = logging.getLogger(__name__)

ENSEMBLE_MODES = ("mean", "weighted", "max", "vote", "softvote", "concat", "stack")
COMBINE_MODES = (*ENSEMBLE_MODES, "chain", "soup")
WEIGHTED_MODES = ("weighted", "softvote", "soup")
FLOAT_MODES = ("mean", "weighted", "vote", "softvote")
MIN_OPSET = 13
METADATA_KEY = "onnxopt.merge"


@dataclasses.dataclass
class _Member:
    name: str
    source: str
    model: ir.Model
    opset_before: int | None
    inputs: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    outputs: dict[str, ir.Value] = dataclasses.field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{self.name}."


@dataclasses.dataclass
class MergeReport:
    """What `merge_models` did, as data."""

    combine: str
    members: list[dict[str, Any]]
    opset: int
    nodes: int
    parameters: int
    initializers_deduplicated: int = 0
    weights: list[float] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _MapEntry:
    member: int | None
    src: str
    dst: str
    text: str


# ------------------------------------------------------------------ option checks


def _check_combine(combine: str) -> None:
    if combine not in COMBINE_MODES:
        raise UsageError(f"merge.combine: unknown mode '{combine}' (allowed {', '.join(COMBINE_MODES)})")


def _normalized_weights(combine: str, weights: Sequence[float] | None, n: int) -> list[float] | None:
    """Weights divided by their sum; None when the mode takes none."""
    if weights is None:
        if combine == "weighted":
            raise UsageError("merge.weights: combine 'weighted' needs one weight per member (--weights w1,w2,...)")
        return [1.0 / n] * n if combine in ("softvote", "soup") else None
    if combine not in WEIGHTED_MODES:
        raise UsageError(f"merge.weights: combine '{combine}' takes no weights "
                         f"(allowed with {', '.join(WEIGHTED_MODES)})")
    vals = [float(w) for w in weights]
    if len(vals) != n:
        raise UsageError(f"merge.weights: {len(vals)} weights for {n} members (give one per member)")
    if not all(np.isfinite(vals)) or min(vals) < 0 or sum(vals) <= 0:
        raise UsageError(f"merge.weights: {vals} must be finite and non-negative with a positive sum")
    total = sum(vals)
    return [v / total for v in vals]


def _member_names(sources: Sequence[str], names: Sequence[str] | None) -> list[str]:
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


def _parse_map(input_map: Any, names: Sequence[str]) -> list[_MapEntry]:
    """``[MEMBER:]SRC=DST`` strings (or a {src: dst} mapping) -> entries; MEMBER is a name or index."""
    if input_map is None:
        return []
    items = [f"{k}={v}" for k, v in input_map.items()] if isinstance(input_map, Mapping) else list(input_map)
    entries = []
    for text in items:
        if not isinstance(text, str):
            raise UsageError(f"merge.input_map: {text!r} is not a string like [MEMBER:]FROM=TO")
        head, sep, dst = text.partition("=")
        member_text, colon, src = head.rpartition(":")
        if not sep or not src or not dst:
            raise UsageError(f"merge.input_map: '{text}' must read [MEMBER:]FROM=TO")
        member = None
        if colon:
            if member_text in names:
                member = list(names).index(member_text)
            elif member_text.isdigit() and int(member_text) < len(names):
                member = int(member_text)
            else:
                raise UsageError(f"merge.input_map: '{text}' names no member '{member_text}' "
                                 f"(members: {', '.join(names)} or 0..{len(names) - 1})")
        entries.append(_MapEntry(member, src, dst, text))
    return entries


# ------------------------------------------------------------------ loading, opsets


def _source_of(model: Any) -> str:
    return str(model) if isinstance(model, str | os.PathLike) else ""


def _default_opset(model: ir.Model) -> int | None:
    return opset_version(model, None)


def _try_convert(model: ir.Model, target: int) -> tuple[ir.Model | None, str]:
    """The model upgraded to opset `target` by onnx's version converter, or the reason it failed."""
    from onnx import version_converter

    try:
        proto = version_converter.convert_version(_inlined_proto(model), target)
        onnx.checker.check_model(proto)
    except Exception as exc:  # the converter raises RuntimeError and friends
        return None, first_line(exc, 200)
    return ir.from_proto(proto), ""


def _inlined_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as protobuf with external weights read in (the converter resolves paths itself)."""
    proto = ir.to_proto(model)
    dirs = {str(v.const_value.base_dir) for g in io.iter_graphs(model.graph) for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}
    for base in dirs:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, base)
    return proto


def _reconcile_opsets(members: list[_Member]) -> dict[str, int]:
    """Raise every member to the largest default opset; union the other domains."""
    found = [v for v in (_default_opset(m.model) for m in members) if v is not None]
    target = max([MIN_OPSET, *found])
    for m in members:
        current = _default_opset(m.model)
        if current is not None and current != target:
            converted, reason = _try_convert(m.model, target)
            if converted is None:
                raise ModelError(f"member '{m.name}': cannot convert from opset {current} to {target}: {reason}")
            m.model = converted
            logger.debug("member %s converted from opset %s to %s", m.name, current, target)
    opsets: dict[str, int] = {"": target}
    for m in members:
        for domain, version in m.model.opset_imports.items():
            if domain in ("", "ai.onnx"):
                continue
            if opsets.setdefault(domain, version) != version:
                raise ModelError(f"member '{m.name}' imports domain '{domain}' version {version}, "
                                 f"another member version {opsets[domain]}; they cannot be reconciled")
    return opsets


def _private_copy(model: ir.Model) -> ir.Model:
    """A clone whose initializers have tensor objects of their own (renaming one renames a tensor)
    and read the caller's data lazily, so external weights stay where they are."""
    copy = model.clone()
    for graph in io.iter_graphs(copy.graph):
        for value in graph.initializers.values():
            t = value.const_value
            if t is not None:
                value.const_value = ir.LazyTensor(lambda t=t: t, t.dtype, t.shape, name=t.name)
    return copy


def _load_members(models: Sequence[Any], names: Sequence[str] | None) -> list[_Member]:
    sources = [_source_of(m) for m in models]
    member_names = _member_names(sources, names)
    members = []
    for model, source, name in zip(models, sources, member_names):
        if isinstance(model, ir.Model):
            loaded = _private_copy(model)
        elif isinstance(model, onnx.ModelProto):  # never change the caller's model
            loaded = ir.from_proto(onnx.ModelProto.FromString(model.SerializeToString()))
        else:
            loaded = io.to_ir(model)
        members.append(_Member(name, source or name, loaded, _default_opset(loaded)))
    return members


# ------------------------------------------------------------------ shapes and types


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else d.value for d in value.shape.dims]


def _reconcile(what: str, values: Sequence[tuple[str, ir.Value]], *, skip_axis: int | None = None) -> tuple[
        ir.TypeProtocol | None, list[int | str | None] | None]:
    """One type and shape for values that must agree: equal dtypes, fixed dims equal, fixed beats symbolic."""
    typ, owner = None, ""
    for name, v in values:
        if v.type is None:
            continue
        if typ is None:
            typ, owner = v.type, name
        elif v.type != typ:
            raise ModelError(f"{what}: member '{owner}' has {_type_text(typ)}, "
                             f"member '{name}' has {_type_text(v.type)}")
    shape: list[int | str | None] | None = None
    for name, v in values:
        dims = _dims(v)
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


def _type_text(typ: ir.TypeProtocol) -> str:
    return typ.dtype.name.lower() if typ.dtype is not None else str(typ)


def _value(name: str, typ: ir.TypeProtocol | None, dims: list[int | str | None] | None) -> ir.Value:
    return ir.Value(name=name, type=typ, shape=None if dims is None else ir.Shape(dims))


# ------------------------------------------------------------------ prefixing and moving


def _detach_io(member: _Member) -> None:
    """Record the member's real inputs and outputs by name, then free them from its graph."""
    g = member.model.graph
    member.inputs = {v.name: v for v in g.inputs if v.const_value is None}
    member.outputs = {v.name: v for v in g.outputs}
    g.inputs.clear()
    g.outputs.clear()


def _prefix_names(member: _Member) -> None:
    """Prefix every node, value and initializer name of the member (subgraphs included)."""
    p = member.prefix
    for graph in io.iter_graphs(member.model.graph):
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


def _move_into(member: _Member, graph: ir.Graph) -> None:
    g = member.model.graph
    nodes = list(g)
    g.remove(nodes)
    graph.extend(nodes)
    for init in list(g.initializers.values()):
        g.initializers.pop(init.name)
        graph.register_initializer(init)


# ------------------------------------------------------------------ shared inputs


def _feeds_parallel(members: list[_Member], entries: list[_MapEntry]) -> dict[tuple[int, str], str]:
    """{(member index, member input name): shared input name} after the input map."""
    feed = {(i, name): name for i, m in enumerate(members) for name in m.inputs}
    for e in entries:
        targets = [i for i in range(len(members)) if e.member in (None, i) and e.src in members[i].inputs]
        if not targets:
            where = f"member '{members[e.member].name}'" if e.member is not None else "any member"
            raise UsageError(f"merge.input_map: '{e.text}': '{e.src}' is not an input of {where}")
        for i in targets:
            feed[(i, e.src)] = e.dst
    return feed


def _bind_inputs(members: list[_Member], feed: dict[tuple[int, str], str], graph: ir.Graph) -> None:
    """Create one graph input per shared name and let every member read it."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for key, shared in feed.items():
        groups.setdefault(shared, []).append(key)
    for shared, keys in groups.items():
        values = [(members[i].name, members[i].inputs[n]) for i, n in keys]
        typ, dims = _reconcile(f"shared input '{shared}'", values)
        value = _value(shared, typ, dims)
        graph.inputs.append(value)
        for _, member_value in values:
            member_value.replace_all_uses_with(value, replace_graph_outputs=True)


# ------------------------------------------------------------------ combining outputs


class _Builder:
    """Appends combine nodes with unique names to the merged graph."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.taken = all_names(graph)

    def node(self, op: str, inputs: Sequence[ir.Value], base: str, **attrs: Any) -> ir.Value:
        node = ir.node(op, inputs=list(inputs), attributes=attrs or None, num_outputs=1,
                       name=unique_name(self.graph, base, self.taken))
        node.outputs[0].name = unique_name(self.graph, f"{base}.out", self.taken)
        self.graph.append(node)
        return node.outputs[0]

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        return new_initializer(self.graph, base, array, taken=self.taken)

    def reduce_max(self, x: ir.Value, axis: int, base: str) -> ir.Value:
        if self.opset >= 18:
            return self.node("ReduceMax", [x, self.const(f"{base}.axes", np.array([axis], np.int64))], base, keepdims=1)
        return self.node("ReduceMax", [x], base, axes=[axis], keepdims=1)


def _scaled_sum(b: _Builder, xs: Sequence[ir.Value], weights: Sequence[float], dtype: np.dtype, base: str) -> ir.Value:
    terms = [b.node("Mul", [x, b.const(f"{base}.w{i}", np.array(w, dtype))], f"{base}.mul{i}")
             for i, (x, w) in enumerate(zip(xs, weights))]
    return b.node("Sum", terms, f"{base}.sum")


def _vote(b: _Builder, xs: Sequence[ir.Value], axis: int, dtype: np.dtype, base: str) -> ir.Value:
    depth = b.node("Gather", [b.node("Shape", [xs[0]], f"{base}.shape"),
                              b.const(f"{base}.axis", np.array([axis], np.int64))], f"{base}.depth", axis=0)
    one_hot = b.const(f"{base}.onehot_values", np.array([0, 1], dtype))
    votes = [b.node("OneHot", [b.node("ArgMax", [x], f"{base}.argmax{i}", axis=axis, keepdims=0), depth, one_hot],
                    f"{base}.onehot{i}", axis=axis) for i, x in enumerate(xs)]
    count = b.node("Sum", votes, f"{base}.votes")
    tied = b.node("Equal", [count, b.reduce_max(count, axis, f"{base}.most")], f"{base}.tied")
    scores = b.node("Sum", list(xs), f"{base}.scores")
    lowest = b.const(f"{base}.lowest", np.array(np.finfo(dtype).min, dtype))
    masked = b.node("Where", [tied, scores, lowest], f"{base}.masked")
    winner = b.node("ArgMax", [masked], f"{base}.winner", axis=axis, keepdims=0)
    bonus = b.node("OneHot", [winner, depth, b.const(f"{base}.bonus_values", np.array([0, 0.5], dtype))],
                   f"{base}.bonus", axis=axis)
    return b.node("Add", [count, bonus], f"{base}.vote")


def _combine(b: _Builder, combine: str, xs: list[ir.Value], weights: list[float] | None, axis: int,
             dtype: np.dtype, base: str) -> ir.Value:
    n = len(xs)
    if combine == "mean":
        total = b.node("Sum", xs, f"{base}.sum")
        return b.node("Div", [total, b.const(f"{base}.n", np.array(n, dtype))], f"{base}.mean")
    if combine == "weighted":
        return _scaled_sum(b, xs, weights or [], dtype, base)
    if combine == "max":
        return b.node("Max", xs, f"{base}.max")
    if combine == "softvote":
        probs = [b.node("Softmax", [x], f"{base}.softmax{i}", axis=axis) for i, x in enumerate(xs)]
        return _scaled_sum(b, probs, weights or [1.0 / n] * n, dtype, base)
    if combine == "vote":
        return _vote(b, xs, axis, dtype, base)
    if combine == "concat":
        return b.node("Concat", xs, f"{base}.concat", axis=axis)
    zero = b.const(f"{base}.axis0", np.array([0], np.int64))
    lifted = [b.node("Unsqueeze", [x, zero], f"{base}.unsqueeze{i}") for i, x in enumerate(xs)]
    return b.node("Concat", lifted, f"{base}.stack", axis=0)


def _combined_dims(combine: str, dims: list[int | str | None] | None, parts: list[list[int | str | None] | None],
                   axis: int, n: int) -> list[int | str | None] | None:
    if dims is None:
        return None
    if combine == "stack":
        return [n, *dims]
    if combine == "concat":
        sizes = [p[axis] if p is not None else None for p in parts]
        out = list(dims)
        out[axis] = sum(sizes) if all(isinstance(s, int) for s in sizes) else None  # type: ignore[arg-type]
        return out
    return dims


def _check_axis(combine: str, axis: int, name: str, dims: list[int | str | None] | None) -> None:
    if combine not in ("vote", "softvote", "concat") or dims is None:
        return
    if not -len(dims) <= axis < len(dims):
        raise UsageError(f"merge.axis: {axis} is out of range for output '{name}' of rank {len(dims)} "
                         f"(allowed {-len(dims)}..{len(dims) - 1})")


def _combine_outputs(members: list[_Member], combine: str, weights: list[float] | None, axis: int,
                     keep: bool, graph: ir.Graph, opset: int) -> None:
    order: list[str] = []
    for m in members:
        order.extend(n for n in m.outputs if n not in order)
    b = _Builder(graph, opset)
    results: list[ir.Value] = []
    for name in order:
        owners = [i for i, m in enumerate(members) if name in m.outputs]
        xs = [members[i].outputs[name] for i in owners]
        if len(owners) == 1:
            xs[0].name = name
            results.append(xs[0])
            continue
        values = [(members[i].name, members[i].outputs[name]) for i in owners]
        skip = axis if combine == "concat" else None
        typ, dims = _reconcile(f"output '{name}'", values, skip_axis=skip)
        _check_axis(combine, axis, name, dims)
        dtype = typ.dtype.numpy() if typ is not None and typ.dtype is not None else np.dtype(np.float32)
        if combine in FLOAT_MODES and not np.issubdtype(dtype, np.floating):
            raise ModelError(f"combine '{combine}' needs float outputs; '{name}' is {dtype}")
        w = None if weights is None else _renormalized(weights, owners)
        out = _combine(b, combine, xs, w, axis, dtype, f"merge.{name}")
        out.name = name
        out.type = typ
        parts = [_dims(x) for x in xs]
        shape = _combined_dims(combine, dims, parts, axis % len(dims) if dims else axis, len(xs))
        out.shape = None if shape is None else ir.Shape(shape)
        results.append(out)
    graph.outputs.extend(results)
    if keep:
        graph.outputs.extend(v for m in members for v in m.outputs.values() if v not in graph.outputs)


def _renormalized(weights: list[float], owners: list[int]) -> list[float]:
    total = sum(weights[i] for i in owners)
    if total <= 0:
        raise UsageError("merge.weights: the members producing one output all have weight 0")
    return [weights[i] / total for i in owners]


# ------------------------------------------------------------------ chain


def _chain_links(members: list[_Member], entries: list[_MapEntry]) -> list[dict[str, str]]:
    """For member k (k >= 1): {input name of k: output name of k-1}."""
    links: list[dict[str, str]] = [{} for _ in members]
    used = set()
    for k in range(1, len(members)):
        prev, cur = members[k - 1], members[k]
        for e in entries:
            if e.member not in (None, k):
                continue
            if e.src in prev.outputs and e.dst in cur.inputs:
                links[k][e.dst] = e.src
                used.add(e)
            elif e.member == k:
                raise UsageError(f"merge.input_map: '{e.text}': member '{prev.name}' has no output '{e.src}' "
                                 f"or member '{cur.name}' has no input '{e.dst}'")
        if not links[k]:
            links[k] = {n: n for n in cur.inputs if n in prev.outputs}
        if not links[k] and len(prev.outputs) == 1 and len(cur.inputs) == 1:
            links[k] = {next(iter(cur.inputs)): next(iter(prev.outputs))}
    for e in entries:
        if e not in used:
            raise UsageError(f"merge.input_map: '{e.text}' names no output '{e.src}' of one member feeding "
                             f"an input '{e.dst}' of the next")
    return links


def _wire_chain(members: list[_Member], links: list[dict[str, str]], graph: ir.Graph, keep: bool) -> None:
    feed: dict[tuple[int, str], str] = {}
    for k, m in enumerate(members):
        for name, value in m.inputs.items():
            src = links[k].get(name)
            if src is None:
                feed[(k, name)] = name
                continue
            out = members[k - 1].outputs[src]
            _reconcile(f"chain '{members[k - 1].name}.{src}' -> '{m.name}.{name}'",
                       [(members[k - 1].name, out), (m.name, value)])
            value.replace_all_uses_with(out, replace_graph_outputs=True)
    _bind_inputs(members, feed, graph)
    last = members[-1]
    for name, value in last.outputs.items():
        value.name = name
        graph.outputs.append(value)
    if keep:
        graph.outputs.extend(v for m in members[:-1] for v in m.outputs.values() if v not in graph.outputs)


# ------------------------------------------------------------------ assembly


def _ir_version(members: list[_Member], opsets: dict[str, int]) -> int:
    """The largest member IR version, raised to what the merged opsets need."""
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                                ignore_unknown=True)
    return max([needed, *(m.model.ir_version for m in members)])


def _new_model(graph: ir.Graph, members: list[_Member], opsets: dict[str, int]) -> ir.Model:
    model = ir.Model(graph, ir_version=_ir_version(members, opsets), producer_name="onnxopt",
                     producer_version=__version__, doc_string=f"merge of {', '.join(m.name for m in members)}")
    for m in members:
        for key, func in m.model.functions.items():
            if key in model.functions:
                raise ModelError(f"members define the same local function '{key[1]}' (domain '{key[0]}')")
            model.functions[key] = func
    return model


def _assemble(members: list[_Member], combine: str, weights: list[float] | None, keep: bool,
              entries: list[_MapEntry], axis: int, opsets: dict[str, int]) -> ir.Model:
    for m in members:
        _detach_io(m)
    links = _chain_links(members, entries) if combine == "chain" else None
    feed = None if combine == "chain" else _feeds_parallel(members, entries)
    for m in members:
        _prefix_names(m)
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(opsets), name="merged")
    for m in members:
        _move_into(m, graph)
    if links is not None:
        _wire_chain(members, links, graph, keep)
    else:
        _bind_inputs(members, feed or {}, graph)
        _combine_outputs(members, combine, weights, axis, keep, graph, opsets[""])
    return _new_model(graph, members, opsets)


def _soup(members: list[_Member], weights: list[float], opsets: dict[str, int]) -> tuple[ir.Model, int]:
    base = members[0]
    pairs = [pair_weights(base.model, m.model, base.name, m.name) for m in members[1:]]
    changed = average_weights(base.model, pairs, weights)
    base.model.opset_imports.clear()
    base.model.opset_imports.update(opsets)
    base.model.producer_name, base.model.producer_version = "onnxopt", __version__
    base.model.ir_version = _ir_version(members, opsets)
    return base.model, changed


def _count_initializers(model: ir.Model) -> int:
    return sum(len(g.initializers) for g in io.iter_graphs(model.graph))


def _parameters(model: ir.Model) -> int:
    return sum(int(v.const_value.size) for g in io.iter_graphs(model.graph) for v in g.initializers.values()
               if v.const_value is not None)


def _member_row(m: _Member) -> dict[str, Any]:
    return {"name": m.name, "source": m.source, "opset": m.opset_before,
            "nodes": sum(1 for _ in m.model.graph), "parameters": _parameters(m.model)}


def _check(model: ir.Model) -> None:
    """The merged model must pass the full checker and load in ONNX Runtime."""
    from onnxopt.runtime import session

    with io.temp_model_file(model) as path:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:
            raise ModelError(f"the merged model fails the ONNX checker: {first_line(exc)}") from None
        session(path)


def merge_models(
    models: Sequence[Any],
    *,
    combine: str,
    weights: Sequence[float] | None = None,
    keep_members: bool = False,
    input_map: Sequence[str] | Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    axis: int = -1,
    check: bool = True,
) -> tuple[ir.Model, MergeReport]:
    """Merge `models` (paths, ModelProtos or onnx_ir Models) into one onnx_ir Model, with a report."""
    _check_combine(combine)
    if len(models) < 2:
        raise UsageError(f"merge: give at least two models (got {len(models)})")
    norm = _normalized_weights(combine, weights, len(models))
    if keep_members and combine == "soup":
        raise UsageError("merge.keep_members: soup writes one model; there are no member outputs to keep")
    if input_map and combine == "soup":
        raise UsageError("merge.input_map: soup members must already share their inputs")
    if not isinstance(axis, int | np.integer) or isinstance(axis, bool):
        raise UsageError(f"merge.axis: {axis!r} is not a whole number")
    members = _load_members(models, names)
    entries = _parse_map(input_map, [m.name for m in members])
    rows = [_member_row(m) for m in members]
    opsets = _reconcile_opsets(members)
    notes = [f"member '{m.name}' converted from opset {m.opset_before} to {opsets['']}"
             for m in members if m.opset_before is not None and m.opset_before != opsets[""]]
    if combine == "soup":
        model, changed = _soup(members, norm or [], opsets)
        notes.append(f"{changed} weights averaged")
    else:
        model = _assemble(members, combine, norm, keep_members, entries, int(axis), opsets)
    RemoveUnusedNodesPass()(model)
    before = _count_initializers(model)
    DeduplicateHashedInitializersPass()(model)
    RemoveUnusedNodesPass()(model)
    meta = {"combine": combine, "members": [m.name for m in members], "weights": norm}
    model.metadata_props[METADATA_KEY] = json.dumps(meta)
    if check:
        _check(model)
    logger.debug("merged %d members (%s): %d nodes", len(members), combine, sum(1 for _ in model.graph))
    report = MergeReport(combine=combine, members=rows, opset=opsets[""], nodes=sum(1 for _ in model.graph),
                         parameters=_parameters(model), initializers_deduplicated=before - _count_initializers(model),
                         weights=norm, notes=notes)
    return model, report


def merge(
    models: Sequence[Any],
    *,
    combine: str,
    weights: Sequence[float] | None = None,
    keep_members: bool = False,
    input_map: Sequence[str] | Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    axis: int = -1,
    output: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
    check: bool = True,
) -> Any:
    """Merge several models into one (see the module docstring for the modes).

    Returns an ``onnx.ModelProto`` when every member was given as one, else an ``onnx_ir.Model``.
    With `output`, the model is also written there atomically (nothing is written on error).
    """
    if output is not None:
        io.check_output_path(output, None)
        for m in models:
            if isinstance(m, str | os.PathLike):
                io.check_output_path(output, m)
    model, _ = merge_models(models, combine=combine, weights=weights, keep_members=keep_members,
                            input_map=input_map, names=names, axis=axis, check=check)
    if output is not None:
        io.save(model, output, external_data=external_data)
    if models and all(isinstance(m, onnx.ModelProto) for m in models):
        return ir.to_proto(model)
    return model


# ------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxopt merge",
                description="Merge several ONNX models into one: ensembles (shared inputs, outputs combined), "
                "a chain (one model's outputs feed the next), or a soup (weights averaged).",
                epilog="example: onnxopt merge a.onnx b.onnx c.onnx -o ens.onnx --combine softvote")
    p.add_argument("models", nargs="+", help="the member models (at least two; never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the merged model")
    p.add_argument("--combine", required=True, choices=COMBINE_MODES, help="how to merge")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="one weight per member, normalized (weighted, softvote, soup)")
    p.add_argument("--keep-members", action="store_true", help="also expose each member's outputs, prefixed")
    p.add_argument("--input-map", action="append", default=[], metavar="[MEMBER:]FROM=TO",
                   help="ensembles: feed member input FROM from shared input TO; chain: feed next input TO from "
                   "output FROM (repeatable; MEMBER is a member name or index)")
    p.add_argument("--names", default=None, metavar="N1,N2,...", help="member names used as prefixes")
    p.add_argument("--axis", type=int, default=-1, help="class axis (vote, softvote) or join axis (concat)")
    p.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    p.add_argument("--no-check", action="store_true", help="skip the checker and ONNX Runtime load")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights '{text}': give comma-separated numbers, one per member") from None


def _cmd_merge(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for path in args.models:
        io.check_output_path(args.output, path)
    weights = _floats(args.weights) if args.weights is not None else None
    names = args.names.split(",") if args.names else None
    model, report = merge_models(args.models, combine=args.combine, weights=weights, keep_members=args.keep_members,
                                 input_map=args.input_map or None, names=names, axis=args.axis,
                                 check=not args.no_check)
    out = io.save(model, args.output, external_data=True if args.external_data else None)
    if args.json:
        print(json.dumps({"output": str(out), **report.to_dict()}, indent=2))
        return 0
    print(_report_text(report))
    print(f"wrote {out}")
    return 0


def _report_text(report: MergeReport) -> str:
    from onnxopt.report import table

    rows = [[m["name"], m["source"], str(m["opset"]), str(m["nodes"]), f"{m['parameters']:,}"] for m in report.members]
    rows.append([f"merged ({report.combine})", "", str(report.opset), str(report.nodes), f"{report.parameters:,}"])
    lines = [table(rows, ["member", "source", "opset", "nodes", "params"])]
    if report.weights is not None:
        lines.append("weights " + ", ".join(f"{w:.4g}" for w in report.weights))
    if report.initializers_deduplicated:
        lines.append(f"{report.initializers_deduplicated} identical initializers stored once")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


register_verb("merge", _cmd_merge)
