"""A headless Chromium driven over the DevTools protocol, for tests that open report pages in a real browser.

Uses the system's ``chromium`` (Debian package; nothing is downloaded) with a throw-away profile and every
background download switched off, and speaks the DevTools protocol over a WebSocket (``websocket-client``,
in the dev extra). `open_page` loads a local file and records what a user would see go wrong: console
errors, uncaught exceptions, failed loads and any request that leaves the machine.

``python -m tests.chromium PAGE.html OUT.png [--height N]`` saves a screenshot of the top of a page (the
README's picture is made this way: ``--height 1400``, then reduced to a palette PNG).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64decode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["chromium_path", "Browser", "PageLoad", "browser", "open_page"]

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
    "--mute-audio", "--remote-debugging-port=0", "--remote-allow-origins=*",
]


def chromium_path() -> str | None:
    """The Chromium executable: ``$CHROMIUM`` or the first of chromium/chromium-browser on PATH."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@dataclasses.dataclass
class PageLoad:
    console_errors: list[str]
    requests: list[str]


class Browser:
    """One Chromium process and a DevTools connection to its first page."""

    def __init__(self, executable: str, profile: Path, width: int = 1280, height: int = 900) -> None:
        import websocket

        self._proc = subprocess.Popen([executable, *_FLAGS, f"--user-data-dir={profile}",
                                       f"--window-size={width},{height}", "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)  # its helpers share the group: close ends them all
        port = self._port(profile)
        page = self._page_target(port)
        self._ws = websocket.create_connection(page, timeout=30, suppress_origin=True)
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.width = width

    def _port(self, profile: Path) -> int:
        marker = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self._proc.returncode} before it listened")
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port within 30 s")

    @staticmethod
    def _page_target(port: int) -> str:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.loads(r.read())
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise RuntimeError("chromium has no page target")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer (events that arrive meanwhile are kept in `events`)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """The first event named `method` (seen already or arriving within `timeout` seconds)."""
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self._ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return msg
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def screenshot(self, path: Path, *, height: int | None = None) -> Path:
        """A PNG of the whole page (or of its top `height` CSS pixels) at the browser's width."""
        full = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        h = int(min(full, height) if height else full)
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=h, deviceScaleFactor=1,
                  mobile=False)
        shot = self.call("Page.captureScreenshot", format="png",
                         clip={"x": 0, "y": 0, "width": self.width, "height": h, "scale": 1})
        path.write_bytes(b64decode(shot["data"]))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ws.close()
        # Chromium's helper processes (renderer, crash handler) can outlive the browser process and go on
        # writing into the profile while it is removed: signal the whole process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # helpers that outlived the browser


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Browser]:
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="onnxopt-chromium-") as profile:
        b = Browser(exe, Path(profile), width, height)
        try:
            yield b
        finally:
            b.close()


def _console_errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text', '')} {p['entry'].get('url', '')}".strip())
        elif method == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText', '')}")
    return out


def open_page(b: Browser, page: Path) -> PageLoad:
    """Load the local file `page` and wait for it; what went wrong and every URL it requested."""
    for domain in ("Runtime", "Log", "Page", "Network"):
        b.call(f"{domain}.enable")
    b.events.clear()
    b.call("Page.navigate", url=page.resolve().as_uri())
    b.wait_for("Page.loadEventFired")
    b.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    requests = [e["params"]["request"]["url"] for e in b.events if e.get("method") == "Network.requestWillBeSent"]
    return PageLoad(_console_errors(b.events), requests)


def main(argv: list[str]) -> int:
    page, out = Path(argv[0]), Path(argv[1])
    height = int(argv[argv.index("--height") + 1]) if "--height" in argv else None
    with browser() as b:
        load = open_page(b, page)
        b.screenshot(out, height=height)
    print(f"wrote {out}; console errors: {load.console_errors or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
