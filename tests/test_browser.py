"""The README's report, opened in a real browser: headless Chromium (the system's, driven over the DevTools
protocol) loads the page of a digits CNN ``fold,prune,quantize`` run with the network unused, logs no error,
draws every plot, and leaves a full-page screenshot in ``artifacts/`` (printed in the log, kept by CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from chromium import browser, chromium_path, open_page
from helpers import MODELS, ROOT

ARTIFACT = ROOT / "artifacts" / "report-digits.png"
# data-plot key -> the caption the page gives it
EXPECTED = {
    "ratios": "What changed, as a ratio to the original",
    "accuracy": "Accuracy on labels and top-1 agreement with the original",
    "layer-counts": "Parameters, MACs and weight bytes per layer, before and after",
    "layer-errors": "Error of each layer's tensor in the optimized model",
    "hist-0": "Error histogram of output 'logits'",
    "scatter-0": "Optimized against original values of output 'logits'",
    "op-times": "Time per op type",
    "slowest-nodes": "The ten slowest nodes, side by side",
    "pass-seconds": "Seconds per pass",
}
SECTIONS = ["summary", "accuracy", "layers", "outputs", "time", "passes"]

_FIGURES = """(() => [...document.querySelectorAll('figure.plot')].map(f => {
  const svg = f.querySelector('svg'); const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  return {plot: f.dataset.plot, title: f.querySelector('figcaption').textContent, width: box.width,
          height: box.height, marks: svg ? svg.querySelectorAll('path,use,text,image,rect').length : 0,
          images: svg ? [...svg.querySelectorAll('image')].map(i => i.getBBox().width * i.getBBox().height) : []};
}))()"""
_SECTIONS = """(() => [...document.querySelectorAll('section')].map(s => ({id: s.id,
  visible: s.getBoundingClientRect().height > 40,
  missing: [...s.querySelectorAll('.missing')].map(m => m.dataset.missing)})))()"""


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page the README's command writes (run as a user runs it)."""
    out = tmp_path_factory.mktemp("browser")
    r = subprocess.run([sys.executable, "-m", "onnxopt", str(MODELS / "digits_cnn.onnx"), "--passes",
                        "fold,prune,quantize", "--calib", str(MODELS / "digits_calib.npz"), "--data",
                        str(MODELS / "digits_eval.npz"), "-o", str(out / "x.onnx"), "--report", str(out / "x.html")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    return out / "x.html"


def test_report_opens_offline_in_chromium(digits_report: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if chromium_path() is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); the report was not opened in a browser")
    with browser(width=1280, height=900) as b:
        load = open_page(b, digits_report)
        figures = {f["plot"]: f for f in b.evaluate(_FIGURES)}
        sections = b.evaluate(_SECTIONS)
        ARTIFACT.parent.mkdir(exist_ok=True)
        b.screenshot(ARTIFACT)
    with capsys.disabled():
        print(f"\nreport screenshot: {ARTIFACT} ({ARTIFACT.stat().st_size} bytes)")
    assert load.console_errors == []
    assert all(url.startswith(("file:", "data:")) for url in load.requests), load.requests  # nothing from the net
    assert [s["id"] for s in sections] == SECTIONS and all(s["visible"] for s in sections)
    # Every section is filled: the only thing the digits run lacks is a node some pass skipped.
    assert [m for s in sections for m in s["missing"]] == ["skip-reasons"]
    for key, title in EXPECTED.items():
        f = figures[key]
        assert f["title"].startswith(title), f
        assert f["width"] > 200 and f["height"] > 100 and f["marks"] > 10, f
    assert figures["scatter-0"]["images"] and all(area > 0 for area in figures["scatter-0"]["images"])
    assert ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
