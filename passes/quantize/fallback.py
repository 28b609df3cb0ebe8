"""Mixed precision by measurement (``fallback=auto``): the fewest layers kept float that bring the outputs
within the targets.

The sensitivity of a real network is spread out (on a CTC text recognizer no single layer is worth more
than a few points of argmax agreement), so the search works on *groups* of quantized nodes, then shrinks
what it chose:

- groups by kind (depthwise convolutions, 1x1 convolutions, other convolutions, the first layers,
  Gemm/MatMul with weights, activation x activation MatMuls, Add, Mul, element-wise ops with a constant
  operand, Concat, pooling, LSTM) and by depth (the quantized nodes in graph order, cut into
  `DEPTH_SEGMENTS` contiguous segments);
- the score of a candidate is `score.Scores.shortfall` against the targets (cosine per output, argmax
  agreement of class outputs, optionally a relative L2 bound) on a few calibration feeds; screening
  (each group alone) runs on the `QUICK_FEEDS` of them where the all-int8 model agrees least.

Steps: all quantized; if short of the targets, each group alone in float (its gain); groups added in order
of gain per cost (cost: the share of the model's MACs that would run in float, plus a little per node)
until the targets hold; then each chosen group is split in halves, and a half that can be quantized again
without missing the targets is (a bisection over graph order). Every evaluation runs the same
ONNX Runtime session (`emulate.Emulator`), so the search costs model runs, not model builds; a shrinking
step only needs to know whether a set meets the targets, so its evaluation runs feed by feed (the screening
feeds first) and stops once the feeds run prove a miss (`score.PooledBound`). It stops after
`MAX_EVALUATIONS` evaluations or ``budget_s`` seconds with the best set it has.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, is_constant
from onnxopt.io import temp_model_file
from onnxopt.progress import Bar, bar, progress
from onnxopt.runtime import run, session

from .score import PooledBound, Scores, Targets, class_outputs, pooled_totals, score_outputs

__all__ = ["Decide", "Group", "FallbackResult", "Reference", "groups_of", "node_costs", "search", "DEPTH_SEGMENTS",
           "MAX_EVALUATIONS"]

logger = logging.getLogger(__name__)

DEPTH_SEGMENTS = 8
MAX_EVALUATIONS = 80
MIN_FEEDS = 2
MAX_FEEDS = 8
QUICK_FEEDS = 2
MAX_FLOAT_COST = 0.75
"""The search stops adding groups once they would keep about this share of the MACs float: an int8
model that slow is no faster than the float one."""
SPLIT_COST = 0.4
"""A kind or depth group whose float cost is above this is offered as two halves instead."""
GIVE_UP_FRACTION = 0.5
"""When the groups that fit under `MAX_FLOAT_COST` recover less than this share of the shortfall
together (each measured alone), the targets are out of reach: the search stops there."""
_NODE_COST = 0.002
MIN_SHRINK_COST = 0.01
"""Shrinking does not try to quantize again a piece of the float set that costs less than this (1 % of the
quantized MACs, or five element-wise nodes): the speed it could give back is below what timing resolves, and
on PP-OCRv4 det bisecting down to single nodes spent the search's whole budget."""

Evaluate = Callable[[frozenset[str], bool], Scores]
"""``evaluate(float_nodes, quick)``: the scores with those nodes float; `quick` on the first feeds only."""
Decide = Callable[[frozenset[str]], "Scores | None"]
"""``decide(float_nodes)``: the scores `evaluate` gives on all feeds, or None once the feeds run so far prove
that the set misses the targets (the same answer, for fewer model runs)."""


@dataclasses.dataclass(frozen=True)
class Group:
    label: str
    nodes: frozenset[str]
    cost: float


@dataclasses.dataclass
class FallbackResult:
    float_nodes: list[str]
    groups: list[str]
    scores: Scores
    scores_all_quantized: Scores
    reached: bool
    evaluations: int
    seconds: float
    stopped_early: bool = False


def _conv_kind(node: ir.Node, graph_inputs: set[int]) -> str:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    shape = w.shape if w is not None else None
    x = node.inputs[0]
    if x is not None and id(x) in graph_inputs:
        return "first layers"
    if shape is not None and len(shape) >= 3:
        group = node.attributes.get_int("group", 1)
        if group > 1 and shape[1] == 1:
            return "depthwise Conv"
        if all(d == 1 for d in list(shape)[2:]):
            return "1x1 Conv"
    return "Conv"


def _kind(node: ir.Node, graph_inputs: set[int]) -> str:
    op = node.op_type
    if op == "Conv":
        return _conv_kind(node, graph_inputs)
    if op in ("Gemm", "MatMul"):
        if op == "MatMul" and not is_constant(node.inputs[1]):
            return "MatMul of activations"
        return "Gemm/MatMul"
    if op in ("Add", "Mul"):
        if any(constant_array(v) is not None for v in node.inputs):
            return "element-wise with a constant"
        return op
    if op in ("AveragePool", "GlobalAveragePool"):
        return "pooling"
    return op


def node_costs(names: Sequence[str], macs: dict[str, int | None]) -> dict[str, float]:
    """Each quantized node's float cost: its share of their MACs, plus a little for the Q/DQ around it."""
    total = float(sum((macs.get(n) or 0) for n in names)) or 1.0
    return {n: (macs.get(n) or 0) / total + _NODE_COST for n in names}


def groups_of(graph: ir.Graph, names: Sequence[str], macs: dict[str, int | None]) -> list[Group]:
    """Kind and depth groups over the quantized nodes `names` (in graph order); cost from `macs`."""
    wanted = set(names)
    nodes = [n for n in graph if n.name in wanted]
    inputs = {id(v) for v in graph.inputs}
    each = node_costs([n.name for n in nodes], macs)

    def cost(members: list[ir.Node]) -> float:
        return sum(each[n.name] for n in members)

    by_kind: dict[str, list[ir.Node]] = {}
    for node in nodes:
        by_kind.setdefault(_kind(node, inputs), []).append(node)
    parts: list[tuple[str, list[ir.Node]]] = list(by_kind.items())
    if len(nodes) >= 2 * DEPTH_SEGMENTS:
        for k, chunk in enumerate(np.array_split(np.arange(len(nodes)), DEPTH_SEGMENTS)):
            parts.append((f"depth {k + 1}/{DEPTH_SEGMENTS}", [nodes[i] for i in chunk]))
    else:
        parts.extend((n.name, [n]) for n in nodes)
    groups = []
    while parts:  # a group too costly to keep float is offered in halves (graph order)
        label, members = parts.pop(0)
        if cost(members) > SPLIT_COST and len(members) > 1:
            half = len(members) // 2
            parts.extend([(f"{label} (first half)", members[:half]), (f"{label} (second half)", members[half:])])
            continue
        groups.append(Group(label, frozenset(n.name for n in members), cost(members)))
    unique: dict[frozenset[str], Group] = {}
    for g in groups:
        unique.setdefault(g.nodes, g)
    return list(unique.values())


def _feed_count(one: float, budget_s: float) -> int:
    """How many reference feeds a model whose first run took `one` seconds gets: all `MAX_FEEDS` up to twice
    the budget's share, fewer only for models several times slower. A count that followed the machine's load
    near the line would have two runs of one command search on different feeds and write different models."""
    if one * MAX_FEEDS <= 2 * budget_s:
        return MAX_FEEDS
    return max(MIN_FEEDS, int(budget_s // max(one, 1e-6)))


class Reference:
    """The float model's outputs on a few calibration feeds, and the scores of other outputs against them.

    Feeds: the first `MAX_FEEDS` calibration feeds, or, for a model whose run takes several times the budget's
    share, as many as fit about `budget_s` seconds of float runs (at least `MIN_FEEDS`), so that one
    evaluation of a large model stays short (`_feed_count`).
    """

    def __init__(self, float_model: ir.Model, feeds: Sequence[dict[str, np.ndarray]], *, threads: int | None,
                 budget_s: float = 1.0) -> None:
        self.threads = threads
        self.names = [o.name for o in float_model.graph.outputs]
        self.classes = class_outputs(float_model.graph)
        with temp_model_file(float_model) as path:
            sess = session(path, threads=threads)
            t0 = time.perf_counter()
            first = run(sess, feeds[0])
            one = time.perf_counter() - t0
            count = int(min(MAX_FEEDS, len(feeds), _feed_count(one, budget_s)))
            self.feeds = list(feeds[:count])
            self.outputs = [first] + [run(sess, f) for f in self.feeds[1:]]
        self._last: tuple[ir.Graph, list[list[np.ndarray]]] | None = None
        self._totals: list[tuple[float, int]] | None = None
        self.quick = list(range(min(QUICK_FEEDS, len(self.feeds))))
        """The feeds screening evaluations run on (indices; see `rank_feeds`)."""

    def compare(self, outputs: Sequence[Sequence[np.ndarray]]) -> Scores:
        """Scores of `outputs` (for the first ``len(outputs)`` reference feeds)."""
        return score_outputs(self.names, self.outputs[: len(outputs)], outputs, self.classes)

    def rank_feeds(self, outputs: Sequence[Sequence[np.ndarray]]) -> None:
        """Screen on the `QUICK_FEEDS` feeds where `outputs` (a model's, on every reference feed) agree least
        with the float model: on the first feeds an all-int8 model can be exact (a recognizer's short line),
        and a screening that sees no error ranks nothing."""
        def error(i: int) -> float:
            got = score_outputs(self.names, [self.outputs[i]], [outputs[i]], self.classes)
            return (1.0 - got.cosine) + (1.0 - got.argmax if got.argmax is not None else 0.0)

        self.quick = sorted(sorted(range(len(self.feeds)), key=error, reverse=True)[:QUICK_FEEDS])

    def quick_feeds(self) -> list[dict[str, np.ndarray]]:
        return [self.feeds[i] for i in self.quick]

    def compare_quick(self, outputs: Sequence[Sequence[np.ndarray]]) -> Scores:
        """Scores of `outputs` on the screening feeds (`quick`, in that order)."""
        return score_outputs(self.names, [self.outputs[i] for i in self.quick], outputs, self.classes)

    def decision_order(self) -> list[int]:
        """The reference feeds, the screening ones (where int8 agrees least) first: an evaluation that only has
        to tell whether a set meets the targets (`Decide`) meets a miss there soonest."""
        return self.quick + [i for i in range(len(self.feeds)) if i not in self.quick]

    def bound(self) -> PooledBound:
        """A `score.PooledBound` over the reference feeds: ``add(self.outputs[i], outputs)`` feed by feed, then
        ``scores()`` is the best the outputs on all of them could still give (the totals are computed once)."""
        if self._totals is None:
            self._totals = pooled_totals(self.names, self.classes, self.outputs)
        return PooledBound(self.names, self.classes, self._totals)

    def outputs_of(self, model: ir.Model) -> list[list[np.ndarray]]:
        """The outputs of `model` (run in ONNX Runtime) on the reference feeds (remembered for the last model)."""
        if self._last is None or self._last[0] is not model.graph:
            with temp_model_file(model) as path:
                sess = session(path, threads=self.threads)
                self._last = (model.graph, [run(sess, f) for f in self.feeds])
        return self._last[1]

    def scores(self, model: ir.Model) -> Scores:
        """Scores of `model` (run in ONNX Runtime) on the reference feeds."""
        return self.compare(self.outputs_of(model))


class _Budget:
    def __init__(self, evaluate: Evaluate, targets: Targets, budget_s: float) -> None:
        self.evaluate = evaluate
        self.targets = targets
        self.deadline = time.perf_counter() + budget_s
        self.count = 0
        self.cache: dict[frozenset[str], Scores] = {}
        self.quick_cache: dict[tuple[str, frozenset[str]], float] = {}
        self.decide: Decide | None = None
        self.missed: set[frozenset[str]] = set()
        """Sets `decide` proved to miss the targets before running every feed (no scores kept)."""
        self.bar: Bar | None = None

    def _tick(self, float_nodes: frozenset[str]) -> None:
        """One evaluation more on the bar (when there is one), with the set's size and the budget left."""
        self.count += 1
        if self.bar is not None:
            self.bar.update()
            left = max(0.0, self.deadline - time.perf_counter())
            self.bar.note(f"{len(float_nodes)} nodes float, {left:.0f}s of the budget left")

    @property
    def spent(self) -> bool:
        return self.count >= MAX_EVALUATIONS or time.perf_counter() > self.deadline

    def __call__(self, float_nodes: frozenset[str]) -> Scores:
        if float_nodes not in self.cache:
            self._tick(float_nodes)
            self.cache[float_nodes] = self.evaluate(float_nodes, False)
            logger.debug("fallback: %d float nodes -> %s", len(float_nodes), self.cache[float_nodes].describe())
        return self.cache[float_nodes]

    def short(self, float_nodes: frozenset[str]) -> float:
        return self(float_nodes).shortfall(self.targets)

    def meets(self, float_nodes: frozenset[str]) -> bool:
        """Whether the set meets the targets: with `decide`, an evaluation stops at the first feed that proves a
        miss."""
        if float_nodes in self.cache or self.decide is None:
            return self.short(float_nodes) == 0
        if float_nodes in self.missed:
            return False
        self._tick(float_nodes)
        got = self.decide(float_nodes)
        if got is None:
            self.missed.add(float_nodes)
            logger.debug("fallback: %d float nodes -> misses (stopped early)", len(float_nodes))
            return False
        self.cache[float_nodes] = got
        return got.shortfall(self.targets) == 0

    def quick(self, float_nodes: frozenset[str]) -> float:
        """The shortfall on the first feeds only (screening), cached apart from full evaluations."""
        key = ("quick", float_nodes)
        if key not in self.quick_cache:
            self._tick(float_nodes)
            self.quick_cache[key] = self.evaluate(float_nodes, True).shortfall(self.targets)
        return self.quick_cache[key]


def search(evaluate: Evaluate, groups: Sequence[Group], targets: Targets, *, order: Sequence[str],
           budget_s: float = 120.0, costs: dict[str, float] | None = None,
           decide: Decide | None = None) -> FallbackResult:
    """The fewest float nodes (by the steps of the module doc) for which `evaluate` meets `targets`.

    `order` is the graph order of the node names, used to split groups in halves; `costs` (`node_costs`) lets
    the shrinking skip pieces too cheap to be worth an evaluation; `decide` lets the shrinking stop an
    evaluation as soon as it proves a miss.
    """
    t0 = time.perf_counter()
    ev = _Budget(evaluate, targets, budget_s)
    ev.decide = decide
    empty: frozenset[str] = frozenset()
    base = ev(empty)

    def result(chosen: frozenset[str], labels: list[str], reached: bool) -> FallbackResult:
        rank = {n: i for i, n in enumerate(order)}
        return FallbackResult(sorted(chosen, key=lambda n: rank.get(n, 0)), labels, ev(chosen), base, reached,
                              ev.count, time.perf_counter() - t0, ev.spent)

    if base.shortfall(targets) == 0 or not groups:
        return result(empty, [], base.shortfall(targets) == 0)
    gains: dict[str, float] = {}
    for g in progress(list(groups), desc="fallback: group sensitivity"):
        if ev.spent:
            break
        gains[g.label] = ev.quick(empty) - ev.quick(g.nodes)
    ranked = sorted((g for g in groups if gains.get(g.label, 0.0) > 0), key=lambda g: -gains[g.label] / (g.cost + 1e-9))
    cost = {g.label: g.cost for g in groups}
    affordable, spent = 0.0, 0.0
    for g in ranked:
        if spent + g.cost <= MAX_FLOAT_COST:
            affordable, spent = affordable + gains[g.label], spent + g.cost
    if affordable < GIVE_UP_FRACTION * ev.quick(empty):
        logger.debug("fallback: the groups within the cost cap recover %.3g of a %.3g shortfall: giving up",
                     affordable, ev.quick(empty))
        return result(empty, [], False)
    group_cost = {g.nodes: g.cost for g in groups}
    current, labels = empty, []
    with bar("fallback: float set", unit=" evaluations") as b:
        ev.bar = b
        for g in ranked:
            if ev.short(current) == 0 or ev.spent or sum(cost[lb] for lb in labels) > MAX_FLOAT_COST:
                break
            current, labels = current | g.nodes, labels + [g.label]
        if ev.short(current) > 0:
            affordable_sets = [s for s in ev.cache if _cost(s, group_cost) <= MAX_FLOAT_COST]
            best = min(affordable_sets, key=lambda s: (ev.cache[s].shortfall(targets), len(s)))
            return result(best, labels if best == current else [], False)
        shrunk = _shrink(ev, current, order, costs or {})
        ev.bar = None
    return result(shrunk, labels, True)


def _cost(nodes: frozenset[str], group_cost: dict[frozenset[str], float]) -> float:
    """The float cost of a node set: the groups it is made of (a set that is not a union of groups costs 0)."""
    return sum(c for g, c in group_cost.items() if g <= nodes) if nodes else 0.0


def _shrink(ev: _Budget, current: frozenset[str], order: Sequence[str], costs: dict[str, float]) -> frozenset[str]:
    """Quantize again the halves of `current` (in graph order) that the targets do not need in float; a piece
    whose float cost is below `MIN_SHRINK_COST` stays float without an evaluation."""
    rank = {n: i for i, n in enumerate(order)}
    stack = [sorted(current, key=lambda n: rank.get(n, 0))]
    while stack and not ev.spent:
        piece = stack.pop()
        if costs and sum(costs.get(n, 0.0) for n in piece) < MIN_SHRINK_COST:
            continue
        trial = current - frozenset(piece)
        if ev.meets(trial):
            current = trial
        elif len(piece) > 1:
            half = len(piece) // 2
            stack.extend([piece[half:], piece[:half]])
    return current
