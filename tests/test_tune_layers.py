"""Per-layer settings (`layers` options): the registry mechanism, each pass that takes it, and recipes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from helpers import MODELS, ROOT, assert_same_outputs, digits_eval

from onnxopt.errors import UsageError
from onnxopt.registry import exclude_patterns, layer_keys, layer_settings, make_pass, run_pass

CNN = MODELS / "digits_cnn.onnx"


def _folded() -> ir.Model:
    model = ir.load(CNN)
    run_pass("fold", model)
    return model


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def _weight(model: ir.Model, node: str) -> np.ndarray:
    return _node(model, node).inputs[1].const_value.numpy()


# ------------------------------------------------------------------------------ the registry
def test_layer_keys_are_declared_by_the_passes_that_take_them() -> None:
    from onnxopt.registry import get_pass

    assert layer_keys(get_pass("prune")) == ("sparsity",)
    assert layer_keys(get_pass("channels")) == ("ratio",)
    assert layer_keys(get_pass("factorize")) == ("rank_ratio", "energy")
    assert layer_keys(get_pass("quantize")) == ()
    assert layer_keys(get_pass("distill")) is None  # its own `layers` is a list of nodes to refit
    assert layer_keys(get_pass("fold")) is None


def test_later_entries_win_and_ops_match_by_type() -> None:
    p = make_pass("prune", {"sparsity": 0.5, "layers": {"*": {"skip": True}, "Gemm": {"sparsity": 0.2},
                                                          "fc2": {"skip": False, "sparsity": 0.1}}})
    model = _folded()
    assert layer_settings(p, _node(model, "stem.conv")) == {"sparsity": 0.5, "skip": True}
    assert layer_settings(p, _node(model, "fc1")) == {"sparsity": 0.2, "skip": True}
    assert layer_settings(p, _node(model, "fc2")) == {"sparsity": 0.1, "skip": False}
    skipped = exclude_patterns(p, model)
    assert "fc2" not in skipped and "fc1" in skipped and "stem.conv" in skipped


@pytest.mark.parametrize(("options", "message"), [
    ({"layers": {"fc1": {"sparsity": 1.5}}}, "layers 'fc1': prune.sparsity: 1.5 is outside"),
    ({"layers": {"fc1": {"scope": "layer"}}}, "'scope' cannot be set per layer (per-layer keys: sparsity, skip)"),
    ({"layers": {"fc1": {"sparsity": "lots"}}}, "prune.layers.fc1.sparsity: 'lots' is not a valid"),
    ({"layers": {"fc1": {"skip": "maybe"}}}, "prune.layers.fc1.skip: 'maybe' is not a valid bool"),
    ({"layers": {"fc1": 0.5}}, "'fc1' needs a table of settings"),
    ({"layers": ["fc1"]}, "expected a table of node globs"),
    ({"threshold": 0.1, "layers": {"fc1": {"sparsity": 0.5}}},
     "layers 'fc1': prune.sparsity is read only when threshold is not set"),
])
def test_bad_layer_settings_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        make_pass("prune", options)
    assert message in str(info.value)


def test_channels_rejects_per_layer_ratios_in_macs_mode() -> None:
    with pytest.raises(UsageError, match="per-layer ratio needs ratio mode"):
        make_pass("channels", {"macs": 0.3, "layers": {"fc1": {"ratio": 0.5}}})


def test_layers_from_the_command_line_are_json() -> None:
    p = make_pass("channels", {"layers": '{"block1.conv1": {"ratio": "0.5"}}'}, from_text=True)
    assert p.layers == {"block1.conv1": {"ratio": 0.5}}
    with pytest.raises(UsageError, match="write it as JSON"):
        make_pass("channels", {"layers": "block1.conv1=0.5"}, from_text=True)


# ------------------------------------------------------------------------------ the passes
def test_prune_per_layer_sparsity_and_skip() -> None:
    model = _folded()
    before = {n: _weight(model, n).copy() for n in ("fc1", "fc2", "stem.conv")}
    run_pass("prune", model, None, scope="global", sparsity=0.5,
             layers={"fc1": {"sparsity": 0.9}, "stem.conv": {"skip": True}})
    fc1 = _weight(model, "fc1")
    assert abs((fc1 == 0).mean() - 0.9) < 1e-3
    kept = np.abs(before["fc1"])[fc1 != 0]
    assert kept.min() >= np.abs(before["fc1"])[fc1 == 0].max()  # the largest magnitudes survive
    np.testing.assert_array_equal(_weight(model, "stem.conv"), before["stem.conv"])
    assert (_weight(model, "fc2") == 0).any()  # the rest follow the pass-wide global ranking


def test_channels_per_group_ratio() -> None:
    model = _folded()
    stats = run_pass("channels", model, None, ratio=0.0, round_to=1, verify_speed=False,
                     layers={"block1.conv1": {"ratio": 0.5}})
    assert [row["group"] for row in stats.layers] == ["block1.conv1"]
    assert _weight(model, "block1.conv1").shape[0] == 8
    assert _weight(model, "block1.conv2").shape[1] == 8
    assert _weight(model, "pw.conv").shape[0] == 32  # other groups untouched at ratio 0


def test_factorize_per_layer_rank_and_skip() -> None:
    model = _folded()
    stats = run_pass("factorize", model, None, rank_by="ratio", verify_speed=False,
                     layers={"*": {"skip": True}, "fc1": {"skip": False, "rank_ratio": 0.25}})
    assert [row["node"] for row in stats.layers] == ["fc1"]
    assert stats.layers[0]["ranks"] == [16]  # a quarter of min(512, 64)
    assert any(s["node"] == "stem.conv" and "excluded" in s["reason"] for s in stats.skipped)


def test_quantize_skip_keeps_the_node_in_float() -> None:
    x, _ = digits_eval()
    feeds = [{"input": x[i:i + 16]} for i in range(0, 64, 16)]
    from onnxopt.context import Context
    from onnxopt.data import Dataset

    ctx = Context(calib=Dataset(feeds, [None] * len(feeds), "test"))
    model = _folded()
    run_pass("quantize", model, ctx, check_fusion=False, require_speedup=False, fallback="none",
             layers={"fc2": {"skip": True}})
    fc2 = _node(model, "fc2")
    assert fc2.op_type == "Gemm" and fc2.inputs[1].const_value is not None  # weight still a float initializer
    fc1 = _node(model, "fc1")
    assert fc1.inputs[1].producer() is not None and fc1.inputs[1].producer().op_type == "DequantizeLinear"


def test_empty_layers_change_nothing() -> None:
    a, b = _folded(), _folded()
    run_pass("prune", a, None, sparsity=0.5)
    run_pass("prune", b, None, sparsity=0.5, layers={})
    x, _ = digits_eval()
    assert_same_outputs(a, b, {"input": x[:16]}, rtol=0, atol=0)


# ------------------------------------------------------------------------------ the command line
def test_cli_set_layers(tmp_path) -> None:
    out = tmp_path / "p.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt", str(CNN), "--passes", "fold,prune", "--set", "prune.scope=layer",
         "--set", 'prune.layers={"*": {"skip": true}, "fc1": {"skip": false, "sparsity": 0.8}}',
         "-o", str(out), "--bench-runs", "0", "--no-validate"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model = ir.load(out)
    assert abs((_weight(model, "fc1") == 0).mean() - 0.8) < 1e-3
    assert not (_weight(model, "fc2") == 0).any()
