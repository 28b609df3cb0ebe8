"""Benchmark: quantizing a large external-data model, streaming weights, against quantize_dynamic.

The model: ``blocks`` blocks of ``MatMul(d x f) -> Relu -> MatMul(f x d)`` on an input ``[batch, d]``;
with the defaults (24 blocks, d=2048, f=8192) its weights are 3.2 GB of float32 in one external data
file. The builder writes the weights block by block straight to that file (never all in memory).

Each quantizer runs in a fresh child process, so its wall time and peak resident memory (maximum RSS)
are its own: ``onnxopt`` ``quantize`` in ``dynamic`` and in ``weight-only`` (int4, block 32) modes
through ``onnxopt.optimize`` (which also computes before/after statistics), the same pass alone
(``-pass``: load, quantize, save), and ``onnxruntime.quantization.quantize_dynamic`` with external
data. Needs about twice the model's size in
free disk. Run from the repository root::

    python -m benchmarks.quantize_scale                   # the 3.2 GB model
    python -m benchmarks.quantize_scale --blocks 4        # a 0.5 GB one
    python -m benchmarks.quantize_scale --cli             # the command line as users run it, against ORT

``--cli`` measures what a user meets: the ``onnxopt`` command itself as a subprocess with default options
(validation and the latency row on), ``onnxopt big.onnx --passes quantize --set quantize.mode=dynamic -o
q.onnx``, and ``quantize_dynamic`` in a subprocess of its own, alternating which goes first, ``--repeat``
times. Wall time is the subprocess's from start to exit (interpreter start-up and imports included);
peak memory is its maximum resident set size (``/usr/bin/time -f %M``, or the same figure from
``getrusage`` where that program is missing): the largest process of its tree, not their sum (the
command's own child processes, when it times the models in them, hold one model while it waits).
``--ort-preprocess`` adds ``quant_pre_process`` (external data) before ``quantize_dynamic`` as a third
row. Wall times on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["build_blocks_model", "main"]


def build_blocks_model(path: Path, *, blocks: int = 24, d: int = 2048, f: int = 8192, seed: int = 0) -> int:
    """Write the block model to `path` with its weights in `<name>.data`; return the weight bytes."""
    rng = np.random.default_rng(seed)
    data_name = f"{path.name}.data"
    inits, nodes = [], []
    offset = 0
    x = "input"
    with open(path.parent / data_name, "wb") as fh:
        for b in range(blocks):
            for k, shape in enumerate(((d, f), (f, d))):
                w = (rng.standard_normal(shape, dtype=np.float32) * np.float32(1.0 / np.sqrt(shape[0])))
                fh.write(w.tobytes())
                t = TensorProto(name=f"block{b}.w{k}", data_type=TensorProto.FLOAT, dims=list(shape))
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                offset += w.nbytes
                inits.append(t)
                del w
            h, r, y = f"block{b}.up", f"block{b}.relu", f"block{b}.out" if b < blocks - 1 else "output"
            nodes += [helper.make_node("MatMul", [x, f"block{b}.w0"], [h], name=f"block{b}.fc1"),
                      helper.make_node("Relu", [h], [r], name=f"block{b}.act"),
                      helper.make_node("MatMul", [r, f"block{b}.w1"], [y], name=f"block{b}.fc2")]
            x = y
    graph = helper.make_graph(nodes, "blocks",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return offset


def _child(method: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    if method == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, out, weight_type=QuantType.QInt8, use_external_data_format=True)
    elif method == "ort-pre-dynamic":
        from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

        pre = Path(out).with_name("pre.onnx")
        quant_pre_process(src, str(pre), save_as_external_data=True, all_tensors_to_one_file=True,
                          external_data_location="pre.onnx.data")
        quantize_dynamic(str(pre), out, weight_type=QuantType.QInt8, use_external_data_format=True)
    elif method.endswith("-pass"):  # the pass alone: load, quantize, save (no before/after statistics)
        from onnxopt.io import load, save
        from onnxopt.registry import make_pass

        mode = "dynamic" if "dynamic" in method else "weight-only"
        model = load(src, check=False)
        make_pass("quantize", {"mode": mode, "check_fusion": False}).call(model, None)
        save(model, out, external_data=True)
    else:
        import onnxopt

        mode = "dynamic" if method == "onnxopt-dynamic" else "weight-only"
        result = onnxopt.optimize(src, passes=[("quantize", {"mode": mode, "check_fusion": False})],
                                  validate=False, output=out, external_data=True)
        result.save(out, external_data=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_mb": peak}))


def _file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


_GNU_TIME = "/usr/bin/time"


def _measured(cmd: list[str]) -> tuple[float, int, int, str]:
    """Wall seconds, peak RSS bytes, exit code and last stderr line of `cmd` run as a subprocess."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        if Path(_GNU_TIME).exists():
            full = [_GNU_TIME, "-f", "%M", "-o", tf.name, *cmd]
        else:
            full = [sys.executable, "-m", "benchmarks.quantize_scale", "--rusage", tf.name, "--", *cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(full, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        lines = [ln for ln in Path(tf.name).read_text().splitlines() if ln.strip()]
    peak_kb = int(lines[-1].split()[-1]) if lines and lines[-1].split()[-1].isdigit() else 0
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    return seconds, peak_kb * 1024, proc.returncode, err


def _rusage_main(out: str, cmd: list[str]) -> int:
    """Run `cmd` and write its peak RSS in KB (what ``/usr/bin/time -f %M`` prints) to `out`."""
    code = subprocess.run(cmd, check=False).returncode
    Path(out).write_text(f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\n")
    return code


def _cli_command(src: Path, out: Path) -> list[str]:
    """The command line a user types, with default options (validation and the latency row on)."""
    script = Path(sys.executable).with_name("onnxopt")
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "onnxopt"]
    return [*prefix, str(src), "--passes", "quantize", "--set", "quantize.mode=dynamic", "-o", str(out)]


def run_cli(src: Path, size: int, work: Path, *, repeat: int, preprocess: bool) -> None:
    """The ``--cli`` table: the onnxopt command against quantize_dynamic, each a subprocess, alternating."""
    tools = {
        "onnxopt CLI, defaults": lambda out: _cli_command(src, out),
        "ORT quantize_dynamic": lambda out: [sys.executable, "-m", "benchmarks.quantize_scale", "--child",
                                             "ort-dynamic", str(src), str(out)],
    }
    if preprocess:
        tools["ORT quant_pre_process + quantize_dynamic"] = lambda out: [
            sys.executable, "-m", "benchmarks.quantize_scale", "--child", "ort-pre-dynamic", str(src), str(out)]
    print("| tool | run | wall s | peak RSS GB | peak / weights | output GB |")
    print("|---|---|---|---|---|---|")
    walls: dict[str, list[float]] = {name: [] for name in tools}
    peaks: dict[str, list[int]] = {name: [] for name in tools}
    names = list(tools)
    for r in range(repeat):
        for name in (names if r % 2 == 0 else names[::-1]):
            out_dir = work / f"out{r}"
            out_dir.mkdir(exist_ok=True)
            out = out_dir / "q.onnx"
            seconds, peak, code, err = _measured(tools[name](out))
            if code != 0:
                print(f"| {name} | {r + 1} | failed (exit {code}): {err[:150]} | | | |", flush=True)
            else:
                walls[name].append(seconds)
                peaks[name].append(peak)
                print(f"| {name} | {r + 1} | {seconds:.1f} | {peak / 1e9:.2f} | {peak / size:.2f} | "
                      f"{_file_bytes(out) / 1e9:.2f} |", flush=True)
            shutil.rmtree(out_dir)
    for name in names:
        if walls[name]:
            print(f"{name}: median wall {statistics.median(walls[name]):.1f} s, peak RSS up to "
                  f"{max(peaks[name]) / 1e9:.2f} GB ({max(peaks[name]) / size:.2f}x the weights)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--f", type=int, default=8192)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--methods", default="onnxopt-dynamic,onnxopt-weight-only,onnxopt-dynamic-pass,"
                        "onnxopt-weight-only-pass,ort-dynamic")
    parser.add_argument("--cli", action="store_true", help="time the onnxopt command (defaults) against "
                        "quantize_dynamic, each as a subprocess, instead of --methods")
    parser.add_argument("--repeat", type=int, default=2, help="--cli: runs of each tool, alternating (default 2)")
    parser.add_argument("--ort-preprocess", action="store_true", help="--cli: also quant_pre_process + "
                        "quantize_dynamic")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--rusage", nargs=1, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.rusage:
        return _rusage_main(args.rusage[0], [a for a in rest if a != "--"])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.child:
        _child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="onnxopt-scale-", dir=args.dir) as tmp:
        src = Path(tmp) / "blocks.onnx"
        need = 2 * 4 * args.blocks * 2 * args.d * args.f
        free = shutil.disk_usage(tmp).free
        if free < need:
            print(f"needs about {need / 1e9:.1f} GB of free disk in {tmp}, has {free / 1e9:.1f} GB", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        size = build_blocks_model(src, blocks=args.blocks, d=args.d, f=args.f)
        print(f"built {src.name}: {size / 1e9:.2f} GB of weights in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.cli:
            run_cli(src, size, Path(tmp), repeat=args.repeat, preprocess=args.ort_preprocess)
            return 0
        print("| method | wall s | peak RSS GB | peak / weights | output GB |")
        print("|---|---|---|---|---|")
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            out_dir = Path(tmp) / method
            out_dir.mkdir()
            out = out_dir / "out.onnx"
            proc = subprocess.run([sys.executable, "-m", "benchmarks.quantize_scale", "--child", method, str(src),
                                   str(out)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1][:150]} | | | |", flush=True)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            peak = res["peak_mb"] * 2**20
            print(f"| {method} | {res['seconds']:.1f} | {peak / 1e9:.2f} | {peak / size:.2f} | "
                  f"{_file_bytes(out) / 1e9:.2f} |", flush=True)
            for p in out_dir.iterdir():
                p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
