"""ResNet-shaped ONNX models with random (untrained) weights, built on demand.

Only numpy and onnx are needed. The graphs follow torchvision's ResNet-18 layout
and naming (``conv1``, ``bn1``, ``layer2.0.downsample.0``, ``fc`` ...): a 7x7/2
stem conv + BN + Relu + 3x3/2 MaxPool, four stages of two BasicBlocks, a 1x1/2
conv + BN downsample on each stage entry that changes shape, GlobalAveragePool,
Flatten and a Gemm producing ``logits``.

Weights are He-normal; BatchNormalization statistics are random but tame (gamma
and running variance near 1, small beta and running mean) so activations stay
finite. The output is deterministic for a given seed.

Command line::

    python -m models.resnet resnet18.onnx            # ~47 MB, 224x224
    python -m models.resnet resnet_tiny.onnx --tiny  # 32x32, 8/16/32/64 channels
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from models._graph import Dim, GraphBuilder, check

RESNET18_WIDTHS = (64, 128, 256, 512)
TINY_WIDTHS = (8, 16, 32, 64)
BLOCKS_PER_STAGE = (2, 2, 2, 2)
BN_EPSILON = 1e-5


class _Weights:
    """Deterministic random parameters, drawn in graph order."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        std = np.sqrt(2.0 / fan_in)
        return (self.rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        return self.rng.uniform(low, high, size).astype(np.float32)

    def normal(self, scale: float, size: int) -> np.ndarray:
        return (self.rng.standard_normal(size, dtype=np.float32) * scale).astype(np.float32)


def _conv(
    g: GraphBuilder,
    rnd: _Weights,
    name: str,
    x: str,
    cin: int,
    cout: int,
    kernel: int,
    stride: int,
) -> str:
    weight = rnd.he_normal((cout, cin, kernel, kernel), fan_in=cin * kernel * kernel)
    pad = kernel // 2
    return g.node(
        "Conv",
        [x, g.initializer(f"{name}.weight", weight)],
        name=name,
        dilations=[1, 1],
        group=1,
        kernel_shape=[kernel, kernel],
        pads=[pad, pad, pad, pad],
        strides=[stride, stride],
    )


def _bn(g: GraphBuilder, rnd: _Weights, name: str, x: str, channels: int) -> str:
    params = {
        "weight": rnd.uniform(0.8, 1.2, channels),
        "bias": rnd.normal(0.05, channels),
        "running_mean": rnd.normal(0.05, channels),
        "running_var": rnd.uniform(0.5, 1.5, channels),
    }
    inputs = [g.initializer(f"{name}.{key}", value) for key, value in params.items()]
    return g.node("BatchNormalization", [x, *inputs], name=name, epsilon=BN_EPSILON, momentum=0.9)


def _basic_block(
    g: GraphBuilder, rnd: _Weights, prefix: str, x: str, cin: int, cout: int, stride: int
) -> str:
    y = _conv(g, rnd, f"{prefix}.conv1", x, cin, cout, 3, stride)
    y = _bn(g, rnd, f"{prefix}.bn1", y, cout)
    y = g.node("Relu", [y], name=f"{prefix}.relu1")
    y = _conv(g, rnd, f"{prefix}.conv2", y, cout, cout, 3, 1)
    y = _bn(g, rnd, f"{prefix}.bn2", y, cout)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = _conv(g, rnd, f"{prefix}.downsample.0", x, cin, cout, 1, stride)
        shortcut = _bn(g, rnd, f"{prefix}.downsample.1", shortcut, cout)
    y = g.node("Add", [y, shortcut], name=f"{prefix}.add")
    return g.node("Relu", [y], name=f"{prefix}.relu2")


def _head(g: GraphBuilder, rnd: _Weights, x: str, channels: int, num_classes: int) -> str:
    x = g.node("GlobalAveragePool", [x], name="avgpool")
    x = g.node("Flatten", [x], name="flatten", axis=1)
    bound = 1.0 / np.sqrt(channels)
    weight = rnd.rng.uniform(-bound, bound, (num_classes, channels)).astype(np.float32)
    bias = rnd.uniform(-bound, bound, num_classes)
    return g.node(
        "Gemm",
        [x, g.initializer("fc.weight", weight), g.initializer("fc.bias", bias)],
        name="fc",
        output="logits",
        alpha=1.0,
        beta=1.0,
        transB=1,
    )


def resnet_model(
    *,
    widths: Sequence[int] = RESNET18_WIDTHS,
    blocks: Sequence[int] = BLOCKS_PER_STAGE,
    image_size: int = 224,
    batch: Dim = 1,
    num_classes: int = 1000,
    seed: int = 0,
    opset: int = 17,
    name: str = "resnet18",
) -> onnx.ModelProto:
    """Build the ResNet graph in memory: ``input`` [batch,3,H,W] -> ``logits``."""
    rnd = _Weights(seed)
    g = GraphBuilder(name)
    x = g.add_input("input", [batch, 3, image_size, image_size])
    x = _conv(g, rnd, "conv1", x, 3, widths[0], 7, 2)
    x = _bn(g, rnd, "bn1", x, widths[0])
    x = g.node("Relu", [x], name="relu")
    x = g.node(
        "MaxPool", [x], name="maxpool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
    )
    cin = widths[0]
    for stage, (cout, count) in enumerate(zip(widths, blocks, strict=True), start=1):
        for index in range(count):
            stride = 2 if stage > 1 and index == 0 else 1
            x = _basic_block(g, rnd, f"layer{stage}.{index}", x, cin, cout, stride)
            cin = cout
    _head(g, rnd, x, cin, num_classes)
    g.add_output("logits", [batch, num_classes])
    model = g.make_model(opset=opset, doc=f"{name}: ResNet-shaped model with random weights.")
    check(model)
    return model


def save(model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool) -> Path:
    """Write ``model``; with ``external_data`` the weights go to ``<file>.data`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)
    return path


def build_resnet18(
    path: str | os.PathLike[str],
    *,
    image_size: int = 224,
    batch: Dim = 1,
    num_classes: int = 1000,
    seed: int = 0,
    opset: int = 17,
    external_data: bool = False,
) -> Path:
    """Write a ResNet-18 (11.7M parameters at 1000 classes, ~47 MB) to ``path``.

    ``batch`` is a fixed size or a dim_param name such as ``"batch"``.
    """
    model = resnet_model(
        widths=RESNET18_WIDTHS,
        image_size=image_size,
        batch=batch,
        num_classes=num_classes,
        seed=seed,
        opset=opset,
        name="resnet18",
    )
    return save(model, path, external_data=external_data)


def build_resnet_tiny(
    path: str | os.PathLike[str],
    *,
    image_size: int = 32,
    batch: Dim = 1,
    num_classes: int = 10,
    seed: int = 0,
    opset: int = 17,
    external_data: bool = False,
) -> Path:
    """Write the same structure with 8/16/32/64 channels at 32x32 (fast tests)."""
    model = resnet_model(
        widths=TINY_WIDTHS,
        image_size=image_size,
        batch=batch,
        num_classes=num_classes,
        seed=seed,
        opset=opset,
        name="resnet_tiny",
    )
    return save(model, path, external_data=external_data)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random-weight ResNet ONNX model.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--tiny", action="store_true", help="32x32 input, 8/16/32/64 channels")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch", default="1", help='an integer or a name such as "batch"')
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--external-data", action="store_true")
    args = parser.parse_args(argv)
    builder = build_resnet_tiny if args.tiny else build_resnet18
    defaults = (32, 10) if args.tiny else (224, 1000)
    path = builder(
        args.output,
        image_size=args.image_size or defaults[0],
        batch=int(args.batch) if args.batch.isdigit() else args.batch,
        num_classes=args.num_classes or defaults[1],
        seed=args.seed,
        opset=args.opset,
        external_data=args.external_data,
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
