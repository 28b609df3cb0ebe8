"""One linear-layer view of Conv, ConvTranspose, Gemm and MatMul (+ the constant bias Add after a MatMul).

Each of these layers computes, for every output channel ``j`` and every output position (a *row*),

    y[row, j] = features(x)[row] · rows[j] + bias[j]

with `Linear.weights` the weight as an ``[out, in]`` matrix in float64, whatever its stored layout:

==============  ==========================  =============================  ================================
op              stored weight               row ``j`` of `weights`         a row of `features` (x)
==============  ==========================  =============================  ================================
Conv            ``W[M, C/g, k...]``         ``W[j].ravel()``               the patch under one output
                                                                           position (channel, kernel...)
ConvTranspose   ``W[C, M/g, k...]``         ``W[c∈group(j), j mod M/g]``   a patch of the input with
                                            kernel flipped                 ``stride-1`` zeros between pixels
Gemm            ``B[K, N]`` (transB:        ``alpha · B[:, j]``            a row of ``A`` (transA: of Aᵀ)
                ``B[N, K]``)                (transB: ``alpha · B[j]``)
MatMul          ``W[K, N]``, ``x[..., K]``  ``W[:, j]``                    ``x`` reshaped ``[-1, K]`` (any
                                                                           batch dims)
==============  ==========================  =============================  ================================

The bias is the Conv/ConvTranspose bias input, Gemm's ``beta · C`` (a scalar C broadcast), or the
constant of the Add right after a MatMul (then `Linear.y` is that Add's output). In a grouped
convolution row ``j`` reads only the features of its group: columns ``g·F .. (g+1)·F`` of
`features` with ``g = row_groups()[j]`` and ``F`` = `in_features`; `dense_weights` is the block
form for which ``features(x) @ dense_weights().T + bias_values()`` is the layer's output.

Weights and biases are `Param`s: a float initializer, or an integer one behind a DequantizeLinear
(per tensor or per axis). Reading dequantizes; writing re-quantizes with the same scale and zero
point (round half to even, clipped to the type); `roundtrip` says what a value reads back as.

Writing back (`Linear.write`) keeps every name, creates a bias where the layer had none (for a
MatMul: an Add after it), and refuses a weight or bias that other nodes read too (the reason is
returned; nothing changes) unless ``copy_shared``, which gives this layer its own copy.

`conv_geometry` reads the geometry of a Conv/ConvTranspose once: kernel, strides, dilations,
groups, pads, and ``auto_pad`` (SAME_UPPER/SAME_LOWER/VALID), resolved to explicit pads from the
input's spatial size by `ConvGeometry.explicit_pads` (`ConvGeometry.unfold` is im2col with them).
`operand_axes` says, without reading any weight, which input of a linear op is its weight and
which axes meet (the table passes use for per-channel and N:M work).

Worked example: ``Gemm(A[8, 6], B[5, 6], C[5], transB=1, alpha=0.5, beta=2)`` is viewed with
``weights() = 0.5 · B`` [5, 6], ``bias_values() = 2 · C``, ``features(A) = A`` and ``target(Y) = Y``;
``write(graph, weights=R, bias=b)`` stores ``B = R / 0.5`` and ``C = b / 2`` under the same names.

Limits: a MatMul whose constant is its left operand or has batch dims, and blocked (or
non-integer) quantization, have no view (`operand_axes` still describes the MatMuls); the
features of a ConvTranspose with ``auto_pad`` SAME or ``output_shape`` are not unfolded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.analysis.fitting import im2col
from onnxopt.graph import (
    constant_array,
    is_constant,
    is_onnx_op,
    new_initializer,
    only_used_by,
    set_weight,
    unique_name,
)

__all__ = [
    "LINEAR_OPS",
    "INTEGER_KERNELS",
    "OperandAxes",
    "operand_axes",
    "ConvGeometry",
    "conv_geometry",
    "explicit_pads",
    "Param",
    "param_of",
    "Linear",
    "linear_of",
]

LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearConvTranspose", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearWhere", "QLinearReduceMean", "QAttention", "DynamicQuantizeLSTM",
})
"""ONNX Runtime's integer kernels (contrib ops included): a node of one of these already runs quantized."""
_QUANTIZED_TYPES = (np.int8, np.uint8, np.int16, np.uint16, np.int32)


# ====================================================================== operand axes
@dataclasses.dataclass(frozen=True)
class OperandAxes:
    """Which input of a linear op is its weight, and how the weight's axes meet the activation.

    ==============  =====================  ==========  ==============  ===========  ============
    op              weight                 activation  reduction axis  output axis  feature axis
    ==============  =====================  ==========  ==============  ===========  ============
    Conv            W[M, C/g, k...]        x[N, C, .]  1               0            1
    ConvTranspose   W[C, M/g, k...]        x[N, C, .]  0               1            1
    Gemm            B[K, N] / B[N, K]      A[M, K]     0 / 1 (transB)  1 / 0        1 (transA: 0)
    MatMul          x[..., K] @ W[.., K, N]            rank-2          rank-1       -1
    MatMul          W[.., M, K] @ x[..., K, N]         rank-1          rank-2       -2
    ==============  =====================  ==========  ==============  ===========  ============
    """

    weight: int
    """Input index of the weight."""
    activation: int
    """Input index of the activation."""
    reduction_axis: int
    """Weight axis summed against the input features (non-negative)."""
    output_axis: int
    """Weight axis that indexes output channels (non-negative; Conv groups aside)."""
    feature_axis: int
    """Axis of the activation that runs over the reduction index (may be negative)."""


def _weight_like(value: ir.Value | None) -> bool:
    """A constant, or the output of a DequantizeLinear of a constant (a stored, quantized weight)."""
    if is_constant(value):
        return True
    producer = value.producer() if value is not None else None
    return is_onnx_op(producer, "DequantizeLinear") and is_constant(producer.inputs[0])  # type: ignore[union-attr]


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _gemm_flag(node: ir.Node, name: str) -> bool:
    """Gemm's ``transA``/``transB`` (False for other ops)."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int(name, 0))


def _rank_of(value: ir.Value) -> int:
    """Rank of a `_weight_like` value: of the constant, or of the integer constant behind its DequantizeLinear."""
    if value.const_value is None:
        value = value.producer().inputs[0]  # type: ignore[union-attr,assignment]
    return len(value.const_value.shape)


def operand_axes(node: ir.Node) -> tuple[OperandAxes | None, str | None]:
    """The weight/activation roles of a Conv/ConvTranspose/Gemm/MatMul, or the reason it has none.

    (None, None) for a node that is not one of these ops.
    """
    if not is_onnx_op(node, *LINEAR_OPS):
        return None, None
    x, w = _input(node, 0), _input(node, 1)
    if node.op_type in ("Conv", "ConvTranspose"):
        if x is None or not _weight_like(w):
            return None, "weight is not a constant initializer"
        if _rank_of(w) < 3:  # type: ignore[arg-type]
            return None, "weight is not a convolution kernel of rank >= 3"
        axis = 1 if node.op_type == "Conv" else 0
        return OperandAxes(1, 0, axis, 1 - axis, 1), None
    if x is None or w is None:
        return None, "missing operand"
    x_const, w_const = _weight_like(x), _weight_like(w)
    if x_const and w_const:
        return None, "both operands are constant (run fold first)"
    if node.op_type == "Gemm":
        if not w_const:
            return None, "weight (input B) is not a constant initializer"
        if _rank_of(w) != 2:
            return None, "weight is not 2-D"
        trans_b = _gemm_flag(node, "transB")
        feature = 0 if _gemm_flag(node, "transA") else 1
        return OperandAxes(1, 0, 1 if trans_b else 0, 0 if trans_b else 1, feature), None
    if not x_const and not w_const:
        return None, "no constant operand (activation x activation)"
    rank = _rank_of(w if w_const else x)
    if rank < 2:
        return None, "weight is 1-D"
    if w_const:
        return OperandAxes(1, 0, rank - 2, rank - 1, -1), None
    return OperandAxes(0, 1, rank - 1, rank - 2, -2), None


# ====================================================================== conv geometry
def explicit_pads(
    auto_pad: str, pads: tuple[int, int], size: int, kernel: int, stride: int, dilation: int
) -> tuple[int, int]:
    """(begin, end) padding of one spatial axis of a Conv, resolving ``auto_pad`` for input `size`."""
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        span = dilation * (kernel - 1) + 1
        total = max(0, (math.ceil(size / stride) - 1) * stride + span - size)
        small = total // 2
        return (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
    if auto_pad == "VALID":
        return 0, 0
    return pads


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Kernel, strides, dilations, groups and padding of a Conv or ConvTranspose.

    ``pads`` are the declared (begin..., end...) pads; zeros when ``auto_pad`` is set, which
    `explicit_pads` resolves for a given input size.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    auto_pad: str = "NOTSET"
    groups: int = 1
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        """Number of spatial axes."""
        return len(self.kernel)

    @property
    def pointwise(self) -> bool:
        """A 1×1, stride-1, unpadded, ungrouped convolution: a plain matrix on channels."""
        return (self.groups == 1 and all(k == 1 for k in self.kernel) and all(s == 1 for s in self.strides)
                and not any(self.pads))

    def explicit_pads(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """(begin..., end...) pads of a Conv on an input of spatial size `spatial`, ``auto_pad`` resolved."""
        if self.auto_pad == "NOTSET":
            return self.pads
        n = self.rank
        per_axis = [explicit_pads(self.auto_pad, (self.pads[i], self.pads[n + i]), int(spatial[i]), self.kernel[i],
                                  self.strides[i], self.dilations[i]) for i in range(n)]
        return tuple(b for b, _ in per_axis) + tuple(e for _, e in per_axis)

    def unfold(self, x: np.ndarray) -> np.ndarray:
        """im2col of a Conv input `x` [N, C, *S] with this geometry (``auto_pad`` resolved from `x`)."""
        return im2col(x, self.kernel, self.strides, self.dilations, self.explicit_pads(x.shape[2:]))

    def attributes(self, axes: Sequence[int] | None = None) -> dict[str, Any]:
        """Conv attributes of this geometry; with `axes`, of its restriction to those spatial axes
        (kernel, stride and dilation 1 and no padding on the others; ``auto_pad`` kept: along an
        axis with kernel 1 and stride 1 SAME pads nothing)."""
        n = self.rank
        keep = [axes is None or i in axes for i in range(n)]
        out: dict[str, Any] = {
            "kernel_shape": tuple(k if p else 1 for k, p in zip(self.kernel, keep)),
            "strides": tuple(s if p else 1 for s, p in zip(self.strides, keep)),
            "dilations": tuple(d if p else 1 for d, p in zip(self.dilations, keep)),
        }
        pads = tuple(v if keep[i % n] else 0 for i, v in enumerate(self.pads))
        if self.auto_pad != "NOTSET":
            out["auto_pad"] = self.auto_pad
        elif any(pads):
            out["pads"] = pads
        if self.groups != 1:
            out["group"] = self.groups
        return out


def _ints(node: ir.Node, name: str, default: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in (node.attributes.get_ints(name, None) or default))


def conv_geometry(node: ir.Node, weight_shape: Sequence[int]) -> ConvGeometry:
    """The geometry of Conv/ConvTranspose `node` whose weight has shape `weight_shape`."""
    n = len(weight_shape) - 2
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET"
    pads = _ints(node, "pads", (0,) * (2 * n)) if auto_pad == "NOTSET" else (0,) * (2 * n)
    return ConvGeometry(
        kernel=tuple(int(k) for k in weight_shape[2:]),
        strides=_ints(node, "strides", (1,) * n),
        dilations=_ints(node, "dilations", (1,) * n),
        pads=pads,
        auto_pad=auto_pad,
        groups=node.attributes.get_int("group", 1),
        output_padding=_ints(node, "output_padding", (0,) * n) if node.op_type == "ConvTranspose" else (),
        output_shape=_ints(node, "output_shape", ()) if node.op_type == "ConvTranspose" else (),
    )


# ====================================================================== parameters
@dataclasses.dataclass(eq=False)
class Param:
    """A weight or bias: its stored initializer, the node reading it and, when quantized, the DequantizeLinear."""

    value: ir.Value
    """The stored initializer (integer when quantized)."""
    user: ir.Node
    """The node that reads the parameter (through `dq` when quantized)."""
    dq: ir.Node | None = None

    @property
    def quantized(self) -> bool:
        return self.dq is not None

    @property
    def name(self) -> str:
        return self.value.name or ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value.const_value.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def read_value(self) -> ir.Value:
        """The tensor the user reads: the initializer, or the DequantizeLinear's output."""
        return self.dq.outputs[0] if self.dq is not None else self.value

    def shared(self) -> str | None:
        """Why other nodes would see a change of this parameter, or None when only its user reads it."""
        if not only_used_by(self.read_value, self.user):
            return f"'{self.read_value.name}' is shared with other nodes"
        if self.dq is not None and not only_used_by(self.value, self.dq):
            return f"quantized '{self.name}' is not a constant used only here"
        return None

    def _scale_zero(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.dq is not None
        scale = np.asarray(self.dq.inputs[1].const_value.numpy(), dtype=np.float64)
        zp_value = _input(self.dq, 2)
        zero = np.zeros_like(scale) if zp_value is None else np.asarray(zp_value.const_value.numpy(), np.float64)
        if scale.ndim == 1 and scale.size > 1:
            ndim = len(self.shape)
            axis = self.dq.attributes.get_int("axis", 1) % ndim
            shape = [1] * ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return scale, zero

    def read(self) -> np.ndarray:
        """The value as the model computes with it (dequantized), in float64."""
        stored = np.asarray(self.value.const_value.numpy())
        if self.dq is None:
            return stored.astype(np.float64)
        scale, zero = self._scale_zero()
        return (stored.astype(np.float64) - zero) * scale

    def encode(self, array: np.ndarray) -> np.ndarray:
        """`array` in the stored type (quantized with the same scale and zero point)."""
        stored_dtype = self.value.const_value.dtype.numpy()
        if self.dq is None:
            return array.astype(stored_dtype)
        scale, zero = self._scale_zero()
        info = np.iinfo(stored_dtype)
        q = np.rint(array / scale) + zero
        return np.clip(q, info.min, info.max).astype(stored_dtype)

    def roundtrip(self, array: np.ndarray) -> np.ndarray:
        """The value `array` reads back as once stored (quantization error included), in float64."""
        encoded = self.encode(array)
        if self.dq is None:
            return encoded.astype(np.float64)
        scale, zero = self._scale_zero()
        return (encoded.astype(np.float64) - zero) * scale

    def write_blocker(self, copy_shared: bool) -> str | None:
        """Why `write` would not store a new value, or None."""
        reason = self.shared()
        if reason and (not copy_shared or self.quantized):
            return reason
        return None

    def write(self, array: np.ndarray, graph: ir.Graph, *, copy_shared: bool = False) -> None:
        """Store `array` (any shape of the same size; the stored shape is kept when sizes agree).

        A parameter other nodes read too gets a private copy when `copy_shared` (never for a
        quantized one); check `write_blocker` first.
        """
        reason = self.write_blocker(copy_shared)
        if reason:
            raise ValueError(reason)
        data = self.encode(array)
        if data.size == self.size:
            data = data.reshape(self.shape)
        if self.shared() is None:
            set_weight(self.value, data)
            return
        copy = new_initializer(graph, self.name, data, origin=self.name)
        for index, value in enumerate(self.user.inputs):
            if value is self.value:
                self.user.replace_input_with(index, copy)
        self.value = copy


def param_of(value: ir.Value | None, user: ir.Node) -> tuple[Param | None, str | None]:
    """The parameter behind input `value` of `user`, or the reason it cannot be read as one."""
    if value is None:
        return None, "missing input"
    if is_constant(value):
        if not np.issubdtype(value.const_value.dtype.numpy(), np.floating):
            return None, f"'{value.name}' is not a float tensor"
        return Param(value, user), None
    dq = value.producer()
    if not is_onnx_op(dq, "DequantizeLinear"):
        return None, f"'{value.name}' is not a constant initializer"
    assert dq is not None
    stored = dq.inputs[0]
    if not is_constant(stored):
        return None, f"'{value.name}' is computed, not a constant"
    assert stored is not None
    if any(v is not None and constant_array(v) is None for v in dq.inputs[1:]):
        return None, "quantization scale or zero point is not constant"
    if dq.attributes.get_int("block_size", 0):
        return None, "blocked quantization is not read"
    if stored.const_value.dtype.numpy() not in _QUANTIZED_TYPES:
        return None, f"quantized type {stored.const_value.dtype} is not read"
    return Param(stored, user, dq), None


# ====================================================================== the layer view
@dataclasses.dataclass(eq=False)
class Linear:
    """A Conv/ConvTranspose/Gemm/MatMul with a readable weight, in row form (see the module docstring)."""

    node: ir.Node
    weight: Param
    x: ir.Value
    """The activation input."""
    y: ir.Value
    """The output with the bias added: the node's output, or the bias Add's after a MatMul."""
    bias: Param | None = None
    bias_add: ir.Node | None = None
    """The Add that carries a MatMul's bias."""
    bias_reason: str | None = None
    """Why a bias input the node has is not viewed as `bias` (computed, not per output channel...)."""
    geometry: ConvGeometry | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def name(self) -> str:
        return self.node.name or self.y.name or self.node.op_type

    @property
    def groups(self) -> int:
        return self.geometry.groups if self.geometry is not None else 1

    @property
    def trans_a(self) -> bool:
        return _gemm_flag(self.node, "transA")

    @property
    def trans_b(self) -> bool:
        return _gemm_flag(self.node, "transB")

    @property
    def alpha(self) -> float:
        return self.node.attributes.get_float("alpha", 1.0) if self.op == "Gemm" else 1.0

    @property
    def beta(self) -> float:
        return self.node.attributes.get_float("beta", 1.0) if self.op == "Gemm" else 1.0

    @property
    def out_channels(self) -> int:
        shape = self.weight.shape
        if self.op == "Conv":
            return shape[0]
        if self.op == "ConvTranspose":
            return shape[1] * self.groups
        return shape[0] if self.trans_b else shape[1]

    @property
    def in_features(self) -> int:
        """Columns of `weights`: input features per group (channels × kernel for a convolution)."""
        shape = self.weight.shape
        if self.op == "Conv":
            return math.prod(shape[1:])
        if self.op == "ConvTranspose":
            return shape[0] // self.groups * math.prod(shape[2:])
        return shape[1] if self.trans_b else shape[0]

    @property
    def channel_axis(self) -> int:
        """Axis of `y` that indexes output channels."""
        return 1 if self.op in ("Conv", "ConvTranspose") else -1

    # ------------------------------------------------------------------ row form
    def weights_from_stored(self, stored: np.ndarray) -> np.ndarray:
        """A weight in the stored layout (float) as rows [out, in]."""
        if self.op == "Conv":
            return stored.reshape(stored.shape[0], -1)
        if self.op == "ConvTranspose":
            g = self.groups
            c, m_g, *kernel = stored.shape
            per_group = stored.reshape(g, c // g, m_g, *kernel).swapaxes(1, 2)  # [g, M/g, C/g, k...]
            flipped = np.flip(per_group, axis=tuple(range(3, 3 + len(kernel))))
            return flipped.reshape(g * m_g, -1)
        if self.op == "Gemm":
            return self.alpha * (stored if self.trans_b else stored.T)
        return stored.T

    def stored_from_weights(self, rows: np.ndarray) -> np.ndarray:
        """Rows [out, in] in the stored layout (float; not yet quantized)."""
        shape = self.weight.shape
        if self.op == "Conv":
            return rows.reshape(shape)
        if self.op == "ConvTranspose":
            g = self.groups
            c, m_g, *kernel = shape
            per_group = rows.reshape(g, m_g, c // g, *kernel)
            unflipped = np.flip(per_group, axis=tuple(range(3, 3 + len(kernel))))
            return unflipped.swapaxes(1, 2).reshape(shape)
        if self.op == "Gemm":
            return (rows if self.trans_b else rows.T) / self.alpha
        return rows.T

    def weights(self) -> np.ndarray:
        """The weight as rows [out, in] (dequantized, Gemm's alpha applied), float64."""
        return self.weights_from_stored(self.weight.read())

    def bias_values(self) -> np.ndarray:
        """The bias per output channel (Gemm's beta applied; zeros when there is none), float64."""
        channels = self.out_channels
        if self.bias is None:
            return np.zeros(channels)
        return self.beta * np.broadcast_to(self.bias.read().reshape(-1), (channels,)).astype(np.float64)

    def row_groups(self) -> np.ndarray:
        """The group each row (output channel) belongs to."""
        channels = self.out_channels
        return np.arange(channels) // max(channels // self.groups, 1)

    def dense_weights(self) -> np.ndarray:
        """`weights` over all groups' features [out, groups · in] (zero outside a row's group)."""
        rows, f = self.weights(), self.in_features
        if self.groups == 1:
            return rows
        dense = np.zeros((rows.shape[0], self.groups * f))
        for j, g in enumerate(self.row_groups()):
            dense[j, g * f : (g + 1) * f] = rows[j]
        return dense

    def roundtrip_weights(self, rows: np.ndarray) -> np.ndarray:
        """`rows` as they read back once stored (re-quantized when the weight is quantized)."""
        return self.weights_from_stored(self.weight.roundtrip(self.stored_from_weights(rows)))

    def roundtrip_bias(self, vector: np.ndarray) -> np.ndarray:
        """A bias vector as it reads back once stored (unchanged when the layer has no bias yet)."""
        if self.bias is None:
            return vector
        beta = self.beta if self.beta != 0 else 1.0
        return beta * np.broadcast_to(self.bias.roundtrip(vector / beta).reshape(-1), vector.shape)

    # ------------------------------------------------------------------ data
    def features(self, x: np.ndarray) -> np.ndarray:
        """Input features [rows, groups · in] of an input batch `x`, rows in `target` order."""
        if self.op == "Conv":
            assert self.geometry is not None
            return self.geometry.unfold(x)
        if self.op == "ConvTranspose":
            return self._transposed_features(x)
        if self.op == "Gemm":
            return x.T if self.trans_a else x
        return x.reshape(-1, x.shape[-1])

    def _transposed_features(self, x: np.ndarray) -> np.ndarray:
        """A ConvTranspose is a Conv of the input with ``stride - 1`` zeros inserted between pixels."""
        geo = self.geometry
        assert geo is not None
        if geo.auto_pad not in ("NOTSET", "VALID") or geo.output_shape:
            raise ValueError("ConvTranspose with auto_pad SAME or output_shape is not unfolded")
        n = geo.rank
        spread = np.zeros(x.shape[:2] + tuple((s - 1) * st + 1 for s, st in zip(x.shape[2:], geo.strides)), x.dtype)
        spread[(slice(None), slice(None), *(slice(None, None, st) for st in geo.strides))] = x
        reach = [d * (k - 1) for k, d in zip(geo.kernel, geo.dilations)]
        begin = [reach[i] - geo.pads[i] for i in range(n)]
        end = [reach[i] - geo.pads[n + i] + geo.output_padding[i] for i in range(n)]
        return im2col(spread, geo.kernel, None, geo.dilations, begin + end)

    def target(self, y: np.ndarray) -> np.ndarray:
        """An output batch `y` as [rows, out], rows in `features` order."""
        if self.channel_axis == 1:
            return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        return y.reshape(-1, y.shape[-1])

    # ------------------------------------------------------------------ write back
    def write_blocker(self, *, weights: bool = True, bias: bool = False, copy_shared: bool = False) -> str | None:
        """Why `write` would decline to store new weights (and/or bias), or None."""
        if weights:
            reason = self.weight.write_blocker(copy_shared)
            if reason:
                return f"weight: {reason}"
        if bias:
            if self.bias_reason:
                return f"bias: {self.bias_reason}"
            if self.bias is not None:
                reason = self.bias.write_blocker(copy_shared)
                if reason:
                    return f"bias: {reason}"
        return None

    def write(self, graph: ir.Graph, *, weights: np.ndarray | None = None, bias: np.ndarray | None = None,
              copy_shared: bool = False) -> str | None:
        """Store new rows [out, in] and/or a new bias [out]; None when done, else why nothing changed.

        Names are kept. A layer without a bias gets one (`{node}.bias`; after a MatMul, in a new Add).
        A Gemm keeps alpha and beta (the weight is stored divided by alpha, C by beta; beta 0 becomes 1).
        """
        reason = self.write_blocker(weights=weights is not None, bias=bias is not None, copy_shared=copy_shared)
        if reason:
            return reason
        if weights is not None:
            self.weight.write(self.stored_from_weights(weights), graph, copy_shared=copy_shared)
        if bias is not None:
            self._write_bias(graph, np.asarray(bias, dtype=np.float64), copy_shared)
        return None

    def _write_bias(self, graph: ir.Graph, vector: np.ndarray, copy_shared: bool) -> None:
        if self.op == "Gemm" and self.beta == 0.0:
            self.node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        stored = vector / self.beta
        if self.bias is not None:
            self.bias.write(stored, graph, copy_shared=copy_shared)
            return
        dtype = self._float_dtype()
        base = self.node.name or self.op
        if self.op == "MatMul":
            self._insert_bias_add(graph, new_initializer(graph, f"{base}.bias", stored.astype(dtype)))
            return
        value = new_initializer(graph, f"{base}.bias", stored.astype(dtype))
        self.node.resize_inputs(3)
        self.node.replace_input_with(2, value)
        self.bias = Param(value, self.node)

    def _float_dtype(self) -> np.dtype:
        """The float type a new bias is stored in: the layer output's."""
        out = self.node.outputs[0]
        if out.dtype is not None and out.dtype.is_floating_point():
            return np.dtype(out.dtype.numpy())
        if not self.weight.quantized:
            return np.dtype(self.weight.value.const_value.dtype.numpy())
        return np.dtype(np.float32)

    def _insert_bias_add(self, graph: ir.Graph, bias: ir.Value) -> None:
        """Add `bias` after the MatMul: the Add's output takes over the MatMul output's uses (and graph output name)."""
        out = self.node.outputs[0]
        uses = list(out.uses())
        base = self.node.name or self.op
        add = ir.Node("", "Add", [out, bias], name=unique_name(graph, f"{base}.bias_add"))
        for use in uses:
            use.node.replace_input_with(use.idx, add.outputs[0])
        add.outputs[0].name = unique_name(graph, f"{out.name}.biased")
        add.outputs[0].shape = out.shape
        add.outputs[0].type = out.type
        if out.is_graph_output():
            k = list(graph.outputs).index(out)
            name = out.name
            out.name = f"{name}.raw"
            add.outputs[0].name = name
            graph.outputs[k] = add.outputs[0]
        graph.insert_after(self.node, add)
        self.bias_add, self.bias, self.y = add, Param(bias, add), add.outputs[0]


# ====================================================================== building the view
def _matmul_bias(node: ir.Node, channels: int) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add that adds a constant per-column (or scalar) bias right after MatMul `node`, and that constant."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) != 1 or out.is_graph_output():
        return None, None
    add = users[0].node
    if not is_onnx_op(add, "Add") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is None or other is out or not _weight_like(other):
        return None, None
    shape = other.shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return None, None
    dims = [int(d) for d in shape.dims]
    if not dims or any(d != 1 for d in dims[:-1]) or dims[-1] not in (1, channels):
        return None, None
    return add, other


def _bias_of(layer: Linear, value: ir.Value | None, user: ir.Node) -> tuple[Param | None, str | None]:
    """The layer's bias parameter, or the reason an existing bias input is not one."""
    if value is None:
        return None, None
    param, reason = param_of(value, user)
    if param is None:
        return None, reason
    size, channels = param.size, layer.out_channels
    if size != 1 and (size != channels or param.shape[-1] != channels):
        return None, "bias is not one value per output channel"
    return param, None


def linear_of(node: ir.Node) -> tuple[Linear | None, str | None]:
    """The `Linear` view of `node`, or the reason it has none ((None, None) for other ops).

    Declines when the weight is not a float constant or a DequantizeLinear of an integer constant,
    a Gemm/MatMul weight is not 2-D, a MatMul's constant is its left operand, a Gemm's input is
    known not to be 2-D, or a conv's ``kernel_shape`` disagrees with its weight.
    """
    if not is_onnx_op(node, *LINEAR_OPS):
        return None, None
    x = _input(node, 0)
    if x is None:
        return None, "missing input"
    weight, reason = param_of(_input(node, 1), node)
    if weight is None:
        return None, f"weight: {reason}"
    shape = weight.shape
    op = node.op_type
    geometry = None
    if op in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return None, f"conv weight has rank {len(shape)}"
        geometry = conv_geometry(node, shape)
        declared = node.attributes.get_ints("kernel_shape", None)
        if declared and tuple(declared) != geometry.kernel:
            return None, "kernel_shape does not match the weight"
        if geometry.groups < 1 or shape[0] % geometry.groups:
            return None, f"group={geometry.groups} does not divide the weight"
    elif len(shape) != 2:
        return None, f"{op} weight is not 2-D"
    elif op == "Gemm" and x.shape is not None and x.shape.rank() != 2:
        return None, "Gemm input is not 2-D"
    layer = Linear(node, weight, x, node.outputs[0], geometry=geometry)
    if op == "MatMul":
        add, value = _matmul_bias(node, layer.out_channels)
        bias, reason = _bias_of(layer, value, add) if add is not None else (None, None)
        if bias is not None:
            layer.bias, layer.bias_add, layer.y = bias, add, add.outputs[0]  # type: ignore[union-attr]
    else:
        layer.bias, layer.bias_reason = _bias_of(layer, _input(node, 2), node)
    return layer, None
