"""``python -m study.grid`` end to end, on tiny budgets with the real population trainer.

Covers validation (exit 2, one line, nothing written), the dry run, resume after a crash,
``kill -9`` and Ctrl-C, determinism across n_jobs and loky vs Dask, env-change refusal,
``--fresh``, and a changed sweep adding runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study import store
from study.sweeps.grid import main
from study.sweeps.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]

# 2 configs per structural group x 2 groups x 2 seeds = 8 runs, 2 populations, 8k steps.
SWEEP = """\
name = "e2e"
env = "CartPole-v1"
total_steps = 1000
log_every = 250
seeds = [3, 4]
[hyperparameters]
num_envs = 4
[grid]
policy_lr = [0.01, 0.001]
policy_hidden_sizes = [[16], [16, 16]]
"""


def _write(path: Path, text: str = SWEEP) -> Path:
    path.write_text(text)
    return path


def _values(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Everything stored except timing, in a canonical order."""
    runs, curves = store.load(out)
    runs = runs.drop(columns=list(store.TIMING_COLUMNS))
    return (runs.sort_values("run_id").reset_index(drop=True),
            curves.sort_values(["run_id", "step"]).reset_index(drop=True))


def _assert_same(out: Path, reference: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    runs, curves = _values(out)
    pd.testing.assert_frame_equal(runs, reference[0])
    pd.testing.assert_frame_equal(curves, reference[1])
    # every run exactly once, straight from the files too
    direct = pd.read_parquet(out / "runs")
    assert set(direct["run_id"]) == set(runs["run_id"])


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An uninterrupted sweep: one process, default population size."""
    d = tmp_path_factory.mktemp("reference")
    sweep = _write(d / "e2e.toml")
    assert main([str(sweep), "--out", str(d / "out"), "--n-jobs", "1", "--quiet"]) == 0
    runs, curves = _values(d / "out")
    assert len(runs) == 8 and runs["status"].eq("ok").all()
    assert len(curves) == 8 * 4
    return runs, curves


# --------------------------------------------------------------------------------------
# validation


BAD_CASES = {
    "unknown key": SWEEP.replace("log_every", "log_evry"),
    "unknown hyperparameter": SWEEP.replace("num_envs", "num_env"),
    "wrong type": SWEEP.replace("total_steps = 1000", "total_steps = 1e3"),
    "empty axis": SWEEP + "gamma = []\n",
    "out of range": SWEEP + "lam = [0.9, 2.0]\n",
    "duplicate seed": SWEEP.replace("[3, 4]", "[3, 4, 3]"),
    "unknown env": SWEEP.replace("CartPole-v1", "CartPole-v9"),
    "in both tables": SWEEP.replace("num_envs = 4", "num_envs = 4\npolicy_lr = 0.1"),
    "malformed": SWEEP.replace("seeds = [3, 4]", "seeds = [3, 4"),
}


@pytest.mark.parametrize("case", [*BAD_CASES, "missing file"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                            case):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "bad.toml"
    if case != "missing file":
        _write(sweep, BAD_CASES[case])
    assert main([str(sweep)]) == 2
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"error: {sweep}: ") for line in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        [] if case == "missing file" else ["bad.toml"])


def test_bad_options_exit_2(tmp_path, capsys):
    sweep = _write(tmp_path / "e2e.toml")
    assert main([str(sweep), "--n-jobs", "0"]) == 2
    assert main([str(sweep), "--backend", "loky", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert main([str(sweep), "--population-size", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = _write(tmp_path / "e2e.toml")
    assert main([str(sweep), "--dry-run", "--population-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "configs:     4 (grid: policy_lr x2, policy_hidden_sizes x2)" in out
    assert "seeds:       2 (3, 4)" in out
    assert "runs:        8 (0 already stored, 8 to run)" in out
    # two structural groups of 4 runs, at most 3 per population -> 2 + 2 each
    assert "populations: 4 from 2 structural group(s)" in out
    assert "env steps:   8,000" in out
    assert "results:     results/e2e" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2e.toml"]


# --------------------------------------------------------------------------------------
# running


def test_store_contents_and_summary(tmp_path, capsys, reference):
    sweep = _write(tmp_path / "e2e.toml")
    out = tmp_path / "out"
    # two loky workers and a different chunking: values must not change
    assert main([str(sweep), "--out", str(out), "--n-jobs", "2", "--population-size", "3"]) == 0
    _assert_same(out, reference)
    text = capsys.readouterr().out
    assert f"results: {out} (8 of 8 runs of this sweep stored: 8 ok)" in text
    assert "best configs by IQM of final_return over 2 seeds:" in text
    assert "policy_lr  policy_hidden_sizes" in text

    resolved = tomllib.loads((out / "sweep.toml").read_text())
    assert resolved["hyperparameters"]["n_steps"] == 5 and resolved["seeds"] == [3, 4]
    again = load_sweep(out / "sweep.toml")
    assert {r.run_id for r in again.runs()} == set(reference[0]["run_id"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["runs"]["ran"] == 8
    assert {"python", "torch", "gymnasium", "numpy", "study"} <= set(manifest["versions"])
    assert manifest["machine"]["cpu_count"] >= 1 and manifest["finished"]
    assert "--n-jobs 2" in manifest["command"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        p.name for p in (out / "curves").iterdir())
    assert len(list((out / "runs").iterdir())) == 4

    # re-running the same command has nothing to do and changes nothing
    assert main([str(sweep), "--out", str(out), "--n-jobs", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"results: {out}"
    _assert_same(out, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"]["already_stored"] == 8 and manifest["runs"]["ran"] == 0
    assert len(manifest["history"]) == 1
    assert main([str(sweep), "--out", str(out), "--dry-run"]) == 0
    assert "runs:        8 (8 already stored, 0 to run)" in capsys.readouterr().out


def test_dask_local_cluster_matches_loky(tmp_path, reference):
    distributed = pytest.importorskip("distributed")
    sweep = _write(tmp_path / "e2e.toml")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        rc = main([str(sweep), "--out", str(tmp_path / "out"), "--backend", "dask",
                   "--scheduler", cluster.scheduler_address, "--population-size", "2",
                   "--quiet"])
    assert rc == 0
    _assert_same(tmp_path / "out", reference)


def test_resume_after_crash_and_from_a_subset(tmp_path, monkeypatch, reference):
    sweep = _write(tmp_path / "e2e.toml")
    out = tmp_path / "out"
    # 1. a subset: one seed only, under the same name
    subset = _write(tmp_path / "subset.toml", SWEEP.replace("[3, 4]", "[4]"))
    assert main([str(subset), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    assert len(store.stored_run_ids(out)) == 4

    # 2. the full sweep crashes after storing its first chunk
    real = store.write_chunk
    calls = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(store, "write_chunk", crash_after_first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([str(sweep), "--out", str(out), "--n-jobs", "1", "--population-size", "1",
              "--quiet"])
    monkeypatch.undo()
    assert len(store.stored_run_ids(out)) == 5
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"

    # 3. re-running finishes the rest; values equal an uninterrupted sweep
    assert main([str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"]["already_stored"] == 5 and manifest["runs"]["ran"] == 3
    _assert_same(out, reference)


def _wait_for_first_chunk(proc: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = out / "runs"
        if runs.is_dir() and any(p.suffix == ".parquet" for p in runs.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.communicate(timeout=30)}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no chunk was stored in time")


@pytest.mark.slow
def test_kill_9_then_rerun(tmp_path, reference, spawn_cli):
    sweep = _write(tmp_path / "e2e.toml")
    out = tmp_path / "out"
    proc = spawn_cli("study.grid", str(sweep), "--out", str(out), "--n-jobs", "1",
                     "--population-size", "1", "--quiet")
    _wait_for_first_chunk(proc, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    stored = store.stored_run_ids(out)
    assert 1 <= len(stored) <= 8
    assert main([str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    _assert_same(out, reference)


@pytest.mark.slow
def test_ctrl_c_keeps_finished_chunks_and_exits_130(tmp_path, spawn_cli):
    # Bigger runs, so the sweep is still going when the signal arrives.
    sweep = _write(tmp_path / "e2e.toml", SWEEP.replace("total_steps = 1000",
                                                          "total_steps = 8000"))
    out = tmp_path / "out"
    proc = spawn_cli("study.grid", str(sweep), "--out", str(out), "--n-jobs", "2",
                     "--population-size", "1")
    _wait_for_first_chunk(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: dropped the populations in flight; kept ")
    assert "run the same command again to resume" in last
    runs = store.load_runs(out)
    assert 1 <= len(runs) < 8 and runs["run_id"].is_unique
    assert set(store.load_curves(out)["run_id"]) == set(runs["run_id"])
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert not [p for p in out.rglob(".tmp-*")]


def test_an_aborting_shutdown_hides_lokys_race_and_nothing_else(monkeypatch):
    """Ctrl-C: the driver's last line must be its own. loky's manager thread can fail on a
    work item that the aborting shutdown removed (KeyError: its work id) and print after
    it; that one error is silenced, any other thread error still reaches the hook that
    reports it."""
    import threading

    from study.sweeps import executors

    seen: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: seen.append(f"{type(args.thread).__name__}: "
                                                 f"{args.exc_type.__name__}"))

    def crash(exc: BaseException, name: str = "_ExecutorManagerThread") -> None:
        thread_type = type(name, (threading.Thread,), {"run": lambda self: _raise(exc)})
        t = thread_type()
        t.start()
        t.join()

    crash(KeyError(7))
    assert seen == ["_ExecutorManagerThread: KeyError"]  # shown before an abort
    executors._quiet_loky_shutdown_race()
    executors._quiet_loky_shutdown_race()  # (installed once)
    crash(KeyError(7))
    crash(RuntimeError("another"))
    crash(KeyError(7), name="SomeOtherThread")
    assert seen == ["_ExecutorManagerThread: KeyError", "_ExecutorManagerThread: RuntimeError",
                    "SomeOtherThread: KeyError"]


def _raise(exc: BaseException) -> None:
    raise exc


def test_env_change_is_refused_unless_fresh(tmp_path, capsys):
    small = SWEEP.replace("[3, 4]", "[3]").split("[grid]")[0]
    sweep = _write(tmp_path / "a.toml", small)
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    other = _write(tmp_path / "b.toml", small.replace("CartPole-v1", "CartPole-v0"))
    capsys.readouterr()
    assert main([str(other), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds results for env 'CartPole-v1'" in err
    assert "CartPole-v0" in err and "--fresh" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert main([str(other), "--out", str(out), "--n-jobs", "1", "--quiet", "--fresh"]) == 0
    runs = store.load_runs(out)
    assert list(runs["env"]) == ["CartPole-v0"]
    assert json.loads((out / "manifest.json").read_text())["history"] == []


def test_fresh_refuses_a_directory_that_is_not_a_store(tmp_path):
    sweep = _write(tmp_path / "a.toml")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main([str(sweep), "--out", str(out), "--fresh"]) == 2
    assert main([str(sweep), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


def test_changed_sweep_adds_its_new_runs(tmp_path):
    one = SWEEP.replace("policy_lr = [0.01, 0.001]\n", "policy_lr = [0.01]\n").replace(
        "policy_hidden_sizes = [[16], [16, 16]]\n", "")
    out = tmp_path / "out"
    assert main([str(_write(tmp_path / "s.toml", one)), "--out", str(out), "--n-jobs", "1",
                 "--quiet"]) == 0
    first = store.load_runs(out)
    two = one.replace("policy_lr = [0.01]", "policy_lr = [0.01, 0.003]")
    assert main([str(_write(tmp_path / "s.toml", two)), "--out", str(out), "--n-jobs", "1",
                 "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"] == {"in_sweep": 4, "already_stored": 2, "to_run": 2, "ran": 2}
    both = store.load_runs(out)
    assert len(both) == 4 and sorted(both["policy_lr"].unique()) == [0.003, 0.01]
    # the old runs were kept untouched (timing included)
    kept = both[both["run_id"].isin(first["run_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first)
    assert tomllib.loads((out / "sweep.toml").read_text())["grid"]["policy_lr"] == [0.01, 0.003]


def test_save_policies(tmp_path):
    text = SWEEP.replace("seeds = [3, 4]", "seeds = [3]\nsave_policies = true")
    out = tmp_path / "out"
    assert main([str(_write(tmp_path / "s.toml", text)), "--out", str(out), "--n-jobs", "1",
                 "--quiet"]) == 0
    ids = store.stored_run_ids(out)
    assert {p.stem for p in (out / "policies").glob("*.npz")} == ids and len(ids) == 4


# --------------------------------------------------------------------------------------
# a fake trainer, for behaviour the real one only shows on long runs


def _fake_population_module() -> types.ModuleType:
    from study.trainer.population import CURVE_COLUMNS, Member, RunResult

    def train_population(env_id, members, total_steps, log_every=1000, eval_every=0,
                         eval_episodes=10, device="cpu", save_policies=False, on_log=None,
                         on_progress=None, check_memory=True):
        results = []
        steps = np.arange(log_every, total_steps + 1, log_every)
        for m in members:
            diverged = m.hyperparameters["policy_lr"] >= 0.01 and m.seed == 3
            n = len(steps) // 2 if diverged else len(steps)
            curve = {c: np.full(n, float(m.seed)) for c in CURVE_COLUMNS}
            curve["step"] = steps[:n].astype(float)
            results.append(RunResult(
                seed=m.seed, hyperparameters=m.hyperparameters,
                status="diverged" if diverged else "ok",
                diverged_at_step=int(steps[n]) if diverged else None,
                final_return=float("nan") if diverged else 100.0 * m.seed,
                final_eval_return=float("nan"), wall_s=0.0, env_steps=total_steps,
                curve=curve))
            if on_progress is not None:
                on_progress(total_steps)
        return results

    mod = types.ModuleType("study.trainer.population")
    mod.Member, mod.RunResult, mod.CURVE_COLUMNS = Member, RunResult, CURVE_COLUMNS
    mod.train_population = train_population
    return mod


def test_diverged_runs_are_stored_and_the_sweep_carries_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "study.trainer.population", _fake_population_module())
    out = tmp_path / "out"
    assert main([str(_write(tmp_path / "s.toml")), "--out", str(out), "--n-jobs", "1",
                 "--population-size", "2"]) == 0
    runs = store.load_runs(out)
    assert len(runs) == 8
    bad = runs[runs["status"] == "diverged"]
    assert len(bad) == 2 and set(bad["seed"]) == {3} and (bad["policy_lr"] == 0.01).all()
    assert str(runs["diverged_at_step"].dtype) == "Int64"
    assert bad["diverged_at_step"].tolist() == [750, 750]
    assert runs.loc[runs["status"] == "ok", "diverged_at_step"].isna().all()
    curves = store.load_curves(out)
    assert curves.groupby("run_id").size().to_dict()[bad["run_id"].iloc[0]] == 2
    text = capsys.readouterr().out
    assert "8 of 8 runs of this sweep stored: 6 ok, 2 diverged" in text
    assert "1/2" in text  # the diverged column of the best-configs table


def test_best_configs_rank_by_iqm():
    from study.sweeps.grid import best_configs

    a = [0, 0, 5, 5, 5, 9, 9, 9]  # median 5, IQM 6
    b = [5.5] * 8  # median 5.5, IQM 5.5
    runs = pd.DataFrame({"config_id": ["a"] * 8 + ["b"] * 8, "final_return": a + b,
                         "status": "ok"})
    best = best_configs(runs)
    assert best["config_id"].tolist() == ["a", "b"]
    assert best["iqm"].tolist() == [6.0, 5.5] and best["median"].tolist() == [5.0, 5.5]
