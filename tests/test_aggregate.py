"""Studies across environments: sweeps over several envs, normalised scores, and the
rliable-style aggregates of ``python -m study.aggregate``.

rliable itself does not import beside pandas 3 here (its ``arch`` dependency fails, and
arch 8 rejects rliable's bootstrap arguments), so the aggregates are checked against
independent implementations of rliable's definitions written out in this file (scipy's
``trim_mean`` and ``mannwhitneyu``, explicit loops for the bootstrap and the profiles).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from study import store
from study.analysis import aggregate as agg
from study.analysis.scores import REFERENCES, SOLVED_SCORES
from study.sweeps.grid import main as grid_main

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("shape", [(10, 3), (7, 5), (20, 1)])
def test_metrics_follow_rliable_definitions(shape):
    x = RNG.normal(0.5, 0.4, shape)
    assert agg.iqm(x) == pytest.approx(st.trim_mean(x.ravel(), 0.25))
    assert agg.median(x) == pytest.approx(np.median(x.mean(axis=0)))
    assert agg.mean(x) == pytest.approx(np.mean(x.mean(axis=0)))
    assert agg.optimality_gap(x) == pytest.approx(1.0 - np.mean(np.minimum(x, 1.0)))
    taus = np.linspace(-1, 2, 7)
    expect = [np.mean([np.mean(x[:, t] > tau) for t in range(shape[1])]) for tau in taus]
    np.testing.assert_allclose(agg.performance_profile(x, taus), expect)


def test_probability_of_improvement_is_mann_whitney_per_task():
    x, y = RNG.normal(0.6, 0.2, (9, 4)), RNG.normal(0.5, 0.2, (9, 4))
    y[0, 0] = x[0, 0]  # a tie counts one half
    expect = np.mean([st.mannwhitneyu(x[:, t], y[:, t]).statistic / 81 for t in range(4)])
    assert agg.probability_of_improvement(x, y) == pytest.approx(expect)
    assert agg.probability_of_improvement(x, y) + agg.probability_of_improvement(y, x) == \
        pytest.approx(1.0)


def test_stratified_bootstrap_resamples_runs_within_each_task():
    x = RNG.normal(size=(6, 3))
    reps = agg.stratified_bootstrap(x, 50, seed=3)
    idx = np.random.default_rng(3).integers(0, 6, size=(50, 6, 3))
    for b in range(50):
        for t in range(3):
            np.testing.assert_array_equal(reps[b, :, t], x[idx[b, :, t], t])
    # every replicate's column t holds only task t's scores
    for t in range(3):
        assert set(reps[:, :, t].ravel()) <= set(x[:, t])


def test_confidence_intervals_bracket_the_point_and_collapse_without_spread():
    x = RNG.normal(0.5, 0.3, (12, 3))
    table = agg.aggregate_table({("a",): x, ("b",): np.full((12, 3), 0.4)}, ["cfg"],
                                n_boot=500)
    a = table.set_index("cfg").loc["a"]
    for m in agg.METRICS:
        assert a[f"{m}_lo"] <= a[m] <= a[f"{m}_hi"]
    b = table.set_index("cfg").loc["b"]
    assert b["iqm_lo"] == b["iqm"] == b["iqm_hi"] == pytest.approx(0.4)


def test_shipped_solved_scores_are_gymnasiums_thresholds():
    for env, high in SOLVED_SCORES.items():
        threshold = gym.spec(env).reward_threshold
        assert high == (threshold if threshold is not None else 0.0), env
    assert all(lo < hi for lo, hi in REFERENCES.values())


MULTI = """\
name = "multi"
env = ["CartPole-v1", "Acrobot-v1"]
total_steps = 2000
log_every = 1000
seeds = [0, 1, 2]
[hyperparameters]
num_envs = 4
policy_hidden_sizes = [16]
value_hidden_sizes = [16]
[grid]
policy_lr = [0.01, 0.001]
[overrides."Acrobot-v1"]
total_steps = 1000
num_envs = 2
[normalize]
"CartPole-v1" = [0, 500]
"""


@pytest.fixture(scope="module")
def multi_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    (tmp / "m.toml").write_text(MULTI)
    assert grid_main([str(tmp / "m.toml"), "--out", str(tmp / "out"), "--n-jobs", "1",
                      "--quiet"]) == 0
    return tmp / "out"


def test_a_sweep_over_envs_runs_every_config_on_every_env(multi_store, capsys):
    runs = store.load_runs(multi_store)
    assert sorted(runs["env"].unique()) == ["Acrobot-v1", "CartPole-v1"]
    per_env = runs.groupby("env").agg(n=("run_id", "size"), steps=("total_steps", "first"),
                                     envs=("num_envs", "first"))
    assert per_env.loc["CartPole-v1"].tolist() == [6, 2000, 4]
    assert per_env.loc["Acrobot-v1"].tolist() == [6, 1000, 2]  # the per-env overrides
    cp = runs[runs["env"] == "CartPole-v1"]
    np.testing.assert_allclose(cp["normalized_return"], cp["final_return"] / 500)
    ac = runs[runs["env"] == "Acrobot-v1"]
    low, high = REFERENCES["Acrobot-v1"]  # shipped references where the sweep gives none
    np.testing.assert_allclose(ac["normalized_return"], (ac["final_return"] - low) / (high - low))
    # the dry run shows the populations per env; a resume trains nothing
    capsys.readouterr()
    sweep = multi_store.parent / "m.toml"
    assert grid_main([str(sweep), "--out", str(multi_store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "per env:     CartPole-v1: 0 population(s); Acrobot-v1: 0 population(s)" in out
    assert "runs:        12 (12 already stored, 0 to run)" in out


def test_aggregate_cli_tables(multi_store, tmp_path, capsys):
    assert agg.main([str(multi_store), "--format", "csv", "--reps", "300",
                     "--figure", str(tmp_path / "profiles.png")]) == 0
    csv = capsys.readouterr().out
    table = pd.read_csv(pd.io.common.StringIO(csv))
    assert (np.diff(table["iqm"]) <= 0).all()  # best IQM first
    assert list(table.columns[:4]) == ["policy_lr", "iqm", "iqm_lo", "iqm_hi"]
    assert (table["tasks"] == 2).all() and (table["seeds"] == 3).all()
    # the numbers are those of the score matrices
    runs = store.load_runs(multi_store)
    for _, row in table.iterrows():
        mine = runs[runs["policy_lr"] == row["policy_lr"]]
        x = mine.pivot(index="seed", columns="env", values="normalized_return").to_numpy()
        assert row["iqm"] == pytest.approx(st.trim_mean(x.ravel(), 0.25))
    assert (tmp_path / "profiles.png").stat().st_size > 0
    assert agg.main([str(multi_store), "--format", "latex", "--reps", "100"]) == 0
    latex = capsys.readouterr().out
    assert "booktabs" in latex and "\\toprule" in latex and "optimality\\_gap" in latex
    assert agg.main([str(multi_store), "--reps", "100"]) == 0
    md = capsys.readouterr().out
    assert "P(best > second best)" in md and "| policy_lr | iqm |" in md


def test_report_of_a_multi_env_store_has_the_aggregate_section(multi_store, tmp_path, capsys):
    from study.report import build as report

    out = tmp_path / "report"
    assert report.main([str(multi_store), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Across tasks" in md and "P(best > second best)" in md
    assert md.index("## Across tasks") < md.index("## Learning curves")
    # the numbers are study.aggregate's own, table and sample-efficiency curves alike
    capsys.readouterr()
    eff = tmp_path / "eff.png"
    assert agg.main([str(multi_store), "--format", "csv", "--efficiency", str(eff)]) == 0
    assert (out / "tables" / "aggregate.csv").read_text() == capsys.readouterr().out
    assert (out / "tables" / "aggregate_efficiency.csv").read_text() == (
        eff.with_suffix(".csv").read_text())
    for stem in ("aggregate_profiles", "aggregate_efficiency"):
        for ext in ("png", "svg"):
            assert (out / "figures" / f"{stem}.{ext}").stat().st_size > 0
        assert f"figures/{stem}.png" in md
    assert (out / "tables" / "aggregate.tex").read_text().startswith("% needs")
    assert "Across tasks" in (out / "index.html").read_text()


def test_report_says_why_a_store_is_not_aggregated(tmp_path, capsys):
    from study.report import build as report

    sweep = tmp_path / "s.toml"
    sweep.write_text(MULTI.replace('"Acrobot-v1"]', '"CartPoleSwingUp-v1"]').replace(
        '[overrides."Acrobot-v1"]', '[overrides."CartPoleSwingUp-v1"]'))
    store_dir = tmp_path / "out"
    assert grid_main([str(sweep), "--out", str(store_dir), "--n-jobs", "1", "--quiet"]) == 0
    assert report.main([str(store_dir), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Across tasks" in md and "Not aggregated (runs): task 'CartPoleSwingUp-v1'" in md
    assert not (tmp_path / "r" / "tables" / "aggregate.csv").exists()


def test_aggregate_refuses_a_task_without_references(tmp_path, capsys):
    sweep = tmp_path / "s.toml"
    sweep.write_text(MULTI.replace('"Acrobot-v1"]', '"CartPoleSwingUp-v1"]').replace(
        '[overrides."Acrobot-v1"]', '[overrides."CartPoleSwingUp-v1"]').replace(
        "total_steps = 1000\n", "total_steps = 1000\n", 1))
    out = tmp_path / "out"
    assert grid_main([str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert agg.main([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'CartPoleSwingUp-v1' has no normalized score" in err
    assert '[normalize] "CartPoleSwingUp-v1" = [low, high]' in err


@pytest.mark.parametrize(("edit", "expect"), [
    (lambda s: s.replace('"Acrobot-v1"]', '"Acrobat-v1"]'), "Acrobat-v1"),
    (lambda s: s.replace('"CartPole-v1" = [0, 500]', '"CartPole-v1" = [500, 0]'),
     "low < high"),
    (lambda s: s.replace('"CartPole-v1" = [0, 500]', '"Pendulum-v1" = [-1200, 0]'),
     "names an environment the sweep does not run"),
    (lambda s: s.replace('[overrides."Acrobot-v1"]', '[overrides."Pendulum-v1"]'),
     "names an environment the sweep does not run"),
    (lambda s: s.replace('env = ["CartPole-v1", "Acrobot-v1"]',
                         'env = ["CartPole-v1", "CartPole-v1"]'), "twice"),
    (lambda s: s.replace("num_envs = 2", "policy_lr = 0.1"), "is a [grid] axis"),
])
def test_bad_multi_env_sweeps_are_refused(tmp_path, capsys, edit, expect):
    sweep = tmp_path / "bad.toml"
    sweep.write_text(edit(MULTI))
    assert grid_main([str(sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists()


def test_env_as_a_grid_axis_is_the_same_sweep(tmp_path, capsys):
    from study.sweeps.spec import load_sweep

    a = tmp_path / "a.toml"
    a.write_text(MULTI)
    b = tmp_path / "b.toml"
    b.write_text(MULTI.replace('env = ["CartPole-v1", "Acrobot-v1"]\n', "").replace(
        "[grid]\n", '[grid]\nenv = ["CartPole-v1", "Acrobot-v1"]\n'))
    assert [r.run_id for r in load_sweep(a).runs()] == [r.run_id for r in load_sweep(b).runs()]


def test_grid_importance_finds_the_hyperparameter_that_matters():
    from study.analysis.importance import importance_table

    rows = []
    rng = np.random.default_rng(0)
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        for gamma in (0.9, 0.99, 0.999):
            for seed in range(4):
                for env in ("A", "B"):
                    score = np.log10(lr) + 0.05 * rng.normal()  # only lr matters
                    rows.append({"policy_lr": lr, "gamma": gamma, "seed": seed, "env": env,
                                 "normalized_return": score, "final_return": 10 * score})
    table = importance_table(pd.DataFrame(rows), ["policy_lr", "gamma"])
    assert table.index[0] == "policy_lr" and table.loc["policy_lr", "importance"] > 0.9
    assert table.loc["policy_lr", "top_on_seeds"] == 1.0
    assert table.loc["policy_lr", "A"] > table.loc["gamma", "A"]


def test_aggregate_cli_importance(multi_store, capsys):
    assert agg.main([str(multi_store), "--reps", "100", "--importance"]) == 0
    out = capsys.readouterr().out
    assert "Hyperparameter importance (PED-ANOVA" in out and "| hyperparameter |" in out


def test_sample_efficiency_curves(multi_store, tmp_path):
    runs = store.load_runs(multi_store)
    curves = store.load_curves(multi_store)
    refs = agg.score_references(multi_store, ["Acrobot-v1", "CartPole-v1"])
    assert refs["CartPole-v1"] == (0.0, 500.0)  # the sweep's [normalize], not the shipped
    assert refs["Acrobot-v1"] == REFERENCES["Acrobot-v1"]
    eff = agg.efficiency_curves(runs, curves, ["policy_lr"], refs, n_boot=200)
    assert set(eff["policy_lr"]) == {0.01, 0.001}
    assert ((eff["iqm_lo"] <= eff["iqm"] + 1e-12) & (eff["iqm"] <= eff["iqm_hi"] + 1e-12)).all()
    # at the end of the budget: the IQM of every (seed, task)'s last normalized point
    last = eff[(eff["policy_lr"] == 0.01) & (eff["fraction"] == 1.0)]["iqm"].item()
    mine = runs[runs["policy_lr"] == 0.01]
    ends = curves[curves["run_id"].isin(mine["run_id"])].merge(
        mine[["run_id", "env", "total_steps"]], on="run_id")
    ends = ends[ends["step"] == ends["total_steps"]]
    norm = [(r.episode_return - refs[r.env][0]) / (refs[r.env][1] - refs[r.env][0])
            for r in ends.itertuples()]
    assert len(norm) == 6 and last == pytest.approx(st.trim_mean(norm, 0.25))
    assert agg.main([str(multi_store), "--reps", "100", "--efficiency",
                     str(tmp_path / "eff.png")]) == 0
    assert (tmp_path / "eff.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / "eff.csv")) == len(eff)
