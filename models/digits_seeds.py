"""Digits MLPs for `onnxopt merge`: differently seeded copies and fine-tuned copies.

Two families, all with the architecture, names and opset of ``digits_mlp.onnx``
(``input`` [batch, 64] -> ``logits`` [batch, 10], written by `models.digits.build_mlp`):

- ``digits_mlp_seed{1,2,3}.onnx``: trained from scratch exactly like ``digits_mlp.onnx``
  (60 epochs, Adam lr 1e-3, cosine schedule) but from initialisation and data-order
  seeds 1, 2 and 3: the members of an ensemble.
- ``digits_mlp_ft{1,2,3}.onnx``: ``digits_mlp.onnx`` fine-tuned for a few epochs with
  different seeds, learning rates and input-noise levels (``FINETUNES``): the
  ingredients of a weight-averaging soup, all from one pretrained starting point.

Rebuild (from the repository root; needs PyTorch and scikit-learn, a few seconds)::

    python -m models.digits_seeds
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models._graph import check
from models.digits import (
    MLP_PATH,
    MODELS_DIR,
    accuracy,
    as_flat,
    build_mlp,
    load_split,
    run_onnx,
    verify,
)

__all__ = ["SEED_PATHS", "FINETUNE_PATHS", "FINETUNES", "SEEDS", "main"]

SEEDS = (1, 2, 3)
SEED_PATHS = tuple(MODELS_DIR / f"digits_mlp_seed{s}.onnx" for s in SEEDS)


@dataclass(frozen=True)
class Finetune:
    """One fine-tuning run of the pretrained MLP."""

    seed: int
    epochs: int
    lr: float
    noise: float  # std of Gaussian noise added to the training pixels


FINETUNES = (
    Finetune(seed=11, epochs=8, lr=3e-4, noise=0.0),
    Finetune(seed=12, epochs=8, lr=5e-4, noise=0.05),
    Finetune(seed=13, epochs=8, lr=1e-3, noise=0.1),
)
FINETUNE_PATHS = tuple(MODELS_DIR / f"digits_mlp_ft{i + 1}.onnx" for i in range(len(FINETUNES)))
MIN_ACCURACY = 0.93


def _pretrained_weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def _write(net: object, path: Path, x_eval: np.ndarray, y_eval: np.ndarray) -> float:
    from models import _digits_torch as tnets

    model = build_mlp(tnets.weights(net))  # type: ignore[arg-type]
    check(model)
    onnx.save_model(model, path)
    diff = verify(model, net, x_eval)  # type: ignore[arg-type]
    acc = accuracy(run_onnx(path, x_eval), y_eval)
    print(f"{path.name}: eval accuracy {acc:.4f}, max |onnx - torch| {diff:.2e}, {path.stat().st_size // 1024} KiB")
    if acc < MIN_ACCURACY:
        raise AssertionError(f"{path.name}: accuracy {acc:.4f} < {MIN_ACCURACY}")
    return acc


def build_seeds(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
    from models import _digits_torch as tnets

    for seed, path in zip(SEEDS, SEED_PATHS):
        net = tnets.make_net("mlp", seed)
        tnets.train(net, x_train, y_train, epochs=60, lr=1e-3, seed=seed)
        _write(net, path, x_eval, y_eval)


def build_finetunes(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray) -> None:
    import torch

    from models import _digits_torch as tnets

    base = _pretrained_weights(MLP_PATH)
    for spec, path in zip(FINETUNES, FINETUNE_PATHS):
        net = tnets.make_net("mlp", spec.seed)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
        rng = np.random.default_rng(spec.seed)
        noisy = (x_train + rng.normal(0.0, spec.noise, x_train.shape)).astype(np.float32)
        tnets.train(net, noisy, y_train, epochs=spec.epochs, lr=spec.lr, seed=spec.seed)
        _write(net, path, x_eval, y_eval)


def main() -> None:
    split = load_split()
    x_train, x_eval = as_flat(split.x_train), as_flat(split.x_eval)
    build_seeds(x_train, split.y_train, x_eval, split.y_eval)
    build_finetunes(x_train, split.y_train, x_eval, split.y_eval)


if __name__ == "__main__":
    main()
