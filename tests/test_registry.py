"""The registry: option coercion, errors that name pass, key and what is allowed, options read under a mode
(declared with ``when=``, audited for every built-in pass), the pass listing, third-party passes, run_pass,
onnx_ir interop, and every idempotence claim checked."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import onnx_ir as ir
import onnx_ir.passes
import pytest
from helpers import F32, MODELS, make_model
from onnx import helper

from onnxopt import registry
from onnxopt.cli import main
from onnxopt.context import Context
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.registry import (
    Pass,
    PassStats,
    call_pass,
    coerce,
    get_pass,
    list_passes,
    make_pass,
    matches_any,
    option,
    option_specs,
    register_pass,
    root_cause,
    run_pass,
)

CNN = MODELS / "digits_cnn.onnx"


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes registered by a test are gone after it (the built-in ones are loaded first)."""
    list_passes()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _demo() -> type[Pass]:
    @register_pass("test_demo")
    class Demo(Pass):
        """A pass with one option of every annotation form."""

        flag: bool = option(False, "a switch")
        count: int = option(2, "a whole number")
        scale: float = option(1.0, "a number")
        label: str = option("x", "a word")
        mode: Literal["fast", "slow"] = option("fast", "a choice")
        limit: float | None = option(None, "a number or none")
        names: list[str] = option([], "words")
        sizes: list[int] = option([1, 2], "whole numbers")

        def __post_init__(self) -> None:
            if self.count < 0:
                raise ValueError(f"count must be >= 0, got {self.count}")

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            return PassStats(summary={"count": self.count})

    return Demo


# ---------------------------------------------------------------------------------------- coercion
@pytest.mark.parametrize(
    "tp, raw, expected",
    [
        (bool, "yes", True), (bool, "OFF", False), (bool, True, True),
        (int, " 3 ", 3), (int, 4.0, 4),
        (float, "0.5", 0.5), (float, 2, 2.0),
        (str, "a b", "a b"),
        (Literal["fast", "slow"], "slow", "slow"), (Literal[1, 2], "2", 2),
        (float | None, "none", None), (float | None, None, None), (float | None, "1.5", 1.5),
        (list[str], "a, b,", ["a", "b"]), (list[str], ["x"], ["x"]),
        (list[str], '["MatMul", "Gemm"]', ["MatMul", "Gemm"]), (list[str], "[a, 'b*']", ["a", "b*"]),
        (list[str], "[]", []), (list[str], "[ab]*", ["[ab]*"]),
        (list[int], "1,2", [1, 2]), (list[float], [1, "2.5"], [1.0, 2.5]),
        (tuple[int, ...], "1,2", (1, 2)),
        (int | str, "7", 7), (int | str, "seven", "seven"),
    ],
)
def test_coerce_every_annotation_form(tp, raw, expected) -> None:
    got = coerce(raw, tp, "p.k", from_text=True)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "tp, raw, shown",
    [
        (bool, "maybe", "bool"), (bool, 1, "bool"),
        (int, "1.5", "int"), (int, True, "int"), (int, 2.5, "int"),
        (float, "abc", "float"), (float, False, "float"),
        (str, 3, "str"),
        (Literal["fast", "slow"], "medium", "{fast,slow}"),
        (float | None, "lots", "float | none"),
        (list[int], "1,x", "list[int]"), (list[int], 5, "list[int]"),
    ],
)
def test_coerce_rejects_bad_values_naming_where_and_type(tp, raw, shown) -> None:
    with pytest.raises(UsageError) as err:
        coerce(raw, tp, "p.k", from_text=True)
    assert str(err.value).startswith("option p.k: ") and str(err.value).endswith(f"is not a valid {shown}")


def test_option_specs_name_types_choices_and_defaults(scratch_registry) -> None:
    specs = {s.name: s for s in option_specs(_demo())}
    assert [specs[k].type_name for k in ("flag", "mode", "limit", "names", "sizes")] == [
        "bool", "{fast,slow}", "float | none", "list[str]", "list[int]"]
    assert specs["mode"].choices == ("fast", "slow") and specs["count"].choices is None
    assert specs["sizes"].default == [1, 2] and specs["scale"].doc == "a number"


def test_make_pass_coerces_text_and_keeps_mutable_defaults_apart(scratch_registry) -> None:
    demo = _demo()
    p = make_pass("test_demo", {"flag": "on", "count": "5", "limit": "none", "names": "a,b", "sizes": "3"},
                  from_text=True)
    assert (p.flag, p.count, p.limit, p.names, p.sizes) == (True, 5, None, ["a", "b"], [3])
    a, b = demo(), demo()
    a.sizes.append(9)
    assert b.sizes == [1, 2]
    with pytest.raises(TypeError):
        demo(True)  # options are keyword-only


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"nope": 1}, "pass 'test_demo' has no option 'nope' (options: flag, count, scale, label, mode, limit"),
        ({"mode": "medium"}, "option test_demo.mode: 'medium' is not a valid {fast,slow}"),
        ({"count": "many"}, "option test_demo.count: 'many' is not a valid int"),
        ({"count": -1}, "pass 'test_demo': count must be >= 0, got -1"),
    ],
)
def test_make_pass_errors_name_pass_key_and_what_is_allowed(scratch_registry, options, needle) -> None:
    _demo()
    with pytest.raises(UsageError) as err:
        make_pass("test_demo", options, from_text=True)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_pass_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown pass 'nope' \(known passes: .*fold.*\)"):
        get_pass("nope")


# ---------------------------------------------------------------------------------------- options read under a mode
def _moded() -> type[Pass]:
    @register_pass("test_moded")
    class Moded(Pass):
        """Options read under modes."""

        kind: Literal["a", "b", "c"] = option("a", "the mode")
        level: Literal["low", "high"] = option("low", "a second mode, read only under kind=c", when={"kind": "c"})
        b_size: int = option(1, "read under kind=b", when={"kind": "b"})
        bc_size: int = option(1, "read under kind=b or c", when={"kind": ("b", "c")})
        high_c: float = option(0.5, "read under level=high (itself read under kind=c)", when={"level": "high"})
        cap: float | None = option(None, "a limit")
        free: float = option(1.0, "read while cap is not set", when={"cap": None})

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            return PassStats()

    return Moded


def test_an_option_selects_the_one_mode_that_reads_it(scratch_registry) -> None:
    _moded()
    p = make_pass("test_moded", {"b_size": "4"}, from_text=True)
    assert (p.kind, p.b_size) == ("b", 4)
    assert p.option_notes() == ["b_size=4 selected kind=b, the only kind that reads it"]
    chained = make_pass("test_moded", {"high_c": 0.9})  # level=high, which is read only under kind=c
    assert (chained.kind, chained.level, chained.high_c) == ("c", "high", 0.9) and len(chained.option_notes()) == 2
    assert make_pass("test_moded", {"free": 2.0}).option_notes() == []  # cap is not set: free is read as it is
    assert make_pass("test_moded", {"kind": "b", "bc_size": 3}).option_notes() == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "a", "b_size": 4}, "test_moded.b_size is read only when kind=b; you set kind=a"),
        ({"bc_size": 2}, "test_moded.bc_size is read only when kind is b or c; set kind"),
        ({"b_size": 2, "level": "high"}, "test_moded.level is read only when kind=c, but b_size selected kind=b"),
        ({"cap": 3.0, "free": 2.0}, "test_moded.free is read only when cap is not set; you set cap=3.0"),
        ({"kind": "b", "high_c": 0.9}, "test_moded.level is read only when kind=c; you set kind=b"),
    ],
)
def test_an_option_no_chosen_mode_reads_is_refused_in_one_line(scratch_registry, options, message) -> None:
    _moded()
    with pytest.raises(UsageError) as err:
        make_pass("test_moded", options)
    assert str(err.value) == message
    with pytest.raises(UsageError):  # built directly, as a user's script does, the same rules hold
        _moded()(**options)


def test_an_option_at_its_default_beside_an_explicit_mode_is_accepted(scratch_registry) -> None:
    """A full option set (as a report lists every option) can be fed back."""
    moded = _moded()
    full = make_pass("test_moded", {"kind": "a"}).options()
    assert make_pass("test_moded", full).options() == full and moded(**full).options() == full


def test_a_condition_must_name_another_option(scratch_registry) -> None:
    with pytest.raises(TypeError, match="names 'mode', which is not another option"):
        @register_pass("test_bad_when")
        class Bad(Pass):
            size: int = option(1, "a size", when={"mode": "x"})


# Every option of every built-in pass, audited: read whatever the other options say ...
ALWAYS_READ = {
    "fold": {"batchnorm", "constants", "dedup"},
    "prune": {"criterion", "pattern", "exclude", "min_size", "storage", "layers"},
    "channels": {"macs", "importance", "round_to", "min_channels", "exclude", "compensate", "reconstruct",
                 "verify_speed", "layers"},
    "factorize": {"method", "rank_by", "round_to", "min_saving", "data_aware", "verify_speed", "exclude", "layers"},
    "distill": {"ridge", "max_samples", "layers", "holdout", "logits", "teacher"},
    "quantize": {"mode", "exclude", "fold", "check_fusion", "require_speedup", "layers"},
}
# ... or only under a mode: (pass, option, a value, the mode option, a value of it that does not read the option,
# the value the option selects when the mode is not set, or None when the mode's default reads it already).
READ_UNDER_A_MODE = [
    ("fold", "max_fold_mb", 8.0, "constants", False, None),
    ("fold", "eval_seconds", 1.0, "constants", False, None),
    ("fold", "eval_budget", 5.0, "constants", False, None),
    ("prune", "sparsity", 0.7, "threshold", 0.1, None),
    ("prune", "sparsity", 0.7, "pattern", "2:4", None),
    ("prune", "scope", "layer", "threshold", 0.1, None),
    ("prune", "threshold", 0.1, "criterion", "activation", None),
    ("prune", "threshold", 0.1, "pattern", "2:4", None),
    ("channels", "ratio", 0.5, "macs", 0.4, None),
    ("channels", "min_speedup", 0.1, "verify_speed", False, None),
    ("factorize", "rank_ratio", 0.25, "rank_by", "energy", "ratio"),
    ("factorize", "energy", 0.8, "rank_by", "ratio", None),
    ("factorize", "macs_target", 0.3, "rank_by", "energy", "macs"),
    ("factorize", "damping", 0.1, "data_aware", False, True),
    ("factorize", "verify_runs", 5, "verify_speed", False, None),
    ("factorize", "min_speedup", 0.1, "verify_speed", False, None),
    ("distill", "T", 2.0, "logits", False, True),
    ("quantize", "activations", "int8", "mode", "dynamic", None),
    ("quantize", "calibrate", "entropy", "mode", "weight-only", None),
    ("quantize", "percentile", 99.9, "calibrate", "entropy", "percentile"),
    ("quantize", "percentile", 99.9, "mode", "dynamic", None),
    ("quantize", "per_channel", False, "mode", "weight-only", None),
    ("quantize", "dynamic_conv", True, "mode", "static", "dynamic"),
    ("quantize", "concat_range_ratio", 16.0, "mode", "dynamic", None),
    ("quantize", "bits", 8, "mode", "static", "weight-only"),
    ("quantize", "block_size", 64, "mode", "dynamic", "weight-only"),
    ("quantize", "accuracy_level", 0, "mode", "static", "weight-only"),
    ("quantize", "fallback", "none", "mode", "dynamic", None),
    ("quantize", "target_cosine", 0.95, "mode", "dynamic", None),
    ("quantize", "target_argmax", 0.9, "fallback", "none", None),
    ("quantize", "fallback_budget", 10.0, "fallback", "none", None),
    ("quantize", "require_targets", False, "fallback", "none", None),
    ("quantize", "float_nodes", ["conv"], "mode", "dynamic", None),
    ("quantize", "gelu_matmuls", "blockwise", "mode", "static", "dynamic"),
    ("quantize", "smooth_alpha", 0.5, "mode", "dynamic", None),
    ("quantize", "gptq", True, "mode", "dynamic", None),
    ("quantize", "equalize", True, "mode", "weight-only", None),
    ("quantize", "bias_correction", True, "mode", "dynamic", None),
]


def test_every_option_of_every_pass_is_audited() -> None:
    conditional: dict[str, set[str]] = {}
    for name, opt, *_ in READ_UNDER_A_MODE:
        conditional.setdefault(name, set()).add(opt)
    for name in ALWAYS_READ:
        specs = option_specs(get_pass(name))
        assert {s.name for s in specs} == ALWAYS_READ[name] | conditional.get(name, set()), name
        assert {s.name for s in specs if s.when} == conditional.get(name, set()), name


@pytest.mark.parametrize(("name", "opt", "value", "mode", "other", "selects"), READ_UNDER_A_MODE,
                         ids=[f"{c[0]}.{c[1]}-{c[3]}" for c in READ_UNDER_A_MODE])
def test_each_pass_refuses_or_selects_for_an_option_its_mode_does_not_read(name, opt, value, mode, other,
                                                                           selects) -> None:
    with pytest.raises(UsageError) as err:
        make_pass(name, {opt: value, mode: other})
    text = str(err.value)
    assert text.startswith(f"{name}.{opt} is read only when ") and "\n" not in text
    assert f"{mode}=" in text or f"{mode} is" in text
    made = make_pass(name, {opt: value})
    default = next(s.default for s in option_specs(get_pass(name)) if s.name == mode)
    assert getattr(made, mode) == (default if selects is None else selects)
    notes = made.option_notes()
    assert (any(f"selected {mode}=" in n for n in notes)) == (selects is not None), notes


def test_rank_ratio_alone_takes_effect_and_the_pass_says_so(tmp_path: Path, capsys) -> None:
    src = MODELS / "digits_mlp.onnx"
    out = tmp_path / "f.onnx"
    assert main([str(src), "--passes", "factorize", "--set", "factorize.rank_ratio=0.25",
                 "--set", "factorize.min_saving=0", "-o", str(out), "--bench-runs", "0", "--no-validate"]) == 0
    text = capsys.readouterr().out
    assert "rank_ratio=0.25 selected rank_by=ratio" in text and "rank_by=ratio" in text
    assert main([str(src), "--passes", "factorize", "--set", "factorize.rank_ratio=0.25", "--set",
                 "factorize.rank_by=energy", "-o", str(tmp_path / "g.onnx"), "--bench-runs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onnxopt: error: factorize.rank_ratio is read only when rank_by=ratio; you set rank_by=energy"


def test_the_passes_verb_prints_when_an_option_is_read(capsys) -> None:
    assert main(["passes"]) == 0
    assert re.search(r"^\s+rank_ratio \(float, default 0.5\) \[read when rank_by=ratio\]: ",
                     capsys.readouterr().out, re.M)
    assert main(["passes", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    read_when = {o["name"]: o["read_when"] for o in doc["quantize"]["options"]}
    assert read_when["bits"] == "mode=weight-only" and read_when["mode"] is None


def test_a_pass_that_changes_nothing_always_says_why(scratch_registry) -> None:
    @register_pass("test_silent")
    class Silent(Pass):
        declined: bool = option(False, "decline a node")

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            stats = PassStats()
            if self.declined:
                for node in model.graph:
                    stats.skip(node, f"'{node.name}' is not interesting")
            return stats

    model = _relu_model()
    quiet = call_pass(Silent(), model, None)
    assert quiet.notes == ["test_silent: the model is unchanged (the pass found nothing to do)"]
    notes = call_pass(Silent(declined=True), model, None).notes
    assert notes[-1].startswith("test_silent: the model is unchanged: 2 nodes declined (2 like: ")
    assert run_pass("test_silent", model).notes  # run_pass and the pipeline go through call_pass


# ---------------------------------------------------------------------------------------- listing
def test_passes_verb_lists_every_option_of_every_pass(scratch_registry, capsys) -> None:
    _demo()
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    headers = {m.group(1): m.start() for m in re.finditer(r"^(\S+?)(?: \[exact\])?: ", text, re.M)}
    assert set(headers) == set(list_passes())
    starts = sorted(headers.values()) + [len(text)]
    for name, start in headers.items():
        section = text[start:starts[starts.index(start) + 1]]
        listed = re.findall(r"^\s+(\w+) \(", section, re.M)
        assert listed == [s.name for s in option_specs(list_passes()[name])], name


# ---------------------------------------------------------------------------------------- third party
def test_third_party_registration(scratch_registry) -> None:
    with pytest.raises(TypeError, match="must subclass onnxopt.Pass"):
        register_pass("test_bad")(type("NotAPass", (), {}))

    @register_pass("test_already_dataclass")
    @dataclasses.dataclass
    class Declared(Pass):
        """Declared as a dataclass by its author."""

        k: int = 1

        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            return PassStats()

    assert get_pass("test_already_dataclass") is Declared and Declared.name == "test_already_dataclass"
    assert make_pass("test_already_dataclass", {"k": "3"}, from_text=True).k == 3
    assert list(list_passes()) == sorted(list_passes())


def _relu_model() -> ir.Model:
    proto = make_model([helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])],
                       [("x", F32, [2])], [("y", F32, [2])])
    return ir.from_proto(proto)


def test_run_pass_runs_a_registered_pass_by_name_with_python_values() -> None:
    model = _relu_model()
    stats = run_pass("fold", model, None, max_fold_mb=1)  # an int where a float is declared
    assert stats.modified and stats.summary["identity_removed"] == 1
    assert [n.op_type for n in model.graph] == ["Relu"]
    with pytest.raises(UsageError, match="pass 'fold' has no option 'speed'"):
        run_pass("fold", model, speed=2)
    with pytest.raises(UsageError, match="option fold.batchnorm: 'yes please' is not a valid bool"):
        run_pass("fold", model, batchnorm="yes please")


def test_a_pattern_that_matches_no_node_is_said() -> None:
    """A misspelt exclude pattern or layers key would leave the model as if the option were not there."""
    model = _relu_model()
    stats = run_pass("prune", model, None, exclude=["Relu", "NoSuchOp"], layers={"nothing*": {"skip": True}})
    assert "exclude: 'NoSuchOp' matches no node name or op type in the model" in stats.notes
    assert "layers: 'nothing*' matches no node name or op type in the model" in stats.notes
    assert not any("'Relu'" in n for n in stats.notes)


# ---------------------------------------------------------------------------------------- onnx_ir interop
def test_a_pass_runs_inside_an_onnx_ir_pass_manager() -> None:
    model = _relu_model()
    fold = make_pass("fold").as_ir_pass()
    manager = onnx_ir.passes.PassManager([fold, onnx_ir.passes.common.RemoveUnusedNodesPass()], steps=3)
    result = manager(model)
    assert result.model is model and result.modified
    assert fold.stats is not None and not fold.stats.modified  # the last sweep found nothing left to do
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert not make_pass("fold").as_ir_pass()(model).modified


def test_a_users_error_inside_an_onnx_ir_manager_keeps_its_type(scratch_registry) -> None:
    @register_pass("test_needs_calib")
    class NeedsCalib(Pass):
        def call(self, model: ir.Model, ctx: Context | None) -> PassStats:
            (ctx or Context()).require_calib("test_needs_calib")
            return PassStats()

    manager = onnx_ir.passes.PassManager([make_pass("test_needs_calib").as_ir_pass(Context())])
    with pytest.raises(onnx_ir.passes.PassError) as err:
        manager(_relu_model())
    cause = root_cause(err.value)
    assert isinstance(cause, UsageError) and "needs calibration data" in str(cause)
    assert root_cause(cause) is cause


# ---------------------------------------------------------------------------------------- idempotence
def _fixture_models(resnet_tiny: Path) -> list[Path]:
    return [CNN, MODELS / "digits_mlp.onnx", MODELS / "digits_transformer.onnx", resnet_tiny]


def _serialized(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


@pytest.mark.parametrize("name", [n for n, cls in list_passes().items() if cls.idempotent])
def test_every_idempotent_pass_changes_nothing_the_second_time(name: str, resnet_tiny: Path) -> None:
    changed_any = False
    for path in _fixture_models(resnet_tiny):
        model = ir.load(path)
        ctx = Context(calib=load_data("random:4", input_specs(model)))
        first = make_pass(name).call(model, ctx)
        once = _serialized(model)
        second = make_pass(name).call(model, ctx)
        assert not second.modified, (name, path.name, second.summary)
        assert _serialized(model) == once, (name, path.name)
        changed_any |= first.modified
    assert changed_any, f"{name} changed none of the fixtures, so the check proves nothing"


def test_the_idempotence_check_is_not_empty() -> None:
    assert "fold" in {n for n, cls in list_passes().items() if cls.idempotent}


# ---------------------------------------------------------------------------------------- small helpers
def test_matches_any_by_op_type_or_name_glob() -> None:
    node = ir.Node("", "Conv", [], name="backbone/conv1")
    assert matches_any(node, ["Conv"]) and matches_any(node, ["backbone/*"])
    assert not matches_any(node, ["conv*", "Gemm"]) and not matches_any(node, [])


def test_stats_skip_records_the_node_and_reason() -> None:
    stats = PassStats()
    stats.skip(ir.Node("", "Gemm", []), "weight is shared")
    stats.skip("named", "too small")
    assert stats.to_dict()["skipped"] == [{"node": "Gemm", "reason": "weight is shared"},
                                          {"node": "named", "reason": "too small"}]


def test_untimed_options_take_timing_out_of_each_pass_under_its_mode() -> None:
    # The options that let a measurement of the machine decide what a pass writes, at the value that stops
    # it; an option its mode does not read is left out (it would be refused).
    from onnxopt.registry import untimed_options

    assert untimed_options("channels") == {"verify_speed": False}
    assert untimed_options("factorize", {"rank_by": "ratio"}) == {"verify_speed": False}
    assert untimed_options("quantize") == {"fallback": "none", "require_speedup": False}
    assert untimed_options("quantize", {"mode": "dynamic"}) == {"require_speedup": False}
    assert untimed_options("prune") == {} and untimed_options("fold") == {}
    make_pass("quantize", {"mode": "dynamic", **untimed_options("quantize", {"mode": "dynamic"})})
