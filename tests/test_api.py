"""Python API: input kinds, Result, third-party passes, option coercion, failure handling."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import MODELS, run_ort

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.pipeline import PassFailure
from onnxopt.registry import make_pass, option_specs

CNN = MODELS / "digits_cnn.onnx"
EVAL = str(MODELS / "digits_eval.npz")


def _x(n: int = 8) -> np.ndarray:
    with np.load(EVAL) as d:
        return d["input"][:n]


def test_optimize_path_returns_result_with_stats_and_validation(tmp_path: Path) -> None:
    res = onnxopt.optimize(CNN, ["fold"], data=EVAL)
    assert res.passed and res.validation.accuracy_a == res.validation.accuracy_b
    assert res.passes[0].name == "fold" and res.passes[0].stats.summary["batchnorm_folded"] == 7
    assert res.after.nodes < res.before.nodes
    out = res.save(tmp_path / "o.onnx")
    np.testing.assert_allclose(run_ort(out, {"input": _x()})[0], run_ort(CNN, {"input": _x()})[0], atol=1e-4)


def test_optimize_proto_and_ir_inputs_are_not_changed() -> None:
    proto = onnx.load(str(CNN))
    before = proto.SerializeToString()
    res = onnxopt.optimize(proto, ["fold"])
    assert proto.SerializeToString() == before
    assert isinstance(res.output, onnx.ModelProto)
    model = ir.load(CNN)
    n = len(model.graph)
    res = onnxopt.optimize(model, ["fold"])
    assert len(model.graph) == n and isinstance(res.output, ir.Model)
    assert len(res.output.graph) < n


def test_graphsurgeon_in_and_out() -> None:
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(onnx.load(str(CNN)))
    res = onnxopt.optimize(graph, ["fold"])
    out = res.output
    assert isinstance(out, gs.Graph)
    assert not any(n.op == "BatchNormalization" for n in out.nodes)
    np.testing.assert_allclose(run_ort(gs.export_onnx(out), {"input": _x()})[0],
                               run_ort(CNN, {"input": _x()})[0], atol=1e-4)


def test_third_party_pass_registers_with_typed_options(tmp_path: Path) -> None:
    @onnxopt.register_pass("test_scale_logits")
    class ScaleLogits(onnxopt.Pass):
        """Multiply the last Gemm's weight and bias (a lossy toy pass)."""

        factor: float = onnxopt.option(1.0, "multiplier")
        mode: Literal["weight", "both"] = onnxopt.option("both", "what to scale")
        layers: list[str] = onnxopt.option([], "layer names")

        def call(self, model, ctx):
            gemm = [n for n in model.graph if n.op_type == "Gemm"][-1]
            targets = gemm.inputs[1:] if self.mode == "both" else gemm.inputs[1:2]
            for v in targets:
                v.const_value = ir.tensor(v.const_value.numpy() * self.factor, name=v.name)
            return onnxopt.PassStats(modified=True, summary={"scaled": len(targets)})

    assert "test_scale_logits" in onnxopt.list_passes()
    p = make_pass("test_scale_logits", {"factor": "2", "mode": "weight", "layers": "a,b"}, from_text=True)
    assert p.factor == 2.0 and p.mode == "weight" and p.layers == ["a", "b"]
    with pytest.raises(UsageError, match=r"'sideways' is not a valid \{weight,both\}"):
        make_pass("test_scale_logits", {"mode": "sideways"})
    specs = {s.name: s for s in option_specs(type(p))}
    assert specs["mode"].choices == ("weight", "both") and specs["factor"].doc == "multiplier"
    res = onnxopt.optimize(CNN, [("test_scale_logits", {"factor": 2.0})], data=EVAL, tolerance=0.5)
    # Scaling logits by 2 keeps the argmax: top-1 agreement is total, relative error is exactly 1.
    assert res.validation.outputs[0].top1 == 1.0
    assert res.validation.outputs[0].rel_l2 == pytest.approx(1.0, rel=1e-5)
    assert not res.passed


def test_failing_pass_is_wrapped_and_nothing_written(tmp_path: Path) -> None:
    @onnxopt.register_pass("test_broken")
    class Broken(onnxopt.Pass):
        """Always fails."""

        def call(self, model, ctx):
            raise ZeroDivisionError("boom")

    out = tmp_path / "o.onnx"
    with pytest.raises(PassFailure, match="pass 'test_broken' failed: ZeroDivisionError: boom"):
        onnxopt.optimize(CNN, ["fold", "test_broken"], output=out)
    assert not out.exists() and not any(p.name.startswith(".onnxopt-") for p in tmp_path.iterdir())


def test_pass_specs_accept_names_tuples_dicts_and_objects() -> None:
    fold = make_pass("fold", {"batchnorm": False})
    res = onnxopt.optimize(CNN, [fold, ("fold", {"dedup": False}), {"name": "fold"}], validate=False)
    assert [r.name for r in res.passes] == ["fold", "fold", "fold"]
    assert res.passes[0].options["batchnorm"] is False
    with pytest.raises(UsageError):
        onnxopt.optimize(CNN, [42])


def test_save_with_external_data_on_request(tmp_path: Path) -> None:
    res = onnxopt.optimize(CNN, ["fold"], validate=False)
    out = res.save(tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    assert out.stat().st_size < 20_000
    np.testing.assert_allclose(run_ort(out, {"input": _x()})[0], run_ort(CNN, {"input": _x()})[0], atol=1e-4)


def test_external_data_chosen_automatically_past_the_protobuf_limit(tmp_path: Path, monkeypatch) -> None:
    from onnxopt import io

    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 10_000)  # stand-in for 2 GB: the CNN has ~176 KB of weights
    out = tmp_path / "big.onnx"
    res = onnxopt.optimize(CNN, ["fold"], output=out, validate=True)
    res.save(out)
    assert (tmp_path / "big.onnx.data").is_file() and out.stat().st_size < 20_000
    np.testing.assert_allclose(run_ort(out, {"input": _x()})[0], run_ort(CNN, {"input": _x()})[0], atol=1e-4)
    assert not any(p.name.startswith(".onnxopt-") for p in tmp_path.iterdir())


def test_numbers_and_targets_are_checked_before_any_work(tmp_path: Path) -> None:
    for kwargs, needle in (({"threads": 100_000}, "threads"), ({"batch": 0}, "batch"),
                           ({"tolerance": float("nan")}, "finite"), ({"dims": {"n": 10**9}}, "between 1 and"),
                           ({"metric": "cosine", "tolerance": 1.5}, "at most 1"),
                           ({"drift_cosine": 2.0}, "--drift-cosine"),
                           ({"output": tmp_path / "o.onnx", "also_writes": {"report": tmp_path / "o.onnx"}},
                            "same file")):
        with pytest.raises(UsageError, match=needle):
            onnxopt.optimize(CNN, ["fold"], **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_save_commits_companions_before_the_model(tmp_path: Path, monkeypatch) -> None:
    import os

    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    res = onnxopt.optimize(CNN, ["fold"], data=EVAL, output=out, also_writes={"report": report},
                           drift_cosine=0.0, drift_top1=0.0)
    assert res.validation.verdict == "not gated" and res.validation.drift == []
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real(src, dst)))
    res.save(out, companions={report: b'{"ok": true}'})
    assert order == ["r.json", "o.onnx"] and report.read_text() == '{"ok": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "r.json"]
    with pytest.raises(UsageError, match="same file"):
        res.save(tmp_path / "again.onnx", companions={tmp_path / "again.onnx": b"{}"})
