"""The command line end to end: the optimize job, verbs, and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, make_model
from onnx import helper

from onnxopt.cli import VERBS, main

CNN = MODELS / "digits_cnn.onnx"
EVAL = MODELS / "digits_eval.npz"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".onnxopt-")]


def test_optimize_end_to_end_writes_model_table_and_report(tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "cnn.onnx", tmp_path / "r.json"
    code, text, err = _run([CNN, "--passes", "fold", "-o", out, "--data", EVAL, "--report", report,
                            "--bench-runs", "5"], capsys)
    assert code == 0, err
    assert out.is_file() and not _leftovers(tmp_path)
    onnx.checker.check_model(str(out), full_check=True)
    for row in ("file size", "parameters", "nonzero params", "MACs", "nodes", "latency", "accuracy"):
        assert row in text
    assert "top-1 agreement 100.00%" in text
    doc = json.loads(report.read_text())
    assert doc["passes"][0]["name"] == "fold"
    # No tolerance: the numbers are reported, nothing is called a pass.
    assert doc["validation"]["passed"] is None and doc["validation"]["verdict"] == "not gated"
    assert doc["validation"]["gated"] is False and doc["validation"]["drift"] == []
    assert "not gated" in text and ": pass" not in text
    assert doc["after"]["nodes"] < doc["before"]["nodes"]
    assert doc["validation"]["accuracy_a"] == doc["validation"]["accuracy_b"]


def test_tolerance_exceeded_exits_1_but_prints_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cnn.onnx"
    code, text, err = _run([CNN, "--passes", "fold", "-o", out, "--tolerance", "0", "--metric", "max_abs",
                            "--bench-runs", "0"], capsys)
    assert code == 1
    assert "exceeds the tolerance" in err and "FAIL" in text


def test_recipe_toml_and_json_and_set(tmp_path: Path, capsys) -> None:
    toml = tmp_path / "r.toml"
    toml.write_text('[[passes]]\nname = "fold"\nbatchnorm = false\n')
    code, text, err = _run([CNN, "--recipe", toml, "-o", tmp_path / "a.onnx", "--bench-runs", "0",
                            "--report", tmp_path / "a.json"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "a.json").read_text())["passes"][0]
    assert rec["options"]["batchnorm"] is False and "batchnorm_folded" not in rec["summary"]
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"passes": [{"name": "fold"}]}))
    code, _, err = _run([CNN, "--recipe", js, "--set", "fold.max_fold_mb=2", "-o", tmp_path / "b.onnx",
                         "--bench-runs", "0", "--report", tmp_path / "b.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["passes"][0]["options"]["max_fold_mb"] == 2.0


def test_inspect_bench_compare_passes_verbs(tmp_path: Path, capsys) -> None:
    code, text, _ = _run(["inspect", CNN], capsys)
    assert code == 0 and "input     input float32[batch,1,8,8]" in text and "BatchNormalization 7" in text
    code, text, _ = _run(["inspect", CNN, "--json"], capsys)
    doc = json.loads(text)
    assert doc["parameters"] == 44554 and doc["macs"] > 0
    code, text, _ = _run(["bench", CNN, CNN, "--runs", "5", "--warmup", "1", "--no-memory", "--json"], capsys)
    doc = json.loads(text)
    assert code == 0 and [m["runs"] for m in doc["models"]] == [5, 5]
    second = doc["models"][1]
    assert doc["ratios"][1] == pytest.approx(second["median_ms"] / doc["models"][0]["median_ms"])
    assert second["min_ms"] <= second["median_ms"] <= second["p90_ms"]
    code, text, _ = _run(["compare", CNN, CNN, "--data", EVAL, "--tolerance", "0"], capsys)
    assert code == 0 and "accuracy: A 99.17%  B 99.17%" in text
    code, text, _ = _run(["passes"], capsys)
    assert code == 0 and "fold [exact]" in text and "max_fold_mb (float, default 64.0)" in text


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_in_the_table_runs_its_help(verb: str, capsys) -> None:
    code, text, err = _run([verb, "--help"], capsys)
    assert code == 0 and f"usage: onnxopt {verb}" in text and "--debug" in text, err


def test_bench_cuda_unavailable_is_one_line(capsys) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    code, _, err = _run(["bench", CNN, "--provider", "cuda", "--runs", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "CUDAExecutionProvider" in err


# ------------------------------------------------------------------------------------ bad input
def _bad_models(tmp: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    text = tmp / "text.onnx"
    text.write_text("this is not a model\n" * 10)
    cases["not onnx"] = (text, "not")
    trunc = tmp / "trunc.onnx"
    trunc.write_bytes(CNN.read_bytes()[: CNN.stat().st_size // 2])
    cases["truncated"] = (trunc, "ONNX")
    bad = helper.make_model(helper.make_graph([helper.make_node("Relu", ["nope"], ["y"])], "g",
                                              [helper.make_tensor_value_info("x", F32, [1])],
                                              [helper.make_tensor_value_info("y", F32, [1])]))
    badp = tmp / "checker.onnx"
    onnx.save(bad, str(badp))
    cases["fails checker"] = (badp, "checker")
    empty = tmp / "empty.onnx"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "empty")
    cases["missing"] = (tmp / "missing.onnx", "does not exist")
    # external data: missing file, and locations outside the model's folder
    ext_dir = tmp / "ext"
    ext_dir.mkdir()
    m = ir.load(CNN)
    ir.save(m, ext_dir / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    os.remove(ext_dir / "m.onnx.data")
    cases["missing external data"] = (ext_dir / "m.onnx", "missing")
    for label, location in (("dotdot", "../secret.bin"), ("absolute", "/etc/passwd")):
        proto = onnx.load(str(CNN))
        init = proto.graph.initializer[0]
        init.data_location = onnx.TensorProto.EXTERNAL
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.external_data.add(key="location", value=location)
        p = tmp / f"{label}.onnx"
        onnx.save(proto, str(p))
        cases[f"external {label}"] = (p, "refusing")
    return cases


def test_every_bad_model_is_one_line_exit_2_nothing_written(tmp_path: Path, capsys) -> None:
    for label, (path, needle) in _bad_models(tmp_path).items():
        out = tmp_path / f"out-{label.replace(' ', '_')}.onnx"
        code, _, err = _run([path, "--passes", "fold", "-o", out], capsys)
        assert code == 2, (label, err)
        assert err.count("\n") == 1 and err.startswith("onnxopt: error:"), (label, err)
        assert needle in err, (label, err)
        assert "Traceback" not in err
        assert not out.exists()
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--passes", "fold,nope"], "unknown pass 'nope' (known passes:"),
        (["--passes", "fold", "--set", "fold.nope=1"], "has no option 'nope'"),
        (["--passes", "fold", "--set", "fold.max_fold_mb=lots"], "is not a valid float"),
        (["--passes", "fold", "--set", "fold.batchnorm=maybe"], "is not a valid bool"),
        (["--passes", "fold", "--set", "prune_nothing=1"], "PASS.KEY=VALUE"),
        (["--passes", "fold", "--set", "other.x=1"], "is not in --passes"),
        (["--passes", "fold", "--data", "random:zero"], "random:N"),
        (["--passes", "fold", "--data", "nowhere.npz"], "neither"),
        (["--passes", "fold", "--dims", "batch"], "NAME=N"),
        (["--passes", "fold", "--bogus"], "unrecognized arguments"),
        ([], "name the passes"),
    ],
)
def test_bad_options_exit_2(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    out = tmp_path / "o.onnx"
    code, _, err = _run([CNN, "-o", out, *argv], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_calibration_data_that_does_not_match_inputs(tmp_path: Path, capsys) -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    cases = {
        "names": ({"image": x}, "missing input(s) input"),
        "dtype": ({"input": x.astype(np.float64)}, "float64"),
        "shape": ({"input": np.zeros((4, 1, 7, 8), np.float32)}, "[4, 1, 7, 8]"),
        "rank": ({"input": np.zeros((4, 64), np.float32)}, "rank 4"),
    }
    for label, (arrays, needle) in cases.items():
        f = tmp_path / f"{label}.npz"
        np.savez(f, **arrays)
        out = tmp_path / f"{label}.onnx"
        code, _, err = _run([CNN, "--passes", "fold", "-o", out, "--calib", f], capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (label, err)
        assert not out.exists()


def test_output_paths_refused(tmp_path: Path, capsys) -> None:
    copy = tmp_path / "m.onnx"
    copy.write_bytes(CNN.read_bytes())
    before = copy.read_bytes()
    code, _, err = _run([copy, "--passes", "fold", "-o", copy], capsys)
    assert code == 2 and "is the input model" in err
    assert copy.read_bytes() == before
    code, _, err = _run([copy, "--passes", "fold", "-o", tmp_path / "no" / "dir" / "x.onnx"], capsys)
    assert code == 2 and "does not exist" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permission bits do not bind
            pytest.skip("permissions are not enforced for this user")
        code, _, err = _run([copy, "--passes", "fold", "-o", ro / "x.onnx"], capsys)
        assert code == 2 and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_unsupported_op_is_one_line(tmp_path: Path, capsys) -> None:
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F32, [2])], [("y", F32, [2])])
    node = helper.make_node("FancyOp", ["y"], ["z"], domain="custom.ops")
    proto.graph.node.append(node)
    proto.graph.output[0].name = "z"
    proto.opset_import.append(helper.make_opsetid("custom.ops", 1))
    p = tmp_path / "custom.onnx"
    onnx.save(proto, str(p))
    out = tmp_path / "o.onnx"
    code, _, err = _run([p, "--passes", "fold", "-o", out], capsys)
    assert code == 2 and "FancyOp" in err and err.count("\n") == 1, err
    assert not out.exists() and not _leftovers(tmp_path)


def test_console_script_and_debug_traceback(tmp_path: Path) -> None:
    exe = [sys.executable, "-m", "onnxopt.cli"]
    r = subprocess.run([*exe, str(tmp_path / "missing.onnx"), "--passes", "fold", "-o", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--passes" in r.stdout and "inspect" in r.stdout
    r = subprocess.run([*exe, str(tmp_path / "missing.onnx"), "--passes", "fold", "-o", str(tmp_path / "o.onnx"),
                        "--debug"], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr
