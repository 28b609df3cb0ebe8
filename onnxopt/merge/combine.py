"""The merged graph of an ensemble or a chain: shared inputs, combine nodes, chain links.

Parallel ensembles (`ENSEMBLE_MODES`) bind each shared input name to one graph input (after the input
map) and combine every output name several members produce; an output of one member passes through
under its name. ``chain`` feeds each member's outputs into the next member's inputs. `assemble`
does either on members whose names are already reconciled (see `onnxopt.merge.members`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import __version__
from onnxopt.errors import ModelError, UsageError
from onnxopt.graph import all_names, new_initializer, unique_name
from onnxopt.merge.members import (
    Dims,
    Member,
    detach_io,
    dims_of,
    ir_version,
    move_into,
    new_value,
    prefix_names,
    reconcile,
)

__all__ = [
    "ENSEMBLE_MODES",
    "COMBINE_MODES",
    "WEIGHTED_MODES",
    "FLOAT_MODES",
    "MapEntry",
    "parse_map",
    "assemble",
]

ENSEMBLE_MODES = ("mean", "weighted", "max", "vote", "softvote", "concat", "stack")
COMBINE_MODES = (*ENSEMBLE_MODES, "chain", "soup")
WEIGHTED_MODES = ("weighted", "softvote", "soup")
FLOAT_MODES = ("mean", "weighted", "vote", "softvote")
AXIS_MODES = ("vote", "softvote", "concat")


@dataclasses.dataclass(frozen=True)
class MapEntry:
    """One input map entry ``[MEMBER:]SRC=DST``; `member` is None when it applies to every member."""

    member: int | None
    src: str
    dst: str
    text: str


def parse_map(input_map: Sequence[str] | Mapping[str, str] | None, names: Sequence[str]) -> list[MapEntry]:
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
        entries.append(MapEntry(member, src, dst, text))
    return entries


# ------------------------------------------------------------------ shared inputs


def _feeds_parallel(members: list[Member], entries: list[MapEntry]) -> dict[tuple[int, str], str]:
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


def _bind_inputs(members: list[Member], feed: dict[tuple[int, str], str], graph: ir.Graph) -> None:
    """Create one graph input per shared name and let every member read it."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for key, shared in feed.items():
        groups.setdefault(shared, []).append(key)
    for shared, keys in groups.items():
        values = [(members[i].name, members[i].inputs[n]) for i, n in keys]
        typ, dims = reconcile(f"shared input '{shared}'", values)
        value = new_value(shared, typ, dims)
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


def _combined_dims(combine: str, dims: Dims | None, parts: list[Dims | None], axis: int, n: int) -> Dims | None:
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


def _check_axis(combine: str, axis: int, name: str, dims: Dims | None) -> None:
    if combine not in AXIS_MODES or dims is None:
        return
    if not -len(dims) <= axis < len(dims):
        raise UsageError(f"merge.axis: {axis} is out of range for output '{name}' of rank {len(dims)} "
                         f"(allowed {-len(dims)}..{len(dims) - 1})")


def _renormalized(weights: list[float], owners: list[int]) -> list[float]:
    total = sum(weights[i] for i in owners)
    if total <= 0:
        raise UsageError("merge.weights: the members producing one output all have weight 0")
    return [weights[i] / total for i in owners]


def _combine_outputs(members: list[Member], combine: str, weights: list[float] | None, axis: int,
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
        typ, dims = reconcile(f"output '{name}'", values, skip_axis=skip)
        _check_axis(combine, axis, name, dims)
        dtype = typ.dtype.numpy() if typ is not None and typ.dtype is not None else np.dtype(np.float32)
        if combine in FLOAT_MODES and not np.issubdtype(dtype, np.floating):
            raise ModelError(f"combine '{combine}' needs float outputs; '{name}' is {dtype}")
        w = None if weights is None else _renormalized(weights, owners)
        out = _combine(b, combine, xs, w, axis, dtype, f"merge.{name}")
        out.name = name
        out.type = typ
        parts = [dims_of(x) for x in xs]
        shape = _combined_dims(combine, dims, parts, axis % len(dims) if dims else axis, len(xs))
        out.shape = None if shape is None else ir.Shape(shape)
        results.append(out)
    graph.outputs.extend(results)
    if keep:
        graph.outputs.extend(v for m in members for v in m.outputs.values() if v not in graph.outputs)


# ------------------------------------------------------------------ chain


def _chain_links(members: list[Member], entries: list[MapEntry]) -> list[dict[str, str]]:
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


def _wire_chain(members: list[Member], links: list[dict[str, str]], graph: ir.Graph, keep: bool) -> None:
    feed: dict[tuple[int, str], str] = {}
    for k, m in enumerate(members):
        for name, value in m.inputs.items():
            src = links[k].get(name)
            if src is None:
                feed[(k, name)] = name
                continue
            out = members[k - 1].outputs[src]
            reconcile(f"chain '{members[k - 1].name}.{src}' -> '{m.name}.{name}'",
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


def _new_model(graph: ir.Graph, members: list[Member], opsets: dict[str, int]) -> ir.Model:
    model = ir.Model(graph, ir_version=ir_version(members, opsets), producer_name="onnxopt",
                     producer_version=__version__, doc_string=f"merge of {', '.join(m.name for m in members)}")
    for m in members:
        for key, func in m.model.functions.items():
            if key in model.functions:
                raise ModelError(f"members define the same local function '{key[1]}' (domain '{key[0]}')")
            model.functions[key] = func
    return model


def assemble(members: list[Member], combine: str, weights: list[float] | None, keep: bool,
             entries: list[MapEntry], axis: int, opsets: dict[str, int]) -> ir.Model:
    """One new model holding every member's nodes, wired as an ensemble (`combine` in `ENSEMBLE_MODES`)
    or a chain; the members' graphs are emptied on the way."""
    for m in members:
        detach_io(m)
    links = _chain_links(members, entries) if combine == "chain" else None
    feed = None if combine == "chain" else _feeds_parallel(members, entries)
    for m in members:
        prefix_names(m)
    graph = ir.Graph([], [], nodes=[], opset_imports=dict(opsets), name="merged")
    for m in members:
        move_into(m, graph)
    if links is not None:
        _wire_chain(members, links, graph, keep)
    else:
        _bind_inputs(members, feed or {}, graph)
        _combine_outputs(members, combine, weights, axis, keep, graph, opsets[""])
    return _new_model(graph, members, opsets)
