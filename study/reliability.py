"""How reliable training is (Chan et al. 2020, "Measuring the Reliability of Reinforcement
Learning Algorithms"), and the runs that collapsed on the way.

Pure functions over one data shape: a config's learning curves ``curves[run, point]``
(NaN where a run has no value) and its final scores ``finals[run]``. With
``d[r, t] = curves[r, t + 1] - curves[r, t]`` (the first differences, which remove the
learning trend) and ``CVaR_a(x)`` the mean of the worst ``ceil(a n)`` values of x:

* dispersion across time (DT) = median over runs of ``IQR_t d[r, t]``: how much a run's
  score jumps around from one log point to the next;
* short-term risk across time (SRT) = ``CVaR_a`` of all ``d``: the typical worst drop
  between two log points;
* long-term risk across time (LRT) = ``CVaR_a`` of the drawdowns ``max_{s<=t} curves[r, s]
  - curves[r, t]`` (taken as losses: the largest ones), how far runs fall below their best;
* dispersion across runs (DR) = ``IQR_r finals[r]``;
* risk across runs (RR) = ``CVaR_a`` of ``finals``: the mean of the worst runs.

Chan et al. compute DT on detrended, low-pass-filtered evaluation curves and report ranks
across algorithms; here the curves are the stored training curves and the values are
reported as they are, per config, with a = 0.05 by default.

A **collapse** (:func:`collapses`) is a run that, after reaching a level, lost at least
``depth`` of the ground it had gained since its first log point and stayed below that
line for at least ``min_points`` log points; it may recover later. One SwingUp seed, for
instance, falls from about 300 to 10 near 5.5M steps and recovers at 7M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Collapse", "collapses", "cvar", "reliability"]


def cvar(x: np.ndarray, alpha: float = 0.05) -> float:
    """Mean of the lowest ``ceil(alpha n)`` finite values (NaN if there are none)."""
    v = np.sort(np.asarray(x, dtype=float)[np.isfinite(x)])
    if v.size == 0:
        return float("nan")
    return float(v[: max(1, math.ceil(alpha * v.size))].mean())


def _iqr(x: np.ndarray) -> float:
    v = np.asarray(x, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    q75, q25 = np.percentile(v, [75, 25])
    return float(q75 - q25)


def reliability(curves: np.ndarray, finals: np.ndarray, alpha: float = 0.05
                ) -> dict[str, float]:
    """The five metrics of the module docstring for one config (``dt``, ``srt``, ``lrt``,
    ``dr``, ``rr``); dispersions are >= 0, risks are scores (higher is safer), so the
    drawdown risk is reported as a negative number: minus the mean of the worst falls."""
    c = np.asarray(curves, dtype=float)
    d = np.diff(c, axis=1)
    per_run = [_iqr(row) for row in d]
    peak = np.fmax.accumulate(np.where(np.isfinite(c), c, -np.inf), axis=1)
    drawdown = np.where(np.isfinite(c), peak - c, np.nan)
    return {
        "dt": float(np.nanmedian(per_run)) if np.isfinite(per_run).any() else float("nan"),
        "srt": cvar(d.ravel(), alpha),
        "lrt": cvar(-drawdown.ravel(), alpha),
        "dr": _iqr(finals),
        "rr": cvar(finals, alpha),
    }


@dataclass(frozen=True)
class Collapse:
    """One collapse of a run: where it began (the log point after the peak at which it
    fell below the line), how deep it went and for how many log points it stayed below
    (``recovered``: whether it came back above the line before the end)."""

    run: int
    peak_step: float
    peak: float
    step: float
    trough: float
    depth: float
    points_below: int
    recovered: bool


def collapses(steps: np.ndarray, curves: np.ndarray, depth: float = 0.5,
              min_points: int = 2) -> list[Collapse]:
    """The first collapse of every run of ``curves[run, point]`` logged at ``steps``.

    With ``start`` a run's first finite value and ``peak`` its running maximum, the run
    collapses at the first point t where ``curve[t] < peak - depth (peak - start)``, when
    ``peak > start`` and the run stays below that line for ``min_points`` points.
    """
    out = []
    for r, row in enumerate(np.asarray(curves, dtype=float)):
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size < min_points + 2:
            continue
        start, best, best_t = row[finite[0]], -np.inf, finite[0]
        for i, t in enumerate(finite):
            if row[t] > best:
                best, best_t = row[t], t
            line = best - depth * (best - start)
            if best > start and row[t] < line:
                after = finite[i:]
                below = after[row[after] < line]
                back = after[row[after] >= line]
                n_below = int(np.sum(after < (back[0] if back.size else np.inf)))
                if n_below >= min_points:
                    out.append(Collapse(
                        run=r, peak_step=float(steps[best_t]), peak=float(best),
                        step=float(steps[t]), trough=float(row[below].min()),
                        depth=float(best - row[below].min()), points_below=n_below,
                        recovered=bool(back.size)))
                    break
    return out
