"""float16 models for static and dynamic mode: computed in float32 first, their inputs and outputs kept float16.

ONNX Runtime's CPU provider has no float16 kernel for most operators and runs them in float32 between Cast
nodes it inserts itself, so a float16 model on a CPU is a float32 model with conversions around every node.
Static mode calibrates and quantizes float32 tensors; a float16 model is therefore widened first (`widen`):

- float16 initializers and tensor attributes (Constant, ConstantOfShape values) become float32 (exact);
- ``Cast(to=FLOAT16)`` becomes ``Cast(to=FLOAT)``, and ``dtype`` attributes that name float16 name float32;
- every float16 value inside the graphs is typed float32;
- a float16 graph input is read through one ``Cast(to=FLOAT)``, a float16 graph output is written by a
  ``Cast(to=FLOAT16)``, so the model's interface is the one given.

The pass then quantizes as usual; its speed check times the result against the float16 model as given, and
static mode writes that model back when int8 is not faster. Dynamic mode widens only a model small enough for
the pass to keep a copy of (to give back when nothing is quantized). Weight-only mode needs none of this:
MatMulNBits and the int8 embedding rows compute in float16 as given.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph import all_names, is_onnx_op, iter_graphs, set_dtype, unique_name

__all__ = ["is_half", "widen"]

_HALF, _FLOAT = ir.DataType.FLOAT16, ir.DataType.FLOAT


def is_half(model: ir.Model) -> bool:
    """Whether the model holds float16 tensors (weights, inputs, outputs or Casts to float16)."""
    graph = model.graph
    if any(v.dtype == _HALF for v in [*graph.inputs, *graph.outputs, *graph.initializers.values()]):
        return True
    return any(is_onnx_op(n, "Cast") and n.attributes.get_int("to", 0) == _HALF.value for n in graph.all_nodes())


def _widen_tensor(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    return ir.tensor(np.asarray(tensor.numpy(), dtype=np.float32), name=tensor.name)


def widen(model: ir.Model) -> int:
    """Make the float16 model float32 inside (see the module doc); returns how many tensors were widened."""
    main = model.graph
    half_outputs = {id(v) for v in main.outputs if v.dtype == _HALF and v not in main.inputs}
    count = 0
    for graph in iter_graphs(main):
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype == _HALF:
                value.const_value = _widen_tensor(value.const_value)
                count += 1
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == _HALF:
                    node.attributes[name] = ir.AttrTensor(name, _widen_tensor(attr.value))
                    count += 1
                elif name in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.value == _HALF.value:
                    node.attributes[name] = ir.AttrInt64(name, _FLOAT.value)
        values = [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]
        for value in values:
            if value.dtype == _HALF and not (graph is main and value in main.inputs):
                set_dtype(value, _FLOAT)
    taken = all_names(main)
    for value in [v for v in main.inputs if v.dtype == _HALF]:
        uses = list(value.uses())
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", _FLOAT.value)],
                       name=unique_name(main, f"{value.name}_to_float32", taken))
        wide = cast.outputs[0]
        wide.name, wide.shape = unique_name(main, f"{value.name}_float32", taken), value.shape
        set_dtype(wide, _FLOAT)
        for use in uses:
            use.node.replace_input_with(use.idx, wide)
        if len(main):
            main.insert_before(main.node(0), cast)
        else:
            main.append(cast)
    for i, value in enumerate(list(main.outputs)):
        if id(value) not in half_outputs:
            continue
        name = value.name
        value.name = unique_name(main, f"{name}_float32", taken)
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", _HALF.value)],
                       name=unique_name(main, f"{name}_to_float16", taken))
        narrow = cast.outputs[0]
        narrow.name, narrow.shape = name, value.shape
        set_dtype(narrow, _HALF)
        main.append(cast)
        main.outputs[i] = narrow
    return count

