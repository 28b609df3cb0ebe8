"""Are the speed passes at their default options ever slower than the original? Before/after latency ratios.

For each model and pipeline (default: ``fold,factorize`` and ``fold,channels``) the command line runs as a
user would run it (a subprocess, default options, validation and timing on, ONNX Runtime's default threads
for the passes' own speed checks), then the original and the written model are timed against each other
as the project measures latency: one process, the same feed, interleaved blocks of at least 50 ms, the
order alternating, the median of the block ratios; once with one intra-op thread and once with
the default threads; the whole measurement ``--repeats`` times, quoted as a spread (optimized / original,
below 1 is faster). The passes' decisions are printed beside it (layers factorized, units removed, notes).

Models: PP-OCRv4 rec / det / cls from ``rapidocr-onnxruntime`` fed their own kind of input
(`models.real`: rendered text lines and pages), and the digits CNN on its held-out images.

    python -m benchmarks.speed_passes                       # every model, both pipelines, 2 repeats
    python -m benchmarks.speed_passes --models ppocr_cls,digits_cnn --pipelines fold,channels
    python -m benchmarks.speed_passes --kernels             # what ONNX Runtime's CPU kernels like here

``--kernels`` prints the measurements behind docs/channels.md and docs/factorize.md: a 3x3 Conv's time
as its output (and input) channel count steps by 2, a Gemm's as its output width steps by 4, and a 3x3
Conv against its (3x1, 1x3) and Tucker-2 chains at several ranks. Run it on a quiet machine (no test suite
or other benchmark beside it); busy machines move these ratios by 15-50 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxopt.runtime import session
from onnxopt.timing import timed_block

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
REAL = ("ppocr_rec", "ppocr_det", "ppocr_cls")
BLOCK_MS = 50.0
BLOCKS = 7
Feed = dict[str, np.ndarray]


# ------------------------------------------------------------------------------ measuring
def block_ratios(a: Path | bytes, b: Path | bytes, feed: Feed, threads: int | None, blocks: int = BLOCKS,
                 block_ms: float = BLOCK_MS, feed_b: Feed | None = None) -> list[float]:
    """Per-block ratios b/a: interleaved blocks of at least `block_ms`, the order alternating (`feed_b`: b's
    own feed when its input differs)."""
    sessions = [_session(m, threads) for m in (a, b)]
    feeds = [feed, feed_b or feed]
    reps = []
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
        one = statistics.median(timed_block(s, f, 1) for _ in range(3))
        reps.append(max(1, int(np.ceil(block_ms / max(one, 1e-6)))))
    ratios = []
    for k in range(blocks):
        t = {}
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            t[i] = timed_block(sessions[i], feeds[i], reps[i])
        ratios.append(t[1] / t[0])
    return ratios


def _session(model: Path | bytes, threads: int | None) -> Any:
    if isinstance(model, Path):
        return session(model, threads=threads)
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
        f.write(model)
    try:
        return session(f.name, threads=threads)
    finally:
        os.unlink(f.name)


def _spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}x" if abs(hi - lo) < 0.005 else f"{lo:.2f}-{hi:.2f}x"


# ------------------------------------------------------------------------------ models and data
def _cases(names: list[str], work: Path) -> dict[str, tuple[Path, str, dict[str, np.ndarray]]]:
    """name -> (model file, --data argument, one feed to time on)."""
    cases = {}
    for name in names:
        if name == "digits_cnn":
            with np.load(MODELS / "digits_eval.npz") as d:
                feed = {"input": d["input"][:16]}
            cases[name] = (MODELS / "digits_cnn.onnx", str(MODELS / "digits_eval.npz"), feed)
            continue
        from models import real

        path = real.model_path(name)
        if path is None:
            print(f"skip {name}: its package is not installed (pip install --no-deps rapidocr-onnxruntime)")
            continue
        _, held = real.build(name, work, calib=2, held=4)
        with np.load(sorted(held.glob("*.npz"))[0]) as d:
            feed = {k: d[k] for k in d.files}
        cases[name] = (path, str(held), feed)
    return cases


def _optimize(model: Path, data: str, pipeline: str, out: Path, fresh: bool) -> dict[str, Any]:
    report = out.with_suffix(".json")
    env = dict(os.environ, **({"ONNXOPT_CACHE_DIR": "off"} if fresh else {}))
    cmd = [sys.executable, "-m", "onnxopt", str(model), "--passes", pipeline, "--data", data, "-o", str(out),
           "--report", str(report)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr}")
    doc = json.loads(report.read_text())
    doc["warning"] = [line for line in run.stderr.splitlines() if "WARNING:" in line]
    return doc


def _decisions(doc: dict[str, Any]) -> str:
    stats = doc["passes"][-1]
    summary = stats["summary"]
    keys = ("layers_factorized", "timed_layers", "units_removed", "macs_removed", "speed", "model_speed")
    bits = [f"{k}={summary[k]}" for k in keys if k in summary]
    timed_out = sum("ONNX Runtime" in s["reason"] or "not faster" in s["reason"] for s in stats["skipped"])
    if timed_out:
        bits.append(f"declined_by_timing={timed_out}")
    return ", ".join(bits) + "".join(f"\n      note: {n}" for n in stats["notes"])


def run_models(names: list[str], pipelines: list[str], repeats: int, fresh: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="speed-passes-") as tmp:
        work = Path(tmp)
        for name, (model, data, feed) in _cases(names, work).items():
            for pipeline in pipelines:
                print(f"\n{name}: {pipeline}")
                ratios: dict[str, list[float]] = {"1 thread": [], "default threads": []}
                for r in range(repeats):
                    out = work / f"{name}.{pipeline.replace(',', '_')}.{r}.onnx"
                    doc = _optimize(model, data, pipeline, out, fresh)
                    table = doc["latency"]["ratios"][-1] if doc.get("latency") else float("nan")
                    print(f"  run {r + 1}: {_decisions(doc)}")
                    print(f"    table latency {table:.3f}x{'  ' + doc['warning'][0] if doc['warning'] else ''}")
                    for label, threads in (("1 thread", 1), ("default threads", None)):
                        blocks = block_ratios(model, out, feed, threads)
                        ratios[label].append(statistics.median(blocks))
                        print(f"    {label}: {statistics.median(blocks):.3f}x (blocks {_spread(blocks)})")
                for label, values in ratios.items():
                    worst = max(values)
                    verdict = "ok" if worst <= 1.02 else "SLOWER"
                    print(f"  {label}: {_spread(values)} over {repeats} runs: {verdict} (<= 1.02x)")


# ------------------------------------------------------------------------------ kernels
def _model(nodes: list[onnx.NodeProto], x_shape: list[int], inits: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(nodes, "k", [helper.make_tensor_value_info("x", 1, x_shape)],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _conv(cin: int, cout: int, hw: int, k: int = 3) -> bytes:
    rng = np.random.default_rng(0)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4)
    return _model([node], [1, cin, hw, hw], {"w": rng.standard_normal((cout, cin, k, k))})


def _gemm(k: int, n: int) -> bytes:
    node = helper.make_node("Gemm", ["x", "w"], ["y"])
    return _model([node], [64, k], {"w": np.random.default_rng(0).standard_normal((k, n))})


def _chain(c: int, hw: int, kind: str, rank: int) -> bytes:
    rng = np.random.default_rng(0)
    if kind == "spatial":
        nodes = [helper.make_node("Conv", ["x", "a"], ["t"], pads=[1, 0, 1, 0]),
                 helper.make_node("Conv", ["t", "b"], ["y"], pads=[0, 1, 0, 1])]
        inits = {"a": rng.standard_normal((rank, c, 3, 1)), "b": rng.standard_normal((c, rank, 1, 3))}
    else:
        nodes = [helper.make_node("Conv", ["x", "a"], ["t"]), helper.make_node("Conv", ["t", "b"], ["u"], pads=[1] * 4),
                 helper.make_node("Conv", ["u", "c"], ["y"])]
        inits = {"a": rng.standard_normal((rank, c, 1, 1)), "b": rng.standard_normal((rank, rank, 3, 3)),
                 "c": rng.standard_normal((c, rank, 1, 1))}
    return _model(nodes, [1, c, hw, hw], inits)


def _sweep(title: str, reference: bytes, cases: list[tuple[str, bytes, float, Feed]], feed: Feed,
           threads: int | None) -> None:
    print(f"\n{title} (threads: {threads or 'default'}); time and MACs relative to the reference")
    for label, model, macs, case_feed in cases:
        blocks = block_ratios(reference, model, feed, threads, blocks=5, block_ms=20.0, feed_b=case_feed)
        r = statistics.median(blocks)
        print(f"  {label:>14}: time {r:.2f}x  MACs {macs:.2f}x  time per MAC {r / macs:.2f}x")


def run_kernels(threads: list[int | None]) -> None:
    rng = np.random.default_rng(1)
    hw = 40

    def image(c: int, size: int = hw) -> Feed:
        return {"x": rng.standard_normal((1, c, size, size)).astype(np.float32)}

    x32 = image(32)
    for t in threads:
        _sweep(f"Conv 3x3 32->C at {hw}x{hw}, against C=32", _conv(32, 32, hw),
               [(f"C={c}", _conv(32, c, hw), c / 32, x32) for c in range(24, 50, 2)], x32, t)
        _sweep(f"Conv 3x3 C->32 at {hw}x{hw}, against C=32", _conv(32, 32, hw),
               [(f"C={c}", _conv(c, 32, hw), c / 32, image(c)) for c in range(24, 50, 4)], x32, t)
        g = {"x": rng.standard_normal((64, 256)).astype(np.float32)}
        _sweep("Gemm [64,256]x[256,N], against N=64", _gemm(256, 64),
               [(f"N={n}", _gemm(256, n), n / 64, g) for n in range(48, 84, 4)], g, t)
        c = 64
        xc = image(c)
        full = 9 * c * c
        cases = [(f"spatial r={r}", _chain(c, hw, "spatial", r), 6 * c * r / full, xc) for r in (16, 32, 48, 64)]
        cases += [(f"tucker r={r}", _chain(c, hw, "tucker", r), (2 * c * r + 9 * r * r) / full, xc)
                  for r in (16, 32, 48)]
        _sweep(f"Conv 3x3 {c}->{c} at {hw}x{hw} against its factored chains", _conv(c, c, hw), cases, xc, t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join([*REAL, "digits_cnn"]), help="comma-separated model names")
    p.add_argument("--pipelines", nargs="+", default=["fold,factorize", "fold,channels"])
    p.add_argument("--repeats", type=int, default=2, help="whole measurements per model and pipeline")
    p.add_argument("--fresh", action="store_true", help="no speed cache: the passes measure everything anew")
    p.add_argument("--kernels", action="store_true", help="only the kernel sweeps behind the docs")
    args = p.parse_args(argv)
    if args.kernels:
        run_kernels([1, None])
    else:
        run_models(args.models.split(","), args.pipelines, args.repeats, args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
