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

A **collapse** (:func:`collapses`) is a run that, after its start-up, lost at least
``depth`` of the height it had climbed to its peak and stayed below that line for at least
``min_points`` log points; it may recover later (in the SwingUp seed study, 9 of 24 seeds
drop; seed 4 falls from 127 to 6 at 2.6M steps and climbs back).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from study.analysis.stats import cvar, iqr

__all__ = ["Collapse", "collapses", "reliability"]


def reliability(curves: np.ndarray, finals: np.ndarray, alpha: float = 0.05
                ) -> dict[str, float]:
    """The five metrics of the module docstring for one config (``dt``, ``srt``, ``lrt``,
    ``dr``, ``rr``); dispersions are >= 0, risks are scores (higher is safer), so the
    drawdown risk is reported as a negative number: minus the mean of the worst falls."""
    c = np.asarray(curves, dtype=float)
    d = np.diff(c, axis=1)
    per_run = [iqr(row) for row in d]
    peak = np.fmax.accumulate(np.where(np.isfinite(c), c, -np.inf), axis=1)
    drawdown = np.where(np.isfinite(c), peak - c, np.nan)
    return {
        "dt": float(np.nanmedian(per_run)) if np.isfinite(per_run).any() else float("nan"),
        "srt": cvar(d.ravel(), alpha),
        "lrt": cvar(-drawdown.ravel(), alpha),
        "dr": iqr(finals),
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
              min_points: int = 3, skip: float = 0.1, smooth: int = 3) -> list[Collapse]:
    """The first collapse of every run of ``curves[run, point]`` logged at ``steps``.

    A run's first ``skip`` of log points are its start-up (a policy's early fall, like
    SwingUp's race to the edge, is not a level yet). After them, with ``peak`` its running
    maximum and ``floor`` the lowest point between the start-up and that peak, the run
    collapses at the first point below ``peak - depth (peak - floor)`` from which it stays
    below that line for ``min_points`` points and falls by at least ``depth`` of its whole
    range after the start-up: it lost at least half of the height it had climbed, and the
    fall is large on the run's own scale (early wobbles are not collapses). Levels are read
    from a centred rolling median of ``smooth`` log points.
    """
    out = []
    # A centred rolling median of ``smooth`` points: one noisy log window is no fall.
    smoothed = _rolling_median(np.asarray(curves, dtype=float), smooth)
    for r, row in enumerate(smoothed):
        finite = np.flatnonzero(np.isfinite(row))
        k0 = max(1, int(skip * finite.size))
        if finite.size < k0 + min_points + 2:
            continue
        settled = row[finite[k0:]]
        scale = float(settled.max() - settled.min())  # the run's whole range after start-up
        best, best_t, lowest, floor = -np.inf, finite[k0], np.inf, np.inf
        for i in range(k0, finite.size):
            t = finite[i]
            if row[t] > best:
                best, best_t, floor = row[t], t, min(lowest, row[t])
            lowest = min(lowest, row[t])
            line = best - depth * (best - floor)
            if best > floor and row[t] < line:
                after = finite[i:]
                below = after[row[after] < line]
                back = after[row[after] >= line]
                n_below = int(np.sum(after < (back[0] if back.size else np.inf)))
                fall = best - row[below].min()
                if n_below >= min_points and fall >= depth * scale:
                    out.append(Collapse(
                        run=r, peak_step=float(steps[best_t]), peak=float(best),
                        step=float(steps[t]), trough=float(row[below].min()),
                        depth=float(best - row[below].min()), points_below=n_below,
                        recovered=bool(back.size)))
                    break
    return out


def _rolling_median(x: np.ndarray, width: int) -> np.ndarray:
    """Centred rolling median of each row of ``x`` (1-D: one row), the ends padded with
    the edge values; NaN where ``x`` is not finite. All rows at once: a row with a NaN
    gets ``nanmedian``'s windows, the others ``median``'s."""
    if width <= 1 or x.shape[-1] == 0:
        return x
    half = width // 2
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(x, pad, mode="edge"), width,
                                                       axis=-1)
    has_nan = np.isnan(x).any(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows give NaN, quietly
        if x.ndim == 1:
            out = np.nanmedian(windows, axis=-1) if has_nan else np.median(windows, axis=-1)
        else:
            out = np.empty(x.shape)
            if has_nan.any():
                out[has_nan] = np.nanmedian(windows[has_nan], axis=-1)
            if not has_nan.all():
                out[~has_nan] = np.median(windows[~has_nan], axis=-1)
    return np.where(np.isfinite(x), out, np.nan)
