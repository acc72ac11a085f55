"""study.analysis.stats and study.analysis.curves against independent computations
(numpy/scipy by hand)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from study.analysis import stats
from study.analysis.curves import (
    AGG_COLUMNS,
    Interpolator,
    aggregate_curves,
    curve_matrix,
    learning_curves,
    step_grid,
)

# --------------------------------------------------------------------------------------
# point statistics


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 10, 24, 101])
def test_iqm_is_scipy_trim_mean(n):
    x = np.random.default_rng(n).normal(size=n)
    assert stats.iqm(x) == pytest.approx(st.trim_mean(x, 0.25), rel=1e-12, abs=1e-12)


def test_iqm_by_hand_and_nan_skipped_per_slice():
    # 8 values: cut floor(8/4) = 2 from each end, average the middle 4.
    x = np.array([9.0, 1.0, 5.0, 3.0, 100.0, 7.0, -50.0, 2.0])
    assert stats.iqm(x) == pytest.approx(np.mean([2.0, 3.0, 5.0, 7.0]))
    m = np.random.default_rng(0).normal(size=(9, 4))
    m[[1, 4], 2] = np.nan
    m[:, 3] = np.nan
    got = stats.iqm(m, axis=0)
    for j in range(3):
        col = m[:, j][np.isfinite(m[:, j])]
        assert got[j] == pytest.approx(st.trim_mean(col, 0.25))
    assert np.isnan(got[3])
    assert np.isnan(stats.iqm([]))


def test_median_quantiles_iqr():
    x = np.array([4.0, np.nan, 1.0, 3.0, 2.0, 10.0])
    v = x[np.isfinite(x)]
    assert stats.median(x) == pytest.approx(np.median(v))
    assert np.allclose(stats.quantiles(x), np.percentile(v, [25, 50, 75]))
    assert stats.iqr(x) == pytest.approx(np.percentile(v, 75) - np.percentile(v, 25))
    assert math.isnan(stats.median([np.nan, np.nan]))


def test_cvar_is_mean_of_worst_fraction():
    x = np.array([5.0, -3.0, 8.0, 1.0, 0.0, 7.0, 2.0, 9.0, np.nan, 4.0, 6.0])  # 10 values
    srt = np.sort(x[np.isfinite(x)])
    assert stats.cvar(x, 0.25) == pytest.approx(srt[:3].mean())  # ceil(2.5) = 3
    assert stats.cvar(x, 0.1) == pytest.approx(srt[0])
    assert stats.cvar(x, 1.0) == pytest.approx(srt.mean())
    assert stats.cvar(np.arange(30.0), 0.1) == pytest.approx(1.0)  # 3 worst, not 4
    with pytest.raises(ValueError):
        stats.cvar(x, 0.0)


@pytest.mark.parametrize("k,n", [(0, 5), (1, 5), (3, 10), (7, 24), (24, 24), (50, 1000)])
def test_wilson_interval_by_hand_and_scipy(k, n):
    z = st.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = stats.wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    ci = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_edge_cases():
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    assert stats.wilson_interval(0, 5)[0] == 0.0
    assert stats.wilson_interval(5, 5)[1] == 1.0
    lo90, hi90 = stats.wilson_interval(3, 10, confidence=0.9)
    lo95, hi95 = stats.wilson_interval(3, 10)
    assert lo95 < lo90 < hi90 < hi95
    with pytest.raises(ValueError):
        stats.wilson_interval(6, 5)


def test_probability_of_improvement_is_mann_whitney_u():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 13).astype(float)  # many ties
    y = rng.integers(0, 6, 9).astype(float)
    u = st.mannwhitneyu(x, y, alternative="two-sided").statistic  # U of x
    assert stats.probability_of_improvement(x, y) == pytest.approx(u / (13 * 9))
    brute = np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))
    assert stats.probability_of_improvement(x, y) == pytest.approx(brute)
    assert stats.probability_of_improvement(x, y) + stats.probability_of_improvement(
        y, x) == pytest.approx(1.0)
    assert stats.probability_of_improvement([1.0, np.nan, 2.0], [0.0]) == 1.0
    assert math.isnan(stats.probability_of_improvement([], [1.0]))


# --------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_matches_a_hand_rolled_percentile_bootstrap():
    x = np.random.default_rng(1).normal(10, 3, size=12)
    point, lo, hi = stats.stratified_bootstrap_ci(x, "iqm", n_boot=500, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, x.size, size=(500, x.size))
    reps = st.trim_mean(x[idx], 0.25, axis=1)
    assert point == pytest.approx(st.trim_mean(x, 0.25))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), rel=1e-12)


def test_bootstrap_is_deterministic_and_seed_dependent():
    x = np.random.default_rng(2).normal(size=10)
    a = stats.stratified_bootstrap_ci(x, "iqm", n_boot=300, seed=5)
    b = stats.stratified_bootstrap_ci(x, "iqm", n_boot=300, seed=5)
    c = stats.stratified_bootstrap_ci(x, "iqm", n_boot=300, seed=6)
    assert a == b
    assert a[1:] != c[1:]
    assert stats.key_seed(0, "cfg-a") == stats.key_seed(0, "cfg-a")
    assert stats.key_seed(0, "cfg-a") != stats.key_seed(0, "cfg-b")


def test_bootstrap_is_stratified():
    # Resampling within groups keeps every group's size: with group A all 0 and group B
    # all 1, every replicate's mean is exactly 5/8 (an unstratified one would vary).
    reps = stats.stratified_bootstrap([np.zeros(3), np.ones(5)], "mean", n_boot=200, seed=0)
    assert np.allclose(reps, 5 / 8)
    # Seeds stay whole rows: a curve-shaped group gives one value per step.
    curves = np.random.default_rng(0).normal(size=(6, 4))
    point, lo, hi = stats.stratified_bootstrap_ci([curves], "median", n_boot=100)
    assert point.shape == lo.shape == hi.shape == (4,)
    assert np.all(lo <= point + 1e-12) and np.all(point <= hi + 1e-12)


# --------------------------------------------------------------------------------------
# Welch power (Colas et al. 2018)


def _power_by_hand(d, s1, s2, n, alpha=0.05):
    nu = (n - 1) * (s1**2 + s2**2) ** 2 / (s1**4 + s2**4)
    nc = d / math.sqrt((s1**2 + s2**2) / n)
    return st.nct.sf(st.t.ppf(1 - alpha, nu), nu, nc)


def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    # sorted: 0.005, 0.01, 0.03, 0.04 (m = 4): 4*0.005, 3*0.01, 2*0.03, 1*0.04, running max
    expected = [0.03, 0.06, 0.06, 0.02, np.nan]
    np.testing.assert_allclose(stats.holm(p), expected, equal_nan=True)
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    assert stats.holm([]).size == 0 and np.isnan(stats.holm([np.nan])).all()


def test_welch_power_by_hand():
    assert stats.welch_power(5.0, 4.0, 6.0, 10) == pytest.approx(_power_by_hand(5.0, 4.0, 6.0, 10))
    two = stats.welch_power(5.0, 4.0, 6.0, 10, alternative="two-sided")
    nu = 9 * (16 + 36) ** 2 / (16**2 + 36**2)
    nc = 5.0 / math.sqrt(52 / 10)
    crit = st.t.ppf(0.975, nu)
    assert two == pytest.approx(st.nct.sf(crit, nu, nc) + st.nct.cdf(-crit, nu, nc))


def test_welch_seeds_needed_is_the_smallest_sufficient_n():
    rng = np.random.default_rng(4)
    a, b = rng.normal(100, 15, 10), rng.normal(90, 20, 10)
    d = abs(a.mean() - b.mean())
    s1, s2 = a.std(ddof=1), b.std(ddof=1)
    n = next(n for n in range(2, 10_000) if _power_by_hand(d, s1, s2, n) >= 0.8)
    assert stats.welch_seeds_needed(a, b) == n
    assert stats.welch_seeds_needed(b, a) == n
    # A bigger difference needs fewer seeds; equal means need infinitely many.
    assert stats.welch_seeds_needed(a + 30, b) < n
    assert stats.welch_seeds_needed([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) is None
    assert stats.welch_seeds_needed([1.0, 1.0], [2.0, 2.0]) == 2
    with pytest.raises(ValueError):
        stats.welch_seeds_needed([1.0], [2.0, 3.0])


# --------------------------------------------------------------------------------------
# curves


def _curves(rows):
    return pd.DataFrame(rows, columns=["run_id", "step", "episode_return"])


def test_interpolation_onto_grid_by_hand():
    cur = _curves([("a", 0, 0.0), ("a", 10, 10.0), ("a", 20, 40.0),
                   ("b", 5, 1.0), ("b", 15, 3.0)])
    grid = np.array([-5, 0, 5, 10, 12, 15, 20, 25])
    m = Interpolator.from_frame(cur, ["a", "b"], "episode_return").on_grid(grid)
    # Run a: np.interp inside its logged range [0, 20], NaN outside (no extrapolation).
    inside = (grid >= 0) & (grid <= 20)
    assert np.allclose(m[0, inside], np.interp(grid[inside], [0, 10, 20], [0, 10, 40]))
    assert np.isnan(m[0, ~inside]).all()
    inside = (grid >= 5) & (grid <= 15)
    assert np.allclose(m[1, inside], np.interp(grid[inside], [5, 15], [1, 3]))
    assert np.isnan(m[1, ~inside]).all()


def test_nan_windows_stay_nan():
    # No episode finished in the window logged at step 20: that point is NaN, and so is
    # everything interpolated against it, but the points beside it are kept.
    cur = _curves([("a", 0, 0.0), ("a", 10, 10.0), ("a", 20, np.nan), ("a", 30, 30.0)])
    m = Interpolator.from_frame(cur, ["a"], "episode_return").on_grid(
        np.array([0, 5, 10, 15, 20, 25, 30]))[0]
    assert np.allclose(m[[0, 1, 2, 6]], [0.0, 5.0, 10.0, 30.0])
    assert np.isnan(m[[3, 4, 5]]).all()


def test_step_grid_and_curve_matrix():
    cur = _curves([("a", s, 1.0) for s in (0, 10, 20)] + [("b", s, 1.0) for s in (5, 20)])
    assert step_grid(cur).tolist() == [0, 5, 10, 20]
    assert step_grid(cur, max_points=3).tolist() == [0, 10, 20]
    steps, values, counts = curve_matrix(cur.iloc[::-1], ["b", "a", "missing"],
                                         ["episode_return"])
    assert counts.tolist() == [2, 3, 0]
    assert steps[0, :2].tolist() == [5, 20] and np.isnan(steps[0, 2])
    assert steps[1].tolist() == [0, 10, 20]
    assert np.isnan(values["episode_return"][2]).all()


def _seeded_curves(n_seeds=7, steps=(0, 100, 200, 300)):
    rng = np.random.default_rng(0)
    rows, runs = [], []
    for cfg in ("x", "y"):
        for s in range(n_seeds):
            rid = f"{cfg}{s}"
            runs.append((rid, cfg))
            for t in steps:
                rows.append((rid, t, rng.normal(t / 10, 5), np.nan))
    cur = pd.DataFrame(rows, columns=["run_id", "step", "episode_return", "eval_return"])
    return pd.DataFrame(runs, columns=["run_id", "config_id"]), cur


def test_aggregate_curves_by_hand():
    runs, cur = _seeded_curves()
    # One run has no finished episode at step 200, another stopped after step 100.
    cur.loc[(cur.run_id == "x1") & (cur.step == 200), "episode_return"] = np.nan
    cur = cur[~((cur.run_id == "x2") & (cur.step > 100))]
    agg = aggregate_curves(runs, cur, n_boot=200)
    assert list(agg.columns) == list(AGG_COLUMNS)
    assert len(agg) == 2 * 4
    for (cfg, step), row in agg.set_index(["config_id", "step"]).iterrows():
        v = cur[(cur.run_id.str[0] == cfg) & (cur.step == step)]["episode_return"]
        v = v[np.isfinite(v)].to_numpy()
        assert row["n"] == v.size
        assert row["median"] == pytest.approx(np.median(v))
        assert (row["q25"], row["q75"]) == pytest.approx(tuple(np.percentile(v, [25, 75])))
        assert row["iqm"] == pytest.approx(st.trim_mean(v, 0.25))
        assert row["iqm_lo"] <= row["iqm"] + 1e-9 <= row["iqm_hi"] + 2e-9
    x = agg[agg.config_id == "x"].set_index("step")
    assert x.loc[200, "n"] == 5 and x.loc[300, "n"] == 6
    again = aggregate_curves(runs, cur, n_boot=200)
    pd.testing.assert_frame_equal(agg, again)  # seeded: same input, same band


def test_learning_curves_adds_eval_only_when_present():
    runs, cur = _seeded_curves(n_seeds=4)
    assert learning_curves(runs, cur, n_boot=50)["metric"].unique().tolist() == [
        "episode_return"]
    # Evaluated every other log point: NaN in between means "not evaluated", so those
    # points are skipped rather than poisoning the interpolation.
    cur.loc[cur.step.isin([0, 200]), "eval_return"] = cur["step"] / 10.0
    lc = learning_curves(runs, cur, n_boot=50)
    ev = lc[lc.metric == "eval_return"]
    assert ev["step"].unique().tolist() == [0, 200]
    assert np.allclose(ev["median"], ev["step"] / 10.0)
    assert (ev["n"] == 4).all()
