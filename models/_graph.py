"""A tiny helper for writing ONNX graphs node by node with stable, readable names.

Only ``numpy`` and ``onnx`` are used so that the fixture builders can be imported
by tests and benchmarks without any training framework installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str

PRODUCER_NAME = "onnxopt.models"


class GraphBuilder:
    """Accumulates nodes, initializers and graph inputs/outputs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._initializer_names: set[str] = set()

    def add_input(self, name: str, shape: Sequence[Dim]) -> str:
        """Declare a float32 graph input."""
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def add_output(self, name: str, shape: Sequence[Dim]) -> str:
        """Declare a float32 graph output (``name`` must be produced by a node)."""
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """Add a constant tensor; float arrays are stored as float32."""
        if name in self._initializer_names:
            raise ValueError(f"duplicate initializer {name!r}")
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self._initializer_names.add(name)
        return name

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        name: str,
        output: str | None = None,
        **attrs: object,
    ) -> str:
        """Append a single-output node and return the name of its output tensor.

        The output is called ``<name>.out`` unless ``output`` is given.
        """
        out = output if output is not None else f"{name}.out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def make_model(self, *, opset: int, doc: str = "") -> onnx.ModelProto:
        """Assemble the model with the smallest IR version that supports ``opset``."""
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            self.outputs,
            initializer=self.initializers,
        )
        opset_imports = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph,
            opset_imports=opset_imports,
            producer_name=PRODUCER_NAME,
            doc_string=doc,
        )
        model.ir_version = helper.find_min_ir_version_for(opset_imports)
        return model


def check(model: onnx.ModelProto) -> None:
    """Run the full ONNX checker (including strict shape inference)."""
    onnx.checker.check_model(model, full_check=True)
