"""The quantize pass with default options on real third-party models (the `real` tier), fed what they were
trained on (`models.real`): the outputs keep cosine >= 0.99 (and argmax agreement >= 99 % on class-score and
CTC outputs) on held-out feeds, or the pass says in its notes which layers it kept float and that the targets
were not met; an already-quantized model is left untouched. Few feeds and small crops keep the tier short.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.quantize.score import Targets, class_outputs, score_outputs

from models import real
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.io import load
from onnxopt.registry import make_pass, run_pass
from onnxopt.runtime import run, session

pytestmark = pytest.mark.real

FOUND = real.available()
CALIB = {"ppocr_det": 4, "ppocr_rec": 8}  # the others are small enough for the 16 feeds of models.real
HELD = 4


def _feeds(name: str, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    feeds = real.feeds(name, n, seed=seed)
    if name == "ppocr_det":  # a 256x256 corner of each page (text starts there) keeps the tier short
        feeds = [{"x": np.ascontiguousarray(f["x"][:, :, :256, :256])} for f in feeds]
    return feeds


def _outputs(model: ir.Model, feeds: list[dict[str, np.ndarray]], tmp_path, tag: str) -> list[list[np.ndarray]]:
    path = tmp_path / f"{tag}.onnx"
    onnx.save(ir.to_proto(model), str(path))
    sess = session(path, threads=1)
    return [run(sess, f) for f in feeds]


@pytest.mark.parametrize("name", [n for n in ("ppocr_det", "ppocr_rec", "ppocr_cls", "dddd_ocr", "dddd_det",
                                               "silero_op15") if n in FOUND])
def test_default_quantize_keeps_the_outputs_or_says_what_it_kept_float(name: str, tmp_path) -> None:
    model = load(FOUND[name])
    run_pass("fold", model)
    reference = model.clone()
    calib = load_data(_feeds(name, CALIB.get(name, 16), 0), input_specs(model))
    held = _feeds(name, HELD, 100)
    stats = make_pass("quantize").call(model, Context(calib=calib, threads=1))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    names = [o.name for o in reference.graph.outputs]
    scores = score_outputs(names, _outputs(reference, held, tmp_path, "float"), _outputs(model, held, tmp_path, "q"),
                           class_outputs(reference.graph))
    if not stats.modified:  # the float model was written, and the reason said
        assert stats.summary.get("wrote_float_model") or any("nothing quantized" in n for n in stats.notes)
        assert scores.cosine > 0.99999
        return
    if scores.shortfall(Targets()) > 0:
        said = " ".join(stats.notes)
        assert "fallback=auto" in said and ("kept in float" in said or "WARNING" in said), (scores.describe(), said)
        assert scores.cosine > 0.9, scores.describe()  # lossy, never collapsed
    else:
        assert scores.cosine >= 0.99 and (scores.argmax is None or scores.argmax >= 0.99)


@pytest.mark.skipif("dddd_old" not in FOUND, reason="ddddocr is not installed (pip install --no-deps ddddocr)")
def test_the_already_quantized_real_model_is_left_untouched() -> None:
    model = load(FOUND["dddd_old"])
    before = ir.to_proto(model).SerializeToString()
    calib = load_data(real.feeds("dddd_old", 2), input_specs(model))
    stats = make_pass("quantize").call(model, Context(calib=calib))
    assert not stats.modified and stats.summary == {"already_quantized": True}
    assert "already quantized" in stats.notes[0] and "ConvInteger" in stats.notes[0]
    assert ir.to_proto(model).SerializeToString() == before

