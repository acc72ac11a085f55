"""Why runs fail: diverged, trapped in a bad mode, still learning, or fine.

Every run of a sweep is classified from the data alone, with no per-environment
threshold (every cut-off below is relative to the spread of the sweep's own values):

``diverged``
    status "diverged": the trainer stopped it on a non-finite loss or parameter. Nothing
    else is: a run with status ok and a NaN ``final_return`` (no episode finished in its
    last 10% of steps) keeps the label its curve gives, and has no final return in any
    statistic.
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

    A *lone* trapped run has no mode of its own (one seed cannot make one): in a config
    with at least LONE_MIN_SEEDS seeds, the lowest run is trapped alone when it is the
    only one below ``median - LONE_Z * spread`` of its config's other seeds (spread: their
    MAD times 1.4826, at least the curves' median noise and MODE_MIN_GAP of the learning
    range), the config learnt (its other seeds' median improvement over the start exceeds
    that same margin), the run realises at most half of that median improvement, and it
    held its level for the last quarter like any trapped run (it is not collapsed below
    its start, which keeps its own label). A MinAtar Breakout seed whose policy went
    deterministic early and sat at 1.5 for 450k steps while 15 seeds reached 5 to 8 is
    one. Two or more low runs at different levels are a spread of slow learners, as for
    modes, and are not trapped.
``collapsed``
    ended clearly below the return of an untrained policy (CartPole seeds that settle at
    9.4, below a random policy's ~22), by more than 4 standard errors and COLLAPSE_MIN_DROP
    of that start, and not still learning. The start is the run's own first points, or the
    median first points of every run of its env if higher (a policy can collapse within
    its first log window). A config whose every seed collapses has one
    mode and no trap, but every one of its runs failed.
``learning``
    still improving at the end: over the last quarter of the curve, a rise significantly
    larger than 5% of the curve's range, tested against the curve's own noise there, that
    has not flattened in the last 10% of the points (a cap reached and held is not
    learning).
``ok``
    everything else. ``pruned`` runs get their own label and are left out of every rate.

Trapped, collapsed and diverged runs are failures (:data:`FAILED`).

Modes come from :func:`find_modes`; the trend test and the plateau step from one
vectorized pass over all curves (:func:`study.analysis.curves.curve_matrix`), so 1,000 runs x 500
log points take well under a second.

Run as ``python -m study.failures RESULTS_DIR [--csv FILE]`` for the Markdown report.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as _st

from study.analysis import stats
from study.analysis.curves import Interpolator, curve_matrix
from study.config import NAMES, ConfigError
from study.text import format_value, markdown_lines

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
    "hyperparameter_columns",
    "main",
]

#: Family-wise error rate of the "raises the trapped rate" claims (Holm-adjusted).
ALPHA = 0.05
#: Every label :func:`classify_runs` gives.
CLASSES: tuple[str, ...] = ("ok", "learning", "trapped", "collapsed", "diverged", "pruned")
#: The labels that count as a failed run (in the seed table's failure rate).
FAILED: tuple[str, ...] = ("trapped", "collapsed", "diverged")
#: Columns of the runs that fix a run's budget: part of what a config means (its id hashes
#: them), so a sweep edited under the same name stores both budgets side by side.
BUDGET_COLUMNS: tuple[str, ...] = ("total_steps", "log_every", "eval_every", "eval_episodes")
#: A trapped level's spread is at most this fraction of its distance below the best mode.
TRAP_MAX_SPREAD = 0.05
#: A trapped run has held its level for at least this fraction of its steps.
TRAP_MIN_HOLD = 0.25
#: Modes closer than this fraction of the learning range (best final return minus the
#: starting return) are one mode: 498 and 500 on CartPole are both "solved".
MODE_MIN_GAP = 0.05
#: A lone trapped run (an outlier far below its config's other seeds) needs a config of at
#: least this many seeds with a final return, itself included.
LONE_MIN_SEEDS = 5
#: ... and to lie more than this many robust spreads (1.4826 MAD, the normal-consistent
#: scale) below the median of the other seeds: Iglewicz and Hoaglin's cut-off for the
#: modified z-score.
LONE_Z = 3.5
#: A mid-training drop is listed only if it is at least this share of its config's median
#: improvement over the start (|median final - median first points|).
DROP_MIN_SHARE = 0.25

PER_RUN_COLUMNS: tuple[str, ...] = (
    "run_id", "config_id", "seed", "classification", "mode", "plateau_step",
    "entropy_at_plateau", "reference_entropy", "reason", "final_return",
)


# --------------------------------------------------------------------------------------
# helpers shared with study.tables (which imports this module)


def hyperparameter_columns(runs: pd.DataFrame, differing: bool = True) -> list[str]:
    """``env``, the budget (:data:`BUDGET_COLUMNS`) and the hyperparameters of
    :data:`study.config.NAMES` present in ``runs``.

    With ``differing`` (the default) only those with more than one distinct value in
    ``runs`` (NaN counts as a value): the columns that tell configs apart. A budget that
    differs is one of them, so two configs with the same hyperparameters at two budgets
    never look like duplicated rows.
    """
    cols = [c for c in ("env", *BUDGET_COLUMNS, *NAMES) if c in runs.columns]
    if differing:
        cols = [c for c in cols if runs[c].nunique(dropna=False) > 1]
    return cols


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
    prints the same way (``study.analysis.tables --check`` relies on that).
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


def budget_columns(runs: pd.DataFrame) -> list[str]:
    """The budget columns (:data:`BUDGET_COLUMNS`) with more than one value in ``runs``."""
    return [c for c in BUDGET_COLUMNS
            if c in runs.columns and runs[c].nunique(dropna=False) > 1]


def budget_note(runs: pd.DataFrame) -> str | None:
    """One sentence when the store mixes budgets (a sweep edited and re-run under the same
    name), else None: "budgets differ: total_steps 50,000 (10 runs), 100,000 (10 runs) ..."."""
    cols = budget_columns(runs)
    if not cols:
        return None
    parts = []
    for c in cols:
        counts = runs[c].value_counts(dropna=False).sort_index()
        vals = ", ".join(f"{_thousands(v)} ({n} runs)" for v, n in counts.items())
        parts.append(f"{c} {vals}")
    return ("budgets differ: " + "; ".join(parts) + ". A config at another budget is another "
            "config: its rows are separate and name their budget.")


def _thousands(v: object) -> str:
    if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()):
        return f"{int(v):,}"
    return format_value(v)


# --------------------------------------------------------------------------------------
# whether a store holds every run it planned (shared with study.tables and study.report)


def incomplete_note(path: str | Path) -> str | None:
    """One line saying that the store at ``path`` holds fewer runs than its driver planned,
    or None when it is complete (or has no manifest to tell).

    "incomplete: 20 of 80 planned runs (interrupted); resume with: python -m study.grid
    S.toml". Grids: the manifest's ``runs.in_sweep`` against the stored runs of the sweep
    in ``sweep.toml``; Optuna studies: ``optuna.n_trials`` against the trials in
    ``trials.parquet`` that count towards it. The state is :func:`study.store.status`
    (a "running" grid whose driver died reads "interrupted"); the resume command is the
    manifest's, without ``--fresh`` (which would delete what is stored).
    """
    from study import store

    root = Path(path)
    try:
        manifest = store.read_manifest(root)
    except (OSError, ValueError):
        return None
    if not manifest:
        return None
    state = store.status(manifest)
    if manifest.get("kind") == "optuna":
        done, planned, unit = _optuna_progress(root, manifest)
    else:
        done, planned, unit = _grid_progress(root, manifest)
    if state != "running" and (planned is None or done >= planned):
        return None
    count = f"{done} of {planned} planned {unit}" if planned is not None else f"{done} {unit}"
    if state == "running":
        return (f"incomplete: {count} so far; the store is marked running (a driver is "
                "writing it, or was killed without a trace): rerun this when it is done")
    why = {"interrupted": "interrupted", "failed": "its driver failed",
           "timeout": "stopped by --timeout"}.get(state, f"status {state}")
    return f"incomplete: {count} ({why}); resume with: {_resume_command(manifest)}"


def _resume_command(manifest: dict) -> str:
    import os
    import shlex

    cmd = str(manifest.get("command") or "the same command")
    try:
        cmd = shlex.join(a for a in shlex.split(cmd) if a != "--fresh")
    except ValueError:
        pass
    cwd = manifest.get("cwd")
    here = os.getcwd()
    return cmd + (f" (in {cwd})" if cwd and os.path.realpath(str(cwd)) != here else "")


def _grid_progress(root: Path, manifest: dict) -> tuple[int, int | None, str]:
    """(stored runs of the current sweep, planned runs, "runs")."""
    from study import store

    block: dict = manifest["runs"] if isinstance(manifest.get("runs"), dict) else {}
    planned = block.get("in_sweep")
    ids = _planned_run_ids(root)
    if ids is not None and (planned is None or len(ids) == int(planned)):
        return len(ids & store.stored_run_ids(root)), len(ids), "runs"
    # Without the sweep's run ids: what was stored before this invocation plus what it
    # recorded running (a driver killed mid-way recorded none).
    done = int(block.get("already_stored") or 0) + int(block.get("ran") or 0)
    return done, (int(planned) if planned is not None else None), "runs"


def _planned_run_ids(root: Path) -> set[str] | None:
    """Run ids of the store's ``sweep.toml`` (as resolved by the grid driver), or None.

    Rebuilt from the file's values without :func:`study.sweeps.spec.load_sweep`, which would
    validate (make, and for ``module:Env`` ids import) the environment: readers never run
    a store's code.
    """
    import tomllib

    from study import store
    from study.sweeps.spec import Sweep

    try:
        d = tomllib.loads((root / store.SWEEP_FILE).read_text())
        ev = d.get("eval", {})
        sweep = Sweep(
            name=str(d["name"]), env=str(d["env"]), total_steps=int(d["total_steps"]),
            log_every=int(d["log_every"]), seeds=tuple(int(x) for x in d["seeds"]),
            fixed=dict(d.get("hyperparameters", {})),
            grid={k: tuple(v) for k, v in d.get("grid", {}).items()},
            eval_every=int(ev.get("every", 0)), eval_episodes=int(ev.get("episodes", 10)))
        return {r.run_id for r in sweep.runs()}
    except Exception:  # noqa: BLE001 - any unreadable sweep file: fall back to the manifest
        return None


def _optuna_progress(root: Path, manifest: dict) -> tuple[int, int | None, str]:
    """(trials that count towards n_trials, n_trials, "trials"): finished trials, and
    those that failed on their own (as the Optuna driver counts them)."""
    opt: dict = manifest["optuna"] if isinstance(manifest.get("optuna"), dict) else {}
    planned = opt.get("n_trials")
    done = 0
    try:
        t = pd.read_parquet(root / "trials.parquet", columns=["state", "failure"])
        own = t["failure"].fillna("").astype(str).str.split(":").str[0].isin(
            ["diverged", "invalid", "no value", "error"])
        done = int((t["state"].isin(["COMPLETE", "PRUNED"]) | ((t["state"] == "FAIL") & own))
                   .sum())
    except Exception:  # noqa: BLE001 - no trials file yet: none counted
        pass
    return done, (int(planned) if planned is not None else None), "trials"


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
    end_rise: np.ndarray  # fitted rise over the end window (the last END_FRAC of points)
    end_p: np.ndarray  # one-sided p of "the end window rose less than half the tail's pace"
    final_level: np.ndarray  # tail mean
    drop_se: np.ndarray  # standard error of (initial - final_level)
    tail_rises: np.ndarray  # the tail test alone (learning also needs the end window)
    # an untrained policy's return per run (set by _run_arrays; empty until then)
    start: np.ndarray = field(default_factory=lambda: np.empty(0))


def _empty_features(n: int) -> _Features:
    nan = np.full(n, np.nan)
    return _Features(np.zeros(n, int), nan, nan, nan, nan, nan, nan, np.zeros(n, bool), nan,
                     nan, nan, Interpolator(np.array([]), np.array([]), np.array([]), n),
                     nan, nan, nan, nan, np.zeros(n, bool))


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


#: The end window of the "still learning" test: the last 10% of a run's valid points.
END_FRAC = 0.10
#: One-sided level of the test that a run's climb has stopped in its end window.
END_ALPHA = 0.05
#: A run "collapsed" when its final level is below its starting level by more than this
#: fraction of the starting level's magnitude (and by more than 4 standard errors).
COLLAPSE_MIN_DROP = 0.10


@dataclass
class _Fit:
    """Per-run OLS of y on step over a window of valid points (one row per run)."""

    n: np.ndarray  # points in the window
    mean: np.ndarray  # mean of y there
    slope: np.ndarray
    noise: np.ndarray  # residual sd
    n_eff: np.ndarray  # AR(1) effective sample size
    span: np.ndarray  # steps covered
    se_rise: np.ndarray  # standard error of slope * span, AR(1)-inflated

    @property
    def rise(self) -> np.ndarray:
        return self.slope * self.span


def _window_fit(steps: np.ndarray, y: np.ndarray, win: np.ndarray) -> _Fit:
    """OLS of ``y`` on ``steps`` over the points ``win`` of each row, with the slope's
    standard error inflated for lag-1 autocorrelation ``r`` of the residuals:
    ``n_eff = n (1 - r) / (1 + r)``, ``se = noise / sqrt(Sxx) * sqrt(n / n_eff)``."""
    nt = win.sum(axis=1).astype(float)
    xm = _rowsum(steps, win) / nt
    ym = _rowsum(y, win) / nt
    dx = np.where(win, steps - xm[:, None], 0.0)
    dy = np.where(win, y - ym[:, None], 0.0)
    sxx = (dx * dx).sum(axis=1)
    slope = (dx * dy).sum(axis=1) / sxx
    res = np.where(win, dy - slope[:, None] * dx, 0.0)
    ss = (res * res).sum(axis=1)
    noise = np.sqrt(ss / (nt - 2))
    pair = win[:, 1:] & win[:, :-1]
    r1 = np.where(pair, res[:, 1:] * res[:, :-1], 0.0).sum(axis=1) / ss
    r1 = np.clip(np.nan_to_num(r1), 0.0, 0.95)  # negative r would claim extra precision
    n_eff = np.clip(nt * (1 - r1) / (1 + r1), 3.0, np.maximum(nt, 3.0))
    width = steps.shape[1]
    first = np.nanmin(np.where(win, steps, np.nan), axis=1) if width else nt
    last = np.nanmax(np.where(win, steps, np.nan), axis=1) if width else nt
    span = last - first
    se_rise = noise / np.sqrt(sxx) * np.sqrt(nt / n_eff) * span
    return _Fit(nt, ym, slope, noise, n_eff, span, se_rise)


def _one_sided_p(excess: np.ndarray, se: np.ndarray, df: np.ndarray) -> np.ndarray:
    """P(T > excess / se) for Student's t with ``df``; an exact fit (se 0) of a positive
    excess is p = 0, of anything else p = 1."""
    t = excess / se
    t = np.where(se == 0, np.where(excess > 0, np.inf, -np.inf), t)
    return _st.t.sf(t, np.maximum(df, 1.0))


def _curve_features(curves: pd.DataFrame, run_ids: Sequence[str], tail_frac: float,
                    trend_alpha: float) -> _Features:
    """Trend tests, plateau step and entropy there, and the drop below the start, for
    every run at once.

    Trend: ordinary least squares of episode_return on step over the tail (the last
    ``tail_frac`` of the run's valid points, at least 5). Consecutive log windows are
    correlated, so the slope's standard error is inflated by ``sqrt((1 + r)/(1 - r))``
    with ``r`` the lag-1 autocorrelation of the residuals (AR(1) effective sample size
    ``n (1 - r)/(1 + r)``, also used for the degrees of freedom). The null hypothesis is
    not "no rise" but "a rise over the tail of at most 5% of the curve's whole range"
    (max - min of the smoothed curve): ``t = (rise - 0.05 range) / se(rise)``, one-sided
    p below ``trend_alpha``. With hundreds of points the last 1-2% of a converged curve's
    approach is significantly positive, but that is not "still learning"; an improvement
    that matters, beyond its noise, is. And it must not have flattened at the end: the same
    fit over the end window (the last END_FRAC of the valid points, at least 5) is tested
    against half the rise the tail's slope predicts for that window, ``t = (0.5 slope_tail
    span_end - rise_end) / se(rise_end)``; a one-sided p below END_ALPHA means the climb
    has stopped. A run that climbed in its tail and then held a cap (500 on CartPole) for
    its last points is not learning; a noisy ramp still is.

    Plateau: the curve smoothed by a centered moving average (10% of the points, at least
    3) is compared with the final level (tail mean); the plateau step is the first log
    point after the smoothed curve last left the band ``final +/- max(4 sd / sqrt(window),
    5% of the smoothed curve's range)``: noise-sized for noisy curves, travel-sized for
    smooth ones.

    Drop below the start: ``initial - final`` (mean of the first 5% of valid points, at
    least 3, minus the tail mean) has standard error ``sqrt(noise_tail^2 / n_eff +
    sd_head^2 / n_head)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (runs without curve)
        return _curve_features_inner(curves, run_ids, tail_frac, trend_alpha)


def _window(valid: np.ndarray, frac: float, from_end: bool) -> np.ndarray:
    """The first (or last) ``frac`` of each row's valid points, at least 5 (3 at the head)."""
    nv = valid.sum(axis=1)
    fwd = np.cumsum(valid, axis=1) - 1
    if from_end:
        m = np.minimum(np.maximum(5, np.ceil(frac * nv)), nv)
        return valid & ((nv[:, None] - 1 - fwd) < m[:, None])
    m = np.minimum(np.maximum(3, np.ceil(frac * nv)), nv)
    return valid & (fwd < m[:, None])


def _curve_features_inner(curves: pd.DataFrame, run_ids: Sequence[str], tail_frac: float,
                          trend_alpha: float) -> _Features:
    steps, vals, counts = curve_matrix(curves, run_ids, ["episode_return", "entropy"])
    n_runs, width = steps.shape
    y = vals["episode_return"]
    valid = np.isfinite(y)
    nv = valid.sum(axis=1)
    head = _window(valid, 0.05, from_end=False)

    with np.errstate(invalid="ignore", divide="ignore"):
        n_head = head.sum(axis=1)
        initial = _rowsum(y, head) / n_head
        tail = _window_fit(steps, y, _window(valid, tail_frac, from_end=True))
        end = _window_fit(steps, y, _window(valid, END_FRAC, from_end=True))
        half = max(1, int(round(0.1 * float(np.median(nv)) / 2))) if n_runs else 1
        smooth = _rolling_nanmean(y, half)
        final = tail.mean
        rng = np.nanmax(smooth, axis=1) - np.nanmin(smooth, axis=1) if width else tail.n
        # One-sided test of "the tail gained more than 5% of the range", not of "> 0".
        excess = tail.rise - _MIN_TAIL_GAIN * rng
        t = np.where(tail.se_rise == 0, np.where(excess > 0, np.inf, -np.inf),
                     excess / tail.se_rise)
        p = _one_sided_p(excess, tail.se_rise, tail.n_eff - 2)
        # Flattened at the end: the end window rose significantly less than half of what
        # the tail's pace predicts for it (a cap reached and held has an exact-fit 0).
        shortfall = 0.5 * tail.slope * end.span - end.rise
        end_p = _one_sided_p(shortfall, end.se_rise, end.n_eff - 2)
        tail_rises = (tail.n >= 4) & (p < trend_alpha) & (tail.rise > 0)
        learning = tail_rises & ~(end_p < END_ALPHA)
        # 4 sd of the smoothed noise: the curve has ~10 independent windows, and one noise
        # excursion past the band would move the plateau late
        band = np.maximum(4 * np.nan_to_num(tail.noise) / math.sqrt(2 * half + 1), 0.05 * rng)
        logged = np.arange(width)[None, :] < counts[:, None]
        outside = logged & np.isfinite(smooth) & (np.abs(smooth - final[:, None]) >
                                                  band[:, None] + 1e-12 * np.abs(final[:, None]))
        any_out = outside.any(axis=1)
        last_out = np.where(any_out, width - 1 - np.argmax(outside[:, ::-1], axis=1), -1)
        p_idx = np.clip(np.minimum(last_out + 1, counts - 1), 0, max(width - 1, 0))
        head_var = _rowsum((y - initial[:, None]) ** 2, head) / (n_head - 1)
        drop_se = np.sqrt(np.nan_to_num(tail.noise) ** 2 / tail.n_eff
                          + np.nan_to_num(head_var) / n_head)
    rows = np.arange(n_runs)
    has = counts > 0
    plateau_step = np.where(has & (nv > 0), steps[rows, p_idx] if width else np.nan, np.nan)
    ent = _rolling_nanmean(vals["entropy"], half) if width else vals["entropy"]
    ent_at = np.where(has, ent[rows, p_idx] if width else np.nan, np.nan)
    r_idx, c_idx = np.nonzero(logged)
    interp = Interpolator(r_idx, steps[r_idx, c_idx], ent[r_idx, c_idx], n_runs)
    last_step = np.where(has, steps[rows, np.maximum(counts - 1, 0)] if width else np.nan,
                         np.nan)
    return _Features(nv, initial, t, p, tail.rise, tail.noise, tail.span, learning,
                     plateau_step, ent_at, last_step, interp, end.rise, end_p, final,
                     drop_se, tail_rises)


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
    lone: list[str] = field(default_factory=list)  # run ids trapped alone (no mode)


def _pool_keys(runs: pd.DataFrame) -> np.ndarray:
    """Per run, the group whose final returns are pooled to find trapped levels: its env,
    and its budget when budgets differ (a level at 50k steps is not one at 100k)."""
    n = len(runs)
    key = runs["env"].astype(str) if "env" in runs else pd.Series([""] * n, index=runs.index)
    for c in budget_columns(runs):
        key = key + f", {c}=" + runs[c].map(format_value)
    return key.to_numpy(dtype=object)


_REQUIRED = ("run_id", "config_id", "seed", "status", "final_return")


def _check_runs(runs: pd.DataFrame) -> None:
    missing = [c for c in _REQUIRED if c not in runs.columns]
    if missing:
        raise ConfigError(f"runs lack columns {missing}")


@dataclass
class _Runs:
    """The runs of one classification as arrays (sorted by config, then seed), with their
    curve features: what every pass of :func:`_analyse` reads."""

    runs: pd.DataFrame
    run_ids: list[str]
    cfg: np.ndarray
    final: np.ndarray
    env: np.ndarray  # pool keys (:func:`_pool_keys`): env, and budget when budgets differ
    pruned: np.ndarray
    diverged: np.ndarray
    usable: np.ndarray  # neither pruned nor diverged, with a finite final return
    dec: int  # decimals of the reasons' numbers
    f: _Features
    curve_ok: np.ndarray
    has_curves: bool
    groups: dict[str, np.ndarray]  # config id -> its rows

    def initial_of(self, rows: np.ndarray) -> float:
        """The median starting return of ``rows`` (NaN when none has curve points)."""
        x = self.f.initial[rows]
        return float(np.nanmedian(x)) if np.isfinite(x).any() else np.nan


@dataclass
class _Traps:
    """What the trap search has found so far; each pass adds to it."""

    mode_idx: np.ndarray  # per run, its mode in its config's modes (-1: none)
    candidate: np.ndarray  # per run, whether some pass found it at a trapped level
    lone: np.ndarray  # per run, trapped alone (pass 3)
    why: dict[int, str] = field(default_factory=dict)  # run row -> the mode story
    ref_rows: dict[int, np.ndarray] = field(default_factory=dict)  # successful runs to compare
    modes: dict[str, list[Mode]] = field(default_factory=dict)  # per config
    sweep_modes: dict[str, list[Mode]] = field(default_factory=dict)  # per pool (env)
    best_rows: dict[str, np.ndarray] = field(default_factory=dict)  # a config's best mode
    levels: list[TrappedLevel] = field(default_factory=list)
    level_refs: list[np.ndarray] = field(default_factory=list)  # per level: runs above it


def _run_arrays(runs: pd.DataFrame, curves: pd.DataFrame | None, tail_frac: float,
                trend_alpha: float) -> _Runs:
    """The runs sorted by config and seed, as arrays, with their curve features and each
    run's start level (:func:`_start_levels`)."""
    _check_runs(runs)
    runs = runs.sort_values(["config_id", "seed"], kind="stable").reset_index(drop=True)
    n = len(runs)
    run_ids = runs["run_id"].astype(str).tolist()
    cfg = runs["config_id"].astype(str).to_numpy()
    status = runs["status"].astype(str).to_numpy()
    final = runs["final_return"].to_numpy(dtype=float)
    env = _pool_keys(runs)
    pruned = status == "pruned"
    # Only the trainer says a run diverged: a NaN final return with status ok means no
    # episode finished in the run's last 10% of steps, not a blow-up.
    diverged = ~pruned & (status == "diverged")
    usable = ~pruned & ~diverged & np.isfinite(final)
    dec = decimals_for(final[usable]) - 1  # one decimal fewer than the tables: prose
    has_curves = curves is not None and len(curves) > 0
    f = (_curve_features(curves, run_ids, tail_frac, trend_alpha) if has_curves
         else _empty_features(n))
    f.start = _start_levels(f.initial, env)
    groups = {c: np.flatnonzero(cfg == c) for c in pd.unique(cfg)}
    return _Runs(runs, run_ids, cfg, final, env, pruned, diverged, usable, dec, f,
                 f.n_valid >= 3, has_curves, groups)


def _is_trap(m: Mode, best: Mode, init: float, max_progress: float) -> bool:
    """Whether mode ``m`` is a trapped level below ``best`` for runs starting at ``init``.

    Clearly below: it realises at most ``max_progress`` of the best mode's improvement over
    the starting return (a cluster just under a capped maximum is not a trap).
    Concentrated: trapped agents sit at the same level (racing off the track gives about
    -28 every time), so the mode's spread is at most TRAP_MAX_SPREAD of its distance below
    the best mode; a wide low "mode" is a spread of slow learners.
    """
    return bool(np.isfinite(init) and best.level - init > 0
                and (m.level - init) <= max_progress * (best.level - init)
                and m.spread <= TRAP_MAX_SPREAD * (best.level - m.level))


def _config_traps(d: _Runs, t: _Traps, min_seeds: int, max_progress: float) -> None:
    """Pass 1: the modes of each config with at least ``min_seeds`` usable seeds; every
    mode far below the config's best (:func:`_is_trap`) is a trapped level, its runs
    candidates compared with the runs of the best mode."""
    final = d.final
    for cid, rows in d.groups.items():
        r = rows[d.usable[rows]]
        if r.size < min_seeds:
            continue
        init = d.initial_of(r)
        ms = find_modes(final[r], min_gap=_min_gap(final[r], init))
        t.modes[cid] = ms
        t.mode_idx[r] = assign_modes(final[r], ms)
        best = ms[-1]
        t.best_rows[cid] = r[t.mode_idx[r] == best.index]
        for m in ms[:-1]:
            if not _is_trap(m, best, init, max_progress):
                continue
            t.levels.append(TrappedLevel(cid, m, best, init, str(d.env[rows[0]]), (cid,)))
            t.level_refs.append(t.best_rows[cid])
            members = r[t.mode_idx[r] == m.index]
            t.candidate[members] = True
            for i in members:
                t.why[i] = (f"final {fmt_number(final[i], d.dec)} in a low mode "
                            f"({m.describe(d.dec)}) of its config, best mode "
                            f"{best.describe(d.dec)}")
                t.ref_rows[i] = t.best_rows[cid]


def _pooled_traps(d: _Runs, t: _Traps, min_seeds: int, max_progress: float) -> None:
    """Pass 1b: the pooled final returns of the sweep, per pool (env).

    A lone trapped seed per config makes no mode within its config, but many of them pile
    up into a low mode of the pool. Only the runs of that mode whose configs' other seeds
    reach a higher mode support a trap (a weak config in the same pooled mode does not);
    their own modes (at least two runs each) are the trapped levels.
    """
    final, cfg, env, dec = d.final, d.cfg, d.env, d.dec
    for e in pd.unique(env[d.usable]):
        r = np.flatnonzero(d.usable & (env == e))
        if r.size < min_seeds or len(d.groups) < 2:
            continue
        gap = _min_gap(final[r], d.initial_of(r))
        pm = find_modes(final[r], min_gap=gap)
        t.sweep_modes[str(e)] = pm
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
                init = d.initial_of(np.flatnonzero(np.isin(cfg, cfgs) & d.usable))
                if sm.count < 2 or not _is_trap(sm, pm[-1], init, max_progress):
                    continue
                # index: the pooled mode (sweep_modes[env]) the level lies in
                level = replace(sm, index=m.index, total=int(r.size))
                above = r[np.isin(cfg[r], cfgs) & (lab > m.index)]
                t.levels.append(TrappedLevel("", level, pm[-1], init, str(e), cfgs))
                t.level_refs.append(above)
                for i in members[~t.candidate[members]]:
                    t.candidate[i] = True
                    t.ref_rows[i] = above[cfg[above] == cfg[i]]
                    t.why[i] = (f"final {fmt_number(final[i], dec)} in a low mode of the "
                                f"sweep ({level.describe(dec, 'runs')}), while its config's "
                                f"best seed reaches {fmt_number(final[t.ref_rows[i]].max(), dec)}")


def _known_levels(d: _Runs, t: _Traps) -> None:
    """Pass 2: runs of any config at a trapped level found in another config of the same
    pool (within 3 sd of it). A weak config whose seeds all sit there is trapped, since the
    same level is a known trap where that failure can be told from success; one elsewhere
    is just weak."""
    if not t.levels:
        return
    final, dec, usable = d.final, d.dec, d.usable
    floor = 0.01 * float(np.nanmax(final[usable]) - np.nanmin(final[usable]))
    lv = np.array([lvl.mode.level for lvl in t.levels])
    # The sd is floored at 1% of the sweep's range so that a trapped mode of identical
    # values still has a catchment.
    tol = 3 * np.maximum([lvl.mode.spread for lvl in t.levels], floor)
    lv_env = np.array([lvl.env for lvl in t.levels], dtype=object)
    for cid, rows in d.groups.items():
        r = rows[usable[rows] & ~t.candidate[rows]]
        if r.size == 0:
            continue
        own = np.array([lvl.config_id == cid for lvl in t.levels])
        hit = ((np.abs(final[r][:, None] - lv[None, :]) <= tol[None, :])
               & (lv_env == d.env[r[0]])[None, :] & ~own[None, :])
        found = hit.any(axis=1)
        if not found.any():
            continue
        t.candidate[r[found]] = True
        # Successful runs to compare with: this config's runs above the trap (its best
        # mode when it has modes), else those where the trapped level was found.
        rest = r[~found]
        if cid in t.modes:
            rest = np.intersect1d(rest, t.best_rows[cid])
        for i, k in zip(r[found], np.argmax(hit[found], axis=1), strict=True):
            lvl = t.levels[k]
            where = (f"in mode {t.modes[cid][t.mode_idx[i]].describe(dec)} of its config, "
                     if cid in t.modes and len(t.modes[cid]) > 1 else "")
            found_in = (f"config {lvl.config_id}" if lvl.config_id
                        else f"the sweep ({lvl.mode.describe(dec, 'runs')})")
            t.why[i] = (f"final {fmt_number(final[i], dec)} {where}at the trapped level "
                        f"{fmt_number(lvl.mode.level, dec)} found in {found_in}")
            better = rest[final[rest] > final[i]]
            t.ref_rows[i] = better if better.size else t.level_refs[k]


def _lone_traps(d: _Runs, t: _Traps, max_progress: float) -> None:
    """Pass 3: a lone trapped run. One seed stuck far below its config's other seeds makes
    no mode (a mode needs two), so it is looked for as an outlier of its config
    (:func:`_lone_outlier`) among the runs no earlier pass took."""
    final, dec = d.final, d.dec
    for rows in d.groups.values():
        r = rows[d.usable[rows] & ~t.candidate[rows]]
        if r.size < LONE_MIN_SEEDS:
            continue
        hit = _lone_outlier(final[r], d.f.noise[r], d.initial_of(r), max_progress)
        if hit is None:
            continue
        k, med, margin, init = hit
        i = r[k]
        t.lone[i] = t.candidate[i] = True
        others = np.delete(r, k)
        t.ref_rows[i] = others
        share = (final[i] - init) / (med - init)
        t.why[i] = (f"final {fmt_number(final[i], dec)} trapped alone, far below its config's "
                    f"other {others.size} seeds: the only one below their median "
                    f"{fmt_number(med, dec)} minus {LONE_Z:g} spreads "
                    f"({fmt_number(med - margin, dec)}), realising {share:.0%} of their "
                    f"median improvement over the start {fmt_number(init, dec)}")


def _labels(d: _Runs, t: _Traps) -> tuple[np.ndarray, np.ndarray]:
    """Every run's label (:data:`CLASSES`), and which runs are trapped."""
    f = d.f
    cls = np.full(len(d.final), "ok", dtype=object)
    cls[f.learning & d.usable] = "learning"
    # A trap is a level the run stays at: one reached in the last TRAP_MIN_HOLD of the run
    # may be a waypoint of a slow learner (a short budget stops many runs mid-climb).
    held = f.plateau_step <= (1.0 - TRAP_MIN_HOLD) * f.last_step
    below_start = _collapsed(f, d.curve_ok) & ~d.pruned
    # A lone run that ended below an untrained policy's return is collapsed, as before.
    trapped = t.candidate & d.curve_ok & ~f.learning & held & ~(t.lone & below_start)
    cls[trapped] = "trapped"
    cls[~trapped & below_start] = "collapsed"
    cls[d.diverged] = "diverged"
    cls[d.pruned] = "pruned"
    return cls, trapped


def _reference_entropy(d: _Runs, t: _Traps, cls: np.ndarray, trapped: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per trapped run, the policy entropy of its successful comparison runs (ok or
    learning) at its plateau step: their median, minimum and count (NaN, NaN, 0 when there
    is none): whether the trapped policy's entropy collapsed."""
    n = len(cls)
    ref_entropy, ref_min, ref_n = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, int)
    f = d.f
    for i in np.flatnonzero(trapped):
        rr = t.ref_rows.get(int(i), np.array([], dtype=int))
        rr = rr[(cls[rr] == "ok") | (cls[rr] == "learning")]
        if rr.size == 0 or not np.isfinite(f.plateau_step[i]):
            continue
        e = f.entropy.at(rr, np.full(rr.size, f.plateau_step[i]))
        e = e[np.isfinite(e)]
        if e.size:
            ref_entropy[i], ref_min[i], ref_n[i] = np.median(e), e.min(), e.size
    return ref_entropy, ref_min, ref_n


def _analyse(runs: pd.DataFrame, curves: pd.DataFrame | None, min_seeds: int,
             tail_frac: float, trend_alpha: float, max_progress: float) -> _Analysis:
    """Classify every run: the passes of the trap search (modes within configs, in the
    pooled returns, known levels elsewhere, lone outliers), then labels, entropies and one
    reason per run."""
    d = _run_arrays(runs, curves, tail_frac, trend_alpha)
    n = len(d.final)
    t = _Traps(mode_idx=np.full(n, -1), candidate=np.zeros(n, dtype=bool),
               lone=np.zeros(n, dtype=bool))
    _config_traps(d, t, min_seeds, max_progress)
    _pooled_traps(d, t, min_seeds, max_progress)
    _known_levels(d, t)
    _lone_traps(d, t, max_progress)
    cls, trapped = _labels(d, t)
    ref_entropy, ref_min, ref_n = _reference_entropy(d, t, cls, trapped)
    reasons = _reasons(d.runs, cls, t.candidate, t.why, d.f, ref_entropy, ref_min, ref_n,
                       d.curve_ok, d.has_curves, d.dec)
    f = d.f
    per_run = pd.DataFrame({
        "run_id": d.run_ids,
        "config_id": d.cfg,
        "seed": d.runs["seed"].to_numpy(),
        "classification": pd.Categorical(cls, categories=list(CLASSES)),
        "mode": pd.Series(t.mode_idx).where(t.mode_idx >= 0).astype("Int64"),
        "plateau_step": np.where(trapped, f.plateau_step, np.nan),
        "entropy_at_plateau": np.where(trapped, f.entropy_at_plateau, np.nan),
        "reference_entropy": ref_entropy,
        "reason": reasons,
        "final_return": d.final,
    })[list(PER_RUN_COLUMNS)]
    return _Analysis(per_run, t.modes, t.levels, d.has_curves, t.sweep_modes,
                     [d.run_ids[i] for i in np.flatnonzero(trapped & t.lone)])


def _lone_outlier(final: np.ndarray, noise: np.ndarray, init: float,
                  max_progress: float) -> tuple[int, float, float, float] | None:
    """Whether the lowest of a config's final returns is a lone outlier far below the
    others: ``(its index, the others' median, the margin, the start)``, or None.

    With ``others`` every value but the lowest, ``spread`` is the larger of 1.4826 times
    their median absolute deviation (a robust sd: a second low run cannot inflate it), the
    median noise sd of the config's curves in their last quarter (final returns cannot be
    told apart more finely than that) and MODE_MIN_GAP of the learning range (seeds tied
    at a cap have no spread), and ``margin = LONE_Z * spread``. The lowest value must lie
    below ``median(others) - margin`` and be the only one there (two or more low runs at
    different levels are a spread of slow learners, not a lone trap); the config must
    have learnt, ``median(others) - start > margin``; and the run must realise at most
    ``max_progress`` of that improvement.
    """
    if not np.isfinite(init):
        return None
    order = np.argsort(final, kind="stable")
    k, others = int(order[0]), final[order[1:]]
    med = float(np.median(others))
    mad = 1.4826 * float(np.median(np.abs(others - med)))
    nz = noise[np.isfinite(noise)]
    spread = max(mad, float(np.median(nz)) if nz.size else 0.0,
                 _min_gap(final, init))
    margin = LONE_Z * spread
    fence = med - margin
    if (med - init > margin and final[k] < fence and others[0] >= fence
            and final[k] - init <= max_progress * (med - init)):
        return k, med, margin, init
    return None


def _start_levels(initial: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Per run, the return of an untrained policy: the higher of the run's own first points
    and the median first points of every run of its pool (env, and budget when budgets
    differ). All runs start untrained, but one whose policy collapses within its first log
    window has fallen by its first point, and so has every seed of such a config; the
    median holds while fewer than half of the pool did (a higher quantile would hold
    longer, but sits above a typical untrained run and would call random-level runs
    collapsed)."""
    out = initial.copy()
    for key in pd.unique(pool):
        sel = pool == key
        x = initial[sel & np.isfinite(initial)]
        if x.size:
            out[sel] = np.fmax(initial[sel], np.median(x))
    return out


def _collapsed(f: _Features, curve_ok: np.ndarray) -> np.ndarray:
    """Runs that ended clearly below an untrained policy's return (CartPole seeds that
    settle at 9.4, below a random policy's ~22), and are not still learning:
    ``start - final > max(4 se, COLLAPSE_MIN_DROP |start|)`` with ``start`` from
    :func:`_start_levels` and ``se`` from :func:`_curve_features`. No threshold per
    environment: the start is the sweep's own."""
    with np.errstate(invalid="ignore"):
        margin = np.maximum(4 * f.drop_se, COLLAPSE_MIN_DROP * np.abs(f.start))
        return curve_ok & ~f.learning & (f.start - f.final_level > margin)


def _reasons(runs: pd.DataFrame, cls: np.ndarray, candidate: np.ndarray, why: dict[int, str],
             f: _Features, ref_entropy: np.ndarray, ref_min: np.ndarray, ref_n: np.ndarray,
             curve_ok: np.ndarray, has_curves: bool, dec: int) -> list[str]:
    """One sentence per run saying why it got its label (a loop over runs, not points)."""
    status = runs["status"].astype(str).to_numpy()
    final = runs["final_return"].to_numpy(dtype=float)
    div_at = runs["diverged_at_step"] if "diverged_at_step" in runs else None
    out = []
    for i, c in enumerate(cls):
        if c == "pruned":
            s = "pruned by the sweep (stopped early); left out of every rate"
        elif c == "diverged":
            at = div_at.iloc[i] if div_at is not None else None
            reason = runs["diverged_reason"].iloc[i] if "diverged_reason" in runs else None
            if isinstance(reason, str) and reason:  # the trainer says what went non-finite
                s = f"diverged: {reason}"
            else:
                s = ("diverged (non-finite loss or parameters)"
                     + (f" at step {int(at)}" if at is not None and not pd.isna(at) else ""))
        elif c == "trapped":
            s = _trapped_reason(i, f, why, ref_entropy, ref_min, ref_n)
        elif c == "collapsed":
            s = (f"collapsed: ended at {fmt_number(f.final_level[i], dec)}, below the "
                 f"starting return {fmt_number(f.start[i], dec)} (an untrained policy's) by "
                 f"{fmt_number(f.start[i] - f.final_level[i], dec)}, more than 4 standard "
                 f"errors and {COLLAPSE_MIN_DROP:.0%} of the start")
        elif c == "learning":
            s = (f"still improving: +{fmt_number(f.rise[i], dec)} over the last "
                 f"{int(f.tail_span[i])} steps, more than 5% of its range (t = "
                 f"{f.trend_t[i]:.1f}, p = {f.trend_p[i]:.1g}; noise sd "
                 f"{fmt_number(f.noise[i], dec)}), and still rising at the end "
                 f"(+{fmt_number(f.end_rise[i], dec)} over its last {END_FRAC:.0%})")
            s += f"; now {why[i]}" if candidate[i] else ""
        else:
            s = _ok_reason(i, f, candidate, why, curve_ok, has_curves)
        if not np.isfinite(final[i]) and status[i] not in ("diverged", "pruned"):
            s += ("; no final return (no episode finished in its last 10% of steps): not "
                  f"diverged (status {status[i]}), left out of the statistics")
        out.append(s)
    return out


def _trapped_reason(i: int, f: _Features, why: dict[int, str], ref_entropy: np.ndarray,
                    ref_min: np.ndarray, ref_n: np.ndarray) -> str:
    s = f"{why[i]}; plateaued at step {int(f.plateau_step[i])}"
    e, r = f.entropy_at_plateau[i], ref_entropy[i]
    if np.isfinite(e) and np.isfinite(r):
        s += (f"; policy entropy there {e:.3g} vs {r:.3g} (median of {ref_n[i]} "
              f"successful runs at that step)")
        if e < ref_min[i]:
            s += ", below all of them: entropy collapse"
    elif np.isfinite(e):
        s += f"; policy entropy there {e:.3g} (no successful run to compare with)"
    return s


def _ok_reason(i: int, f: _Features, candidate: np.ndarray, why: dict[int, str],
               curve_ok: np.ndarray, has_curves: bool) -> str:
    if not has_curves or f.n_valid[i] == 0:
        return "no curve: whether it is trapped or still learning cannot be told"
    if candidate[i] and not curve_ok[i]:
        return f"{why[i]}, but too few curve points to tell whether it plateaued"
    if candidate[i]:
        return (f"{why[i]}, but it reached that level only at step {int(f.plateau_step[i])} "
                f"of {int(f.last_step[i])}: too late in the run to call it a trap")
    if f.tail_rises[i]:
        return ("rose over its last quarter but has stopped: its last points rose less than "
                f"half the tail's pace (+{fmt_number(f.end_rise[i], 1)}, p = "
                f"{f.end_p[i]:.1g}); converged, not still learning")
    return "plateaued, not in a trapped mode"


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
    notes: list[str] = field(default_factory=list)  # shown first: incomplete store, budgets
    #: Per config, Chan et al.'s reliability metrics
    #: (:func:`study.analysis.reliability.reliability`).
    reliability: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: Runs that lost most of their level mid-training
    #: (:func:`study.analysis.reliability.collapses`), by at least DROP_MIN_SHARE of their
    #: config's median improvement over the start.
    drops: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: Run ids trapped alone: outliers far below their config's other seeds, in no mode.
    lone_trapped: list[str] = field(default_factory=list)

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
            "n_trapped": k, "n_collapsed": int(c["collapsed"]),
            "n_diverged": int(c["diverged"]),
            "trapped_rate": k / n if n else np.nan, "trapped_lo": lo, "trapped_hi": hi,
            "modes": desc,
        })
    return pd.DataFrame(rows)


def _by_hyperparameter(per_run: pd.DataFrame, runs: pd.DataFrame,
                       hps: list[str]) -> pd.DataFrame:
    """Trapped rate per hyperparameter value vs the rest of the sweep: Fisher's exact test
    per value, Holm-adjusted over every value of every hyperparameter (``p_holm``)."""
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
            rows.append({
                "hyperparameter": h, "value": format_value(v), "n": n, "trapped": k,
                "rate": k / n if n else np.nan, "lo": lo, "hi": hi, "rest_n": rn,
                "rest_trapped": rk, "rest_rate": rk / rn if rn else np.nan, "rest_lo": rlo,
                "rest_hi": rhi, "p_value": p,
            })
    cols = ["hyperparameter", "value", "n", "trapped", "rate", "lo", "hi", "rest_n",
            "rest_trapped", "rest_rate", "rest_lo", "rest_hi", "p_value", "p_holm", "raises"]
    df = pd.DataFrame(rows, columns=cols[:-2])
    # One family: every value of every hyperparameter is a claim the report may make.
    df["p_holm"] = stats.holm(df["p_value"].to_numpy(float)) if len(df) else []
    df["raises"] = ((df["n"] > 0) & (df["rest_n"] > 0) & (df["rate"] > df["rest_rate"])
                    & (df["p_holm"] < ALPHA)).astype(bool)
    return df[cols]


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
    notes: Sequence[str] = (),
) -> FailureReport:
    """Classify every run (:func:`classify_runs`) and summarise the failures.

    ``per_config``: per config the counts per label and the trapped rate with a 95%
    Wilson interval (pruned runs left out), and its modes. ``by_hyperparameter``: per
    value of each differing hyperparameter, the trapped rate and interval of the runs with
    that value vs all other runs, with a two-sided Fisher exact p-value and its
    Holm-adjusted ``p_holm`` (:func:`study.analysis.stats.holm`, over every value of every
    hyperparameter: the family of claims the report makes); ``raises`` marks values with a
    higher rate at ``p_holm < ALPHA`` (family-wise error rate 5%). ``seeds_needed``: seeds
    per config for a one-sided Welch t-test (alpha 0.05, power 0.8) to separate the two
    best configs by IQM of final_return. ``notes`` go first in the Markdown (an
    incomplete store, mixed budgets); the store's budget notes are added here.
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
        notes=[*notes, *([b] if (b := budget_note(runs)) else [])],
        lone_trapped=list(an.lone),
        **_reliability(runs, curves),
    )


def _curve_matrix(curves: pd.DataFrame, run_ids: Sequence[str],
                  rows: Mapping[Any, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, episode_return[run, point])`` of ``run_ids``, NaN where a run has no
    point (it stopped early, or logged at other steps).

    The steps are those at which some of these runs has a finite return, sorted; a (run,
    step) logged twice keeps its first finite value (``pivot_table(aggfunc="first")``'s
    table, built with numpy). ``rows``: ``curves``' row positions per run id
    (``curves.groupby("run_id").indices``), to pass when called once per config."""
    if rows is None:
        rows = curves.groupby("run_id", sort=False).indices
    picked = [(i, rows[r]) for i, r in enumerate(run_ids) if r in rows]
    if picked:
        idx = np.concatenate([p for _, p in picked])
        which = np.concatenate([np.full(len(p), i) for i, p in picked])
    else:
        idx = which = np.zeros(0, dtype=np.int64)
    step = curves["step"].to_numpy()[idx]
    value = curves["episode_return"].to_numpy(dtype=float)[idx]
    keep = ~np.isnan(value)  # "first" skips NaN; steps without a value are no column
    which, step, value = which[keep], step[keep], value[keep]
    steps = np.unique(step)
    col = np.searchsorted(steps, step)
    _, first = np.unique(which * len(steps) + col, return_index=True)
    mat = np.full((len(run_ids), len(steps)), np.nan)
    mat[which[first], col[first]] = value[first]
    return steps.astype(float), mat


def _improvement(mat: np.ndarray, final: np.ndarray) -> float:
    """``|median final return - median starting return|`` of a config's runs (the start: a
    curve's first 5% of points, at least 3, as in :func:`_curve_features`); NaN if unknown."""
    starts = []
    for row in mat:
        y = row[np.isfinite(row)]
        if y.size:
            starts.append(float(y[: max(3, math.ceil(0.05 * y.size))].mean()))
    final = final[np.isfinite(final)]
    if not starts or not final.size:
        return np.nan
    return abs(float(np.median(final)) - float(np.median(starts)))


def _reliability(runs: pd.DataFrame, curves: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Chan et al.'s metrics per config and the mid-training drops of every run.

    A drop (:func:`study.analysis.reliability.collapses`, on the run's own scale) is listed only if
    its depth is at least DROP_MIN_SHARE of its config's median improvement over the start
    (:func:`_improvement`): a run stuck at a low level loses "half its range" to a wobble of
    a few hundredths, which is no collapse next to what its config learns.
    """
    from study.analysis import reliability as rel

    if curves is None or curves.empty or "episode_return" not in curves:
        return {}
    metrics, drops = [], []
    rows = curves.groupby("run_id", sort=False).indices  # once, not a scan per config
    for cid, group in runs[runs["status"] != "pruned"].groupby("config_id", sort=False):
        ids = group["run_id"].astype(str).tolist()
        steps, mat = _curve_matrix(curves, ids, rows)
        final = group["final_return"].to_numpy(float)
        metrics.append({"config_id": cid, "runs": len(ids), **rel.reliability(mat, final)})
        scale = _improvement(mat, final)
        min_depth = DROP_MIN_SHARE * scale if np.isfinite(scale) else 0.0
        for c in rel.collapses(steps, mat):
            if c.depth < min_depth:
                continue
            row = group.iloc[c.run]
            drops.append({"run_id": row["run_id"], "config_id": cid, "seed": int(row["seed"]),
                          "peak_step": c.peak_step, "peak": c.peak, "step": c.step,
                          "trough": c.trough, "depth": c.depth,
                          "points_below": c.points_below, "recovered": c.recovered})
    return {"reliability": pd.DataFrame(metrics), "drops": pd.DataFrame(drops)}


# --------------------------------------------------------------------------------------
# Markdown


def _pct(x: float) -> str:
    return "nan" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _rate(k: int, n: int, lo: float, hi: float) -> str:
    return f"{k}/{n} = {_pct(k / n if n else np.nan)} [{_pct(lo)}, {_pct(hi)}]"


#: How each label is decided, for the report (one line each).
DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("diverged", "the trainer stopped it on a non-finite loss or parameter (status "
                 "diverged); nothing else is called diverged"),
    ("trapped", "its final return lies in a concentrated mode that realises at most half of "
                "the best mode's improvement over the start (its config's seeds, the sweep's "
                "pooled returns, or a trapped level found in another config), or it is "
                "trapped alone: in a config of at least "
                f"{LONE_MIN_SEEDS} seeds, the only one below the other seeds' median by more "
                f"than {LONE_Z:g} robust spreads (1.4826 MAD, at least their curves' noise), "
                "realising at most half of their median improvement over the start; either "
                "way it has held that level for at least the last "
                f"{TRAP_MIN_HOLD:.0%} of its steps"),
    ("collapsed", "it ended clearly below the return of an untrained policy (its own first "
                  "points, or the median first points of every run of its env if higher): by "
                  "more than 4 standard errors and "
                  f"{COLLAPSE_MIN_DROP:.0%} of that start (and is not still learning)"),
    ("learning", "its last quarter rose significantly by more than 5% of its range, and it "
                 f"has not flattened: its last {END_FRAC:.0%} of points rose at least half "
                 "as fast (a run that reached a cap and held it is not learning)"),
    ("ok", "everything else"),
)


def _markdown(rep: FailureReport) -> str:
    title = f"# Failure analysis{': ' + rep.source if rep.source else ''}"
    lines = [title, ""]
    for n in rep.notes:  # each its own paragraph
        lines += [f"**{n}**" if n.startswith("incomplete") else n, ""]
    cnt = rep.counts
    parts = [f"{cnt[c]} {c}" for c in CLASSES
             if cnt[c] or c in ("ok", "trapped", "diverged")]
    n_cfg = rep.per_run["config_id"].nunique()
    lines.append(f"{len(rep.per_run)} runs in {n_cfg} {_configs(n_cfg)}: "
                 + ", ".join(parts) + f" ({', '.join(FAILED)} count as failed).")
    if not rep.has_curves:
        lines += ["", "The store has no curves, so no run can be shown to have plateaued, "
                  "collapsed or to be still learning; only diverged runs are identified."]
    lines += ["", "Labels, decided from the data without per-environment thresholds:", ""]
    lines += [f"- **{c}**: {d}." for c, d in DEFINITIONS]
    lines += ["- A run with status ok but no final return (no episode finished in its last "
              "10% of steps) is not diverged: it keeps its label from its curve and is left "
              "out of every statistic of the final return.", ""]
    lines += _md_modes(rep)
    lines += _md_runs(rep)
    lines += _md_rates(rep)
    lines += _md_drops(rep)
    lines += _md_reliability(rep)
    lines += _md_seeds_needed(rep)
    return "\n".join(lines).rstrip() + "\n"


def _md_drops(rep: FailureReport) -> list[str]:
    if rep.drops.empty:
        return []
    d, lab = rep.decimals, rep.labels
    rows = [[lab.get(str(r.config_id), str(r.config_id)), str(r.seed),
             f"{fmt_number(r.peak, d)} at {_thousands(r.peak_step)}",
             f"{_thousands(r.step)}", fmt_number(r.trough, d), fmt_number(r.depth, d),
             str(r.points_below), "yes" if r.recovered else "no"]
            for r in rep.drops.itertuples()]
    return ["## Runs that lost most of their level mid-training", "",
            "After its first 10% of log points (its start-up), a run drops when its return "
            "(a rolling median of 3 log points) falls below its peak minus half of the height "
            "the peak stands above the lowest point before it, for at least 3 log points, "
            "and by at least half of its whole range; and the fall is at least "
            f"{DROP_MIN_SHARE:.0%} of its config's median improvement over the start (the "
            "distance between the config's median final return and the median of its "
            "curves' first points), so a wobble of a run stuck low, large on its own small "
            "scale, is not listed. It may recover; a run that ends below an untrained policy "
            "is *collapsed* above instead.", "",
            *markdown_lines(["config", "seed", "peak (at step)", "fell at step", "lowest",
                             "depth", "log points below", "recovered"],
                            _capped(rep, rows, "drops")), ""]


def _md_reliability(rep: FailureReport) -> list[str]:
    if rep.reliability.empty:
        return []
    d, lab = rep.decimals, rep.labels
    rows = [[lab.get(str(r.config_id), str(r.config_id)), str(r.runs),
             *(fmt_number(getattr(r, k), d) for k in ("dt", "srt", "lrt", "dr", "rr"))]
            for r in rep.reliability.itertuples()]
    return ["## Reliability of training (Chan et al. 2020)", "",
            "Per config, from the training curves (first differences d between log points "
            "remove the learning trend; CVaR is the mean of the worst 5%): **DT** "
            "dispersion across time, the median over runs of the IQR of d; **SRT** "
            "short-term risk, the CVaR of d (the typical worst drop between log points); "
            "**LRT** long-term risk, minus the CVaR of the drawdowns below each run's best "
            "so far; **DR** dispersion across runs, the IQR of the final returns; **RR** "
            "risk across runs, the CVaR of the final returns (the worst runs). Lower "
            "dispersions and higher risks (closer to 0, or higher returns) are better.", "",
            *markdown_lines(["config", "runs", "DT", "SRT", "LRT", "DR", "RR"],
                            _capped(rep, rows, "configs")), ""]


def _capped(rep: FailureReport, rows: list[list[str]], what: str) -> list[list[str]]:
    if len(rows) > rep.max_rows:
        extra = len(rows) - rep.max_rows
        return rows[: rep.max_rows] + [[f"... {extra} more {what} (see --csv)"]
                                       + [""] * (len(rows[0]) - 1)]
    return rows


def _md_modes(rep: FailureReport) -> list[str]:
    d, lab = rep.decimals, rep.labels
    lines = ["## Modes of the final return", ""]
    multi = {c: m for c, m in rep.modes.items() if len(m) > 1}
    trapped_modes = {(t.config_id, t.mode.index) for t in rep.trapped_levels}
    if not rep.modes:
        lines.append("No config has enough seeds with a finite final return to look for "
                     "modes within it.")
    else:
        rows = [[lab.get(c, c), "; ".join(
            ("**" + m.describe(d) + " (trapped)**") if (c, m.index) in trapped_modes
            else m.describe(d) for m in ms)] for c, ms in sorted(multi.items())]
        if rows:
            lines += markdown_lines(["config", "modes (level +/- sd: seeds)"],
                                    _capped(rep, rows, "configs"))
            lines.append("")
        lines.append(_single_mode_sentence(rep, set(multi)))
    lines += _md_pooled(rep)
    if not rep.trapped_levels:
        lines += ["", "No trapped mode: no low mode is clearly below its config's best "
                  "(at most half of the best mode's improvement over the starting return)."]
    if rep.lone_trapped:
        pr = rep.per_run.set_index("run_id").loc[rep.lone_trapped]
        shown = [f"{lab.get(str(r.config_id), str(r.config_id))}, seed {r.seed} at "
                 f"{fmt_number(r.final_return, d)}" for r in pr.head(10).itertuples()]
        more = f"; and {len(pr) - 10} more" if len(pr) > 10 else ""
        k = len(pr)
        lines += ["", f"Trapped alone (a lone seed makes no mode): {k} "
                  f"{'run' if k == 1 else 'runs'} far below {'its' if k == 1 else 'their'} "
                  f"config's other seeds ({'; '.join(shown)}{more}); see the trapped runs."]
    return lines + [""]


def _single_mode_sentence(rep: FailureReport, multi: set[str]) -> str:
    """How many single-mode configs there are, and which of them still have failed runs: a
    config whose seeds are trapped at a level found elsewhere, or with a seed trapped
    alone, or all collapsed, has one mode, and must not be counted among the fine ones."""
    single = [c for c in rep.modes if c not in multi]
    if not single:
        return ""
    pr = rep.per_run[rep.per_run["config_id"].isin(single)]
    bad = pr[pr["classification"].isin(["trapped", "collapsed"])]
    counts = bad.groupby("config_id")["classification"].agg(
        lambda c: c.astype(str).value_counts().to_dict())
    other = "other " if multi else ""
    fine = len(single) - len(counts)
    text = f"{fine} {other}{_configs(fine)} {_have(fine)} a single mode"
    if counts.empty:
        return text + ("." if multi else
                       f" ({len(rep.modes)} {_configs(len(rep.modes))} checked).")
    shown = [f"{rep.labels.get(c, c)}: " + ", ".join(f"{n} {k}" for k, n in sorted(v.items()))
             for c, v in list(counts.items())[:10]]
    more = f"; and {len(counts) - 10} more" if len(counts) > 10 else ""
    return (f"{text} and no failed run; {len(counts)} {_have(len(counts))} a single mode but "
            f"failed runs, trapped at a level found elsewhere, trapped alone or collapsed "
            f"below their start ({'; '.join(shown)}{more}).")


def _configs(n: int) -> str:
    return "config" if n == 1 else "configs"


def _have(n: int) -> str:
    return "has" if n == 1 else "have"


def _md_pooled(rep: FailureReport) -> list[str]:
    d, lines = rep.decimals, []
    for e, ms in rep.sweep_modes.items():
        if len(ms) < 2:
            continue
        desc = "; ".join(m.describe(d, "runs") for m in ms)
        lines += ["", f"Pooled over the sweep{' (' + e + ')' if e else ''}: {desc}."]
        for t in rep.trapped_levels:
            if t.config_id or t.env != e:
                continue
            pr = rep.per_run
            held = int(((pr["classification"] == "trapped") & pr["config_id"].isin(t.configs)
                        & pr["final_return"].between(t.mode.lo, t.mode.hi)).sum())
            note = ("" if held == t.mode.count else
                    f" {held} of them held it (the trapped runs below); the others "
                    "were still learning or reached it late.")
            lines.append(f"Trapped level **{t.mode.describe(d, 'runs')}**: runs of "
                         f"{len(t.configs)} configs whose other seeds do better (so a "
                         f"trap, not a weak config).{note}")
    return lines


def _md_runs(rep: FailureReport) -> list[str]:
    d, lab, pr = rep.decimals, rep.labels, rep.per_run
    tr = pr[pr["classification"] == "trapped"]
    lines = ["## Trapped runs", ""]
    if tr.empty:
        lines.append("None.")
    else:
        rows = []
        for r in tr.itertuples(index=False):
            e, ref = r.entropy_at_plateau, r.reference_entropy
            rows.append([lab.get(r.config_id, r.config_id), str(r.seed),
                         fmt_number(r.final_return, d), str(int(r.plateau_step)),
                         f"{e:.3g}" if np.isfinite(e) else "-",
                         f"{ref:.3g}" if np.isfinite(ref) else "-"])
        lines += markdown_lines(["config", "seed", "final return", "plateau step",
                                 "entropy at plateau", "successful runs' entropy"],
                                _capped(rep, rows, "trapped runs"))
        collapse = tr["reason"].str.contains("entropy collapse").sum()
        with_ref = np.isfinite(tr["reference_entropy"]).sum()
        if with_ref:
            lines += ["", f"{collapse} of {with_ref} trapped runs with a comparison had a "
                      "lower policy entropy at their plateau than every successful run at "
                      "the same step (entropy collapse)."]
    lines.append("")
    for what, title in (("collapsed", "Collapsed below their start"),
                        ("learning", "Still learning at the end"), ("diverged", "Diverged")):
        sub = pr[pr["classification"] == what]
        if sub.empty:
            continue
        rows = [[lab.get(r.config_id, r.config_id), str(r.seed), r.reason]
                for r in sub.itertuples()]
        lines += [f"## {title}", "",
                  *markdown_lines(["config", "seed", "why"], _capped(rep, rows, "runs")), ""]
    return lines


def _md_rates(rep: FailureReport) -> list[str]:
    lines: list[str] = []
    pc = rep.per_config
    if not pc.empty:
        lines += ["## Trapped rate per config (95% Wilson interval)", ""]
        pc = pc.sort_values(["trapped_rate", "config_id"], ascending=[False, True])
        rows = [[rep.labels.get(r.config_id, r.config_id), str(r.n_runs), str(r.n_ok),
                 str(r.n_learning), _rate(r.n_trapped, r.n_runs, r.trapped_lo, r.trapped_hi),
                 str(r.n_collapsed), str(r.n_diverged)] for r in pc.itertuples()]
        lines += markdown_lines(["config", "runs", "ok", "learning", "trapped", "collapsed",
                                 "diverged"], _capped(rep, rows, "configs"))
        lines.append("")
    bh = rep.by_hyperparameter
    if rep.counts["trapped"] and not bh.empty:
        lines += ["## Hyperparameter values and the trapped rate", "",
                  f"Runs with each value vs all other runs; p from Fisher's exact test, "
                  f"Holm-adjusted over all {len(bh)} values compared (family-wise error "
                  f"rate {ALPHA:.0%}); **raises**: a higher rate at adjusted p < {ALPHA}.", ""]
        rows = [[r.hyperparameter, r.value, _rate(r.trapped, r.n, r.lo, r.hi),
                 _rate(r.rest_trapped, r.rest_n, r.rest_lo, r.rest_hi), f"{r.p_value:.2g}",
                 f"{r.p_holm:.2g}", "**raises**" if r.raises else ""]
                for r in bh.itertuples()]
        lines += markdown_lines(["hyperparameter", "value", "trapped", "rest of the sweep",
                                 "p", "p (Holm)", ""], rows)
        lines.append("")
    return lines


def _md_seeds_needed(rep: FailureReport) -> list[str]:
    d, lab = rep.decimals, rep.labels
    lines = ["## Seeds needed to separate the two best configs", ""]
    s = rep.seeds_needed
    if s is None:
        return lines + ["Needs two configs with at least 2 finite final returns each."]
    diff = f"{fmt_number(s.mean_a, d)} vs {fmt_number(s.mean_b, d)}"
    lines += [
        f"The two best configs by IQM of the final return: {lab.get(s.config_a, s.config_a)} "
        f"(mean {fmt_number(s.mean_a, d)}, sd {fmt_number(s.std_a, d)}, {s.n_a} seeds) and "
        f"{lab.get(s.config_b, s.config_b)} (mean {fmt_number(s.mean_b, d)}, sd "
        f"{fmt_number(s.std_b, d)}, {s.n_b} seeds).", ""]
    if s.seeds is None:
        return lines + [f"The means are equal ({diff}) or too close: no number of seeds "
                        "separates them with a Welch t-test."]
    enough = min(s.n_a, s.n_b) >= s.seeds
    return lines + [
        f"A one-sided Welch t-test (alpha {s.alpha}, power {s.power}) needs "
        f"**{s.seeds} seeds per config** to detect this difference (Colas et al. "
        f"2018); the store has {min(s.n_a, s.n_b)}" + (", enough." if enough else ", not enough.")]


# --------------------------------------------------------------------------------------
# CLI


def _load(path: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Runs and curves of a results store (StoreError, one line, if it is not one)."""
    from study import store

    runs = store.load_runs(path)
    curves = store.load_curves(path, allow_empty=True)
    return runs, (curves if len(curves) else None)


def plain(text: str, width: int = 79) -> str:
    """Docstring text for a terminal (``--help``): Sphinx roles and double backticks
    dropped (``:func:`study.analysis.stats.holm``` and ````code```` read as
    ``study.analysis.stats.holm`` and ``code``), so no raw markup shows, and paragraphs
    refilled to ``width`` (indented lines are kept as they are)."""
    import re
    import textwrap

    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")
    out = []
    for para in text.strip("\n").split("\n\n"):
        indented = any(line[:1].isspace() for line in para.splitlines())
        out.append(para if indented else textwrap.fill(" ".join(para.split()), width))
    return "\n\n".join(out)


def _epilog() -> str:
    import textwrap

    defs = "\n".join(textwrap.fill(d, 79, initial_indent=f"  {c:<11}",
                                   subsequent_indent=" " * 13) for c, d in DEFINITIONS)
    tail = textwrap.fill("Trapped rates by hyperparameter value are Holm-adjusted over every "
                         "value compared (family-wise error rate 5%).", 79)
    return f"labels ({', '.join(FAILED)} count as failed):\n{defs}\n\n{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.failures RESULTS_DIR [--csv FILE]``: print the Markdown report."""
    import argparse

    from study.cli_util import ArgumentParser, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = ArgumentParser(prog="python -m study.failures",
                            description=plain("Classify every run (ok, learning, trapped, "
                            "collapsed, diverged) and report modes, trapped rates and seeds "
                            "needed."), epilog=plain(_epilog()),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("results_dir", help="a results store written by a sweep")
        ap.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
        args = ap.parse_args(args_in)
        runs, curves = _load(args.results_dir)
        note = incomplete_note(args.results_dir)
        rep = failure_report(runs, curves, source=str(args.results_dir),
                             notes=[note] if note else [])
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
