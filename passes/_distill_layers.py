"""Layers the `distill` pass can refit, seen in row form, and their (possibly quantized) parameters.

A `Linear` is one Conv / Gemm / MatMul with a constant weight, its bias (Conv/Gemm bias input, or
the constant of the Add right after a MatMul) and the tensor the teacher is compared on (the Add's
output when there is one). Its weights are read and written as rows ``[w_j | b_j]`` (see
`_distill_math`), whatever the stored layout:

- Conv ``W[M, C/g, *k]``: row ``j`` is ``W[j].ravel()``, features are the group's im2col columns;
- Gemm: rows are ``alpha · B`` (``Bᵀ`` without transB), bias ``beta · C``;
- MatMul ``X[..., K] @ W[K, N]``: rows are ``Wᵀ``.

A `Param` is a float initializer, or a ``DequantizeLinear`` of an integer one: reading dequantizes,
writing re-quantizes with the same scale and zero point (round half to even, clipped to the type),
so a quantized layer is refit in float and stored quantized again.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.graph import constant_array, new_initializer, only_used_by, set_weight
from onnxopt.io import is_constant

from ._distill_math import conv_features
from ._lowrank import explicit_pads

__all__ = ["Param", "Linear", "linear_of", "LINEAR_OPS"]

logger = logging.getLogger(__name__)

LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Param:
    """A weight or bias: the initializer that stores it and, when quantized, its DequantizeLinear."""

    value: ir.Value
    dq: ir.Node | None = None

    @property
    def quantized(self) -> bool:
        return self.dq is not None

    def _scale_zero(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.dq is not None
        stored = np.asarray(self.value.const_value.numpy())
        scale = np.asarray(self.dq.inputs[1].const_value.numpy(), dtype=np.float64)
        zp_value = self.dq.inputs[2] if len(self.dq.inputs) > 2 else None
        zero = np.zeros_like(scale) if zp_value is None else np.asarray(zp_value.const_value.numpy(), np.float64)
        if scale.ndim == 1 and scale.size > 1:
            axis = self.dq.attributes.get_int("axis", 1) % stored.ndim
            shape = [1] * stored.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return scale, zero

    def read(self) -> np.ndarray:
        stored = np.asarray(self.value.const_value.numpy())
        if self.dq is None:
            return stored.astype(np.float64)
        scale, zero = self._scale_zero()
        return (stored.astype(np.float64) - zero) * scale

    def _encode(self, array: np.ndarray) -> np.ndarray:
        stored_dtype = self.value.const_value.dtype.numpy()
        if self.dq is None:
            return array.astype(stored_dtype)
        scale, zero = self._scale_zero()
        info = np.iinfo(stored_dtype)
        q = np.rint(array / scale) + zero
        return np.clip(q, info.min, info.max).astype(stored_dtype)

    def roundtrip(self, array: np.ndarray) -> np.ndarray:
        """The value `array` reads back as once stored (quantization error included)."""
        encoded = self._encode(array)
        if self.dq is None:
            return encoded.astype(np.float64)
        scale, zero = self._scale_zero()
        return (encoded.astype(np.float64) - zero) * scale

    def write(self, array: np.ndarray) -> None:
        set_weight(self.value, self._encode(array).reshape(self.value.const_value.shape.numpy()))


def param_of(value: ir.Value | None, user: ir.Node) -> tuple[Param | None, str | None]:
    """The parameter behind input `value` of `user`, or the reason it cannot be refit."""
    if value is None:
        return None, "missing input"
    if is_constant(value):
        if not only_used_by(value, user):
            return None, f"'{value.name}' is shared with other nodes"
        if not np.issubdtype(value.const_value.dtype.numpy(), np.floating):
            return None, f"'{value.name}' is not a float tensor"
        return Param(value), None
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear":
        return None, f"'{value.name}' is not a constant initializer"
    if not only_used_by(value, user):
        return None, f"'{value.name}' is shared with other nodes"
    stored = dq.inputs[0]
    if not is_constant(stored):
        return None, f"'{value.name}' is computed, not a constant"
    if not only_used_by(stored, dq):
        return None, f"quantized '{stored.name if stored else '?'}' is not a constant used only here"
    if any(v is not None and constant_array(v) is None for v in dq.inputs[1:]):
        return None, "quantization scale or zero point is not constant"
    if dq.attributes.get_int("block_size", 0):
        return None, "blocked quantization is not refit"
    if stored.const_value.dtype.numpy() not in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        return None, f"quantized type {stored.const_value.dtype} is not refit"
    return Param(stored, dq), None


@dataclasses.dataclass
class Linear:
    """One refittable layer: see the module docstring for its row form."""

    node: ir.Node
    weight: Param
    bias: Param | None
    bias_add: ir.Node | None
    x: ir.Value
    y: ir.Value
    groups: int = 1
    geometry: tuple[tuple[int, ...], ...] | None = None  # Conv: kernel, strides, dilations, pads

    @property
    def name(self) -> str:
        return self.node.name or self.y.name or self.node.op_type

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def channel_axis(self) -> int:
        return 1 if self.op == "Conv" else -1

    @property
    def can_have_bias(self) -> bool:
        if self.bias is not None:
            return True
        if self.op == "Gemm":
            return self.node.attributes.get_float("beta", 1.0) != 0.0
        return self.op == "Conv"

    @property
    def pointwise(self) -> bool:
        """A 1x1 stride-1 unpadded ungrouped Conv, or a Gemm/MatMul: a plain matrix on channels."""
        if self.op != "Conv":
            return True
        kernel, strides, dilations, pads = self.geometry or ((),) * 4
        return self.groups == 1 and all(k == 1 for k in kernel) and all(s == 1 for s in strides) and not any(pads)

    # ------------------------------------------------------------------ row form
    def _alpha_beta(self) -> tuple[float, float]:
        if self.op != "Gemm":
            return 1.0, 1.0
        return self.node.attributes.get_float("alpha", 1.0), self.node.attributes.get_float("beta", 1.0)

    def _weight_rows(self, stored: np.ndarray) -> np.ndarray:
        alpha, _ = self._alpha_beta()
        if self.op == "Conv":
            return stored.reshape(stored.shape[0], -1)
        if self.op == "Gemm":
            trans_b = self.node.attributes.get_int("transB", 0)
            return alpha * (stored if trans_b else stored.T)
        return stored.T

    def _weight_stored(self, rows: np.ndarray) -> np.ndarray:
        shape = tuple(self.weight.value.const_value.shape.numpy())
        alpha, _ = self._alpha_beta()
        if self.op == "Conv":
            return rows.reshape(shape)
        if self.op == "Gemm":
            trans_b = self.node.attributes.get_int("transB", 0)
            return (rows if trans_b else rows.T) / alpha
        return rows.T

    def _bias_vector(self, stored: np.ndarray, channels: int) -> np.ndarray:
        _, beta = self._alpha_beta()
        return beta * np.broadcast_to(stored.reshape(-1), (channels,)).astype(np.float64)

    def _bias_stored(self, vector: np.ndarray) -> np.ndarray:
        assert self.bias is not None
        _, beta = self._alpha_beta()
        return (vector / beta).reshape(tuple(self.bias.value.const_value.shape.numpy()))

    def rows(self) -> np.ndarray:
        """Current weights as rows ``[w_j | b_j]`` (zero bias when there is none)."""
        w = self._weight_rows(self.weight.read())
        b = np.zeros(w.shape[0]) if self.bias is None else self._bias_vector(self.bias.read(), w.shape[0])
        return np.concatenate([w, b[:, None]], axis=1)

    def stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """`rows` as they read back once stored (re-quantized weights and bias)."""
        w = self._weight_rows(self.weight.roundtrip(self._weight_stored(rows[:, :-1])))
        b = rows[:, -1]
        if self.bias is not None:
            b = self._bias_vector(self.bias.roundtrip(self._bias_stored(b)), w.shape[0])
        return np.concatenate([w, b[:, None]], axis=1)

    def quantize_weights(self, rows: np.ndarray) -> np.ndarray:
        """`rows` with only the weights passed through storage (the bias is refit after)."""
        out = rows.copy()
        out[:, :-1] = self._weight_rows(self.weight.roundtrip(self._weight_stored(rows[:, :-1])))
        return out

    def write(self, rows: np.ndarray, graph: ir.Graph) -> None:
        self.weight.write(self._weight_stored(rows[:, :-1]))
        bias = rows[:, -1]
        if self.bias is not None:
            self.bias.write(self._bias_stored(bias))
        elif self.can_have_bias and np.any(bias != 0):
            dtype = self.weight.value.const_value.dtype.numpy() if not self.weight.quantized else np.float32
            _, beta = self._alpha_beta()
            value = new_initializer(graph, f"{self.weight.value.name}.distill_bias", (bias / beta).astype(dtype))
            self.node.resize_inputs(3)
            self.node.replace_input_with(2, value)
            self.bias = Param(value)

    # ------------------------------------------------------------------ data
    def features(self, x: np.ndarray) -> np.ndarray:
        """Rows of input features [rows, groups * features] for an input batch `x`."""
        if self.op == "Conv":
            kernel, strides, dilations, pads = self.geometry  # type: ignore[misc]
            return conv_features(x, kernel, strides, dilations, pads)
        if self.op == "Gemm":
            return x.T if self.node.attributes.get_int("transA", 0) else x
        return x.reshape(-1, x.shape[-1])

    def target(self, y: np.ndarray) -> np.ndarray:
        """Teacher (or student) output as [rows, channels], rows in `features` order."""
        if self.op == "Conv":
            return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        return y.reshape(-1, y.shape[-1])


def _conv_geometry(node: ir.Node, weight_shape: tuple[int, ...], x: ir.Value) -> tuple[tuple, str | None]:
    kernel = tuple(weight_shape[2:])
    nd = len(kernel)
    strides = tuple(node.attributes.get_ints("strides", [1] * nd))
    dilations = tuple(node.attributes.get_ints("dilations", [1] * nd))
    pads = tuple(node.attributes.get_ints("pads", [0] * (2 * nd)))
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        dims = list(x.shape.dims[2:]) if x.shape is not None else []
        if len(dims) != nd or not all(isinstance(d, int) for d in dims):
            return (), f"auto_pad {auto_pad} with unknown input size"
        per_axis = [explicit_pads(auto_pad, (0, 0), size, k, st, d)
                    for size, k, st, d in zip(dims, kernel, strides, dilations)]
        pads = tuple(b for b, _ in per_axis) + tuple(e for _, e in per_axis)
    elif auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    return (kernel, strides, dilations, pads), None


def _matmul_bias(node: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add that adds a constant per-column bias right after `node`, and that constant."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) != 1 or out.is_graph_output():
        return None, None
    add = users[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out:
        return None, None
    source = other.producer()
    if not is_constant(other) and (source is None or source.op_type != "DequantizeLinear"):
        return None, None
    shape = other.shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return None, None
    dims = list(shape.dims)
    if not dims or any(d != 1 for d in dims[:-1]):
        return None, None
    return add, other


def linear_of(node: ir.Node) -> tuple[Linear | None, str | None]:
    """A `Linear` for `node` or the reason it is not refit (None, None: not a layer at all)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in LINEAR_OPS:
        if node.op_type in ("ConvTranspose", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                            "MatMulNBits"):
            return None, f"{node.op_type} is not refit (only Conv, Gemm and MatMul, float or QDQ)"
        return None, None
    x = node.inputs[0]
    if x is None or is_constant(x):
        return None, "its input is a constant"
    weight, reason = param_of(node.inputs[1] if len(node.inputs) > 1 else None, node)
    if weight is None:
        return None, f"weight: {reason}"
    shape = tuple(weight.value.const_value.shape.numpy())
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias_add = None
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return None, "MatMul weight is not 2-D"
        bias_add, bias_value = _matmul_bias(node)
    elif node.op_type == "Gemm":
        if len(shape) != 2:
            return None, "Gemm weight is not 2-D"
        if x.shape is not None and x.shape.rank() != 2:
            return None, "Gemm input is not 2-D"
    bias = None
    if bias_value is not None:
        bias, reason = param_of(bias_value, bias_add or node)
        if bias is None:
            return None, f"bias: {reason}"
    y = bias_add.outputs[0] if bias_add is not None else node.outputs[0]
    layer = Linear(node, weight, bias, bias_add, x, y)
    if bias is not None:
        trans_b = node.attributes.get_int("transB", 0)
        channels = shape[0] if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else shape[1]
        size = int(np.prod(bias.value.const_value.shape.numpy()))
        if size != channels:
            return None, "bias is not one value per output channel"
    if node.op_type == "Conv":
        layer.groups = node.attributes.get_int("group", 1)
        geometry, reason = _conv_geometry(node, shape, x)
        if reason:
            return None, reason
        layer.geometry = geometry
    return layer, None
