"""Benchmark: the quantize pass against onnxruntime.quantization on the same models and data.

For each model, in one process and on the same calibration feeds: fp32, ours (``quantize``, static,
defaults), ``quantize_static(QuantFormat.QDQ, per_channel=True)`` on the file as given, and the same
after ONNX Runtime's own ``quant_pre_process``. Reported: quantization wall time, file size, integer
kernels / float compute ops left in ONNX Runtime's optimized graph, output agreement with fp32 (top-1,
relative L2) and accuracy with labels, and latency (interleaved runs on one thread, so load from
other processes hits every model alike; ratio to fp32 and ours over ORT's).

With ``--mode dynamic`` (no calibration data): fp32, ours (``quantize`` with ``mode=dynamic``:
DynamicQuantizeLinear + MatMulInteger / ConvInteger), ``quantize_dynamic(weight_type=QInt8)`` on the file
as given, and the same after ``quant_pre_process``.

Run from the repository root::

    python -m benchmarks.quantize                      # digits CNN, transformer, ResNet-18 224x224
    python -m benchmarks.quantize --models cnn --runs 200
    python -m benchmarks.quantize --models ppocr_cls,ppocr_det,ppocr_rec --fallback 0.05
    python -m benchmarks.quantize --mode dynamic --models cnn,resnet18 --extra exclude=Conv

The PP-OCR cases use the models shipped by ``rapidocr-onnxruntime`` (``pip install --no-deps
rapidocr-onnxruntime``) on synthetic text crops (lines of scikit-learn's handwritten digits).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxopt.passes.quantize.check import fusion_report_file

import onnxopt
from onnxopt.bench import bench
from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.errors import ModelError
from onnxopt.io import file_size, load
from onnxopt.runtime import session
from onnxopt.validate import compare_models

__all__ = ["main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
Case = tuple[Path, Dataset, Dataset]


def _batches(x: np.ndarray, labels: np.ndarray | None, size: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(x), size):
        feed = {"input": x[i : i + size]}
        if labels is not None:
            feed["labels"] = labels[i : i + size]
        out.append(feed)
    return out


def _digits(model: str, shape: tuple[int, ...], eval_file: str) -> Callable[[Path], Case]:
    def build(_: Path) -> Case:
        path = MODELS / model
        specs = input_specs(load(path, check=False))
        with np.load(MODELS / "digits_calib.npz") as d:
            calib = load_data(_batches(d["input"].reshape((-1, *shape)), None, 16), specs)
        with np.load(MODELS / eval_file) as d:
            evald = load_data(_batches(d["input"].reshape((-1, *shape)), d["labels"], 40), specs)
        return path, calib, evald

    return build


def _resnet18(tmp: Path) -> Case:
    from models.resnet import build_resnet18

    path = tmp / "resnet18.onnx"
    build_resnet18(path, batch=1)
    specs = input_specs(load(path, check=False))
    calib = load_data("random:16", specs, seed=1)
    evald = load_data("random:8", specs, seed=2)
    return path, calib, evald


def text_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Synthetic document crops [n, 3, h, w] in [0, 1]: lines of handwritten digits (scikit-learn's
    bundled 8x8 digits, upscaled) in dark ink on a light, noisy background."""
    from sklearn.datasets import load_digits

    glyphs = load_digits().images / 16.0
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        img = np.full((h, w), rng.uniform(0.75, 1.0), np.float32) + rng.normal(0, 0.02, (h, w)).astype(np.float32)
        scale = int(rng.integers(2, max(3, min(5, h // 10) + 1)))
        size = 8 * scale
        y = int(rng.integers(0, max(1, h - size)))
        while y + size <= h:
            x = int(rng.integers(0, max(1, w // 4)))
            for _ in range(int(rng.integers(3, 14))):
                if x + size > w:
                    break
                g = np.kron(glyphs[rng.integers(len(glyphs))], np.ones((scale, scale)))
                img[y : y + size, x : x + size] = img[y : y + size, x : x + size] * (1 - g) + rng.uniform(0, 0.25) * g
                x += size - scale * int(rng.integers(0, 3))
            y += size + int(rng.integers(size // 2, size * 2))
        out[i] = np.clip(img, 0.0, 1.0)[None]
    return out


def _ppocr(file: str, h: int, w: int, imagenet_norm: bool) -> Callable[[Path], Case]:
    """A PP-OCR model shipped by the rapidocr-onnxruntime package, on synthetic text crops."""

    def build(_: Path) -> Case:
        import importlib.util

        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        if spec is None or spec.origin is None:
            raise SystemExit("PP-OCR cases need: pip install --no-deps rapidocr-onnxruntime")
        path = Path(spec.origin).parent / "models" / file
        specs = input_specs(load(path, check=False))
        if imagenet_norm:
            mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
            std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
        else:
            mean, std = np.float32(0.5), np.float32(0.5)
        name = specs[0].name

        def feeds(seed: int, n: int) -> list[dict[str, np.ndarray]]:
            return [{name: ((text_images(1, h, w, seed + k) - mean) / std).astype(np.float32)} for k in range(n)]

        return path, load_data(feeds(0, 16), specs), load_data(feeds(1000, 8), specs)

    return build


CASES: dict[str, Callable[[Path], Case]] = {
    "cnn": _digits("digits_cnn.onnx", (1, 8, 8), "digits_eval.npz"),
    "transformer": _digits("digits_transformer.onnx", (8, 8), "digits_seq_eval.npz"),
    "resnet18": _resnet18,
    "ppocr_cls": _ppocr("ch_ppocr_mobile_v2.0_cls_infer.onnx", 48, 192, False),
    "ppocr_det": _ppocr("ch_PP-OCRv4_det_infer.onnx", 320, 320, True),
    "ppocr_rec": _ppocr("ch_PP-OCRv4_rec_infer.onnx", 48, 320, False),
}


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over our feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # newer onnxruntime versions call it
        pass


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as working directory: ORT's quantization tools drop temporary files into it."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _ort_static(src: Path, out: Path, calib: Dataset) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with inside(out.parent):
        quantize_static(str(src), str(out), _Reader(calib.feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ort_dynamic(src: Path, out: Path, calib: Dataset | None = None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with inside(out.parent):
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)


def _prep(src: Path, out: Path) -> Path:
    """ONNX Runtime's ``quant_pre_process`` of `src`, written next to `out`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prep = out.with_name(out.stem + "_prep.onnx")
    with inside(out.parent):
        try:
            quant_pre_process(str(src), str(prep))
        except Exception:  # its symbolic shape inference gives up on some graphs; the documented fallback
            quant_pre_process(str(src), str(prep), skip_symbolic_shape=True)
    return prep


def _ort_prep(src: Path, out: Path, calib: Dataset) -> None:
    _ort_static(_prep(src, out), out, calib)


def _ort_prep_dynamic(src: Path, out: Path, calib: Dataset | None = None) -> None:
    _ort_dynamic(_prep(src, out), out)


def _ours(src: Path, out: Path, calib: Dataset | None, options: dict[str, object] | None = None,
          tolerance: float | None = None) -> None:
    if (options or {}).get("mode") == "dynamic":
        calib = None  # dynamic mode needs no data: run it without any
    result = onnxopt.optimize(src, passes=[("quantize", options or {})], calib=calib, validate=False, output=out,
                              tolerance=tolerance)
    result.save(out)


def _makers(mode: str, fallback: float | None,
            extra: dict[str, object] | None) -> list[tuple[str, Callable[[Path, Path, Dataset], None]]]:
    """(label, quantizer) of every variant of `mode`; ours first."""
    base: dict[str, object] = {"mode": "dynamic", "dynamic_conv": True} if mode == "dynamic" else {}
    suffix = " dynamic" if mode == "dynamic" else ""
    makers: list[tuple[str, Callable[[Path, Path, Dataset], None]]] = [
        (f"onnxopt{suffix}", lambda s, o, c: _ours(s, o, c, base))]
    if extra:
        label = f"onnxopt{suffix} " + " ".join(f"{k}={v}" for k, v in extra.items())
        makers.append((label, lambda s, o, c: _ours(s, o, c, {**base, **extra})))
    if fallback is not None and mode == "static":
        makers.append(("onnxopt auto", lambda s, o, c: _ours(s, o, c, {"fallback": "auto"}, fallback)))
    if mode == "dynamic":
        return makers + [("ort dynamic", _ort_dynamic), ("ort+prep dynamic", _ort_prep_dynamic)]
    return makers + [("ort", _ort_static), ("ort+prep", _ort_prep)]


def _timed(fn: Callable[[Path, Path, Dataset], None], src: Path, out: Path, calib: Dataset) -> float:
    t0 = time.perf_counter()
    fn(src, out, calib)
    return time.perf_counter() - t0


def _loads(path: Path) -> str | None:
    try:
        session(path)
        return None
    except ModelError as exc:
        return str(exc)


def _parse_options(text: str) -> dict[str, object]:
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    return {k.strip(): v.strip() for k, v in pairs}


def run_case(name: str, tmp: Path, runs: int, fallback: float | None,
             extra: dict[str, object] | None = None, mode: str = "static") -> list[dict[str, object]]:
    src, calib, evald = CASES[name](tmp)
    makers = _makers(mode, fallback, extra)
    variants: dict[str, tuple[Path, float]] = {"fp32": (src, 0.0)}
    broken: dict[str, str] = {}
    for label, fn in makers:
        out = tmp / f"{name}_{len(variants) + len(broken)}.onnx"
        secs = _timed(fn, src, out, calib)
        problem = _loads(out)
        if problem:
            broken[label] = problem
        else:
            variants[label] = (out, secs)
    lat = bench([p for p, _ in variants.values()], runs=runs, threads=1, data=evald, memory=False)
    rows = []
    base_size = file_size(src)
    for (label, (path, secs)), ms, ratio in zip(variants.items(), lat.latencies, lat.ratios):
        cmp = compare_models(src, path, evald)
        out = cmp.outputs[0]
        fused = fusion_report_file(path)
        rows.append({
            "model": name, "variant": label, "quant_s": secs, "size_mb": file_size(path) / 2**20,
            "size_x": file_size(path) / base_size, "int_kernels": fused.integer_kernels,
            "float_left": fused.float_compute, "top1_agree": out.top1, "rel_l2": out.rel_l2, "cosine": out.cosine,
            "accuracy": cmp.accuracy_b, "median_ms": ms.median_ms, "latency_x": ratio,
        })
    ours = next(r for r in rows if r["variant"] == makers[0][0])
    for r in rows:
        r["ours_speedup"] = float(r["median_ms"]) / float(ours["median_ms"])
    for label, problem in broken.items():
        rows.append({"model": name, "variant": f"{label} (INVALID: {problem[:90]})"})
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict[str, object]]) -> None:
    cols = ["model", "variant", "quant_s", "size_mb", "size_x", "int_kernels", "float_left", "top1_agree",
            "rel_l2", "cosine", "accuracy", "median_ms", "latency_x", "ours_speedup"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,transformer,resnet18", help="comma list of " + ",".join(CASES))
    parser.add_argument("--runs", type=int, default=100, help="timed runs per model (after 5 warm-up runs)")
    parser.add_argument("--extra", default="", help="also run quantize with these options, e.g. "
                        "calibrate=percentile,bias_correction=true")
    parser.add_argument("--fallback", type=float, default=None,
                        help="also run quantize fallback=auto with this tolerance (relative L2; static mode)")
    parser.add_argument("--mode", choices=("static", "dynamic"), default="static",
                        help="static: against quantize_static; dynamic: against quantize_dynamic")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmpdir:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name not in CASES:
                parser.error(f"unknown model {name} (choose from {', '.join(CASES)})")
            rows.extend(run_case(name, Path(tmpdir), args.runs, args.fallback, _parse_options(args.extra),
                                 args.mode))
            print_table([r for r in rows if r["model"] == name])
    print("\nlatency_x: median latency / fp32 (one thread, interleaved); ours_speedup: variant's median / ours")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
