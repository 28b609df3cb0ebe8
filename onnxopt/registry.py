"""Passes, their declared options, and the registry that names them.

A pass is a class with typed keyword-only options and one ``call(model, ctx) -> PassStats``.
Options are dataclass fields declared with `option(default, doc)`; the registry reads their
annotations to coerce command-line strings (``--set prune.sparsity=0.7``) and recipe values, and to
print ``onnxopt passes``. A third party registers its own pass the same way::

    @register_pass("scale")
    class Scale(Pass):
        "Multiply every float weight by a factor."
        factor: float = option(1.0, "the factor")

        def call(self, model, ctx):
            ...
            return PassStats(modified=True)

An option that only one mode of its pass reads says so: ``option(0.5, "...", when={"rank_by": "ratio"})``.
Setting it explicitly then either selects that mode (when the mode was not set and exactly one value of it
reads the option; the pass's notes say so) or is refused with a one-line UsageError naming what reads it,
so no option is ever silently ignored (see `resolve_options`).

Passes interoperate with ``onnx_ir.passes``: `Pass.as_ir_pass` wraps one as an in-place onnx_ir
pass (for a ``PassManager``), and `onnxopt.pipeline.Pipeline` runs onnx_ir pass instances as steps.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import json
import logging
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import onnx_ir as ir
import onnx_ir.passes

from onnxopt.errors import UsageError
from onnxopt.graph import iter_graphs

if TYPE_CHECKING:
    from onnxopt.context import Context

__all__ = [
    "Pass",
    "PassStats",
    "IRPass",
    "root_cause",
    "OptionSpec",
    "option",
    "register_pass",
    "get_pass",
    "list_passes",
    "make_pass",
    "run_pass",
    "option_specs",
    "untimed_options",
    "resolve_options",
    "call_pass",
    "matches_any",
    "LAYERS",
    "SKIP",
    "layers_option",
    "layer_keys",
    "coerce_layers",
    "layer_settings",
    "exclude_patterns",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Pass]] = {}
P = TypeVar("P", bound="type[Pass]")


Condition = tuple[tuple[str, tuple[Any, ...]], ...]
"""(option name, the values of it under which an option is read), all of which must hold."""


_NO_VALUE = object()


def option(default: Any, doc: str, *, when: Mapping[str, Any] | None = None, untimed: Any = _NO_VALUE) -> Any:
    """Declare a pass option with its default and one line of documentation.

    `when` names the mode the option is read under: ``{"rank_by": "ratio"}``, several values as a tuple
    (``{"mode": ("static", "dynamic")}``), ``None`` for "while that option is not set", and several keys
    when all must hold. `untimed` is the value under which the option no longer lets a measurement of this
    machine (a timing, a time budget) decide what the pass writes (`untimed_options`).
    """
    meta = {"doc": doc, "when": _condition(when)}
    if untimed is not _NO_VALUE:
        meta["untimed"] = untimed
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _condition(when: Mapping[str, Any] | None) -> Condition:
    if not when:
        return ()
    return tuple((key, tuple(v) if isinstance(v, (tuple, list, set, frozenset)) else (v,)) for key, v in when.items())


@dataclasses.dataclass
class PassStats:
    """What a pass changed, as data: the pipeline puts it in the report.

    ``summary`` holds headline numbers, ``layers`` one row per rewritten layer, ``skipped`` the
    nodes a pass declined with the reason, ``notes`` sentences the user should read.
    """

    modified: bool = False
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def skip(self, node: ir.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else (node.name or node.op_type)
        logger.debug("skip %s: %s", name, reason)
        self.skipped.append({"node": name, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Pass:
    """Base of every pass. Subclasses declare options with `option` and implement `call`.

    ``call(model, ctx)`` changes `model` in place and returns `PassStats` whose ``modified`` is
    honest (False when nothing changed: fixed-point loops and the activation cache rely on it).
    `ctx` is the pipeline's `onnxopt.context.Context`, or None when a pass runs on its own.

    Activations come from ``ctx.activations(model, names)``, which keeps one ONNX Runtime session
    per model state and reuses it across calls and passes. The pipeline marks the model changed
    after every pass that reports ``modified``; a pass that changes the model and then taps it again
    in the same `call` says so first with ``ctx.model_changed(model)`` (the context also notices
    rewired nodes and replaced weights on its own, but not an array changed in place).

    Class attributes: ``exact`` claims outputs are preserved to float rounding (tested against ORT);
    ``idempotent`` claims a second run with the same options reports ``modified=False`` and leaves
    the model byte-identical (tests/test_registry.py runs every such pass twice to check it);
    ``speed`` says the pass exists to make the model faster, so the pipeline times the model after it
    and warns when the result is slower than the original (`onnxopt.latency`).
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    idempotent: ClassVar[bool] = False
    speed: ClassVar[bool] = False

    def call(self, model: ir.Model, ctx: Context | None) -> PassStats:  # pragma: no cover - abstract
        raise NotImplementedError

    def as_ir_pass(self, ctx: Context | None = None) -> IRPass:
        """This pass as an in-place ``onnx_ir.passes`` pass, for an ``onnx_ir.passes.PassManager``."""
        return IRPass(self, ctx)

    def option_notes(self) -> list[str]:
        """What the options implied when the pass was made (a mode an explicit option selected)."""
        return list(getattr(self, "_option_notes", ()))

    def options(self) -> dict[str, Any]:
        """The option values (none for a pass class that was never registered, so not a dataclass)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


class IRPass(onnx_ir.passes.InPlacePass):
    """An onnxopt `Pass` run as an in-place onnx_ir pass: ``PassResult.modified`` is the stats'
    ``modified``, `stats` keeps what the last run returned, and a run that modified the model marks
    it changed in `ctx` (as the pipeline does between passes)."""

    def __init__(self, inner: Pass, ctx: Context | None = None) -> None:
        self.inner = inner
        self.ctx = ctx
        self.stats: PassStats | None = None

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        self.stats = call_pass(self.inner, model, self.ctx)
        if self.stats.modified and self.ctx is not None:
            self.ctx.model_changed(model)
        return onnx_ir.passes.PassResult(model, self.stats.modified)

    def __repr__(self) -> str:
        return f"IRPass({type(self.inner).name or type(self.inner).__name__})"


def root_cause(exc: BaseException) -> BaseException:
    """The error an onnx_ir pass manager wrapped (``PassError`` and invariant errors chain it as
    their cause), so a user's error keeps its type and one-line message."""
    wrappers = (onnx_ir.passes.PassError, onnx_ir.passes.InvariantError)
    while isinstance(exc, wrappers) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def call_pass(step: Pass, model: ir.Model, ctx: Context | None) -> PassStats:
    """``step.call(model, ctx)`` with the notes its options implied added to the stats (a pass that
    returns None returns empty stats). A pass that changed nothing always says why: when it left no
    note, one is written from its skipped nodes (or says it gave no reason)."""
    unmatched = _unmatched_patterns(step, model)
    stats = step.call(model, ctx)
    if stats is None:
        stats = PassStats()
    if isinstance(stats, PassStats):
        if not stats.modified and not stats.notes:
            stats.notes.append(_why_unchanged(type(step).name or type(step).__name__, stats.skipped))
        stats.notes[:0] = step.option_notes() + unmatched
    return stats


def _unmatched_patterns(step: Pass, model: ir.Model) -> list[str]:
    """A note for each ``exclude`` pattern and ``layers`` key that matches no node of the model as given: a
    misspelt name or op type would otherwise leave the model as if the option were not there."""
    patterns = {"exclude": list(getattr(step, "exclude", None) or [])}
    if layer_keys(type(step)) is not None:
        patterns["layers"] = list(getattr(step, LAYERS, None) or {})
    if not any(patterns.values()):
        return []
    nodes = [n for graph in iter_graphs(model.graph) for n in graph]
    exact = {n.name for n in nodes if n.name} | {n.op_type for n in nodes}

    def matches(pattern: str) -> bool:  # a plain name or op type by lookup: tune lists hundreds of layer names
        if not any(c in pattern for c in "*?["):
            return pattern in exact
        return any(matches_any(n, (pattern,)) for n in nodes)

    return [f"{option}: '{pattern}' matches no node name or op type in the model"
            for option, listed in patterns.items() for pattern in listed if not matches(pattern)]


def _why_unchanged(name: str, skipped: list[dict[str, str]]) -> str:
    if not skipped:
        return f"{name}: the model is unchanged (the pass found nothing to do)"
    kinds: dict[str, list[str]] = {}  # reasons that differ only in the names they quote are one kind
    for row in skipped:
        kinds.setdefault(re.sub(r"'[^']*'", "'…'", row["reason"]), []).append(row["reason"])
    common = max(kinds.values(), key=len)
    return (f"{name}: the model is unchanged: {len(skipped)} node{'s' if len(skipped) != 1 else ''} declined "
            f"({len(common)} like: {common[0]}; every reason is in the report)")


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    name: str
    type: Any
    default: Any
    doc: str
    when: Condition = ()
    untimed: Any = _NO_VALUE

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    @property
    def condition(self) -> str:
        """When the option is read, in words ("" when always)."""
        return _condition_text(self.when)

    @property
    def choices(self) -> tuple[Any, ...] | None:
        base = _strip_optional(self.type)
        if typing.get_origin(base) is Literal:
            return typing.get_args(base)
        return None


def register_pass(name: str) -> Callable[[P], P]:
    """Class decorator: make `cls` a dataclass of keyword-only options and register it."""

    def deco(cls: P) -> P:
        if not issubclass(cls, Pass):
            raise TypeError(f"{cls.__name__} must subclass onnxopt.Pass")
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(kw_only=True)(cls)  # type: ignore[assignment]
        cls.name = name
        _check_conditions(cls)
        _resolve_on_init(cls)
        _REGISTRY[name] = cls
        return cls

    return deco


def list_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown pass '{name}' (known passes: {known})") from None


def _load_builtin_passes() -> None:
    import onnxopt.passes  # noqa: F401  (registers the built-in passes)


def option_specs(cls: type[Pass]) -> list[OptionSpec]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        specs.append(OptionSpec(f.name, hints.get(f.name, str), default, f.metadata.get("doc", ""),
                                f.metadata.get("when", ()), f.metadata.get("untimed", _NO_VALUE)))
    return specs


def untimed_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The option values that make pass `name` write the same model whatever the machine's load: each option
    declared with ``untimed=`` whose mode holds under `options` (the rest at their defaults). What a caller
    that times whole candidates itself, or must rebuild a model exactly from a recipe, adds to the options."""
    specs = option_specs(get_pass(name))
    values = {s.name: s.default for s in specs} | dict(options or {})
    return {s.name: s.untimed for s in specs if s.untimed is not _NO_VALUE
            and all(_holds(values.get(mode), allowed) for mode, allowed in s.when)}


# ---------------------------------------------------------------- options read under a mode
def _check_conditions(cls: type[Pass]) -> None:
    """A `when` may only name options of the same pass."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for f in fields.values():
        for key, _ in f.metadata.get("when", ()):
            if key not in fields or key == f.name:
                raise TypeError(f"{cls.__name__}.{f.name}: when= names '{key}', which is not another option")


def _resolve_on_init(cls: type[Pass]) -> None:
    """Make the class resolve its options' conditions whenever it is built (by name or directly)."""
    init = cls.__init__
    if getattr(init, "_resolves_options", False):
        return

    @functools.wraps(init)
    def __init__(self: Pass, *args: Any, **kwargs: Any) -> None:
        resolved, notes = resolve_options(type(self), kwargs)
        init(self, *args, **resolved)
        self._option_notes = notes  # type: ignore[attr-defined]

    __init__._resolves_options = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


def resolve_options(cls: type[Pass], given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options of `cls` given explicitly, with the modes they select, and notes saying so.

    An explicit option declared ``when={"rank_by": "ratio"}`` whose mode does not hold:
    - the mode was set explicitly: UsageError (unless the option was given at its default, as a full
      option set copied from a report gives every option);
    - the mode was not set and exactly one value of it reads the option: that value is selected (and
      its own conditions apply in turn); a note says so;
    - else: UsageError naming what reads the option.
    """
    specs = {s.name: s for s in option_specs(cls)}
    values = {name: given.get(name, spec.default) for name, spec in specs.items()}
    implied: dict[str, str] = {}  # mode -> the option that selected it
    notes: list[str] = []
    queue = [k for k in given if k in specs]
    while queue:
        key = queue.pop(0)
        spec = specs[key]
        for mode, allowed in spec.when:
            if _holds(values[mode], allowed):
                continue
            where = f"{cls.name or cls.__name__}.{key}"
            if mode in given:
                if key in given and _same(given[key], spec.default):
                    continue
                raise UsageError(f"{where} is read only when {_condition_text(spec.when)}; "
                                 f"you set {mode}={_show(values[mode])}")
            if mode in implied:
                raise UsageError(f"{where} is read only when {_condition_text(((mode, allowed),))}, but "
                                 f"{implied[mode]} selected {mode}={_show(values[mode])}")
            if len(allowed) != 1:
                raise UsageError(f"{where} is read only when {_condition_text(spec.when)}; set {mode}")
            values[mode] = allowed[0]
            implied[mode] = key
            notes.append(f"{key}={_show(values[key])} selected {mode}={_show(allowed[0])}, "
                         f"the only {mode} that reads it")
            queue.append(mode)
    resolved = dict(given)
    resolved.update({mode: values[mode] for mode in implied})
    return resolved, notes


def _holds(value: Any, allowed: tuple[Any, ...]) -> bool:
    return any(_same(value, a) for a in allowed)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


def _condition_text(when: Condition) -> str:
    parts = []
    for key, allowed in when:
        if allowed == (None,):
            parts.append(f"{key} is not set")
        elif len(allowed) == 1:
            parts.append(f"{key}={_show(allowed[0])}")
        else:
            parts.append(f"{key} is " + " or ".join(_show(a) for a in allowed))
    return " and ".join(parts)


def make_pass(name: str, options: dict[str, Any] | None = None, *, from_text: bool = False) -> Pass:
    """Instantiate pass `name` with `options`, coerced by the declared annotations."""
    cls = get_pass(name)
    specs = {s.name: s for s in option_specs(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in (options or {}).items():
        if key not in specs:
            allowed = ", ".join(specs) or "none"
            raise UsageError(f"pass '{name}' has no option '{key}' (options: {allowed})")
        spec = specs[key]
        kwargs[key] = (coerce_layers(cls, raw, from_text=from_text) if key == LAYERS and layer_keys(cls) is not None
                       else coerce(raw, spec.type, f"{name}.{key}", from_text=from_text))
    try:
        return _checked_layers(cls(**kwargs), kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass '{name}': {exc}") from None


def run_pass(name: str, model: ir.Model, ctx: Context | None = None, **options: Any) -> PassStats:
    """Run registered pass `name` on `model` in place: how one pass uses another (a pass module
    never imports another pass)."""
    return call_pass(make_pass(name, options), model, ctx)


# ---------------------------------------------------------------- coercion of option values
def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list[{_type_name(args[0]) if args else 'str'}]"
    return getattr(tp, "__name__", str(tp))


def coerce(raw: Any, tp: Any, where: str, *, from_text: bool = False) -> Any:
    """Turn `raw` into a value of annotation `tp`, or raise a UsageError naming `where`."""
    try:
        return _coerce(raw, tp, from_text)
    except (ValueError, TypeError):
        shown = raw if isinstance(raw, str) else repr(raw)
        raise UsageError(f"option {where}: '{shown}' is not a valid {_type_name(tp)}") from None


def _coerce(raw: Any, tp: Any, text: bool) -> Any:
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (raw is None or (text and str(raw).lower() in ("none", "null", ""))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(raw, arg, text)
            except (ValueError, TypeError):
                continue
        raise ValueError(raw)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        raise ValueError(raw)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else str
        if isinstance(raw, str):
            text_list = raw.strip()
            if len(text_list) >= 2 and text_list[0] == "[" and text_list[-1] == "]":
                text_list = text_list[1:-1]  # written as a list, [a, b] or ["a", "b"]: the items, unquoted
                parts: Iterable[Any] = [p.strip().strip("\"'") for p in text_list.split(",") if p.strip()]
            else:
                parts = [p.strip() for p in raw.split(",") if p.strip()]
        elif isinstance(raw, (list, tuple)):
            parts = raw
        else:
            raise TypeError(raw)
        values = [_coerce(p, item, text or isinstance(p, str)) for p in parts]
        return values if origin is list else tuple(values)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        raise ValueError(raw)
    if tp is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            return int(raw.strip())
        raise TypeError(raw)
    if tp is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
        raise TypeError(raw)
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise TypeError(raw)
    raise TypeError(f"unsupported option type {tp}")


def matches_any(node: ir.Node, patterns: Iterable[str]) -> bool:
    """True when a node's name matches a glob, or its op type equals a pattern, in `patterns`."""
    name = node.name or ""
    for pat in patterns:
        if pat == node.op_type or fnmatch.fnmatchcase(name, pat):
            return True
    return False


# ---------------------------------------------------------------- per-layer settings
LAYERS = "layers"
"""The option a pass declares with `layers_option` to take settings per layer."""
SKIP = "skip"
"""The per-layer key every ``layers`` option accepts: ``skip = true`` leaves matching nodes alone."""


def layers_option(*keys: str) -> Any:
    """Declare a pass's ``layers`` option: ``{node glob or op type: {key: value}}`` for the options `keys`
    (and ``skip``), so a recipe can set them per layer (TOML: a ``[passes.layers]`` table after the pass).

    Entries apply in order and later ones win, so ``{"*": {"skip": true}, "conv3": {"skip": false}}``
    touches conv3 alone. Values are checked like the pass-wide ones (`make_pass`); a pass reads the values
    for its nodes with `layer_settings` and its exclusions with `exclude_patterns`.
    """
    allowed = ", ".join((*keys, SKIP))
    doc = f"per-layer settings {{node glob or op type: {{{allowed}}}}}; later entries win, skip=true leaves it alone"
    return dataclasses.field(default_factory=dict, metadata={"doc": doc, "layer_keys": tuple(keys)})


def layer_keys(cls: type[Pass]) -> tuple[str, ...] | None:
    """The options pass `cls` takes per layer, or None when it declares no `layers_option`."""
    if not dataclasses.is_dataclass(cls):
        return None
    for f in dataclasses.fields(cls):
        if f.name == LAYERS and "layer_keys" in f.metadata:
            return tuple(f.metadata["layer_keys"])
    return None


def coerce_layers(cls: type[Pass], raw: Any, *, from_text: bool = False) -> dict[str, dict[str, Any]]:
    """The ``layers`` value `raw` of pass `cls` (a mapping, or JSON text from ``--set``) with every value
    coerced by its option's annotation; UsageError naming the entry otherwise."""
    where = f"option {cls.name}.{LAYERS}"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise UsageError(f"{where}: write it as JSON, e.g. {{\"conv1\": {{\"skip\": true}}}}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a table of node globs to settings, got {type(raw).__name__}")
    keys = layer_keys(cls) or ()
    types_ = {s.name: s.type for s in option_specs(cls)}
    out: dict[str, dict[str, Any]] = {}
    for pattern, settings in raw.items():
        if not isinstance(settings, dict):
            raise UsageError(f"{where}: '{pattern}' needs a table of settings, got {settings!r}")
        entry = {}
        for key, value in settings.items():
            if key != SKIP and key not in keys:
                raise UsageError(f"{where}: '{key}' cannot be set per layer (per-layer keys: "
                                 f"{', '.join((*keys, SKIP))})")
            tp = bool if key == SKIP else types_[key]
            entry[key] = coerce(value, tp, f"{cls.name}.{LAYERS}.{pattern}.{key}",
                                from_text=from_text or isinstance(value, str))
        out[str(pattern)] = entry
    return out


def _checked_layers(p: Pass, kwargs: dict[str, Any]) -> Pass:
    """`p`, once every ``layers`` entry has passed the checks the pass makes of its own options."""
    entries = kwargs.get(LAYERS) if layer_keys(type(p)) is not None else None
    for pattern, settings in (entries or {}).items():
        values = {k: v for k, v in settings.items() if k != SKIP}
        if values:
            try:
                type(p)(**{**kwargs, **values, LAYERS: {}})
            except (UsageError, TypeError, ValueError) as exc:
                raise UsageError(f"pass '{type(p).name}' {LAYERS} '{pattern}': {exc}") from None
    return p


def layer_settings(p: Pass, *nodes: ir.Node) -> dict[str, Any]:
    """The per-layer options of pass `p` for the layer made of `nodes`: the pass-wide values, then every
    ``layers`` entry whose glob matches one of the nodes (name glob or op type), in order; with ``skip``."""
    keys = layer_keys(type(p))
    out: dict[str, Any] = {k: getattr(p, k) for k in keys or ()}
    out[SKIP] = False
    entries = getattr(p, LAYERS, None) if keys is not None else None
    for pattern, settings in (entries or {}).items():
        if any(matches_any(node, (pattern,)) for node in nodes):
            out.update(settings)
    return out


def exclude_patterns(p: Pass, model: ir.Model) -> list[str]:
    """The pass's ``exclude`` patterns plus the escaped names of the nodes its ``layers`` entries skip: what a
    pass with an ``exclude`` option hands its helpers so that ``skip = true`` works like ``exclude``."""
    patterns = list(getattr(p, "exclude", None) or [])
    if not getattr(p, LAYERS, None) or layer_keys(type(p)) is None:
        return patterns
    for graph in iter_graphs(model.graph):
        for node in graph:
            if node.name and layer_settings(p, node)[SKIP]:
                patterns.append(glob.escape(node.name))
    return patterns
