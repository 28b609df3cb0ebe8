"""The report: JSON data → one self-contained HTML page; the data a run gathers for it (per-layer errors
checked against numpy, output histograms, ORT profiles); both ways of drawing a page give the same bytes."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, make_model, save_model

import onnxopt
from onnxopt.cli import main
from onnxopt.data import Dataset
from onnxopt.report import is_html, normalized, read_report, report_bytes, write_report
from onnxopt.report.collect import SCATTER_POINTS, layer_sections
from onnxopt.report.html import SECTIONS, build_html, embedded_data
from onnxopt.report.plots import largest_jumps

CNN, CALIB, EVAL = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_eval.npz"
PLOTS_OF_A_FULL_RUN = {"ratios", "accuracy", "layer-counts", "layer-errors", "hist-0", "scatter-0", "op-times",
                       "slowest-nodes", "pass-seconds"}


def _doc(result: onnxopt.Result, kind: str = "optimize") -> dict[str, Any]:
    return normalized({"kind": kind, "onnxopt": onnxopt.__version__, "model": str(CNN), "output": "x.onnx",
                       **result.to_dict()})


@pytest.fixture(scope="module")
def digits_doc() -> dict[str, Any]:
    """The report data of the README's digits run (fold, prune, quantize; labels; timing on)."""
    result = onnxopt.optimize(CNN, ["fold", "prune", ("quantize", {"require_speedup": False})], calib=CALIB,
                              data=EVAL, latency_runs=5, details=True)
    return _doc(result)


@pytest.fixture(scope="module")
def digits_page(digits_doc: dict[str, Any]) -> str:
    return build_html(digits_doc)


@pytest.fixture
def stub_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots as a one-element SVG, for tests of the page's structure (drawing is tested on real pages)."""
    from onnxopt.report import plots

    for name in plots.__all__:
        if name != "largest_jumps":
            monkeypatch.setattr(plots, name, lambda key, *a, **k: f'<svg class="plot-svg" id="{key}"><rect/></svg>')


def _plots(page: str) -> dict[str, str]:
    """data-plot key → the <svg> element inside that figure."""
    out = {}
    for m in re.finditer(r'<figure class="plot" data-plot="([^"]+)"[^>]*>(.*?)</figure>', page, re.S):
        svg = re.search(r"<svg.*?</svg>", m.group(2), re.S)
        out[m.group(1)] = svg.group(0) if svg else ""
    return out


def _missing(page: str) -> dict[str, str]:
    return dict(re.findall(r'<p class="missing" data-missing="([^"]+)">(.*?)</p>', page))


def _sections(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


# ====================================================================== the page
def test_every_section_and_plot_of_a_run_with_data(digits_page: str) -> None:
    page = digits_page
    assert _sections(page) == list(SECTIONS["optimize"])
    plots = _plots(page)
    assert PLOTS_OF_A_FULL_RUN <= set(plots)
    for key in PLOTS_OF_A_FULL_RUN:
        svg = plots[key]
        assert svg.startswith("<svg") and 'class="plot-svg"' in svg, key
        assert len(re.findall(r"<(path|use|text|image|rect)\b", svg)) > 5, key
    # Only what the digits run has no data for says so: nothing was skipped by any pass.
    assert set(_missing(page)) == {"skip-reasons"}
    assert "Not gated" in page and "99.17%" in page


def test_page_is_self_contained(digits_page: str) -> None:
    page = digits_page
    assert "<link" not in page and "@import" not in page and not re.search(r"url\((?!#)", page)
    assert not re.search(r'<script(?![^>]*type="application/json")', page)  # no script to run
    assert not re.search(r'\s(src|href)="(?!#|data:)', page)  # nothing to fetch; links are in-page anchors
    # SVG namespaces are names, not fetches; no other address appears.
    addresses = set(re.findall(r'https?://[^\s"\'<>]+', page))
    assert addresses <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_page_embeds_the_data_it_was_drawn_from(digits_doc: dict[str, Any], digits_page: str, stub_plots: None) -> None:
    assert embedded_data(digits_page) == digits_doc
    tricky = copy.deepcopy(digits_doc)
    tricky["model"] = "</script><script>alert(1)</script>.onnx"
    page = build_html(tricky)
    assert embedded_data(page) == tricky
    assert "<script>alert(1)" not in page and page.count("</script>") == 1


def test_same_data_same_bytes(digits_doc: dict[str, Any], digits_page: str) -> None:
    assert build_html(copy.deepcopy(digits_doc)) == digits_page


def test_sections_without_data_say_why(digits_doc: dict[str, Any], stub_plots: None) -> None:
    doc = copy.deepcopy(digits_doc)
    doc["latency"] = None
    doc["profile"] = {"missing": "timing skipped with --bench-runs 0"}
    doc["validation"]["accuracy_a"] = doc["validation"]["accuracy_b"] = None
    doc["passes"] = []
    missing = _missing(build_html(doc))
    assert missing["time"] == "timing skipped with --bench-runs 0"
    assert missing["accuracy"].startswith("no labels")
    assert missing["passes"] == "no pass ran"
    assert "bench-runs 0" in missing["latency"]

    old = {k: v for k, v in digits_doc.items() if k not in ("layers", "distributions", "profile")}
    missing = _missing(build_html(old))  # a JSON report from before this data existed
    assert {"layers", "outputs", "time"} <= set(missing)
    assert all("without per-layer" in missing[k] for k in ("layers", "outputs", "time"))

    unvalidated = copy.deepcopy(digits_doc)
    unvalidated["validation"] = None
    page = build_html(unvalidated)
    assert 'data-verdict="not-validated"' in page and "--no-validate" in _missing(page)["accuracy"]


def test_non_finite_numbers_stay_standard_json_and_draw(digits_doc: dict[str, Any], tmp_path: Path) -> None:
    from onnxopt.report import plots

    doc = copy.deepcopy(digits_doc)
    doc["layers"]["rows"][0]["rel_l2"] = float("nan")
    doc["validation"]["outputs"][0]["rel_l2"] = float("inf")
    doc = normalized(doc)
    assert doc["layers"]["rows"][0]["rel_l2"] == "nan" and doc["validation"]["outputs"][0]["rel_l2"] == "inf"
    json.loads(report_bytes(doc, tmp_path / "r.json"), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    rows = doc["layers"]["rows"]
    from onnxopt.report.html import _layers

    section = _layers(doc, "optimize")
    assert "layer-errors" in _plots(section) and "<td>nan</td>" in section
    svg = plots.layer_errors("e", ["a", "b", "c"], ["Conv"] * 3, [None, 0.1, 0.2], [None, 0.99, 0.98])
    assert svg.startswith("<svg") and len(rows) == len(digits_doc["layers"]["rows"])


def test_verdict_shows_the_gate_and_its_threshold(digits_doc: dict[str, Any], stub_plots: None) -> None:
    doc = copy.deepcopy(digits_doc)
    worst = doc["validation"]["worst"]
    doc["validation"].update(tolerance=worst / 2, passed=False)
    page = build_html(doc)
    assert 'data-verdict="fail"' in page and f"rel_l2 ≤ {worst / 2:g}" in page and "FAILED" in page
    doc["validation"].update(tolerance=worst * 2, passed=True)
    page = build_html(doc)
    assert 'data-verdict="pass"' in page and 'data-verdict="drift"' not in page
    doc["validation"]["drift"] = [{"output": "logits", "reasons": ["cosine 0.9 below 0.99"]}]
    assert "output 'logits': cosine 0.9 below 0.99" in build_html(doc)


def test_skipped_nodes_are_drawn_by_reason(digits_doc: dict[str, Any], stub_plots: None) -> None:
    doc = copy.deepcopy(digits_doc)
    doc["passes"][1]["skipped"] = [{"node": f"n{i}", "reason": "weight shared"} for i in range(3)] + [
        {"node": "m", "reason": "too small"}]
    page = build_html(doc)
    assert "skip-reasons" in _plots(page) and "skip-reasons" not in _missing(page)
    assert "prune: 4 skipped nodes" in page


def _tune_doc(base: dict[str, Any]) -> dict[str, Any]:
    """A tune report in the schema of docs/tune.md, its chosen model's report being `base`."""
    trials = [{"number": i, "state": "complete", "params": {"quantize": i % 2 == 0, "prune.sparsity": 0.1 * i},
               "objective": 1.0 - 0.08 * i, "error": 0.001 * (i + 1) ** 2, "feasible": i < 5, "reason": ""}
              for i in range(8)]
    trials.append({"number": 8, "state": "pruned", "params": {}, "objective": None, "error": None,
                   "feasible": False, "reason": "hopeless"})
    rows = [{"pass": p, "layer": f"conv{i}", "label": label, "status": "measured",
             "error": 10.0 ** (-4 + i / 3 + k), "rel_l2": None}
            for i in range(6) for k, (p, label) in enumerate([("quantize", "int8"), ("prune", "sparsity 0.5"),
                                                              ("channels", "ratio 0.25")])]
    rows.append({"pass": "factorize", "layer": "conv0", "label": "rank 0.5", "status": "not measured",
                 "error": None, "rel_l2": None})
    return {
        "kind": "tune", "model": "models/digits_cnn.onnx",
        "constraint": {"metric": "cosine", "limit": 0.03, "unit": "1-cos", "text": "1-cos <= 0.03"},
        "objective": {"name": "latency", "threads": None},
        "sensitivity": {"metric": "cosine", "rows": rows},
        "trials": trials,
        "pareto": [{"number": n, "objective": trials[n]["objective"], "error": trials[n]["error"]} for n in range(8)],
        "chosen": {"number": 4, "objective": 0.7, "error": 0.02, "holds": True, "beats": True},
        "verdict": "chosen", "message": "chose trial 4", "result": copy.deepcopy(base),
    }


def test_tune_sections(digits_doc: dict[str, Any], stub_plots: None) -> None:
    page = build_html(_tune_doc(digits_doc))
    assert _sections(page) == list(SECTIONS["tune"])
    assert {"sensitivity", "pareto", "layer-errors", "op-times"} <= set(_plots(page))  # the chosen model's too
    assert "chose trial 4" in page and "all 9 trials" in page and "hopeless" in page
    assert set(_missing(page)) == {"skip-reasons"}
    nothing = _tune_doc(digits_doc)
    nothing.update(chosen=None, result=None, verdict="nothing qualifies", message="no trial held 1-cos <= 0.03")
    page = build_html(nothing)
    missing = _missing(page)
    assert missing["layers"] == "no model was written: no trial held 1-cos &lt;= 0.03"
    assert "no trial was chosen" in missing["chosen"] and "pareto" in _plots(page)


def test_sensitivity_grid_and_tune_plots_draw() -> None:
    from onnxopt.report import plots
    from onnxopt.report.html import _sensitivity_grid

    rows = [{"pass": "quantize", "layer": "a", "label": "int8", "error": 1e-3},
            {"pass": "prune", "layer": "a", "label": "0.5", "error": None, "rel_l2": 0.02},
            {"pass": "quantize", "layer": "b", "label": "int8", "error": "nan"}]
    layers, actions, grid = _sensitivity_grid(rows)
    assert layers == ["a", "b"] and actions == ["quantize int8", "prune 0.5"]
    assert grid == [[1e-3, 0.02], [None, None]]
    heat = plots.sensitivity_heatmap("s", ["a", "b", "c"], ["quantize", "prune"],
                                     [[1e-3, 1e-2], [None, 0.2], [0.05, 0.0]])
    assert "<image" in heat and heat.count("<text") >= 5  # the grid is one embedded image, with labelled axes
    pareto = plots.pareto_front("p", "latency", "error", [(1.0, 0.1, "COMPLETE"), (0.5, 0.3, "COMPLETE"),
                                                          (0.7, 0.5, "PRUNED")], [(1.0, 0.1), (0.5, 0.3)],
                                (0.5, 0.3), 0.4)
    assert "chosen" in pareto and "Pareto front" in pareto and "error limit" in pareto


def test_pareto_front_when_the_tune_data_leaves_it_out() -> None:
    from onnxopt.report.html import _pareto_numbers

    pts = {0: (1.0, 0.1), 1: (0.5, 0.2), 2: (0.6, 0.3), 3: (0.2, 0.5), 4: (0.2, 0.6), 5: (0.9, 0.05)}
    trials = [{"number": n, "objective": o, "error": e, "state": "complete"} for n, (o, e) in pts.items()]
    trials.append({"number": 6, "objective": 0.1, "error": 0.01, "state": "pruned"})  # not a finished trial
    dominated = {n for n, (o, e) in pts.items()
                 if any(o2 <= o and e2 <= e and (o2, e2) != (o, e) for o2, e2 in pts.values())}
    assert _pareto_numbers(trials) == sorted(set(pts) - dominated) == [1, 3, 5]


def test_compare_and_bench_pages(digits_doc: dict[str, Any], stub_plots: None) -> None:
    compare = {"kind": "compare", "models": ["a.onnx", "b.onnx"], "validation": digits_doc["validation"],
               "layers": digits_doc["layers"], "distributions": digits_doc["distributions"]}
    page = build_html(compare)
    assert _sections(page) == list(SECTIONS["compare"]) and "layer-errors" in _plots(page)
    bench = {"kind": "bench", "models": ["a.onnx", "b.onnx"], "latency": digits_doc["latency"],
             "profile": digits_doc["profile"]}
    page = build_html(bench)
    assert _sections(page) == ["summary", "time"] and {"ratios", "op-times"} <= set(_plots(page))


def test_largest_jumps_point_where_the_error_grows() -> None:
    errors = [1e-7, 3e-7, None, 0.05, 0.052, 0.049, 0.3, 0.31, 0.5]
    assert largest_jumps(errors) == [3, 6, 8]  # 500x from the float-rounding floor, 5.8x, 1.6x
    assert largest_jumps(errors, count=1) == [3]
    assert largest_jumps([1e-7, 2e-6, 1e-5]) == []  # rounding is not error
    assert largest_jumps([0.1, 0.09, 0.1]) == [0]  # the error starts at the first layer and never grows


# ====================================================================== the data behind it
def _two_layer_mlp(w2_scale: float) -> ir.Model:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    from onnx import helper

    proto = make_model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu"),
         helper.make_node("MatMul", ["hr", "w2"], ["y"], name="fc2")],
        [("x", F32, [5, 6])], [("y", F32, [5, 4])], {"w1": w1, "w2": (w2 * w2_scale).astype(np.float32)})
    return ir.serde.deserialize_model(proto)


def test_layer_errors_match_numpy(tmp_path: Path) -> None:
    a, b = _two_layer_mlp(1.0), _two_layer_mlp(1.1)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((5, 6)).astype(np.float32)} for _ in range(3)]
    layers, dists = layer_sections(a, b, Dataset(feeds, [None] * 3, "test"))
    rows = {r["name"]: r for r in layers["rows"]}
    assert rows["fc1"]["tensor"] == "h" and rows["fc1"]["rel_l2"] == pytest.approx(0.0, abs=1e-7)
    w1 = a.graph.initializers["w1"].const_value.numpy()
    w2 = a.graph.initializers["w2"].const_value.numpy()
    y = np.concatenate([np.maximum(f["x"] @ w1, 0) @ w2 for f in feeds]).astype(np.float64)
    y_b = y * np.float32(1.1)
    assert rows["fc2"]["rel_l2"] == pytest.approx(np.linalg.norm(y_b - y) / np.linalg.norm(y), rel=1e-4)
    assert rows["fc2"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["fc2"]["params_before"] == rows["fc2"]["params_after"] == 32
    assert rows["fc1"]["macs_before"] == 5 * 8 * 6 and rows["fc1"]["bytes_before"] == 6 * 8 * 4
    out = dists["outputs"][0]
    hist = out["hist"]
    assert out["values"] == y.size == sum(hist["counts"]) + hist["zeros"] + hist["below"] + hist["above"]
    assert len(out["scatter"]["original"]) == len(out["scatter"]["optimized"]) <= SCATTER_POINTS
    err = np.abs(y_b - y).ravel()
    lo = 10 ** hist["log10_min"]
    in_first = np.count_nonzero((err >= lo) & (err < lo * 10 ** (1 / hist["bins_per_decade"])))
    assert hist["counts"][0] == in_first


def test_exact_pass_has_no_layer_error_and_quantize_some(digits_doc: dict[str, Any]) -> None:
    fold = onnxopt.optimize(CNN, ["fold"], data=EVAL, details=True)
    errors = [r["rel_l2"] for r in fold.details["layers"]["rows"]]
    assert errors and all(e is not None and e < 1e-5 for e in errors)
    rows = digits_doc["layers"]["rows"]
    assert all(r["status"] == "removed" for r in rows if r["op"] == "BatchNormalization")
    convs = [r for r in rows if r["op"] in ("Conv", "Gemm")]
    assert all(r["rel_l2"] is not None and r["rel_l2"] > 1e-4 for r in convs)
    assert all(r["bytes_after"] < r["bytes_before"] for r in convs)  # int8 weights
    # the tensor a quantized layer is compared at is the one the next layer reads (the DequantizeLinear's)
    assert digits_doc["layers"]["samples"] == 360


def test_profile_of_both_models(digits_doc: dict[str, Any]) -> None:
    prof = digits_doc["profile"]
    labels = [m["label"] for m in prof["models"]]
    assert labels == ["original", "optimized"]
    by_op = [set(m["by_op"]) for m in prof["models"]]
    assert "Conv" in by_op[0] and "QLinearConv" in by_op[1]
    for m in prof["models"]:
        assert 0 < len(m["nodes"]) <= 10
        assert [n["ms"] for n in m["nodes"]] == sorted((n["ms"] for n in m["nodes"]), reverse=True)


def test_summarize_trace_takes_medians_after_warmup() -> None:
    from onnxopt.profile import summarize_trace

    events = []
    for start, node_us in [(0, 900), (1000, 10), (2000, 20), (3000, 500), (4000, 30)]:
        events.append({"cat": "Session", "name": "model_run", "ts": start, "dur": 100 + node_us})
        events.append({"cat": "Node", "name": "conv_kernel_time", "ts": start + 1, "dur": node_us,
                       "args": {"op_name": "Conv"}})
        events.append({"cat": "Node", "name": "relu_kernel_time", "ts": start + 2, "dur": 4,
                       "args": {"op_name": "Relu"}})
    prof = summarize_trace(events, warmup=1, label="m")
    assert prof.runs == 4
    assert prof.nodes[0].name == "conv" and prof.nodes[0].ms == pytest.approx(np.median([10, 20, 500, 30]) / 1000)
    assert prof.by_op == {"Conv": pytest.approx(0.025), "Relu": pytest.approx(0.004)}
    assert prof.run_ms == pytest.approx(np.median([110, 120, 600, 130]) / 1000)


# ====================================================================== files and the command line
def test_html_from_the_run_and_from_its_json_are_the_same_bytes(tmp_path: Path, digits_doc: dict[str, Any],
                                                                 digits_page: str) -> None:
    data = tmp_path / "run.json"
    write_report(data, digits_doc)  # what --report run.json writes, from the same data as the page
    assert not is_html(data) and json.loads(data.read_text()) == digits_doc
    assert data.read_bytes() == report_bytes(digits_doc, data)
    assert main(["report", str(data), "-o", str(tmp_path / "later.html")]) == 0
    assert (tmp_path / "later.html").read_text(encoding="utf-8") == digits_page
    assert main(["report", str(tmp_path / "later.html"), "-o", str(tmp_path / "again.json")]) == 0  # and back
    assert read_report(tmp_path / "again.json") == digits_doc


def test_cli_report_html_and_report_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, page = tmp_path / "x.onnx", tmp_path / "x.html"
    code = main([str(CNN), "--passes", "fold,quantize", "--calib", str(CALIB), "--data", str(EVAL), "-o", str(out),
                 "--report", str(page), "--bench-runs", "0", "--quiet", "--set", "quantize.require_speedup=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "file size" in text and "pass fold" not in text and "wrote" not in text  # --quiet: the table only
    doc = read_report(page)
    assert doc["kind"] == "optimize" and doc["layers"]["rows"] and doc["profile"]["missing"].endswith("--bench-runs 0")
    assert main(["report", str(page), "-o", str(tmp_path / "y.html")]) == 0
    assert (tmp_path / "y.html").read_bytes() == page.read_bytes()


def test_a_run_past_its_tolerance_reports_the_failed_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.json"
    code = main([str(CNN), "--passes", "fold,quantize", "--calib", str(CALIB), "--data", str(EVAL), "-o",
                 str(tmp_path / "q.onnx"), "--tolerance", "1e-6", "--bench-runs", "0", "--report", str(report),
                 "--set", "quantize.require_speedup=false", "--set", "quantize.require_targets=false"])
    assert code == 1  # int8 written although it misses the tolerance (by default the float model would be)
    doc = read_report(report)
    assert doc["validation"]["passed"] is False and doc["validation"]["tolerance"] == 1e-6
    from onnxopt.report.html import _verdict

    assert 'data-verdict="fail"' in _verdict(doc) and "rel_l2 ≤ 1e-06" in _verdict(doc)


def test_cli_compare_and_bench_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    assert main([str(CNN), "--passes", "fold,quantize", "--calib", str(CALIB), "-o", str(out), "--bench-runs", "0",
                 "--no-validate", "--set", "quantize.require_speedup=false"]) == 0
    assert main(["compare", str(CNN), str(out), "--data", str(EVAL), "--report", str(tmp_path / "c.html")]) == 0
    page = (tmp_path / "c.html").read_text()
    assert _sections(page) == list(SECTIONS["compare"]) and "layer-errors" in _plots(page)
    assert main(["bench", str(CNN), str(out), "--runs", "5", "--warmup", "1", "--no-memory",
                 "--report", str(tmp_path / "b.json")]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["kind"] == "bench" and [m["label"] for m in doc["profile"]["models"]] == ["digits_cnn.onnx", "q.onnx"]


def test_report_verb_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html")]) == 2
    (tmp_path / "page.html").write_text("<html><body>not a report</body></html>")
    assert main(["report", str(tmp_path / "page.html"), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "not an onnxopt report page" in err
    assert not (tmp_path / "x.html").exists()


def test_page_of_a_100_layer_model_stays_small(tmp_path: Path) -> None:
    from onnx import helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], {}, "input"
    for i in range(100):
        inits[f"w{i}"] = (rng.standard_normal((8, 8 if i else 3, 3, 3)) * 0.2).astype(np.float32)
        inits[f"b{i}"] = np.zeros(8, np.float32)
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    model = save_model(make_model(nodes, [("input", F32, [1, 3, 8, 8])], [(x, F32, [1, 8, 8, 8])], inits),
                       tmp_path / "deep.onnx")
    result = onnxopt.optimize(model, ["fold", ("quantize", {"require_speedup": False})], calib="random:4",
                              data="random:4", latency_runs=3, details=True)
    doc = normalized({"kind": "optimize", "model": str(model), "output": "deep.opt.onnx", **result.to_dict()})
    assert len(doc["layers"]["rows"]) == 100
    page = build_html(doc)
    assert len(page.encode()) < 2_000_000
    assert "layer-errors" in _plots(page)
