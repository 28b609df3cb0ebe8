"""A tuned recipe as the TOML file ``onnxopt MODEL --recipe FILE`` reads (`onnxopt.pipeline.read_recipe`).

Every option of every pass is written as it ran, defaults included, so the file reproduces the model
exactly even if a default changes later. Per-layer settings go to a ``[passes.layers]`` table after
their pass (node globs, quoted, to inline tables)::

    [[passes]]
    name = "channels"
    ratio = 0.0
    ...

    [passes.layers]
    "block1.conv1" = { ratio = 0.5 }

Options without a value (None) are left out: they are None by default.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from onnxopt.registry import LAYERS

__all__ = ["recipe_toml", "toml_value"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def toml_value(value: Any) -> str:
    """`value` (bool, number, string, list or table of those) as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else f"{text}.0"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = [f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def recipe_toml(steps: Sequence[tuple[str, dict[str, Any]]], comments: Sequence[str] = ()) -> str:
    """The recipe `steps` ((pass name, options) pairs) as a TOML document, with `comments` on top."""
    lines = [f"# {c}" if c else "#" for c in comments]
    for name, options in steps:
        if lines:
            lines.append("")
        lines.append("[[passes]]")
        lines.append(f"name = {toml_value(name)}")
        for key, value in options.items():
            if key == LAYERS and isinstance(value, dict) or value is None:
                continue
            lines.append(f"{_key(key)} = {toml_value(value)}")
        layers = options.get(LAYERS)
        if isinstance(layers, dict) and layers:
            lines += ["", f"[passes.{LAYERS}]"]
            lines += [f"{_key(pattern)} = {toml_value(settings)}" for pattern, settings in layers.items()]
    return "\n".join(lines) + "\n"
