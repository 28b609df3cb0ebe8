"""``onnxopt merge A.onnx B.onnx [...] -o OUT --combine MODE``: the command line of `merge_models`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from onnxopt import io
from onnxopt.cli import EXIT_OK, Parser, add_shared_arguments, setup_logging
from onnxopt.errors import UsageError
from onnxopt.merge.api import MergeReport, merge_models
from onnxopt.merge.combine import COMBINE_MODES

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxopt merge",
               description="Merge several ONNX models into one: ensembles (shared inputs, outputs combined), "
               "a chain (one model's outputs feed the next), or a soup (weights averaged).",
               epilog="example: onnxopt merge a.onnx b.onnx c.onnx -o ens.onnx --combine softvote")
    p.add_argument("models", nargs="+", help="the member models (at least two; never modified)")
    p.add_argument("-o", "--output", required=True, help="where to write the merged model")
    p.add_argument("--combine", required=True, choices=COMBINE_MODES, help="how to merge")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="one weight per member, normalized (weighted, softvote, soup)")
    p.add_argument("--keep-members", action="store_true", help="also expose each member's outputs, prefixed")
    p.add_argument("--input-map", action="append", default=[], metavar="[MEMBER:]FROM=TO",
                   help="ensembles: feed member input FROM from shared input TO; chain: feed next input TO from "
                   "output FROM (repeatable; MEMBER is a member name or index)")
    p.add_argument("--names", default=None, metavar="N1,N2,...", help="member names used as prefixes")
    p.add_argument("--axis", type=int, default=-1, help="class axis (vote, softvote) or join axis (concat)")
    p.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data")
    p.add_argument("--no-check", action="store_true", help="skip the checker and ONNX Runtime load")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_shared_arguments(p, runtime=False, data=False)
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights '{text}': give comma-separated numbers, one per member") from None


def _report_text(report: MergeReport) -> str:
    from onnxopt.report import table

    rows = [[m["name"], m["source"], str(m["opset"]), str(m["nodes"]), f"{m['parameters']:,}"] for m in report.members]
    rows.append([f"merged ({report.combine})", "", str(report.opset), str(report.nodes), f"{report.parameters:,}"])
    lines = [table(rows, ["member", "source", "opset", "nodes", "params"])]
    if report.weights is not None:
        lines.append("weights " + ", ".join(f"{w:.4g}" for w in report.weights))
    if report.initializers_deduplicated:
        lines.append(f"{report.initializers_deduplicated} identical initializers stored once")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Run ``onnxopt merge`` with the arguments after the verb; the exit code."""
    args = _parser().parse_args(argv)
    setup_logging(args)
    for path in args.models:
        io.check_output_path(args.output, path)
    weights = _floats(args.weights) if args.weights is not None else None
    names = args.names.split(",") if args.names else None
    model, report = merge_models(args.models, combine=args.combine, weights=weights, keep_members=args.keep_members,
                                 input_map=args.input_map or None, names=names, axis=args.axis,
                                 check=not args.no_check)
    out = io.save(model, args.output, external_data=True if args.external_data else None)
    if args.json:
        print(json.dumps({"output": str(out), **report.to_dict()}, indent=2))
        return EXIT_OK
    print(_report_text(report))
    print(f"wrote {out}")
    return EXIT_OK
