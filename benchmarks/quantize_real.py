"""Benchmark: the quantize pass on real third-party models against ONNX Runtime's quantizer used as its docs
recommend, and against fp32.

For each real model of `models.real` (and the MiniLM sentence encoder of `models.minilm` when it has been
built): 16 calibration feeds and 6 held-out feeds of the model's own kind, then

- ``fp32``: the model as shipped;
- ``ort``: ONNX Runtime's anchor (``quant_pre_process``, falling back to ``skip_symbolic_shape=True`` and
  then to ``skip_optimization=True``; opset raised to 13; ``quantize_static`` QDQ, per-channel S8 weights,
  U8 activations, MinMax) run in a temporary working directory; ``ort-dyn`` (``quantize_dynamic``, S8) for
  transformers;
- ``onnxopt``: ``onnxopt MODEL --passes fold,quantize --calib C --data H -o OUT``, the command line in a
  subprocess with default options, as a user runs it.

Reported per variant: output agreement with fp32 on the held-out feeds (worst output's cosine and relative L2,
worst output channel = worst slice of the first non-trivial axis, argmax agreement of class-score outputs),
latency over fp32 interleaved in one process (timed blocks of >= 50 ms, rotating order, median of the
round ratios, with one intra-op thread and with ONNX Runtime's default threads), file size over fp32, tool
seconds (ORT: quantize_static, pre-processing beside it; onnxopt: the quantize pass alone, fold and the whole
command's wall time beside it) and the
integer kernels of ONNX Runtime's optimized graph. The last rows are the geometric means of onnxopt's latency
over ORT's.

Run from the repository root (a quiet machine for latency; counts and errors do not depend on load)::

    python -m benchmarks.quantize_real
    python -m benchmarks.quantize_real --models ppocr_rec,dddd_ocr --threads 1 --json out.json
    python -m benchmarks.quantize_real --no-latency          # accuracy, size, kernels and tool time only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxopt.passes.quantize.check import INTEGER_KERNELS, fusion_report_file
from onnxopt.passes.quantize.score import class_outputs, score_outputs, worst_slice
from onnxopt.passes.quantize.speed import interleave

from benchmarks.quantize import inside
from onnxopt.data import load_data
from onnxopt.io import file_size, load
from onnxopt.runtime import run, session

__all__ = ["main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = {"minilm"}


def _cases(tmp: Path, names: Sequence[str] | None) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (model, calib folder, held folder)."""
    sys.path.insert(0, str(ROOT))
    from models import real

    found: dict[str, tuple[Path, Path, Path]] = {}
    for name, path in real.available().items():
        if names and name not in names:
            continue
        calib, held = real.build(name, tmp / "data")
        found[name] = (path, calib, held)
    if (not names or "minilm" in names) and importlib.util.find_spec("models.minilm") is not None:
        from models import minilm

        built = minilm.built(tmp / "minilm")
        if built is not None:
            found["minilm"] = built
    return found


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def ort_best(src: Path, dst: Path, calib: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """MEASURING.md's anchor; returns how it went (pre-processing variant, seconds, error)."""
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info: dict[str, Any] = {}
    pre = dst.with_name(dst.stem + "_pre.onnx")
    t0 = time.perf_counter()
    with inside(dst.parent):
        for label, kw in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True}),
                          ("skip_optimization", {"skip_symbolic_shape": True, "skip_optimization": True})):
            try:
                quant_pre_process(str(src), str(pre), **kw)
                info["pre_process"] = label
                break
            except Exception as exc:  # noqa: BLE001 - the documented fallbacks
                info.setdefault("pre_process_errors", []).append(f"{label}: {type(exc).__name__}")
        else:
            onnx.save(onnx.load(str(src)), str(pre))
            info["pre_process"] = "none"
        proto = onnx.load(str(pre))
        if _default_opset(proto) < 13:
            onnx.save(version_converter.convert_version(proto, 13), str(pre))
        info["pre_seconds"] = time.perf_counter() - t0
        names = {i.name for i in onnx.load(str(pre), load_external_data=False).graph.input}
        t1 = time.perf_counter()
        try:
            quantize_static(str(pre), str(dst), _Reader([{k: v for k, v in f.items() if k in names} for f in calib]),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # noqa: BLE001 - reported, the row says the anchor failed
            info["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc) else ''}"
        info["tool_seconds"] = time.perf_counter() - t1
    return info


def ort_dynamic(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    with inside(dst.parent):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return {"tool_seconds": time.perf_counter() - t0}


def ours(src: Path, dst: Path, calib: Path, held: Path) -> dict[str, Any]:
    """onnxopt as a user runs it: the command line in a subprocess, default options (validation on the
    held-out feeds and the latency row included). ``tool_seconds`` is the quantize pass alone (from the run's
    JSON report), ``cli_seconds`` the whole command."""
    report = dst.with_suffix(".json")
    command = [sys.executable, "-m", "onnxopt", str(src), "--passes", "fold,quantize", "--calib", str(calib),
               "--data", str(held), "-o", str(dst), "--report", str(report)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    cli_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"onnxopt failed on {src.name} ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    fold, quantize = json.loads(report.read_text())["passes"]
    info: dict[str, Any] = {"tool_seconds": quantize["seconds"], "fold_seconds": fold["seconds"],
                            "cli_seconds": cli_seconds, "notes": quantize["notes"]}
    for key in ("mode", "speed_ratio", "float_nodes", "kept_float"):
        if key in quantize["summary"]:
            info[key] = quantize["summary"][key]
    return info


def _feeds(folder: Path, model: Path) -> list[dict[str, np.ndarray]]:
    from onnxopt.data import input_specs

    return load_data(folder, input_specs(load(model, check=False))).feeds


def _outputs(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = session(path, threads=1)
    return [run(sess, f) for f in feeds]


def accuracy(src: Path, path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    model = load(src, check=False)
    names = [o.name for o in model.graph.outputs]
    refs, outs = _outputs(src, feeds), _outputs(path, feeds)
    scores = score_outputs(names, refs, outs, class_outputs(model.graph))
    worst = [worst_slice([r[k] for r in refs], [o[k] for o in outs]) for k in range(len(names))]
    worst = [w for w in worst if w is not None]
    rows = [_row_cosine([r[k] for r in refs], [o[k] for o in outs]) for k in range(len(names))
            if np.asarray(refs[0][k]).ndim == 2 and np.asarray(refs[0][k]).shape[1] > 16]
    return {"cosine": scores.cosine, "rel_l2": scores.rel_l2, "argmax": scores.argmax,
            "worst_channel": max(worst) if worst else None, "row_cosine": min(rows) if rows else None}


def _row_cosine(refs: list[np.ndarray], outs: list[np.ndarray]) -> float:
    """Mean cosine of the rows of a [batch, features] output (a sentence embedding per row)."""
    a = np.concatenate([np.asarray(r, np.float64) for r in refs])
    b = np.concatenate([np.asarray(o, np.float64) for o in outs])
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def kernels(path: Path) -> dict[str, int]:
    report = fusion_report_file(path, threads=1)
    return {op: n for op, n in sorted(report.ops.items()) if op in INTEGER_KERNELS}


def latency(paths: dict[str, Path], feed: dict[str, np.ndarray], threads: int | None,
            rounds: int) -> dict[str, float]:
    """Median over rounds of each variant's time over fp32's (interleaved, blocks >= 50 ms)."""
    labels = list(paths)
    sessions = [session(paths[k], threads=threads) for k in labels]
    times = interleave(sessions, feed, block_s=0.05, rounds=rounds)
    base = np.asarray(times[0])
    return {k: float(np.median(np.asarray(t) / base)) for k, t in zip(labels, times)}


def run_model(name: str, src: Path, calib_dir: Path, held_dir: Path, tmp: Path, *, threads: list[int | None],
              rounds: int, do_latency: bool) -> list[dict[str, Any]]:
    calib, held = _feeds(calib_dir, src), _feeds(held_dir, src)
    variants: dict[str, tuple[Path, dict[str, Any]]] = {"fp32": (src, {})}
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    ort_info = ort_best(src, out / "ort.onnx", calib)
    if "error" not in ort_info:
        variants["ort"] = (out / "ort.onnx", ort_info)
    if name in TRANSFORMERS:
        variants["ort-dyn"] = (out / "ort_dyn.onnx", ort_dynamic(src, out / "ort_dyn.onnx"))
    variants["onnxopt"] = (out / "onnxopt.onnx", ours(src, out / "onnxopt.onnx", calib_dir, held_dir))
    lat: dict[str | None, dict[str, float]] = {}
    if do_latency:
        for t in threads:
            lat[t] = latency({k: p for k, (p, _) in variants.items()}, held[0], t, rounds)
    rows = []
    base_size = file_size(src)
    for label, (path, info) in variants.items():
        row: dict[str, Any] = {"model": name, "variant": label, **info}
        row.update(accuracy(src, path, held))
        row["size_x"] = file_size(path) / base_size
        row["kernels"] = kernels(path) if label != "fp32" else {}
        for t, ratios in lat.items():
            row[f"latency_t{t or 'default'}"] = ratios[label]
        rows.append(row)
    if "error" in ort_info:
        rows.append({"model": name, "variant": "ort", "error": ort_info["error"]})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return " ".join(f"{k.replace('QLinear', 'Q')} {n}" for k, n in v.items()) or "-"
    return str(v)


COLUMNS = ["model", "variant", "cosine", "rel_l2", "worst_channel", "argmax", "row_cosine", "latency_t1",
           "latency_tdefault", "size_x", "pre_seconds", "tool_seconds", "cli_seconds",
           "kernels"]


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> None:
    cols = [c for c in columns if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    sys.stdout.flush()


def geomeans(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Geometric mean over models of onnxopt's latency over ORT's (and over fp32), per thread setting."""
    out: dict[str, float] = {}
    for key in ("latency_t1", "latency_tdefault"):
        pairs = []
        fp = []
        for model in {r["model"] for r in rows}:
            mine = next((r.get(key) for r in rows if r["model"] == model and r["variant"] == "onnxopt"), None)
            ort = next((r.get(key) for r in rows if r["model"] == model and r["variant"] == "ort"), None)
            if mine is not None and ort is not None:
                pairs.append(mine / ort)
            if mine is not None:
                fp.append(mine)
        if pairs:
            out[f"onnxopt/ort {key}"] = float(np.exp(np.mean(np.log(pairs))))
        if fp:
            out[f"onnxopt/fp32 {key}"] = float(np.exp(np.mean(np.log(fp))))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma list (default: every real model installed)")
    parser.add_argument("--threads", default="1,0", help="intra-op threads to time with (0: ONNX Runtime's default)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per latency measurement")
    parser.add_argument("--no-latency", action="store_true", help="skip timing")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    threads = [int(t) or None for t in args.threads.split(",") if t.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-qreal-") as tmpdir:
        tmp = Path(tmpdir)
        for name, (src, calib, held) in _cases(tmp, names or None).items():
            new = run_model(name, src, calib, held, tmp, threads=threads, rounds=args.rounds,
                            do_latency=not args.no_latency)
            print_table(new)
            rows.extend(new)
    print()
    print_table(rows)
    for key, value in geomeans(rows).items():
        print(f"geomean {key}: {value:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "geomeans": geomeans(rows)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
