"""Benchmark of the factorize pass: size, MACs, latency and error, plain vs data-aware.

Run from the repository root::

    python -m benchmarks.factorize [--runs 30] [--no-resnet] [--resnet-size 224]

Sections: the digits CNN (tucker and spatial, plain and data-aware at the same MAC target, accuracy
on the 360 held-out images), the ResNet-18-shaped model (random weights: output error and top-1
agreement on random inputs not used for calibration), the digits transformer (error of each
factored MatMul's output, tapped by name in both models) and ``fold,factorize,quantize``.
Latency ratios are medians of interleaved single-thread ONNX Runtime runs against the model after
``fold`` alone (below 1: faster).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import onnxopt
from onnxopt.analysis import infer_shapes
from onnxopt.bench import bench
from onnxopt.data import input_specs, load_data
from onnxopt.runtime import run_taps

MODELS = Path(__file__).resolve().parents[1] / "models"


def _table(title: str, header: Sequence[str], rows: list[Sequence[Any]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(v) for v in row) + " |")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _optimize(src: Path, passes: list[Any], out: Path, calib: Any, data: Any) -> onnxopt.Result:
    # These tables study MAC-driven ranks: the speed check is on only where a variant asks for it.
    passes = [(p[0], {"verify_speed": False, **p[1]}) if isinstance(p, tuple) and p[0] == "factorize" else p
              for p in passes]
    result = onnxopt.optimize(str(src), passes, calib=calib, data=data, output=out)
    result.save(out)
    return result


def _factorize_rows(src: Path, work: Path, variants: list[tuple[str, dict[str, Any]]], calib: Any, data: Any,
                    runs: int) -> list[list[Any]]:
    base = work / "folded.onnx"
    folded = _optimize(src, ["fold"], base, None, data)
    rows: list[list[Any]] = [["fold only", folded.after.parameters, folded.after.macs, 1.0,
                              folded.validation.outputs[0].rel_l2, folded.validation.outputs[0].top1,
                              folded.validation.accuracy_b, "-"]]
    for label, options in variants:
        out = work / f"{label.replace(' ', '_').replace('=', '')}.onnx"
        res = _optimize(src, ["fold", ("factorize", options)], out, calib if options.get("data_aware") else None,
                        data)
        ratio = bench([base, out], runs=runs, threads=1, memory=False).ratios[1]
        stats = res.passes[1].stats
        diff = res.validation.outputs[0]
        rows.append([label, res.after.parameters, res.after.macs, ratio, diff.rel_l2, diff.top1,
                     res.validation.accuracy_b, stats.summary.get("layers_factorized", 0)])
    return rows


HEADER = ["variant", "params", "MACs", "latency ratio", "rel L2 err", "top-1 agree", "accuracy", "layers"]


def digits_cnn(work: Path, runs: int) -> None:
    calib, data = str(MODELS / "digits_calib.npz"), str(MODELS / "digits_eval.npz")
    variants = []
    for method in ("tucker", "spatial"):
        for aware in (False, True):
            label = f"{method} macs=0.5 {'data-aware' if aware else 'plain'}"
            variants.append((label, {"method": method, "rank_by": "macs", "macs_target": 0.5, "data_aware": aware}))
        label = f"{method} ratio=0.5"
        for aware in (False, True):
            variants.append((f"{label} {'data-aware' if aware else 'plain'}",
                             {"method": method, "rank_by": "ratio", "rank_ratio": 0.5, "data_aware": aware}))
    rows = _factorize_rows(MODELS / "digits_cnn.onnx", work, variants, calib, data, runs)
    _table("digits CNN (batch 1 latency; 360 eval images)", HEADER, rows)


def _normal_feeds(n: int, shape: tuple[int, ...], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def resnet(work: Path, runs: int, size: int) -> None:
    from models.resnet import build_resnet18

    src = work / "resnet18.onnx"
    build_resnet18(src, image_size=size, batch=1)
    calib = _normal_feeds(8, (1, 3, size, size), seed=1)
    data = _normal_feeds(8, (1, 3, size, size), seed=2)
    variants = []
    for method in ("tucker", "spatial"):
        for aware in (False, True):
            variants.append((f"{method} macs=0.5 {'data-aware' if aware else 'plain'}",
                             {"method": method, "rank_by": "macs", "macs_target": 0.5, "data_aware": aware,
                              "round_to": 8}))
    rows = _factorize_rows(src, work, variants, calib, data, runs)
    _table(f"ResNet-18-shaped, {size}x{size}, random weights (batch 1; 8 random eval inputs)", HEADER, rows)


def _layer_errors(src: Path, out: Path, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    a_model, b_model = onnxopt.load(src), onnxopt.load(out)
    infer_shapes(a_model)
    infer_shapes(b_model)
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for a, b in zip(run_taps(a_model, names, feeds), run_taps(b_model, names, feeds)):
        for n in names:
            num[n] += float(np.sum((a[n] - b[n]) ** 2))
            den[n] += float(np.sum(a[n] ** 2))
    return {n: float(np.sqrt(num[n] / den[n])) for n in names}


def _alone_errors(src: Path, factored: onnxopt.Result, names: list[str],
                  feeds: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Error of each factored MatMul alone: original input through original vs factored weights."""
    original = onnxopt.load(src)
    infer_shapes(original)
    nodes = {n.name: n for n in original.graph}
    new_nodes = {n.name: n for n in factored.model.graph}
    inputs = [nodes[n].inputs[0].name for n in names]
    num = dict.fromkeys(names, 0.0)
    den = dict.fromkeys(names, 0.0)
    for acts in run_taps(original, inputs, feeds):
        for name, x_name in zip(names, inputs):
            x = acts[x_name]
            w = nodes[name].inputs[1].const_value.numpy()
            a = new_nodes[f"{name}.u"].inputs[1].const_value.numpy()
            b = new_nodes[name].inputs[1].const_value.numpy()
            ref = x @ w
            num[name] += float(np.sum((ref - (x @ a) @ b) ** 2))
            den[name] += float(np.sum(ref**2))
    return {n: float(np.sqrt(num[n] / den[n])) for n in names}


def transformer(work: Path) -> None:
    src = MODELS / "digits_transformer.onnx"
    with np.load(MODELS / "digits_calib.npz") as d:
        calib = [{"input": d["input"].reshape(-1, 8, 8)}]
    evals = load_data(str(MODELS / "digits_seq_eval.npz"), input_specs(onnxopt.load(src)), batch=360)
    per_layer: dict[str, dict[str, Any]] = {}
    summary = []
    for aware in (False, True):
        tag = "data-aware" if aware else "plain"
        out = work / f"transformer_{tag}.onnx"
        opts = {"rank_by": "ratio", "rank_ratio": 0.375, "round_to": 2, "data_aware": aware}
        res = _optimize(src, ["fold", ("factorize", opts)], out, calib if aware else None, evals)
        stats = res.passes[1].stats
        names = [r["node"] for r in stats.layers]
        outs = {n.name: n.outputs[0].name for n in res.model.graph}
        in_model = _layer_errors(src, out, [outs[n] for n in names], evals.feeds)
        alone = _alone_errors(src, res, names, evals.feeds)
        for r in stats.layers:
            row = per_layer.setdefault(r["node"], {"shape": "x".join(map(str, r["weight_shape"])),
                                                   "rank": r["ranks"][0]})
            row[tag] = (alone[r["node"]], r["est_rel_error"], in_model[outs[r["node"]]])
        diff = res.validation.outputs[0]
        if not summary:
            summary.append(["original", res.before.parameters, res.before.macs, "-", "-", res.validation.accuracy_a])
        summary.append([tag, res.after.parameters, res.after.macs, diff.rel_l2, diff.top1, res.validation.accuracy_b])
    rows = [[name, v["shape"], v["rank"], *v.get("plain", ("-",) * 3), *v.get("data-aware", ("-",) * 3)]
            for name, v in per_layer.items()]
    _table("digits transformer: MatMuls at rank_ratio=0.375 (360 eval sequences); relative L2 error of each "
           "layer's output: alone (original input), as estimated by the pass, and in the factored model",
           ["layer", "weight", "rank", "plain alone", "plain est", "plain in model",
            "data-aware alone", "data-aware est", "data-aware in model"], rows)
    _table("digits transformer: model", ["variant", "params", "MACs", "rel L2 err", "top-1 agree", "accuracy"],
           summary)


def _compose_rows(src: Path, work: Path, tag: str, variants: list[tuple[str, list[Any]]], calib: Any, data: Any,
                  runs: int) -> list[list[Any]]:
    base = work / f"{tag}_fold.onnx"
    _optimize(src, ["fold"], base, None, data)
    rows = []
    for i, (label, passes) in enumerate(variants):
        out = work / f"{tag}_compose{i}.onnx"
        res = _optimize(src, passes, out, calib, data)
        ratio = bench([base, out], runs=runs, threads=1, memory=False).ratios[1]
        diff = res.validation.outputs[0]
        rows.append([label, res.size_after, res.after.macs, ratio, diff.rel_l2, diff.top1, res.validation.accuracy_b,
                     res.passed])
    return rows


COMPOSE_HEADER = ["passes", "file bytes", "MACs", "latency ratio", "rel L2 err", "top-1 agree", "accuracy", "valid"]


def compose(work: Path, runs: int) -> None:
    factorize = {"rank_by": "macs", "macs_target": 0.5, "data_aware": True}
    variants = [
        ("fold,quantize", ["fold", "quantize"]),
        ("fold,factorize,quantize", ["fold", ("factorize", factorize), "quantize"]),
        ("fold,factorize(verify_speed),quantize", ["fold", ("factorize", {**factorize, "verify_speed": True}),
                                                   "quantize"]),
    ]
    rows = _compose_rows(MODELS / "digits_cnn.onnx", work, "cnn", variants, str(MODELS / "digits_calib.npz"),
                         str(MODELS / "digits_eval.npz"), runs)
    _table("digits CNN composed with quantize (static int8, calibrated on digits_calib.npz; batch 1)",
           COMPOSE_HEADER, rows)


def compose_resnet(work: Path, runs: int, size: int) -> None:
    from models.resnet import build_resnet18

    src = work / "resnet18_compose.onnx"
    build_resnet18(src, image_size=size, batch=1)
    factorize = {"rank_by": "macs", "macs_target": 0.5, "data_aware": True, "round_to": 8}
    variants = [
        ("fold,quantize", ["fold", "quantize"]),
        ("fold,factorize,quantize", ["fold", ("factorize", factorize), "quantize"]),
    ]
    rows = _compose_rows(src, work, "resnet", variants, _normal_feeds(8, (1, 3, size, size), seed=1),
                         _normal_feeds(8, (1, 3, size, size), seed=2), runs)
    _table(f"ResNet-18-shaped {size}x{size} composed with quantize (static int8; batch 1)", COMPOSE_HEADER, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (interleaved)")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18-shaped model")
    parser.add_argument("--resnet-size", type=int, default=224, help="ResNet input height and width")
    parser.add_argument("--only", choices=["cnn", "resnet", "transformer", "compose", "compose-resnet"],
                        default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="factorize-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "cnn"):
            digits_cnn(work, args.runs)
        if args.only in (None, "transformer"):
            transformer(work)
        if args.only in (None, "compose"):
            compose(work, args.runs)
        if args.only in (None, "resnet") and not args.no_resnet:
            resnet(work, args.runs, args.resnet_size)
        if args.only in (None, "compose-resnet") and not args.no_resnet:
            compose_resnet(work, args.runs, args.resnet_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
