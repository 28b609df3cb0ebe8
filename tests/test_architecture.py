"""The import rule, read from the source (ast) of every module.

- Passes are leaves: a pass module (``passes/X.py``, or any module of a package ``passes/X/``) imports
  ``onnxopt.*`` but nothing of ``onnxopt.passes`` except its own private helpers and its own
  package's modules. A private helper ``passes/_P.py`` belongs to the pass it is named after
  (``_X*``), else to the one pass whose module imports it; a helper two passes import belongs to
  neither. A private helper of pass X imports only X's other helpers, never X itself (the
  dependency points one way). No pass module imports the CLI, and every public module or package in
  ``passes/`` registers a pass (what is not a pass lives in the frame).
- The frame (``onnxopt/**``) imports ``onnxopt.passes`` only in the registry's loader.

Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME_DIR = ROOT / "onnxopt"
PASSES_DIR = ROOT / "passes"
PASSES = "onnxopt.passes"
LOADER = ("onnxopt.registry", "_load_builtin_passes")



@dataclasses.dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool


@dataclasses.dataclass(frozen=True)
class Import:
    target: str
    function: str | None


def _modules() -> list[Module]:
    found = []
    for base, prefix in ((FRAME_DIR, "onnxopt"), (PASSES_DIR, PASSES)):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found.append(Module(".".join([prefix, *parts]), path, is_package))
    return found


def _imports(module: Module, known: set[str]) -> Iterator[Import]:
    """Every import in `module` (relative ones resolved, ``from pkg import mod`` as ``pkg.mod``),
    with the name of the function it sits in, walked with an explicit stack."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    stack: list[tuple[ast.AST, str | None]] = [(ast.parse(module.path.read_text()), None)]
    while stack:
        node, function = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, function)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(sub if sub in known else base, function)
        stack.extend((child, function) for child in ast.iter_child_nodes(node))


def _pass_names() -> set[str]:
    return {p.stem if p.is_file() else p.name for p in PASSES_DIR.iterdir()
            if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or (p / "__init__.py").is_file())}


def _first(name: str) -> str:
    """The module or package right below ``onnxopt.passes`` that `name` is or lies in."""
    return name[len(PASSES) + 1:].split(".")[0]


def _is_private_helper(name: str) -> bool:
    return _first(name).startswith("_")


def _owners(imports: dict[str, list[Import]], passes: set[str]) -> dict[str, str | None]:
    """The pass each private helper belongs to: the one it is named after, else the only pass whose
    (public or package) modules import it; None for a helper of no pass or of several."""
    importers: dict[str, set[str]] = {}
    for name, imps in imports.items():
        if name.startswith(PASSES + ".") and not _is_private_helper(name):
            for imp in imps:
                importers.setdefault(imp.target, set()).add(_first(name))
    owners: dict[str, str | None] = {}
    for name in imports:
        if name.startswith(PASSES + ".") and _is_private_helper(name):
            named = [p for p in passes if _first(name)[1:].startswith(p)]
            users = importers.get(name, set())
            owners[name] = max(named, key=len) if named else (next(iter(users)) if len(users) == 1 else None)
    return owners


def _offences() -> set[str]:
    modules = _modules()
    known = {m.name for m in modules}
    passes = _pass_names()
    imports = {m.name: list(_imports(m, known)) for m in modules}
    owners = _owners(imports, passes)

    def owner(name: str) -> str | None:
        return owners.get(name) if _is_private_helper(name) else _first(name)

    found: set[str] = set()
    registering: set[str] = set()
    for module in modules:
        in_passes = module.name.startswith(PASSES + ".")
        if in_passes and "register_pass(" in module.path.read_text():
            registering.add(owner(module.name) or "")
        for imp in imports[module.name]:
            target = imp.target
            to_passes = target == PASSES or target.startswith(PASSES + ".")
            if not in_passes:
                if module.name != PASSES and to_passes and (module.name, imp.function) != LOADER:
                    found.add(f"{module.name} -> {target}")
                continue
            if target == "onnxopt.cli" or target.startswith("onnxopt.cli."):
                found.add(f"{module.name} -> {target}")
            if not to_passes:
                continue
            allowed = (
                target != PASSES
                and owner(module.name) is not None
                and owner(target) == owner(module.name)
                and (_is_private_helper(target) or not _is_private_helper(module.name))
            )
            if not allowed:
                found.add(f"{module.name} -> {target}")
    found.update(f"{PASSES}.{name}: registers no pass" for name in sorted(passes - registering))
    return found


def test_passes_are_leaves_and_the_frame_imports_no_pass() -> None:
    found = sorted(_offences())
    assert not found, "import rule broken (see this module's docstring):\n" + "\n".join(found)


def test_the_rule_sees_what_it_must(tmp_path: Path, monkeypatch) -> None:
    """A fabricated tree with one offence of each kind, and allowed imports beside them."""
    frame, leaves = tmp_path / "onnxopt", tmp_path / "passes"
    for folder in (frame, leaves, leaves / "pkg"):
        folder.mkdir()
    files = {
        frame / "__init__.py": "",
        frame / "registry.py": "def _load_builtin_passes():\n    import onnxopt.passes\n",
        frame / "cli.py": "from onnxopt.passes import alpha\n",
        leaves / "__init__.py": "",
        leaves / "alpha.py": "from ._alpha_math import f\nfrom onnxopt.graph import x\nregister_pass('alpha')\n",
        leaves / "_alpha_math.py": "from . import _alpha_util\n\ndef g():\n    from onnxopt.passes import alpha\n",
        leaves / "_alpha_util.py": "",
        leaves / "beta.py": "from onnxopt.passes._alpha_util import h\nfrom .alpha import y\nregister_pass('beta')\n",
        leaves / "gamma.py": "import onnxopt.cli\nfrom ._shared import z\n",
        leaves / "_shared.py": "",
        leaves / "_mine.py": "",
        leaves / "delta.py": "from ._mine import m\nfrom ._shared import z\nregister_pass('delta')\n",
        leaves / "pkg" / "__init__.py": "from .core import run\nregister_pass('pkg')\n",
        leaves / "pkg" / "core.py": "from onnxopt.passes.pkg import run\nimport onnxopt.passes\n",
    }
    for path, text in files.items():
        path.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "FRAME_DIR", frame)
    monkeypatch.setattr(sys.modules[__name__], "PASSES_DIR", leaves)
    assert _offences() == {
        "onnxopt.cli -> onnxopt.passes.alpha",
        "onnxopt.passes._alpha_math -> onnxopt.passes.alpha",
        "onnxopt.passes.beta -> onnxopt.passes._alpha_util",
        "onnxopt.passes.beta -> onnxopt.passes.alpha",
        "onnxopt.passes.gamma -> onnxopt.cli",
        "onnxopt.passes.gamma -> onnxopt.passes._shared",
        "onnxopt.passes.gamma: registers no pass",
        "onnxopt.passes.delta -> onnxopt.passes._shared",
        "onnxopt.passes.pkg.core -> onnxopt.passes",
    }


def test_every_package_is_listed_for_the_wheel() -> None:
    """pyproject lists packages by hand: a package missing there is missing from a wheel install."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for base, prefix in ((FRAME_DIR, "onnxopt"), (PASSES_DIR, PASSES)):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((prefix, *rel)))
    assert found == listed, f"packages on disk but not in pyproject: {sorted(found - listed)}; " \
                            f"listed but not on disk: {sorted(listed - found)}"
