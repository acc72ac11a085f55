"""``python -m study.optuna`` end to end, on tiny CartPole budgets with the real trainer.

Covers validation (exit 2, one line, nothing written), batched trials trained as one
population per structural group, trials.parquet agreeing with the store, pruning,
resuming, stale trials of a killed process, two processes on one journal file and on
PostgreSQL (when STUDY_TEST_POSTGRES_URL is set), and --confirm with best.toml. Faults are
real: processes killed with SIGKILL (holding Optuna's journal lock, inside ``ask``, while
workers train) and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import study.trainer.population as population
from study import procs, store
from study.config import ConfigError, structural_key
from study.sweeps.optuna import TRIALS_FILE, derive_seeds, main
from study.sweeps.search_space import OptunaSettings, aggregate, parse_optuna
from study.sweeps.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("STUDY_TEST_POSTGRES_URL")

BASE = """\
name = "opt"
env = "CartPole-v1"
total_steps = 800
log_every = 200
seeds = [11, 12, 13, 14]
[hyperparameters]
num_envs = 4
policy_hidden_sizes = [8]
value_hidden_sizes = [8]
[optuna]
n_trials = 6
seeds_per_trial = 2
trials_per_batch = 3
pruner_startup_trials = 2
{optuna_extra}
[optuna.space]
{space}
"""
SPACE = """\
policy_lr = { low = 1e-4, high = 1e-1, log = true }
gamma = { choices = [0.9, 0.99] }
"""


def _sweep(path: Path, optuna_extra: str = "", space: str = SPACE, text: str | None = None
           ) -> Path:
    path.write_text(text if text is not None else BASE.format(optuna_extra=optuna_extra,
                                                              space=space))
    return path


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _trials(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / TRIALS_FILE).sort_values("number").reset_index(drop=True)


def _tune_runs(out: Path) -> pd.DataFrame:
    runs = store.load_runs(out)
    return runs[runs["phase"] == "tune"]


class _Spy:
    """Wraps train_population: records each population's members."""

    def __init__(self) -> None:
        self.calls: list[list[population.Member]] = []
        self._real = population.train_population

    def __call__(self, env_id, members, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.calls.append(list(members))
        return self._real(env_id, members, *args, **kwargs)


def _check_store_agrees(out: Path, n_trials: int, seeds: list[int]) -> pd.DataFrame:
    """Every trial number once, every trial finished, exactly one run per tuning seed."""
    trials = _trials(out)
    assert trials["number"].tolist() == list(range(n_trials))
    assert trials["state"].isin(["COMPLETE", "PRUNED"]).all(), trials["state"].tolist()
    runs = _tune_runs(out)
    assert runs["run_id"].is_unique
    per_trial = runs.groupby("trial_number")["seed"].apply(sorted)
    assert sorted(per_trial.index) == list(range(n_trials))
    assert all(s == sorted(seeds) for s in per_trial)
    state = runs.groupby("trial_number")["trial_state"].first()
    assert (state.sort_index().to_numpy() == trials["state"].to_numpy()).all()
    return trials


# --------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("space", "extra", "hyper", "expect"),
    [
        ('policy_lr = { low = 0.1, high = 0.01 }', "", "", "low = 0.1 >= high = 0.01"),
        ('entropy_coef = { low = 0.0, high = 0.1, log = true }', "", "", "log = true needs"),
        ('gamma = { choices = [] }', "", "", "choices = []"),
        ('gamma = [0.9, 0.9]', "", "", "twice"),
        ('gamma = { low = 0.9, high = 1.5 }', "", "", "gamma"),
        ('value_iters = { low = 0, high = 8 }', "", "", "value_iters"),
        ('value_iters = { low = 1.5, high = 8 }', "", "", "expected an integer"),
        ('polcy_lr = { low = 0.1, high = 0.2 }', "", "", "did you mean 'policy_lr'"),
        ('policy_optimizer = { low = 1, high = 2 }', "", "", "choices"),
        (SPACE, 'sampler = "bayes"', "", "sampler = 'bayes'"),
        (SPACE, 'pruner = "asha"', "", "pruner = 'asha'"),
        (SPACE, 'pruner = "wilcoxon"', "", "pruner = 'wilcoxon' is no longer offered"),
        (SPACE, 'objective = "max"', "", "objective"),
        (SPACE, 'metric = "final_eval_return"', "", "needs evaluation"),
        (SPACE, 'sampler = "grid"', "", "sampler = 'grid' needs"),
        (SPACE, 'n_trails = 3', "", "did you mean 'n_trials'"),
        (SPACE, 'seeds_per_trial = 9', "", "fewer than"),
        (SPACE, "", "gamma = 0.99", "also set in [hyperparameters]"),
        ("", "", "", "empty"),
    ],
)
def test_validation_errors_exit_2(tmp_path, capsys, space, extra, hyper, expect):
    text = BASE.format(optuna_extra=extra, space=space)
    if hyper:
        text = text.replace("[hyperparameters]\n", f"[hyperparameters]\n{hyper}\n")
    if "seeds_per_trial = 9" in extra:
        text = text.replace("seeds_per_trial = 2\n", "")
    path = _sweep(tmp_path / "bad.toml", text=text)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(path) in err, err
    if expect == "fewer than":
        assert "seeds_per_trial = 9" in err, err
    else:
        assert expect in err, err
    assert not out.exists()


def test_bad_storage_and_missing_table(tmp_path, capsys):
    path = _sweep(tmp_path / "s.toml")
    assert main([str(path), "--out", str(tmp_path / "o"), "--storage", "nodb://x/y"]) == 2
    assert "--storage" in capsys.readouterr().err
    plain = tmp_path / "plain.toml"
    plain.write_text(BASE.split("[optuna]")[0])
    assert main([str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "no [optuna] table" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_search_space_parsing_and_objectives():
    table = {
        "space": {
            "policy_lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "value_iters": {"low": 1, "high": 80},
            "policy_hidden_sizes": {"choices": [[64, 64], [32]]},
            "normalize_advantage": [True, False],
            "max_grad_norm": {"choices": [0.5, "inf"]},
        }
    }
    s = parse_optuna(table, total_steps=1000)
    assert isinstance(s, OptunaSettings)
    assert (s.n_trials, s.seeds_per_trial, s.objective, s.sampler) == (50, 5, "iqm", "tpe")
    assert s.trials_per_batch == 64 // 5
    d = s.distributions()
    assert isinstance(d["value_iters"], optuna.distributions.IntDistribution)
    assert d["policy_lr"].log
    hp = s.overrides({"policy_lr": 0.01, "value_iters": 7, "policy_hidden_sizes": "[32]",
                      "normalize_advantage": False, "max_grad_norm": "inf"})
    assert hp == {"policy_lr": 0.01, "value_iters": 7, "policy_hidden_sizes": (32,),
                  "normalize_advantage": False, "max_grad_norm": float("inf")}
    with pytest.raises(ConfigError, match="fixed|hyperparameters"):
        parse_optuna(table, total_steps=1000, fixed={"value_iters": 2})

    from study.analysis import stats

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 8, 13):
        x = rng.normal(size=n)
        x[0] = np.nan if n > 2 else x[0]
        assert aggregate("iqm", x) == pytest.approx(stats.iqm(x))
        assert aggregate("median", x) == pytest.approx(stats.median(x))
        assert aggregate("cvar25", x) == pytest.approx(stats.cvar(x, 0.25))
        assert aggregate("mean", x) == pytest.approx(np.nanmean(x))
    assert np.isnan(aggregate("iqm", [np.nan, np.nan]))


def test_derived_seeds_are_deterministic_and_disjoint():
    a = derive_seeds("x", 5)
    assert a == derive_seeds("x", 5) and len(set(a)) == 5
    assert derive_seeds("x", 8)[:5] == a  # prefix-stable
    b = derive_seeds("x/test", 10, exclude=a)
    assert not set(a) & set(b)


# --------------------------------------------------------------------------------------
# a small study, resumed


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """3 trials, then resumed to 6 (batches of 3 trials x 2 seeds), train_population spied."""
    d = tmp_path_factory.mktemp("small")
    path = _sweep(d / "opt.toml")
    out = d / "out"
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(path), "--out", str(out), "--n-trials", "3", "--quiet"]) == 0
        first = _trials(out)
        first_calls = len(spy.calls)
        assert main([str(path), "--out", str(out), "--quiet"]) == 0
    return {"path": path, "out": out, "first": first, "spy": spy, "first_calls": first_calls}


def test_study_trials_parquet_and_store_agree(small_study):
    out = small_study["out"]
    trials = _check_store_agrees(out, 6, [11, 12])
    runs = _tune_runs(out)
    for _, t in trials.iterrows():
        mine = runs[runs["trial_number"] == t["number"]]
        # params are columns, and they are what the runs were trained with
        assert (mine["policy_lr"] == t["param_policy_lr"]).all()
        assert (mine["gamma"] == t["param_gamma"]).all()
        assert mine["config_id"].nunique() == 1 and mine["config_id"].iloc[0] == t["config_id"]
        assert len(t["intermediate_values"]) == len(t["intermediate_steps"]) > 0
        assert t["duration_s"] > 0
        if t["state"] == "COMPLETE":
            # iqm of 2 seeds = their mean
            assert t["value"] == pytest.approx(mine["final_return"].mean())
            assert (mine["status"] == "ok").all()
    manifest = store.read_manifest(out)
    assert manifest["kind"] == "optuna" and manifest["status"] == "complete"


def test_batched_trials_train_as_one_population(small_study):
    spy = small_study["spy"]
    # 6 trials in batches of 3, no structural hyperparameter searched: 2 populations of
    # 3 trials x 2 seeds each, one per batch.
    assert small_study["first_calls"] == 1
    assert [len(c) for c in spy.calls] == [6, 6]
    for members in spy.calls:
        assert sorted(m.seed for m in members) == [11, 11, 11, 12, 12, 12]


def test_resume_adds_trials_up_to_n_trials(small_study):
    first = small_study["first"]
    assert first["number"].tolist() == [0, 1, 2]
    assert len(_trials(small_study["out"])) == 6
    # A third run of the same command finds the study complete and trains nothing.
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(small_study["path"]), "--out", str(small_study["out"]),
                     "--quiet"]) == 0
    assert spy.calls == []
    assert len(_trials(small_study["out"])) == 6


def test_confirm_reruns_top_configs_on_held_out_seeds(small_study, capsys):
    out = small_study["out"]
    assert main([str(small_study["path"]), "--out", str(out), "--confirm", "2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out test seeds" in printed and "| config |" in printed
    best = load_sweep(out / "best.toml")
    assert len(best.seeds) == 10 and not set(best.seeds) & {11, 12}
    assert best.n_configs == 1
    runs = store.load_runs(out)
    confirm = runs[runs["phase"] == "confirm"]
    assert len(confirm) == 2 * 10 and set(confirm["seed"]) == set(best.seeds)
    assert confirm["config_id"].nunique() == 2
    # the winner is one of the re-run configs, with the searched values of its trial
    winner = best.configs()[0]
    trials = _trials(out).set_index("number")
    src = confirm[(confirm["policy_lr"] == winner["policy_lr"])]
    assert len(src) == 10
    t = trials.loc[int(src["trial_number"].iloc[0])]
    assert t["param_gamma"] == winner["gamma"]
    # and the file is a valid grid sweep
    from study.sweeps.grid import main as grid_main

    assert grid_main([str(out / "best.toml"), "--dry-run", "--out", str(out / "g")]) == 0


# --------------------------------------------------------------------------------------
# structural groups, grid sampler, pruning


def test_structural_space_one_population_per_group(tmp_path):
    space = ("policy_hidden_sizes = { choices = [[8], [16]] }\n"
             "gamma = { choices = [0.9, 0.99] }\n")
    text = BASE.format(optuna_extra='sampler = "grid"', space=space).replace(
        "trials_per_batch = 3", "trials_per_batch = 4").replace(
        "policy_hidden_sizes = [8]\n", "")
    path = _sweep(tmp_path / "s.toml", text=text)
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    # n_trials = 6 is capped at the 4 grid points; one batch, two structural groups
    assert len(spy.calls) == 2
    for members in spy.calls:
        assert len(members) == 4
        assert len({structural_key(m.hyperparameters) for m in members}) == 1
    trials = _check_store_agrees(tmp_path / "out", 4, [11, 12])
    points = set(zip(trials["param_policy_hidden_sizes"], trials["param_gamma"], strict=True))
    assert points == {("[8]", 0.9), ("[8]", 0.99), ("[16]", 0.9), ("[16]", 0.99)}


def test_trial_whose_seeds_all_diverge_fails_and_counts(tmp_path):
    text = BASE.format(optuna_extra='sampler = "grid"',
                       space="value_lr = { choices = [1e30, 1e-3] }\n")
    path = _sweep(tmp_path / "s.toml", text=text)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--quiet"]) == 0
    trials = _trials(out).set_index("param_value_lr")
    # value_lr = 1e30 overflows the value network at the first update, on every seed
    assert trials.loc[1e30, "state"] == "FAIL" and trials.loc[1e30, "failure"] == "diverged"
    assert trials.loc[1e-3, "state"] == "COMPLETE"
    assert len(trials) == 2  # the failed trial counts: nothing was asked to replace it
    runs = _tune_runs(out)
    bad = runs[runs["trial_number"] == trials.loc[1e30, "number"]]
    assert len(bad) == 2 and (bad["status"] == "diverged").all()
    assert (bad["trial_state"] == "FAIL").all()


class _PruneOdd(optuna.pruners.BasePruner):
    """Prunes odd-numbered trials once they reported at step >= 400."""

    def prune(self, study, trial):  # noqa: ANN001
        return trial.number % 2 == 1 and (trial.last_step or 0) >= 400


def test_pruned_trials_stop_training_in_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(OptunaSettings, "make_pruner", lambda self, *a: _PruneOdd())
    path = _sweep(tmp_path / "s.toml")
    out = tmp_path / "out"
    # --n-jobs 2: two batches train in worker processes, pruning decided in the driver
    assert main([str(path), "--out", str(out), "--quiet", "--n-jobs", "2"]) == 0
    trials = _check_store_agrees(out, 6, [11, 12])
    odd = trials["number"] % 2 == 1
    assert (trials.loc[odd, "state"] == "PRUNED").all()
    assert (trials.loc[~odd, "state"] == "COMPLETE").all()
    runs = _tune_runs(out)
    curves = store.load_curves(out)
    last = curves.groupby("run_id")["step"].max()
    for _, r in runs.iterrows():
        if r["trial_number"] % 2:
            assert r["status"] == "pruned" and last[r["run_id"]] < 800
        else:
            assert r["status"] == "ok" and last[r["run_id"]] >= 800
    n_points = trials["intermediate_steps"].map(len)
    assert (n_points[odd].max()) < n_points[~odd].min()


# --------------------------------------------------------------------------------------
# killed processes and concurrent workers

_KILLED_DRIVER = """\
import os, signal, sys
import study.sweeps.executors as executors
import study.sweeps.optuna as so

def die(chunk, progress, on_log):  # the driver is killed -9 while its first batch trains
    os.kill(os.getpid(), signal.SIGKILL)

executors.run_chunk = die
sys.exit(so.main(sys.argv[1:]))
"""


def test_running_trials_of_a_killed_process_are_failed_and_requeued(tmp_path, capsys):
    text = BASE.format(optuna_extra="", space=SPACE).replace(
        "n_trials = 6", "n_trials = 4").replace("trials_per_batch = 3", "trials_per_batch = 2")
    path = _sweep(tmp_path / "s.toml", text=text)
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(path), "--out", str(out),
                             "--quiet"], env=_env(), cwd=tmp_path, stderr=subprocess.PIPE)
    _, killed_err = proc.communicate(timeout=120)
    assert proc.returncode == -9, killed_err.decode()
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    left = optuna.load_study(study_name="opt", storage=journal).get_trials()
    assert [t.state for t in left] == [optuna.trial.TrialState.RUNNING] * 2
    # the manifest names the dead driver: readers see the store as interrupted
    manifest = store.read_manifest(out)
    assert manifest["status"] == "running" and store.status(manifest) == "interrupted"

    assert main([str(path), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    for n in (0, 1):
        assert (f"note: trial {n} was left RUNNING by a driver that died (pid {proc.pid} on "
                in err), err
    assert err.count("; marked FAIL, its params re-queued") == 2, err
    trials = _trials(out)
    assert len(trials) == 6
    failed = trials[trials["state"] == "FAIL"]
    assert failed["number"].tolist() == [0, 1] and (failed["failure"] == "stale").all()
    requeued = trials[trials["requeued_from"].notna()]
    assert sorted(requeued["requeued_from"].astype(int)) == [0, 1]
    for _, t in requeued.iterrows():
        src = trials.loc[trials["number"] == int(t["requeued_from"])].iloc[0]
        assert t["param_policy_lr"] == src["param_policy_lr"]
        assert t["param_gamma"] == src["param_gamma"]
    done = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]
    assert len(done) == 4
    runs = _tune_runs(out)
    assert sorted(runs["trial_number"].unique()) == sorted(done["number"])
    assert (runs.groupby("trial_number").size() == 2).all()


def _two_workers(tmp_path: Path, extra_args: list[str]) -> pd.DataFrame:
    text = BASE.format(optuna_extra="", space=SPACE).replace(
        "n_trials = 6", "n_trials = 8").replace("trials_per_batch = 3", "trials_per_batch = 2")
    path = _sweep(tmp_path / "s.toml", text=text)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "study.optuna", str(path), "--out", str(out), "--quiet",
           *extra_args]
    procs = [subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
    return _check_store_agrees(out, 8, [11, 12])


def test_an_out_dir_another_driver_is_starting_is_accepted(tmp_path):
    # What a driver writes before its manifest: a second driver started at the same
    # moment must take the directory, not refuse it as "not a results store".
    from study.sweeps.optuna import _check_out

    out = tmp_path / "out"
    out.mkdir()
    for name in ("optuna.journal", "optuna.journal.study-lock", "sweep.toml",
                 ".tmp-manifest.json.abc123", ".driver.lock"):
        (out / name).write_text("")
    _check_out(out, "CartPole-v1")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(store.StoreError, match="not a results store"):
        _check_out(out, "CartPole-v1")


def test_two_processes_share_a_journal_file(tmp_path):
    trials = _two_workers(tmp_path, [])
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "out" / "optuna.journal")))
    study = optuna.load_study(study_name="opt", storage=journal)
    assert len(study.trials) == len(trials) == 8


@pytest.mark.skipif(not POSTGRES_URL, reason="STUDY_TEST_POSTGRES_URL is not set")
def test_two_processes_share_a_postgresql_study(tmp_path):
    name = f"opt-{uuid.uuid4().hex[:8]}"
    trials = _two_workers(tmp_path, ["--storage", POSTGRES_URL, "--study-name", name])
    assert (trials["study_name"] == name).all()
    assert not (tmp_path / "out" / "optuna.journal").exists()
    from study.sweeps.optuna import _check_storage

    study = optuna.load_study(study_name=name, storage=_check_storage(POSTGRES_URL))
    assert sorted(t.number for t in study.trials) == list(range(8))
    optuna.delete_study(study_name=name, storage=_check_storage(POSTGRES_URL))


# --------------------------------------------------------------------------------------
# faults: killed writers and askers, orphaned workers, SIGTERM, other drivers


def _tiny(n_trials: int, batch: int, total_steps: int = 800, log_every: int = 200,
          extra: str = "") -> str:
    return BASE.format(optuna_extra=extra, space=SPACE).replace(
        "n_trials = 6", f"n_trials = {n_trials}").replace(
        "trials_per_batch = 3", f"trials_per_batch = {batch}").replace(
        "total_steps = 800", f"total_steps = {total_steps}").replace(
        "log_every = 200", f"log_every = {log_every}")


_HOLD_JOURNAL_LOCK = """\
import os, signal, sys
from optuna.storages.journal import JournalFileSymlinkLock

os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
JournalFileSymlinkLock(sys.argv[1]).acquire()  # what Optuna takes to append to a journal
os.kill(os.getpid(), signal.SIGKILL)             # killed while writing
"""


def test_a_journal_lock_left_by_a_killed_writer_does_not_hang_the_next_run(tmp_path):
    path = _sweep(tmp_path / "s.toml", text=_tiny(2, 2))
    script = tmp_path / "hold.py"
    script.write_text(_HOLD_JOURNAL_LOCK)
    journal = Path("results") / "opt" / "optuna.journal"  # relative: the default --out
    holder = subprocess.run([sys.executable, str(script), str(journal)], cwd=tmp_path,
                            env=_env(), timeout=60)
    assert holder.returncode == -9
    lock = tmp_path / "results" / "opt" / "optuna.journal.lock"
    assert lock.is_symlink() and not lock.exists()  # it dangles
    env = {**_env(), "STUDY_OPTUNA_JOURNAL_GRACE_S": "2"}
    # Before the fix this run spun at 100% CPU forever in Optuna's lock loop.
    proc = subprocess.run([sys.executable, "-m", "study.optuna", str(path), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, timeout=90)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "optuna.journal.lock was held for more than 2 s" in err, err
    trials = _trials(tmp_path / "results" / "opt")
    assert len(trials) == 2 and trials["state"].isin(["COMPLETE", "PRUNED"]).all()
    assert not lock.is_symlink()


_KILLED_ASKING = """\
import os, signal, sys
import optuna
import study.sweeps.executors as executors
import study.sweeps.optuna as so

class DieWhileSampling(optuna.samplers.RandomSampler):
    # Inside study.ask: the trial exists (RUNNING), it has no params and no owner yet.
    def sample_independent(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

so.OptunaSettings.make_sampler = lambda self, seed: DieWhileSampling(seed=seed)
sys.exit(so.main(sys.argv[1:]))
"""


def test_a_trial_left_by_a_driver_killed_while_asking_is_failed_at_once(tmp_path, capsys):
    path = _sweep(tmp_path / "s.toml", text=_tiny(2, 2))
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_ASKING)
    killed = subprocess.Popen([sys.executable, str(script), str(path), "--out", str(out),
                               "--quiet"], env=_env(), cwd=tmp_path, stderr=subprocess.PIPE)
    _, killed_err = killed.communicate(timeout=120)
    assert killed.returncode == -9, killed_err.decode()

    # Long before STALE_AFTER_S (300 s): the asking driver is known, and dead.
    assert main([str(path), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    note = (f"note: trial 0 was left RUNNING without parameters by a driver that died while "
            f"asking (pid {killed.pid} on ")
    assert note in err and err.strip().endswith("; marked FAIL"), err
    assert "re-queued" not in err, err
    trials = _trials(out)
    assert trials["number"].tolist() == [0, 1, 2]
    assert trials.loc[0, "state"] == "FAIL" and trials.loc[0, "failure"] == "stale"
    # the orphan did not count: two trials were run in its place
    assert trials.loc[1:, "state"].isin(["COMPLETE", "PRUNED"]).all()
    assert trials["requeued_from"].isna().all()
    assert sorted(_tune_runs(out)["trial_number"].unique()) == [1, 2]


def _children(pid: int) -> dict[int, str]:
    """Live processes whose parent is ``pid``: ``{pid: command line}``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found[int(d.name)] = cmd
    return found


def _training(pid: int) -> bool:
    """Whether worker ``pid`` has imported torch: it runs a task (its initializer ran)."""
    try:
        return "torch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _live(pids: list[int]) -> list[int]:
    return [p for p in pids if procs.is_alive({"pid": p})]


def _wait_for(what: Callable[[], object], timeout: float, why: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {why}")


def test_workers_die_with_a_driver_killed_with_sigkill(tmp_path):
    # A budget that trains for minutes with no log point (no report) in sight: a worker
    # that outlives its driver keeps training.
    text = _tiny(4, 1, total_steps=4_000_000, log_every=2_000_000)
    path = _sweep(tmp_path / "s.toml", text=text)
    driver = subprocess.Popen([sys.executable, "-m", "study.optuna", str(path), "--out",
                               str(tmp_path / "out"), "--quiet", "--n-jobs", "2"],
                              env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        def training_workers() -> list[int]:
            found = [p for p, cmd in _children(driver.pid).items() if "LokyProcess" in cmd]
            return found if len(found) == 2 and all(map(_training, found)) else []

        workers = list(_wait_for(training_workers, 120, "2 training workers"))  # type: ignore
        driver.kill()
        driver.wait(timeout=10)
        time.sleep(0.1)
        deadline = time.monotonic() + 5
        while _live(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _live(workers) == [], "workers outlived their driver"
    finally:
        driver.kill()
        driver.wait(timeout=10)
        for p in _live(workers):  # never leave an orphan training on a shared machine
            os.kill(p, signal.SIGKILL)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_sigterm_stops_the_driver_like_ctrl_c(tmp_path, n_jobs):
    path = _sweep(tmp_path / "s.toml", text=_tiny(400, 2))
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "study.optuna", str(path), "--out",
                               str(out), "--quiet", "--n-jobs", str(n_jobs)],
                              env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        def finished_trials() -> bool:
            try:
                return bool(_trials(out)["state"].isin(["COMPLETE", "PRUNED"]).any())
            except (OSError, ValueError):  # not written yet
                return False

        _wait_for(finished_trials, 120, "a finished trial")
        workers = list(_children(driver.pid))
        driver.send_signal(signal.SIGTERM)
        _, err_bytes = driver.communicate(timeout=60)
    finally:
        driver.kill()
    err = err_bytes.decode()
    assert driver.returncode == 130, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1, err
    m = re.fullmatch(r"interrupted: dropped (\d+) trial\(s\) in flight .*; kept (\d+) "
                     r"trial\(s\) finished by this run \((\d+) runs stored in (.+)\); the "
                     r"study holds (\d+) of 400 trials; run the same command again to resume",
                     lines[0])
    assert m, lines[0]
    dropped, kept, runs, done = (int(m[i]) for i in (1, 2, 3, 5))
    assert m[4] == str(out)
    assert store.read_manifest(out)["status"] == "interrupted"
    trials = _trials(out)
    # finished: told by this run (complete, pruned, or failed on their own: diverged)
    finished = trials[trials["state"].isin(["COMPLETE", "PRUNED", "FAIL"])
                      & (trials["failure"].fillna("") != "interrupted")]
    assert kept == done == len(finished) >= 1
    assert runs == len(_tune_runs(out)) == 2 * kept
    assert sorted(_tune_runs(out)["trial_number"].unique()) == sorted(finished["number"])
    # what was in flight is failed and re-queued, nothing is left RUNNING
    assert not (trials["state"] == "RUNNING").any()
    assert (trials["failure"] == "interrupted").sum() == dropped
    assert (trials["state"] == "WAITING").sum() == dropped
    _wait_for(lambda: not _live(workers), 10, "the driver's child processes to end")


def test_manifest_names_its_driver_and_a_grid_driver_excludes_optuna(tmp_path, capsys):
    path = _sweep(tmp_path / "s.toml", text=_tiny(2, 2))
    out = tmp_path / "out"
    # Optuna drivers share the store (driver lock held shared)...
    with store.driver_lock(out, exclusive=False):
        assert main([str(path), "--out", str(out), "--quiet"]) == 0
    manifest = store.read_manifest(out)
    assert manifest["driver"] == procs.me()
    assert store.status(manifest) == "complete"
    journal = (out / "optuna.journal").read_bytes()
    capsys.readouterr()
    # ...a grid driver holds it exclusively: one line, exit 2, nothing written
    with store.driver_lock(out):
        assert main([str(path), "--out", str(out), "--n-trials", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "another driver is writing this store" in err, err
    assert (out / "optuna.journal").read_bytes() == journal
    assert store.read_manifest(out) == manifest


def test_a_missing_sweep_file_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    assert main([str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(missing) in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_n_trials_0_confirms_the_study_without_new_trials(small_study, capsys):
    path, out = small_study["path"], small_study["out"]
    before = _trials(out)[["number", "state"]]
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(path), "--out", str(out), "--n-trials", "0", "--confirm", "1"]) == 0
    printed = capsys.readouterr()
    assert "none to run (--n-trials 0)" in printed.err
    assert "held-out test seeds" in printed.out and (out / "best.toml").exists()
    pd.testing.assert_frame_equal(_trials(out)[["number", "state"]], before)
    # only confirmation trained (or nothing, if an earlier --confirm stored its runs)
    best = load_sweep(out / "best.toml")
    assert all(m.seed in best.seeds for members in spy.calls for m in members)
    assert store.read_manifest(out)["status"] == "complete"


def test_n_trials_0_needs_confirm_and_a_study(tmp_path, capsys):
    path = _sweep(tmp_path / "s.toml")
    out = tmp_path / "out"
    for extra, expect in ((["--n-trials", "0"], "--confirm"),
                          (["--n-trials", "0", "--confirm", "2"], "needs a study run before"),
                          (["--n-trials", "-1"], "expected an integer >= 0")):
        assert main([str(path), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expect in err, err
        assert not out.exists()


def test_hyperband_pruner_is_sized_from_the_budget(tmp_path):
    settings = parse_optuna({"pruner": "hyperband", "pruner_warmup_steps": 250,
                             "space": {"policy_lr": {"low": 1e-4, "high": 1e-1}}},
                            total_steps=1000)
    pruner = settings.make_pruner(100, 1000)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    # resources are env steps of log points: the first log point after the warm-up, and
    # the budget
    assert (pruner._min_resource, pruner._max_resource) == (300, 1000)
    assert settings.pruner_resources(200, 1000) == (400, 1000)
    assert settings.pruner_resources(200, 100) == (100, 100)
    # a study with it runs (TPE samples within Hyperband's brackets)
    path = _sweep(tmp_path / "s.toml", optuna_extra='pruner = "hyperband"')
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    _check_store_agrees(tmp_path / "out", 6, [11, 12])


def test_a_stop_while_the_study_lock_is_taken_leaves_it_free(tmp_path, monkeypatch):
    # A SIGTERM that lands inside the lock's __enter__ (after its thread lock, during the
    # flock) skipped __exit__ and left the lock held: the stopping driver then hung on its
    # last write of the trials (a CI run of test_sigterm_stops_the_driver_like_ctrl_c).
    import fcntl
    import threading

    from study.sweeps.optuna import _FileLock

    lock = _FileLock(tmp_path / "study.lock")
    real_flock = fcntl.flock

    def stopped(fd: int, op: int) -> None:
        real_flock(fd, op)
        raise KeyboardInterrupt  # as the SIGTERM handler raises it

    monkeypatch.setattr(fcntl, "flock", stopped)
    with pytest.raises(KeyboardInterrupt), lock:
        pass
    monkeypatch.setattr(fcntl, "flock", real_flock)
    taken = threading.Event()

    def take() -> None:
        with lock:
            taken.set()

    worker = threading.Thread(target=take, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert taken.is_set(), "the lock stayed held after the interrupted __enter__"
