"""Real third-party models: PaddleOCR's detector, recognizer and classifier as shipped by the
`rapidocr-onnxruntime` package (Paddle exports, opsets 11-12, weights in Constant nodes, dynamic
dims written as -1). Located without importing the package; skipped when it is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import onnxopt

pytestmark = pytest.mark.real


def _ocr_models() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if folder.is_dir() else None


OCR = _ocr_models()
CASES = {
    "ch_PP-OCRv4_det_infer.onnx": (1, 3, 64, 64),
    "ch_PP-OCRv4_rec_infer.onnx": (1, 3, 48, 96),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": (2, 3, 48, 192),
}


@pytest.mark.skipif(OCR is None, reason="rapidocr-onnxruntime is not installed (pip install --no-deps)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_fold_on_paddle_ocr_models_is_exact(name: str, tmp_path: Path) -> None:
    shape = CASES[name]
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(0, 1, shape).astype(np.float32)} for _ in range(2)]
    res = onnxopt.optimize(OCR / name, ["fold"], data=feeds, output=tmp_path / name)
    out = res.save(tmp_path / name)
    assert out.is_file()
    # The detector's sigmoid map is ~1e-8 on random input, so relative error means nothing there:
    # bound the absolute error, which float rounding keeps far below anything visible.
    assert res.validation.outputs[0].max_abs < 1e-5
    assert res.after.nodes < res.before.nodes
    assert res.after.op_histogram.get("Constant", 0) == 0
    assert res.after.parameters <= res.before.parameters
