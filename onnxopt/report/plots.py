"""The report's plots: matplotlib figures rendered to inline SVG, the same bytes on every run.

Each function takes plain data (lists and dicts out of the JSON report) and returns an ``<svg>``
element as text, ready to inline in a page. Rendering is deterministic: no pyplot state (a bare
`matplotlib.figure.Figure` per plot), the SVG backend with text kept as text (``svg.fonttype =
none``: smaller, and no glyph outlines that depend on the installed fonts), a fixed hash salt per
plot (``svg.hashsalt``: the ids of clip paths are stable, and differ between the plots of one page),
no date or creator metadata, and scatter points rasterized into one embedded PNG so that a scatter
of thousands of points stays a few kilobytes. The XML prologue is dropped and the fixed size in
points replaced by a width of 100 % of the page, at most the plot's own size.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "ratio_bars",
    "accuracy_bars",
    "layer_counts",
    "layer_errors",
    "error_histogram",
    "value_scatter",
    "op_times",
    "slowest_nodes",
    "pass_seconds",
    "skip_reasons",
    "sensitivity_heatmap",
    "pareto_front",
    "largest_jumps",
]

BEFORE, AFTER, WARN, GOOD, GREY = "#8c9bb0", "#1f6fd1", "#d1495b", "#2a9d5c", "#b8b8b8"
_PALETTE = ["#1f6fd1", "#e07b39", "#2a9d5c", "#d1495b", "#7b5ea7", "#8c6d31", "#e377c2", "#17becf"]
_RC = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 8.5,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e4e4",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "savefig.dpi": 96,
    "path.simplify": True,
}


@contextmanager
def _figure(key: str, width: float, height: float) -> Iterator[Any]:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"onnxopt-{key}"}):
        fig = Figure(figsize=(width, height), layout="constrained")
        yield fig


def _svg(fig: Any, key: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"onnxopt-{key}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    size = re.search(r' width="([\d.]+)pt" height="([\d.]+)pt"', text)  # the <svg> element's, the first
    if size is not None:
        px = float(size.group(1)) * 96 / 72
        text = f'{text[: size.start()]} class="plot-svg" role="img" style="max-width:{px:.0f}px"{text[size.end():]}'
    return text.strip()


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _power_of_ten(value: float, _pos: Any = None) -> str:
    """A log-axis tick label as plain text (``10⁻³``): matplotlib's default goes through mathtext,
    which costs most of a page's drawing time."""
    if value <= 0 or not math.isfinite(value):
        return ""
    exponent = math.log10(value)
    if abs(exponent - round(exponent)) < 1e-9:
        return "10" + str(int(round(exponent))).translate(_SUPERSCRIPT)
    return f"{value:.2g}"


def _log_scale(ax: Any, which: str) -> None:
    """A log scale on `ax`'s x or y axis labelled by `_power_of_ten`, minor ticks unlabelled."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(FuncFormatter(_power_of_ten))
    axis.set_minor_formatter(NullFormatter())


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2) :]


def _tick_every(n: int, room: int = 60) -> int:
    return max(1, math.ceil(n / room))


# ====================================================================== summary
def ratio_bars(key: str, rows: Sequence[tuple[str, float]]) -> str:
    """Horizontal bars of after/before ratios (1 = unchanged), green below 1 and red above."""
    with _figure(key, 6.4, 0.45 + 0.32 * len(rows)) as fig:
        ax = fig.add_subplot()
        labels = [r[0] for r in rows][::-1]
        vals = [r[1] for r in rows][::-1]
        colors = [GOOD if v < 0.999 else WARN if v > 1.001 else GREY for v in vals]
        ax.barh(labels, vals, color=colors, height=0.6)
        ax.axvline(1.0, color="#444", linewidth=0.8)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.3g}x", va="center", fontsize=8)
        ax.set_xlim(0, max([1.2, *[v * 1.18 for v in vals]]))
        ax.set_xlabel("optimized / original")
        return _svg(fig, key)


def accuracy_bars(key: str, groups: Sequence[tuple[str, float | None, float | None]]) -> str:
    """Pairs of bars (original, optimized) in percent; a group with one value draws one bar."""
    with _figure(key, 6.4, 0.6 + 0.45 * len(groups)) as fig:
        ax = fig.add_subplot()
        labelled: set[str] = set()
        for i, (_, a, b) in enumerate(groups):
            for value, dy, color, who in ((a, -0.2, BEFORE, "original"), (b, 0.2, AFTER, "optimized")):
                if value is None:
                    continue
                ax.barh(i + dy, value * 100, height=0.38, color=color, label=None if who in labelled else who)
                ax.text(value * 100, i + dy, f" {value * 100:.2f}%", va="center", fontsize=8)
                labelled.add(who)
        ax.set_yticks(range(len(groups)), [g[0] for g in groups])
        ax.invert_yaxis()
        ax.set_xlim(0, 112)
        ax.set_xlabel("%")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=8)
        return _svg(fig, key)


# ====================================================================== per layer
def _layer_axis(ax: Any, names: Sequence[str], show: bool) -> None:
    step = _tick_every(len(names))
    idx = list(range(0, len(names), step))
    ax.set_xticks(idx, [_short(names[i]) for i in idx] if show else [""] * len(idx),
                  rotation=90, fontsize=7 if len(names) <= 40 else 6)
    ax.set_xlim(-0.7, len(names) - 0.3)


def layer_counts(key: str, names: Sequence[str], panels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> str:
    """One panel per (label, before, after) count, bars side by side per layer, layers in graph order."""
    n = len(names)
    width = min(13.0, max(6.4, 0.16 * n + 2.0))
    with _figure(key, width, 1.6 * len(panels) + 1.4) as fig:
        axes = fig.subplots(len(panels), 1, sharex=True)
        axes = list(axes) if len(panels) > 1 else [axes]
        xs = list(range(n))
        for k, (ax, (label, before, after)) in enumerate(zip(axes, panels)):
            ax.bar([x - 0.2 for x in xs], before, width=0.4, color=BEFORE, label="original")
            ax.bar([x + 0.2 for x in xs], after, width=0.4, color=AFTER, label="optimized")
            ax.set_ylabel(label)
            if max([*before, *after, 0]) > 0:
                _log_scale(ax, "y")
            if k == 0:
                ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, fontsize=8)
            _layer_axis(ax, names, k == len(panels) - 1)
        return _svg(fig, key)


def largest_jumps(errors: Sequence[float | None], count: int = 4, factor: float = 1.5,
                  floor: float = 1e-4) -> list[int]:
    """Where the error grows: indices whose error exceeds `factor` times the largest error before them
    (and at least `floor`, so that float rounding, 1e-7 after an exact pass, is no error), the `count`
    largest rises by ratio, in graph order. The first layer with an error past `floor` is a rise from
    `floor`: where the error starts.
    """
    best = 0.0
    rises: list[tuple[float, int]] = []
    for i, e in enumerate(errors):
        if e is None or not math.isfinite(e):
            continue
        ref = max(best, floor)
        if e > factor * ref:
            rises.append((e / ref, i))
        best = max(best, e)
    top = sorted(rises, key=lambda r: (-r[0], r[1]))[:count]
    return sorted(i for _, i in top)


def layer_errors(key: str, names: Sequence[str], ops: Sequence[str], errors: Sequence[float | None],
                 cosines: Sequence[float | None], metric_label: str = "relative L2 error") -> str:
    """The error of each layer's tensor, log scale, coloured by op type, the largest rises annotated."""
    n = len(names)
    width = min(13.0, max(6.4, 0.16 * n + 2.0))
    with _figure(key, width, 3.9) as fig:
        ax = fig.add_subplot()
        kinds = list(dict.fromkeys(op for op, e in zip(ops, errors) if e is not None))
        color = {op: _PALETTE[i % len(_PALETTE)] for i, op in enumerate(kinds)}
        pts = [(i, e) for i, e in enumerate(errors) if e is not None and math.isfinite(e)]
        floor = min([e for _, e in pts if e > 0], default=1e-9) / 3
        ax.plot([i for i, _ in pts], [max(e, floor) for _, e in pts], color="#999", linewidth=0.8, zorder=1)
        for op in kinds:
            sel = [(i, max(e, floor)) for i, e in pts if ops[i] == op]
            ax.scatter([i for i, _ in sel], [e for _, e in sel], s=18, color=color[op], label=op, zorder=2)
        _log_scale(ax, "y")
        for i in largest_jumps(errors):
            ax.annotate(_short(names[i], 24), (i, max(errors[i], floor)), xytext=(0, 14),
                        textcoords="offset points", ha="center", fontsize=7.5, color=WARN,
                        arrowprops={"arrowstyle": "-", "color": WARN, "linewidth": 0.8})
        if any(c is not None for c in cosines):
            ax2 = ax.twinx()
            ax2.plot(range(n), [1.0 - c if c is not None else math.nan for c in cosines], color=GREY,
                     linewidth=0.8, linestyle="--", label="1 − cosine")
            _log_scale(ax2, "y")
            ax2.set_ylabel("1 − cosine (dashed)", color="#777")
            ax2.grid(False)
            ax2.spines["right"].set_visible(True)
        ax.set_ylabel(metric_label)
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7.5, ncols=min(6, max(1, len(kinds))))
        _layer_axis(ax, names, True)
        return _svg(fig, key)


# ====================================================================== per output
def error_histogram(key: str, name: str, log10_min: float, bins_per_decade: int, counts: Sequence[int],
                    zeros: int) -> str:
    """Counts of |optimized − original| on log-spaced bins; exact zeros noted in the title."""
    with _figure(key, 4.6, 3.0) as fig:
        ax = fig.add_subplot()
        edges = [10 ** (log10_min + k / bins_per_decade) for k in range(len(counts) + 1)]
        if counts:
            ax.stairs(counts, edges, fill=True, color=AFTER, alpha=0.85)
        _log_scale(ax, "x")
        ax.set_xlabel("|optimized − original|")
        ax.set_ylabel("values")
        ax.set_title(f"'{_short(name, 30)}': error histogram" + (f" ({zeros} exact)" if zeros else ""))
        return _svg(fig, key)


def value_scatter(key: str, name: str, a: Sequence[float | None], b: Sequence[float | None]) -> str:
    """Optimized against original values (a subsample), with the line y = x."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    with _figure(key, 3.6, 3.0) as fig:
        ax = fig.add_subplot()
        if pairs:
            xs, ys = zip(*pairs)
            lo, hi = min(min(xs), min(ys)), max(max(xs), max(ys))
            ax.plot([lo, hi], [lo, hi], color="#444", linewidth=0.8, zorder=1)
            ax.scatter(xs, ys, s=4, color=AFTER, alpha=0.5, linewidths=0, rasterized=True, zorder=2)
        ax.set_xlabel("original")
        ax.set_ylabel("optimized")
        ax.set_title(f"'{_short(name, 24)}': {len(pairs)} values")
        return _svg(fig, key)


# ====================================================================== time
def op_times(key: str, labels: Sequence[str], by_op: Sequence[dict[str, float]], top: int = 14) -> str:
    """Milliseconds per run by op type, one bar per model for each op type (the `top` largest)."""
    totals: dict[str, float] = {}
    for d in by_op:
        for op, ms in d.items():
            totals[op] = totals.get(op, 0.0) + ms
    ops = [op for op, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    k = max(1, len(labels))
    with _figure(key, 6.4, 1.0 + (0.12 * k + 0.06) * len(ops)) as fig:
        ax = fig.add_subplot()
        h = 0.8 / k
        for j, (label, d) in enumerate(zip(labels, by_op)):
            ys = [len(ops) - 1 - i + 0.4 - h * (j + 0.5) for i in range(len(ops))]
            ax.barh(ys, [d.get(op, 0.0) for op in ops], height=h * 0.95, label=label,
                    color=[BEFORE, AFTER, *_PALETTE[2:]][j % len(_PALETTE)])
        ax.set_yticks([len(ops) - 1 - i for i in range(len(ops))], ops)
        ax.set_xlabel("ms per run (kernel time, ONNX Runtime profiler)")
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(labels), fontsize=8)
        return _svg(fig, key)


def slowest_nodes(key: str, labels: Sequence[str], nodes: Sequence[Sequence[dict[str, Any]]]) -> str:
    """The slowest nodes of each model, side by side, longest on top."""
    k = max(1, len(labels))
    rows = max([len(n) for n in nodes] + [1])
    with _figure(key, min(13.0, 4.4 * k), 0.7 + 0.26 * rows) as fig:
        axes = fig.subplots(1, k, sharex=True, squeeze=False)[0]
        for j, (ax, label, ns) in enumerate(zip(axes, labels, nodes)):
            names = [f"{_short(n['name'], 26)} ({n['op']})" for n in ns][::-1]
            ax.barh(names, [n["ms"] for n in ns][::-1], color=[BEFORE, AFTER, *_PALETTE[2:]][j % len(_PALETTE)])
            ax.set_title(f"{label}: {len(ns)} slowest nodes", fontsize=9)
            ax.set_xlabel("ms per run")
            ax.tick_params(axis="y", labelsize=7)
        return _svg(fig, key)


# ====================================================================== passes
def pass_seconds(key: str, names: Sequence[str], seconds: Sequence[float]) -> str:
    with _figure(key, 6.4, 0.6 + 0.3 * len(names)) as fig:
        ax = fig.add_subplot()
        ys = list(range(len(names)))[::-1]
        ax.barh(ys, seconds, color=AFTER, height=0.6)
        for y, s in zip(ys, seconds):
            ax.text(s, y, f" {s:.2f} s", va="center", fontsize=8)
        ax.set_yticks(ys, names)
        ax.set_xlim(0, max([*seconds, 1e-3]) * 1.25)
        ax.set_xlabel("seconds")
        return _svg(fig, key)


def skip_reasons(key: str, rows: Sequence[tuple[str, int]]) -> str:
    """Horizontal bars: how many nodes each (pass: reason) declined."""
    with _figure(key, 8.0, 0.6 + 0.28 * len(rows)) as fig:
        ax = fig.add_subplot()
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [c for _, c in rows], color=WARN, height=0.6)
        ax.set_yticks(ys, [_short(label, 70) for label, _ in rows], fontsize=7.5)
        ax.set_xlabel("nodes skipped")
        return _svg(fig, key)


# ====================================================================== tune
def sensitivity_heatmap(key: str, layers: Sequence[str], actions: Sequence[str],
                        error: Sequence[Sequence[float | None]]) -> str:
    """Layer × action → error (log colour scale); light grey where an action was not measured."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm

    grid = np.array([[math.nan if v is None else v for v in row] for row in error], dtype=float).T
    finite = grid[np.isfinite(grid) & (grid > 0)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1e-6, 1.0)
    width = min(13.0, max(6.4, 0.16 * len(layers) + 2.5))
    with _figure(key, width, 1.4 + 0.32 * len(actions)) as fig:
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="#eeeeee")  # not measured: light grey
        shown = np.where(np.isfinite(grid) & (grid <= 0), lo, grid)  # an exact action: the lowest colour
        img = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(vmin=lo, vmax=max(hi, lo * 10)),
                        interpolation="nearest")
        ax.set_yticks(range(len(actions)), actions)
        step = _tick_every(len(layers))
        idx = list(range(0, len(layers), step))
        ax.set_xticks(idx, [_short(layers[i]) for i in idx], rotation=90, fontsize=7)
        ax.grid(False)
        fig.colorbar(img, ax=ax, label="output error when applied alone")
        return _svg(fig, key)


def pareto_front(key: str, objective_label: str, error_label: str,
                 points: Sequence[tuple[float, float, str]], front: Sequence[tuple[float, float]],
                 chosen: tuple[float, float] | None, limit: float | None) -> str:
    """Trials as (objective, error, state) points, the Pareto front as a step line, the chosen trial
    ringed, and the error limit as a horizontal line."""
    with _figure(key, 6.4, 4.0) as fig:
        ax = fig.add_subplot()
        states = list(dict.fromkeys(s for _, _, s in points))
        for state in states:
            sel = [(x, y) for x, y, s in points if s == state]
            ax.scatter([x for x, _ in sel], [y for _, y in sel], s=14,
                       color=GREY if state != "COMPLETE" else BEFORE, label=f"{state.lower()} trials",
                       marker="o" if state == "COMPLETE" else "x", zorder=2)
        if front:
            fx, fy = zip(*sorted(front))
            ax.step(fx, fy, where="post", color=AFTER, linewidth=1.2, label="Pareto front", zorder=3)
            ax.scatter(fx, fy, s=20, color=AFTER, zorder=3)
        if chosen is not None:
            ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors=WARN, linewidths=1.8,
                       label="chosen", zorder=4)
        if limit is not None:
            ax.axhline(limit, color=WARN, linewidth=0.8, linestyle="--", label="error limit")
        ys = [y for _, y, _ in points if y is not None and y > 0]
        if ys and max(ys) / min(ys) > 100:
            _log_scale(ax, "y")
        ax.set_xlabel(objective_label)
        ax.set_ylabel(error_label)
        ax.legend(fontsize=8)
        return _svg(fig, key)
