"""Conformance tier: every pass, with default options, on the ONNX wheel's own backend test models.

The models are the ones shipped in the installed ``onnx`` package under ``backend/test/data/{light,
pytorch-converted,pytorch-operator,simple}`` that ONNX Runtime can load and run on onnxopt's default
random feeds (shapes from the model, symbolic dims 1): CNNs of IR version 3 (every weight also a graph
input), single-operator exports of opsets 6-12, string and sequence models. Each pass runs through the
Python API (``calibration random:4`` for the passes that need data) and every run is classified:

- ``ok``: the pass changed the model and the result is valid;
- ``skipped``: the pass changed nothing and said why (a skipped node with a reason, or a note);
- ``user-error``: a `UsageError`/`ModelError` of one line (the CLI's exit 2);
- ``silent``: the pass changed nothing and gave no reason;
- ``crash``: any other exception (the CLI's exit 3);
- ``invalid``: the written model fails the full ONNX checker or strict shape inference, ONNX Runtime
  cannot load or run it, its outputs differ from the original's in name, type or shape, a finite
  output became non-finite, or an exact pass changed an output beyond float rounding.

The tier asserts no crash, no invalid output and no silent run, and that IR-3 weights are compressed
(`pytest -m conformance -s` prints the counts). A job is one model: the original runs once on the check
feeds, then every pass; jobs go to two worker processes through the API (import and session start-up
dominate these small models, so subprocesses would cost more than the work), one ONNX Runtime thread
each. A representative subset also runs through the command line as users call it (default validation
on) and must exit 0, or 2 with one line.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.conformance

SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple")
PASSES = ("fold", "prune", "channels", "factorize", "distill", "quantize")
NEEDS_CALIB = {"distill", "quantize"}
# Whether int8 is faster is a measurement of this machine: the tier classifies what a pass does to a model.
MACHINE_FREE = {"quantize": {"require_speedup": False}}
CALIB = "random:4"
CHECK_FEEDS = "random:2"
# An exact pass may move an output by float rounding: |a - b| <= EXACT_REL * max|a| + EXACT_ABS.
EXACT_REL, EXACT_ABS = 1e-4, 1e-5
CLASSES = ("ok", "skipped", "user-error", "silent", "crash", "invalid")


@dataclasses.dataclass(frozen=True)
class Outcome:
    model: str
    pass_name: str
    kind: str
    detail: str = ""
    seconds: float = 0.0


def backend_root() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data"


def candidate_models() -> list[Path]:
    root = backend_root()
    found = sorted((root / "light").glob("*.onnx"))
    for suite in SUITES[1:]:
        found += sorted((root / suite).glob("*/model.onnx"))
    return found


def model_id(path: Path) -> str:
    rel = path.relative_to(backend_root())
    return str(rel.parent if rel.name == "model.onnx" else rel.with_suffix(""))


# ---------------------------------------------------------------------------- one model (in a worker)
@dataclasses.dataclass
class _Reference:
    """The original model's outputs on the check feeds, computed once per model."""

    feeds: list[dict[str, np.ndarray]]
    names: list[str]
    outputs: list[list[object]]


def _ort_session(path: Path):  # noqa: ANN202 - onnxruntime is imported in the worker
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _reference(path: Path) -> _Reference | None:
    """The original's outputs on onnxopt's default random feeds, or None when ONNX Runtime cannot run it."""
    import onnxopt
    from onnxopt.data import input_specs, load_data

    try:
        feeds = load_data(CHECK_FEEDS, input_specs(onnxopt.load(path, check=False))).feeds
        sess = _ort_session(path)
        return _Reference(feeds, [o.name for o in sess.get_outputs()], [sess.run(None, f) for f in feeds])
    except Exception:
        return None


def _invalid_reason(out: Path, ref: _Reference, exact: bool) -> str | None:
    from onnxopt.validate import check_model_file

    try:
        check_model_file(out)
    except Exception as exc:
        return f"checker: {exc}"
    try:
        sess = _ort_session(out)
    except Exception as exc:
        return f"ONNX Runtime cannot load it: {str(exc).splitlines()[0][:200]}"
    if ref.names != [o.name for o in sess.get_outputs()]:
        return f"outputs renamed: {ref.names} -> {[o.name for o in sess.get_outputs()]}"
    for feed, want in zip(ref.feeds, ref.outputs):
        try:
            got = sess.run(None, feed)
        except Exception as exc:
            return f"ONNX Runtime cannot run it: {str(exc).splitlines()[0][:200]}"
        for name, x, y in zip(ref.names, want, got):
            reason = _output_reason(name, x, y, exact)
            if reason:
                return reason
    return None


def _output_reason(name: str, x: object, y: object, exact: bool) -> str | None:
    if isinstance(x, list) or isinstance(y, list):  # sequence outputs
        if not (isinstance(x, list) and isinstance(y, list)) or len(x) != len(y):
            return f"output '{name}': sequence kind or length changed"
        pairs = list(zip(x, y))
    else:
        pairs = [(x, y)]
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"output '{name}': {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}"
        if not np.issubdtype(a.dtype, np.floating):
            if exact and not np.array_equal(a, b):
                return f"output '{name}' changed"
            continue
        if not np.all(np.isfinite(b[np.isfinite(a)])):
            return f"output '{name}' became non-finite"
        if exact:
            finite = np.isfinite(a)
            scale = float(np.max(np.abs(a[finite]), initial=0.0))
            err = float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))
            if err > EXACT_REL * scale + EXACT_ABS or not np.array_equal(finite, np.isfinite(b)):
                return f"output '{name}' of an exact pass moved by {err:.3g} (scale {scale:.3g})"
    return None


def _classify(path: Path, pass_name: str, ref: _Reference) -> Outcome:
    """Run one pass on one model through the API and classify the run."""
    import onnxopt
    from onnxopt.errors import OnnxoptError
    from onnxopt.registry import get_pass

    name = model_id(path)
    calib = CALIB if pass_name in NEEDS_CALIB else None
    with tempfile.TemporaryDirectory(prefix="onnxopt-conf-") as tmp:
        out = Path(tmp) / "out.onnx"
        try:
            spec = (pass_name, MACHINE_FREE.get(pass_name, {}))
            res = onnxopt.optimize(path, [spec], calib=calib, validate=False, output=out, threads=1)
            res.save(out)
        except OnnxoptError as exc:
            text = str(exc)
            if "\n" in text or not text:
                return Outcome(name, pass_name, "crash", f"user error not one line: {text!r}")
            return Outcome(name, pass_name, "user-error", text)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            return Outcome(name, pass_name, "crash",
                           f"{type(exc).__name__}: {text} ({Path(where.filename).name}:{where.lineno})")
        reason = _invalid_reason(out, ref, get_pass(pass_name).exact)
        if reason:
            return Outcome(name, pass_name, "invalid", reason)
        stats = res.passes[-1].stats
        if stats.modified:
            return Outcome(name, pass_name, "ok")
        if stats.notes or any(s.get("reason") for s in stats.skipped):
            why = stats.notes[-1] if stats.notes else stats.skipped[0]["reason"]
            return Outcome(name, pass_name, "skipped", why)
        return Outcome(name, pass_name, "silent")


def run_model(path_text: str, passes: tuple[str, ...] = PASSES) -> list[Outcome]:
    """Every pass on one model (CPU seconds each); [] when ONNX Runtime cannot run the original."""
    path = Path(path_text)
    ref = _reference(path)
    if ref is None:
        return []
    outcomes = []
    for pass_name in passes:
        start = time.process_time()
        outcome = _classify(path, pass_name, ref)
        outcomes.append(dataclasses.replace(outcome, seconds=time.process_time() - start))
    return outcomes


def _worker_init() -> None:
    os.environ["ONNXOPT_NO_PROGRESS"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def sweep(paths: list[Path], passes: tuple[str, ...] = PASSES, workers: int | None = None) -> list[Outcome]:
    """Every pass on every model ONNX Runtime can run, one model per job over worker processes (the
    largest files first, so the long jobs do not come last); results in the order of `paths`."""
    workers = workers or min(2, os.cpu_count() or 1)
    order = sorted(range(len(paths)), key=lambda i: -paths[i].stat().st_size)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        jobs = {i: pool.submit(run_model, str(paths[i]), passes) for i in order}
        return [o for i in range(len(paths)) for o in jobs[i].result()]


def summarize(outcomes: list[Outcome]) -> str:
    counts = collections.Counter(o.kind for o in outcomes)
    lines = ["conformance: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in CLASSES)]
    for name in PASSES:
        per = collections.Counter(o.kind for o in outcomes if o.pass_name == name)
        lines.append(f"  {name:10s} " + ", ".join(f"{k} {per[k]}" for k in CLASSES if per[k]))
    for o in outcomes:
        if o.kind in ("crash", "invalid", "silent"):
            lines.append(f"  {o.kind}: {o.model} {o.pass_name}: {o.detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the tier
@pytest.fixture(scope="module")
def outcomes() -> list[Outcome]:
    return sweep(candidate_models())


def test_backend_models_are_found(outcomes: list[Outcome]) -> None:
    models = {o.model for o in outcomes}
    assert len(models) >= 90, f"only {len(models)} backend models that ONNX Runtime runs were found"


def test_no_crash_no_invalid_output(outcomes: list[Outcome]) -> None:
    report = summarize(outcomes)
    print(report)
    bad = [o for o in outcomes if o.kind in ("crash", "invalid", "silent")]
    assert not bad, report


def test_compression_passes_compress_ir3_weights(outcomes: list[Outcome]) -> None:
    """IR-3 weights (every one listed as a graph input) are constants: prune and quantize change every
    convolution export, none declines with "not a constant initializer"."""
    convs = {o.model for o in outcomes if o.model.startswith("pytorch-converted/test_Conv")}
    assert len(convs) >= 20
    for name in ("prune", "quantize"):
        done = {o.model for o in outcomes if o.pass_name == name and o.kind == "ok"}
        assert convs <= done, (name, sorted(convs - done))
    assert not [o for o in outcomes if "not a constant initializer" in o.detail and o.model in convs]


CLI_CASES = [  # (model, passes, options): IR-3 CNNs, an implied mode, a sequence model, string outputs
    ("light/light_squeezenet.onnx", "fold,quantize", []),
    ("light/light_inception_v2.onnx", "prune", ["--set", "prune.sparsity=0.5"]),
    ("pytorch-converted/test_ConvTranspose2d/model.onnx", "channels,distill", []),
    ("pytorch-converted/test_Linear_no_bias/model.onnx", "factorize", ["--set", "factorize.rank_ratio=0.5"]),
    ("simple/test_sequence_model1/model.onnx", "fold,quantize", []),
    ("simple/test_strnorm_model_nostopwords_nochangecase/model.onnx", "fold,prune", []),
]


@pytest.mark.parametrize(("rel", "passes", "extra"), CLI_CASES, ids=[c[0].split("/")[-2 if c[0].endswith("model.onnx")
                                                                                        else -1] for c in CLI_CASES])
def test_cli_on_backend_models(rel: str, passes: str, extra: list[str], tmp_path: Path) -> None:
    src = backend_root() / rel
    if not src.is_file():
        pytest.skip(f"{rel} is not in this onnx wheel")
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "onnxopt", str(src), "--passes", passes, "-o", str(out), "--bench-runs", "0",
           "--calib", CALIB, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ONNXOPT_NO_PROGRESS": "1"})
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()
        return
    assert out.is_file()
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
