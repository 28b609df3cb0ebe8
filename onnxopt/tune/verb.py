"""``onnxopt tune MODEL --calib DATA [--data DATA] -o OUT``: the command line of `onnxopt.tune.tune`.

Prints what was measured (data split, sensitivity, trials), the Pareto front of the search, the
finalists measured again on held-out data, and the chosen model's before/after table (the optimize
run that built it); writes OUT and ``OUT.recipe.toml``. Exit 1, writing no model, when no candidate
holds the constraint on held-out data and beats the original on the objective.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from onnxopt.cli import EXIT_OK, EXIT_TOLERANCE, Parser, add_shared_arguments, parse_dims, setup_logging
from onnxopt.errors import UsageError

__all__ = ["main"]

_OBJECTIVES = ("latency", "size", "macs")
_METRICS = ("rel_l2", "cosine", "top1")
_SHOWN_TRIALS = 12


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxopt tune",
               description="Search for the compression recipe (passes, order, per-layer settings, distillation) "
               "that minimizes an objective while the model holds a constraint on held-out data.",
               epilog="example: onnxopt tune models/digits_cnn.onnx --calib models/digits_calib.npz "
               "--data models/digits_eval.npz --max-drop 1 --objective latency -o cnn.tuned.onnx")
    p.add_argument("model", help="the .onnx file to compress (never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the chosen model (and OUT.recipe.toml)")
    p.add_argument("--calib", required=True, metavar="DATA", help="calibration data: .npz, folder of .npz, random:N")
    p.add_argument("--max-drop", type=float, default=None, metavar="PTS",
                   help="constraint: accuracy may drop at most PTS points (data with labels)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="constraint: output error against the original at most X (by --metric)")
    p.add_argument("--metric", default=None, choices=_METRICS,
                   help="what --tolerance bounds: relative L2 (default), 1-cosine, 1-top-1 agreement")
    p.add_argument("--objective", default="latency", choices=_OBJECTIVES,
                   help="what to minimize: ONNX Runtime latency on this machine (default), file size, MACs")
    p.add_argument("--budget-trials", type=int, default=None, metavar="N",
                   help="trials the study holds at the end (a resumed study counts its earlier ones; default 40)")
    p.add_argument("--budget-minutes", type=float, default=None, metavar="M", help="stop starting trials after M min")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="trials at once, in worker processes")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage, any SQLAlchemy URL (default sqlite:///OUT.tune.db): rerun to resume")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: from model, data, settings)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run trials as Ray tasks on this cluster ('local' starts one here; needs onnxopt[ray])")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "nsga2"), help="Optuna sampler (default tpe)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--holdout", type=float, default=0.5, metavar="F",
                   help="share of --data (or of --calib without --data) held out from the search (default 0.5)")
    p.add_argument("--passes", default=None, metavar="P1,P2",
                   help="passes to search over (default: channels,factorize,prune,quantize,distill as the "
                   "objective allows)")
    p.add_argument("--max-layers", type=int, default=48, metavar="N",
                   help="layers whose sensitivity is measured, heaviest first (default 48)")
    p.add_argument("--report", default=None, metavar="FILE",
                   help="write the tune report: FILE.html a self-contained page (sensitivity heat map, Pareto front, "
                        "the chosen model's report), else JSON")
    p.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    p.add_argument("--bench-runs", type=int, default=50, metavar="N",
                   help="interleaved latency runs for the chosen model's table (0: skip; default 50)")
    add_shared_arguments(p)
    return p


def main(argv: Sequence[str]) -> int:
    """Run ``onnxopt tune`` with the arguments after the verb; the exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args)
    from onnxopt import io
    from onnxopt.tune.api import tune
    from onnxopt.tune.result import recipe_path_for

    if args.max_layers < 1:
        raise UsageError("--max-layers must be at least 1")
    io.check_output_path(args.output, args.model)
    io.check_output_path(recipe_path_for(args.output), args.model)
    if args.report:
        io.check_output_path(args.report, args.model)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()] if args.passes else None
    result = tune(
        args.model, calib=args.calib, data=args.data, max_drop=args.max_drop, tolerance=args.tolerance,
        metric=args.metric, objective=args.objective, budget_trials=args.budget_trials,
        budget_minutes=args.budget_minutes, workers=args.workers, storage=args.storage, study=args.study,
        ray=args.ray, sampler=args.sampler, seed=args.seed, holdout=args.holdout, passes=passes,
        threads=args.threads, dims=parse_dims(args.dims), batch=args.batch, output=args.output,
        bench_runs=args.bench_runs, max_layers=args.max_layers, details=bool(args.report),
    )
    print(summary_text(result))
    if args.report:
        from onnxopt.report import write_report

        write_report(args.report, result.to_dict())
    if not result.passed:
        print(f"onnxopt: nothing qualifies: no candidate holds {result.constraint.describe()} on held-out data and "
              f"beats the original on {result.objective}; {result.describe()}; nothing written", file=sys.stderr)
        return EXIT_TOLERANCE
    out, recipe = result.save(args.output, external_data=True if args.external_data else None,
                              model_path=args.model, calib=args.calib)
    print(f"wrote {out} and {recipe}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ text
def summary_text(result: Any) -> str:
    """The text `onnxopt tune` prints: run, sensitivity, Pareto front, finalists and the chosen model's table."""
    from onnxopt.report import result_table, table

    d, s, sens = result.data, result.study, result.sensitivity
    unit = result.constraint.unit()
    threads = f", {result.threads} threads" if result.threads else ""
    lines = [
        f"tune {result.model}: minimize {result.objective}{threads} with {result.constraint.describe()}",
        f"data: calibration {d['calib_samples']} samples, search {d['search_samples']}, "
        f"held out {d['held_out_samples']} (from {d['held_out_from']})",
        _sensitivity_line(sens),
        f"trials: {s['trials_total']} in study '{s['name']}' ({s['trials_this_run']} this run; "
        f"{s['trials_complete']} complete, {s['trials_pruned']} pruned, {s['trials_fail']} failed), "
        f"{result.seconds:.0f}s in all; storage {s['storage']}",
    ]
    worst = sorted((r for r in sens.rows if r.measured and r.error is not None), key=lambda r: -r.rel_l2)[:5]
    if worst:
        lines.append("most sensitive alone: " + ", ".join(
            f"{r.layer} {r.label} ({r.error:.3g} {unit})" for r in worst))
    if result.pareto:
        rows = [[str(t.number), _passes_text(t.recipe), f"{t.objective:.3f}x", f"{t.error:.4g}",
                 "yes" if t.feasible else "no"] for t in result.pareto[:_SHOWN_TRIALS]]
        lines += ["", "Pareto front on search data (objective vs error):",
                  table(rows, ["trial", "recipe", result.objective, f"error ({unit})", "holds"])]
    if result.finalists:
        rows = []
        for f in result.finalists:
            spread = f" ({f.objective_spread[0]:.3f}-{f.objective_spread[1]:.3f})" if f.objective_spread else ""
            verdict = "chosen" if result.chosen is f else ("holds" if f.holds and f.beats else
                                                            "breaks the constraint" if not f.holds else "not better")
            rows.append([str(f.number), f"{f.objective:.3f}x{spread}", f"{f.error:.4g}", verdict])
        lines += ["", "finalists on held-out data:", table(rows, ["trial", result.objective, f"error ({unit})",
                                                                  "verdict"])]
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.result is not None:
        lines += ["", f"chosen: trial {result.chosen.number}: {_passes_text(result.recipe)}",
                  result_table(result.result)]
    return "\n".join(lines)


def _sensitivity_line(sens: Any) -> str:
    measured = sum(1 for r in sens.rows if r.measured)
    layers = len({r.layer for r in sens.rows})
    return (f"sensitivity: {measured} of {len(sens.rows)} actions measured on {layers} layers "
            f"(of {sens.layers_total}), {sens.samples} samples, {sens.seconds:.1f}s; "
            f"tapping sessions reused {sens.taps_reused} times")


def _passes_text(recipe: Any) -> str:
    parts = []
    for name, options in recipe or []:
        layers = options.get("layers") if isinstance(options, dict) else None
        if name == "quantize" and isinstance(options, dict):
            pinned = options.get("float_nodes") or []
            said = [str(options["mode"])] if options.get("mode") not in (None, "static") else []
            said += [f"{len(layers or {}) + len(pinned)} float"] if layers or pinned else []
            said += ["searched set"] if pinned else []
            parts.append(f"quantize({', '.join(said)})" if said else "quantize")
        elif isinstance(layers, dict) and layers:
            parts.append(f"{name}({sum(1 for k in layers if k != '*')})")
        else:
            parts.append(name)
    return ",".join(parts)
