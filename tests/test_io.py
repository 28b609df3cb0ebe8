"""Model I/O: every load error as one line, atomic saves, external data, temp files for ONNX Runtime,
file sizes with external data, input kinds and output paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import pytest
from helpers import F32, MODELS, run_ort
from onnx import helper

from onnxopt import io
from onnxopt.errors import ModelError, UsageError

CNN = MODELS / "digits_cnn.onnx"


def _x() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)}


def _external_copy(folder: Path, name: str = "m.onnx") -> Path:
    """The CNN with every weight in ``<name>.data`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    ir.save(ir.load(CNN), folder / name, external_data=f"{name}.data", size_threshold_bytes=0)
    return folder / name


def _pointing_at(tmp: Path, location: str) -> Path:
    """The CNN with its first initializer stored externally at `location`."""
    proto = onnx.load(str(CNN))
    init = proto.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")
    init.ClearField("float_data")
    init.external_data.add(key="location", value=location)
    path = tmp / "pointing.onnx"
    onnx.save(proto, str(path))
    return path


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".onnxopt-")]


# ---------------------------------------------------------------------------------------- load
def test_load_reads_weights_lazily_from_external_data(tmp_path: Path) -> None:
    path = _external_copy(tmp_path / "ext")
    model = io.load(path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert {Path(t.base_dir) for t in tensors} == {path.parent}
    with io.temp_model_file(model) as copy:
        np.testing.assert_allclose(run_ort(copy, _x())[0], run_ort(CNN, _x())[0], rtol=1e-6)


def _broken_files(tmp: Path) -> dict[str, tuple[Path, type[Exception], str]]:
    cases: dict[str, tuple[Path, type[Exception], str]] = {
        "missing": (tmp / "missing.onnx", UsageError, "does not exist"),
        "a folder": (tmp, UsageError, "is not a file"),
    }
    (tmp / "empty.onnx").write_bytes(b"")
    cases["empty"] = (tmp / "empty.onnx", ModelError, "is empty, not an ONNX model")
    (tmp / "text.onnx").write_text("this is not a model\n" * 10)
    cases["not onnx"] = (tmp / "text.onnx", ModelError, "not")
    (tmp / "trunc.onnx").write_bytes(CNN.read_bytes()[: CNN.stat().st_size // 2])
    cases["truncated"] = (tmp / "trunc.onnx", ModelError, "ONNX")
    (tmp / "nograph.onnx").write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    cases["no graph"] = (tmp / "nograph.onnx", ModelError, "no graph, IR version or opset")
    return cases


def test_every_unreadable_file_is_one_line(tmp_path: Path) -> None:
    for label, (path, kind, needle) in _broken_files(tmp_path).items():
        with pytest.raises(kind) as err:
            io.load(path)
        text = str(err.value)
        assert needle in text and "\n" not in text, (label, text)


@pytest.mark.parametrize(
    "location, needle",
    [
        ("../secret.bin", "outside the model's folder; refusing to read it"),
        ("/etc/passwd", "by absolute path '/etc/passwd'; refusing"),
        ("nowhere.bin", "external data file 'nowhere.bin' of initializer"),
    ],
)
def test_external_data_outside_the_folder_absolute_or_missing_is_refused(tmp_path, location, needle) -> None:
    (tmp_path.parent / "secret.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(ModelError, match="initializer|external data") as err:
        io.load(_pointing_at(tmp_path, location))
    assert needle in str(err.value)


def test_external_data_too_short_is_refused(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match=r"'m.onnx.data' is too short for initializer .* \(100 bytes, need \d+\)"):
        io.load(path)


def test_checker_runs_unless_told_not_to(tmp_path: Path) -> None:
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["nope"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", F32, [1])],
                                                [helper.make_tensor_value_info("y", F32, [1])]))
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        io.load(path)
    assert io.load(path, check=False).graph.node(0).op_type == "Relu"


def test_sparse_initializers_are_loaded_dense(tmp_path: Path) -> None:
    w = np.array([[0, 2, 0], [0, 0, -1]], np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F32, [1, 2])],
                              [helper.make_tensor_value_info("y", F32, [1, 3])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    values = onnx.numpy_helper.from_array(w[w != 0], "W")
    indices = onnx.numpy_helper.from_array(np.flatnonzero(w).astype(np.int64), "W.indices")
    proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [2, 3]))
    path = tmp_path / "sparse.onnx"
    onnx.save(proto, str(path))
    model = io.load(path, check=False)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), w)


# ---------------------------------------------------------------------------------------- save
def test_save_is_atomic_a_failure_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "out.onnx"
    target.write_bytes(b"the previous file")

    def half_written(model: ir.Model, path: Path, external: bool) -> None:
        path.write_bytes(b"half a model")
        (path.parent / f"{path.name}.data").write_bytes(b"half the weights")
        raise OSError("disk full")

    monkeypatch.setattr(io, "_write", half_written)
    with pytest.raises(OSError, match="disk full"):
        io.save(ir.load(CNN), target)
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_goes_external_past_the_limit_or_when_asked(tmp_path: Path, monkeypatch) -> None:
    model = ir.load(CNN)
    inline = io.save(model, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists()
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", io.weight_bytes(model) - 1)
    big = io.save(ir.load(CNN), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file() and big.stat().st_size < inline.stat().st_size / 10
    forced_inline = io.save(ir.load(CNN), tmp_path / "forced.onnx", external_data=False)
    assert not (tmp_path / "forced.onnx.data").exists()
    for path in (inline, big, forced_inline):
        np.testing.assert_allclose(run_ort(path, _x())[0], run_ort(CNN, _x())[0], rtol=1e-6)
    assert not _leftovers(tmp_path)


def test_saving_a_model_with_external_weights_as_one_file_inlines_them(tmp_path: Path) -> None:
    model = io.load(_external_copy(tmp_path / "ext"))
    out = io.save(model, tmp_path / "one.onnx", external_data=False)
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in onnx.load(str(out)).graph.initializer)
    assert io.file_size(out) == out.stat().st_size


# ---------------------------------------------------------------------------------------- temp files, sizes
def test_temp_model_file_is_a_runnable_copy_removed_afterwards(tmp_path: Path) -> None:
    model = ir.load(CNN)
    with io.temp_model_file(model, "copy.onnx") as path:
        assert path.name == "copy.onnx" and not (path.parent / "copy.onnx.data").exists()
        np.testing.assert_allclose(run_ort(path, _x())[0], run_ort(CNN, _x())[0], rtol=1e-6)
        folder = path.parent
    assert not folder.exists()
    with pytest.raises(RuntimeError), io.temp_model_file(model) as path:
        folder = path.parent
        raise RuntimeError("the caller fails")
    assert not folder.exists()


def test_temp_model_file_keeps_weights_external_when_big_or_already_external(tmp_path, monkeypatch) -> None:
    with io.temp_model_file(io.load(_external_copy(tmp_path / "ext"))) as path:
        assert (path.parent / "model.onnx.data").is_file()
    monkeypatch.setattr(io, "_TEMP_EXTERNAL_BYTES", 1000)
    with io.temp_model_file(ir.load(CNN)) as path:
        assert (path.parent / "model.onnx.data").is_file()
        np.testing.assert_allclose(run_ort(path, _x())[0], run_ort(CNN, _x())[0], rtol=1e-6)


def test_file_size_counts_external_data_once_and_skips_missing_files(tmp_path: Path) -> None:
    path = _external_copy(tmp_path)
    data = tmp_path / "m.onnx.data"
    assert io.file_size(path) == path.stat().st_size + data.stat().st_size
    assert io.file_size(CNN) == CNN.stat().st_size
    os.remove(data)
    assert io.file_size(path) == path.stat().st_size
    with pytest.raises(FileNotFoundError):
        io.file_size(tmp_path / "none.onnx")


def test_weight_bytes_reads_no_weight(tmp_path: Path) -> None:
    model = io.load(_external_copy(tmp_path))
    os.remove(tmp_path / "m.onnx.data")  # reading a weight now would fail
    expected = sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(CNN)).graph.initializer)
    assert io.weight_bytes(model) == expected


# ---------------------------------------------------------------------------------------- inputs and outputs
def test_to_ir_accepts_every_input_kind() -> None:
    proto = onnx.load(str(CNN))
    model = ir.from_proto(proto)
    assert io.to_ir(model) is model
    for given in (CNN, str(CNN), proto, gs.import_onnx(proto)):
        assert len(io.to_ir(given).graph) == len(model.graph)
    with pytest.raises(UsageError, match="cannot optimize a bytes: give a path"):
        io.to_ir(CNN.read_bytes())


def test_check_output_path_refuses_what_cannot_be_written(tmp_path: Path) -> None:
    assert io.check_output_path(tmp_path / "o.onnx", CNN) == tmp_path / "o.onnx"
    with pytest.raises(UsageError, match="is the input model"):
        io.check_output_path(CNN, CNN)
    with pytest.raises(UsageError, match="is a directory"):
        io.check_output_path(tmp_path, None)
    with pytest.raises(UsageError, match="does not exist"):
        io.check_output_path(tmp_path / "no" / "o.onnx", None)


def test_iter_proto_graphs_reaches_nested_subgraphs() -> None:
    def branch(name: str, inner: list[onnx.NodeProto]) -> onnx.GraphProto:
        return helper.make_graph(inner, name, [], [helper.make_tensor_value_info(f"{name}_y", F32, None)])

    leaf = branch("leaf", [helper.make_node("Constant", [], ["leaf_y"], value_float=1.0)])
    mid = branch("mid", [helper.make_node("If", ["c"], ["mid_y"], then_branch=leaf, else_branch=leaf)])
    top = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=mid, else_branch=mid)], "top",
                            [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
                            [helper.make_tensor_value_info("y", F32, None)])
    assert sorted(g.name for g in io.iter_proto_graphs(top)) == ["leaf"] * 4 + ["mid"] * 2 + ["top"]


# ---------------------------------------------------------------------------------------- checked, staged writes
def test_check_targets_refuses_the_input_its_data_links_devices_and_collisions(tmp_path: Path) -> None:
    model = _external_copy(tmp_path / "in", "m.onnx")
    io.load(model)
    protected = io.source_files(model)
    assert protected == [model, (tmp_path / "in" / "m.onnx.data").resolve()]
    (tmp_path / "link.onnx").symlink_to(model)
    os.link(model, tmp_path / "hard.onnx")
    cases = {
        "is the input model": {"output": tmp_path / "link.onnx"},
        "is the input model;": {"output": tmp_path / "hard.onnx"},
        "external data file 'm.onnx.data'": {"report": tmp_path / "in" / "m.onnx.data"},
        "character device": {"output": Path("/dev/null")},
        "is a directory": {"output": tmp_path},
        "same file as the output": {"output": tmp_path / "o.onnx", "report": tmp_path / "o.onnx"},
        "does not exist": {"output": tmp_path / "no" / "o.onnx"},
    }
    for needle, targets in cases.items():
        with pytest.raises(UsageError, match=needle):
            io.check_targets(targets, protected)
    io.check_targets({"output": tmp_path / "o.onnx", "report": tmp_path / "r.json"}, protected)
    assert not _leftovers(tmp_path)


def test_staging_commits_in_order_and_never_writes_through_a_symlink(tmp_path: Path) -> None:
    pointee = tmp_path / "pointee.txt"
    pointee.write_text("untouched")
    (tmp_path / "r.json").symlink_to(pointee)
    with io.Staging() as staging:
        staging.add_model(ir.load(CNN), tmp_path / "o.onnx", external=True)
        staging.add_bytes(tmp_path / "r.json", b"{}", first=True)
        assert _leftovers(tmp_path)  # staged, nothing in place yet
        assert not (tmp_path / "o.onnx").exists()
        staging.commit()
    assert pointee.read_text() == "untouched" and (tmp_path / "r.json").read_text() == "{}"
    assert not (tmp_path / "r.json").is_symlink()
    np.testing.assert_allclose(run_ort(tmp_path / "o.onnx", _x())[0], run_ort(CNN, _x())[0], rtol=1e-6)
    assert not _leftovers(tmp_path)


def test_a_failed_commit_puts_back_what_was_there(tmp_path: Path, monkeypatch) -> None:
    report, out = tmp_path / "r.json", tmp_path / "o.onnx"
    report.write_text("old report")
    real = os.replace

    def fail_on_model(src, dst) -> None:
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        real(src, dst)

    staging = io.Staging()
    staging.add_bytes(report, b"new report")
    staging.add_model(ir.load(CNN), out, external=False)
    monkeypatch.setattr(os, "replace", fail_on_model)
    with pytest.raises(UsageError, match="cannot write .*o.onnx.*No space left"):
        staging.commit()
    assert report.read_text() == "old report" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_a_full_disk_while_staging_is_a_user_error_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def full(model: ir.Model, path: Path, external: bool) -> None:
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "_write", full)
    with pytest.raises(UsageError, match="No space left on device"):
        io.save(ir.load(CNN), tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folders_fail_at_the_check(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not writable"):
        io.check_targets({"output": Path("/proc/x.onnx")})
    with pytest.raises(UsageError, match="cannot write in folder '/proc'"):
        io.Staging().folder(Path("/proc/x.onnx"))


def test_raw_data_of_the_wrong_length_is_refused_before_reading(tmp_path: Path) -> None:
    proto = onnx.load(str(CNN))
    init = proto.graph.initializer[0]
    init.raw_data = init.raw_data + b"\0\0\0\0"
    onnx.save(proto, str(tmp_path / "long.onnx"))
    with pytest.raises(ModelError, match=r"initializer '.*' holds \d+ bytes of raw data, but its dims"):
        io.load(tmp_path / "long.onnx")


def test_attribute_tensors_read_external_data_from_the_models_folder(tmp_path: Path, monkeypatch) -> None:
    c = np.arange(4, dtype=np.float32)
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(c, "c")),
         helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F32, [4])], [helper.make_tensor_value_info("y", F32, [4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    t = proto.graph.node[0].attribute[0].t
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="c.bin")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "c.bin").write_bytes(c.tobytes())
    onnx.save(proto, str(tmp_path / "m" / "c.onnx"))
    (tmp_path / "c.bin").write_bytes(np.full(4, 99, np.float32).tobytes())  # a decoy where the user stands
    monkeypatch.chdir(tmp_path)
    model = io.load(tmp_path / "m" / "c.onnx")
    assert io.source_files(model)[1] == (tmp_path / "m" / "c.bin").resolve()
    np.testing.assert_array_equal(model.graph.node(0).attributes["value"].value.numpy(), c)


def test_source_files_of_a_model_not_loaded_yet_include_its_external_data(tmp_path: Path) -> None:
    model = _external_copy(tmp_path / "in", "fresh.onnx")
    assert io.source_files(model) == [model, (tmp_path / "in" / "fresh.onnx.data").resolve()]
    with pytest.raises(UsageError, match="external data file 'fresh.onnx.data'"):
        io.check_targets({"report": tmp_path / "in" / "fresh.onnx.data"}, io.source_files(model))
    assert io.source_files(tmp_path / "missing.onnx") == [tmp_path / "missing.onnx"]
