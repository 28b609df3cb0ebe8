"""Tuned recipes as TOML: written by `onnxopt.tune.recipe`, read back by the pipeline unchanged."""

from __future__ import annotations

import math

import pytest

from onnxopt.pipeline import read_recipe
from onnxopt.tune.recipe import recipe_toml, toml_value

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def test_recipe_toml_round_trips_through_read_recipe(tmp_path) -> None:
    steps = [("fold", {}),
             ("channels", {"ratio": 0.0, "round_to": 8, "layers": {"block1.conv1": {"ratio": 0.25}}}),
             ("prune", {"scope": "layer", "exclude": ["a[b]"], "layers": {"*": {"skip": True},
                                                                          "fc1": {"skip": False, "sparsity": 0.75}}}),
             ("quantize", {"calibrate": "percentile", "percentile": 99.9, "layers": {"fc2": {"skip": True}}}),
             ("distill", {"layers": [], "teacher": None, "T": 4.0})]
    path = tmp_path / "r.toml"
    path.write_text(recipe_toml(steps, ["a comment"]))
    got = read_recipe(path)
    expected = [(n, {k: v for k, v in o.items() if v is not None}) for n, o in steps]
    assert got == expected


@pytest.mark.parametrize("value", [0.1, 1e-7, 3.0, -2.5, 1e300, 12, True, "a \"quoted\" \\ name\n", [1, 2.5, "x"],
                                   {"a.b": 1, "skip": False}])
def test_values_parse_back_to_the_same(value) -> None:
    doc = tomllib.loads(f"v = {toml_value(value)}\n")
    assert doc["v"] == value and type(doc["v"]) is type(value)


def test_infinities_parse_back() -> None:
    assert tomllib.loads(f"v = {toml_value(math.inf)}")["v"] == math.inf
    assert math.isnan(tomllib.loads(f"v = {toml_value(math.nan)}")["v"])
