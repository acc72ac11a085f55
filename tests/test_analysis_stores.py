"""Tables, failures and report on stores written by the real drivers: an interrupted grid,
a sweep edited under the same name (two budgets), and an Optuna study with held-out
confirmation whose ``trials.parquet`` is the project's own."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from study import procs, store
from study.analysis import failures, stats, tables
from study.report import build as report
from study.sweeps import grid

SWEEP = """
name = "tiny-notes"
env = "CartPole-v1"
total_steps = {steps}
log_every = 100
seeds = [0, 1]

[hyperparameters]
num_envs = 2
n_steps = 5
policy_hidden_sizes = [8]
value_hidden_sizes = [8]

[grid]
policy_lr = [0.001, 0.01]
"""


def _grid(tmp: Path, out: Path, steps: int = 400) -> Path:
    sweep = tmp / f"tiny-{steps}.toml"
    sweep.write_text(SWEEP.format(steps=steps))
    argv = [str(sweep), "--out", str(out), "--n-jobs", "1", "--quiet", "--population-size", "1"]
    assert grid.main(argv) == 0
    return sweep


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2 configs x 2 seeds grid, one run per chunk file."""
    base = tmp_path_factory.mktemp("grid")
    out = base / "store"
    _grid(base, out)
    return out


def _interrupted(complete: Path, dst: Path) -> Path:
    """The grid as a driver killed after two of its four runs leaves it: two runs files,
    the manifest still "running" and naming a process that is gone."""
    shutil.copytree(complete, dst)
    for f in sorted((dst / "runs").glob("*.parquet"))[2:]:
        f.unlink()
    manifest = store.read_manifest(dst)
    manifest.update(status="running", finished=None,
                    driver={**procs.me(), "start": "not this process"})
    manifest["command"] += " --fresh"  # resuming must not repeat a --fresh
    store.write_manifest(dst, manifest)
    return dst


# --------------------------------------------------------------------------------------
# item 2: an incomplete store says so at the top of every output


def test_incomplete_store_is_named_in_tables_failures_and_report(complete, tmp_path, capsys):
    root = _interrupted(complete, tmp_path / "store")
    assert store.status(store.read_manifest(root)) == "interrupted"
    note = failures.incomplete_note(root)
    assert note is not None and note.startswith(
        "incomplete: 2 of 4 planned runs (interrupted); resume with: python -m study.grid ")
    assert "--fresh" not in note and "tiny-400.toml" in note
    assert failures.incomplete_note(complete) is None  # the finished store

    assert tables.main([str(root)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"**{note}**\n\nSeed table of final_return")
    assert tables.main([str(root), "--format", "csv"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("policy_lr,config_id,") and "incomplete" not in out.out
    assert out.err == f"note: {note}\n"  # CSV is data: the note goes to stderr
    assert tables.main([str(root), "--format", "latex"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith(f"% {note}\n") and out.err == f"note: {note}\n"

    assert failures.main([str(root)]) == 0
    md = capsys.readouterr().out
    assert md.splitlines()[:3] == [f"# Failure analysis: {root}", "", f"**{note}**"]

    res = report.build_report(root, tmp_path / "report")
    md = (res.out / "report.md").read_text()
    assert md.splitlines()[2] == f"> **{note}**"
    page = (res.out / "index.html").read_text()
    assert '<blockquote class="note"><strong>incomplete: 2 of 4 planned runs' in page


# --------------------------------------------------------------------------------------
# item 1: a sweep edited under the same name mixes budgets


def test_a_changed_budget_is_a_column_and_a_note(complete, tmp_path, capsys):
    root = tmp_path / "store"
    shutil.copytree(complete, root)
    _grid(tmp_path, root, steps=600)  # total_steps edited, same name, same --out
    runs = store.load_runs(root)
    assert len(runs) == 8 and sorted(runs["total_steps"].unique()) == [400, 600]
    # Same hyperparameters at two budgets: rows that looked duplicated now name their budget.
    t = tables.seed_table(runs, store.load_curves(root))
    assert list(t.columns[:3]) == ["total_steps", "policy_lr", "config_id"]
    assert sorted(zip(t["total_steps"], t["policy_lr"], strict=True)) == [
        (400, 0.001), (400, 0.01), (600, 0.001), (600, 0.01)]
    capsys.readouterr()
    assert tables.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("budgets differ: total_steps 400 (4 runs), 600 (4 runs).")
    assert "| total_steps | policy_lr | config |" in out
    labels = failures.config_labels(runs)
    assert sorted(labels.values())[0] == "total_steps=400, policy_lr=0.001"
    res = report.build_report(root, tmp_path / "report")
    md = (res.out / "report.md").read_text()
    assert "> budgets differ: total_steps 400 (4 runs), 600 (4 runs)." in md
    assert "total_steps=600, policy_lr=0.01" in md


# --------------------------------------------------------------------------------------
# items 3 and 4: an Optuna study with held-out confirmation


OPTUNA_SWEEP = """
name = "tiny-opt"
env = "CartPole-v1"
total_steps = 800
log_every = 200
seeds = [11, 12, 13, 14]
[hyperparameters]
num_envs = 4
policy_hidden_sizes = [8]
value_hidden_sizes = [8]
[optuna]
n_trials = 4
seeds_per_trial = 2
trials_per_batch = 4
test_seeds = 4
confirm_top = 2
[optuna.space]
policy_lr = { low = 1e-4, high = 1e-1, log = true }
gamma = { choices = [0.9, 0.99] }
"""


@pytest.fixture(scope="module")
def optuna_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from study.sweeps.optuna import main as optuna_main

    base = tmp_path_factory.mktemp("optuna")
    sweep = base / "opt.toml"
    sweep.write_text(OPTUNA_SWEEP)
    out = base / "store"
    assert optuna_main([str(sweep), "--out", str(out), "--quiet"]) == 0
    assert (out / "best.toml").is_file() and (out / "trials.parquet").is_file()
    return out


def test_tuning_and_held_out_seeds_are_ranked_apart(optuna_store, capsys):
    runs, curves = store.load(optuna_store)
    assert set(runs["phase"]) == {"tune", "confirm"}
    t = tables.seed_table(runs, curves)
    assert t.columns[0] == "phase" and t["phase"].iloc[0] == "confirm"
    conf, tune = t[t["phase"] == "confirm"], t[t["phase"] == "tune"]
    assert (conf["n_seeds"] == 4).all() and (tune["n_seeds"] == 2).all()
    assert len(conf) == 2 and len(tune) == runs.loc[runs.phase == "tune", "config_id"].nunique()
    # The confirmation is ranked by its held-out seeds only: IQM over the test runs.
    held = runs[runs["phase"] == "confirm"]
    by_hand = {c: stats.iqm(g["final_return"].to_numpy(float))
               for c, g in held.groupby("config_id")}
    np.testing.assert_allclose(conf["iqm"], [by_hand[c] for c in conf["config_id"]])
    assert list(conf["iqm"]) == sorted(conf["iqm"], reverse=True)
    assert np.isnan(conf["p_improve"].iloc[0]) and np.isnan(tune["p_improve"].iloc[0])
    md = tables.format_table(t, "markdown")
    first, second = md.index("Held-out confirmation:"), md.index("Tuning:")
    assert first < second and md.count("| config |") == 2
    csv = pd.read_csv(io.StringIO(tables.format_table(t, "csv")))
    assert list(csv["phase"]) == list(t["phase"])


def test_report_of_a_study_without_journal_reads_trials_parquet(optuna_store, tmp_path):
    # A PostgreSQL study leaves no journal in the store: the report rebuilds the study
    # from the trials.parquet that study.optuna writes (intermediate values as lists).
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    root = tmp_path / "store"
    shutil.copytree(optuna_store, root)
    journal = JournalStorage(JournalFileBackend(str(root / "optuna.journal")))
    want = optuna.load_study(study_name="tiny-opt", storage=journal).trials
    for f in root.glob("optuna.journal*"):
        f.unlink()
    study, source = report._optuna_study(root)
    assert source == "`trials.parquet`", source
    assert [t.number for t in study.trials] == [t.number for t in want]
    for got, exp in zip(study.trials, want, strict=True):
        assert got.intermediate_values == pytest.approx(exp.intermediate_values)
        assert got.state == exp.state and got.params == pytest.approx(exp.params)
    res = report.build_report(root, tmp_path / "report")
    for stem in ("optuna_history", "optuna_intermediate"):
        assert (res.out / "figures" / f"{stem}.png").is_file(), res.notes
    md = (res.out / "report.md").read_text()
    assert "Read from `trials.parquet`" in md
    assert "Held-out confirmation: the top configs re-run on the test seeds" in md
    assert "An Optuna study: " in md and "The figures show the tuning runs" in md
    winner = int((root / "best.toml").read_text().split("trial ")[1].split(",")[0])
    assert f"`best.toml` names trial {winner} (" in md
