"""Static quantization inside If branches (a Silero-style model whose whole network sits in the branches of
an ``If`` on a sample-rate input).

ONNX Runtime cannot fetch a tensor inside a subgraph, so a branch is quantized as a model of its own:

1. the branch's free values (read inside it, or inside its nested subgraphs, and defined in the main graph)
   and the If's condition are fetched from the main graph on every calibration feed;
2. the feeds whose condition takes the branch become the calibration feeds of a standalone model whose
   graph is the branch, with one graph input per free value (free values that are constants of the main
   graph become its initializers, so a weight read from outside still looks like a weight);
3. the quantize pass runs on that model with the same options (its exact rewrites, calibration, fallback
   search on the branch outputs, speed check of the branch alone, nested If nodes the same way);
4. when it quantized anything, its graph replaces the branch: the inputs are wired back to the main
   graph's values, constant copies still read are replaced by the main graph's constants, new names
   that the main graph already uses are renamed.

A branch no calibration feed takes stays float, and the pass says so. Loop and Scan bodies are not
rewritten (their values change per iteration; one range per tensor would be the union over iterations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.context import Context
from onnxopt.data import Dataset
from onnxopt.errors import ModelError, UsageError, first_line, safe_name
from onnxopt.graph import is_onnx_op, iter_graphs
from onnxopt.registry import PassStats

__all__ = ["branch_sites", "free_values", "quantize_branches"]

logger = logging.getLogger(__name__)

_BRANCHES = ("then_branch", "else_branch")


def branch_sites(graph: ir.Graph, wanted: frozenset[str]) -> list[tuple[ir.Node, str, ir.Graph]]:
    """(If node, branch name, branch graph) of the main graph's If nodes whose branch, or a subgraph below it,
    holds a node of `wanted`."""
    sites = []
    for node in graph:
        if not is_onnx_op(node, "If"):
            continue
        for name in _BRANCHES:
            attr = node.attributes.get(name)
            if attr is None or attr.type != ir.AttributeType.GRAPH:
                continue
            if any(is_onnx_op(n, *wanted) for g in iter_graphs(attr.value) for n in g):
                sites.append((node, name, attr.value))
    return sites


def free_values(sub: ir.Graph) -> list[ir.Value]:
    """The values read inside `sub` (and its nested subgraphs) that none of them defines, in first-read order."""
    defined: set[int] = set()
    graphs = list(iter_graphs(sub))
    for g in graphs:
        defined.update(id(v) for v in g.inputs)
        defined.update(id(v) for v in g.initializers.values())
        defined.update(id(o) for n in g for o in n.outputs)
    free: dict[int, ir.Value] = {}
    for g in graphs:
        for node in g:
            for v in node.inputs:
                if v is not None and id(v) not in defined:
                    free.setdefault(id(v), v)
        for v in g.outputs:
            if id(v) not in defined:
                free.setdefault(id(v), v)
    return list(free.values())


def _standalone(model: ir.Model, sub: ir.Graph, inputs: list[ir.Value], consts: list[ir.Value],
                feed: dict[str, np.ndarray]) -> ir.Model:
    """A model whose graph is a copy of `sub`, with `inputs` as graph inputs and `consts` as initializers."""
    graph = ir.serde.serialize_graph(sub)
    del graph.input[:]
    for v in inputs:
        array = feed[v.name]
        if not isinstance(array, np.ndarray):
            raise ValueError(f"'{safe_name(v.name)}', read inside the branch, is not a tensor")
        shape = list(v.shape) if v.shape is not None else [None] * array.ndim
        dims = [d if isinstance(d, int) else (str(d) if d is not None and str(d) else None) for d in shape]
        graph.input.append(onnx.helper.make_tensor_value_info(
            v.name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims))
    for v in consts:
        graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(v.const_value.numpy()), v.name))
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, o)
                                                         for d, o in model.opset_imports.items()])
    proto.ir_version = model.ir_version
    return ir.serde.deserialize_model(proto)


def _taken_names(graph: ir.Graph, skip: ir.Graph) -> set[str]:
    """Every value name of `graph` and its subgraphs outside `skip`."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        if g is skip:
            continue
        names.update(v.name for v in g.inputs if v.name)
        names.update(g.initializers)
        names.update(o.name for n in g for o in n.outputs if o.name)
    return names


def _same_constant(a: ir.Value, b: ir.Value) -> bool:
    """Whether two constants hold the same tensor (a rewrite such as a BatchNorm fold may have changed the copy
    a branch got, keeping its name)."""
    if a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def _graft(node: ir.Node, branch: str, old: ir.Graph, new: ir.Graph, outer: dict[str, ir.Value],
           taken: set[str]) -> None:
    """Put `new` (the quantized standalone branch) in place of `old` as `node`'s `branch`."""
    original = {v.name for g in iter_graphs(old) for n in g for v in n.outputs} | set(old.initializers)
    for value in list(new.inputs):
        value.replace_all_uses_with(outer[value.name], replace_graph_outputs=True)
    new.inputs.clear()
    for name in list(new.initializers):
        value = new.initializers[name]
        if name in outer and _same_constant(value, outer[name]):  # a copy still as it was: read the original
            value.replace_all_uses_with(outer[name], replace_graph_outputs=True)
            del new.initializers[name]
    # Names the rewrite gave that the main graph already uses would shadow it.
    count = 0
    for g in iter_graphs(new):
        for value in [*g.initializers.values(), *(o for n in g for o in n.outputs)]:
            if value.name in taken and value.name not in original:
                while f"{value.name}_{branch}{count}" in taken:
                    count += 1
                old_name = value.name
                value.name = f"{old_name}_{branch}{count}"
                if old_name in g.initializers and g.initializers.get(old_name) is value:
                    del g.initializers[old_name]
                    g.initializers[value.name] = value
                taken.add(value.name)
    node.attributes[branch] = ir.AttrGraph(branch, new)
    for g in iter_graphs(old):  # the old branch's nodes no longer count as readers of the main graph's values
        for n in g:
            for i, value in enumerate(n.inputs):
                if value is not None:
                    n.replace_input_with(i, None)


def quantize_branches(make_pass: Callable[[], object], model: ir.Model, ctx: Context, stats: PassStats,
                      wanted: frozenset[str]) -> int:
    """Quantize the If branches of `model` that hold nodes of `wanted` (see the module docstring); returns the
    number of branches rewritten. `make_pass()` gives a fresh quantize pass with the run's options."""
    sites = branch_sites(model.graph, wanted)
    if not sites:
        return 0
    calib = ctx.require_calib("quantize")
    free = {id(sub): free_values(sub) for _, _, sub in sites}
    tapped = {v.name for vs in free.values() for v in vs if v.const_value is None}
    tapped.update(node.inputs[0].name for node, _, _ in sites)
    names = sorted(tapped)
    captured = list(ctx.activations(model, names, desc="calibrating (If branches)"))
    rewritten = 0
    summary: dict[str, dict] = {}
    for node, branch, sub in sites:
        label = f"If '{safe_name(node.name or node.op_type)}' {branch}"
        take = branch == "then_branch"
        chosen = [c for c in captured if bool(np.asarray(c[node.inputs[0].name]).reshape(-1)[0]) == take]
        if not chosen:
            stats.notes.append(f"{label}: no calibration feed takes this branch; left float")
            summary[f"{node.name}/{branch}"] = {"quantized": False, "feeds": 0}
            continue
        inputs = [v for v in free[id(sub)] if v.const_value is None]
        consts = [v for v in free[id(sub)] if v.const_value is not None]
        feeds = [{v.name: c[v.name] for v in inputs} for c in chosen]
        sub_ctx = Context(calib=Dataset(feeds, [None] * len(feeds), f"{calib.source} ({label})"),
                          dims=ctx.dims, tolerance=ctx.tolerance, threads=ctx.threads, sample=feeds[0])
        try:
            standalone = _standalone(model, sub, inputs, consts, feeds[0])
            with sub_ctx:
                sub_stats = make_pass().call(standalone, sub_ctx)  # type: ignore[attr-defined]
        except (ModelError, UsageError, ValueError) as exc:
            logger.debug("branch %s", label, exc_info=True)
            stats.notes.append(f"{label}: left float: {first_line(exc)}")
            summary[f"{node.name}/{branch}"] = {"quantized": False, "feeds": len(feeds), "error": first_line(exc)}
            continue
        stats.notes.extend(f"{label}: {note}" for note in sub_stats.notes)
        stats.skipped.extend({**s, "node": f"{label}: {s['node']}"} for s in sub_stats.skipped)
        entry = {"feeds": len(feeds), "quantized": bool(sub_stats.modified)}
        entry.update({k: v for k, v in sub_stats.summary.items() if k in (
            "quantized_nodes", "fallback_float_nodes", "speed_ratio", "wrote_float_model", "calibrate_chosen")})
        summary[f"{node.name}/{branch}"] = entry
        if not sub_stats.modified:
            continue
        main_opset = model.opset_imports.get("", None)
        if standalone.opset_imports.get("", main_opset) != main_opset:
            stats.notes.append(f"{label}: quantizing it needed opset {standalone.opset_imports['']} (the model has "
                               f"{main_opset}); left float")
            entry["quantized"] = False
            continue
        for domain, version in standalone.opset_imports.items():
            model.opset_imports.setdefault(domain, version)
        outer = {v.name: v for v in free[id(sub)]}
        _graft(node, branch, sub, standalone.graph, outer, _taken_names(model.graph, sub))
        rewritten += 1
        for value in consts:  # a main-graph weight only this branch read is now stored quantized inside it
            if not value.uses() and not value.is_graph_output() and model.graph.initializers.get(value.name) is value:
                del model.graph.initializers[value.name]
    stats.summary["if_branches"] = summary
    return rewritten
