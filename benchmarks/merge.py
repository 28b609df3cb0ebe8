"""merge benchmark: ensemble and soup accuracy on digits, and one merged session vs members run in turn.

Run from the repository root::

    python -m benchmarks.merge [--runs 200] [--quick]

Accuracy: the seeded digits MLPs (``digits_mlp_seed{1,2,3}.onnx``) alone and merged with each
ensemble mode; the fine-tuned copies (``digits_mlp_ft{1,2,3}.onnx``) alone and as a uniform soup.

Latency: for three members, one process times, interleaved round by round, (a) the members' own
sessions run one after another, (b) one merged session with the sequential executor, (c) the
merged session with ``ORT_PARALLEL`` and 2 inter-op threads (independent member branches may run
at the same time). Every session has 1 intra-op thread. Ratios are medians over (a). Then
`onnxopt.bench.bench` (interleaved, 1 thread) compares the soup with one of its members.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.digits import CNN_PATH, MLP_EVAL_PATH, MLP_PATH, load_npz
from models.digits_seeds import FINETUNE_PATHS, SEED_PATHS
from models.resnet import build_resnet_tiny
from onnxopt.bench import bench
from onnxopt.merge import merge
from onnxopt.report import table
from onnxopt.runtime import run, session

__all__ = ["main"]


def _accuracy(path: Path, x: np.ndarray, labels: np.ndarray) -> float:
    out = run(session(path, threads=1), {"input": x})[0]
    return float(np.mean(out.argmax(axis=-1) == labels))


def accuracy_table(tmp: Path) -> str:
    x, labels = load_npz(MLP_EVAL_PATH)
    rows = [[p.name, "member", f"{_accuracy(p, x, labels) * 100:.2f}%"] for p in (MLP_PATH, *SEED_PATHS)]
    for mode in ("mean", "softvote", "vote", "max"):
        out = tmp / f"seeds_{mode}.onnx"
        merge(SEED_PATHS, combine=mode, output=out)
        rows.append([f"seeds 1-3 {mode}", "ensemble (3x cost)", f"{_accuracy(out, x, labels) * 100:.2f}%"])
    rows += [[p.name, "soup ingredient", f"{_accuracy(p, x, labels) * 100:.2f}%"] for p in FINETUNE_PATHS]
    soup = tmp / "soup.onnx"
    merge(FINETUNE_PATHS, combine="soup", output=soup)
    rows.append(["ft 1-3 soup", "soup (1x cost)", f"{_accuracy(soup, x, labels) * 100:.2f}%"])
    ens = tmp / "ft_mean.onnx"
    merge(FINETUNE_PATHS, combine="mean", output=ens)
    rows.append(["ft 1-3 mean", "ensemble (3x cost)", f"{_accuracy(ens, x, labels) * 100:.2f}%"])
    return table(rows, ["model", "kind", f"accuracy ({len(labels)} images)"])


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def _parallel_session(path: Path, spinning: bool) -> ort.InferenceSession:
    """ORT_PARALLEL executor, 2 inter-op threads, 1 intra-op thread; optionally without spin-waiting."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.inter_op_num_threads = 2
    opts.intra_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _interleaved(cases: list[tuple[str, Callable[[], object]]], runs: int) -> list[list[float]]:
    """Milliseconds per run of each case, the cases rotated round by round after 10 warm-up rounds."""
    for _ in range(10):
        for _, fn in cases:
            fn()
    times: list[list[float]] = [[] for _ in cases]
    for r in range(runs):
        for k in range(len(cases)):
            i = (k + r) % len(cases)
            times[i].append(_timed(cases[i][1]))
    return times


def latency_rows(label: str, members: list[Path], merged: Path, feed: dict[str, np.ndarray],
                 runs: int) -> list[list[str]]:
    """Three phases, each against its own reference: a parallel session's worker threads can keep
    spinning after a run, so it is never timed in the same phase as the members."""
    batch = str(next(iter(feed.values())).shape[0])
    member_sessions = [session(p, threads=1) for p in members]
    seq = session(merged, threads=1)
    phases = [
        ("members in turn", lambda: [run(s, feed) for s in member_sessions], "merged, sequential", None),
        ("merged, sequential", lambda: run(seq, feed), "merged, parallel inter-op 2", True),
        ("merged, sequential", lambda: run(seq, feed), "merged, parallel, no spinning", False),
    ]
    rows: list[list[str]] = []
    for ref_name, ref_fn, name, spinning in phases:
        other = seq if spinning is None else _parallel_session(merged, spinning)
        times = _interleaved([(ref_name, ref_fn), (name, lambda o=other: run(o, feed))], runs)
        base = float(np.median(times[0]))
        for case, t in ((ref_name, times[0]), (name, times[1])):
            rows.append([label, batch, case, f"{np.min(t):.3f}", f"{np.median(t):.3f}", f"{np.percentile(t, 90):.3f}",
                         f"{np.median(t) / base:.3f}x" + ("" if spinning is None else " vs sequential")])
        del other
    return rows


def latency_table(tmp: Path, runs: int, quick: bool) -> str:
    x_flat, _ = load_npz(MLP_EVAL_PATH)
    x_img, _ = load_npz(CNN_PATH.parent / "digits_eval.npz")
    resnets = [build_resnet_tiny(tmp / f"resnet_tiny_{s}.onnx", batch="batch", seed=s) for s in range(3)]
    cnns = [CNN_PATH] * 3
    groups = [("3 digits MLPs", list(SEED_PATHS), "input", x_flat), ("3 digits CNNs", cnns, "input", x_img)]
    groups.append(("3 ResNet-tiny", resnets, "input", None))
    rows: list[list[str]] = []
    for label, members, name, data in groups:
        merged = tmp / f"{label.replace(' ', '_')}.onnx"
        merge(members, combine="mean", output=merged, names=["a", "b", "c"])
        for batch in ((1,) if quick else (1, 32)):
            if data is None:
                x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
            else:
                x = np.ascontiguousarray(data[:batch])
            n = max(20, runs // 4) if label.startswith("3 ResNet") else runs
            rows += latency_rows(label, members, merged, {name: x}, n)
    return table(rows, ["members", "batch", "run", "min ms", "median ms", "p90 ms", "vs members"])


def soup_bench(tmp: Path, runs: int) -> str:
    soup = tmp / "soup.onnx"
    if not soup.exists():
        merge(FINETUNE_PATHS, combine="soup", output=soup)
    ens = tmp / "ft_mean.onnx"
    if not ens.exists():
        merge(FINETUNE_PATHS, combine="mean", output=ens)
    x, _ = load_npz(MLP_EVAL_PATH)
    from onnxopt.data import Dataset

    data = Dataset([{"input": x[:32]}], [None], "digits_mlp_eval[:32]")
    res = bench([FINETUNE_PATHS[0], soup, ens], runs=runs, threads=1, data=data, memory=False)
    rows = [[Path(lat.model).name, f"{lat.median_ms:.3f}", f"{ratio:.3f}x"]
            for lat, ratio in zip(res.latencies, res.ratios)]
    return table(rows, ["model", "median ms (batch 32)", "vs one member"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="interleaved timed runs per case (default 200)")
    p.add_argument("--quick", action="store_true", help="batch 1 only")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxopt-merge-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print(accuracy_table(tmp))
        print()
        print(latency_table(tmp, args.runs, args.quick))
        print("1 intra-op thread per session; runs interleaved round by round in one process; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the end.")
        print()
        print(soup_bench(tmp, args.runs))
        print("onnxopt.bench.bench, threads=1, interleaved.")


if __name__ == "__main__":
    main()
