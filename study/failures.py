"""Why runs fail: diverged, trapped in a bad mode, still learning, or fine.

Every run of a sweep is classified from the data alone, with no per-environment
threshold (every cut-off below is relative to the spread of the sweep's own values):

``diverged``
    status "diverged", or a non-finite ``final_return``.
``trapped``
    the run's final return sits in a *mode* clearly below the best mode of its config's
    seeds, and its curve has plateaued there (it is not still learning, and it reached
    that level before the last quarter of its steps: a trap holds). Modes are looked for
    within each config with at least 4 seeds, and in the pooled final returns of the
    sweep, where the low-mode runs of configs whose other seeds do better reveal a trap
    even when each config has only one such seed. A config whose seeds all converge low
    is a weak config, not a set of trapped runs, unless that level matches a trapped mode
    found elsewhere in the sweep (same env). "Clearly below": a separate mode that
    realises at most half of the best mode's improvement over the starting return, and
    concentrated (see TRAP_MAX_SPREAD); modes closer than MODE_MIN_GAP of the learning
    range are one.
``learning``
    still improving at the end: over the last quarter of the curve, a rise significantly
    larger than 5% of the curve's range, tested against the curve's own noise there.
``ok``
    everything else. ``pruned`` runs get their own label and are left out of every rate.

Modes come from :func:`find_modes`; the trend test and the plateau step from one
vectorized pass over all curves (:func:`study.curves.curve_matrix`), so 1,000 runs x 500
log points take well under a second.

Run as ``python -m study.failures RESULTS_DIR [--csv FILE]`` for the Markdown report.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as _st

from study import stats
from study.config import NAMES, ConfigError
from study.curves import Interpolator, curve_matrix

__all__ = [
    "CLASSES",
    "FailureReport",
    "Mode",
    "SeedsNeeded",
    "TrappedLevel",
    "assign_modes",
    "classify_runs",
    "config_labels",
    "decimals_for",
    "failure_report",
    "find_modes",
    "fmt_number",
    "format_value",
    "hyperparameter_columns",
    "main",
]

#: Every label :func:`classify_runs` gives.
CLASSES: tuple[str, ...] = ("ok", "learning", "trapped", "diverged", "pruned")
#: A trapped level's spread is at most this fraction of its distance below the best mode.
TRAP_MAX_SPREAD = 0.05
#: A trapped run has held its level for at least this fraction of its steps.
TRAP_MIN_HOLD = 0.25
#: Modes closer than this fraction of the learning range (best final return minus the
#: starting return) are one mode: 498 and 500 on CartPole are both "solved".
MODE_MIN_GAP = 0.05

PER_RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "config_id", "seed", "classification", "mode", "plateau_step",
    "entropy_at_plateau", "reference_entropy", "reason", "final_return",
)


# --------------------------------------------------------------------------------------
# helpers shared with study.tables (which imports this module)


def hyperparameter_columns(runs: pd.DataFrame, differing: bool = True) -> list[str]:
    """``env`` and the hyperparameters of :data:`study.config.NAMES` present in ``runs``.

    With ``differing`` (the default) only those with more than one distinct value in
    ``runs`` (NaN counts as a value): the columns that tell configs apart.
    """
    cols = [c for c in ("env", *NAMES) if c in runs.columns]
    if differing:
        cols = [c for c in cols if runs[c].nunique(dropna=False) > 1]
    return cols


def format_value(v: object) -> str:
    """A hyperparameter value as people write it: 0.0007, 64, true, [64, 64], inf."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() and abs(f) < 1e15 else f"{f:.6g}"
    return str(v)


def config_labels(runs: pd.DataFrame, columns: Sequence[str] | None = None) -> dict[str, str]:
    """``config_id -> "policy_lr=0.001, gamma=0.99"`` from the differing hyperparameters.

    The config id itself when no hyperparameter differs (a single-config study).
    """
    cols = list(hyperparameter_columns(runs) if columns is None else columns)
    first = runs.drop_duplicates("config_id")
    out = {}
    for row in first[["config_id", *cols]].itertuples(index=False):
        cid = str(row[0])
        parts = [f"{c}={format_value(v)}" for c, v in zip(cols, row[1:], strict=True)]
        out[cid] = ", ".join(parts) if parts else cid
    return out


def decimals_for(values: ArrayLike) -> int:
    """Decimals to print values of this magnitude with about 4 significant digits.

    ``max(2, 3 - floor(log10(max |v|)))``, at most 6: returns around 350 print as 351.27,
    returns around 0.5 as 0.5127. Depends only on the values, so the same store always
    prints the same way (``study.tables --check`` relies on that).
    """
    a = np.asarray(values, dtype=float).ravel()
    a = np.abs(a[np.isfinite(a)])
    if a.size == 0 or a.max() == 0:
        return 2
    return int(min(6, max(2, 3 - math.floor(math.log10(a.max())))))


def fmt_number(x: float | None, decimals: int = 2) -> str:
    """Fixed-point with ``decimals``; "nan" for a missing value; never "-0.00"."""
    if x is None or x is pd.NA or math.isnan(float(x)):
        return "nan"
    if math.isinf(float(x)):
        return "inf" if float(x) > 0 else "-inf"
    s = f"{float(x):.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


# --------------------------------------------------------------------------------------
# modes


@dataclass(frozen=True)
class Mode:
    """One mode of a set of final returns: its members are the values in ``[lo, hi]``."""

    index: int  # 0 = lowest
    level: float  # mean of the members
    spread: float  # standard deviation of the members (ddof = 1; 0 for a single member)
    count: int
    total: int  # number of values the modes were found in
    lo: float
    hi: float

    def describe(self, decimals: int = 1, unit: str = "seeds") -> str:
        """``"-28.1 +/- 2.0: 7 of 24 seeds"``."""
        return (f"{fmt_number(self.level, decimals)} +/- {fmt_number(self.spread, decimals)}: "
                f"{self.count} of {self.total} {unit}")

    def __str__(self) -> str:
        return self.describe()


def _segment_tables(v: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, floored sd and negative classification log-likelihood of every v[i:j]."""
    n = v.size
    s1 = np.concatenate([[0.0], np.cumsum(v)])
    s2 = np.concatenate([[0.0], np.cumsum(v * v)])
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    cnt = (j - i).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (s1[j] - s1[i]) / cnt
        var = np.maximum((s2[j] - s2[i]) / cnt - mean**2, 0.0)
        sd = np.maximum(np.sqrt(var), floor)
        # -sum log(w N(x; mean, sd)) over the segment, without the constant log(2 pi)/2:
        cost = -cnt * np.log(cnt / n) + cnt * np.log(sd) + cnt * var / (2 * sd * sd)
    return mean, sd, cost


_MAX_SPLIT_POINTS = 600
#: A run is "still learning" only if its last quarter gained at least this share of the
#: curve's range (besides being significant): see :func:`_curve_features`.
_MIN_TAIL_GAIN = 0.05


def _em(z: np.ndarray, mu: np.ndarray, sd: np.ndarray, w: np.ndarray, floor: float,
        iters: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """EM for a 1-D Gaussian mixture from the given start; sds kept >= ``floor``."""
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def e_step(mu: np.ndarray, sd: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        logp = (np.log(w)[None, :] - np.log(sd)[None, :] - half_log_2pi
                - 0.5 * ((z[:, None] - mu[None, :]) / sd[None, :]) ** 2)
        lse = np.logaddexp.reduce(logp, axis=1)
        return float(lse.sum()), np.exp(logp - lse[:, None])

    ll, resp = e_step(mu, sd, w)
    for _ in range(iters):
        nk = resp.sum(axis=0)
        if (nk <= 1e-9).any():
            break  # a component lost every value: keep the last proper fit
        w_new = nk / z.size
        mu_new = resp.T @ z / nk
        sd_new = np.maximum(
            np.sqrt((resp * (z[:, None] - mu_new[None, :]) ** 2).sum(axis=0) / nk), floor)
        ll_new, resp = e_step(mu_new, sd_new, w_new)
        mu, sd, w = mu_new, sd_new, w_new
        done = ll_new - ll < 1e-9 * z.size
        ll = ll_new
        if done:
            break
    return mu, sd, w, ll  # ll is the log-likelihood of exactly these parameters


def _has_valleys(mu: np.ndarray, sd: np.ndarray, w: np.ndarray, max_valley: float) -> bool:
    """Whether the mixture density dips between every pair of adjacent means.

    Between ``mu[j]`` and ``mu[j+1]`` the density must fall to at most ``max_valley`` times
    the lower of the two peaks on either side of its minimum: two components whose sum
    has no such dip (a narrow core plus a wide tail) describe one skewed mode.
    """
    for j in range(mu.size - 1):
        x = np.linspace(mu[j], mu[j + 1], 257)
        dens = (w[None, :] / sd[None, :]
                * np.exp(-0.5 * ((x[:, None] - mu[None, :]) / sd[None, :]) ** 2)).sum(axis=1)
        k = int(np.argmin(dens))
        if k in (0, x.size - 1):
            return False  # monotone between the means: no valley at all
        if dens[k] > max_valley * min(dens[: k + 1].max(), dens[k:].max()):
            return False
    return True


def _min_gap(final: np.ndarray, initial: float) -> float:
    """``MODE_MIN_GAP * (max(final) - initial)``; 0 when that range is unknown or empty."""
    top = np.nanmax(final) if np.isfinite(final).any() else np.nan
    rng = top - initial
    return float(MODE_MIN_GAP * rng) if np.isfinite(rng) and rng > 0 else 0.0


def find_modes(
    values: ArrayLike,
    max_modes: int = 4,
    min_count: int = 2,
    min_separation: float = 2.0,
    sd_floor: float = 0.25,
    max_valley: float = 0.5,
    min_gap: float = 0.0,
) -> list[Mode]:
    """Modes of a 1-D sample (final returns of a config's seeds), lowest first.

    Method: a 1-D Gaussian mixture with ``k = 1 .. max_modes`` components chosen by BIC,
    ``BIC = -2 log L + (3k - 1) log n``, where only mixtures whose components are real,
    separate modes may compete, so that unimodal data gives one mode:

    * Each ``k`` is fitted by EM, started deterministically (no random restarts) from the
      best split of the sorted values into ``k`` contiguous groups, found exactly by
      dynamic programming (as in Jenks natural breaks).
    * Weight: every component must carry ``min_count`` seeds (EM weight times ``n``); one
      seed cannot make a mode.
    * Separation: adjacent components need Ashman's ``D = |mu_1 - mu_2| /
      sqrt((sd_1^2 + sd_2^2) / 2) >= min_separation`` (D > 2: the usual bound for two
      Gaussians to make two modes), computed from the EM fit, whose components overlap
      as the data do (the split groups' truncated spreads would overstate D).
    * Valley: the fitted density must dip between adjacent means to at most
      ``max_valley`` times the lower neighbouring peak. A skewed or heavy-tailed single
      mode is also fitted better by two Gaussians (a narrow core and a wide tail), but
      their sum has no dip; this check is what rejects it.
    * Size: adjacent means must be at least ``min_gap`` apart, in the values' units. The
      tests above are scale-free, so eight seeds at a capped 500 and two at 498 are two
      modes to them; the caller knows what gap matters (a fraction of the learning range).
    * Every sd is at least ``sd_floor`` times the sample's sd (times ``sqrt(20 / n)`` when
      ``n > 20``), so two or three close values (seeds tied at a capped return) cannot win
      on a near-infinite likelihood, while in a large pool a spike of runs stuck at the
      same return can still be a mode of its own.

    Calibration (simulated, 300 samples per case): Gaussian samples of 5-10 values give two modes
    about 3-4% of the time (a few values can look clustered by chance), 24 or more almost
    never; modes as far apart as -28 +/- 2 and 350 +/- 20 are found from 4 values on. Skewed
    samples (exponential, 24 values) still give two modes ~17% of the time: a long tail
    with a gap is indistinguishable from a small second mode with this few seeds, which
    is why :func:`classify_runs` adds its own conditions before calling a mode a trap.

    A KDE with valleys was the alternative; with 5-30 seeds its answer hinges on the
    bandwidth, itself a guess, while BIC weighs the number of modes against the data.
    Members: each value goes to the more probable of the two components whose means
    bracket it (the lowest or highest beyond all means), which keeps every mode an
    interval. Cost ``O(max_modes n^2)`` plus EM: fine for a config's seeds or a sweep of
    a few thousand runs. NaN values are ignored; no values give no modes.
    """
    v = np.sort(np.asarray(values, dtype=float).ravel())
    v = v[np.isfinite(v)]
    n = v.size
    if n == 0:
        return []

    def make(groups: list[np.ndarray]) -> list[Mode]:
        groups = [g for g in groups if g.size]
        return [
            Mode(index=k, level=float(g.mean()), spread=float(g.std(ddof=1)) if g.size > 1
                 else 0.0, count=int(g.size), total=n, lo=float(g[0]), hi=float(g[-1]))
            for k, g in enumerate(groups)
        ]

    sd_all = float(v.std())
    if n < 2 * min_count or sd_all == 0.0 or max_modes < 2:
        return make([v])
    z = (v - v.mean()) / sd_all  # standardized: every threshold below is scale-free
    # The O(n^2) split search only starts EM, so a large sample is summarised by evenly
    # spaced quantiles first (EM itself always sees every value).
    zd = z if n <= _MAX_SPLIT_POINTS else np.quantile(
        z, (np.arange(_MAX_SPLIT_POINTS) + 0.5) / _MAX_SPLIT_POINTS)
    nd = zd.size
    min_seg = min_count if nd == n else max(1, round(min_count * nd / n))
    # The floor guards small samples against ties; with many values a tight cluster (a
    # spike of identically trapped runs inside a wide pool) must be able to stand out.
    sd_floor = sd_floor * min(1.0, math.sqrt(20.0 / n))
    mean, sd, cost = _segment_tables(zd, sd_floor)
    idx = np.arange(nd + 1)
    seg_len = idx[None, :] - idx[:, None]
    # A boundary at i (between zd[i-1] and zd[i]) must not split equal values.
    ok_cut = np.ones(nd + 1, dtype=bool)
    ok_cut[1:nd] = zd[1:] > zd[:-1]
    allowed = (seg_len >= min_seg) & ok_cut[:, None] & ok_cut[None, :]
    cost = np.where(allowed, cost, np.inf)

    best_bic = -2.0 * float(_st.norm.logpdf(z).sum())  # k = 1 (z has mean 0, sd 1)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    prev = cost[0].copy()  # prev[j]: best cost of zd[0:j] in k groups
    back: list[np.ndarray] = []
    for k in range(2, min(max_modes, n // min_count) + 1):
        total = prev[:, None] + cost  # zd[0:j] as (zd[0:i] in k-1 groups) + zd[i:j]
        arg = np.argmin(total, axis=0)
        back.append(arg)
        prev = total[arg, np.arange(nd + 1)]
        if not np.isfinite(prev[nd]):
            continue
        cuts = [nd]
        for a in reversed(back):
            cuts.append(int(a[cuts[-1]]))
        cuts.append(0)
        cuts = cuts[::-1]  # [0, c1, ..., n]
        segs = list(zip(cuts[:-1], cuts[1:], strict=True))
        mu0 = np.array([mean[a, b] for a, b in segs])
        sd0 = np.array([sd[a, b] for a, b in segs])
        w0 = np.array([(b - a) / nd for a, b in segs])
        mu, sg, w, ll = _em(z, mu0, sd0, w0, sd_floor)
        order = np.argsort(mu)
        mu, sg, w = mu[order], sg[order], w[order]
        if (w * n < min_count - 1e-9).any():
            continue
        d = np.abs(np.diff(mu)) / np.sqrt((sg[1:] ** 2 + sg[:-1] ** 2) / 2)
        if (d < min_separation).any() or not _has_valleys(mu, sg, w, max_valley):
            continue
        if (np.diff(mu) * sd_all < min_gap).any():
            continue
        bic = -2.0 * ll + (3 * k - 1) * math.log(n)
        if bic < best_bic - 1e-9:  # ties keep fewer modes
            best_bic, best = bic, (mu, sg, w)
    if best is None:
        return make([v])
    mu, sg, w = best
    # Posterior of each value under each component; compare only the bracketing pair.
    logp = np.log(w)[None, :] - np.log(sg)[None, :] - 0.5 * ((z[:, None] - mu) / sg) ** 2
    j = np.clip(np.searchsorted(mu, z) - 1, 0, mu.size - 2)  # z between mu[j] and mu[j+1]
    rows = np.arange(n)
    label = np.where(logp[rows, j + 1] > logp[rows, j], j + 1, j)
    label = np.where(z <= mu[0], 0, np.where(z >= mu[-1], mu.size - 1, label))
    label = np.maximum.accumulate(label)  # z is sorted: keep the modes intervals
    return make([v[label == k] for k in range(mu.size)])


def assign_modes(values: ArrayLike, modes: Sequence[Mode]) -> np.ndarray:
    """Index of the mode each value belongs to (-1 for NaN).

    Boundaries lie halfway between the top of one mode and the bottom of the next, so the
    values the modes were found in get their own mode back.
    """
    x = np.asarray(values, dtype=float)
    if not modes:
        return np.full(x.shape, -1)
    cuts = np.array([(a.hi + b.lo) / 2 for a, b in zip(modes[:-1], modes[1:], strict=True)])
    out = np.searchsorted(cuts, x, side="right")
    return np.where(np.isfinite(x), out, -1)


# --------------------------------------------------------------------------------------
# curve features (one vectorized pass over every run)


@dataclass
class _Features:
    n_valid: np.ndarray
    initial: np.ndarray  # mean of the first few valid points
    trend_t: np.ndarray
    trend_p: np.ndarray
    rise: np.ndarray  # fitted rise over the tail window
    noise: np.ndarray  # residual sd in the tail
    tail_span: np.ndarray  # steps covered by the tail window
    learning: np.ndarray
    plateau_step: np.ndarray
    entropy_at_plateau: np.ndarray
    last_step: np.ndarray  # the run's last logged step
    entropy: Interpolator  # smoothed entropy, for reference values at other steps


def _rowsum(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, a, 0.0).sum(axis=1)


def _rolling_nanmean(m: np.ndarray, half: int) -> np.ndarray:
    """Centered moving average over ``2 half + 1`` columns, NaN skipped (NaN if none)."""
    ok = np.isfinite(m)
    c = np.concatenate([np.zeros((m.shape[0], 1)), np.cumsum(np.where(ok, m, 0.0), axis=1)],
                       axis=1)
    k = np.concatenate([np.zeros((m.shape[0], 1)), np.cumsum(ok, axis=1)], axis=1)
    pos = np.arange(m.shape[1])
    hi = np.minimum(pos + half + 1, m.shape[1])
    lo = np.maximum(pos - half, 0)
    cnt = k[:, hi] - k[:, lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (c[:, hi] - c[:, lo]) / cnt, np.nan)


def _curve_features(curves: pd.DataFrame, run_ids: Sequence[str], tail_frac: float,
                    trend_alpha: float) -> _Features:
    """Trend test, plateau step and entropy there, for every run at once.

    Trend: ordinary least squares of episode_return on step over the tail (the last
    ``tail_frac`` of the run's valid points, at least 5). Consecutive log windows are
    correlated, so the slope's standard error is inflated by ``sqrt((1 + r)/(1 - r))``
    with ``r`` the lag-1 autocorrelation of the residuals (AR(1) effective sample size
    ``n (1 - r)/(1 + r)``, also used for the degrees of freedom). The null hypothesis is
    not "no rise" but "a rise over the tail of at most 5% of the curve's whole range"
    (max - min of the smoothed curve): ``t = (rise - 0.05 range) / se(rise)``, and the
    run is "learning" when the one-sided p is below ``trend_alpha``. With hundreds of
    points the last 1-2% of a converged curve's approach (an exponential with a time
    constant of 0.2 of training) is significantly positive, but that is not "still
    learning"; an improvement that matters, beyond its noise, is.

    Plateau: the curve smoothed by a centered moving average (10% of the points, at least
    3) is compared with the final level (tail mean); the plateau step is the first log
    point after the smoothed curve last left the band ``final +/- max(4 sd / sqrt(window),
    5% of the smoothed curve's range)``: noise-sized for noisy curves, travel-sized for
    smooth ones.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (runs without curve)
        return _curve_features_inner(curves, run_ids, tail_frac, trend_alpha)


def _curve_features_inner(curves: pd.DataFrame, run_ids: Sequence[str], tail_frac: float,
                          trend_alpha: float) -> _Features:
    steps, vals, counts = curve_matrix(curves, run_ids, ["episode_return", "entropy"])
    n_runs, width = steps.shape
    y = vals["episode_return"]
    valid = np.isfinite(y)
    nv = valid.sum(axis=1)
    fwd = np.cumsum(valid, axis=1) - 1
    rev = nv[:, None] - 1 - fwd
    m_tail = np.minimum(np.maximum(5, np.ceil(tail_frac * nv)), nv)
    tail = valid & (rev < m_tail[:, None])
    m_head = np.minimum(np.maximum(3, np.ceil(0.05 * nv)), nv)
    head = valid & (fwd < m_head[:, None])

    with np.errstate(invalid="ignore", divide="ignore"):
        initial = _rowsum(y, head) / head.sum(axis=1)
        nt = tail.sum(axis=1).astype(float)
        xm = _rowsum(steps, tail) / nt
        ym = _rowsum(y, tail) / nt
        dx = np.where(tail, steps - xm[:, None], 0.0)
        dy = np.where(tail, y - ym[:, None], 0.0)
        sxx = (dx * dx).sum(axis=1)
        slope = (dx * dy).sum(axis=1) / sxx
        res = np.where(tail, dy - slope[:, None] * dx, 0.0)
        ss = (res * res).sum(axis=1)
        noise = np.sqrt(ss / (nt - 2))
        pair = tail[:, 1:] & tail[:, :-1]
        r1 = np.where(pair, res[:, 1:] * res[:, :-1], 0.0).sum(axis=1) / ss
        r1 = np.clip(np.nan_to_num(r1), 0.0, 0.95)  # negative r would claim extra precision
        n_eff = np.clip(nt * (1 - r1) / (1 + r1), 3.0, np.maximum(nt, 3.0))
        first_tail = np.nanmin(np.where(tail, steps, np.nan), axis=1) if width else nt
        last_tail = np.nanmax(np.where(tail, steps, np.nan), axis=1) if width else nt
        span = last_tail - first_tail
        rise = slope * span
        se_rise = noise / np.sqrt(sxx) * np.sqrt(nt / n_eff) * span

        half = max(1, int(round(0.1 * float(np.median(nv)) / 2))) if n_runs else 1
        smooth = _rolling_nanmean(y, half)
        final = ym
        rng = np.nanmax(smooth, axis=1) - np.nanmin(smooth, axis=1) if width else nt
        # One-sided test of "the tail gained more than 5% of the range", not of "> 0".
        t = (rise - _MIN_TAIL_GAIN * rng) / se_rise
        t = np.where((se_rise == 0) & (rise > _MIN_TAIL_GAIN * rng), np.inf, t)
        p = _st.t.sf(t, np.maximum(n_eff - 2, 1.0))
        learning = (nt >= 4) & (p < trend_alpha) & (rise > 0)
        # 4 sd of the smoothed noise: the curve has ~10 independent windows, and one noise
        # excursion past the band would move the plateau late
        band = np.maximum(4 * np.nan_to_num(noise) / math.sqrt(2 * half + 1), 0.05 * rng)
        logged = np.arange(width)[None, :] < counts[:, None]
        outside = logged & np.isfinite(smooth) & (np.abs(smooth - final[:, None]) >
                                                  band[:, None] + 1e-12 * np.abs(final[:, None]))
        any_out = outside.any(axis=1)
        last_out = np.where(any_out, width - 1 - np.argmax(outside[:, ::-1], axis=1), -1)
        p_idx = np.clip(np.minimum(last_out + 1, counts - 1), 0, max(width - 1, 0))
    rows = np.arange(n_runs)
    has = counts > 0
    plateau_step = np.where(has & (nv > 0), steps[rows, p_idx] if width else np.nan, np.nan)
    ent = _rolling_nanmean(vals["entropy"], half) if width else vals["entropy"]
    ent_at = np.where(has, ent[rows, p_idx] if width else np.nan, np.nan)
    r_idx, c_idx = np.nonzero(logged)
    interp = Interpolator(r_idx, steps[r_idx, c_idx], ent[r_idx, c_idx], n_runs)
    last_step = np.where(has, steps[rows, np.maximum(counts - 1, 0)] if width else np.nan,
                         np.nan)
    return _Features(nv, initial, t, p, rise, noise, span, learning, plateau_step, ent_at,
                     last_step, interp)


# --------------------------------------------------------------------------------------
# classification


@dataclass(frozen=True)
class TrappedLevel:
    """A low mode clearly below the best mode: of one config (``config_id``), or of the
    sweep's pooled final returns (``config_id == ""``, from runs of ``configs`` whose
    other seeds do better)."""

    config_id: str
    mode: Mode
    best: Mode
    initial: float  # median starting return (the curves' first points) of its configs
    env: str = ""
    configs: tuple[str, ...] = ()  # where it was found: the config, or (pooled) several


@dataclass
class _Analysis:
    per_run: pd.DataFrame
    modes: dict[str, list[Mode]]
    trapped_levels: list[TrappedLevel]
    has_curves: bool
    sweep_modes: dict[str, list[Mode]]


_REQUIRED = ("run_id", "config_id", "seed", "status", "final_return")


def _check_runs(runs: pd.DataFrame) -> None:
    missing = [c for c in _REQUIRED if c not in runs.columns]
    if missing:
        raise ConfigError(f"runs lack columns {missing}")


def _analyse(runs: pd.DataFrame, curves: pd.DataFrame | None, min_seeds: int,
             tail_frac: float, trend_alpha: float, max_progress: float) -> _Analysis:
    _check_runs(runs)
    runs = runs.sort_values(["config_id", "seed"], kind="stable").reset_index(drop=True)
    n = len(runs)
    run_ids = runs["run_id"].astype(str).tolist()
    cfg = runs["config_id"].astype(str).to_numpy()
    status = runs["status"].astype(str).to_numpy()
    final = runs["final_return"].to_numpy(dtype=float)
    env = runs["env"].astype(str).to_numpy() if "env" in runs else np.full(n, "", dtype=object)
    pruned = status == "pruned"
    diverged = ~pruned & ((status == "diverged") | ~np.isfinite(final))
    usable = ~pruned & ~diverged
    dec = decimals_for(final[usable]) - 1  # one decimal fewer than the tables: prose

    has_curves = curves is not None and len(curves) > 0
    if has_curves:
        f = _curve_features(curves, run_ids, tail_frac, trend_alpha)
    else:
        nan = np.full(n, np.nan)
        f = _Features(np.zeros(n, int), nan, nan, nan, nan, nan, nan, np.zeros(n, bool), nan,
                      nan, nan, Interpolator(np.array([]), np.array([]), np.array([]), n))
    curve_ok = f.n_valid >= 3

    mode_idx = np.full(n, -1)
    candidate = np.zeros(n, dtype=bool)
    why: dict[int, str] = {}  # run row -> the mode story, for trapped candidates
    ref_rows: dict[int, np.ndarray] = {}  # run row -> rows of successful runs to compare with
    modes: dict[str, list[Mode]] = {}
    sweep_modes: dict[str, list[Mode]] = {}
    best_rows: dict[str, np.ndarray] = {}
    levels: list[TrappedLevel] = []
    level_refs: list[np.ndarray] = []  # per level: successful runs where it was found
    groups = {c: np.flatnonzero(cfg == c) for c in pd.unique(cfg)}

    def initial_of(rows: np.ndarray) -> float:
        x = f.initial[rows]
        return float(np.nanmedian(x)) if np.isfinite(x).any() else np.nan

    def is_trap(m: Mode, best: Mode, init: float) -> bool:
        # Clearly below: realises at most max_progress of the best mode's improvement over
        # the starting return (a cluster just under a capped maximum is not a trap).
        # Concentrated: trapped agents sit at the same level (racing off the track gives
        # about -28 every time), so the mode's spread is at most TRAP_MAX_SPREAD of its
        # distance below the best mode; a wide low "mode" is a spread of slow learners.
        return (np.isfinite(init) and best.level - init > 0
                and (m.level - init) <= max_progress * (best.level - init)
                and m.spread <= TRAP_MAX_SPREAD * (best.level - m.level))

    # Pass 1: modes within each config with enough seeds; low modes far below the best.
    for cid, rows in groups.items():
        r = rows[usable[rows]]
        if r.size < min_seeds:
            continue
        init = initial_of(r)
        ms = find_modes(final[r], min_gap=_min_gap(final[r], init))
        modes[cid] = ms
        mode_idx[r] = assign_modes(final[r], ms)
        best = ms[-1]
        best_rows[cid] = r[mode_idx[r] == best.index]
        for m in ms[:-1]:
            if not is_trap(m, best, init):
                continue
            levels.append(TrappedLevel(cid, m, best, init, str(env[rows[0]]), (cid,)))
            level_refs.append(best_rows[cid])
            members = r[mode_idx[r] == m.index]
            candidate[members] = True
            for i in members:
                why[i] = (f"final {fmt_number(final[i], dec)} in a low mode "
                          f"({m.describe(dec)}) of its config, best mode "
                          f"{best.describe(dec)}")
                ref_rows[i] = best_rows[cid]

    # Pass 1b: the pooled final returns of the sweep (per env). A lone trapped seed per
    # config makes no mode within its config, but many of them pile up into a low mode
    # of the pool. Only the runs of that mode whose configs' other seeds reach a higher
    # mode support a trap (a weak config in the same pooled mode does not); their own
    # modes (at least two runs each) are the trapped levels.
    for e in pd.unique(env[usable]):
        r = np.flatnonzero(usable & (env == e))
        if r.size < min_seeds or len(groups) < 2:
            continue
        gap = _min_gap(final[r], initial_of(r))
        pm = find_modes(final[r], min_gap=gap)
        sweep_modes[str(e)] = pm
        if len(pm) < 2:
            continue
        lab = assign_modes(final[r], pm)
        top = pd.Series(lab).groupby(cfg[r]).max().reindex(cfg[r]).to_numpy()
        for m in pm[:-1]:
            support = r[(lab == m.index) & (top > m.index)]
            if support.size < 2:
                continue
            for sm in find_modes(final[support], min_gap=gap):
                members = support[(final[support] >= sm.lo) & (final[support] <= sm.hi)]
                cfgs = tuple(pd.unique(cfg[members]))
                rows_c = np.flatnonzero(np.isin(cfg, cfgs) & usable)
                init = initial_of(rows_c)
                if sm.count < 2 or not is_trap(sm, pm[-1], init):
                    continue
                # index: the pooled mode (sweep_modes[env]) the level lies in
                level = replace(sm, index=m.index, total=int(r.size))
                above = r[np.isin(cfg[r], cfgs) & (lab > m.index)]
                levels.append(TrappedLevel("", level, pm[-1], init, str(e), cfgs))
                level_refs.append(above)
                for i in members[~candidate[members]]:
                    candidate[i] = True
                    ref_rows[i] = above[cfg[above] == cfg[i]]
                    why[i] = (f"final {fmt_number(final[i], dec)} in a low mode of the sweep "
                              f"({level.describe(dec, 'runs')}), while its config's best "
                              f"seed reaches {fmt_number(final[ref_rows[i]].max(), dec)}")

    # Pass 2: runs of any config at a trapped level found in another config of the same
    # env. A weak config whose seeds all sit there is trapped, since the same level is a
    # known trap where that failure can be told from success; one elsewhere is just weak.
    if levels:
        lo_all, hi_all = np.nanmin(final[usable]), np.nanmax(final[usable])
        floor = 0.01 * float(hi_all - lo_all)
        lv = np.array([t.mode.level for t in levels])
        # Within 3 sd of a trapped mode; the sd is floored at 1% of the sweep's range so
        # that a trapped mode of identical values still has a catchment.
        tol = 3 * np.maximum([t.mode.spread for t in levels], floor)
        lv_env = np.array([t.env for t in levels], dtype=object)
        for cid, rows in groups.items():
            r = rows[usable[rows] & ~candidate[rows]]
            if r.size == 0:
                continue
            own = np.array([t.config_id == cid for t in levels])
            hit = ((np.abs(final[r][:, None] - lv[None, :]) <= tol[None, :])
                   & (lv_env == env[r[0]])[None, :] & ~own[None, :])
            found = hit.any(axis=1)
            if not found.any():
                continue
            candidate[r[found]] = True
            # Successful runs to compare with: this config's runs above the trap (its best
            # mode when it has modes), else those where the trapped level was found.
            rest = r[~found]
            if cid in modes:
                rest = np.intersect1d(rest, best_rows[cid])
            for i, k in zip(r[found], np.argmax(hit[found], axis=1), strict=True):
                t = levels[k]
                where = (f"in mode {modes[cid][mode_idx[i]].describe(dec)} of its config, "
                         if cid in modes and len(modes[cid]) > 1 else "")
                found_in = (f"config {t.config_id}" if t.config_id
                            else f"the sweep ({t.mode.describe(dec, 'runs')})")
                why[i] = (f"final {fmt_number(final[i], dec)} {where}at the trapped level "
                          f"{fmt_number(t.mode.level, dec)} found in {found_in}")
                better = rest[final[rest] > final[i]]
                ref_rows[i] = better if better.size else level_refs[k]

    # Labels.
    cls = np.full(n, "ok", dtype=object)
    cls[f.learning & usable] = "learning"
    # A trap is a level the run stays at: one reached in the last TRAP_MIN_HOLD of the run
    # may be a waypoint of a slow learner (a short budget stops many runs mid-climb).
    held = f.plateau_step <= (1.0 - TRAP_MIN_HOLD) * f.last_step
    trapped = candidate & curve_ok & ~f.learning & held
    cls[trapped] = "trapped"
    cls[diverged] = "diverged"
    cls[pruned] = "pruned"

    # Entropy of trapped runs at their plateau vs successful runs there.
    ref_entropy = np.full(n, np.nan)
    ref_min = np.full(n, np.nan)
    ref_n = np.zeros(n, dtype=int)
    for i in np.flatnonzero(trapped):
        rr = ref_rows.get(i, np.array([], dtype=int))
        rr = rr[(cls[rr] == "ok") | (cls[rr] == "learning")]
        if rr.size == 0 or not np.isfinite(f.plateau_step[i]):
            continue
        e = f.entropy.at(rr, np.full(rr.size, f.plateau_step[i]))
        e = e[np.isfinite(e)]
        if e.size:
            ref_entropy[i], ref_min[i], ref_n[i] = np.median(e), e.min(), e.size

    reasons = _reasons(runs, cls, candidate, why, f, ref_entropy, ref_min, ref_n, curve_ok,
                       has_curves, dec)
    per_run = pd.DataFrame({
        "run_id": run_ids,
        "config_id": cfg,
        "seed": runs["seed"].to_numpy(),
        "classification": pd.Categorical(cls, categories=list(CLASSES)),
        "mode": pd.Series(mode_idx).where(mode_idx >= 0).astype("Int64"),
        "plateau_step": np.where(trapped, f.plateau_step, np.nan),
        "entropy_at_plateau": np.where(trapped, f.entropy_at_plateau, np.nan),
        "reference_entropy": ref_entropy,
        "reason": reasons,
        "final_return": final,
    })[list(PER_RUN_COLUMNS)]
    return _Analysis(per_run, modes, levels, has_curves, sweep_modes)


def _reasons(runs: pd.DataFrame, cls: np.ndarray, candidate: np.ndarray, why: dict[int, str],
             f: _Features, ref_entropy: np.ndarray, ref_min: np.ndarray, ref_n: np.ndarray,
             curve_ok: np.ndarray, has_curves: bool, dec: int) -> list[str]:
    """One sentence per run saying why it got its label (a loop over runs, not points)."""
    status = runs["status"].astype(str).to_numpy()
    div_at = runs["diverged_at_step"] if "diverged_at_step" in runs else None
    out = []
    for i, c in enumerate(cls):
        if c == "pruned":
            out.append("pruned by the sweep (stopped early); left out of every rate")
        elif c == "diverged":
            if status[i] == "diverged":
                at = div_at.iloc[i] if div_at is not None else None
                out.append("diverged (non-finite loss or parameters)"
                           + (f" at step {int(at)}" if at is not None and not pd.isna(at)
                              else ""))
            else:
                out.append("final_return is not finite")
        elif c == "trapped":
            s = f"{why[i]}; plateaued at step {int(f.plateau_step[i])}"
            e, r = f.entropy_at_plateau[i], ref_entropy[i]
            if np.isfinite(e) and np.isfinite(r):
                s += (f"; policy entropy there {e:.3g} vs {r:.3g} (median of {ref_n[i]} "
                      f"successful runs at that step)")
                if e < ref_min[i]:
                    s += ", below all of them: entropy collapse"
            elif np.isfinite(e):
                s += f"; policy entropy there {e:.3g} (no successful run to compare with)"
            out.append(s)
        elif c == "learning":
            s = (f"still improving: +{fmt_number(f.rise[i], dec)} over the last "
                 f"{int(f.tail_span[i])} steps, more than 5% of its range (t = "
                 f"{f.trend_t[i]:.1f}, p = {f.trend_p[i]:.1g}; noise sd "
                 f"{fmt_number(f.noise[i], dec)})")
            if candidate[i]:
                s += f"; now {why[i]}"
            out.append(s)
        elif not has_curves or f.n_valid[i] == 0:
            out.append("no curve: whether it is trapped or still learning cannot be told")
        elif candidate[i] and not curve_ok[i]:
            out.append(f"{why[i]}, but too few curve points to tell whether it plateaued")
        elif candidate[i]:
            out.append(f"{why[i]}, but it reached that level only at step "
                       f"{int(f.plateau_step[i])} of {int(f.last_step[i])}: too late in the "
                       "run to call it a trap")
        else:
            out.append("plateaued, not in a trapped mode")
    return out


def classify_runs(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    *,
    min_seeds: int = 4,
    tail_frac: float = 0.25,
    trend_alpha: float = 0.001,
    max_progress: float = 0.5,
) -> pd.DataFrame:
    """One row per run: ``run_id, config_id, seed, classification, mode, plateau_step,
    entropy_at_plateau, reference_entropy, reason, final_return``; sorted by config, seed.

    ``classification`` is one of :data:`CLASSES` (see the module docstring). ``mode`` is
    the index (0 = lowest) of the run's mode among its config's modes (:func:`find_modes`
    on configs with at least ``min_seeds`` finite final returns), ``<NA>`` otherwise.
    For trapped runs: ``plateau_step``, the (smoothed) policy entropy there, and
    ``reference_entropy``, the median entropy of successful runs at the same step (the
    config's runs above the trap, in its best mode when it has modes; for a config
    without successes, the successful runs where the trapped level was found).

    Trapped levels come from three passes: (1) within each config with ``min_seeds``
    finite final returns, a lower mode that is "clearly below" the best one: a separate
    mode (:func:`find_modes`) realising at most ``max_progress`` of the best mode's
    improvement over the config's starting return (median of the curves' first points;
    so a cluster just under a capped maximum is not a trap); (2) the same test on the
    sweep's pooled final returns, per env, using only the low-mode runs of configs whose
    other seeds reach a higher mode; (3) every other run within 3 sd (floored at 1% of
    the sweep's range) of a trapped level found in another config of the same env. A run
    so placed is trapped if it is not still learning and has at least 3 curve points.
    Without curves nothing can be shown to have plateaued, so only diverged and pruned
    runs are labelled. ``final_return`` is always the value classified, whatever metric
    a table uses.
    """
    return _analyse(runs, curves, min_seeds, tail_frac, trend_alpha, max_progress).per_run


# --------------------------------------------------------------------------------------
# the report


@dataclass(frozen=True)
class SeedsNeeded:
    """Welch power analysis for the two best configs (by IQM of final_return)."""

    config_a: str
    config_b: str
    mean_a: float
    mean_b: float
    std_a: float
    std_b: float
    n_a: int
    n_b: int
    seeds: int | None  # per config; None: no finite number (equal means) or too many
    alpha: float = 0.05
    power: float = 0.8


@dataclass
class FailureReport:
    """Everything :func:`failure_report` found; :meth:`markdown` renders it."""

    per_run: pd.DataFrame
    modes: dict[str, list[Mode]]
    trapped_levels: list[TrappedLevel]
    per_config: pd.DataFrame
    by_hyperparameter: pd.DataFrame
    seeds_needed: SeedsNeeded | None
    hyperparameters: list[str]
    labels: dict[str, str]
    sweep_modes: dict[str, list[Mode]] = field(default_factory=dict)  # pooled, per env
    has_curves: bool = True
    source: str = ""
    decimals: int = 1
    max_rows: int = 50

    @property
    def counts(self) -> dict[str, int]:
        """Runs per classification (every label, zeros included)."""
        vc = self.per_run["classification"].value_counts()
        return {c: int(vc.get(c, 0)) for c in CLASSES}

    def markdown(self) -> str:
        """The report as Markdown (tables capped at ``max_rows`` rows each)."""
        return _markdown(self)


def _per_config(per_run: pd.DataFrame, runs: pd.DataFrame, hps: list[str],
                modes: dict[str, list[Mode]], levels: list[TrappedLevel],
                dec: int) -> pd.DataFrame:
    pr = per_run[per_run["classification"] != "pruned"]
    counts = pd.crosstab(pr["config_id"], pr["classification"]).reindex(
        columns=list(CLASSES), fill_value=0)
    first = runs.drop_duplicates("config_id").set_index("config_id")
    trapped_modes = {(t.config_id, t.mode.index) for t in levels}
    rows = []
    for cid in sorted(counts.index):
        c = counts.loc[cid]
        n = int(c.sum())
        k = int(c["trapped"])
        lo, hi = stats.wilson_interval(k, n)
        desc = "; ".join(
            m.describe(dec) + (" (trapped)" if (cid, m.index) in trapped_modes else "")
            for m in modes.get(cid, [])
        )
        rows.append({
            "config_id": cid,
            **{h: first.at[cid, h] for h in hps},
            "n_runs": n, "n_ok": int(c["ok"]), "n_learning": int(c["learning"]),
            "n_trapped": k, "n_diverged": int(c["diverged"]),
            "trapped_rate": k / n if n else np.nan, "trapped_lo": lo, "trapped_hi": hi,
            "modes": desc,
        })
    return pd.DataFrame(rows)


def _by_hyperparameter(per_run: pd.DataFrame, runs: pd.DataFrame,
                       hps: list[str]) -> pd.DataFrame:
    """Trapped rate per hyperparameter value vs the rest of the sweep (Fisher exact test)."""
    pr = per_run[per_run["classification"] != "pruned"][["run_id", "classification"]]
    merged = pr.merge(runs[["run_id", *hps]], on="run_id", how="left")
    is_t = (merged["classification"] == "trapped").to_numpy()
    n_all, k_all = len(merged), int(is_t.sum())
    rows = []
    for h in hps:
        col = merged[h]
        for v in pd.unique(col):
            sel = col.isna().to_numpy() if pd.isna(v) else (col == v).to_numpy()
            n, k = int(sel.sum()), int(is_t[sel].sum())
            rn, rk = n_all - n, k_all - k
            lo, hi = stats.wilson_interval(k, n)
            rlo, rhi = stats.wilson_interval(rk, rn)
            p = float(_st.fisher_exact([[k, n - k], [rk, rn - rk]])[1]) if n and rn else 1.0
            rate = k / n if n else np.nan
            rest = rk / rn if rn else np.nan
            rows.append({
                "hyperparameter": h, "value": format_value(v), "n": n, "trapped": k,
                "rate": rate, "lo": lo, "hi": hi, "rest_n": rn, "rest_trapped": rk,
                "rest_rate": rest, "rest_lo": rlo, "rest_hi": rhi, "p_value": p,
                "raises": bool(n and rn and rate > rest and p < 0.05),
            })
    cols = ["hyperparameter", "value", "n", "trapped", "rate", "lo", "hi", "rest_n",
            "rest_trapped", "rest_rate", "rest_lo", "rest_hi", "p_value", "raises"]
    return pd.DataFrame(rows, columns=cols)


def _seeds_needed(runs: pd.DataFrame, per_run: pd.DataFrame) -> SeedsNeeded | None:
    ok = per_run[~per_run["classification"].isin(["pruned", "diverged"])]
    vals = {c: g["final_return"].to_numpy(float) for c, g in ok.groupby("config_id")}
    vals = {c: v[np.isfinite(v)] for c, v in vals.items()}
    vals = {c: v for c, v in vals.items() if v.size >= 2}
    if len(vals) < 2:
        return None
    ranked = sorted(vals, key=lambda c: (-stats.iqm(vals[c]), -float(np.median(vals[c])), c))
    a, b = ranked[0], ranked[1]
    xa, xb = vals[a], vals[b]
    n = stats.welch_seeds_needed(xa, xb)
    return SeedsNeeded(a, b, float(xa.mean()), float(xb.mean()), float(xa.std(ddof=1)),
                       float(xb.std(ddof=1)), int(xa.size), int(xb.size), n)


def failure_report(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    *,
    min_seeds: int = 4,
    tail_frac: float = 0.25,
    trend_alpha: float = 0.001,
    max_progress: float = 0.5,
    source: str = "",
) -> FailureReport:
    """Classify every run (:func:`classify_runs`) and summarise the failures.

    ``per_config``: per config the counts per label and the trapped rate with a 95%
    Wilson interval (pruned runs left out), and its modes. ``by_hyperparameter``: per
    value of each differing hyperparameter, the trapped rate and interval of the runs with
    that value vs all other runs, with a two-sided Fisher exact p-value; ``raises`` marks
    values with a higher rate at p < 0.05 (uncorrected for the number of values: read it
    as a lead, not a verdict). ``seeds_needed``: seeds per config for a one-sided Welch
    t-test (alpha 0.05, power 0.8) to separate the two best configs by final_return.
    """
    _check_runs(runs)
    if len(runs) == 0:
        raise ConfigError("no runs to analyse")
    an = _analyse(runs, curves, min_seeds, tail_frac, trend_alpha, max_progress)
    hps = hyperparameter_columns(runs)
    fin = runs["final_return"].to_numpy(float)
    dec = max(0, decimals_for(fin[np.isfinite(fin)]) - 1)
    return FailureReport(
        per_run=an.per_run,
        modes=an.modes,
        trapped_levels=an.trapped_levels,
        per_config=_per_config(an.per_run, runs, hps, an.modes, an.trapped_levels, dec),
        by_hyperparameter=_by_hyperparameter(an.per_run, runs, hps),
        seeds_needed=_seeds_needed(runs, an.per_run),
        hyperparameters=hps,
        labels=config_labels(runs, hps),
        sweep_modes=an.sweep_modes,
        has_curves=an.has_curves,
        source=source,
        decimals=dec,
    )


# --------------------------------------------------------------------------------------
# Markdown


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


def _pct(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _rate(k: int, n: int, lo: float, hi: float) -> str:
    return f"{k}/{n} = {_pct(k / n if n else np.nan)} [{_pct(lo)}, {_pct(hi)}]"


def _markdown(rep: FailureReport) -> str:
    d = rep.decimals
    cnt = rep.counts
    total = len(rep.per_run)
    n_cfg = rep.per_run["config_id"].nunique()
    lab = rep.labels
    title = f"# Failure analysis{': ' + rep.source if rep.source else ''}"
    lines = [title, ""]
    parts = [f"{cnt[c]} {c}" for c in CLASSES if cnt[c] or c in ("ok", "trapped", "diverged")]
    lines.append(f"{total} runs in {n_cfg} configs: " + ", ".join(parts) + ".")
    if not rep.has_curves:
        lines += ["", "The store has no curves, so no run can be shown to have plateaued or "
                  "to be still learning; only diverged runs are identified."]
    lines.append("")

    def label(cid: str) -> str:
        return lab.get(cid, cid)

    def capped(rows: list[list[str]], what: str) -> list[list[str]]:
        if len(rows) > rep.max_rows:
            extra = len(rows) - rep.max_rows
            return rows[: rep.max_rows] + [[f"... {extra} more {what} (see --csv)"]
                                           + [""] * (len(rows[0]) - 1)]
        return rows

    # Modes.
    lines += ["## Modes of the final return", ""]
    multi = {c: m for c, m in rep.modes.items() if len(m) > 1}
    trapped_modes = {(t.config_id, t.mode.index) for t in rep.trapped_levels}
    if not rep.modes:
        lines.append("No config has enough seeds with a finite final return to look for "
                     "modes within it.")
    elif not multi:
        lines.append(f"Within each config the final returns form a single mode "
                     f"({len(rep.modes)} configs checked).")
    else:
        rows = [[label(c), "; ".join(
            ("**" + m.describe(d) + " (trapped)**") if (c, m.index) in trapped_modes
            else m.describe(d) for m in ms)] for c, ms in sorted(multi.items())]
        lines += _md(["config", "modes (level +/- sd: seeds)"], capped(rows, "configs"))
        lines.append(f"\n{len(rep.modes) - len(multi)} other configs have a single mode.")
    pooled = {e: ms for e, ms in rep.sweep_modes.items() if len(ms) > 1}
    for e, ms in pooled.items():
        desc = "; ".join(m.describe(d, "runs") for m in ms)
        lines += ["", f"Pooled over the sweep{' (' + e + ')' if e else ''}: {desc}."]
        for t in rep.trapped_levels:
            if not t.config_id and t.env == e:
                pr_all = rep.per_run
                held = int(((pr_all["classification"] == "trapped")
                            & pr_all["config_id"].isin(t.configs)
                            & pr_all["final_return"].between(t.mode.lo, t.mode.hi)).sum())
                note = ("" if held == t.mode.count else
                        f" {held} of them held it (the trapped runs below); the others "
                        "were still learning or reached it late.")
                lines.append(f"Trapped level **{t.mode.describe(d, 'runs')}**: runs of "
                             f"{len(t.configs)} configs whose other seeds do better (so a "
                             f"trap, not a weak config).{note}")
    if not rep.trapped_levels:
        lines += ["", "No trapped mode: no low mode is clearly below its config's best "
                  "(at most half of the best mode's improvement over the starting return)."]
    lines.append("")

    pr = rep.per_run
    # Trapped runs.
    tr = pr[pr["classification"] == "trapped"]
    lines += ["## Trapped runs", ""]
    if tr.empty:
        lines.append("None.")
    else:
        rows = []
        for r in tr.itertuples(index=False):
            e, ref = r.entropy_at_plateau, r.reference_entropy
            rows.append([label(r.config_id), str(r.seed), fmt_number(r.final_return, d),
                         str(int(r.plateau_step)), f"{e:.3g}" if np.isfinite(e) else "-",
                         f"{ref:.3g}" if np.isfinite(ref) else "-"])
        lines += _md(["config", "seed", "final return", "plateau step",
                      "entropy at plateau", "successful runs' entropy"],
                     capped(rows, "trapped runs"))
        collapse = tr["reason"].str.contains("entropy collapse").sum()
        with_ref = np.isfinite(tr["reference_entropy"]).sum()
        if with_ref:
            lines += ["", f"{collapse} of {with_ref} trapped runs with a comparison had a "
                      "lower policy entropy at their plateau than every successful run at "
                      "the same step (entropy collapse)."]
    lines.append("")

    for what, title in (("learning", "Still learning at the end"), ("diverged", "Diverged")):
        sub = pr[pr["classification"] == what]
        if sub.empty:
            continue
        lines += [f"## {title}", ""]
        rows = [[label(r.config_id), str(r.seed), r.reason] for r in sub.itertuples()]
        lines += _md(["config", "seed", "why"], capped(rows, "runs"))
        lines.append("")

    # Rates per config.
    pc = rep.per_config
    if not pc.empty:
        lines += ["## Trapped rate per config (95% Wilson interval)", ""]
        pc = pc.sort_values(["trapped_rate", "config_id"], ascending=[False, True])
        rows = [[label(r.config_id), str(r.n_runs), str(r.n_ok), str(r.n_learning),
                 _rate(r.n_trapped, r.n_runs, r.trapped_lo, r.trapped_hi), str(r.n_diverged)]
                for r in pc.itertuples()]
        lines += _md(["config", "runs", "ok", "learning", "trapped", "diverged"],
                     capped(rows, "configs"))
        lines.append("")

    bh = rep.by_hyperparameter
    if cnt["trapped"] and not bh.empty:
        lines += ["## Hyperparameter values and the trapped rate", "",
                  "Runs with each value vs all other runs; p from Fisher's exact test "
                  "(uncorrected for the number of values compared).", ""]
        rows = [[r.hyperparameter, r.value, _rate(r.trapped, r.n, r.lo, r.hi),
                 _rate(r.rest_trapped, r.rest_n, r.rest_lo, r.rest_hi), f"{r.p_value:.2g}",
                 "**raises**" if r.raises else ""] for r in bh.itertuples()]
        lines += _md(["hyperparameter", "value", "trapped", "rest of the sweep", "p", ""],
                     rows)
        lines.append("")

    lines += ["## Seeds needed to separate the two best configs", ""]
    s = rep.seeds_needed
    if s is None:
        lines.append("Needs two configs with at least 2 finite final returns each.")
    else:
        diff = f"{fmt_number(s.mean_a, d)} vs {fmt_number(s.mean_b, d)}"
        lines.append(
            f"The two best configs by IQM of the final return: {label(s.config_a)} (mean "
            f"{fmt_number(s.mean_a, d)}, sd {fmt_number(s.std_a, d)}, {s.n_a} seeds) and "
            f"{label(s.config_b)} (mean {fmt_number(s.mean_b, d)}, sd "
            f"{fmt_number(s.std_b, d)}, {s.n_b} seeds).")
        lines.append("")
        if s.seeds is None:
            lines.append(f"The means are equal ({diff}) or too close: no number of seeds "
                         "separates them with a Welch t-test.")
        else:
            enough = min(s.n_a, s.n_b) >= s.seeds
            lines.append(
                f"A one-sided Welch t-test (alpha {s.alpha}, power {s.power}) needs "
                f"**{s.seeds} seeds per config** to detect this difference (Colas et al. "
                f"2018); the store has {min(s.n_a, s.n_b)}"
                + (", enough." if enough else ", not enough."))
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------
# CLI


def _load(path: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Runs and curves of a results store (StoreError, one line, if it is not one)."""
    from study import store

    runs = store.load_runs(path)
    curves = store.load_curves(path, allow_empty=True)
    return runs, (curves if len(curves) else None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.failures RESULTS_DIR [--csv FILE]``: print the Markdown report."""
    from study.cli_util import ArgumentParser, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = ArgumentParser(prog="python -m study.failures",
                            description="Classify every run (ok, learning, trapped, diverged) "
                            "and report modes, trapped rates and seeds needed.")
        ap.add_argument("results_dir", help="a results store written by a sweep")
        ap.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
        args = ap.parse_args(args_in)
        runs, curves = _load(args.results_dir)
        rep = failure_report(runs, curves, source=str(args.results_dir))
        if args.csv:
            try:
                Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
                rep.per_run.to_csv(args.csv, index=False)
            except OSError as e:
                raise ConfigError(f"cannot write {args.csv}: {e.strerror or e}") from None
        sys.stdout.write(rep.markdown())
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
