"""`ChannelGraph`: the union-find over channel elements, the walk that applies the rules, and groups."""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.channel_groups.rules import RULES
from onnxopt.analysis.channel_groups.spaces import Consumer, Fixup, Group, ParamSlice, Producer, Space
from onnxopt.analysis.stats import infer_shapes, node_macs
from onnxopt.graph import is_default_domain, opset_version

__all__ = ["ChannelGraph", "build_channel_graph"]

logger = logging.getLogger(__name__)


class ChannelGraph:
    """Build once per model; `groups()` lists the coupled channel groups."""

    def __init__(self, model: ir.Model, dims: dict[str, int] | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.dims = dims or {}
        self.spaces: list[Space] = []
        self._space_of: dict[int, Space] = {}
        self.parent: list[int] = []
        self.const: list[float] = []
        self.elem_space: list[int] = []
        self.pins: dict[int, str] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.slices: list[ParamSlice] = []
        self.fixups: list[Fixup] = []
        self.mac_nodes: list[tuple[ir.Node, int, Space | None, Space | None]] = []
        self.opset = opset_version(model, 17)

    # ------------------------------------------------------------------ union-find and spaces
    def find(self, e: int) -> int:
        parent = self.parent
        while parent[e] != e:
            parent[e] = parent[parent[e]]
            e = parent[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb

    def space_of(self, value: ir.Value | None) -> Space | None:
        return None if value is None else self._space_of.get(id(value))

    def new_space(self, value: ir.Value, axis: int, size: int, consts: np.ndarray | None = None) -> Space:
        base = len(self.parent)
        space = Space(len(self.spaces), value, axis, size, base)
        self.spaces.append(space)
        self._space_of[id(value)] = space
        self.parent.extend(range(base, base + size))
        self.elem_space.extend([space.index] * size)
        if consts is None:
            self.const.extend([math.nan] * size)
        else:
            self.const.extend(float(c) for c in np.broadcast_to(consts, (size,)))
        return space

    def consts(self, space: Space) -> np.ndarray:
        return np.asarray(self.const[space.base:space.base + space.size], dtype=np.float64)

    def pin(self, space: Space | None, reason: str) -> None:
        if space is None:
            return
        for e in space.elements():
            self.pins.setdefault(e, reason)

    def pin_inputs(self, node: ir.Node, reason: str) -> None:
        for v in node.inputs:
            self.pin(self.space_of(v), reason)

    def follow(self, src: Space, value: ir.Value, axis: int, consts: np.ndarray | None = None) -> Space:
        """A space on `value` whose index i is joined to index i of `src` (pass-through)."""
        out = self.new_space(value, axis, src.size, self.consts(src) if consts is None else consts)
        for i in range(src.size):
            self.union(src.base + i, out.base + i)
        return out

    # ------------------------------------------------------------------ the walk
    def build(self) -> ChannelGraph:
        infer_shapes(self.model)
        for node in self.graph:
            rule = RULES.get(node.op_type) if is_default_domain(node.domain) else None
            if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
                rule = None
            tracked = any(self.space_of(v) is not None for v in node.inputs)
            if rule is None:
                if tracked:
                    self.pin_inputs(node, f"{node.op_type} ({node.name or 'unnamed'}) has no channel rule")
                continue
            reason = rule(self, node)
            if reason:
                logger.debug("%s: %s", node.name or node.op_type, reason)
                self.pin_inputs(node, f"{node.name or node.op_type}: {reason}")
                for out in node.outputs:
                    self.pin(self.space_of(out), f"{node.name or node.op_type}: {reason}")
        self._pin_boundaries()
        return self

    def _pin_boundaries(self) -> None:
        for space in self.spaces:
            v = space.value
            if v.is_graph_output():
                self.pin(space, f"'{v.name}' is a graph output")
            for use in v.uses():
                if use.node.graph is not self.graph:
                    self.pin(space, f"'{v.name}' is used inside a subgraph")

    # ------------------------------------------------------------------ groups
    def groups(self) -> list[Group]:
        members: dict[int, list[int]] = {}
        for e in range(len(self.parent)):
            members.setdefault(self.find(e), []).append(e)
        by_key: dict[tuple[int, ...], list[list[int]]] = {}
        for elems in members.values():
            key = tuple(sorted({self.elem_space[e] for e in elems}))
            by_key.setdefault(key, []).append(elems)
        groups = []
        for key, units in by_key.items():
            units.sort(key=lambda u: u[0])
            spaces = [self.spaces[i] for i in key]
            ids = set(key)
            pinned = {}
            for k, unit in enumerate(units):
                for e in unit:
                    if e in self.pins:
                        pinned[k] = self.pins[e]
                        break
            producers = [p for p in self.producers if p.space.index in ids]
            consumers = [c for c in self.consumers if c.space.index in ids]
            if not producers:
                for k in range(len(units)):
                    pinned.setdefault(k, "no producer with weights")
            name = (producers[0].node.name or producers[0].space.value.name) if producers else spaces[0].value.name
            groups.append(Group(name or f"group{len(groups)}", units, pinned, spaces, producers, consumers))
        groups.sort(key=lambda g: min(s.index for s in g.spaces))
        return groups

    def unit_counts(self, unit: list[int]) -> dict[int, int]:
        """Elements of `unit` per space index."""
        counts: dict[int, int] = {}
        for e in unit:
            s = self.elem_space[e]
            counts[s] = counts.get(s, 0) + 1
        return counts

    def keep_masks(self, removed: set[int]) -> dict[int, np.ndarray]:
        """Keep mask per space index, given the removed elements."""
        masks = {}
        for space in self.spaces:
            masks[space.index] = np.array([e not in removed for e in space.elements()], dtype=bool)
        return masks

    # ------------------------------------------------------------------ MAC bookkeeping
    def note_macs(self, node: ir.Node, in_space: Space | None, out_space: Space | None) -> None:
        macs = node_macs(node, self.dims)
        if macs:
            self.mac_nodes.append((node, int(macs), in_space, out_space))

    def total_macs(self) -> int:
        total = 0
        for node in self.graph:
            m = node_macs(node, self.dims)
            total += int(m or 0)
        return total


def build_channel_graph(model: ir.Model, dims: dict[str, int] | None = None) -> ChannelGraph:
    """Walk `model` (shapes inferred in place) and return its channel dependency graph."""
    return ChannelGraph(model, dims).build()
