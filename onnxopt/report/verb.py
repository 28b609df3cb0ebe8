"""``onnxopt report RUN.json -o FILE.html``: draw the page of a report written earlier.

The input is a JSON report (``--report x.json`` of any verb) or a report page (its embedded data
is read back); the output is a page for ``.html``/``.htm``, else JSON. The page is the same bytes
as the one ``--report FILE.html`` would have written in the run itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxopt.cli import EXIT_OK, Parser, add_shared_arguments, setup_logging

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    p = Parser(prog="onnxopt report",
               description="Draw a report page (self-contained HTML with plots) from a JSON report, "
               "or convert between the two.",
               epilog="example: onnxopt report run.json -o run.html")
    p.add_argument("report", help="a JSON report (--report x.json) or a report page (its embedded data)")
    p.add_argument("-o", "--output", required=True, help="where to write: FILE.html a page, else JSON")
    add_shared_arguments(p, runtime=False)
    args = p.parse_args(argv)
    setup_logging(args)
    from onnxopt.io import check_output_path
    from onnxopt.report import read_report, write_report

    check_output_path(args.output, args.report)
    out = write_report(args.output, read_report(args.report))
    if not args.quiet:
        print(f"wrote {out}")
    return EXIT_OK
