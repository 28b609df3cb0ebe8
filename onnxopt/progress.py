"""One progress helper for the whole package: a bar on stderr when it is a terminal, else silent."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "enabled"]


def enabled() -> bool:
    if os.environ.get("ONNXOPT_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    if not enabled():
        yield from items
        return
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield from bar
