"""Text the command line prints: the before/after table, the validation verdict, per-output and stats
tables, any aligned table, and number formatting.

The verdict line never says "pass" without a tolerance: it says ``not gated``. Names from the model
are escaped (`onnxopt.errors.safe_name`).
"""

from __future__ import annotations

from typing import Any

from onnxopt.analysis import ModelStats
from onnxopt.errors import safe_name

__all__ = [
    "human_bytes",
    "human_count",
    "table",
    "result_table",
    "stats_table",
    "output_line",
    "comparison_table",
    "before_after_rows",
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def human_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    all_rows = ([header] if header else []) + rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    lines = []
    for k, r in enumerate(all_rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}x"


def before_after_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The rows of the before/after table ("", before, after, change) from a report's data (JSON)."""
    b, a = doc["before"], doc["after"]
    rows = [
        ["file size", human_bytes(b["file_bytes"]), human_bytes(a["file_bytes"]),
         _ratio(b["file_bytes"], a["file_bytes"])],
        ["parameters", human_count(b["parameters"]), human_count(a["parameters"]),
         _ratio(b["parameters"], a["parameters"])],
        ["nonzero params", human_count(b["nonzero"]), human_count(a["nonzero"]), _ratio(b["nonzero"], a["nonzero"])],
        ["MACs", human_count(b["macs"]), human_count(a["macs"]), _ratio(b["macs"], a["macs"])],
        ["nodes", str(b["nodes"]), str(a["nodes"]), _ratio(b["nodes"], a["nodes"])],
    ]
    latency = doc.get("latency")
    if latency and latency.get("models"):
        la, lb = (m["median_ms"] for m in latency["models"][:2])
        how = "" if latency.get("interleaved", True) else ", separate processes"
        rows.append([f"latency (ORT CPU, median{how})", f"{la:.3f} ms", f"{lb:.3f} ms", _ratio(la, lb)])
    v = doc.get("validation")
    if v and v.get("accuracy_a") is not None and v.get("accuracy_b") is not None:
        acc_a, acc_b = v["accuracy_a"], v["accuracy_b"]
        rows.append(["accuracy", f"{acc_a * 100:.2f}%", f"{acc_b * 100:.2f}%", f"{(acc_b - acc_a) * 100:+.2f} pt"])
    return rows


def result_table(result: Any) -> str:
    """The before/after table of an `onnxopt.api.Result`."""
    rows = before_after_rows(result.to_dict())
    v = result.validation
    text = table(rows, ["", "before", "after", "change"])
    if result.latency is not None and result.latency.skipped:
        text += f"\nlatency: {result.latency.skipped}"
    if v is not None:
        for o in v.outputs:
            text += "\n" + output_line(o)
        text += f"\nvalidation on {v.samples} samples: {v.describe()}"
    return text


def _nonfinite(o: Any) -> str:
    if not (o.nonfinite_a or o.nonfinite_b):
        return ""
    return (f", non-finite values: original {o.nonfinite_a}, optimized {o.nonfinite_b}"
            + (f" ({o.new_nonfinite} where the original is finite)" if o.new_nonfinite else ""))


def output_line(o: Any) -> str:
    """One output's agreement (an `onnxopt.validate.OutputDiff`)."""
    if o.exact:
        return (f"output '{safe_name(o.name)}' (not floating point, compared exactly): "
                f"{o.mismatches} of {o.elements} elements differ")
    line = f"output '{safe_name(o.name)}': max abs {o.max_abs:.3g}, rel L2 {o.rel_l2:.3g}, cosine {o.cosine:.6f}"
    if o.top1 is not None:
        line += f", top-1 agreement {o.top1 * 100:.2f}%"
    return line + _nonfinite(o)


def comparison_table(cmp: Any) -> str:
    """Per-output rows of an `onnxopt.validate.Comparison` (``onnxopt compare``), with accuracy when known."""
    rows = []
    for o in cmp.outputs:
        if o.exact:
            rows.append([safe_name(o.name), "-", "-", "-", "-", f"{o.mismatches}/{o.elements} differ"])
            continue
        nonfinite = f"{o.nonfinite_a}/{o.nonfinite_b}" if (o.nonfinite_a or o.nonfinite_b) else "-"
        rows.append([safe_name(o.name), f"{o.max_abs:.4g}", f"{o.rel_l2:.4g}", f"{o.cosine:.6f}",
                     "-" if o.top1 is None else f"{o.top1 * 100:.2f}%", nonfinite])
    text = table(rows, ["output", "max abs", "rel L2", "cosine", "top-1 agree", "non-finite A/B"])
    if cmp.accuracy_a is not None and cmp.accuracy_b is not None:
        text += f"\naccuracy: A {cmp.accuracy_a * 100:.2f}%  B {cmp.accuracy_b * 100:.2f}%"
    return text


def stats_table(stats: ModelStats, size: int) -> str:
    rows = [
        ["file size", human_bytes(size)],
        ["parameters", human_count(stats.parameters)],
        ["nonzero params", human_count(stats.nonzero)],
        ["MACs", human_count(stats.macs) + (f" ({stats.macs_unknown_nodes} nodes of unknown shape)"
                                            if stats.macs_unknown_nodes else "")],
        ["nodes", str(stats.nodes)],
    ]
    return table(rows)
