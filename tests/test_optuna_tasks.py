"""``python -m study.optuna`` across tasks: a sweep with several envs, on tiny budgets.

Every trial trains on CartPole-v1 and Acrobot-v1 with the same tuning seeds, its value is
the IQM of normalized scores over every (task, seed) pair (checked against
study.aggregate on the store's own ``normalized_return``), pruning happens between tasks
only, resuming adds trials, confirmation re-runs every env, and bad input is one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

import study.trainer.population as population
from study import store
from study.analysis import aggregate
from study.sweeps.optuna import TRIALS_FILE, main
from study.sweeps.search_space import OptunaSettings
from study.sweeps.spec import load_sweep

BASE = """\
name = "tasks"
env = ["CartPole-v1", "Acrobot-v1"]
total_steps = 800
log_every = 200
seeds = [11, 12, 13, 14]
[hyperparameters]
num_envs = 4
policy_hidden_sizes = [8]
value_hidden_sizes = [8]
[overrides."Acrobot-v1"]
total_steps = 1200
num_envs = 2
[normalize]
"CartPole-v1" = [20.0, 500.0]
[optuna]
n_trials = 4
seeds_per_trial = 2
trials_per_batch = 2
pruner = "{pruner}"
pruner_startup_trials = 0
{extra}
[optuna.space]
policy_lr = {{ low = 1e-4, high = 1e-1, log = true }}
gamma = {{ choices = [0.9, 0.99] }}
"""
ENVS = ("CartPole-v1", "Acrobot-v1")
REFS = {"CartPole-v1": (20.0, 500.0), "Acrobot-v1": (-500.0, -100.0)}


def _sweep(path: Path, pruner: str = "none", extra: str = "") -> Path:
    path.write_text(BASE.format(pruner=pruner, extra=extra))
    return path


def _trials(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / TRIALS_FILE).sort_values("number").reset_index(drop=True)


def _tune(out: Path) -> pd.DataFrame:
    runs = store.load_runs(out)
    return runs[runs["phase"] == "tune"]


class _Spy:
    """Wraps train_population: records each population's env and members."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[population.Member]]] = []
        self._real = population.train_population

    def __call__(self, env_id, members, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.calls.append((env_id, list(members)))
        return self._real(env_id, members, *args, **kwargs)


@pytest.fixture(scope="module")
def tasks_study(tmp_path_factory):
    """2 trials, then resumed to 4 (batches of 2 trials x 2 seeds x 2 envs)."""
    d = tmp_path_factory.mktemp("tasks")
    path = _sweep(d / "tasks.toml")
    out = d / "out"
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(path), "--out", str(out), "--n-trials", "2", "--quiet"]) == 0
        first = _trials(out)
        assert main([str(path), "--out", str(out), "--quiet"]) == 0
    return {"path": path, "out": out, "first": first, "spy": spy}


def test_every_trial_trains_on_every_env_with_the_same_seeds(tasks_study):
    out, spy = tasks_study["out"], tasks_study["spy"]
    trials = _trials(out)
    assert tasks_study["first"]["number"].tolist() == [0, 1]
    assert trials["number"].tolist() == [0, 1, 2, 3]
    assert (trials["state"] == "COMPLETE").all()
    runs = _tune(out)
    assert runs["run_id"].is_unique and len(runs) == 4 * 2 * 2
    for _, group in runs.groupby("trial_number"):
        assert sorted(zip(group["env"], group["seed"], strict=True)) == sorted(
            (e, s) for e in ENVS for s in (11, 12))
        assert (group["trial_state"] == "COMPLETE").all()
    # one population per env per batch, the env's own budget and overrides applied
    assert [env for env, _ in spy.calls] == [*ENVS, *ENVS]
    for env, members in spy.calls:
        assert len(members) == 4
        assert {m.hyperparameters["num_envs"] for m in members} == {
            2 if env == "Acrobot-v1" else 4}
    budget = runs.groupby("env")["total_steps"].first()
    assert budget.to_dict() == {"Acrobot-v1": 1200, "CartPole-v1": 800}
    # the trial's config id is the same on its runs of one env, different across envs
    assert (runs.groupby(["trial_number", "env"])["config_id"].nunique() == 1).all()
    assert (runs.groupby("trial_number")["config_id"].nunique() == 2).all()
    manifest = store.read_manifest(out)
    assert manifest["env"] == list(ENVS) and manifest["status"] == "complete"


def test_trial_value_is_the_iqm_of_normalized_scores_over_tasks_and_seeds(tasks_study):
    out = tasks_study["out"]
    runs = _tune(out)
    for env, (low, high) in REFS.items():
        mine = runs[runs["env"] == env]
        assert np.allclose(mine["normalized_return"],
                           (mine["final_return"] - low) / (high - low))
    for _, t in _trials(out).iterrows():
        mine = runs[runs["trial_number"] == t["number"]]
        x = mine.pivot_table(index="seed", columns="env", values="normalized_return")
        assert t["value"] == pytest.approx(float(aggregate.iqm(x.to_numpy())), abs=1e-12)
        assert len(t["intermediate_steps"]) == 0  # pruner none: nothing reported


def test_aggregate_and_tables_read_the_study(tasks_study, capsys):
    out = tasks_study["out"]
    assert aggregate.main([str(out), "--reps", "200"]) == 0
    text = capsys.readouterr().out
    assert "tuning runs of the study's COMPLETE trials" in text
    assert "over 2 tasks (Acrobot-v1, CartPole-v1) x 2 seeds" in text
    table = text.split("\n\n", 1)[1]
    assert table.count("\n") == 2 + 4  # header, rule, one row per trial
    assert aggregate.main([str(out), "--phase", "confirm"]) == 2
    assert "no confirm runs" in capsys.readouterr().err
    from study.analysis.tables import main as tables_main

    assert tables_main([str(out)]) == 0


def test_resume_after_complete_trains_nothing(tasks_study):
    spy = _Spy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(population, "train_population", spy)
        assert main([str(tasks_study["path"]), "--out", str(tasks_study["out"]),
                     "--quiet"]) == 0
    assert spy.calls == []
    assert len(_trials(tasks_study["out"])) == 4


def test_confirm_reruns_every_env_and_best_toml_is_a_suite_sweep(tasks_study, capsys):
    out = tasks_study["out"]
    assert main([str(tasks_study["path"]), "--out", str(out), "--n-trials", "0",
                 "--confirm", "1", "--quiet"]) == 0
    runs = store.load_runs(out)
    conf = runs[runs["phase"] == "confirm"]
    assert sorted(conf["env"].unique()) == sorted(ENVS)
    assert conf.groupby("env")["seed"].nunique().eq(10).all()
    best = load_sweep(out / "best.toml")
    acrobot = best.budget("Acrobot-v1")
    assert best.envs == ENVS and (acrobot.total_steps, acrobot.log_every) == (1200, 200)
    assert best.normalize == {"CartPole-v1": (20.0, 500.0)}
    assert best.configs("Acrobot-v1")[0]["num_envs"] == 2
    assert aggregate.main([str(out), "--phase", "confirm", "--reps", "100"]) == 0
    assert "held-out confirmation runs" in capsys.readouterr().out


def test_report_aggregates_held_out_and_tuning_runs_apart(tasks_study, tmp_path):
    from study.report import build as report

    out = tasks_study["out"]
    if not (out / "best.toml").exists():  # run alone: confirm first
        assert main([str(tasks_study["path"]), "--out", str(out), "--n-trials", "0",
                     "--confirm", "1", "--quiet"]) == 0
    assert report.main([str(out), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    section = md[md.index("## Across tasks"):md.index("## Learning curves")]
    assert section.index("Of the held-out confirmation runs") < section.index(
        "Of the tuning runs of the study's COMPLETE trials")
    tables = tmp_path / "r" / "tables"
    tune = pd.read_csv(tables / "aggregate.csv")
    assert len(tune) == 4 and (tune["seeds"] == 2).all() and (tune["tasks"] == 2).all()
    conf = pd.read_csv(tables / "aggregate_confirm.csv")
    assert len(conf) == 1 and (conf["seeds"] == 10).all()
    assert "figures/aggregate_profiles.png" in section


class _PruneOdd(optuna.pruners.BasePruner):
    """Prunes odd-numbered trials at their first report."""

    def prune(self, study, trial):  # noqa: ANN001
        return trial.number % 2 == 1


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_pruning_happens_between_tasks_only(tmp_path, monkeypatch, n_jobs):
    monkeypatch.setattr(OptunaSettings, "make_pruner", lambda self, *a: _PruneOdd())
    path = _sweep(tmp_path / "s.toml", pruner="median")
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--quiet", "--n-jobs", str(n_jobs)]) == 0
    trials = _trials(out)
    odd = (trials["number"] % 2 == 1).to_numpy()
    assert (trials.loc[odd, "state"] == "PRUNED").all()
    assert (trials.loc[~odd, "state"] == "COMPLETE").all()
    # one report per trial, after its first task, at step 1: its normalized CartPole IQM
    assert trials["intermediate_steps"].map(list).tolist() == [[1]] * 4
    runs = _tune(out)
    for _, t in trials.iterrows():
        mine = runs[runs["trial_number"] == t["number"]]
        assert (mine["status"] == "ok").all()  # no task is cut short
        envs = sorted(mine["env"].unique())
        assert envs == (["CartPole-v1"] if t["number"] % 2 else sorted(ENVS))
        cart = mine.loc[mine["env"] == "CartPole-v1", "normalized_return"]
        assert t["intermediate_values"][0] == pytest.approx(float(cart.mean()))
    assert aggregate.main([str(out), "--reps", "100"]) == 0  # pruned trials left out


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda t: t.replace('env = ["CartPole-v1", "Acrobot-v1"]',
                             'env = ["CartPole-v1", "CartPoleSwingUp-v1"]')
         .replace('[overrides."Acrobot-v1"]', '[overrides."CartPoleSwingUp-v1"]'),
         "task 'CartPoleSwingUp-v1' has no score references"),
        (lambda t: t.replace("num_envs = 2\n", "num_envs = 2\ngamma = 0.9\n"),
         '[overrides."Acrobot-v1"] gamma is searched'),
        (lambda t: t.replace("pruner_startup_trials = 0",
                             "pruner_startup_trials = 0\npruner_warmup_steps = 200"),
         "pruner_warmup_steps is invalid for a study across tasks"),
        (lambda t: t.replace('"CartPole-v1" = [20.0, 500.0]', '"Pendulum-v1" = [0.0, 1.0]'),
         "names an environment the sweep does not run"),
        (lambda t: t.replace('"CartPole-v1" = [20.0, 500.0]', '"CartPole-v1" = [5.0, 5.0]'),
         "low < high"),
    ],
)
def test_bad_studies_across_tasks_are_one_line_errors(tmp_path, capsys, change, expect):
    path = tmp_path / "bad.toml"
    path.write_text(change(BASE.format(pruner="median", extra="")))
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expect in err, err
    assert not out.exists()


def test_a_study_resumed_with_other_per_env_budgets_is_refused(tasks_study, tmp_path,
                                                                capsys):
    text = Path(tasks_study["path"]).read_text()
    other = tmp_path / "tasks.toml"
    other.write_text(text.replace("total_steps = 1200", "total_steps = 1400"))
    journal = tasks_study["out"] / "optuna.journal"
    assert main([str(other), "--out", str(tmp_path / "o"), "--storage", str(journal)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "was run with overrides" in err and "1200" in err and "1400" in err, err
