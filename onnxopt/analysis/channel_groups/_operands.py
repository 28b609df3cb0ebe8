"""Operands every channel rule reads: dims and ranks of values, constant ints and float weights,
optional inputs, and the decorator for rules over a node's first (tracked) input."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array

if TYPE_CHECKING:
    from onnxopt.analysis.channel_groups.graph import ChannelGraph
    from onnxopt.analysis.channel_groups.spaces import Space

__all__ = [
    "dims_of",
    "rank_of",
    "is_static",
    "const_ints",
    "input_at",
    "on_tracked_input",
    "axes_operand",
    "const_weight",
    "axis_attribute",
]


def dims_of(value: ir.Value | None) -> list[int | ir.SymbolicDim] | None:
    if value is None or value.shape is None:
        return None
    return list(value.shape.dims)


def rank_of(value: ir.Value | None) -> int | None:
    dims = dims_of(value)
    return None if dims is None else len(dims)


def is_static(dims: list[Any]) -> bool:
    return all(isinstance(d, int) for d in dims)


def const_ints(value: ir.Value | None) -> list[int] | None:
    arr = constant_array(value)
    return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]


def input_at(node: ir.Node, index: int) -> ir.Value | None:
    """Input `index` of `node`, or None when it is absent or left empty."""
    return node.inputs[index] if len(node.inputs) > index else None


def on_tracked_input(rule: Callable[[ChannelGraph, ir.Node, Space], str | None]
                      ) -> Callable[[ChannelGraph, ir.Node], str | None]:
    """A rule over the space of the node's first input; nothing to do when that input is untracked."""

    @functools.wraps(rule)
    def wrapped(cg: ChannelGraph, node: ir.Node) -> str | None:
        x = cg.space_of(node.inputs[0])
        return None if x is None else rule(cg, node, x)

    return wrapped


def axes_operand(node: ir.Node) -> tuple[list[int] | None, str | None]:
    """Axes from input 1 (newer opsets) or the ``axes`` attribute; the reason when the input is not constant."""
    if input_at(node, 1) is not None:
        axes = const_ints(node.inputs[1])
        return axes, None if axes is not None else "axes are not constant"
    return node.attributes.get_ints("axes", None), None


def const_weight(node: ir.Node, index: int) -> np.ndarray | None:
    if len(node.inputs) <= index:
        return None
    arr = constant_array(node.inputs[index])
    if arr is None or not np.issubdtype(arr.dtype, np.floating):
        return None
    return arr


def axis_attribute(node: ir.Node, default: int) -> int | None:
    """The node's ``axis`` attribute (or `default`) made non-negative by its first input's rank;
    None when that rank is unknown."""
    rank = rank_of(node.inputs[0])
    return None if rank is None else node.attributes.get_int("axis", default) % rank
