"""Hostile and careless inputs: one case per way a file, a number or a signal can break the contract.

The contract, checked by every case: the exit code (2 for the user's mistake, 1 for a tolerance, 130 for an
interrupt), one line on stderr with the words that say what went wrong, nothing written (the output folder is
listed and hashed before and after, so a staging folder left behind fails too) and the input unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, I64, MODELS, make_model
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import io
from onnxopt.cli import main

CNN = MODELS / "digits_cnn.onnx"
EVAL = MODELS / "digits_eval.npz"


# ------------------------------------------------------------------------------------------------ harness
def _tree(folder: Path) -> dict[str, str]:
    """Every entry below `folder` (symlinks not followed) with a digest of what it is."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                found[rel] = f"-> {os.readlink(p)}"
            elif p.is_file():
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = "special"
    return found


def _run(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "[E:onnxruntime" not in err and "[W:onnxruntime" not in err, err


def _refused(argv: list, folder: Path, capsys, *words: str, code: int = 2) -> str:
    """Run the command line; assert `code`, one stderr line holding `words`, and `folder` unchanged."""
    before = _tree(folder)
    got, _, err = _run(argv, capsys)
    assert got == code, err
    _one_line(err)
    for word in words:
        assert word in err, (word, err)
    assert _tree(folder) == before
    return err


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    """A copy of the digits CNN in a folder of its own (the folder is what the cases list)."""
    folder = tmp_path / "work"
    folder.mkdir()
    model = folder / "m.onnx"
    model.write_bytes(CNN.read_bytes())
    return model


def _with_external_weights(folder: Path, data_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(ir.load(CNN), folder / "m.onnx", external_data=data_name, size_threshold_bytes=0)
    return folder / "m.onnx"


# ------------------------------------------------------------------------------------------------ writes
def test_output_data_file_that_holds_the_inputs_weights_is_refused(tmp_path: Path, capsys) -> None:
    model = _with_external_weights(tmp_path / "w", "o.onnx.data")
    _refused([model, "--passes", "fold", "--external-data", "-o", model.parent / "o.onnx", "--bench-runs", "0"],
             model.parent, capsys, "o.onnx.data", "input model's external data")
    io.load(model)  # the input still loads


def test_output_onto_devices_fifos_and_folders_is_refused(cnn: Path, capsys) -> None:
    folder = cnn.parent
    fifo = folder / "pipe.onnx"
    os.mkfifo(fifo)
    (folder / "dir.onnx").mkdir()
    _refused([cnn, "--passes", "fold", "-o", "/dev/null"], folder, capsys, "/dev/null", "character device")
    assert Path("/dev/null").is_char_device()
    _refused([cnn, "--passes", "fold", "-o", fifo], folder, capsys, "FIFO")
    _refused([cnn, "--passes", "fold", "-o", folder / "dir.onnx"], folder, capsys, "directory")
    _refused([cnn, "--passes", "fold", "-o", folder / "x.onnx", "--report", "/dev/null"], folder, capsys,
             "report", "character device")


def test_report_that_is_the_output_or_the_input_is_refused(cnn: Path, capsys) -> None:
    folder = cnn.parent
    out = folder / "o.onnx"
    _refused([cnn, "--passes", "fold", "-o", out, "--report", out], folder, capsys, "same file as the output")
    (folder / "link.json").symlink_to(cnn.name)
    _refused([cnn, "--passes", "fold", "-o", out, "--report", folder / "link.json"], folder, capsys,
             "is the input model")
    os.link(cnn, folder / "hard.onnx")
    _refused([cnn, "--passes", "fold", "-o", folder / "hard.onnx"], folder, capsys, "is the input model")
    (folder / "out-link.onnx").symlink_to(cnn.name)
    _refused([cnn, "--passes", "fold", "-o", folder / "out-link.onnx"], folder, capsys, "is the input model")
    ext = _with_external_weights(folder / "ext", "w.bin")
    _refused([ext, "--passes", "fold", "-o", out, "--report", ext.parent / "w.bin"], folder, capsys,
             "external data file 'w.bin'")


def test_a_symlinked_report_is_replaced_never_written_through(cnn: Path, capsys) -> None:
    folder = cnn.parent
    elsewhere = folder / "elsewhere.txt"
    elsewhere.write_text("keep me")
    (folder / "r.json").symlink_to(elsewhere.name)
    code, _, err = _run([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--report", folder / "r.json",
                         "--bench-runs", "0"], capsys)
    assert code == 0, err
    assert elsewhere.read_text() == "keep me"
    assert not (folder / "r.json").is_symlink() and json.loads((folder / "r.json").read_text())["passes"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".onnxopt-")]


def test_a_failing_report_leaves_no_output(cnn: Path, capsys, monkeypatch) -> None:
    from onnxopt import report

    def broken(doc: dict, path: object) -> bytes:  # the report's content (page or JSON) cannot be made
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "report_bytes", broken)
    folder = cnn.parent
    before = _tree(folder)
    code, _, err = _run([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--report", folder / "r.json",
                         "--bench-runs", "0"], capsys)
    assert code == 3 and _tree(folder) == before, err


def test_a_failing_model_rename_puts_the_report_back(cnn: Path, capsys, monkeypatch) -> None:
    folder = cnn.parent
    report = folder / "r.json"
    report.write_text("the previous report")
    real_replace = os.replace
    calls = []

    def replace_failing_on_the_model(src, dst) -> None:
        calls.append(Path(dst).name)
        if Path(dst).name == "o.onnx":
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_on_the_model)
    _refused([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--report", report, "--bench-runs", "0"],
             folder, capsys, "cannot write", "o.onnx")
    assert calls[0] == "r.json" and "o.onnx" in calls  # the report is committed first, then the model
    assert report.read_text() == "the previous report"


def test_checks_on_the_users_input_fail_before_anything_is_written(cnn: Path, capsys) -> None:
    folder = cnn.parent
    _refused([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--metric", "accuracy", "--bench-runs", "0"],
             folder, capsys, "accuracy", "labels")
    empty = folder / "empty.npz"
    np.savez(empty, input=np.zeros((0, 1, 8, 8), np.float32))
    _refused([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--data", empty, "--tolerance", "1e-6"],
             folder, capsys, "no samples to validate on")
    _refused([cnn, "--passes", "fold", "-o", folder / "o.onnx", "--no-validate", "--tolerance", "0.1"],
             folder, capsys, "tolerance needs validation")


def test_unwritable_places_are_exit_2(cnn: Path, capsys) -> None:
    _refused([cnn, "--passes", "fold", "-o", "/proc/x.onnx"], cnn.parent, capsys, "/proc", "not writable")
    _refused([cnn, "--passes", "fold", "-o", cnn.parent / "o.onnx", "--report", "/proc/r.json"], cnn.parent,
             capsys, "report", "/proc")
    if Path("/sys").is_dir():
        _refused([cnn, "--passes", "fold", "-o", "/sys/x.onnx"], cnn.parent, capsys, "/sys")


def test_a_staged_run_interrupted_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    cmd = [sys.executable, "-m", "onnxopt", str(CNN), "--passes", "fold", "-o", str(folder / "o.onnx"),
           "--data", str(EVAL), "--bench-runs", "1000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ONNXOPT_NO_PROGRESS": "1"})
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".onnxopt-") and any(p.iterdir()) for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.2)  # now validating or timing, with the model staged
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    _one_line(err)
    assert "interrupted" in err and list(folder.iterdir()) == []


@pytest.mark.parametrize("when", ["importing onnxopt", "importing the runtime"])
def test_an_interrupt_while_the_program_starts_is_one_line(when: str) -> None:
    heavy = "import onnxopt.cli, onnxruntime" if when == "importing the runtime" else "import onnxopt"
    code = (f"import os, signal, sys, time; sys.argv[0] = 'onnxopt'\n{heavy}\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not interrupted')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stderr == "onnxopt: interrupted\n" and r.stdout == "", r


# ------------------------------------------------------------------------------------------------ sparse data
def _sparse_external(folder: Path, location: str) -> Path:
    """A MatMul whose weight is a sparse initializer with its values stored externally at `location`."""
    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", F32, [1, 2])], [("y", F32, [1, 3])],
                       {"W": np.ones((2, 3), np.float32)})
    del proto.graph.initializer[:]
    values = numpy_helper.from_array(np.array([7.0, 9.0], np.float32), "W")
    values.data_location = TensorProto.EXTERNAL
    values.ClearField("raw_data")
    values.external_data.add(key="location", value=location)
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), "W.indices")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2, 3]))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sparse.onnx"
    onnx.save(proto, str(path))
    return path


def test_sparse_external_data_is_never_read_outside_the_models_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.array([1.0, 2.0], np.float32).tobytes())
    folder = tmp_path / "m"
    for location, words in (("../secret.bin", ("outside the model's folder",)),
                            (str(secret), ("absolute path",)),
                            ("secret.bin", ("missing",))):  # present where the user stands, not beside the model
        model = _sparse_external(folder, location)
        monkeypatch.chdir(tmp_path)
        _refused([model, "--passes", "fold", "-o", folder / "o.onnx"], tmp_path, capsys, "sparse initializer 'W'",
                 *words)


def test_constant_node_tensors_with_external_data_are_checked_too(tmp_path: Path, capsys) -> None:
    proto = make_model([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.ones(2, np.float32), "c")), helper.make_node("Add", ["x", "c"], ["y"])], [("x", F32, [2])],
                       [("y", F32, [2])])
    t = proto.graph.node[0].attribute[0].t
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.external_data.add(key="location", value="../../etc/passwd")
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(proto, str(folder / "c.onnx"))
    _refused([folder / "c.onnx", "--passes", "fold", "-o", folder / "o.onnx"], tmp_path, capsys,
             "attribute 'value'", "refusing")


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--batch", "0"], ("--batch 0", "from 1")),
        (["--batch", "-1"], ("--batch -1",)),
        (["--threads", "100000"], ("--threads 100000", "from 1 to")),
        (["--threads", "-1"], ("--threads -1",)),
        (["--threads", "0"], ("--threads 0",)),
        (["--tolerance", "nan"], ("--tolerance", "finite")),
        (["--tolerance", "inf"], ("--tolerance", "finite")),
        (["--tolerance", "-0.1"], ("--tolerance", ">= 0")),
        (["--tolerance", "2", "--metric", "cosine"], ("between 0 and 1",)),
        (["--bench-runs", "-1"], ("--bench-runs",)),
        (["--dims", "batch=1e9"], ("batch=1e9", "between 1 and 1,000,000")),
        (["--dims", "batch=0"], ("batch=0",)),
        (["--dims", "batch=1000000"], ("MiB of random feeds",)),
        (["--data", "random:0"], ("at least 1",)),
        (["--data", "random:100000"], ("at most 10,000",)),
        (["--drift-cosine", "1.5"], ("--drift-cosine",)),
        (["--set", "fold.max_fold_mb=inf"], ("finite",)),
        (["--set", "fold.max_fold_mb=NaN"], ("finite",)),
    ],
)
def test_numbers_out_of_range_are_refused(cnn: Path, capsys, argv: list[str], words: tuple[str, ...]) -> None:
    options = [] if "--passes" in argv else ["--passes", "fold"]
    _refused([cnn, *options, "-o", cnn.parent / "o.onnx", *argv], cnn.parent, capsys, *words)


@pytest.mark.parametrize("verb", [["bench"], ["compare", CNN], ["inspect"]])
def test_every_verb_range_checks_its_numbers(verb: list, cnn: Path, capsys) -> None:
    _refused([verb[0], cnn, *verb[1:], "--threads", "100000"], cnn.parent, capsys, "--threads")
    _refused([verb[0], cnn, *verb[1:], "--batch", "-1"], cnn.parent, capsys, "--batch")
    _refused([verb[0], cnn, *verb[1:], "--dims", "batch=1e9"], cnn.parent, capsys, "between 1 and")


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("inf.toml", '[[passes]]\nname = "fold"\nmax_fold_mb = inf\n', ("max_fold_mb", "finite")),
        ("nan.toml", '[[passes]]\nname = "fold"\nmax_fold_mb = nan\n', ("finite",)),
        ("inf.json", '{"passes": [{"name": "fold", "max_fold_mb": Infinity}]}', ("finite",)),
        ("deep.json", '{"passes": [{"name": "fold", "x": ' + "[" * 100_000 + "]" * 100_000 + "}]}", ("nested",)),
        ("deep.toml", '[[passes]]\nname = "fold"\nx = ' + "[" * 100_000 + "]" * 100_000 + "\n", ("nested",)),
        ("deep17.json", '{"passes": [{"name": "fold", "x": ' + "[" * 17 + "]" * 17 + "}]}", ("16 levels",)),
    ],
)
def test_recipe_values_that_cannot_be_right(cnn: Path, capsys, name: str, text: str, words: tuple[str, ...]) -> None:
    recipe = cnn.parent / name
    recipe.write_text(text)
    _refused([cnn, "--recipe", recipe, "-o", cnn.parent / "o.onnx"], cnn.parent, capsys, *words)


def test_labels_of_the_wrong_shape(cnn: Path, capsys) -> None:
    x, _ = np.load(EVAL)["input"][:64], None
    bad = cnn.parent / "bad.npz"
    np.savez(bad, input=x, labels=np.zeros((64, 3), np.int64))
    _refused([cnn, "--passes", "fold", "-o", cnn.parent / "o.onnx", "--data", bad], cnn.parent, capsys,
             "labels", "[64, 3]")
    np.savez(bad, input=x, labels=np.full(64, 0.5))
    _refused([cnn, "--passes", "fold", "-o", cnn.parent / "o.onnx", "--data", bad], cnn.parent, capsys,
             "whole class indices")


def test_raw_data_longer_or_shorter_than_its_dims(tmp_path: Path, capsys) -> None:
    for extra in (b"\0" * 8, None):
        proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", F32, [1, 2])],
                           [("y", F32, [1, 3])], {"W": np.ones((2, 3), np.float32)})
        init = proto.graph.initializer[0]
        init.raw_data = init.raw_data + extra if extra else init.raw_data[:-4]
        path = tmp_path / "raw.onnx"
        onnx.save(proto, str(path))
        _refused([path, "--passes", "fold", "-o", tmp_path / "o.onnx"], tmp_path, capsys,
                 "initializer 'W'", "bytes of raw data")


# ------------------------------------------------------------------------------------------------ messages
def test_onnx_runtime_log_lines_never_reach_stderr(tmp_path: Path, capsys) -> None:
    # Reshape to 11 columns fails in ONNX Runtime at every size random feeds try.
    proto = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [("x", F32, ["batch", "n"])],
                       [("y", F32, [-1, 11])], {"s": np.array([-1, 11], np.int64)})
    path = tmp_path / "reshape.onnx"
    onnx.save(proto, str(path))
    r = subprocess.run([sys.executable, "-m", "onnxopt", str(path), "--passes", "fold", "-o", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    _one_line(r.stderr)
    assert "original model fails on random feeds" in r.stderr and "--dims" in r.stderr and "--data" in r.stderr
    assert "x[1, 1]" in r.stderr and "n=640" in r.stderr


def _named(name: str) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", [name], ["y" + name])], [(name, F32, [2, 3])],
                      [("y" + name, F32, [2, 3])])


def test_names_from_the_model_are_escaped_in_messages(tmp_path: Path, capsys) -> None:
    evil = "x\n\x1b[31mred\x07\u202e"
    path = tmp_path / "evil.onnx"
    onnx.save(_named(evil), str(path))
    data = tmp_path / "d.npz"
    np.savez(data, other=np.zeros((2, 3), np.float32))
    err = _refused([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--data", data], tmp_path, capsys,
                   r"x\n\x1b[31mred\x07\u202e")
    assert "\x1b" not in err and "\x07" not in err
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0"], capsys)
    assert code == 0 and "\x1b" not in out and r"yx\n\x1b[31mred" in out, err


def test_safe_name_escapes_what_a_terminal_would_act_on() -> None:
    from onnxopt.errors import first_line, safe_name

    assert safe_name("conv1/weight") == "conv1/weight" and safe_name("名字") == "名字"
    assert safe_name("a\nb\x1b[2Jc\\d") == r"a\nb\x1b[2Jc\\d"
    assert len(safe_name("n" * 1000)) == 200 and safe_name("n" * 1000).endswith("...")
    assert first_line(RuntimeError("Name:'\x1b[31m' failed\nsecond line")) == r"Name:'\x1b[31m' failed"


# ------------------------------------------------------------------------------------------------ the gate
def _tweak_last_gemm(name: str, change) -> None:  # noqa: ANN001 - a function of the weight array
    @onnxopt.register_pass(name)
    class Tweak(onnxopt.Pass):
        """Change the last Gemm's weight (a test pass that breaks the model on purpose)."""

        def call(self, model, ctx):
            gemm = [n for n in model.graph if n.op_type == "Gemm"][-1]
            w = gemm.inputs[1]
            w.const_value = ir.tensor(change(w.const_value.numpy().copy()), name=w.name)
            return onnxopt.PassStats(modified=True)


def _nan_weight(w: np.ndarray) -> np.ndarray:
    w[0, 0] = np.nan
    return w


_tweak_last_gemm("test_hostile_nan", _nan_weight)
_tweak_last_gemm("test_hostile_flip", lambda w: -w)


def test_without_a_tolerance_there_is_no_pass_and_severe_drift_warns(cnn: Path, capsys) -> None:
    report = cnn.parent / "r.json"
    code, out, err = _run([cnn, "--passes", "test_hostile_flip", "-o", cnn.parent / "o.onnx", "--data", EVAL,
                           "--bench-runs", "0", "--report", report], capsys)
    assert code == 0 and "not gated" in out and ": pass" not in out
    assert err.startswith("onnxopt: WARNING: output 'logits' drifted: cosine") and err.count("\n") == 1, err
    assert "top-1 agreement" in err
    doc = json.loads(report.read_text())["validation"]
    assert doc["verdict"] == "not gated" and doc["passed"] is None
    assert [d["output"] for d in doc["drift"]] == ["logits"] and doc["drift"][0]["top1"] < 0.5
    code, out, err = _run([cnn, "--passes", "test_hostile_flip", "-o", cnn.parent / "o.onnx", "--data", EVAL,
                           "--bench-runs", "0", "--drift-cosine", "0", "--drift-top1", "0"], capsys)
    assert code == 0 and err == ""  # the thresholds are the user's


def test_nan_in_the_optimized_output_fails_any_tolerance_and_warns_without(cnn: Path, capsys) -> None:
    out = cnn.parent / "o.onnx"
    code, text, err = _run([cnn, "--passes", "test_hostile_nan", "-o", out, "--data", EVAL, "--bench-runs", "0",
                            "--tolerance", "1e9"], capsys)
    assert code == 1 and "FAIL: non-finite values differ" in text
    assert "non-finite values: original 0, optimized" in text and "max abs nan" not in text
    code, text, err = _run([cnn, "--passes", "test_hostile_nan", "-o", out, "--data", EVAL, "--bench-runs", "0"],
                           capsys)
    assert code == 0 and "not gated" in text and "WARNING" in err and "where the original is finite" in err


def test_non_float_outputs_are_compared_for_equality(tmp_path: Path, capsys) -> None:
    def model(scale: float) -> Path:
        nodes = [helper.make_node("Mul", ["x", "k"], ["s"]), helper.make_node("Floor", ["s"], ["f"]),
                 helper.make_node("Cast", ["f"], ["text"], to=TensorProto.STRING),
                 helper.make_node("ArgMax", ["s"], ["arg"], axis=1, keepdims=0)]
        proto = make_model(nodes, [("x", F32, ["n", 4])], [("text", TensorProto.STRING, ["n", 4]), ("arg", I64, ["n"])],
                           {"k": np.array(scale, np.float32)})
        path = tmp_path / f"m{scale}.onnx"
        onnx.save(proto, str(path))
        return path

    a, b = model(3.0), model(-3.0)
    code, out, err = _run([a, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0",
                           "--tolerance", "0"], capsys)
    assert code == 0 and "output 'text' (not floating point, compared exactly): 0 of" in out, err
    code, out, err = _run(["compare", a, b, "--tolerance", "0"], capsys)
    assert code == 1 and "FAIL" in out and "differ" in out and "WARNING: output 'text'" in err


def test_zero_samples_and_negative_batches_never_pass_the_gate(cnn: Path, capsys) -> None:
    folder = cnn.parent / "feeds"
    folder.mkdir()
    np.savez(folder / "0.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    _refused([cnn, "--passes", "fold", "-o", cnn.parent / "o.onnx", "--data", folder, "--tolerance", "1e-6"],
             cnn.parent, capsys, "no samples to validate on")
    _refused(["compare", cnn, cnn, "--data", folder, "--tolerance", "1e-6"], cnn.parent, capsys, "no samples")
    _refused([cnn, "--passes", "fold", "-o", cnn.parent / "o.onnx", "--batch", "-1", "--tolerance", "1e-6"],
             cnn.parent, capsys, "--batch -1")


# ------------------------------------------------------------------------------------------------ default feeds
def _yolo_like(path: Path) -> Path:
    """[batch,3,height,width] whose Concat needs height and width divisible by 32 (like a YOLOv8 export)."""
    nodes = [
        helper.make_node("MaxPool", ["images"], ["p"], kernel_shape=[32, 32], strides=[32, 32]),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Concat", ["images", "u"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "w"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["score"], axes=[2, 3], keepdims=0),
    ]
    w = np.random.default_rng(0).standard_normal((4, 6, 1, 1)).astype(np.float32)
    proto = make_model(nodes, [("images", F32, ["batch", 3, "height", "width"])], [("score", F32, ["batch", 4])],
                       {"scales": np.array([1, 1, 32, 32], np.float32), "w": w}, opset=17)
    onnx.save(proto, str(path))
    return path


def test_symbolic_image_sizes_climb_a_ladder_until_the_original_runs(tmp_path: Path, capsys) -> None:
    path = _yolo_like(tmp_path / "yolo.onnx")
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0"], capsys)
    assert code == 0, err
    assert "note: random feeds: height=32, width=32" in out
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0",
                           "--dims", "height=64", "--dims", "width=96"], capsys)
    assert code == 0 and "note: random feeds" not in out, err
    _refused([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--dims", "height=33", "--dims", "width=33"],
             tmp_path, capsys, "original model fails on random feeds", "images[1, 3, 33, 33]", "--dims")


def test_integer_inputs_are_drawn_inside_the_tables_they_index(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["we"]),
             helper.make_node("Unsqueeze", ["token_type_ids", "axis"], ["tt3"]),
             helper.make_node("Squeeze", ["tt3", "axis"], ["tt"]),
             helper.make_node("Gather", ["types", "tt"], ["te"]),
             helper.make_node("Add", ["we", "te"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["pooled"], axes=[1], keepdims=0)]
    inits = {"word": rng.standard_normal((30, 8)).astype(np.float32),
             "types": rng.standard_normal((2, 8)).astype(np.float32), "axis": np.array([2], np.int64)}
    proto = make_model(nodes, [("input_ids", I64, ["batch", "seq"]), ("token_type_ids", I64, ["batch", "seq"])],
                       [("pooled", F32, ["batch", 8])], inits, opset=17)
    path = tmp_path / "bert.onnx"
    onnx.save(proto, str(path))
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0"], capsys)
    assert code == 0, err


def test_scalar_inputs_compared_with_constants_take_those_values(tmp_path: Path, capsys) -> None:
    # sr == 16000 runs the then-branch; any other value the else-branch, whose Reshape fails.
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F32, None)])
    other = helper.make_graph([helper.make_node("Reshape", ["x", "bad"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F32, None)])
    nodes = [helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(16000, np.int64))),
             helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["y"], then_branch=then, else_branch=other)]
    proto = make_model(nodes, [("x", F32, [1, "n"]), ("sr", I64, [])], [("y", F32, None)],
                       {"bad": np.array([3, -1], np.int64)}, opset=17)
    path = tmp_path / "vad.onnx"
    onnx.save(proto, str(path))
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0"], capsys)
    assert code == 0, err


@pytest.mark.real
@pytest.mark.parametrize("name", ["silero", "ppocr_det"])
def test_real_models_run_with_default_options(name: str, tmp_path: Path, capsys) -> None:
    from models.real import model_path

    path = model_path(name)
    if path is None:
        pytest.skip(f"the package that ships {name} is not installed")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    code, out, err = _run([path, "--passes", "fold", "-o", tmp_path / "o.onnx", "--bench-runs", "0"], capsys)
    assert code == 0, err
    assert "note: random feeds:" in out and "not gated" in out
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_only_the_onnxopt_program_takes_over_interrupts(monkeypatch) -> None:
    from onnxopt import _interrupt

    assert not _interrupt.interrupts_are_quiet()  # imported by this test run: signals left alone
    for argv, orig, expected in ((["/venv/bin/onnxopt"], [], True), ([_interrupt._OWN_MAIN], [], True),
                                 (["-m"], ["python", "-m", "onnxopt", "x.onnx"], True),
                                 (["-m"], ["python", "-m", "pytest"], False),
                                 (["/venv/lib/pytest/__main__.py"], [], False), (["tool.py"], [], False)):
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(sys, "orig_argv", orig, raising=False)
        assert _interrupt.running_as_program() is expected, argv


def test_inspect_escapes_names_from_the_model(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.onnx"
    onnx.save(_named("in\x1b]0;title\x07"), str(path))
    code, out, err = _run(["inspect", path], capsys)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and r"in\x1b]0;title\x07" in out, err
