"""One progress helper for the whole package: bars on stderr when it is a terminal, else silent.

Three shapes, all silent unless `enabled()`:

- `progress(items, desc=...)` wraps an iterable (calibration feeds, validation feeds, benchmark runs);
- `bar(desc, total=...)` is a bar a caller advances by hand (``with bar("trials", total=50) as b:
  b.update(); b.note("best 0.91")``), for loops it does not own, e.g. an Optuna study's callbacks;
- `step(desc)` shows the elapsed seconds of one long step that has no count (loading or saving a big
  model), and only once it has lasted `STEP_DELAY` seconds.

Bars are shown only when stderr is a terminal: not when piped or redirected, not under CI (the
``CI`` variable that CI services set), not with ``TERM=dumb``, not with ``ONNXOPT_NO_PROGRESS`` set,
and not after `set_quiet(True)` (the command line's ``--quiet``). Bars clear themselves when done,
so the text a command prints afterwards is what it would print without them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["progress", "bar", "step", "enabled", "set_quiet", "Bar", "STEP_DELAY"]

STEP_DELAY = 1.0
"""Seconds a `step` must last before its line appears (short steps show nothing)."""

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or allow (False) every progress bar of this process."""
    global _quiet
    _quiet = bool(quiet)


def enabled() -> bool:
    """Whether bars are drawn: stderr is a terminal and nothing asked for silence."""
    if _quiet or os.environ.get("ONNXOPT_NO_PROGRESS") or os.environ.get("CI"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def _tqdm(**kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def progress(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, drawing a bar labelled `desc` (with `total` or ``len(items)`` when known)."""
    if not enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _tqdm(iterable=items, desc=desc, total=total) as b:
        yield from b


class Bar:
    """A bar advanced by hand; every method does nothing when bars are off."""

    def __init__(self, desc: str, total: int | None, unit: str) -> None:
        self._bar = _tqdm(desc=desc, total=total, unit=unit) if enabled() else None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        """A short text after the count (the best trial so far, the current layer...)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def bar(desc: str, *, total: int | None = None, unit: str = "it") -> Iterator[Bar]:
    """A `Bar` that closes (and clears itself) when the block ends."""
    b = Bar(desc, total, unit)
    try:
        yield b
    finally:
        b.close()


@contextlib.contextmanager
def step(desc: str) -> Iterator[None]:
    """Show ``desc`` with the seconds elapsed while the block runs, once it has lasted `STEP_DELAY`."""
    if not enabled():
        yield
        return
    done = threading.Event()
    b = _tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", delay=STEP_DELAY)

    def tick() -> None:
        while not done.wait(0.5):
            b.update(0)  # redraws the elapsed time once the delay has passed (and lets close clear it)

    ticker = threading.Thread(target=tick, name="onnxopt-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        b.close()
