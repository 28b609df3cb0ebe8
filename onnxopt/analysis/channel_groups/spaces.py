"""The records of a channel dependency graph: spaces, the nodes whose weights they index, and groups."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

__all__ = ["Space", "Producer", "Consumer", "ParamSlice", "Fixup", "Group"]


@dataclasses.dataclass(eq=False)
class Space:
    """One tracked axis of one value; its elements are ``base .. base + size - 1``."""

    index: int
    value: ir.Value
    axis: int
    size: int
    base: int

    def elements(self) -> range:
        return range(self.base, self.base + self.size)


@dataclasses.dataclass(eq=False)
class Producer:
    """A node whose output channels are the space: weight ``axis`` (and bias) indexed by it."""

    node: ir.Node
    space: Space
    weight_index: int
    axis: int
    bias_index: int | None


@dataclasses.dataclass(eq=False)
class Consumer:
    """A node that contracts over the space: weight ``axis`` indexed by it (kind: conv/gemm/matmul...)."""

    node: ir.Node
    space: Space
    kind: str
    weight_index: int
    axis: int


@dataclasses.dataclass(eq=False)
class ParamSlice:
    """Slice constant input ``input_index`` of ``node`` along ``axis`` with the keep mask of ``space``."""

    node: ir.Node
    input_index: int
    axis: int
    space: Space


@dataclasses.dataclass(eq=False)
class Fixup:
    """An attribute or shape constant to recompute after removal (kind: group/reshape/split/slice)."""

    node: ir.Node
    kind: str
    spaces: list[Space]
    data: dict[str, Any]


@dataclasses.dataclass(eq=False)
class Group:
    """Units (sets of elements removed together) that touch the same spaces."""

    name: str
    units: list[list[int]]
    pinned: dict[int, str]
    spaces: list[Space]
    producers: list[Producer]
    consumers: list[Consumer]

    @property
    def size(self) -> int:
        return len(self.units)

    def prunable(self) -> list[int]:
        return [u for u in range(len(self.units)) if u not in self.pinned]

    def nodes(self) -> list[ir.Node]:
        seen: dict[int, ir.Node] = {}
        for p in self.producers:
            seen.setdefault(id(p.node), p.node)
        for c in self.consumers:
            seen.setdefault(id(c.node), c.node)
        return list(seen.values())
