"""Sparse storage: marks, the save-time move to sparse_initializer (only where smaller), densify, and
bit-identical ONNX Runtime outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import F32, I64, make_model, run_ort
from onnx import helper, numpy_helper

from onnxopt import io, sparse


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0  # ~90 % zeros: sparse is smaller
    half = rng.standard_normal((12,)).astype(np.float32)
    half[::2] = 0  # 50 % zeros: sparse would be larger for float32
    return {"W": w, "B": half, "shape": np.array([1, 12], np.int64)}


def _proto() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
         helper.make_node("Reshape", ["a", "shape"], ["y"])],
        [("x", F32, [1, 16])], [("y", F32, [1, 12])], _weights(),
    )


def _marked(names: list[str]) -> onnx.ModelProto:
    model = ir.from_proto(_proto())
    sparse.mark_sparse(model, names)
    return ir.to_proto(model)


def test_sparse_nbytes_counts_values_and_int64_indices() -> None:
    assert sparse.sparse_nbytes(10, 4) == 10 * (4 + sparse.INDEX_BYTES) == 120
    assert sparse.sparse_nbytes(0, 2) == 0


def test_marks_accumulate_and_say_when_new() -> None:
    model = ir.from_proto(_proto())
    assert sparse.marked_names(model) == []
    assert sparse.mark_sparse(model, ["W"]) and sparse.mark_sparse(model, ["B", "W"])
    assert not sparse.mark_sparse(model, ["W"])
    assert sparse.marked_names(model) == ["B", "W"]


@pytest.mark.parametrize("text", ["not json", '{"W": 1}', '["W", 3, null]', ""])
def test_a_broken_mark_reads_as_the_strings_it_holds(text: str) -> None:
    model = ir.from_proto(_proto())
    model.metadata_props[sparse.SPARSE_KEY] = text
    assert sparse.marked_names(model) == (["W"] if text.startswith("[") else [])


def test_apply_moves_only_what_gets_smaller_and_drops_the_mark() -> None:
    proto = _marked(["W", "B", "shape", "nope"])
    dense_size = proto.ByteSize()
    moved = sparse.apply_sparse_storage(proto)
    assert moved == ["W"]  # B is half zeros (larger sparse), shape is int64, nope does not exist
    assert [i.name for i in proto.graph.initializer] == ["B", "shape"]
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["W"]
    assert not any(p.key == sparse.SPARSE_KEY for p in proto.metadata_props)
    assert proto.ByteSize() < dense_size
    nnz = int(np.count_nonzero(_weights()["W"]))
    assert proto.graph.sparse_initializer[0].values.dims == [nnz]


def test_apply_never_makes_a_tensor_larger() -> None:
    rng = np.random.default_rng(1)
    for zeros in (0.0, 0.5, 0.6, 0.65, 0.7, 0.9, 1.0):
        w = rng.standard_normal((30, 10)).astype(np.float32)
        w[rng.random(w.shape) < zeros] = 0
        proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", F32, [1, 30])],
                           [("y", F32, [1, 10])], {"W": w})
        model = ir.from_proto(proto)
        sparse.mark_sparse(model, ["W"])
        proto = ir.to_proto(model)
        before = proto.graph.initializer[0].ByteSize()
        moved = sparse.apply_sparse_storage(proto)
        after = sum(s.ByteSize() for s in proto.graph.sparse_initializer) + sum(
            i.ByteSize() for i in proto.graph.initializer)
        assert after <= before, zeros
        assert bool(moved) == (sparse.sparse_nbytes(np.count_nonzero(w), 4) < w.nbytes), zeros


def test_nothing_marked_or_an_input_weight_stays_dense() -> None:
    proto = ir.to_proto(ir.from_proto(_proto()))
    assert sparse.apply_sparse_storage(proto) == [] and not proto.graph.sparse_initializer
    proto = _marked(["W"])
    proto.graph.input.append(helper.make_tensor_value_info("W", F32, [16, 12]))  # overridable: keep dense
    assert sparse.apply_sparse_storage(proto) == []


def test_densify_round_trip_is_bit_identical_in_both_index_forms() -> None:
    proto = _marked(["W"])
    sparse.apply_sparse_storage(proto)
    coo = onnx.ModelProto()
    coo.CopyFrom(proto)
    flat = numpy_helper.to_array(coo.graph.sparse_initializer[0].indices)
    coords = np.stack(np.unravel_index(flat, (16, 12)), axis=1).astype(np.int64)  # [nnz, rank] form
    coo.graph.sparse_initializer[0].indices.CopyFrom(numpy_helper.from_array(coords, "W.indices"))
    for p in (proto, coo):
        assert sparse.densify(p) == 1 and not p.graph.sparse_initializer
        w = {i.name: numpy_helper.to_array(i) for i in p.graph.initializer}["W"]
        np.testing.assert_array_equal(w, _weights()["W"])
    assert sparse.densify(proto) == 0


def test_saved_sparse_model_gives_bit_identical_outputs_and_loads_dense(tmp_path: Path) -> None:
    model = ir.from_proto(_proto())
    sparse.mark_sparse(model, ["W", "B"])
    path = io.save(model, tmp_path / "sparse.onnx", external_data=False)
    saved = onnx.load(str(path))
    assert [s.values.name for s in saved.graph.sparse_initializer] == ["W"]
    assert path.stat().st_size < len(_proto().SerializeToString())
    x = {"x": np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(path, x)[0], run_ort(_proto(), x)[0])
    back = io.load(path, check=False)
    np.testing.assert_array_equal(back.graph.initializers["W"].const_value.numpy(), _weights()["W"])
    assert sparse.marked_names(back) == []


def test_external_weights_are_not_moved(tmp_path: Path) -> None:
    model = ir.from_proto(_proto())
    sparse.mark_sparse(model, ["W"])
    ir.save(model, tmp_path / "ext.onnx", external_data="ext.onnx.data", size_threshold_bytes=0)
    proto = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    assert sparse.apply_sparse_storage(proto) == [] and not proto.graph.sparse_initializer


def test_int_weights_are_never_sparse() -> None:
    ids = np.zeros((40, 4), np.int64)
    proto = make_model([helper.make_node("Gather", ["E", "i"], ["y"])], [("i", I64, [2])], [("y", I64, [2, 4])],
                       {"E": ids})
    model = ir.from_proto(proto)
    sparse.mark_sparse(model, ["E"])
    proto = ir.to_proto(model)
    assert sparse.apply_sparse_storage(proto) == []


def test_densify_reads_external_values_from_the_models_folder_only(tmp_path: Path, monkeypatch) -> None:
    """External values and indices are read beside the model (never from the current directory), after
    the same checks as dense external data; without the model's folder they are refused."""
    from onnxopt.errors import ModelError

    def external_proto(location: str) -> onnx.ModelProto:
        proto = _marked(["W"])
        sparse.apply_sparse_storage(proto)
        values = proto.graph.sparse_initializer[0].values
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "w.bin").write_bytes(numpy_helper.to_array(values).tobytes())
        values.ClearField("raw_data")
        values.ClearField("float_data")
        values.data_location = onnx.TensorProto.EXTERNAL
        values.external_data.add(key="location", value=location)
        return proto

    proto = external_proto("w.bin")
    sparse.densify(proto, tmp_path / "m")
    w = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["W"]
    np.testing.assert_array_equal(w, _weights()["W"])
    monkeypatch.chdir(tmp_path / "m")  # the file is right here, and still not read without the folder
    with pytest.raises(ModelError, match="the model's folder is not known"):
        sparse.densify(external_proto("w.bin"))
    for location, needle in (("../m/../../w.bin", "outside the model's folder"), ("/etc/hostname", "absolute"),
                             ("nope.bin", "missing")):
        with pytest.raises(ModelError, match=needle):
            sparse.densify(external_proto(location), tmp_path / "m")


def test_densify_refuses_what_cannot_be_made_dense() -> None:
    from onnxopt.errors import ModelError

    values = numpy_helper.from_array(np.ones(2, np.float32), "W")
    for dims, indices, needle in (([1 << 40], [0, 1], "cannot be made dense"), ([4], [1, 9], "indices outside"),
                                  ([4], [1], "2 values for 1 indices")):
        proto = _proto()
        proto.graph.sparse_initializer.append(
            helper.make_sparse_tensor(values, numpy_helper.from_array(np.array(indices, np.int64), "i"), dims))
        with pytest.raises(ModelError, match=needle):
            sparse.densify(proto)
