"""Digits fixtures: data split, ONNX graph builders and the rebuild script.

The scikit-learn ``load_digits`` data set (bundled with scikit-learn, no download)
is scaled to [0, 1] and split once with a fixed seed. Three small classifiers are
trained with PyTorch and written as hand-built ONNX graphs whose node and tensor
names are stable (``stem.conv``, ``stem.conv.weight``, ...).

Rebuild everything (from the repository root)::

    python -m models.digits

Importing this module needs only numpy, onnx and onnxruntime; scikit-learn is
imported to rebuild the split and PyTorch only when training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort

from models._graph import GraphBuilder, check

if TYPE_CHECKING:
    from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
CNN_PATH = MODELS_DIR / "digits_cnn.onnx"
MLP_PATH = MODELS_DIR / "digits_mlp.onnx"
TRANSFORMER_PATH = MODELS_DIR / "digits_transformer.onnx"
EVAL_PATH = MODELS_DIR / "digits_eval.npz"
CALIB_PATH = MODELS_DIR / "digits_calib.npz"
MLP_EVAL_PATH = MODELS_DIR / "digits_mlp_eval.npz"
SEQ_EVAL_PATH = MODELS_DIR / "digits_seq_eval.npz"

SEED = 0
EVAL_SIZE = 360
CALIB_SIZE = 128
NUM_CLASSES = 10
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5

Weights = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DigitsSplit:
    """Images are float32 [N, 1, 8, 8] in [0, 1]; labels are int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def load_split(seed: int = SEED) -> DigitsSplit:
    """The fixed, stratified train / eval split (``EVAL_SIZE`` held-out images)."""
    from sklearn.datasets import load_digits  # only needed to (re)build the data
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    y = data.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=EVAL_SIZE, random_state=seed, stratify=y
    )
    return DigitsSplit(x_train, y_train, x_eval, y_eval)


def calibration_indices(num_train: int, size: int = CALIB_SIZE, seed: int = SEED) -> np.ndarray:
    """Indices into the training split used for the calibration batch."""
    return np.random.default_rng(seed).choice(num_train, size=size, replace=False)


def as_flat(images: np.ndarray) -> np.ndarray:
    """[N, 1, 8, 8] -> [N, 64] (the MLP input)."""
    return np.ascontiguousarray(images.reshape(len(images), 64), dtype=np.float32)


def as_rows(images: np.ndarray) -> np.ndarray:
    """[N, 1, 8, 8] -> [N, 8, 8]: a sequence of 8 row tokens of 8 pixels."""
    return np.ascontiguousarray(images.reshape(len(images), 8, 8), dtype=np.float32)


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(input, labels)`` from one of the shipped ``.npz`` files."""
    with np.load(path) as data:
        return data["input"], data["labels"]


def save_npz(path: Path, inputs: np.ndarray, labels: np.ndarray) -> None:
    np.savez_compressed(path, input=inputs.astype(np.float32), labels=labels.astype(np.int64))


# ----------------------------------------------------------------------- evaluation


def run_onnx(model: str | Path | onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    """Run a single-input, single-output model on CPU and return its output."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: inputs})
    return np.asarray(output)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


# ------------------------------------------------------------------ graph pieces


def conv(
    g: GraphBuilder,
    w: Weights,
    name: str,
    x: str,
    *,
    stride: int = 1,
    group: int = 1,
) -> str:
    """Conv with "same" padding; the bias input is present only if trained with one."""
    weight = w[f"{name}.weight"]
    k = weight.shape[-1]
    inputs = [x, g.initializer(f"{name}.weight", weight)]
    if f"{name}.bias" in w:
        inputs.append(g.initializer(f"{name}.bias", w[f"{name}.bias"]))
    return g.node(
        "Conv",
        inputs,
        name=name,
        dilations=[1, 1],
        group=group,
        kernel_shape=[k, k],
        pads=[k // 2] * 4,
        strides=[stride, stride],
    )


def batchnorm(g: GraphBuilder, w: Weights, name: str, x: str) -> str:
    """Inference-mode BatchNormalization from a torch BatchNorm2d state."""
    params = [
        g.initializer(f"{name}.{key}", w[f"{name}.{key}"])
        for key in ("weight", "bias", "running_mean", "running_var")
    ]
    return g.node("BatchNormalization", [x, *params], name=name, epsilon=BN_EPSILON, momentum=0.9)


def conv_bn_relu(g: GraphBuilder, w: Weights, prefix: str, x: str, *, group: int = 1) -> str:
    y = conv(g, w, f"{prefix}.conv", x, group=group)
    y = batchnorm(g, w, f"{prefix}.bn", y)
    return g.node("Relu", [y], name=f"{prefix}.relu")


def gemm(g: GraphBuilder, w: Weights, name: str, x: str, *, output: str | None = None) -> str:
    """Gemm with torch Linear layout: weight [out, in], transB=1."""
    weight = g.initializer(f"{name}.weight", w[f"{name}.weight"])
    bias = g.initializer(f"{name}.bias", w[f"{name}.bias"])
    return g.node(
        "Gemm", [x, weight, bias], name=name, output=output, alpha=1.0, beta=1.0, transB=1
    )


def linear(g: GraphBuilder, w: Weights, name: str, x: str, *, output: str | None = None) -> str:
    """MatMul + Add as exporters emit for 3-D inputs; the weight is stored [in, out]."""
    weight = g.initializer(f"{name}.weight", w[f"{name}.weight"].T)
    bias = g.initializer(f"{name}.bias", w[f"{name}.bias"])
    y = g.node("MatMul", [x, weight], name=f"{name}.matmul")
    return g.node("Add", [y, bias], name=f"{name}.add", output=output)


def layernorm(g: GraphBuilder, w: Weights, name: str, x: str) -> str:
    scale = g.initializer(f"{name}.weight", w[f"{name}.weight"])
    bias = g.initializer(f"{name}.bias", w[f"{name}.bias"])
    return g.node("LayerNormalization", [x, scale, bias], name=name, axis=-1, epsilon=LN_EPSILON)


def scalar(g: GraphBuilder, name: str, value: float) -> str:
    return g.initializer(name, np.array(value, dtype=np.float32))


def int64s(g: GraphBuilder, name: str, values: list[int]) -> str:
    return g.initializer(name, np.array(values, dtype=np.int64))


# --------------------------------------------------------------------------- CNN


def residual_block(g: GraphBuilder, w: Weights, prefix: str, x: str) -> str:
    y = conv(g, w, f"{prefix}.conv1", x)
    y = batchnorm(g, w, f"{prefix}.bn1", y)
    y = g.node("Relu", [y], name=f"{prefix}.relu1")
    y = conv(g, w, f"{prefix}.conv2", y)
    y = batchnorm(g, w, f"{prefix}.bn2", y)
    y = g.node("Add", [y, x], name=f"{prefix}.add")
    return g.node("Relu", [y], name=f"{prefix}.relu2")


def build_cnn(w: Weights) -> onnx.ModelProto:
    """digits_cnn: opset 17, ``input`` [batch,1,8,8] -> ``logits`` [batch,10]."""
    g = GraphBuilder("digits_cnn")
    x = g.add_input("input", ["batch", 1, 8, 8])
    x = conv_bn_relu(g, w, "stem", x)
    x = residual_block(g, w, "block1", x)
    x = conv_bn_relu(g, w, "dw", x, group=w["dw.conv.weight"].shape[0])
    x = conv_bn_relu(g, w, "pw", x)
    x = g.node("MaxPool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    a = conv_bn_relu(g, w, "branch_a", x)
    b = conv_bn_relu(g, w, "branch_b", x)
    x = g.node("Concat", [a, b], name="concat", axis=1)
    x = g.node("Flatten", [x], name="flatten", axis=1)
    x = g.node("Dropout", [x], name="dropout")
    x = gemm(g, w, "fc1", x)
    x = g.node("Relu", [x], name="fc1.relu")
    gemm(g, w, "fc2", x, output="logits")
    g.add_output("logits", ["batch", NUM_CLASSES])
    return g.make_model(opset=17, doc="Digits CNN classifier (8x8 images).")


# --------------------------------------------------------------------------- MLP


def build_mlp(w: Weights) -> onnx.ModelProto:
    """digits_mlp: opset 13, ``input`` [batch,64] -> ``logits`` [batch,10]."""
    g = GraphBuilder("digits_mlp")
    x = g.add_input("input", ["batch", 64])
    x = g.node("Relu", [gemm(g, w, "fc1", x)], name="relu1")
    x = g.node("Relu", [gemm(g, w, "fc2", x)], name="relu2")
    gemm(g, w, "fc3", x, output="logits")
    g.add_output("logits", ["batch", NUM_CLASSES])
    return g.make_model(opset=13, doc="Digits MLP classifier (64 flattened pixels).")


# ------------------------------------------------------------------- transformer

HEADS = 4
HEAD_DIM = 8
D_MODEL = HEADS * HEAD_DIM


def positional(g: GraphBuilder, w: Weights, x_in: str, h: str) -> str:
    """Add rows [0, seq) of the learned [max_len, d] table; seq is read at run time."""
    table = g.initializer("pos", w["pos"])
    seq = g.node("Shape", [x_in], name="pos.seq_len", start=1, end=2)
    starts = int64s(g, "pos.starts", [0])
    axes = int64s(g, "pos.axes", [0])
    rows = g.node("Slice", [table, starts, seq, axes], name="pos.slice")
    return g.node("Add", [h, rows], name="pos.add")


def split_heads(g: GraphBuilder, prefix: str, x: str, shape: str, perm: list[int]) -> str:
    y = g.node("Reshape", [x, shape], name=f"{prefix}.reshape")
    return g.node("Transpose", [y], name=f"{prefix}.transpose", perm=perm)


def attention(g: GraphBuilder, w: Weights, prefix: str, x: str) -> str:
    heads_shape = int64s(g, f"{prefix}.heads_shape", [0, 0, HEADS, HEAD_DIM])
    q = split_heads(g, f"{prefix}.q", linear(g, w, f"{prefix}.q", x), heads_shape, [0, 2, 1, 3])
    k = split_heads(g, f"{prefix}.k", linear(g, w, f"{prefix}.k", x), heads_shape, [0, 2, 3, 1])
    v = split_heads(g, f"{prefix}.v", linear(g, w, f"{prefix}.v", x), heads_shape, [0, 2, 1, 3])
    scores = g.node("MatMul", [q, k], name=f"{prefix}.scores")
    scale = scalar(g, f"{prefix}.scale", math.sqrt(HEAD_DIM))
    scores = g.node("Div", [scores, scale], name=f"{prefix}.scale_div")
    probs = g.node("Softmax", [scores], name=f"{prefix}.softmax", axis=-1)
    ctx = g.node("MatMul", [probs, v], name=f"{prefix}.context")
    ctx = g.node("Transpose", [ctx], name=f"{prefix}.merge.transpose", perm=[0, 2, 1, 3])
    merged_shape = int64s(g, f"{prefix}.merged_shape", [0, 0, D_MODEL])
    ctx = g.node("Reshape", [ctx, merged_shape], name=f"{prefix}.merge.reshape")
    return linear(g, w, f"{prefix}.out", ctx)


def gelu(g: GraphBuilder, prefix: str, x: str) -> str:
    """Exact (erf) GELU as exporters write it for opsets without a Gelu op."""
    y = g.node("Div", [x, scalar(g, f"{prefix}.sqrt2", math.sqrt(2.0))], name=f"{prefix}.div")
    y = g.node("Erf", [y], name=f"{prefix}.erf")
    y = g.node("Add", [y, scalar(g, f"{prefix}.one", 1.0)], name=f"{prefix}.add")
    y = g.node("Mul", [x, y], name=f"{prefix}.mul")
    return g.node("Mul", [y, scalar(g, f"{prefix}.half", 0.5)], name=f"{prefix}.mul_half")


def encoder_block(g: GraphBuilder, w: Weights, prefix: str, x: str) -> str:
    y = attention(g, w, f"{prefix}.attn", layernorm(g, w, f"{prefix}.ln1", x))
    x = g.node("Add", [x, y], name=f"{prefix}.attn_residual")
    y = linear(g, w, f"{prefix}.ffn.fc1", layernorm(g, w, f"{prefix}.ln2", x))
    y = linear(g, w, f"{prefix}.ffn.fc2", gelu(g, f"{prefix}.ffn.gelu", y))
    return g.node("Add", [x, y], name=f"{prefix}.ffn_residual")


def build_transformer(w: Weights) -> onnx.ModelProto:
    """digits_transformer: opset 17, ``input`` [batch,seq,8] -> ``logits`` [batch,10]."""
    g = GraphBuilder("digits_transformer")
    x_in = g.add_input("input", ["batch", "seq", 8])
    h = positional(g, w, x_in, linear(g, w, "embed", x_in))
    h = layernorm(g, w, "ln_f", encoder_block(g, w, "block", h))
    pooled = g.node("ReduceMean", [h], name="pool", axes=[1], keepdims=0)
    linear(g, w, "head", pooled, output="logits")
    g.add_output("logits", ["batch", NUM_CLASSES])
    return g.make_model(opset=17, doc="Digits transformer encoder over 8 row tokens.")


# ------------------------------------------------------------------------ rebuild


@dataclass(frozen=True)
class FixtureSpec:
    kind: str
    path: Path
    build: Callable[[Weights], onnx.ModelProto]
    to_input: Callable[[np.ndarray], np.ndarray]
    epochs: int
    lr: float
    min_accuracy: float


SPECS = (
    FixtureSpec("cnn", CNN_PATH, build_cnn, lambda x: x, 40, 3e-3, 0.95),
    FixtureSpec("mlp", MLP_PATH, build_mlp, as_flat, 60, 1e-3, 0.95),
    FixtureSpec("transformer", TRANSFORMER_PATH, build_transformer, as_rows, 120, 3e-3, 0.90),
)

MAX_ABS_DIFF = 1e-4


def verify(model: onnx.ModelProto, net: nn.Module, x: np.ndarray) -> float:
    """Max abs difference between onnxruntime and torch logits."""
    from models import _digits_torch as tnets

    diff = float(np.max(np.abs(run_onnx(model, x) - tnets.predict(net, x))))
    if diff >= MAX_ABS_DIFF:
        raise AssertionError(f"ONNX and torch disagree: max abs diff {diff:.2e}")
    return diff


def build_fixture(spec: FixtureSpec, split: DigitsSplit) -> float:
    """Train, write, check and verify one model; return its eval accuracy."""
    from models import _digits_torch as tnets

    net = tnets.make_net(spec.kind, SEED)
    tnets.train(
        net,
        spec.to_input(split.x_train),
        split.y_train,
        epochs=spec.epochs,
        lr=spec.lr,
        seed=SEED,
    )
    model = spec.build(tnets.weights(net))
    check(model)
    onnx.save_model(model, spec.path)
    x_eval = spec.to_input(split.x_eval)
    diffs = [verify(model, net, x_eval), verify(model, net, x_eval[:1])]
    if spec.kind == "transformer":  # dynamic sequence length
        diffs += [verify(model, net, x_eval[:, :5]), verify(model, net, np.tile(x_eval, (1, 2, 1)))]
    acc = accuracy(run_onnx(spec.path, x_eval), split.y_eval)
    size_kb = spec.path.stat().st_size / 1024
    print(
        f"{spec.path.name}: eval accuracy {acc:.4f} ({len(x_eval)} images), "
        f"max |onnx - torch| {max(diffs):.2e}, {len(model.graph.node)} nodes, {size_kb:.0f} KiB"
    )
    if acc < spec.min_accuracy:
        raise AssertionError(f"{spec.path.name}: accuracy {acc:.4f} < {spec.min_accuracy}")
    return acc


def write_data(split: DigitsSplit) -> None:
    idx = calibration_indices(len(split.x_train))
    save_npz(EVAL_PATH, split.x_eval, split.y_eval)
    save_npz(CALIB_PATH, split.x_train[idx], split.y_train[idx])
    save_npz(MLP_EVAL_PATH, as_flat(split.x_eval), split.y_eval)
    save_npz(SEQ_EVAL_PATH, as_rows(split.x_eval), split.y_eval)
    print(f"data: {len(split.x_train)} train / {len(split.x_eval)} eval, {len(idx)} calibration")


def main() -> None:
    split = load_split()
    write_data(split)
    for spec in SPECS:
        build_fixture(spec, split)


if __name__ == "__main__":
    main()
