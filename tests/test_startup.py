"""Start-up: ``import onnxopt``, ``onnxopt --version`` and ``--help`` import no pass and no runtime;
the lazily imported public API resolves every name it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import onnxopt

HEAVY = ("onnxruntime", "onnx", "onnx_ir", "numpy")
PUBLIC = {
    "__version__", "optimize", "merge", "merge_models", "Result", "Context", "load", "save", "Pipeline", "Pass",
    "PassStats", "option", "register_pass", "list_passes", "UsageError", "ModelError", "OnnxoptError",
}


def _fresh(code: str) -> tuple[str, set[str]]:
    """Stdout of `code` run in a new interpreter, and the modules it had imported by the end."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    *out, modules = r.stdout.rstrip("\n").split("\n")
    return "\n".join(out), set(json.loads(modules))


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith("onnxopt.passes"))


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_import_no_pass_and_no_runtime(argv: list[str]) -> None:
    out, modules = _fresh(f"from onnxopt.cli import main\ncode = main({argv!r})\nassert code == 0, code")
    assert _heavy(modules) == []
    if argv == ["--version"]:
        assert out == f"onnxopt {onnxopt.__version__}"
    else:
        assert "--passes" in out and all(verb in out for verb in ("inspect", "bench", "compare", "passes", "merge"))


def test_import_onnxopt_is_light_until_a_name_is_used() -> None:
    _, modules = _fresh("import onnxopt")
    assert _heavy(modules) == []
    _, modules = _fresh("import onnxopt\nonnxopt.load")
    assert "onnx_ir" in modules and "onnxruntime" not in modules


def test_every_public_name_resolves() -> None:
    assert PUBLIC <= set(onnxopt.__all__)
    for name in onnxopt.__all__:
        assert getattr(onnxopt, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from onnxopt import *", namespace)
    assert set(onnxopt.__all__) <= set(namespace)
    assert set(onnxopt.__all__) <= set(dir(onnxopt))
    assert issubclass(onnxopt.UsageError, onnxopt.OnnxoptError) and issubclass(onnxopt.ModelError, Exception)
    assert callable(onnxopt.merge) and onnxopt.merge_models is onnxopt.merge.merge_models
    assert onnxopt.io.load is onnxopt.load  # submodules resolve too
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        onnxopt.nope  # noqa: B018


def test_merge_stays_callable_whichever_import_comes_first() -> None:
    out, _ = _fresh("import onnxopt.merge.verb\nimport onnxopt\nfrom onnxopt import merge\n"
                    "print(callable(onnxopt.merge), merge is onnxopt.merge)")
    assert out == "True True"


def test_python_m_onnxopt() -> None:
    r = subprocess.run([sys.executable, "-m", "onnxopt", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"onnxopt {onnxopt.__version__}\n", r.stderr
