"""study.failures on synthetic sweeps whose trapped, learning and diverged runs are known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from study.analysis import stats
from study.analysis.failures import (
    CLASSES,
    Mode,
    assign_modes,
    classify_runs,
    failure_report,
    find_modes,
    main,
)

N_POINTS, TOTAL = 100, 100_000


def make_sweep(spec, seed=0, n_points=N_POINTS):
    """(runs, curves) for ``spec = [(config_id, {hp: value}, [kind, ...]), ...]``.

    Kinds: ("success", level[, start]) sigmoid rise from -50 (or ``start``) to ``level``,
    entropy decaying slowly; ("flat", level) at ``level`` from the first log point;
    ("weak", level) the same to a low level; ("trapped", level) a quick fall to ``level``
    then flat, with entropy collapsing to 0.05; ("learning", level) a straight ramp still
    rising at the end; ("collapse", level) from about 22 down to ``level`` (below its
    start); ("cap", level) a climb from 22 that reaches ``level`` at 90% of the run and
    holds it exactly; ("diverged",) stops half way with status "diverged".
    """
    rng = np.random.default_rng(seed)
    steps = np.linspace(TOTAL / n_points, TOTAL, n_points).astype(int)
    x = steps / TOTAL
    runs, curves = [], []
    for cid, hp, kinds in spec:
        for s, kind in enumerate(kinds):
            k, start = kind[0], (kind[2] if len(kind) > 2 else -50.0)
            noise = rng.normal(size=n_points)
            if k == "flat":  # at kind[1] from the first log point on
                y, ent = kind[1] + 0.3 * noise, np.full(n_points, 0.02)
            elif k in ("success", "weak"):
                lvl, mid = kind[1], rng.uniform(0.25, 0.4)
                y = start + (lvl - start) / (1 + np.exp(-(x - mid) / 0.05))
                y = y + noise * (0.05 * abs(lvl - start) + 1)
                ent = 1.4 - 0.6 * x + rng.normal(0, 0.02, n_points)
            elif k == "trapped":
                y = kind[1] + (start - kind[1]) * np.exp(-x / 0.05) + 2 * noise
                ent = 0.05 + 1.35 * np.exp(-x / 0.08) + rng.normal(0, 0.005, n_points)
            elif k == "learning":
                y = start + (kind[1] - start) * x + 10 * noise
                ent = 1.4 - 0.3 * x
            elif k == "collapse":  # CartPole's one-action policy: from ~22 down to kind[1]
                y = kind[1] + (22.0 - kind[1]) * np.exp(-x / 0.05) + 0.3 * noise
                ent = 0.02 + 0.67 * np.exp(-x / 0.05)
            elif k == "cap":  # a noisy climb from 22 that reaches the cap at 90%, held there
                y = np.minimum(kind[1], 22.0 + (kind[1] - 22.0) * np.clip((x - 0.5) / 0.4, 0, 1)
                               + 50 * noise * (x < 0.9))
                ent = 0.69 - 0.4 * x
            else:  # diverged
                y, ent = start + 100 * x + 5 * noise, np.ones(n_points)
            n = n_points // 2 if k == "diverged" else n_points
            runs.append({
                "run_id": f"{cid}-s{s}", "config_id": cid, "seed": s, "env": "Toy-v0",
                "total_steps": TOTAL, **hp,
                "final_return": np.nan if k == "diverged" else float(y[-5:].mean()),
                "final_eval_return": np.nan,
                "status": "diverged" if k == "diverged" else "ok",
                "diverged_at_step": int(steps[n - 1]) if k == "diverged" else None,
                "wall_s": 1.0,
            })
            curves.append(pd.DataFrame({
                "run_id": f"{cid}-s{s}", "step": steps[:n], "episode_return": y[:n],
                "episode_length": 100.0, "entropy": ent[:n], "policy_loss": 0.0,
                "value_loss": 0.0, "explained_variance": 0.0, "grad_norm": 1.0,
                "eval_return": np.nan,
            }))
    runs = pd.DataFrame(runs)
    runs["diverged_at_step"] = runs["diverged_at_step"].astype("Int64")
    return runs, pd.concat(curves, ignore_index=True)


def write_store(path, runs, curves):
    """A results store as the sweep driver lays it out (manifest + Parquet datasets)."""
    from study import store

    (path / "runs").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": store.FORMAT}))
    runs.to_parquet(path / "runs" / "chunk-0.parquet", index=False)
    if curves is not None:
        (path / "curves").mkdir()
        curves.to_parquet(path / "curves" / "chunk-0.parquet", index=False)
    return path


def labels(per_run):
    return {c: g["classification"].astype(str).tolist() for c, g in per_run.groupby(
        "config_id")}


BIMODAL = [("bi", {"policy_lr": 1e-3}, [("trapped", -28)] * 7 + [("success", 350)] * 17)]


# --------------------------------------------------------------------------------------
# find_modes


@pytest.mark.parametrize("seed", range(5))
def test_unimodal_samples_give_one_mode(seed):
    rng = np.random.default_rng(seed)
    for x in (rng.normal(300, 20, 24), rng.normal(0, 1, 50), rng.standard_t(5, 30)):
        modes = find_modes(x)
        assert len(modes) == 1
        assert modes[0].count == x.size and modes[0].level == pytest.approx(x.mean())


@pytest.mark.parametrize("seed", range(5))
def test_bimodal_sample_gives_both_modes(seed):
    rng = np.random.default_rng(seed)
    low, high = rng.normal(-28, 2, 7), rng.normal(350, 20, 17)
    x = rng.permutation(np.r_[low, high])
    modes = find_modes(x)
    assert [m.count for m in modes] == [7, 17]
    assert modes[0].level == pytest.approx(low.mean())
    assert modes[0].spread == pytest.approx(low.std(ddof=1))
    assert modes[1].level == pytest.approx(high.mean())
    assert (modes[0].lo, modes[0].hi) == (low.min(), low.max())
    assert assign_modes(x, modes).tolist() == (x > 100).astype(int).tolist()


def test_mode_description_and_edge_cases():
    m = Mode(index=0, level=-28.08, spread=2.01, count=7, total=24, lo=-31.0, hi=-25.0)
    assert str(m) == "-28.1 +/- 2.0: 7 of 24 seeds"
    assert find_modes([]) == []
    assert find_modes([np.nan, 3.0])[0].count == 1
    assert len(find_modes([5.0] * 10)) == 1  # all tied
    # A single outlier is not a mode (min_count = 2)...
    assert len(find_modes(np.r_[np.random.default_rng(0).normal(0, 1, 20), 50.0])) == 1
    # ...but two far-off seeds are, even when the rest are tied at a capped return.
    modes = find_modes([500.0] * 10 + [20.0, 22.0])
    assert [m.count for m in modes] == [2, 10]
    assert assign_modes([np.nan], modes).tolist() == [-1]


# --------------------------------------------------------------------------------------
# classify_runs


def test_bimodal_flags_exactly_the_trapped_seeds():
    runs, curves = make_sweep(BIMODAL)
    pr = classify_runs(runs, curves)
    assert list(pr.columns[:9]) == ["run_id", "config_id", "seed", "classification", "mode",
                                    "plateau_step", "entropy_at_plateau",
                                    "reference_entropy", "reason"]
    trapped = pr[pr.classification == "trapped"]
    assert trapped["seed"].tolist() == list(range(7))
    assert (pr.classification[pr.seed >= 7] == "ok").all()
    assert trapped["mode"].tolist() == [0] * 7
    assert (pr["mode"][pr.seed >= 7] == 1).all()
    # The trapped runs settle within ~20% of training (exp(-x/0.05)); entropy collapsed
    # far below that of the successful seeds at the same step.
    assert (trapped["plateau_step"] <= 0.3 * TOTAL).all()
    assert (trapped["entropy_at_plateau"] < 0.5 * trapped["reference_entropy"]).all()
    assert trapped["reason"].str.contains("entropy collapse").all()
    ok = pr[pr.classification == "ok"]
    assert ok[["plateau_step", "entropy_at_plateau"]].isna().all().all()


def test_a_low_level_reached_only_at_the_end_is_not_yet_a_trap():
    runs, curves = make_sweep(BIMODAL)
    low = runs.loc[runs["seed"] < 7, "run_id"]
    x = curves["step"] / TOTAL
    late = curves["run_id"].isin(low)
    # The same final level, but reached in a slow slide (after a rise from the start to
    # 300) that ends at 85% of the run.
    level = runs.set_index("run_id").loc[curves.loc[late, "run_id"], "final_return"].to_numpy()
    xl = x[late].to_numpy()
    curves.loc[late, "episode_return"] = np.where(
        xl < 0.4, -50 + 350 * xl / 0.4, 300 + (level - 300) * np.minimum((xl - 0.4) / 0.45, 1))
    pr = classify_runs(runs, curves)
    assert (pr.classification[pr.seed < 7] == "ok").all()
    assert pr.reason[pr.seed < 7].str.contains("too late in the run to call it a trap").all()


def test_two_slow_seeds_far_apart_are_not_a_trap_but_two_at_one_level_are():
    # CartPole after 60k steps: three seeds near 484, two slow ones at 144 and 180 (a low
    # "mode" whose spread is 8% of its distance to the best) are slow learners, not a trap.
    spec = [("c", {"policy_lr": 1e-3}, [("success", 484)] * 3 + [("weak", 160)] * 2)]
    runs, curves = make_sweep(spec, seed=5)
    runs["final_return"] = [470.0, 484.0, 498.0, 144.0, 180.0]
    assert (classify_runs(runs, curves).classification != "trapped").all()
    spec = [("c", {"policy_lr": 1e-3}, [("success", 484)] * 3 + [("trapped", 9.4)] * 2)]
    runs, curves = make_sweep(spec, seed=5)
    runs["final_return"] = [470.0, 484.0, 498.0, 9.4, 9.5]
    pr = classify_runs(runs, curves)
    assert pr.classification.tolist() == ["ok"] * 3 + ["trapped"] * 2


def test_unimodal_sweep_reports_no_trapped_mode():
    spec = [(f"c{i}", {"policy_lr": 10.0**-i}, [("success", 300 + 20 * i)] * 8)
            for i in range(3)]
    runs, curves = make_sweep(spec, seed=1)
    rep = failure_report(runs, curves)
    assert rep.trapped_levels == []
    assert all(len(m) == 1 for m in rep.modes.values())
    assert set(rep.per_run.classification) == {"ok"}
    md = rep.markdown()
    assert "single mode" in md and "No trapped mode" in md
    assert "## Trapped runs\n\nNone." in md


def test_modes_closer_than_a_twentieth_of_the_learning_range_are_one():
    # Scale-free tests alone split seeds capped at 500 from two at 498; a caller-given gap
    # (5% of the learning range) keeps them one mode, while real modes stay apart.
    capped = [500.0] * 8 + [497.4, 498.6]
    assert len(find_modes(capped)) == 2
    assert len(find_modes(capped, min_gap=24.0)) == 1
    assert [m.count for m in find_modes([500.0] * 10 + [20.0, 22.0], min_gap=24.0)] == [2, 10]

    runs, curves = make_sweep([("c", {"policy_lr": 1e-3}, [("success", 500)] * 10)], seed=4)
    runs.loc[runs.index[:8], "final_return"] = 500.0
    runs.loc[runs.index[8:], "final_return"] = [497.4, 498.6]
    rep = failure_report(runs, curves)
    assert len(rep.modes["c"]) == 1 and set(rep.per_run.classification) == {"ok"}


def test_weak_config_is_not_trapped():
    spec = [("good", {"policy_lr": 1e-3}, [("success", 350)] * 6),
            ("weak", {"policy_lr": 1e-1}, [("weak", 50)] * 6)]
    pr = classify_runs(*make_sweep(spec, seed=2))
    assert labels(pr) == {"good": ["ok"] * 6, "weak": ["ok"] * 6}


def test_low_config_at_a_trapped_level_found_elsewhere_is_trapped():
    spec = [("bi", {"policy_lr": 1e-3}, [("trapped", -28)] * 3 + [("success", 350)] * 5),
            ("lowall", {"policy_lr": 1e-1}, [("trapped", -28)] * 5),
            ("small", {"policy_lr": 1e-2}, [("trapped", -28)] + [("success", 350)] * 2),
            ("weak", {"policy_lr": 1e-4}, [("weak", 100)] * 5)]
    runs, curves = make_sweep(spec, seed=3)
    pr = classify_runs(runs, curves)
    assert labels(pr) == {"bi": ["trapped"] * 3 + ["ok"] * 5, "lowall": ["trapped"] * 5,
                          "small": ["trapped", "ok", "ok"], "weak": ["ok"] * 5}
    low = pr[pr.config_id == "lowall"]
    assert low["reason"].str.contains("at the trapped level .* found in config bi").all()
    # No success in that config: compared with the successful seeds of config bi.
    assert (low["reference_entropy"] > 1.0).all()


def test_learning_and_diverged_runs():
    spec = [("c", {"policy_lr": 1e-3}, [("success", 300)] * 4 + [("learning", 300)] * 3
             + [("diverged",)] * 2)]
    runs, curves = make_sweep(spec, seed=4)
    pr = classify_runs(runs, curves)
    assert labels(pr)["c"] == ["ok"] * 4 + ["learning"] * 3 + ["diverged"] * 2
    assert pr.reason[pr.seed == 7].str.contains("at step 50000").all()
    assert pr.reason[pr.classification == "learning"].str.contains("still improving").all()


def test_pruned_runs_and_missing_curves():
    runs, curves = make_sweep(BIMODAL)
    runs.loc[runs.seed == 23, "status"] = "pruned"
    runs.loc[runs.seed == 23, "final_return"] = np.nan
    pr = classify_runs(runs, curves)
    assert pr.classification[pr.seed == 23].tolist() == ["pruned"]
    assert (pr.classification == "trapped").sum() == 7
    # Without curves nothing can be shown to have plateaued: no trapped runs.
    runs.loc[runs.seed == 8, "status"] = "diverged"
    pr = classify_runs(runs, None)
    assert set(pr.classification) == {"ok", "diverged", "pruned"}
    assert "no curves" in failure_report(runs, None).markdown()


def test_a_config_whose_every_seed_collapses_below_its_start_failed():
    # Regression: every seed of a CartPole config settled at 9.4, below a random policy's
    # ~22 where each started, and the seed table said "failed 0/5" (one mode, no trap).
    from study.analysis.tables import seed_table

    spec = [("good", {"policy_lr": 1e-3}, [("success", 350)] * 5),
            ("bad", {"policy_lr": 1e-1}, [("collapse", 9.4)] * 5)]
    runs, curves = make_sweep(spec, seed=7)
    rep = failure_report(runs, curves)
    assert labels(rep.per_run) == {"good": ["ok"] * 5, "bad": ["collapsed"] * 5}
    reason = rep.per_run.loc[rep.per_run.config_id == "bad", "reason"].iloc[0]
    assert reason.startswith("collapsed: ended at 9.") and "below the starting return" in reason
    t = seed_table(runs, curves, classification=rep.per_run).set_index("config_id")
    assert t.loc["bad", "n_failed"] == 5 and t.loc["good", "n_failed"] == 0
    md = rep.markdown()
    assert "## Collapsed below their start" in md and "**collapsed**: it ended clearly below" in md
    assert "policy_lr=0.1: 5 collapsed" in md
    assert rep.per_config.set_index("config_id").loc["bad", "n_collapsed"] == 5


def test_a_config_that_collapsed_within_its_first_log_window_failed():
    # Every seed already at 9.4 by its first log point: its own start is no reference, the
    # sweep's is (every run starts from an untrained policy, here ~22).
    spec = [("good", {"policy_lr": 1e-3}, [("success", 80, 22.0)] * 5),
            ("good2", {"policy_lr": 1e-2}, [("success", 60, 22.0)] * 5),
            ("bad", {"policy_lr": 1e-1}, [("flat", 9.4)] * 5)]
    rep = failure_report(*make_sweep(spec, seed=11))
    assert labels(rep.per_run) == {"good": ["ok"] * 5, "good2": ["ok"] * 5,
                                   "bad": ["collapsed"] * 5}
    assert "below the starting return 19.3" in rep.per_run["reason"].iloc[0]  # bad, seed 0


def test_a_run_that_reached_the_cap_and_held_it_is_not_learning():
    # Regression: a run that climbed in its last quarter and then held the 500 cap for its
    # last 10% of steps was "still learning"; a noisy ramp still rising at the end is.
    spec = [("cap", {"policy_lr": 1e-3}, [("cap", 500)] * 4),
            ("ramp", {"policy_lr": 1e-2}, [("learning", 300)] * 4)]
    runs, curves = make_sweep(spec, seed=8)
    pr = classify_runs(runs, curves)
    assert labels(pr) == {"cap": ["ok"] * 4, "ramp": ["learning"] * 4}
    assert pr.reason[pr.config_id == "cap"].str.contains("has stopped").all()


def test_single_mode_configs_with_failed_runs_are_not_counted_as_fine():
    # Regression: "N other configs have a single mode" counted a config whose every seed
    # sat at a trapped level found elsewhere.
    spec = [("bi", {"policy_lr": 1e-3}, [("trapped", -28)] * 3 + [("success", 350)] * 5),
            ("lowall", {"policy_lr": 1e-1}, [("trapped", -28)] * 5),
            ("weak", {"policy_lr": 1e-4}, [("weak", 100)] * 5)]
    md = failure_report(*make_sweep(spec, seed=3)).markdown()
    assert ("1 other config has a single mode and no failed run; 1 has a single mode but "
            "failed runs, trapped at a level found elsewhere, trapped alone or collapsed "
            "below their start (policy_lr=0.1: 5 trapped).") in md
    assert "other configs have a single mode." not in md


def test_a_nan_final_return_with_status_ok_is_not_diverged():
    # Regression: analysis called a run diverged when its final_return was NaN although
    # the trainer's status said ok (no episode finished in the last 10% of its steps).
    from study.analysis.tables import seed_table

    runs, curves = make_sweep([("c", {"policy_lr": 1e-3}, [("success", 300)] * 5)], seed=9)
    runs.loc[runs.seed == 0, "final_return"] = np.nan
    rep = failure_report(runs, curves)
    row = rep.per_run[rep.per_run.seed == 0].iloc[0]
    assert row["classification"] == "ok"
    assert "not diverged (status ok), left out of the statistics" in row["reason"]
    assert rep.counts["diverged"] == 0
    t = seed_table(runs, curves, classification=rep.per_run).iloc[0]
    assert (t["n_failed"], t["n"], t["n_seeds"]) == (0, 4, 5)
    assert t["median"] == pytest.approx(runs["final_return"].dropna().median())
    assert "is not diverged: it keeps its label from its curve" in rep.markdown()


def test_trapped_rates_by_hyperparameter_are_holm_adjusted():
    # Regression: "raises" used uncorrected p < 0.05 over many values. Here one config of
    # three has 3 trapped seeds in 9: Fisher's p = 0.029 for its value, 0.086 after Holm
    # over the 3 values compared, so it no longer "raises" the rate.
    spec = [("a0", {"policy_lr": 1e-1}, [("trapped", -28)] * 3 + [("success", 350)] * 6),
            ("a1", {"policy_lr": 1e-2}, [("success", 350)] * 9),
            ("a2", {"policy_lr": 1e-3}, [("success", 350)] * 9)]
    rep = failure_report(*make_sweep(spec, seed=10))
    bh = rep.by_hyperparameter.set_index("value")
    assert rep.counts["trapped"] == 3
    assert bh.loc["0.1", "p_value"] == pytest.approx(st.fisher_exact([[3, 6], [0, 18]])[1])
    np.testing.assert_allclose(bh["p_holm"], stats.holm(bh["p_value"]))
    assert bh.loc["0.1", "p_value"] < 0.05 <= bh.loc["0.1", "p_holm"]
    assert not bh["raises"].any()
    assert "Holm-adjusted over all 3 values compared" in rep.markdown()


# --------------------------------------------------------------------------------------
# failure_report


def test_failure_report_rates_hyperparameters_and_seeds_needed():
    spec = []
    for i in range(6):
        ent = 0.0 if i < 3 else 0.01
        kinds = [("success", 300 + 10 * i)] * 6 + [("trapped", -28)] * (3 if ent == 0 else 0)
        spec.append((f"c{i}", {"policy_lr": 10.0 ** -(1 + i % 3), "entropy_coef": ent},
                     kinds))
    runs, curves = make_sweep(spec, seed=5)
    rep = failure_report(runs, curves)
    assert rep.counts["trapped"] == 9 and set(rep.counts) == set(CLASSES)
    assert rep.hyperparameters == ["policy_lr", "entropy_coef"]

    pc = rep.per_config.set_index("config_id")
    assert pc.loc["c0", "n_trapped"] == 3 and pc.loc["c0", "n_runs"] == 9
    assert (pc.loc["c0", "trapped_lo"], pc.loc["c0", "trapped_hi"]) == pytest.approx(
        stats.wilson_interval(3, 9))
    assert pc.loc["c4", "trapped_rate"] == 0

    bh = rep.by_hyperparameter.set_index(["hyperparameter", "value"])
    row = bh.loc[("entropy_coef", "0")]
    assert (row["n"], row["trapped"], row["rest_n"], row["rest_trapped"]) == (27, 9, 18, 0)
    assert row["p_value"] == pytest.approx(st.fisher_exact([[9, 18], [0, 18]])[1])
    assert bool(row["raises"]) and not bh["raises"].drop(("entropy_coef", "0")).any()

    # The two best configs by IQM of final_return, and Welch's n for them.
    s = rep.seeds_needed
    assert (s.config_a, s.config_b) == ("c5", "c4")
    fin = runs.set_index("config_id")["final_return"]
    assert s.seeds == stats.welch_seeds_needed(fin["c5"], fin["c4"])

    md = rep.markdown()
    assert "**-" in md and "(trapped)**" in md
    assert "entropy_coef | 0 | 9/27" in md and "**raises**" in md
    assert f"**{s.seeds} seeds per config**" in md


# --------------------------------------------------------------------------------------
# CLI


def test_cli_prints_markdown_and_writes_csv(tmp_path, capsys):
    store = write_store(tmp_path / "store", *make_sweep(BIMODAL))
    out = tmp_path / "per_run.csv"
    assert main([str(store), "--csv", str(out)]) == 0
    md = capsys.readouterr().out
    assert md.startswith(f"# Failure analysis: {store}")
    assert "-27." in md or "-28." in md
    per_run = pd.read_csv(out)
    assert (per_run["classification"] == "trapped").sum() == 7


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    for argv in ([str(tmp_path / "missing")], [str(tmp_path / "plain")], [], ["x", "--nope"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_a_spread_of_slow_learners_is_not_a_trap_but_a_collapsed_spike_is():
    # Like a real CartPole grid: 16 configs x 5 seeds whose final returns spread evenly
    # between 120 and 300 (slow learners plateaued half-way), a cap-like cluster at 500,
    # and in a few configs seeds stuck at the same low return with collapsed entropy.
    rng = np.random.default_rng(3)
    spec = []
    for c in range(16):
        kinds = []
        for s in range(5):
            if c % 4 == 0 and s < 3:
                kinds.append(("trapped", 9.4))
            elif s == 4:
                kinds.append(("success", 500.0))
            else:
                kinds.append(("weak", float(rng.uniform(120, 300))))
        spec.append((f"c{c:02d}", {"policy_lr": 10.0 ** -(1 + c % 4)}, kinds))
    runs, curves = make_sweep(spec, seed=4)
    per_run = classify_runs(runs, curves).set_index("run_id")
    trapped = set(per_run.index[per_run["classification"] == "trapped"])
    expected = {f"c{c:02d}-s{s}" for c in range(0, 16, 4) for s in range(3)}
    assert trapped == expected


# --------------------------------------------------------------------------------------
# a lone trapped run, and which mid-training drops are listed


def test_a_lone_stuck_seed_among_ten_is_trapped_with_its_entropy_collapse():
    # MinAtar Breakout: 15 seeds reach 5 to 8, one sits at 1.5 from early on with a
    # near-deterministic policy. One seed makes no mode, so only the lone rule finds it.
    spec = [("c", {"policy_lr": 1e-3}, [("success", 300)] * 9 + [("trapped", 60)])]
    runs, curves = make_sweep(spec, seed=7)
    rep = failure_report(runs, curves)
    pr = rep.per_run
    assert rep.trapped_levels == [] and len(rep.modes["c"]) == 1  # no trapped mode
    assert pr.classification.tolist() == ["ok"] * 9 + ["trapped"]
    row = pr.iloc[9]
    assert "trapped alone, far below its config's other 9 seeds" in row.reason
    assert "entropy collapse" in row.reason
    assert row.entropy_at_plateau < 0.2 * row.reference_entropy
    assert rep.lone_trapped == ["c-s9"]
    md = rep.markdown()
    assert "Trapped alone (a lone seed makes no mode): 1 run far below its config's other " \
           "seeds (c, seed 9 at" in md
    assert "or it is trapped alone" in md  # the label's definition says so
    assert "1 of 1 trapped runs with a comparison had a lower policy entropy" in md


def test_a_lone_low_seed_needs_five_seeds_a_hold_and_no_second_low_seed():
    # Four seeds: too few to call one an outlier.
    spec = [("c", {"policy_lr": 1e-3}, [("success", 300)] * 3 + [("trapped", 60)])]
    assert (classify_runs(*make_sweep(spec, seed=7)).classification == "ok").all()
    # Two low seeds at different levels: a spread of slow learners, not a lone trap.
    spec = [("c", {"policy_lr": 1e-3},
             [("success", 300)] * 8 + [("trapped", 40), ("trapped", 120)])]
    assert (classify_runs(*make_sweep(spec, seed=7)).classification == "ok").all()
    # A lone low seed still climbing at the end is learning, not trapped.
    spec = [("c", {"policy_lr": 1e-3}, [("success", 300)] * 9 + [("learning", 120)])]
    pr = classify_runs(*make_sweep(spec, seed=7))
    assert pr.classification.tolist() == ["ok"] * 9 + ["learning"]
    # A lone seed that ended below an untrained policy's return stays collapsed.
    spec = [("c", {"policy_lr": 1e-3}, [("success", 300, 22.0)] * 9 + [("collapse", 9.4)])]
    pr = classify_runs(*make_sweep(spec, seed=7))
    assert pr.classification.tolist() == ["ok"] * 9 + ["collapsed"]


@pytest.mark.parametrize("sd", [25.0, 60.0])
@pytest.mark.parametrize("seed", range(4))
def test_ten_seeds_with_a_normal_spread_have_no_lone_trap(seed, sd):
    rng = np.random.default_rng(100 + seed)
    levels = rng.normal(300, sd, 10)
    spec = [("c", {"policy_lr": 1e-3}, [("success", float(v)) for v in levels])]
    rep = failure_report(*make_sweep(spec, seed=seed))
    assert set(rep.per_run.classification) == {"ok"}
    assert rep.lone_trapped == [] and "Trapped alone" not in rep.markdown()


def _drop_store(rows):
    steps = (np.arange(1, 41) * 1000).astype(int)
    runs = pd.DataFrame([{"run_id": f"c-{s}", "config_id": "c", "seed": s, "env": "Toy-v0",
                          "total_steps": 40_000, "final_return": float(y[-4:].mean()),
                          "final_eval_return": np.nan, "status": "ok",
                          "diverged_at_step": None, "wall_s": 1.0}
                         for s, y in enumerate(rows)])
    curves = pd.concat([pd.DataFrame({"run_id": f"c-{s}", "step": steps, "episode_return": y,
                                      "entropy": 0.5}) for s, y in enumerate(rows)],
                       ignore_index=True)
    return runs, curves, steps


def test_a_tiny_drop_is_not_listed_but_a_real_collapse_is():
    from study.analysis import reliability as rel

    rng = np.random.default_rng(0)
    good = [np.minimum(300, np.linspace(0, 450, 40)) + rng.normal(0, 2, 40) for _ in range(5)]
    # Stuck near 1.5 after a quick rise (creeping from 1.40 to 1.53), with a dip of 0.09 for
    # four log points: most of its own tiny range, but nothing next to the 300 its config
    # gains (MinAtar Breakout's seed 5, listed with a depth of 0.06).
    stuck = np.concatenate([[0.4, 1.0], np.linspace(1.40, 1.53, 18), np.full(20, 1.5)])
    stuck[20:24] = 1.44
    # A real collapse: 300 down to 10 for three points, then back.
    fall = np.concatenate([np.linspace(0, 300, 15), [10.0, 12.0, 9.0], np.full(22, 300.0)])
    runs, curves, steps = _drop_store([*good, stuck, fall])
    # The drop detector alone, on each run's own scale, finds both...
    found = {c.run for c in rel.collapses(steps.astype(float), np.stack([*good, stuck, fall]))}
    assert {5, 6} <= found
    # ... the report lists only the one that matters for its config.
    rep = failure_report(runs, curves)
    assert rep.drops["run_id"].tolist() == ["c-6"]
    d = rep.drops.iloc[0]
    assert d["depth"] > 250 and d["trough"] <= 12 and d["recovered"]
    md = rep.markdown()
    assert "## Runs that lost most of their level mid-training" in md
    assert "25% of its config's median improvement over the start" in md
    section = md.split("## Runs that lost most")[1].split("\n## ")[0]
    assert "| c | 5 |" not in section and "| c | 6 |" in section
