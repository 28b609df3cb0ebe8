"""onnxopt tune end to end on the digits CNN: the chosen model and its recipe, never worse than nothing,
worker processes, resumable studies. Budgets are tiny (objective size or MACs, few layers and trials)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx_ir as ir
import optuna
import pytest
from helpers import MODELS, ROOT

import onnxopt
from onnxopt.cli import main as cli
from onnxopt.data import input_specs, load_data
from onnxopt.errors import UsageError
from onnxopt.tune.constraint import Constraint
from onnxopt.tune.study import open_study, record_trials
from onnxopt.tune.workers import Job, PoolExecutor

CNN = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
EVAL = MODELS / "digits_eval.npz"
QUICK = ["--objective", "size", "--passes", "quantize", "--max-layers", "3", "--bench-runs", "0"]
"""A small search whose first trial (quantize every layer) holds a 1-point drop at a third of the size."""


def _tune(tmp: Path, *extra: str, out: str = "t.onnx") -> tuple[int, Path]:
    report = tmp / "report.json"
    code = cli(["tune", str(CNN), "--calib", str(CALIB), "--data", str(EVAL), "-o", str(tmp / out),
                "--report", str(report), *extra])
    return code, report


def _study_trials(db: Path) -> list[optuna.trial.FrozenTrial]:
    names = optuna.study.get_all_study_names(f"sqlite:///{db}")
    assert len(names) == 1
    return optuna.load_study(study_name=names[0], storage=f"sqlite:///{db}").get_trials()


def test_tune_chooses_a_model_whose_recipe_reproduces_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, report_path = _tune(tmp_path, "--max-drop", "1", "--budget-trials", "3", *QUICK)
    out = capsys.readouterr().out
    assert code == 0, out
    model, recipe = tmp_path / "t.onnx", tmp_path / "t.recipe.toml"
    assert model.is_file() and recipe.is_file()
    assert "Pareto front" in out and "finalists on held-out data" in out and f"wrote {model}" in out
    report = json.loads(report_path.read_text())
    for key in ("sensitivity", "trials", "pareto", "finalists", "chosen", "data", "study", "result"):
        assert key in report
    assert report["verdict"] == "chosen" and report["chosen"]["holds"] and report["chosen"]["objective"] < 0.5
    assert report["sensitivity"]["rows"] and all("error" in r for r in report["sensitivity"]["rows"])
    assert report["data"]["held_out_samples"] + report["data"]["search_samples"] == 360
    assert report["result"]["validation"]["accuracy_b"] is not None
    # the recipe through the optimize command line gives the same file
    again = tmp_path / "again.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxopt", str(CNN), "--recipe", str(recipe), "--calib", str(CALIB),
                           "-o", str(again), "--bench-runs", "0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert again.read_bytes() == model.read_bytes()
    assert f"--recipe {recipe}" in recipe.read_text()  # the reproducing command is written in the recipe


def test_nothing_qualifies_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, report_path = _tune(tmp_path, "--tolerance", "1e-5", "--metric", "rel_l2", "--budget-trials", "2", *QUICK)
    err = capsys.readouterr().err
    assert code == 1
    assert "nothing qualifies" in err and "nothing written" in err
    assert "every action alone breaks the constraint" in err and "int8 on" in err  # the gentlest, with its error
    assert not (tmp_path / "t.onnx").exists() and not (tmp_path / "t.recipe.toml").exists()
    assert json.loads(report_path.read_text())["verdict"] == "nothing qualifies"


def test_finalists_that_break_the_constraint_or_are_not_better_are_not_chosen() -> None:
    from onnxopt.tune.choose import choose
    from onnxopt.tune.result import Finalist

    broken = Finalist(3, [["fold", {}]], 0.5, 0.5, 0.4, None, 2.5, 0.1, holds=False, beats=True)
    slower = Finalist(4, [["fold", {}]], 0.9, 0.2, 1.01, None, 0.2, 0.01, holds=True, beats=False)
    notes: list[str] = []
    assert choose([broken, slower], CNN, None, None, Constraint("accuracy", 1.0), "latency", None, {}, None,
                   None, 0, notes) == (None, None)


def test_two_workers_an_interrupt_and_a_resumed_study(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two worker processes on an SQLite study, killed while trials run (workers included); the next run
    marks the trials left running failed, reads the sensitivity table back and continues the count."""
    db = tmp_path / "study.db"
    args = ["--max-drop", "1", "--storage", f"sqlite:///{db}", *QUICK, "--passes", "quantize,channels",
            "--objective", "macs", "--workers", "2"]
    command = [sys.executable, "-m", "onnxopt", "tune", str(CNN), "--calib", str(CALIB), "--data", str(EVAL),
               "-o", str(tmp_path / "t.onnx"), *args, "--budget-trials", "200"]
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # until three trials are counted and both workers have finished one (which takes them depends on timing)
        while time.monotonic() < deadline and not (_counted_while_running(db) >= 3 and _worker_pids(db) >= 2):
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _counted(db)
    assert done >= 3
    code, report_path = _tune(tmp_path, *args, "--budget-trials", str(_counted_after_reopen(db) + 2))
    assert code in (0, 1), capsys.readouterr().err
    trials = _study_trials(db)
    assert all(t.state.is_finished() for t in trials)  # the killed run's trials are no longer running
    assert any(t.state == optuna.trial.TrialState.FAIL and "reason" not in t.user_attrs for t in trials)
    report = json.loads(report_path.read_text())
    assert report["study"]["trials_before"] >= done and report["study"]["trials_this_run"] == 2
    assert _counted(db) == report["study"]["trials_before"] + 2
    assert "sensitivity table read back from the study" in report["sensitivity"]["notes"]
    first_run = {t["detail"]["pid"] for t in report["trials"][:done] if "pid" in t["detail"]}
    assert len(first_run) == 2 and proc.pid not in first_run  # two worker processes did the first run's trials
    second_run = {t["detail"]["pid"] for t in report["trials"][-2:] if "pid" in t["detail"]}
    assert os.getpid() not in second_run
    capsys.readouterr()


def _counted_while_running(db: Path) -> int:
    try:
        return _counted(db)
    except Exception:  # the run is still creating the database or the study
        return 0


def _worker_pids(db: Path) -> int:
    """How many processes have run the study's finished trials so far (0 while it is being created)."""
    try:
        trials = _study_trials(db)
    except Exception:
        return 0
    return len({t.user_attrs.get("detail", {}).get("pid") for t in trials if t.state.is_finished()} - {None})


def _counted_after_reopen(db: Path) -> int:
    """The count a run sees once it has failed the trials of dead processes: a trial killed in the middle of
    being told failed already carries its reason, and counts."""
    running = optuna.trial.TrialState.RUNNING
    return _counted(db) + sum(1 for t in _study_trials(db) if t.state == running and "reason" in t.user_attrs)


def _counted(db: Path) -> int:
    """Trials that count toward the budget (not those an interrupt ended)."""
    states = optuna.trial.TrialState
    return sum(1 for t in _study_trials(db)
               if t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and "reason" in t.user_attrs))


def _finished(db: Path) -> int:
    try:
        return sum(1 for t in _study_trials(db) if t.state.is_finished())
    except (AssertionError, KeyError, Exception):
        return 0


def test_a_dead_processes_running_trial_is_marked_failed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s")
    trial = study.ask()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    trial.set_user_attr("host", os.uname().nodename)
    trial.set_user_attr("pid", gone.pid)
    alive = study.ask()
    alive.set_user_attr("host", os.uname().nodename)
    alive.set_user_attr("pid", os.getpid())
    study = open_study(url, "s")
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.RUNNING}
    assert record_trials(study, 0.0)[0].reason == "interrupted (its process ended)"


def test_a_killed_worker_fails_its_trial_and_the_pool_goes_on() -> None:
    import multiprocessing

    inputs = input_specs(onnxopt.load(CNN))
    search = load_data(EVAL, inputs).take(4)
    job = Job(str(CNN), load_data(CALIB, inputs).take(2), search, Constraint("accuracy", 1.0), "macs", key="k")
    pool = PoolExecutor(job, 2)
    recipe = [("fold", {})]
    try:
        pool.submit(0, recipe)
        deadline = time.monotonic() + 60
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.05)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        first = pool.next_done()
        assert first.number == 0 and first.state == "fail" and "died" in first.reason
        pool.submit(1, recipe)
        second = pool.next_done()
        assert second.number == 1 and second.state == "pruned"  # fold alone saves no MACs: hopeless, not failed
    finally:
        pool.close()


def test_python_api_returns_a_tune_result(tmp_path: Path) -> None:
    result = onnxopt.tune(CNN, calib=CALIB, data=EVAL, max_drop=1.0, objective="size", passes=["quantize"],
                          budget_trials=2, max_layers=2, bench_runs=0)
    assert isinstance(result, onnxopt.TuneResult) and result.passed
    assert result.study["storage"] == "memory"
    assert result.recipe[0][0] == "fold" and result.recipe[-1][0] == "quantize"
    out, recipe = result.save(tmp_path / "api.onnx", model_path=str(CNN), calib=str(CALIB))
    assert ir.load(out).graph is not None and "[[passes]]" in recipe.read_text()
    assert "chose trial" in result.describe()


def test_without_data_the_calibration_part_is_written_for_the_recipe(tmp_path: Path) -> None:
    result = onnxopt.tune(CNN, calib=EVAL, max_drop=1.0, objective="size", passes=["quantize"], budget_trials=1,
                          max_layers=1, bench_runs=0, output=tmp_path / "c.onnx")
    assert result.data["held_out_from"] == "--calib"
    out, recipe = result.save(tmp_path / "c.onnx", model_path=str(CNN))
    calib_dir = tmp_path / "c.calib"
    assert len(list(calib_dir.glob("*.npz"))) == result.data["calib_feeds"]
    assert f"--calib {calib_dir}" in recipe.read_text()
    again = tmp_path / "again.onnx"
    assert cli([str(CNN), "--recipe", str(recipe), "--calib", str(calib_dir), "-o", str(again),
                "--bench-runs", "0"]) == 0
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--max-drop", "1", "--tolerance", "0.1"], "give the constraint as"),
    (["--max-drop", "1", "--workers", "0"], "--workers must be at least 1"),
    (["--max-drop", "1", "--holdout", "1"], "strictly between 0 and 1"),
    (["--max-drop", "1", "--passes", "fold"], "not 'fold'"),
    (["--max-drop", "1", "--storage", "nosuchdb://x"], "--storage 'nosuchdb://x'"),
])
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code, _ = _tune(tmp_path, *args, "--budget-trials", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_ray_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, _ = _tune(tmp_path, "--max-drop", "1", "--ray", "local", "--budget-trials", "1", *QUICK)
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'onnxopt[ray]'" in err


def test_tune_verb_is_listed_and_lazy() -> None:
    proc = subprocess.run([sys.executable, "-c", "import sys, onnxopt.cli; print(onnxopt.cli.VERBS['tune']); "
                           "print('optuna' in sys.modules)"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["onnxopt.tune.verb:main", "False"]
    with pytest.raises(UsageError):
        onnxopt.tune(CNN, calib=CALIB, max_drop=1.0, objective="speed")


def test_html_report_is_the_page_of_the_json_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from onnxopt.report import read_report

    page = tmp_path / "tune.html"
    code = cli(["tune", str(CNN), "--calib", str(CALIB), "--data", str(EVAL), "-o", str(tmp_path / "t.onnx"),
                "--report", str(page), "--max-drop", "1", "--budget-trials", "2", *QUICK])
    assert code == 0, capsys.readouterr().err
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and 'data-section="tune"' in text and "Sensitivity: the error" in text
    doc = read_report(page)  # the data is embedded: `onnxopt report` can draw it again
    assert doc["kind"] == "tune" and doc["verdict"] == "chosen" and doc["sensitivity"]["rows"]
    # the chosen model's sections are gathered when a report is asked for: per-layer errors, outputs
    assert doc["result"]["layers"]["rows"] and "rel_l2" in doc["result"]["layers"]["rows"][0]
    assert doc["result"]["distributions"]["outputs"] and "written without per-layer" not in text


def test_a_model_with_nothing_to_act_on_says_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # An int8 model: every layer's weight is quantized, so there is nothing to search; tune says that,
    # not that no action saves anything.
    int8 = tmp_path / "int8.onnx"
    onnxopt.optimize(str(CNN), ["fold", ("quantize", {"require_speedup": False, "fallback": "none"})],
                     calib=str(CALIB), validate=False, latency_runs=0).save(int8)
    code = cli(["tune", str(int8), "--calib", str(CALIB), "--data", str(EVAL), "-o", str(tmp_path / "t.onnx"),
                "--max-drop", "1", "--budget-trials", "2", "--bench-runs", "0"])
    captured = capsys.readouterr()
    assert code == 1 and not (tmp_path / "t.onnx").exists()
    assert "no layer to act on: its 9 linear layer(s) are already quantized" in captured.out + captured.err


def test_a_trial_asked_by_a_process_killed_before_it_recorded_itself_is_failed(tmp_path: Path) -> None:
    # The coordinator asks Optuna for a trial, then records its host and pid on it: killed in between, the
    # trial is left running with no pid. A later run fails it when no process that opened the study can
    # still be asking (they all ran here and are gone); with a process on another machine it waits.
    url = f"sqlite:///{tmp_path / 's.db'}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    study = open_study(url, "s")
    study.set_user_attr(f"asker:{socket.gethostname()}:{gone.pid}", 0.0)  # as if that process had opened it
    orphan = study.ask()
    elsewhere = open_study(f"sqlite:///{tmp_path / 't.db'}", "t")
    elsewhere.set_user_attr("asker:another-host:1", 0.0)
    young = elsewhere.ask()
    assert _state(url, "s", orphan.number) == optuna.trial.TrialState.RUNNING
    reopened = open_study(url, "s")
    assert reopened.trials[orphan.number].state == optuna.trial.TrialState.FAIL
    again = open_study(f"sqlite:///{tmp_path / 't.db'}", "t")  # another machine may still be asking
    assert again.trials[young.number].state == optuna.trial.TrialState.RUNNING


def _state(url: str, name: str, number: int) -> optuna.trial.TrialState:
    return optuna.load_study(study_name=name, storage=url).trials[number].state
