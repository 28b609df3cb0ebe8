"""distill: how much accuracy and per-layer fidelity layer-wise reconstruction wins back after compression.

Run from the repository root::

    python -m benchmarks.distill [--resnet-tiny] [--ridge]

Teacher: the fixture before compression. Transfer set: ``digits_calib.npz`` (128 training images).
Every accuracy and error is measured on the 360 held-out images (``digits_eval.npz`` and its flat and
row-sequence copies), never on the transfer set. Tables:

1. the digits CNN after ``channels`` (ratio 0.5), ``factorize`` (rank_ratio 0.25), ``prune`` (0.8) and
   ``quantize`` (static int8): accuracy before and after distill, the share of the lost accuracy won back,
   and for prune whether every zero stayed zero;
2. the transformer after ``prune`` (0.6) and ``factorize`` (0.25): relative L2 error of every refit
   layer's output against the teacher's, before and after distill, and the accuracy;
3. uncompressed fixtures: largest output change distill makes (the teacher is already matched);
4. the ``logits`` step on top of the layer-wise refit;
5. with ``--resnet-tiny``: the ResNet-shaped fixture (random weights) after ``channels`` and ``prune``,
   output agreement with the teacher on random images, and the time distill takes;
6. with ``--ridge``: CNN accuracy after distill across ``ridge``, with the hold-out guard on and off.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

import onnxopt
from onnxopt.analysis import infer_shapes
from onnxopt.runtime import run_taps

MODELS = Path(__file__).resolve().parents[1] / "models"
# The students are cut by MACs alone, as on the passes' pages: by default channels and factorize also keep
# only cuts that run faster on this machine, which would make the table depend on the machine's load.
MAC_ONLY = {"verify_speed": False}
MAC_ONLY_CHANNELS = {"verify_speed": False, "round_to": 1}

CNN = MODELS / "digits_cnn.onnx"
MLP = MODELS / "digits_mlp.onnx"
TRANSFORMER = MODELS / "digits_transformer.onnx"


def _npz(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / name) as d:
        return d["input"], d["labels"]


def _feeds(x: np.ndarray, batch: int = 16) -> list[dict[str, np.ndarray]]:
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]


CALIB_IMAGES = _npz("digits_calib.npz")[0]
DATA = {
    CNN: (CALIB_IMAGES, _npz("digits_eval.npz")),
    MLP: (CALIB_IMAGES.reshape(-1, 64), _npz("digits_mlp_eval.npz")),
    TRANSFORMER: (CALIB_IMAGES.reshape(-1, 8, 8), _npz("digits_seq_eval.npz")),
}


def _logits(model: ir.Model | Path, x: np.ndarray) -> np.ndarray:
    m = onnxopt.load(model) if isinstance(model, Path) else model
    return np.concatenate([r["logits"] for r in run_taps(m, ["logits"], _feeds(x, 120))])


def _accuracy(model: ir.Model | Path, x: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(_logits(model, x), axis=1) == labels))


def _logit_error(model: ir.Model | Path, x: np.ndarray) -> float:
    ref = _logits(CNN, x)
    return float(np.linalg.norm(_logits(model, x) - ref) / np.linalg.norm(ref))


def _compress(fixture: Path, passes: list[Any], workdir: Path) -> Path:
    calib = _feeds(DATA[fixture][0])
    result = onnxopt.optimize(str(fixture), ["fold", *passes], calib=calib, validate=False)
    path = workdir / f"{fixture.stem}-{len(list(workdir.iterdir()))}.onnx"
    result.save(path)
    return path


def _distill(student: Path, fixture: Path, **options: Any) -> tuple[ir.Model, onnxopt.PassStats, float]:
    t0 = time.perf_counter()
    result = onnxopt.optimize(str(student), [("distill", {"teacher": str(fixture), **options})],
                              calib=_feeds(DATA[fixture][0]), validate=False)
    return result.model, result.passes[0].stats, time.perf_counter() - t0


def _zeros_kept(before: ir.Model, after: ir.Model) -> tuple[int, bool]:
    zeros, kept = 0, True
    for name, value in before.graph.initializers.items():
        if not name.endswith("weight"):
            continue
        mask = np.asarray(value.const_value.numpy()) == 0
        zeros += int(mask.sum())
        kept &= bool(np.all(np.asarray(after.graph.initializers[name].const_value.numpy())[mask] == 0))
    return zeros, kept


def cnn_table(workdir: Path) -> None:
    x, labels = DATA[CNN][1]
    teacher = _accuracy(CNN, x, labels)
    print(f"\n1. digits CNN, held-out accuracy (teacher {teacher:.2%}; transfer set: 128 calibration images)")
    print(f"{'compression':38} {'before':>8} {'distill':>8} {'won back':>9} {'logits rel L2':>15} {'time':>6}  note")
    cases = [
        ("channels ratio=0.5", [("channels", {"ratio": 0.5, **MAC_ONLY_CHANNELS})]),
        ("factorize rank_by=ratio rank_ratio=0.25",
         [("factorize", {"rank_by": "ratio", "rank_ratio": 0.25, **MAC_ONLY})]),
        ("prune sparsity=0.8", [("prune", {"sparsity": 0.8})]),
        ("quantize static int8", [("quantize", {})]),
    ]
    for label, passes in cases:
        student = _compress(CNN, passes, workdir)
        before = _accuracy(student, x, labels)
        model, stats, seconds = _distill(student, CNN)
        after = _accuracy(model, x, labels)
        lost = teacher - before
        won = f"{(after - before) / lost:.0%}" if lost > 1e-9 else "-"
        note = f"{stats.summary['layers_refit']} layers refit"
        if label.startswith("prune"):
            zeros, kept = _zeros_kept(onnxopt.load(student), model)
            note += f"; {zeros} zeros, all kept: {kept}"
        errors = f"{_logit_error(student, x):.4f}->{_logit_error(model, x):.4f}"
        print(f"{label:38} {before:8.2%} {after:8.2%} {won:>9} {errors:>15} {seconds:5.1f}s  {note}")


def _layer_errors(teacher: Path, student: ir.Model | Path, names: list[str], x: np.ndarray) -> dict[str, float]:
    s_model = onnxopt.load(student) if isinstance(student, Path) else student
    t_model = onnxopt.load(teacher)
    infer_shapes(s_model)
    infer_shapes(t_model)
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for got_s, got_t in zip(run_taps(s_model, names, _feeds(x, 120)), run_taps(t_model, names, _feeds(x, 120))):
        for name in names:
            num[name] += float(np.sum((got_s[name] - got_t[name]) ** 2))
            den[name] += float(np.sum(got_t[name] ** 2))
    return {n: float(np.sqrt(num[n] / den[n])) for n in names}


def transformer_table(workdir: Path) -> None:
    x, labels = DATA[TRANSFORMER][1]
    print(f"\n2. digits transformer, held-out relative L2 error per layer output (teacher accuracy "
          f"{_accuracy(TRANSFORMER, x, labels):.2%})")
    cases = [("prune sparsity=0.6", [("prune", {"sparsity": 0.6})]),
             ("factorize rank_by=ratio rank_ratio=0.25",
              [("factorize", {"rank_by": "ratio", "rank_ratio": 0.25, **MAC_ONLY})])]
    for label, passes in cases:
        student = _compress(TRANSFORMER, passes, workdir)
        model, stats, seconds = _distill(student, TRANSFORMER)
        names = [r["teacher"] for r in stats.layers]
        before = _layer_errors(TRANSFORMER, student, names, x)
        after = _layer_errors(TRANSFORMER, model, names, x)
        print(f"  after {label} (distill {seconds:.1f}s)")
        print(f"  {'layer output':28} {'before':>8} {'after':>8}")
        for name in names:
            print(f"  {name:28} {before[name]:8.4f} {after[name]:8.4f}")
        print(f"  {'accuracy':28} {_accuracy(student, x, labels):8.2%} {_accuracy(model, x, labels):8.2%}")


def exactness_table() -> None:
    print("\n3. uncompressed fixtures: distill after fold changes nothing the teacher already matches")
    print(f"{'fixture':26} {'layers refit':>12} {'max |Δ| vs fold':>16} {'max |Δ| vs original':>20}")
    for fixture in (CNN, MLP, TRANSFORMER):
        held = DATA[fixture][1][0]
        calib = _feeds(DATA[fixture][0])
        folded = onnxopt.optimize(str(fixture), ["fold"], validate=False).model
        result = onnxopt.optimize(str(fixture), ["fold", "distill"], calib=calib, validate=False)
        out = _logits(result.model, held)
        vs_fold = float(np.max(np.abs(out - _logits(folded, held))))
        vs_orig = float(np.max(np.abs(out - _logits(fixture, held))))
        refit = result.passes[1].stats.summary["layers_refit"]
        print(f"{fixture.name:26} {refit:12d} {vs_fold:16.2e} {vs_orig:20.2e}")


def logits_table(workdir: Path) -> None:
    print("\n4. the logits step (soft targets, T=4) on top of the layer-wise refit, held-out accuracy")
    print(f"{'fixture / compression':58} {'student':>8} {'distill':>8} {'+logits':>8}")
    cases = [(CNN, "channels ratio=0.5", [("channels", {"ratio": 0.5, **MAC_ONLY_CHANNELS})]),
             (TRANSFORMER, "factorize rank_by=ratio rank_ratio=0.25",
              [("factorize", {"rank_by": "ratio", "rank_ratio": 0.25, **MAC_ONLY})])]
    for fixture, label, passes in cases:
        x, labels = DATA[fixture][1]
        student = _compress(fixture, passes, workdir)
        plain, _, _ = _distill(student, fixture)
        soft, _, _ = _distill(student, fixture, logits=True)
        print(f"{fixture.stem + ' / ' + label:58} {_accuracy(student, x, labels):8.2%} "
              f"{_accuracy(plain, x, labels):8.2%} {_accuracy(soft, x, labels):8.2%}")


def resnet_table(workdir: Path) -> None:
    """ResNet-shaped (untrained, random weights): output agreement with the teacher on random images."""
    from models.resnet import build_resnet_tiny

    teacher = workdir / "resnet_tiny.onnx"
    build_resnet_tiny(teacher, batch="batch")
    rng = np.random.default_rng(1)
    calib = [{"input": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)} for _ in range(32)]
    held = rng.standard_normal((128, 3, 32, 32)).astype(np.float32)
    ref = _logits(teacher, held)
    print("\n5. ResNet-tiny (32x32, 21 layers, random weights): 256 random transfer images, 128 other random images")
    print(f"{'compression':24} {'logits rel L2':>15} {'top-1 agreement':>17} {'distill time':>13}")
    for label, passes in (("channels ratio=0.5", [("channels", {"ratio": 0.5, **MAC_ONLY_CHANNELS})]),
                          ("prune sparsity=0.8", [("prune", {"sparsity": 0.8})])):
        result = onnxopt.optimize(str(teacher), ["fold", *passes], calib=calib, validate=False)
        student = workdir / f"resnet-{label.split()[0]}.onnx"
        result.save(student)
        t0 = time.perf_counter()
        distilled = onnxopt.optimize(str(student), [("distill", {"teacher": str(teacher)})], calib=calib,
                                     validate=False).model
        seconds = time.perf_counter() - t0
        cells = []
        for model in (student, distilled):
            z = _logits(model, held)
            cells.append((np.linalg.norm(z - ref) / np.linalg.norm(ref), np.mean(z.argmax(1) == ref.argmax(1))))
        print(f"{label:24} {cells[0][0]:7.3f}->{cells[1][0]:.3f} {cells[0][1]:8.1%}->{cells[1][1]:.1%} "
              f"{seconds:12.1f}s")


def ridge_table(workdir: Path) -> None:
    """Held-out CNN accuracy across `ridge`, with the hold-out guard on (0.25) and off (0)."""
    x, labels = DATA[CNN][1]
    ridges = (0.0, 1e-3, 1e-2, 1e-1, 1.0)
    print("\n6. digits CNN, held-out accuracy by ridge; each cell: holdout=0.25 / holdout=0")
    print(f"{'compression':12} " + " ".join(f"{'ridge=' + format(r, 'g'):>15}" for r in ridges))
    cases = [("channels", [("channels", {"ratio": 0.5, **MAC_ONLY_CHANNELS})]),
             ("factorize", [("factorize", {"rank_by": "ratio", "rank_ratio": 0.25, **MAC_ONLY})]),
             ("prune", [("prune", {"sparsity": 0.8})])]
    for label, passes in cases:
        student = _compress(CNN, passes, workdir)
        cells = []
        for ridge in ridges:
            pair = [_accuracy(_distill(student, CNN, ridge=ridge, holdout=h)[0], x, labels) for h in (0.25, 0.0)]
            cells.append(f"{pair[0]:.1%} / {pair[1]:.1%}")
        print(f"{label:12} " + " ".join(f"{c:>15}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        workdir = Path(tmp)
        cnn_table(workdir)
        transformer_table(workdir)
        exactness_table()
        logits_table(workdir)
        if "--resnet-tiny" in args:
            resnet_table(workdir)
        if "--ridge" in args:
            ridge_table(workdir)


if __name__ == "__main__":
    main()
