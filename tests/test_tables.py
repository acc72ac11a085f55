"""study.tables: the seed table against hand computations, formats, and the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from study.analysis import stats
from study.analysis.tables import (
    compare_tables,
    format_table,
    latex_escape,
    main,
    run_metric,
    seed_table,
)

VALUES = {
    # config: (policy_lr, policy_hidden_sizes, final returns by seed; NaN = diverged)
    "a": (1e-3, "[64, 64]", [310.0, 295.5, 330.25, np.nan, 301.0, 288.0, 322.0, 315.0]),
    "b": (1e-2, "[64, 64]", [250.0, 260.0, 255.0, 240.0, 270.0, 265.0, 245.0, 251.0]),
    "c": (1e-1, "[32]", [100.0, -20.0, 310.0, 5.0, np.nan, np.nan, 150.0, 90.0]),
}


def make_runs(values=VALUES):
    rows = []
    for cid, (lr, hidden, finals) in values.items():
        for seed, v in enumerate(finals):
            rows.append(
                {
                    "run_id": f"{cid}{seed}",
                    "config_id": cid,
                    "seed": seed,
                    "env": "Toy-v0",
                    "total_steps": 1000,
                    "policy_lr": lr,
                    "policy_hidden_sizes": hidden,
                    "gamma": 0.99,
                    "final_return": v,
                    "final_eval_return": np.nan,
                    "status": "diverged" if np.isnan(v) else "ok",
                    "diverged_at_step": 500 if np.isnan(v) else None,
                    "wall_s": 1.0,
                }
            )
    runs = pd.DataFrame(rows)
    runs["diverged_at_step"] = runs["diverged_at_step"].astype("Int64")
    return runs


def make_curves(runs, n_points=20):
    """A short noisy rising curve per run, with a NaN window (no finished episode)."""
    rng = np.random.default_rng(0)
    frames = []
    for rid, final in zip(runs.run_id, runs.final_return.fillna(0.0), strict=True):
        y = np.linspace(-50.0, final, n_points) + rng.normal(0, 1, n_points)
        y[3] = np.nan
        frames.append(
            pd.DataFrame(
                {
                    "run_id": rid,
                    "step": np.arange(1, n_points + 1) * 50,
                    "episode_return": y,
                    "episode_length": 10.0,
                    "entropy": 1.0,
                    "policy_loss": 0.0,
                    "value_loss": 0.0,
                    "explained_variance": 0.0,
                    "grad_norm": 1.0,
                    "eval_return": np.nan,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def write_store(path, runs, curves=None):
    from study import store

    (path / "runs").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": store.FORMAT}))
    runs.to_parquet(path / "runs" / "chunk-0.parquet", index=False)
    if curves is not None:
        (path / "curves").mkdir()
        curves.to_parquet(path / "curves" / "chunk-0.parquet", index=False)
    return path


def finite(cid):
    v = np.array(VALUES[cid][2])
    return v[np.isfinite(v)]


# --------------------------------------------------------------------------------------
# seed_table


def test_numbers_match_hand_computations():
    t = seed_table(make_runs()).set_index("config_id")
    for cid in VALUES:
        v, row = finite(cid), t.loc[cid]
        assert row["n_seeds"] == 8 and row["n"] == v.size
        q25, med, q75 = np.percentile(v, [25, 50, 75])
        assert (row["median"], row["q25"], row["q75"]) == pytest.approx((med, q25, q75))
        assert row["iqr"] == pytest.approx(q75 - q25)
        assert row["mean"] == pytest.approx(v.mean())
        assert row["std"] == pytest.approx(v.std(ddof=1))
        assert row["iqm"] == pytest.approx(st.trim_mean(v, 0.25))
        assert (row["min"], row["max"]) == (v.min(), v.max())
        # 95% percentile bootstrap over the config's seeds, seeded by its id.
        rng = np.random.default_rng(stats.key_seed(0, cid))
        reps = st.trim_mean(v[rng.integers(0, v.size, (2000, v.size))], 0.25, axis=1)
        assert (row["iqm_lo"], row["iqm_hi"]) == pytest.approx(
            tuple(np.quantile(reps, [0.025, 0.975]))
        )


def test_failures_wilson_and_probability_of_improvement():
    t = seed_table(make_runs()).set_index("config_id")
    # Diverged runs: no metric, but failures (curves absent: nothing else can fail).
    assert t["n_failed"].to_dict() == {"a": 1, "b": 0, "c": 2}
    assert t.loc["c", "failure_rate"] == pytest.approx(2 / 8)
    assert (t.loc["c", "failure_lo"], t.loc["c", "failure_hi"]) == pytest.approx(
        stats.wilson_interval(2, 8)
    )
    # P(a seed of the best config beats a seed of this one) = U / (n m).
    assert np.isnan(t.loc["a", "p_improve"])
    for cid in ("b", "c"):
        u = st.mannwhitneyu(finite("a"), finite(cid)).statistic
        assert t.loc[cid, "p_improve"] == pytest.approx(u / (finite("a").size * finite(cid).size))


def test_trapped_runs_count_as_failures_but_keep_their_return():
    runs = make_runs()
    cls = pd.DataFrame(
        {
            "run_id": runs.run_id,
            "classification": np.where(
                runs.status == "diverged",
                "diverged",
                np.where(runs.run_id == "c1", "trapped", "ok"),
            ),
        }
    )
    t = seed_table(runs, classification=cls).set_index("config_id")
    assert t.loc["c", "n_failed"] == 3
    assert t.loc["c", "min"] == -20.0  # the trapped run's return is still in the stats


def test_sorted_best_first_with_median_breaking_iqm_ties():
    t = seed_table(make_runs())
    assert t["config_id"].tolist() == ["a", "b", "c"]
    ties = {
        "x": (1e-3, "[64, 64]", [0, 0, 2, 2, 2, 4, 9, 9]),  # IQM 2.5, median 2
        "y": (1e-2, "[64, 64]", [0, 0, 1, 2, 3, 4, 9, 9]),
    }  # IQM 2.5, median 2.5
    t = seed_table(make_runs(ties))
    assert t["iqm"].tolist() == [2.5, 2.5]
    assert t["config_id"].tolist() == ["y", "x"]


def test_columns_per_seed_and_top():
    t = seed_table(make_runs(), per_seed=True)
    # Only the hyperparameters that differ, first; gamma is the same everywhere.
    assert list(t.columns[:3]) == ["policy_lr", "policy_hidden_sizes", "config_id"]
    assert "gamma" not in t.columns and "env" not in t.columns
    assert [c for c in t.columns if c.startswith("seed_")] == [f"seed_{i}" for i in range(8)]
    row = t.set_index("config_id").loc["c"]
    assert row["seed_1"] == -20.0 and np.isnan(row["seed_4"])
    top = seed_table(make_runs(), top=2)
    assert top["config_id"].tolist() == ["a", "b"]
    # A config's numbers do not depend on which other configs are in the table.
    alone = seed_table(make_runs({"b": VALUES["b"]}))
    assert alone["iqm_lo"].iloc[0] == top.set_index("config_id").loc["b", "iqm_lo"]
    assert seed_table(make_runs()).equals(seed_table(make_runs()))


def test_auc_metric_is_the_nan_aware_mean_of_the_curve():
    runs = make_runs()
    curves = make_curves(runs)
    auc = run_metric(runs, curves, "auc")
    by_hand = curves.groupby("run_id")["episode_return"].apply(lambda y: np.nanmean(y))
    ok = runs.status == "ok"
    assert np.allclose(auc[ok], runs.run_id[ok].map(by_hand))
    assert auc[~ok].isna().all()  # diverged: no metric
    t = seed_table(runs, curves, metric="auc").set_index("config_id")
    assert t.loc["b", "median"] == pytest.approx(np.median(auc[runs.config_id == "b"]))


def test_bad_metric_input():
    from study.config import ConfigError

    runs = make_runs()
    with pytest.raises(ConfigError, match="no run was evaluated"):
        seed_table(runs, metric="final_eval_return")
    with pytest.raises(ConfigError, match="needs curves"):
        seed_table(runs, metric="auc")
    with pytest.raises(ConfigError, match="unknown metric"):
        seed_table(runs, metric="nope")
    with pytest.raises(ConfigError):
        seed_table(runs.iloc[:0])


# --------------------------------------------------------------------------------------
# formats and --check


def test_formats():
    t = seed_table(make_runs(), per_seed=True)
    md = format_table(t, "markdown").splitlines()
    assert md[0].startswith("Seed table of final_return: one row per config, ranked by the "
                            "IQM of final_return")
    assert md[2].startswith("| policy_lr | policy_hidden_sizes | config | seeds | median")
    assert len(md) == 2 + 2 + 3
    assert "| 0.001 | [64, 64] | a | 7 of 8 | 310.00 |" in md[4]
    csv = pd.read_csv(io.StringIO(format_table(t, "csv")))
    assert list(csv.columns) == list(t.columns)
    tex = format_table(t, "latex")
    lines = tex.splitlines()
    assert lines[0].startswith("% Seed table of final_return") and "booktabs" in lines[1]
    assert lines[2].startswith("\\begin{tabular}") and tex.rstrip().endswith("\\end{tabular}")
    assert "policy\\_lr & policy\\_hidden\\_sizes" in tex and "seed\\_0" in tex
    assert "$\\pm$" in tex and "\\%" in tex
    body = "\n".join(line for line in lines if not line.startswith("%"))  # comments: prose
    assert "_" not in body.replace("\\_", "")


def test_latex_phase_captions_are_rows_of_their_own():
    # Regression: an Optuna table's phase captions ended in one backslash (a control space,
    # not a row end), so each caption ran into the first row of its phase.
    runs = make_runs()
    runs["phase"] = ["confirm" if c == "a" else "tune" for c in runs["config_id"]]
    lines = format_table(seed_table(runs), "latex").splitlines()
    captions = [line for line in lines if line.startswith("\\multicolumn")]
    assert len(captions) == 2 and "Held-out confirmation" in captions[0]
    rows = [line for line in lines if "&" in line or line.startswith("\\multicolumn")]
    assert all(line.endswith(" \\\\") for line in rows)


def test_csv_is_data_at_full_precision():
    # Regression: CSV used to round to the Markdown's 2 decimals.
    t = seed_table(make_runs(), per_seed=True)
    csv = pd.read_csv(io.StringIO(format_table(t, "csv")))
    for c in ("median", "mean", "std", "iqm", "iqm_lo", "iqm_hi", "failure_hi", "p_improve",
              "seed_0"):
        np.testing.assert_array_equal(csv[c].to_numpy(float), t[c].to_numpy(float), err_msg=c)
    assert (t["mean"].round(2) != t["mean"]).any()  # there was something to lose


def test_latex_escapes_comparison_signs_and_says_booktabs():
    # Regression: "P(best > this)" came out as "P(best ¿ this)" under LaTeX's OT1 encoding,
    # and nothing said the table needs booktabs.
    tex = format_table(seed_table(make_runs()), "latex")
    assert "P(best \\textgreater{} this)" in tex
    body = tex.replace("\\textgreater{}", "").replace("\\textless{}", "")
    assert ">" not in body and "<" not in body
    assert "% Needs \\usepackage{booktabs}" in tex
    assert latex_escape("a|b<c>d_e & 50% +/- $1") == (
        "a\\textbar{}b\\textless{}c\\textgreater{}d\\_e \\& 50\\% $\\pm$ \\$1")


def test_compare_tables_uses_the_printed_precision():
    csv = format_table(seed_table(make_runs()), "csv")
    assert compare_tables(csv, csv) == []
    # A reference written with 2 decimals (as --format csv wrote them before CSV kept full
    # precision): the full-precision recomputation still matches it...
    new = pd.read_csv(io.StringIO(csv), dtype=str, keep_default_na=False)
    ref = new.copy()
    for c in ("median", "q25", "q75", "iqr", "mean", "std", "iqm", "iqm_lo", "iqm_hi", "min",
              "max"):
        ref[c] = [f"{float(x):.2f}" if x else "" for x in new[c]]
    assert compare_tables(ref.to_csv(index=False), new.to_csv(index=False)) == []
    # ...and a difference at its printed precision is caught.
    new.loc[0, "mean"] = repr(float(ref.loc[0, "mean"]) + 0.01)
    diffs = compare_tables(ref.to_csv(index=False), new.to_csv(index=False))
    assert len(diffs) == 1 and "config a, mean" in diffs[0]
    swapped = pd.concat([new.iloc[[1]], new.iloc[[0]], new.iloc[2:]])
    assert any(
        "row order" in d
        for d in compare_tables(ref.to_csv(index=False), swapped.to_csv(index=False))
    )


# --------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def store(tmp_path):
    runs = make_runs()
    return write_store(tmp_path / "store", runs, make_curves(runs))


def test_cli_formats_out_and_check(store, tmp_path, capsys):
    assert main([str(store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Seed table of final_return") and out.count("\n") == 7
    assert "\n\n| policy_lr |" in out
    for fmt in ("csv", "latex"):
        assert main([str(store), "--format", fmt, "--metric", "auc", "--top", "2"]) == 0
        assert capsys.readouterr().out.count("\n") == {"csv": 3, "latex": 10}[fmt]
    # Write the reference table, then check the same store against it.
    ref = store / "seed_table.csv"
    assert main([str(store), "--format", "csv", "--out", str(ref)]) == 0
    assert main(["--check", str(store)]) == 0
    assert "matches" in capsys.readouterr().out
    # Change one printed number in the reference: exit 1, and the difference is named.
    table = pd.read_csv(ref, dtype=str, keep_default_na=False)
    table.loc[0, "median"] = f"{float(table.loc[0, 'median']) + 1:.2f}"  # the best config
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    table.to_csv(ref_dir / "seed_table.csv", index=False)
    assert main([str(store), "--check", str(ref_dir)]) == 1
    out = capsys.readouterr().out
    assert "differs" in out and "config a, median" in out


def test_cli_bad_input_exit_2(store, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"format": "study-results/1"}))
    nocurves = write_store(tmp_path / "nocurves", make_runs())
    cases = [
        [str(tmp_path / "missing")],  # no such store
        [str(tmp_path)],  # a directory, not a store
        [str(empty)],  # a store without runs
        [str(store), "--metric", "final_eval_return"],  # metric with no data
        [str(nocurves), "--metric", "auc"],  # auc without curves
        [str(store), "--bogus"],  # unknown option
        [str(store), "--top", "0"],
        [str(store), "--format", "html"],
        [str(store), "--check", str(tmp_path / "noref")],  # no seed_table.csv there
        [],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_python_dash_m(store):
    ok = subprocess.run(
        [sys.executable, "-m", "study.tables", str(store), "--format", "csv"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and ok.stdout.startswith("policy_lr,")
    bad = subprocess.run(
        [sys.executable, "-m", "study.tables", str(store / "runs")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def test_a_store_written_by_hand_without_a_manifest_is_analysed(tmp_path, capsys):
    # Data is the interface: runs/ and curves/ in the store's schema, written by pandas.
    (tmp_path / "runs").mkdir()
    (tmp_path / "curves").mkdir()
    rows = [
        {
            "run_id": f"r{c}{s}",
            "config_id": f"c{c}",
            "seed": s,
            "env": "CartPole-v1",
            "total_steps": 1000,
            "policy_lr": [0.1, 0.01][c],
            "final_return": 100.0 * c + s,
            "final_eval_return": np.nan,
            "status": "ok",
            "wall_s": 1.0,
        }
        for c in range(2)
        for s in range(5)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "runs" / "mine.parquet")
    curves = [
        {
            "run_id": r["run_id"],
            "step": k * 100,
            "episode_return": r["final_return"],
            "entropy": 0.5,
        }
        for r in rows
        for k in range(1, 11)
    ]
    pd.DataFrame(curves).to_parquet(tmp_path / "curves" / "mine.parquet")
    assert main([str(tmp_path), "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["median"]) == [102.0, 2.0]
