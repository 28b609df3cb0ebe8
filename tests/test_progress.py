"""Progress bars: drawn on a terminal (a pseudo-terminal here), silent when piped, under CI and with --quiet;
the command's own output is the same either way."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import MODELS, ROOT

SCRIPT = """
import time
from onnxopt.progress import bar, progress, step
for _ in progress(range(6), desc="crunching"):
    time.sleep(0.12)
with bar("trials", total=3) as b:
    for i in range(3):
        time.sleep(0.15)
        b.update()
        b.note(f"best {i}")
with step("saving the model"):
    time.sleep(1.8)
print("done")
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXOPT_NO_PROGRESS", "CI")}
    env.update({"TERM": "xterm", "PYTHONPATH": str(ROOT), **extra})
    return env


def _on_pty(argv: list[str], env: dict[str, str], timeout: float = 120.0) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a pseudo-terminal; its exit code and all it wrote."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0x0
    proc = subprocess.Popen(argv, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, cwd=ROOT,
                            close_fds=True)
    os.close(child_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main_fd)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_bars_appear_on_a_terminal() -> None:
    code, text = _on_pty([sys.executable, "-c", SCRIPT], _env())
    assert code == 0, text
    assert "crunching" in text and "6/6" in text
    assert "trials" in text and "best" in text
    assert "saving the model" in text  # the step lasted past its delay: its elapsed time was shown
    assert text.rstrip().endswith("done")


def test_no_bars_when_piped_under_ci_or_quiet() -> None:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "done\n" and r.stderr == ""
    for env in (_env(CI="true"), _env(TERM="dumb"), _env(ONNXOPT_NO_PROGRESS="1")):
        code, text = _on_pty([sys.executable, "-c", SCRIPT], env)
        assert code == 0 and text.strip() == "done", text
    quiet = "from onnxopt.progress import set_quiet\nset_quiet(True)\n" + SCRIPT
    code, text = _on_pty([sys.executable, "-c", quiet], _env())
    assert code == 0 and text.strip() == "done", text


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_on_a_terminal_prints_the_same_table(tmp_path: Path, quiet: bool) -> None:
    """Validation shows its bar on a terminal (unless --quiet); the table printed is the piped one."""
    argv = [sys.executable, "-m", "onnxopt", str(MODELS / "digits_cnn.onnx"), "--passes", "fold",
            "--data", "random:50", "--batch", "1", "--bench-runs", "0"]
    if quiet:
        argv.append("--quiet")
    code, text = _on_pty([*argv, "-o", str(tmp_path / "a.onnx")], _env())
    piped = subprocess.run([*argv, "-o", str(tmp_path / "b.onnx")], capture_output=True, text=True, env=_env(),
                           cwd=ROOT, timeout=300)
    assert code == 0 and piped.returncode == 0 and piped.stderr == ""
    table = piped.stdout.split("\npass fold")[0]
    assert table.splitlines()[0].split() == ["before", "after", "change"]
    assert ("validating" in text) is not quiet
    assert table.replace("\n", "\r\n") in text  # the terminal shows the same table (with CRLF line ends)
