"""The report page: one self-contained HTML file drawn from a report's data (the JSON document).

`build_html(doc)` is a pure function of `doc`: the same data gives the same bytes (plots are
rendered deterministically, see `onnxopt.report.plots`). The page has no script to run and loads
nothing: styles and SVG plots are inline, and the data it was drawn from rides along in a
``<script type="application/json" id="onnxopt-report-data">`` element (`embedded_data` reads it
back, so ``onnxopt report page.html -o again.html`` works too).

Sections, in order, as the run's kind has them (docs/report.md lists the keys each one reads):

=========  ================================================  ==================================
section    shows                                              kinds
=========  ================================================  ==================================
summary    verdict (gated or not, with the threshold),        optimize, tune, compare, bench
           before/after table, ratios plot
accuracy   accuracy with labels, top-1 agreement              optimize, tune, compare
layers     parameters, MACs, bytes per layer; error of        optimize, tune, compare
           each layer's tensor
outputs    error histogram and scatter per output             optimize, tune, compare
time       profiler: time per op type, slowest nodes          optimize, tune, bench
passes     seconds, what changed, what was skipped and why    optimize, tune
tune       sensitivity heat map, Pareto front, chosen trial   tune
=========  ================================================  ==================================

A section without its data says why in a ``<p class="missing" data-missing="SECTION">``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from onnxopt.report import plots
from onnxopt.report.text import before_after_rows, human_bytes, human_count

__all__ = ["build_html", "embedded_data", "SECTIONS", "DATA_ELEMENT_ID"]

DATA_ELEMENT_ID = "onnxopt-report-data"
SECTIONS: dict[str, tuple[str, ...]] = {
    "optimize": ("summary", "accuracy", "layers", "outputs", "time", "passes"),
    "tune": ("summary", "accuracy", "layers", "outputs", "time", "passes", "tune"),
    "compare": ("summary", "accuracy", "layers", "outputs"),
    "bench": ("summary", "time"),
}
"""The sections each kind of run draws, in page order."""

_TITLES = {
    "summary": "Before and after",
    "accuracy": "Accuracy",
    "layers": "Per layer",
    "outputs": "Per output",
    "time": "Where the time goes",
    "passes": "Per pass",
    "tune": "Tuning",
}
_MAX_SKIP_ROWS = 200  # skipped nodes listed per pass in the page (all are in the embedded data)
_NO_DETAILS = "this report was written without per-layer, output and profile data"


@dataclasses.dataclass
class _Section:
    key: str
    title: str
    body: str


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def _figure(key: str, caption: str, svg: str) -> str:
    return (f'<figure class="plot" data-plot="{_e(key)}" data-title="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption>{svg}</figure>")


def _missing(section: str, why: str) -> str:
    return f'<p class="missing" data-missing="{_e(section)}">{_e(why)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _details(summary: str, inner: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{inner}</details>"


# ====================================================================== summary
def _drift(v: dict[str, Any]) -> str:
    """The outputs that drifted severely (``validation.drift``), whatever the tolerance."""
    items = "".join(f"<li>output '{_e(d.get('output', '?'))}': {_e('; '.join(d.get('reasons', [])))}</li>"
                    for d in v.get("drift") or [])
    return f'<div class="verdict fail" data-verdict="drift"><b>Severe drift</b><ul>{items}</ul></div>' if items else ""


def _verdict(doc: dict[str, Any]) -> str:
    v = doc.get("validation")
    if not v:
        return '<div class="verdict neutral" data-verdict="not-validated">Not validated (--no-validate): ' \
               "no comparison with the original was run.</div>"
    metric, tol, worst = v.get("metric", "rel_l2"), v.get("tolerance"), v.get("worst")
    worst_text = _number(worst, ".4g")
    samples = v.get("samples")
    if tol is None:
        return (f'<div class="verdict neutral" data-verdict="not-gated"><b>Not gated</b>: no --tolerance was given. '
                f"Worst {_e(metric)} {worst_text} on {_e(samples)} samples.</div>" + _drift(v))
    ok = bool(v.get("passed"))
    word = "passed" if ok else "FAILED"
    return (f'<div class="verdict {"pass" if ok else "fail"}" data-verdict="{"pass" if ok else "fail"}">'
            f"<b>Gated</b>: {_e(metric)} ≤ {_number(tol, 'g')} — <b>{word}</b> (worst {worst_text} "
            f"on {_e(samples)} samples; the run exits {0 if ok else 1}).</div>" + _drift(v))


def _ratio_rows(doc: dict[str, Any]) -> list[tuple[str, float]]:
    b, a = doc["before"], doc["after"]
    out = []
    for label, key in (("file size", "file_bytes"), ("weight bytes", "weight_bytes"), ("parameters", "parameters"),
                       ("nonzero params", "nonzero"), ("MACs", "macs"), ("nodes", "nodes")):
        if b.get(key) and a.get(key) is not None:
            out.append((label, a[key] / b[key]))
    lat = doc.get("latency")
    if lat and len(lat.get("models", [])) >= 2 and lat["models"][0]["median_ms"] > 0:
        out.append(("latency", lat["models"][1]["median_ms"] / lat["models"][0]["median_ms"]))
    return out


def _summary_optimize(doc: dict[str, Any]) -> str:
    parts = [_verdict(doc)]
    if "before" in doc and "after" in doc:
        parts.append(_table(["", "before", "after", "change"], before_after_rows(doc), "numbers"))
        rows = _ratio_rows(doc)
        if rows:
            parts.append(_figure("ratios", "What changed, as a ratio to the original",
                                 plots.ratio_bars("ratios", rows)))
    parts.append(_output_table(doc))
    if not doc.get("latency"):
        parts.append(_missing("latency", "no latency row: timing skipped with --bench-runs 0"))
    return "".join(parts)


def _number(x: Any, spec: str) -> str:
    """A number formatted by `spec`; None as "-", anything else (a JSON report's "nan") as it is."""
    return format(x, spec) if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def _finite(x: Any) -> float | None:
    """A finite number for a plot, else None (a JSON report writes NaN and infinities as strings)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _output_table(doc: dict[str, Any]) -> str:
    """Per output: max abs, rel L2, cosine, top-1 agreement (from the validation)."""
    outputs = (doc.get("validation") or {}).get("outputs", [])
    if not outputs:
        return ""
    rows = [[o.get("name", "?"), _number(o.get("max_abs"), ".4g"), _number(o.get("rel_l2"), ".4g"),
             _number(o.get("cosine"), ".6f"), "-" if o.get("top1") is None else _number(o["top1"] * 100, ".2f") + "%"]
            for o in outputs]
    return _table(["output", "max abs", "rel L2", "cosine", "top-1 agreement"], rows, "numbers")


def _summary_compare(doc: dict[str, Any]) -> str:
    return _verdict(doc) + _output_table(doc)


def _summary_bench(doc: dict[str, Any]) -> str:
    lat = doc.get("latency") or {}
    models = lat.get("models", [])
    if not models:
        return _missing("summary", "no latency data in this report")
    ratios = lat.get("ratios") or [1.0] * len(models)
    rows = [[m["model"], _number(m["min_ms"], ".3f"), _number(m["median_ms"], ".3f"), _number(m["p90_ms"], ".3f"),
             _number(m["throughput"], ".1f"), _number(m.get("peak_mb"), ".0f"), _number(r, ".3f") + "x"]
            for m, r in zip(models, ratios)]
    threads = lat.get("threads")
    note = (f"<p>{_e(lat.get('provider', 'cpu')).upper()} provider, {models[0]['runs']} interleaved runs, "
            f"batch {models[0]['batch']}{f', {threads} threads' if threads else ''}.</p>")
    out = _table(["model", "min ms", "median ms", "p90 ms", "samples/s", "peak MB", "vs first"], rows, "numbers")
    if len(models) > 1:
        out += _figure("ratios", "Median latency as a ratio to the first model",
                       plots.ratio_bars("ratios", [(m["model"].rsplit("/", 1)[-1], r)
                                                   for m, r in zip(models[1:], ratios[1:])]))
    return out + note


def _summary(doc: dict[str, Any], kind: str) -> str:
    if kind == "compare":
        return _summary_compare(doc)
    if kind == "bench":
        return _summary_bench(doc)
    return _summary_optimize(doc)


# ====================================================================== accuracy
def _accuracy(doc: dict[str, Any], kind: str) -> str:
    v = doc.get("validation")
    if not v:
        return _missing("accuracy", "validation skipped with --no-validate")
    groups: list[tuple[str, float | None, float | None]] = []
    notes = []
    if v.get("accuracy_a") is not None and v.get("accuracy_b") is not None:
        groups.append(("accuracy (labels)", v["accuracy_a"], v["accuracy_b"]))
    else:
        notes.append(_missing("accuracy", "no labels: accuracy needs an array 'labels' in the evaluation data"))
    for o in v.get("outputs", []):
        if o.get("top1") is not None:
            groups.append((f"top-1 agreement '{o['name']}'", None, o["top1"]))
    if not any(o.get("top1") is not None for o in v.get("outputs", [])):
        notes.append(_missing("top1", "no output carries class scores ([N, C] floats from a Softmax or a "
                                      "Gemm/MatMul): no top-1 agreement"))
    if not groups:
        return "".join(notes)
    return _figure("accuracy", "Accuracy on labels and top-1 agreement with the original",
                   plots.accuracy_bars("accuracy", groups)) + "".join(notes)


# ====================================================================== layers
def _gathered(doc: dict[str, Any], key: str, section: str, items: str, empty: str) -> dict[str, Any] | str:
    """The data a run gathered for a report under `key` (with a non-empty list `items`), or the
    paragraph saying why `section` has none."""
    sec = doc.get(key)
    if sec is None:
        return _missing(section, _NO_DETAILS)
    if "missing" in sec:
        return _missing(section, sec["missing"])
    if not sec.get(items):
        return _missing(section, empty)
    return sec


def _layers(doc: dict[str, Any], kind: str) -> str:
    sec = _gathered(doc, "layers", "layers", "rows", "the model has no node with weights")
    if isinstance(sec, str):
        return sec
    rows = sec["rows"]
    names = [r["name"] for r in rows]
    panels = [("parameters", [r["params_before"] for r in rows], [r["params_after"] for r in rows]),
              ("MACs", [r["macs_before"] or 0 for r in rows], [r["macs_after"] or 0 for r in rows]),
              ("weight bytes", [r["bytes_before"] for r in rows], [r["bytes_after"] for r in rows])]
    parts = [_figure("layer-counts", "Parameters, MACs and weight bytes per layer, before and after",
                     plots.layer_counts("layer-counts", names, panels))]
    errors = [_finite(r.get("rel_l2")) for r in rows]
    if any(e is not None for e in errors):
        ops = [r.get("op") or r.get("op_after") or "?" for r in rows]
        cosines = [_finite(r.get("cosine")) for r in rows]
        feeds = f" on {sec['samples']} samples ({sec['feeds']} feeds)" if "samples" in sec else ""
        caption = f"Error of each layer's tensor in the optimized model{feeds} (red: where it grows)"
        parts.append(_figure("layer-errors", caption, plots.layer_errors("layer-errors", names, ops, errors, cosines)))
        jumps = plots.largest_jumps(errors)
        if jumps:
            items = ", ".join(f"<code>{_e(names[i])}</code> ({errors[i]:.3g})" for i in jumps)
            parts.append(f"<p>The error grows most at {items} (rel L2 of the layer's tensor: the largest rises "
                         "past 1.5x the largest error before it, or past 1e-4 where it starts).</p>")
    else:
        parts.append(_missing("layer-errors", sec.get("missing_errors", "no layer's tensor could be compared")))
    header = ["layer", "op", "status", "params before", "after", "MACs before", "after", "bytes before", "after",
              "tensor compared", "rel L2", "cosine"]
    body = [[r["name"], r.get("op") or r.get("op_after"), r["status"], human_count(r["params_before"]),
             human_count(r["params_after"]), human_count(r["macs_before"]), human_count(r["macs_after"]),
             human_bytes(r["bytes_before"]), human_bytes(r["bytes_after"]), r.get("tensor") or "-",
             _number(r.get("rel_l2"), ".4g"), _number(r.get("cosine"), ".6f")] for r in rows]
    parts.append(_details(f"the {len(rows)} layers as a table", _table(header, body, "numbers small")))
    missing = Counter(r["error_missing"] for r in rows if r.get("error_missing"))
    if missing and any(e is not None for e in errors):
        parts.append("<p class='note'>No error for " + "; ".join(f"{n} layer(s): {_e(why)}"
                                                                  for why, n in missing.most_common()) + ".</p>")
    return "".join(parts)


# ====================================================================== outputs
def _outputs(doc: dict[str, Any], kind: str) -> str:
    sec = _gathered(doc, "distributions", "outputs", "outputs", "the model has no output")
    if isinstance(sec, str):
        return sec
    parts = []
    for k, o in enumerate(sec.get("outputs", [])):
        if "missing" in o:
            parts.append(_missing(f"output-{k}", f"output '{o['name']}': {o['missing']}"))
            continue
        name, h, s = o["name"], o["hist"], o["scatter"]
        hist = plots.error_histogram(f"hist-{k}", name, h["log10_min"], h["bins_per_decade"], h["counts"], h["zeros"])
        scatter = plots.value_scatter(f"scatter-{k}", name, s["original"], s["optimized"])
        extra = [f"{h[key]} {word}" for key, word in (("below", "below the first bin"), ("above", "above the last bin"))
                 if h.get(key)]
        note = (f"{o['values']} values from {sec['feeds']} feeds of {sec.get('source', '?')}"
                f"{'; ' + ', '.join(extra) if extra else ''}; the scatter shows an evenly spread subsample.")
        parts.append('<div class="row">'
                     + _figure(f"hist-{k}", f"Error histogram of output '{name}'", hist)
                     + _figure(f"scatter-{k}", f"Optimized against original values of output '{name}'", scatter)
                     + f"</div><p class='note'>{_e(note)}</p>")
    return "".join(parts)


# ====================================================================== time
def _time(doc: dict[str, Any], kind: str) -> str:
    sec = _gathered(doc, "profile", "time", "models", "no model was profiled")
    if isinstance(sec, str):
        return sec
    models = sec["models"]
    labels = [m["label"] for m in models]
    threads = sec.get("threads")
    runs = ", ".join(f"{m['label']} {_number(m['run_ms'], '.3g')} ms per run over {m['runs']} runs" for m in models)
    parts = [
        f"<p>ONNX Runtime's profiler on one feed (batch {_e(sec.get('batch', '?'))}, "
        f"{f'{threads} threads' if threads else 'default threads'}): {_e(runs)}. Kernel times per node, summed; "
        "absolute times vary with the machine's load, shares are steadier.</p>",
        _figure("op-times", "Time per op type", plots.op_times("op-times", labels, [m["by_op"] for m in models])),
        _figure("slowest-nodes", "The ten slowest nodes, side by side",
                plots.slowest_nodes("slowest-nodes", labels, [m["nodes"] for m in models])),
    ]
    return "".join(parts)


# ====================================================================== passes
def _passes(doc: dict[str, Any], kind: str) -> str:
    passes = doc.get("passes") or []
    if not passes:
        return _missing("passes", "no pass ran")
    names = [p["name"] for p in passes]
    parts = [_figure("pass-seconds", "Seconds per pass", plots.pass_seconds("pass-seconds", names,
                                                                             [p.get("seconds", 0.0) for p in passes]))]
    reasons = Counter((p["name"], s.get("reason", "?")) for p in passes for s in p.get("skipped", []))
    if reasons:
        top = [(f"{name}: {why}", n) for (name, why), n in reasons.most_common(15)]
        parts.append(_figure("skip-reasons", "What the passes skipped, by reason",
                             plots.skip_reasons("skip-reasons", top)))
    else:
        parts.append(_missing("skip-reasons", "no pass skipped a node"))
    rows = []
    for p in passes:
        summary = ", ".join(f"{k}={_fmt(v)}" for k, v in (p.get("summary") or {}).items())
        changed = summary or ("changed" if p.get("modified") else "no change")
        rows.append([p["name"], f"{p.get('seconds', 0.0):.2f}", changed, len(p.get("skipped", [])),
                     " ".join(p.get("notes", []))])
    parts.append(_table(["pass", "seconds", "what it changed", "skipped", "notes"], rows, "passes"))
    for p in passes:
        skipped = p.get("skipped", [])
        if skipped:
            shown = [[s.get("node", "?"), s.get("reason", "?")] for s in skipped[:_MAX_SKIP_ROWS]]
            more = (f" (the first {_MAX_SKIP_ROWS}; all are in the embedded data)"
                    if len(skipped) > _MAX_SKIP_ROWS else "")
            parts.append(_details(f"{p['name']}: {len(skipped)} skipped nodes{more}",
                                  _table(["node", "reason"], shown, "small")))
        options = p.get("options") or {}
        if options:
            parts.append(_details(f"{p['name']}: options",
                                  _table(["option", "value"], [[k, _fmt(v)] for k, v in options.items()], "small")))
    return "".join(parts)


# ====================================================================== tune
def _complete(trial: dict[str, Any]) -> bool:
    return str(trial.get("state", "complete")).lower() == "complete"


def _pareto_numbers(trials: list[dict[str, Any]]) -> list[int]:
    """Completed trials that no other completed trial beats on both objective and error (lower is better)."""
    done = [t for t in trials if _complete(t) and _finite(t.get("objective")) is not None
            and _finite(t.get("error")) is not None]
    front = []
    for t in done:
        if not any(o["objective"] <= t["objective"] and o["error"] <= t["error"]
                   and (o["objective"] < t["objective"] or o["error"] < t["error"]) for o in done):
            front.append(t["number"])
    return sorted(front)


def _sensitivity_grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """Layers (in order of appearance), actions (``pass label``) and the error of each pair (None: not
    measured), from tune's sensitivity rows."""
    def action(r: dict[str, Any]) -> str:
        return " ".join(str(x) for x in (r.get("pass"), r.get("label")) if x)

    layers = list(dict.fromkeys(str(r["layer"]) for r in rows))
    actions = list(dict.fromkeys(action(r) for r in rows))
    cell = {}
    for r in rows:
        err = _finite(r.get("error"))
        cell[(str(r["layer"]), action(r))] = err if err is not None else _finite(r.get("rel_l2"))
    return layers, actions, [[cell.get((lay, act)) for act in actions] for lay in layers]


def _tune(doc: dict[str, Any], kind: str) -> str:
    """Tune's own report (the schema of docs/tune.md): sensitivity, trials, Pareto front, the choice."""
    parts = []
    constraint = doc.get("constraint") or {}
    objective = doc.get("objective") or {}
    objective_label = f"{objective.get('name', 'objective')} (ratio to the original)"
    error_label = f"error ({constraint.get('unit') or constraint.get('metric') or '?'})"
    if doc.get("message"):
        parts.append(f"<p><b>{_e(doc.get('verdict', ''))}</b>: {_e(doc['message'])}</p>")
    rows = (doc.get("sensitivity") or {}).get("rows") or []
    if rows:
        layers, actions, grid = _sensitivity_grid(rows)
        parts.append(_figure("sensitivity", "Sensitivity: the error of each action applied to one layer alone",
                             plots.sensitivity_heatmap("sensitivity", layers, actions, grid)))
    else:
        parts.append(_missing("sensitivity", "no sensitivity table in this report"))
    trials = doc.get("trials") or []
    drawn = [t for t in trials if _finite(t.get("objective")) is not None and _finite(t.get("error")) is not None]
    if not drawn:
        parts.append(_missing("trials", "no trial completed"))
        return "".join(parts)
    by_number = {t["number"]: t for t in drawn}
    pareto = doc.get("pareto")
    numbers = [p["number"] if isinstance(p, dict) else p for p in pareto] if pareto is not None \
        else _pareto_numbers(trials)
    front = [(by_number[n]["objective"], by_number[n]["error"]) for n in numbers if n in by_number]
    chosen = doc.get("chosen")
    chosen_number = chosen.get("number") if isinstance(chosen, dict) else chosen
    chosen_trial = by_number.get(chosen_number)
    point = (chosen_trial["objective"], chosen_trial["error"]) if chosen_trial else None
    pts = [(t["objective"], t["error"], str(t.get("state", "complete")).upper()) for t in drawn]
    parts.append(_figure("pareto", "Pareto front: objective against error on the search data, the chosen trial ringed",
                         plots.pareto_front("pareto", objective_label, error_label, pts, front, point,
                                            _finite(constraint.get("limit")))))
    if isinstance(chosen, dict):
        parts.append(_table(["chosen trial", "value"], [[k, _fmt(v)] for k, v in chosen.items()], "small"))
    elif chosen_number is None:
        parts.append(_missing("chosen", "no trial was chosen: none held the constraint and beat the original"))
    rows_t = [[t["number"], t.get("state", "?"), _fmt(t.get("objective")), _fmt(t.get("error")),
               ", ".join(f"{k}={_fmt(v)}" for k, v in (t.get("params") or {}).items()), t.get("reason", "")]
              for t in trials]
    parts.append(_details(f"all {len(trials)} trials", _table(["trial", "state", "objective", "error", "settings",
                                                               "reason"], rows_t, "small")))
    return "".join(parts)


# ====================================================================== the page
_BUILDERS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "summary": _summary, "accuracy": _accuracy, "layers": _layers, "outputs": _outputs, "time": _time,
    "passes": _passes, "tune": _tune,
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d232b;margin:0;
background:#f6f7f9}
header{background:#1d232b;color:#fff;padding:14px 28px}header h1{font-size:19px;margin:0 0 4px}
header p{margin:0;color:#c9d1db;font-size:13px}nav{padding:8px 28px;background:#fff;border-bottom:1px solid #e1e4e8;
position:sticky;top:0;z-index:1}nav a{margin-right:16px;color:#1f6fd1;text-decoration:none}
main{max-width:1180px;margin:0 auto;padding:8px 28px 40px}section{background:#fff;border:1px solid #e1e4e8;
border-radius:6px;margin:18px 0;padding:6px 20px 14px}h2{font-size:17px;margin:12px 0}
figure.plot{margin:10px 0}
figure.plot figcaption{font-weight:600;font-size:13px;margin-bottom:2px}
svg.plot-svg{display:block;width:100%;height:auto}.row{display:flex;flex-wrap:wrap;gap:12px}
.row figure.plot{flex:1 1 360px}table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{padding:3px 9px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
table.numbers td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
table.small{font-size:12px}table.passes td:nth-child(3){max-width:620px}
.verdict{padding:9px 12px;border-radius:5px;margin:8px 0}.verdict.pass{background:#e6f4ea;border:1px solid #9ccfae}
.verdict.fail{background:#fbe9eb;border:1px solid #e6a1aa}.verdict.neutral{background:#eef2f7;border:1px solid #c8d3e0}
.missing{color:#6b7480;font-style:italic}.note{color:#525a64;font-size:13px}details{margin:6px 0}
summary{cursor:pointer;color:#1f6fd1}code{font-size:12.5px}
"""


def _header(doc: dict[str, Any], kind: str) -> str:
    if kind == "compare" or kind == "bench":
        subject = " vs ".join(str(m) for m in doc.get("models", [])) or "models"
    else:
        subject = str(doc.get("model", "?")) + (f" → {doc['output']}" if doc.get("output") else "")
    bits = [f"onnxopt {kind}"]
    if doc.get("onnxopt"):
        bits.append(f"version {doc['onnxopt']}")
    view = doc.get("result") if kind == "tune" and isinstance(doc.get("result"), dict) else doc
    if view.get("passes"):
        bits.append("passes " + ", ".join(p["name"] for p in view["passes"]))
    data = (view.get("distributions") or {}).get("source") or (view.get("layers") or {}).get("source")
    if data:
        bits.append(f"evaluation data {data}")
    return f"<header><h1>{_e(subject)}</h1><p>{_e(' · '.join(bits))}</p></header>"


def _data_element(doc: dict[str, Any]) -> str:
    # No "<" at all inside the element, so nothing in the data can end it or open a script: "<", ">" and
    # "&" appear only inside JSON strings, where their \u escapes read back as the same characters.
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=True)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{DATA_ELEMENT_ID}">{text}</script>'


def _section_body(doc: dict[str, Any], kind: str, key: str) -> str:
    """One section's HTML. A tune run's model sections draw its chosen model's report (``result``)."""
    if kind != "tune" or key == "tune":
        return _BUILDERS[key](doc, kind)
    result = doc.get("result")
    if not isinstance(result, dict):
        return _missing(key, "no model was written: " + str(doc.get("message") or "nothing qualified"))
    return _BUILDERS[key](result, "optimize")


def build_html(doc: dict[str, Any]) -> str:
    """The report page for `doc` (a report's JSON data), as text."""
    kind = doc.get("kind", "optimize")
    if kind not in SECTIONS:
        kind = "optimize"
    sections = [_Section(key, _TITLES[key], _section_body(doc, kind, key)) for key in SECTIONS[kind]]
    nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}" data-section="{s.key}"><h2>{_e(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    title = f"onnxopt report: {doc.get('model') or ' vs '.join(map(str, doc.get('models', [])))}"
    return ("<!DOCTYPE html>\n"
            f'<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>{_e(title)}</title><style>{_CSS.strip()}</style></head><body>"
            f"{_header(doc, kind)}<nav>{nav}</nav><main>{body}</main>{_data_element(doc)}</body></html>\n")


_DATA_RE = re.compile(r'<script type="application/json" id="' + DATA_ELEMENT_ID + r'">(.*?)</script>', re.S)


def embedded_data(page: str) -> dict[str, Any] | None:
    """The report data a page embeds, or None when it has none."""
    m = _DATA_RE.search(page)
    if m is None:
        return None
    try:
        doc = json.loads(m.group(1))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
