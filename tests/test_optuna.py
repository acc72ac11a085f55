"""``python -m study.optuna`` end to end, on tiny CartPole budgets with the real trainer.

Covers validation (exit 2, one line, nothing written), batched trials trained as one
population per structural group, trials.parquet agreeing with the store, pruning,
resuming, stale trials of a killed process, two processes on one journal file and on
PostgreSQL (when STUDY_TEST_POSTGRES_URL is set), and --confirm with best.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import study.population as population
from study import store
from study.config import ConfigError, structural_key
from study.optuna import TRIALS_FILE, derive_seeds, main
from study.search_space import OptunaSettings, aggregate, parse_optuna
from study.sweep import load_sweep

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

    from study import stats

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
    from study.grid import main as grid_main

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
    monkeypatch.setattr(OptunaSettings, "make_pruner", lambda self, log_every: _PruneOdd())
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
import study.optuna as so

def die(unit, reporter):  # the driver is killed -9 while its first batch trains
    os.kill(os.getpid(), signal.SIGKILL)

so.train_unit = die
sys.exit(so.main(sys.argv[1:]))
"""


def test_running_trials_of_a_killed_process_are_failed_and_requeued(tmp_path):
    text = BASE.format(optuna_extra="", space=SPACE).replace(
        "n_trials = 6", "n_trials = 4").replace("trials_per_batch = 3", "trials_per_batch = 2")
    path = _sweep(tmp_path / "s.toml", text=text)
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(path), "--out", str(out),
                           "--quiet"], env=_env(), cwd=tmp_path, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    left = optuna.load_study(study_name="opt", storage=journal).get_trials()
    assert [t.state for t in left] == [optuna.trial.TrialState.RUNNING] * 2

    assert main([str(path), "--out", str(out), "--quiet"]) == 0
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
    from study.optuna import _check_out

    out = tmp_path / "out"
    out.mkdir()
    for name in ("optuna.journal", "optuna.journal.study-lock", "sweep.toml",
                 ".tmp-manifest.json.abc123"):
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
    from study.optuna import _check_storage

    study = optuna.load_study(study_name=name, storage=_check_storage(POSTGRES_URL))
    assert sorted(t.number for t in study.trials) == list(range(8))
    optuna.delete_study(study_name=name, storage=_check_storage(POSTGRES_URL))
