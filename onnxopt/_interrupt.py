"""Ctrl-C while the ``onnxopt`` program starts or ends: one line on stderr, exit code 130, no traceback.

``onnxopt/__init__`` installs the handler first thing when the process is the program (imported as a
library, onnxopt leaves signals alone); between start-up and exit, `onnxopt.cli.main` lets an interrupt
unwind as KeyboardInterrupt, so that staged files are removed on the way out. What runs before the
package's first line (the interpreter's own start-up: site, ``.pth`` files) is out of reach. This module
imports nothing but the standard library's os, signal and sys.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["running_as_program", "quiet_interrupts", "interrupts_are_quiet", "unwinding_interrupts"]

_OWN_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py")


def _quiet_exit(signum: int, frame: object) -> None:
    os.write(2, b"onnxopt: interrupted\n")
    os._exit(130)


def running_as_program() -> bool:
    """True when this process is the ``onnxopt`` command: the console script, or ``python -m onnxopt``
    (whose argv[0] is this package's own ``__main__.py``; another program's is not)."""
    argv = getattr(sys, "argv", None) or [""]
    first = argv[0] or ""
    if os.path.splitext(os.path.basename(first))[0] == "onnxopt":
        return True
    if first == "-m":  # python -m is still importing the package: the original command line names it
        orig = list(getattr(sys, "orig_argv", []))
        return any(a == "-m" and b in ("onnxopt", "onnxopt.cli") for a, b in zip(orig, orig[1:]))
    return os.path.basename(first) == "__main__.py" and os.path.abspath(first) == _OWN_MAIN


def quiet_interrupts() -> None:
    """From now on an interrupt (SIGINT, SIGTERM) prints one line and exits 130 at once."""
    signal.signal(signal.SIGINT, _quiet_exit)
    signal.signal(signal.SIGTERM, _quiet_exit)


def interrupts_are_quiet() -> bool:
    return signal.getsignal(signal.SIGINT) is _quiet_exit


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def unwinding_interrupts() -> None:
    """From now on SIGINT and SIGTERM raise KeyboardInterrupt (finally blocks and cleanup run)."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
