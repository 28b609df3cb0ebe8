"""Which outputs carry class scores, and what validation counts top-1 agreement on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.analysis import class_outputs
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.validate import compare_models

RNG = np.random.default_rng(0)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x_shape: list,
           outs: dict[str, list]) -> ir.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outs.items()], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _embedder() -> ir.Model:
    """Token states [N, 8, 16] -> MatMul -> mean over tokens: a pooled [N, 16] embedding, not class scores."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                   helper.make_node("ReduceMean", ["h"], ["embedding"], axes=[1], keepdims=0)],
                  [_init("w", (16, 16))], ["N", 8, 16], {"embedding": ["N", 16]})


def test_class_outputs_follow_the_graph_not_the_shape() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),  # a tf2onnx dense layer: MatMul, then the bias Add
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["s"], axis=-1),
        helper.make_node("Reshape", ["s", "shape"], ["probs"]),
        helper.make_node("Sigmoid", ["mm"], ["multi_label"]),  # independent sigmoids: no argmax to agree on
        helper.make_node("Softmax", ["mm"], ["over_rows"], axis=0),  # a softmax across the batch: not classes
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["two", "mm"], ["scaled"]),  # a temperature in front: still the classes
    ]
    inits = [_init("w", (16, 10)), _init("b", (10,)), numpy_helper.from_array(np.array([-1, 10], np.int64), "shape"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    model = _model(nodes, inits, ["N", 16], {k: ["N", 10] for k in ("logits", "probs", "multi_label", "over_rows",
                                                                     "scaled")} | {"pooled": ["N", 1]})
    assert class_outputs(model.graph) == {"logits": 10, "probs": None, "scaled": 10}
    assert class_outputs(_embedder().graph) == {}


def test_validation_counts_top1_only_on_class_outputs(tmp_path: Path) -> None:
    src = tmp_path / "embedder.onnx"
    onnx.save(ir.to_proto(_embedder()), src)
    data = str(tmp_path / "tokens.npz")
    np.savez(data, x=RNG.standard_normal((32, 8, 16)).astype(np.float32))
    out_path = tmp_path / "pruned.onnx"
    res = onnxopt.optimize(src, [("prune", {"sparsity": 0.5})], data=data)
    res.save(out_path)
    [out] = res.validation.outputs
    assert out.top1 is None and out.cosine < 0.999  # changed, but no class scores to agree on
    assert not any("top-1" in w for w in res.validation.warnings())
    with pytest.raises(UsageError, match="class scores"):
        onnxopt.optimize(src, [("prune", {"sparsity": 0.5})], data=data, metric="top1", tolerance=0.1)
    # Without the graph's word (classes=None) every [N, C] float output is read as class scores, as before.
    feeds = load_data(data, input_specs(_embedder()))
    assert compare_models(src, out_path, feeds).outputs[0].top1 is not None
    assert compare_models(src, out_path, feeds, classes=set()).outputs[0].top1 is None
