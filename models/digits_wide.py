"""The wide digits CNN: the README's main job, a model with enough arithmetic per node for int8 to pay.

``digits_cnn.onnx`` is so small (0.46 M MACs per image) that ONNX Runtime's fixed cost per node
dominates: int8 kernels cannot make it faster once the float model is spread over two threads. This
one is trained on the same split, fed the same files (``digits_calib.npz``, ``digits_eval.npz``:
float32 [N, 1, 8, 8]), and does 7.1 M MACs per image in 20 nodes, so that ``fold,quantize`` makes it
both smaller and faster with ONNX Runtime's default threads.

Rebuild (from the repository root; needs PyTorch and scikit-learn; about a minute on 2 cores)::

    python -m models.digits_wide

Layout (opset 17, ``input`` float32 [batch, 1, 8, 8] -> ``logits`` float32 [batch, 10]): ``stem``
Conv 3x3 1->32 + BN + Relu; ``expand`` Conv 3x3 32->64 + BN + Relu; residual block ``block1``
(Conv 3x3 64->64 + BN + Relu, Conv 3x3 64->64 + BN, Add, Relu); MaxPool 2x2 to 4x4; ``head`` Conv 3x3
64->128 + BN + Relu; GlobalAveragePool, Flatten, Gemm ``fc`` (128->10). Node and tensor names as in
`models.digits` (``stem.conv.weight``...). The build checks that ONNX Runtime reproduces the PyTorch
logits (max abs difference below 1e-4) and prints the held-out accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from models._graph import GraphBuilder, check
from models.digits import (
    MODELS_DIR,
    NUM_CLASSES,
    SEED,
    accuracy,
    conv_bn_relu,
    gemm,
    load_split,
    residual_block,
    run_onnx,
    verify,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["WIDE_PATH", "build_wide", "main"]

WIDE_PATH = MODELS_DIR / "digits_wide.onnx"
EPOCHS = 30
LR = 3e-3
MIN_ACCURACY = 0.97


def build_wide(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    """digits_wide: opset 17, ``input`` [batch,1,8,8] -> ``logits`` [batch,10]."""
    g = GraphBuilder("digits_wide")
    x = g.add_input("input", ["batch", 1, 8, 8])
    x = conv_bn_relu(g, w, "stem", x)
    x = conv_bn_relu(g, w, "expand", x)
    x = residual_block(g, w, "block1", x)
    x = g.node("MaxPool", [x], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    x = conv_bn_relu(g, w, "head", x)
    x = g.node("GlobalAveragePool", [x], name="gap")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    gemm(g, w, "fc", x, output="logits")
    g.add_output("logits", ["batch", NUM_CLASSES])
    return g.make_model(opset=17, doc="Wide digits CNN classifier (8x8 images), 7.1 M MACs per image.")


def _net() -> nn.Module:
    import torch
    from torch import nn
    from torch.nn import functional as fn

    from models._digits_torch import ConvBN, ResidualBlock

    class DigitsWide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = ConvBN(1, 32, 3)
            self.expand = ConvBN(32, 64, 3)
            self.block1 = ResidualBlock(64)
            self.head = ConvBN(64, 128, 3)
            self.fc = nn.Linear(128, NUM_CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = fn.relu(self.expand(fn.relu(self.stem(x))))
            x = fn.max_pool2d(self.block1(x), 2)
            x = fn.relu(self.head(x))
            return self.fc(torch.flatten(fn.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(SEED)
    return DigitsWide()


def main(path: Path = WIDE_PATH) -> float:
    from models import _digits_torch as tnets

    split = load_split()
    net = _net()
    tnets.train(net, split.x_train, split.y_train, epochs=EPOCHS, lr=LR, seed=SEED)
    model = build_wide(tnets.weights(net))
    check(model)
    onnx.save_model(model, path)
    diff = max(verify(model, net, split.x_eval), verify(model, net, split.x_eval[:1]))
    acc = accuracy(run_onnx(path, split.x_eval), split.y_eval)
    print(f"{path.name}: eval accuracy {acc:.4f} ({len(split.x_eval)} images), max |onnx - torch| {diff:.2e}, "
          f"{len(model.graph.node)} nodes, {path.stat().st_size / 1024:.0f} KiB")
    if acc < MIN_ACCURACY:
        raise AssertionError(f"{path.name}: accuracy {acc:.4f} < {MIN_ACCURACY}")
    return acc


if __name__ == "__main__":
    main()
