"""Small, pure statistics for seed-variance studies, in the style of rliable.

Every function takes plain arrays (one value per seed, or seeds along an axis) and returns
plain numbers or arrays; none of them knows about runs, configs or stores. NaN means "no
value" (a diverged run, a window without a finished episode) and is skipped by every
statistic here, so callers never have to filter first.

References: Agarwal et al. 2021, "Deep RL at the Edge of the Statistical Precipice"
(rliable: IQM, stratified bootstrap, probability of improvement); Colas et al. 2018,
"How Many Random Seeds?" (Welch power analysis); Wilson 1927 (binomial interval); Holm
1979 (multiple tests).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "cvar",
    "holm",
    "key_seed",
    "iqm",
    "iqr",
    "median",
    "nanquantile_columns",
    "probability_of_improvement",
    "quantiles",
    "stratified_bootstrap",
    "stratified_bootstrap_ci",
    "welch_power",
    "welch_seeds_needed",
    "wilson_interval",
]

Statistic = Callable[..., Any]  # (values, axis) -> ndarray or float

# Bootstrap replicates are evaluated in chunks of at most this many array elements, so a
# large band (many seeds x many steps) never needs gigabytes at once.
_CHUNK_ELEMENTS = 4_000_000


def key_seed(seed: int, key: str) -> list[int]:
    """Entropy for ``numpy.random.default_rng`` from a base seed and a name (a config id).

    ``[seed, crc32(key)]``: a stable hash (unlike ``hash()``, which Python salts per process),
    so a config's bootstrap draws depend on its own id only, not on which other configs are
    in the table or in what order.
    """
    import zlib

    return [int(seed), zlib.crc32(str(key).encode("utf-8"))]


def _finite(x: ArrayLike) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[np.isfinite(a)]


def _scipy_stats() -> Any:  # the scipy.stats module
    """scipy.stats, imported on first use: the functions that need it are few, and a
    worker that only aggregates an objective (study.sweeps.search_space) saves SciPy's
    start-up, about a second per process."""
    from scipy import stats

    return stats


def iqm(x: ArrayLike, axis: int | None = None) -> np.ndarray | float:
    """Interquartile mean: the mean of the middle 50% of the values, NaN skipped.

    With the ``n`` non-NaN values sorted, ``k = floor(0.25 n)`` values are cut from each
    end and the remaining ``n - 2k`` are averaged; this is exactly
    ``scipy.stats.trim_mean(values, 0.25)`` (and rliable's IQM), computed along ``axis``
    with a different ``n`` per slice when slices hold different numbers of NaN.
    A slice with no values gives NaN.
    """
    a = np.asarray(x, dtype=float)
    if axis is None:
        a = a.ravel()
        axis = 0
    a = np.moveaxis(a, axis, -1)
    s = np.sort(a, axis=-1)  # NaN sorts last, so the values occupy the first n slots
    finite = np.isfinite(s)
    if finite.all():  # fast path (no NaN): one k for every slice, a plain slice mean
        k = s.shape[-1] // 4
        out = s[..., k : s.shape[-1] - k].mean(axis=-1) if s.shape[-1] else np.full(
            s.shape[:-1], np.nan)
        return float(out) if np.ndim(out) == 0 else out
    n = finite.sum(axis=-1, keepdims=True)
    k = n // 4  # floor(0.25 n), as trim_mean's int(0.25 * n)
    pos = np.arange(s.shape[-1])
    keep = (pos >= k) & (pos < n - k)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(keep, s, 0.0).sum(axis=-1) / keep.sum(axis=-1)
    return float(out) if out.ndim == 0 else out


def median(x: ArrayLike, axis: int | None = None) -> np.ndarray | float:
    """Median of the non-NaN values (``numpy.nanmedian``); NaN when there are none."""
    a = np.asarray(x, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices give NaN, quietly
        out = np.nanmedian(a, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def quantiles(
    x: ArrayLike, q: Sequence[float] = (0.25, 0.5, 0.75), axis: int | None = None
) -> np.ndarray:
    """Quantiles ``q`` of the non-NaN values, linear interpolation between order statistics.

    ``numpy.nanquantile`` with its default (Hyndman-Fan type 7) rule: the quantile ``p`` of
    ``n`` sorted values is ``v[h] + (h - floor h)(v[floor h + 1] - v[floor h])`` with
    ``h = (n - 1) p``. The result has the quantiles along the first axis.
    """
    a = np.asarray(x, dtype=float)
    if axis == 0 and a.ndim == 2 and a.shape[0]:
        return nanquantile_columns(a, q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(a, np.asarray(q, dtype=float), axis=axis)


def nanquantile_columns(x: ArrayLike, q: Sequence[float]) -> np.ndarray:
    """``numpy.nanquantile(x, q, axis=0)`` of a 2-D array, the same numbers, quietly (NaN
    for a column without values), without numpy's Python loop over the columns.

    ``nanquantile`` along an axis drops each column's NaNs and takes the quantiles of what
    is left, one column at a time (``apply_along_axis``: about 50 us a column, seconds for
    the curves of a large sweep). Here the columns are sorted once (NaN last) and the
    columns with the same number ``n`` of values are handed together to
    ``numpy.quantile(..., axis=0)`` on their first ``n`` rows, the same rule on the same
    values."""
    a = np.asarray(x, dtype=float)
    qs = np.asarray(q, dtype=float)
    if a.ndim != 2 or qs.ndim != 1:
        raise ValueError("nanquantile_columns needs a 2-D array and a 1-D list of quantiles")
    isnan = np.isnan(a)
    if not a.size:
        return np.full((qs.size, a.shape[1]), np.nan)
    if not isnan.any():
        return np.quantile(a, qs, axis=0)
    counts = a.shape[0] - isnan.sum(axis=0)
    ordered = np.sort(a, axis=0)  # NaN sorts last
    out = np.full((qs.size, a.shape[1]), np.nan)
    for n in np.unique(counts):
        if n:
            cols = counts == n
            out[:, cols] = np.quantile(ordered[:n, cols], qs, axis=0)
    return out


def iqr(x: ArrayLike) -> float:
    """Interquartile range ``Q3 - Q1`` of the non-NaN values (same rule as :func:`quantiles`)."""
    v = _finite(x)
    if v.size == 0:
        return float("nan")
    q25, q75 = quantiles(v, (0.25, 0.75))
    return float(q75 - q25)


def cvar(x: ArrayLike, q: float = 0.25) -> float:
    """Conditional value at risk: the mean of the worst ``q`` fraction of the values.

    Higher is better (returns), so "worst" means lowest: with the ``n`` non-NaN values sorted
    ascending, ``CVaR_q = mean(v[0 : max(1, ceil(q n))])``. NaN when there are no values.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    v = np.sort(_finite(x))
    if v.size == 0:
        return float("nan")
    k = max(1, math.ceil(q * v.size - 1e-12))  # tolerance: 0.1 * 30 must not become 4
    return float(v[:k].mean())


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    With ``p = k/n`` and ``z`` the two-sided normal quantile of ``confidence``::

        centre = (p + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    and the interval is ``[centre - half, centre + half]``. Unlike the normal ("Wald")
    interval it stays inside [0, 1] and is honest for ``k = 0`` or ``k = n`` with few seeds
    (0 of 5 failures gives [0, 0.43], not [0, 0]). ``n = 0`` gives (0, 1): nothing is known.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = float(_scipy_stats().norm.ppf(0.5 + confidence / 2.0))
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Exact ends at k = 0 and k = n (the formula gives them up to rounding).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def probability_of_improvement(x: ArrayLike, y: ArrayLike) -> float:
    """``P(X > Y) + 0.5 P(X = Y)`` for a random seed X of ``x`` and Y of ``y``.

    Estimated over all ``n m`` pairs, this is the Mann-Whitney statistic ``U_x / (n m)``
    (rliable's probability of improvement for one task). Computed from ranks of the pooled
    sample (ties get mid-ranks): ``U_x = R_x - n (n + 1) / 2`` with ``R_x`` the rank sum of
    ``x``, so it costs ``O((n + m) log(n + m))``, not ``O(n m)``. NaN values are dropped;
    NaN if either side is empty.
    """
    a, b = _finite(x), _finite(y)
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return float("nan")
    ranks = _scipy_stats().rankdata(np.concatenate([a, b]))
    u = ranks[:n].sum() - n * (n + 1) / 2.0
    return float(u / (n * m))


_NAMED: dict[str, Statistic] = {
    "iqm": iqm,
    "mean": lambda a, axis: np.nanmean(a, axis=axis),
    "median": median,
}


def _statistic(statistic: str | Statistic) -> Statistic:
    if callable(statistic):
        return statistic
    try:
        return _NAMED[statistic]
    except KeyError:
        raise ValueError(
            f"unknown statistic {statistic!r}; expected one of {sorted(_NAMED)} or a callable"
        ) from None


def _groups(groups: ArrayLike | Sequence[ArrayLike]) -> list[np.ndarray]:
    if isinstance(groups, np.ndarray):
        return [np.asarray(groups, dtype=float)]
    arrays = [np.asarray(g, dtype=float) for g in cast(Sequence[ArrayLike], groups)]
    if arrays and all(a.ndim == 0 for a in arrays):  # a flat list of numbers: one group
        return [np.asarray(arrays, dtype=float)]
    return arrays


def stratified_bootstrap(
    groups: ArrayLike | Sequence[ArrayLike],
    statistic: str | Statistic = "iqm",
    n_boot: int = 2000,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Bootstrap replicates of ``statistic`` with seeds resampled within each group.

    ``groups`` is one array, or a list of arrays (one per config or task), each with seeds
    along axis 0 (extra axes, e.g. curve steps, are carried along). Replicate ``b`` draws
    ``n_g`` seeds with replacement from every group ``g`` separately (stratified: every
    group keeps its size, as rliable does for tasks), concatenates them along axis 0, and
    evaluates ``statistic(sample, axis=0)``. ``statistic`` is "iqm", "mean", "median" or a
    callable taking ``(array, axis)``; it should skip NaN.

    All resampling indices come from ``numpy.random.default_rng(seed)`` up front, group by
    group, so the result depends only on the input and ``seed`` (not on chunking).
    Returns an array of shape ``(n_boot, *statistic_shape)``.
    """
    fn = _statistic(statistic)
    arrays = [a for a in _groups(groups) if a.shape[0] > 0]
    if not arrays:
        raise ValueError("stratified_bootstrap needs at least one non-empty group")
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.integers(0, a.shape[0], size=(n_boot, a.shape[0])) + off
         for a, off in zip(arrays, np.cumsum([0] + [a.shape[0] for a in arrays[:-1]]),
                           strict=True)],
        axis=1,
    )
    pooled = np.concatenate(arrays, axis=0)
    per_rep = max(1, int(np.prod(pooled.shape)))
    chunk = max(1, _CHUNK_ELEMENTS // per_rep)
    out = [np.asarray(fn(pooled[idx[i : i + chunk]], axis=1)) for i in range(0, n_boot, chunk)]
    return np.concatenate(out, axis=0)


def stratified_bootstrap_ci(
    groups: ArrayLike | Sequence[ArrayLike],
    statistic: str | Statistic = "iqm",
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int | Sequence[int] = 0,
) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """``(point, lo, hi)``: the statistic and its percentile bootstrap interval.

    ``point = statistic(all seeds pooled)``; ``lo`` and ``hi`` are the ``(1 - c)/2`` and
    ``(1 + c)/2`` quantiles (linear rule, NaN replicates skipped) of the replicates of
    :func:`stratified_bootstrap` with the same ``groups``, ``n_boot`` and ``seed``, so the
    same input always gives the same interval. Scalars for a scalar statistic, arrays (e.g.
    one per curve step) otherwise.
    """
    fn = _statistic(statistic)
    arrays = [a for a in _groups(groups) if a.shape[0] > 0]
    if not arrays:
        raise ValueError("stratified_bootstrap_ci needs at least one non-empty group")
    point = np.asarray(fn(np.concatenate(arrays, axis=0), axis=0))
    reps = stratified_bootstrap(arrays, fn, n_boot=n_boot, seed=seed)
    alpha = (1.0 - confidence) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step where every replicate is NaN
        # np.quantile is several times faster than nanquantile; same numbers without NaN
        if np.isfinite(reps).all():
            lo, hi = np.quantile(reps, [alpha, 1.0 - alpha], axis=0)
        elif reps.ndim == 2:  # one replicate per row, a value per step: vectorized
            lo, hi = nanquantile_columns(reps, [alpha, 1.0 - alpha])
        else:
            lo, hi = np.nanquantile(reps, [alpha, 1.0 - alpha], axis=0)
    if point.ndim == 0:
        return float(point), float(lo), float(hi)
    return point, lo, hi


def welch_power(
    effect: float,
    std_a: float,
    std_b: float,
    n: int,
    alpha: float = 0.05,
    alternative: Literal["one-sided", "two-sided"] = "one-sided",
) -> float:
    """Power of Welch's t-test with ``n`` seeds per config for a true difference ``effect``.

    With ``s2 = std_a^2 + std_b^2``, the test statistic under the alternative follows a
    noncentral t with noncentrality ``delta = |effect| / sqrt(s2 / n)`` and the
    Welch-Satterthwaite degrees of freedom for equal group sizes::

        nu = (n - 1) s2^2 / (std_a^4 + std_b^4)

    One-sided (Colas et al. 2018, "is A better than B"): ``power = 1 - F_nct(t_{1-alpha})``;
    two-sided: ``1 - F_nct(t_{1-alpha/2}) + F_nct(-t_{1-alpha/2})``, with ``t_p`` the
    central t quantile at ``nu`` degrees of freedom.
    """
    if n < 2:
        return 0.0
    s2 = std_a**2 + std_b**2
    effect = abs(effect)
    if s2 == 0.0:
        return 1.0 if effect > 0 else 0.0
    nu = (n - 1) * s2**2 / (std_a**4 + std_b**4)
    delta = effect / math.sqrt(s2 / n)
    st = _scipy_stats()
    if alternative == "one-sided":
        crit = st.t.ppf(1.0 - alpha, nu)
        return float(st.nct.sf(crit, nu, delta))
    if alternative == "two-sided":
        crit = st.t.ppf(1.0 - alpha / 2.0, nu)
        return float(st.nct.sf(crit, nu, delta) + st.nct.cdf(-crit, nu, delta))
    raise ValueError(f"alternative must be 'one-sided' or 'two-sided', got {alternative!r}")


def welch_seeds_needed(
    a: ArrayLike,
    b: ArrayLike,
    alpha: float = 0.05,
    power: float = 0.8,
    alternative: Literal["one-sided", "two-sided"] = "one-sided",
    max_n: int = 100_000,
) -> int | None:
    """Seeds per config for Welch's t-test to detect the observed difference (Colas et al.).

    Takes the observed difference of means ``|mean(a) - mean(b)|`` and sample standard
    deviations (``ddof = 1``) as the truth and returns the smallest ``n >= 2`` seeds per
    config with :func:`welch_power` ``>= power`` at level ``alpha``. Power grows with ``n``
    (larger noncentrality and degrees of freedom), so ``n`` is found by doubling then
    bisection, each step one noncentral-t evaluation. One-sided by default, as in Colas et
    al. 2018 (the question is "is the better-looking config really better").

    Returns None when no finite ``n`` exists (equal means) or it exceeds ``max_n``; 2 when
    both samples have zero spread but different means. NaN values are dropped; ValueError
    if a side has fewer than 2 values (no standard deviation).
    """
    xa, xb = _finite(a), _finite(b)
    if xa.size < 2 or xb.size < 2:
        raise ValueError("welch_seeds_needed needs at least 2 finite values on each side")
    effect = float(abs(xa.mean() - xb.mean()))
    sa, sb = float(xa.std(ddof=1)), float(xb.std(ddof=1))
    if effect == 0.0:
        return None

    def ok(n: int) -> bool:
        return welch_power(effect, sa, sb, n, alpha, alternative) >= power

    if ok(2):
        return 2
    lo, hi = 2, 4
    while not ok(hi):
        lo, hi = hi, hi * 2
        if lo >= max_n:
            return None
    while hi - lo > 1:  # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi if hi <= max_n else None


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input's order.

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``::

        p_adj_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))

    Rejecting where ``p_adj < alpha`` controls the family-wise error rate at ``alpha``
    under any dependence between the tests (unlike Benjamini-Hochberg, which needs
    independence or positive dependence; the values of one hyperparameter are compared
    with complementary rests, so theirs is neither). NaN stays NaN and does not count
    towards ``m``.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out
