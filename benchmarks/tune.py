"""Benchmark: ``onnxopt tune`` against the README's single-pass recipes and ONNX Runtime's quantizer.

Cases, each run the way a user runs it (the command line in a subprocess, wall time measured):

- ``digits``: the digits CNN with labels, ``--max-drop 1 --objective latency --threads 1``. The tuned
  model's held-out accuracy and latency are printed next to every single-pass recipe of the README
  (after ``fold``) and next to ONNX Runtime's ``quantize_static`` output (after ``quant_pre_process``,
  the way ONNX Runtime's documentation recommends), all on the held-out half of ``digits_eval.npz``
  that the search did not use, latency timed together in interleaved blocks (one thread). Targets:
  tuned <= 0.9x the fastest recipe that holds the drop, <= 0.9x ORT's, under 10 minutes on 2 cores.
- ``ppocr_det``, ``ppocr_rec``, ``ppocr_cls`` (rapidocr-onnxruntime, feeds from `models.real`):
  ``--tolerance 0.01 --metric cosine``; the tuned model (or tune's exit 1) next to fp32 and ORT's
  best int8 output, cosine on held-out feeds.

Run from the repository root::

    python -m benchmarks.tune                                # every case that is installed
    python -m benchmarks.tune --cases digits --minutes 7
    python -m benchmarks.tune --cases ppocr_cls,ppocr_rec --minutes 10 --workers 2

Latency figures from a busy machine are noise: rerun on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from benchmarks.quantize import inside
from onnxopt.data import Dataset, input_specs, load_data
from onnxopt.report import table
from onnxopt.tune.constraint import Constraint, Reference
from onnxopt.tune.objectives import careful_latency

__all__ = ["main", "README_RECIPES", "ort_int8"]

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

README_RECIPES: list[tuple[str, list[Any]]] = [
    ("fold", ["fold"]),
    ("fold,quantize", ["fold", "quantize"]),
    ("fold,prune sparsity=0.5", ["fold", ("prune", {"sparsity": 0.5})]),
    ("fold,prune sparsity=0.8", ["fold", ("prune", {"sparsity": 0.8})]),
    ("fold,prune criterion=activation sparsity=0.5", ["fold", ("prune", {"criterion": "activation", "sparsity": 0.5})]),
    ("fold,prune criterion=activation sparsity=0.8", ["fold", ("prune", {"criterion": "activation", "sparsity": 0.8})]),
    ("fold,channels ratio=0.5", ["fold", ("channels", {"ratio": 0.5})]),
    ("fold,channels ratio=0.5 reconstruct=true", ["fold", ("channels", {"ratio": 0.5, "reconstruct": True})]),
    ("fold,channels ratio=0.3 round_to=8", ["fold", ("channels", {"ratio": 0.3, "round_to": 8})]),
    ("fold,factorize rank_by=macs macs_target=0.5", ["fold", ("factorize", {"rank_by": "macs", "macs_target": 0.5})]),
    ("fold,factorize rank_by=macs macs_target=0.5 data_aware=true",
     ["fold", ("factorize", {"rank_by": "macs", "macs_target": 0.5, "data_aware": True})]),
]
"""The single-pass recipes the README quotes for the digits CNN (each after fold)."""


# ------------------------------------------------------------------------------------ ONNX Runtime's int8
class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._left = list(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self._left.pop(0) if self._left else None

    def rewind(self) -> None:  # newer onnxruntime calls it; one pass is all it gets
        pass


def ort_int8(src: Path, out: Path, calib: Dataset) -> Path:
    """ONNX Runtime's quantizer as its docs recommend: quant_pre_process, opset >= 13, QDQ, U8 activations,
    S8 per-channel weights, minmax calibration on the same feeds."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + ".pre.onnx")
    with inside(out.parent):  # its shape inference drops a temporary model into the working directory
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # its symbolic shape inference gives up on some graphs: the documented fallback
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        onnx.save(version_converter.convert_version(model, 13), str(pre))
    quantize_static(str(pre), str(out), _Feeds(calib.feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# ------------------------------------------------------------------------------------ tune as a user runs it
def run_tune(model: Path, calib: str, data: str, work: Path, constraint: list[str], *, minutes: float, workers: int,
             threads: int) -> tuple[int, float, dict[str, Any], str]:
    """``onnxopt tune`` in a subprocess: exit code, wall seconds, its JSON report and its printed text."""
    out, report = work / "tuned.onnx", work / "tune.json"
    command = [sys.executable, "-m", "onnxopt", "tune", str(model), "--calib", calib, "--data", data, *constraint,
               "--objective", "latency", "--threads", str(threads), "--workers", str(workers),
               "--budget-minutes", str(minutes), "--budget-trials", "10000", "-o", str(out), "--report", str(report),
               "--storage", f"sqlite:///{work / 'tune.db'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"onnxopt tune failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.returncode, seconds, json.loads(report.read_text()), proc.stdout + proc.stderr


def _held_out(data: Dataset, report: dict[str, Any]) -> Dataset:
    """The part of the evaluation data tune held out from its search."""
    return data.split(report["data"]["search_feeds"])[1]


def _summary(text: str) -> str:
    """tune's printed text up to the chosen model's line (its before/after table is printed below, remeasured)."""
    head, _, rest = text.strip().partition("\n\nchosen:")
    return head + ("\nchosen:" + rest.splitlines()[0] if rest else "")


def _tune_line(code: int, seconds: float, report: dict[str, Any]) -> str:
    s = report["study"]
    return (f"tune: exit {code}, {seconds / 60:.1f} min wall, {s['trials_total']} trials ({s['trials_complete']} "
            f"complete, {s['trials_pruned']} pruned, {s['trials_fail']} failed), {report['message']}")


# ------------------------------------------------------------------------------------ digits
def digits(work: Path, minutes: float, workers: int, threads: int) -> None:
    cnn, calib_file, eval_file = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_eval.npz"
    code, seconds, report, text = run_tune(cnn, str(calib_file), str(eval_file), work, ["--max-drop", "1"],
                                           minutes=minutes, workers=workers, threads=threads)
    print(_summary(text))
    inputs = input_specs(onnxopt.load(cnn))
    calib = load_data(calib_file, inputs)
    held = _held_out(load_data(eval_file, inputs), report)
    rows: list[tuple[str, Path]] = []
    for label, specs in README_RECIPES:
        path = work / f"single{len(rows)}.onnx"
        onnxopt.optimize(cnn, specs, calib=calib, validate=False, threads=threads).save(path)  # as timed below
        rows.append((label, path))
    rows.append(("ORT quantize_static (quant_pre_process, QDQ, per-channel)", ort_int8(cnn, work / "ort.onnx", calib)))
    if code == 0:
        rows.append(("onnxopt tune", work / "tuned.onnx"))
    reference = Reference(cnn, held, Constraint("accuracy", 1.0), threads=threads)
    drops = [reference.measure(path, threads=threads) for _, path in rows]
    latencies = careful_latency(cnn, [path for _, path in rows], held.feeds[0], threads=threads)
    table_rows = []
    for (label, _), m, lat in zip(rows, drops, latencies):
        table_rows.append([label, f"{m.comparison.accuracy_b * 100:.2f}%", f"{m.error:+.2f}",
                           f"{lat.ratio:.3f}x ({lat.low:.2f}-{lat.high:.2f})", f"{lat.median:.3f}x",
                           "yes" if m.error <= 1.0 else "no"])
    print(f"\ndigits CNN, {held.num_samples} held-out samples (fp32 {drops[0].comparison.accuracy_a * 100:.2f}%), "
          f"latency vs fp32 at {threads} thread(s): fastest interleaved blocks (spread over 3 rounds), median block "
          "ratio:")
    print(table(table_rows, ["model", "accuracy", "drop (pt)", "latency (spread)", "median", "holds 1 pt"]))
    single = [(lat.ratio, label) for (label, _), m, lat in zip(rows[:len(README_RECIPES)], drops, latencies)
              if m.error <= 1.0]
    fastest = min(single) if single else None
    ort = latencies[len(README_RECIPES)].ratio
    if code == 0:
        tuned = latencies[-1].ratio
        if fastest is not None:
            print(f"tuned / fastest single-pass recipe holding the drop ({fastest[1]}): {tuned / fastest[0]:.3f} "
                  "(target <= 0.9)")
        print(f"tuned / ORT quantize_static: {tuned / ort:.3f} (target <= 0.9)")
    print(_tune_line(code, seconds, report) + " (target: under 10 minutes on 2 cores)")


# ------------------------------------------------------------------------------------ PP-OCR
def ppocr(name: str, work: Path, minutes: float, workers: int, threads: int) -> None:
    from models import real

    path = real.model_path(name)
    if path is None:
        print(f"{name}: skipped: rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)")
        return
    calib_dir, held_dir = real.build(name, work, calib=16, held=12 if name != "ppocr_det" else 8)
    code, seconds, report, text = run_tune(path, str(calib_dir), str(held_dir), work,
                                           ["--tolerance", "0.01", "--metric", "cosine"], minutes=minutes,
                                           workers=workers, threads=threads)
    print(_summary(text))
    inputs = input_specs(onnxopt.load(path))
    calib = load_data(calib_dir, inputs)
    held = _held_out(load_data(held_dir, inputs), report)
    rows: list[tuple[str, Path]] = []
    try:
        rows.append(("ORT int8 (quant_pre_process, QDQ, per-channel)", ort_int8(path, work / "ort.onnx", calib)))
    except Exception as exc:  # ORT's tools fail on some exported graphs; say so and go on
        print(f"{name}: ORT's quantizer failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    if code == 0:
        rows.append(("onnxopt tune", work / "tuned.onnx"))
    if not rows:
        print(_tune_line(code, seconds, report))
        return
    reference = Reference(path, held, Constraint("cosine", 0.01), threads=threads)
    measured = [reference.measure(p, threads=threads) for _, p in rows]
    latencies = careful_latency(path, [p for _, p in rows], held.feeds[0], threads=threads)
    table_rows = [[label, f"{1 - m.error:.5f}", f"{lat.ratio:.3f}x ({lat.low:.2f}-{lat.high:.2f})",
                   f"{lat.median:.3f}x"] for (label, _), m, lat in zip(rows, measured, latencies)]
    print(f"\n{name}, {held.num_samples} held-out feeds, latency vs fp32 at {threads} thread(s):")
    print(table(table_rows, ["model", "worst output cosine", "latency (spread)", "median"]))
    if code == 0 and len(rows) == 2:
        print(f"tuned / ORT int8: {latencies[1].ratio / latencies[0].ratio:.3f}")
    print(_tune_line(code, seconds, report))


CASES = ("digits", "ppocr_det", "ppocr_rec", "ppocr_cls")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--minutes", type=float, default=7.0, help="tune's --budget-minutes per case (default 7)")
    p.add_argument("--workers", type=int, default=2, help="tune's --workers (default 2)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for latency (default 1)")
    p.add_argument("--keep", default=None, metavar="DIR", help="copy each case's tune report and output here")
    args = p.parse_args(argv)
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            raise SystemExit(f"unknown case '{case}' (choose from {', '.join(CASES)})")
        print(f"\n=== {case} ===")
        with tempfile.TemporaryDirectory(prefix=f"tune-{case}-") as tmp:
            if case == "digits":
                digits(Path(tmp), args.minutes, args.workers, args.threads)
            else:
                ppocr(case, Path(tmp), args.minutes, args.workers, args.threads)
            if args.keep:
                keep = Path(args.keep)
                keep.mkdir(parents=True, exist_ok=True)
                for name in ("tune.json", "tuned.onnx", "tuned.recipe.toml"):
                    if (Path(tmp) / name).is_file():
                        shutil.copyfile(Path(tmp) / name, keep / f"{case}.{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
