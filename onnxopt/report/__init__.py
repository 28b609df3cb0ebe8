"""Reports: the text tables the command line prints, and the report file (JSON, or an HTML page drawn
from that JSON).

- `onnxopt.report.text`: the before/after table, `stats_table`, `table`, number formatting (re-exported
  here: ``from onnxopt.report import result_table``).
- `onnxopt.report.html`: `build_html(doc)`, one self-contained page (inline SVG plots, the data
  embedded) drawn only from the report's data, so a page written by ``--report x.html`` and one drawn
  later by ``onnxopt report x.json -o x.html`` are the same bytes.
- `onnxopt.report.collect`: the per-layer, per-output and profile data a run gathers when a report
  is asked for.
- `write_report(path, doc)`: the file by its suffix (``.html``/``.htm``: the page, else JSON),
  written atomically; `report_bytes` is the same content for a caller that stages files itself;
  `read_report` reads either kind back (the page's embedded data).

``import onnxopt.report`` stays light: matplotlib is imported when a page is drawn.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from onnxopt.errors import UsageError
from onnxopt.report.text import __all__ as _TEXT
from onnxopt.report.text import (  # noqa: F401 (re-exported: the command line's text tables)
    before_after_rows,
    comparison_table,
    human_bytes,
    human_count,
    output_line,
    result_table,
    stats_table,
    table,
)

__all__ = [*_TEXT, "is_html", "normalized", "report_bytes", "write_report", "read_report"]

_HTML_SUFFIXES = (".html", ".htm")


def is_html(path: str | os.PathLike[str]) -> bool:
    """Whether a report path asks for the page (by its suffix) rather than JSON."""
    return Path(path).suffix.lower() in _HTML_SUFFIXES


def _finite_json(value: Any) -> Any:
    """`value` with NaN and infinities as the strings "nan", "inf", "-inf": the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def normalized(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` as its JSON file reads back (tuples as lists, keys as strings, other objects as ``str``,
    non-finite numbers as strings), so a page drawn from a run's data and one drawn from its JSON file
    start from the same value."""
    return _finite_json(json.loads(json.dumps(doc, default=str)))


def report_bytes(doc: dict[str, Any], path: str | os.PathLike[str]) -> bytes:
    """The content of report file `path` for `doc`: the HTML page or indented JSON, by suffix."""
    data = normalized(doc)
    if is_html(path):
        from onnxopt.report.html import build_html

        return build_html(data).encode("utf-8")
    return json.dumps(data, indent=2, allow_nan=False).encode("utf-8")


def write_report(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Write the report `doc` to `path` (page or JSON by suffix) atomically; the path written."""
    target = Path(path)
    content = report_bytes(doc, target)
    parent = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A report's data from its JSON file or from the page that embeds it; UsageError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"report '{p}' does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if is_html(p) or text.lstrip().startswith("<"):
        from onnxopt.report.html import embedded_data

        doc = embedded_data(text)
        if doc is None:
            raise UsageError(f"'{p}' is not an onnxopt report page (no embedded report data)")
        return doc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"report '{p}' is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"report '{p}' holds {type(doc).__name__}, not a report object")
    return doc
