"""Command line: ``onnxopt MODEL --passes ... -o OUT`` (optimize, the default verb) and every other verb.

`VERBS` maps each verb to ``"module:function"``; the module is imported only when its verb runs, so
``onnxopt --version`` and ``onnxopt --help`` import no pass, no onnx and no ONNX Runtime. Adding a
verb is one entry there plus its module, whose function takes the arguments after the verb and
returns the exit code; it builds its parser with `Parser` and `add_shared_arguments` (``--dims``,
``--batch``, ``--threads``, ``--debug``, ``--data``) and calls `setup_logging`.

User errors print one line and exit 2; a tolerance exceeded (or, under ``--require-faster``, a model
measured slower than the original) exits 1; anything else is a bug and
exits 3, with a traceback only under ``--debug``. Every number is range-checked while the arguments
are parsed (`onnxopt.limits`), so a bad one fails before any model is read. What reaches stderr is
one line with non-printable characters escaped (names from a model may hold any); an interrupt
(Ctrl-C) prints one line and exits 130, also while the program is still starting.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from onnxopt import __version__, _interrupt
from onnxopt.errors import OnnxoptError, UsageError, first_line, printable, safe_name
from onnxopt.limits import (
    DRIFT_COSINE,
    DRIFT_TOP1,
    MAX_RECIPE_DEPTH,
    check_batch,
    check_dim,
    check_fraction,
    check_runs,
    check_threads,
    check_tolerance,
)
from onnxopt.metrics import METRICS

__all__ = [
    "main",
    "VERBS",
    "Parser",
    "add_shared_arguments",
    "parse_dims",
    "setup_logging",
    "EXIT_OK",
    "EXIT_TOLERANCE",
    "EXIT_USAGE",
    "EXIT_BUG",
]

EXIT_OK, EXIT_TOLERANCE, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one-line UsageErrors (exit 2), shared by every verb."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``--dims NAME=N`` values as {dimension name: size}; UsageError for anything else (N in 1..MAX_DIM)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--dims '{printable(item)}': write it as NAME=N with N a positive whole number")
        out[name] = check_dim(printable(name), value)
    return out


def _whole(option: str, check: Callable[[int], Any]) -> Callable[[str], int]:
    """An argparse `type` for a whole number that `check` range-checks (its UsageError names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{option} '{printable(text)}': give a whole number") from None
        check(value)
        return value

    return parse


def _number(option: str, check: Callable[[float], Any] | None = None) -> Callable[[str], float]:
    """An argparse `type` for a finite number (NaN and infinities refused), range-checked by `check`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{option} '{printable(text)}': give a number") from None
        if not math.isfinite(value):
            raise UsageError(f"{option} {text}: give a finite number")
        if check is not None:
            check(value)
        return value

    return parse


def _non_negative(option: str) -> Callable[[float], None]:
    def check(value: float) -> None:
        if value < 0:
            raise UsageError(f"{option} {value:g}: give a number >= 0")

    return check


def add_shared_arguments(p: argparse.ArgumentParser, *, runtime: bool = True, data: bool = True) -> None:
    """The arguments verbs share: ``--debug`` and ``--quiet`` always; ``--dims``, ``--batch`` and ``--threads``
    for a verb that runs models (`runtime`); ``--data`` for one that reads evaluation data (`data`)."""
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, warnings or notes: only the final table and errors")
    if not runtime:
        return
    p.add_argument("--dims", action="append", default=[], metavar="NAME=N",
                   help="value of a symbolic input dimension (repeatable; default 1)")
    p.add_argument("--batch", type=_whole("--batch", check_batch), default=None, metavar="N",
                   help="batch size for splitting a stacked .npz when the batch axis is dynamic (default 16)")
    p.add_argument("--threads", type=_whole("--threads", check_threads), default=None, metavar="T",
                   help="ONNX Runtime intra-op threads (1 to max(256, 4 x CPU count))")
    if data:
        p.add_argument("--data", default=None, metavar="DATA",
                       help="evaluation data: a .npz, a folder of .npz feeds, or random:N")


def _optimize_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="onnxopt",
        description="Optimize an ONNX model with a pipeline of passes, check it against the original "
        f"in ONNX Runtime, and write it. Other verbs: {', '.join(VERBS)} (onnxopt VERB --help).",
        epilog="example: onnxopt models/digits_cnn.onnx --passes fold -o cnn.opt.onnx "
        "--data models/digits_eval.npz",
    )
    p.add_argument("model", help="the .onnx file to optimize (never modified)")
    p.add_argument("--passes", default=None, help="comma-separated passes, run in order (see: onnxopt passes)")
    p.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    p.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE", dest="sets",
                   help="a pass option, typed by its declaration (repeatable)")
    p.add_argument("--recipe", default=None, metavar="FILE", help="TOML or JSON list of passes with options")
    p.add_argument("--calib", default=None, metavar="DATA", help="calibration data: .npz, folder of .npz, random:N")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write the report: FILE.html a page with plots (per layer, outputs, profiles), else JSON")
    p.add_argument("--tolerance", type=_number("--tolerance", _non_negative("--tolerance")), default=None,
                   metavar="X", help="exit 1 when the output error exceeds X (by --metric); without it the "
                   "validation is reported as not gated")
    p.add_argument("--metric", default="rel_l2", choices=METRICS,
                   help="what --tolerance bounds: relative L2 error (default), max abs error, 1-cosine, "
                   "1-top-1 agreement, or accuracy drop (needs labels)")
    _add_drift_arguments(p)
    p.add_argument("--require-faster", action="store_true",
                   help="exit 1 when the optimized model is measured slower than the original (median more than "
                   "2%% over it; the table is still printed and the file written, as with --tolerance); "
                   "needs the timing (--bench-runs above 0)")
    p.add_argument("--no-validate", action="store_true", help="skip checker and ONNX Runtime comparison")
    p.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    p.add_argument("--keep-initializer-inputs", action="store_true",
                   help="IR < 4 models: keep weights listed as graph inputs overridable (default: constants, "
                   "as ONNX Runtime reads them, so passes may compress them)")
    p.add_argument("--bench-runs", type=_whole("--bench-runs", check_runs), default=50, metavar="N",
                   help="latency runs per model for the table, within 10 s: interleaved in one process, one "
                   "child process per model when both exceed 1 GiB, not timed above 2 GiB in one "
                   "(0: skip timing; default 50)")
    add_shared_arguments(p)
    return p


def _add_drift_arguments(p: argparse.ArgumentParser) -> None:
    """``--drift-cosine`` and ``--drift-top1``: what the comparison calls severe drift (a WARNING line)."""
    p.add_argument("--drift-cosine", type=_number("--drift-cosine", lambda v: check_fraction(v, "--drift-cosine")),
                   default=DRIFT_COSINE, metavar="X",
                   help=f"warn when an output's cosine similarity falls below X (default {DRIFT_COSINE}; 0: off)")
    p.add_argument("--drift-top1", type=_number("--drift-top1", lambda v: check_fraction(v, "--drift-top1")),
                   default=DRIFT_TOP1, metavar="X",
                   help=f"warn when an output's top-1 (argmax) agreement, or a non-float output's element "
                   f"agreement, falls below X (default {DRIFT_TOP1}; 0: off)")


def _non_finite_text(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan")


def _check_option_values(where: str, name: str, options: dict[str, Any]) -> None:
    """Refuse NaN and infinite numbers (also written as text) and values nested deeper than MAX_RECIPE_DEPTH,
    walked with an explicit stack."""
    stack: list[tuple[str, Any, int]] = [(f"{name}.{key}", value, 1) for key, value in options.items()]
    while stack:
        path, value, depth = stack.pop()
        if depth > MAX_RECIPE_DEPTH:
            raise UsageError(f"{where}: option {printable(path)} is nested more than {MAX_RECIPE_DEPTH} levels deep")
        if (isinstance(value, float) and not math.isfinite(value)) or _non_finite_text(value):
            raise UsageError(f"{where}: option {printable(path)} = {printable(str(value))}; give a finite number")
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}", v, depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))


def _read_recipe(path: str) -> list[tuple[str, dict[str, Any]]]:
    from onnxopt.pipeline import read_recipe

    try:
        specs = read_recipe(path)
    except RecursionError:
        raise UsageError(f"recipe '{path}' is nested too deeply to read") from None
    for name, options in specs:
        _check_option_values(f"recipe '{path}'", name, options)
    return specs


def _pass_specs(args: argparse.Namespace) -> list[Any]:
    """The passes with their options from --passes/--recipe and --set, every value checked."""
    from onnxopt.pipeline import apply_sets, parse_passes

    for item in args.sets:
        if _non_finite_text(item.partition("=")[2]):
            raise UsageError(f"--set '{printable(item)}': give a finite number")
    if args.recipe and args.passes:
        raise UsageError("give either --passes or --recipe, not both")
    if args.recipe:
        specs: list[Any] = _read_recipe(args.recipe)
        if args.sets:
            names = [n for n, _ in specs]
            extra = dict(apply_sets(names, args.sets))
            specs = [(n, {**o, **extra[n]}) for n, o in specs]
        return specs
    if args.passes:
        return apply_sets(parse_passes(args.passes), args.sets)
    raise UsageError("name the passes with --passes P1,P2 or --recipe FILE (see: onnxopt passes)")


def report_json(doc: dict[str, Any]) -> str:
    """The JSON text of a report: indented, valid (NaN and infinities as strings), anything else as its string."""
    from onnxopt.report import report_bytes

    return report_bytes(doc, "report.json").decode("utf-8")


def _cmd_optimize(argv: Sequence[str]) -> int:
    args = _optimize_parser().parse_args(argv)
    setup_logging(args)
    check_tolerance(args.tolerance, args.metric)
    if args.require_faster and args.bench_runs == 0:
        raise UsageError("--require-faster needs the latency measurement: drop --bench-runs 0")
    specs = _pass_specs(args)
    dims = parse_dims(args.dims)
    from onnxopt.api import optimize
    from onnxopt.latency import speed_gate
    from onnxopt.report import report_bytes, result_table

    external = True if args.external_data else None
    result = optimize(
        args.model,
        specs,
        calib=args.calib,
        data=args.data,
        validate=not args.no_validate,
        tolerance=args.tolerance,
        metric=args.metric,
        dims=dims,
        batch=args.batch,
        latency_runs=args.bench_runs,
        threads=args.threads,
        output=args.output,
        external_data=external,
        also_writes={"report": args.report} if args.report else None,
        drift_cosine=args.drift_cosine,
        drift_top1=args.drift_top1,
        initializer_inputs="input" if args.keep_initializer_inputs else "constant",
        details=bool(args.report),
    )
    try:  # everything that can fail runs before the one commit that writes the report, then the model
        lines = [] if args.quiet else [_pass_line(rec) for rec in result.passes]
        text = "\n".join([result_table(result), *lines])
        companions = {}
        if args.report:
            doc = {"kind": "optimize", "onnxopt": __version__, "model": str(args.model), "output": str(args.output),
                   **result.to_dict()}
            companions[args.report] = report_bytes(doc, args.report)
        out = result.save(args.output, external_data=external, companions=companions)
    finally:
        result.discard()
    if result.feeds_note and not args.quiet:
        print(f"note: {result.feeds_note}")
    print(text)
    for warning in result.validation.warnings() if result.validation is not None else []:
        print(f"onnxopt: WARNING: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"wrote {printable(str(out))}")
    slow = speed_gate(result, args.require_faster)
    if not result.passed:
        print(f"onnxopt: output error exceeds the tolerance: {result.validation.describe()}", file=sys.stderr)
        return EXIT_TOLERANCE
    return EXIT_TOLERANCE if slow else EXIT_OK


def _write_report(path: str, kind: str, doc: dict[str, Any]) -> None:
    """Write a verb's report (`onnxopt.report.write_report`: a page for .html, else JSON)."""
    from onnxopt.report import write_report

    write_report(path, {"kind": kind, "onnxopt": __version__, **doc})


def _pass_line(rec: Any) -> str:
    s = rec.stats
    bits = [printable(f"{k}={_fmt(v)}") for k, v in s.summary.items()]
    if s.skipped:
        bits.append(f"skipped={len(s.skipped)}")
    body = ", ".join(bits) if bits else ("changed" if s.modified else "no change")
    line = textwrap.fill(f"pass {rec.name} ({rec.seconds:.2f}s): {body}", width=100, subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)
    for note in s.notes:
        line += f"\n  note: {printable(str(note))}"
    return line


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cmd_inspect(argv: Sequence[str]) -> int:
    p = Parser(prog="onnxopt inspect", description="Inputs, outputs, opset, op histogram, parameters, size, MACs.")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_shared_arguments(p, data=False)
    args = p.parse_args(argv)
    setup_logging(args)
    from onnxopt import io
    from onnxopt.analysis import model_stats
    from onnxopt.data import input_specs
    from onnxopt.report import stats_table

    model = io.load(args.model)
    dims = parse_dims(args.dims)
    stats = model_stats(model, dims)
    size = io.file_size(args.model)
    outputs = [
        f"{safe_name(v.name)} {v.dtype.name if v.dtype else '?'}"
        f"[{','.join(str(d) for d in v.shape.dims) if v.shape is not None else '?'}]"
        for v in model.graph.outputs
    ]
    opsets = dict(model.opset_imports)
    if args.json:
        doc = {
            "inputs": [s.describe() for s in input_specs(model)],
            "outputs": outputs,
            "opsets": opsets,
            "ir_version": model.ir_version,
            "producer": model.producer_name,
            "file_bytes": size,
            **stats.to_dict(),
        }
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(printable(f"model     {args.model}"))
    print(printable(f"producer  {model.producer_name or '-'} {model.producer_version or ''}".rstrip()))
    opset_text = ", ".join(f"{safe_name(d or 'ai.onnx')}:{v}" for d, v in opsets.items())
    print(f"opsets    {opset_text}  (IR {model.ir_version})")
    for s in input_specs(model):
        print(f"input     {s.describe()}")
    for o in outputs:
        print(f"output    {o}")
    print(stats_table(stats, size))
    print("ops       " + ", ".join(f"{safe_name(k)} {v}" for k, v in stats.op_histogram.items()))
    return EXIT_OK


def _cmd_bench(argv: Sequence[str]) -> int:
    p = Parser(prog="onnxopt bench",
                description="Latency on ONNX Runtime (min, median, p90), throughput and peak memory. "
                "With several models, runs interleave in one process and ratios to the first are printed.")
    p.add_argument("models", nargs="+")
    p.add_argument("--runs", type=_whole("--runs", lambda v: check_runs(v, "--runs")), default=100,
                   help="timed runs per model (default 100)")
    p.add_argument("--warmup", type=_whole("--warmup", lambda v: check_runs(v, "--warmup")), default=10,
                   help="untimed runs first (default 10)")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write a report with ONNX Runtime profiles of each model: FILE.html a page, else JSON")
    add_shared_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    from onnxopt import io
    from onnxopt.bench import bench
    from onnxopt.report import table
    from onnxopt.runtime import provider_name

    provider_name(args.provider)
    dims = parse_dims(args.dims)
    models = [io.load(m) for m in args.models]
    data = None
    if args.data:
        data = _eval_data(args.data, args.models[0], models[0], dims, args)
    for model in args.models if args.report else []:
        io.check_output_path(args.report, model)
    res = bench(args.models, runs=args.runs, warmup=args.warmup, threads=args.threads, provider=args.provider,
                dims=dims, batch=args.batch, data=data, memory=not args.no_memory)
    if args.report:
        from onnxopt.report.collect import bench_details

        _write_report(args.report, "bench", {
            "models": list(args.models), "latency": res.to_dict(),
            **bench_details(args.models, data, runs=args.runs, threads=args.threads, dims=dims, batch=args.batch)})
    if args.json:
        print(json.dumps(res.to_dict(), indent=2))
        return EXIT_OK
    rows = []
    for lat, ratio in zip(res.latencies, res.ratios):
        rows.append([
            lat.model, f"{lat.min_ms:.3f}", f"{lat.median_ms:.3f}", f"{lat.p90_ms:.3f}",
            f"{lat.throughput:.1f}", "-" if lat.peak_mb is None else f"{lat.peak_mb:.0f}", f"{ratio:.3f}x",
        ])
    print(table(rows, ["model", "min ms", "median ms", "p90 ms", "samples/s", "peak MB", "vs first"]))
    print(f"{args.provider.upper()} provider, {res.latencies[0].runs} runs ({res.method}), "
          f"batch {res.latencies[0].batch}"
          + (f", {args.threads} threads" if args.threads else ""))
    return EXIT_OK


def _eval_data(spec: str, path: str, model: Any, dims: dict[str, int], args: argparse.Namespace) -> Any:
    """Data for a verb that runs `model` (at `path`) first: random feeds sized so that it runs on them."""
    from onnxopt.api import random_feed_sizes
    from onnxopt.data import input_specs, load_data

    inputs = input_specs(model)
    sizes, note = {}, None
    if spec.startswith("random:"):
        sizes, note = random_feed_sizes(path, inputs, dims, args.batch, args.threads)
    if note and not getattr(args, "json", False):
        print(f"note: {note}")
    return load_data(spec, inputs, dims=dims, batch=args.batch, sizes=sizes)


def _cmd_compare(argv: Sequence[str]) -> int:
    p = Parser(prog="onnxopt compare", description="Output agreement of two models on the same inputs.")
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--tolerance", type=_number("--tolerance", _non_negative("--tolerance")), default=None,
                   metavar="X", help="exit 1 when exceeded (by --metric); without it the comparison is not gated")
    p.add_argument("--metric", default="rel_l2", choices=METRICS, help="what --tolerance bounds")
    _add_drift_arguments(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write a report with per-layer errors and output distributions: FILE.html a page, else JSON")
    add_shared_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args)
    check_tolerance(args.tolerance, args.metric)
    from onnxopt import io
    from onnxopt.analysis.outputs import class_outputs
    from onnxopt.api import DEFAULT_EVAL
    from onnxopt.report import comparison_table
    from onnxopt.validate import compare_models

    a = io.load(args.model_a)
    io.load(args.model_b)
    data = _eval_data(args.data or DEFAULT_EVAL, args.model_a, a, parse_dims(args.dims), args)
    for model in (args.model_a, args.model_b) if args.report else ():
        io.check_output_path(args.report, model)
    cmp = compare_models(args.model_a, args.model_b, data, metric=args.metric, tolerance=args.tolerance,
                         threads=args.threads, drift_cosine=args.drift_cosine, drift_top1=args.drift_top1,
                         classes=set(class_outputs(a.graph)))
    if args.report:
        from onnxopt.report.collect import compare_details

        _write_report(args.report, "compare", {
            "models": [args.model_a, args.model_b], "validation": cmp.to_dict(),
            **compare_details(args.model_a, args.model_b, data, threads=args.threads, dims=parse_dims(args.dims))})
    if args.json:
        print(report_json(cmp.to_dict()))
    else:
        print(comparison_table(cmp))
        print(f"{cmp.samples} samples from {printable(data.source)}: {cmp.describe()}")
    for warning in cmp.warnings():
        print(f"onnxopt: WARNING: {warning}", file=sys.stderr)
    return EXIT_OK if cmp.passed else EXIT_TOLERANCE


def _cmd_passes(argv: Sequence[str]) -> int:
    p = Parser(prog="onnxopt passes", description="Every registered pass with its options.")
    p.add_argument("--json", action="store_true")
    add_shared_arguments(p, runtime=False)
    args = p.parse_args(argv)
    setup_logging(args)
    from onnxopt.registry import list_passes, option_specs

    passes = list_passes()
    if args.json:
        doc = {
            name: {
                "summary": cls.summary(),
                "exact": cls.exact,
                "options": [{"name": s.name, "type": s.type_name, "default": s.default, "doc": s.doc,
                             "read_when": s.condition or None} for s in option_specs(cls)],
            }
            for name, cls in passes.items()
        }
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    for name, cls in passes.items():
        tag = " [exact]" if cls.exact else ""
        print(f"{name}{tag}: {cls.summary()}")
        for s in option_specs(cls):
            when = f" [read when {s.condition}]" if s.when else ""
            print(f"    {s.name} ({s.type_name}, default {s.default!r}){when}: {s.doc}")
    return EXIT_OK


VERBS: dict[str, str] = {
    "inspect": "onnxopt.cli:_cmd_inspect",
    "bench": "onnxopt.cli:_cmd_bench",
    "compare": "onnxopt.cli:_cmd_compare",
    "passes": "onnxopt.cli:_cmd_passes",
    "merge": "onnxopt.merge.verb:main",
    "tune": "onnxopt.tune.verb:main",
    "report": "onnxopt.report.verb:main",
}
"""Every verb besides the default (optimize): ``"module:function"``, imported when the verb runs."""


def _verb_handler(verb: str) -> Callable[[Sequence[str]], int]:
    module, _, function = VERBS[verb].partition(":")
    return getattr(importlib.import_module(module), function)


class _PrintableFormatter(logging.Formatter):
    """Log messages with non-printable characters escaped (they may quote names from a model)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return printable(super().formatMessage(record))


def setup_logging(args: argparse.Namespace) -> None:
    """Debug logs under ``--debug``, warnings otherwise; one line per message. ``--quiet``: errors only
    and no progress bars."""
    from onnxopt.progress import set_quiet

    quiet = getattr(args, "quiet", False)
    set_quiet(quiet)
    level = logging.DEBUG if getattr(args, "debug", False) else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if type(handler.formatter) is logging.Formatter:
            handler.setFormatter(_PrintableFormatter(handler.formatter._fmt))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on `argv` (default: the process arguments); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    as_program = _interrupt.interrupts_are_quiet()
    if as_program:  # from here on an interrupt unwinds, so that staged files are removed
        _interrupt.unwinding_interrupts()
    try:
        return _main(argv, debug)
    finally:
        if as_program:  # interpreter shutdown: one line again, never a traceback
            _interrupt.quiet_interrupts()


def _main(argv: list[str], debug: bool) -> int:
    try:
        if argv and argv[0] in ("--version", "-V"):
            print(f"onnxopt {__version__}")
            return EXIT_OK
        if argv and argv[0] in VERBS:
            return _verb_handler(argv[0])(argv[1:])
        return _cmd_optimize(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except OnnxoptError as exc:
        if debug:
            raise
        print(f"onnxopt: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into a pager or head that closed early
        return EXIT_OK
    except KeyboardInterrupt:
        print("onnxopt: interrupted; nothing was written", file=sys.stderr)
        return 130
    except RecursionError:
        if debug:
            raise
        print("onnxopt: error: input nested too deeply to process", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"onnxopt: internal error: {type(exc).__name__}: {first_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
