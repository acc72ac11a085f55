"""Paper figures of a sweep: pure functions from DataFrames to matplotlib Figures.

Every function here takes plain DataFrames (and small mappings), builds a new
:class:`matplotlib.figure.Figure` without pyplot (no global figure registry to leak, no GUI
backend: rendering goes through Agg), and returns it; nothing is read from or written to
disk except by :func:`save_figure`. ``study.report.build`` decides what to plot and where it goes.

Conventions, so that every figure can go into a paper as is:

* sizes for a two-column paper: :data:`COLUMN_WIDTH` (3.5 in) for single-panel figures,
  :data:`TEXT_WIDTH` (7 in) for panels side by side; every font is 8 pt (:data:`STYLE`);
* the Okabe-Ito palette (:data:`OKABE_ITO`), distinguishable with the common colour-vision
  deficiencies, plus line styles that vary with colour so curves survive greyscale print;
* axes say what and in which unit ("environment steps"), legends name the hyperparameters
  that differ between the configs shown ("policy_lr=0.01, gamma=0.99");
* no titles (captions belong to the document), no top/right spines, no grid.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

# Headless: whoever imports pyplot after this module (study.report closes figures with it)
# must never get a GUI backend (none of the imports above loads pyplot, so this still
# takes effect).
matplotlib.use("Agg")

__all__ = [
    "CLASS_COLORS",
    "COLUMN_WIDTH",
    "METRIC_LABELS",
    "OKABE_ITO",
    "STYLE",
    "TEXT_WIDTH",
    "filmstrip_figure",
    "filmstrip_size",
    "final_distribution_figure",
    "learning_curves_figure",
    "optuna_figures",
    "save_figure",
    "seed_curves_figure",
    "sensitivity_figure",
    "small_multiples_figure",
    "steps_formatter",
]

#: Okabe & Ito (2008), "Color Universal Design": blue, orange, bluish green, vermillion,
#: reddish purple, sky blue, black. Yellow (#F0E442) is left out: unreadable as a thin line
#: on white.
OKABE_ITO: tuple[str, ...] = (
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000",
)
#: Paired with the colours so that the 8th curve differs from the 1st by dash, not only hue.
LINESTYLES: tuple[Any, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))

#: Colours of the failure classes (study.analysis.failures.CLASSES). Trapped runs get the one warm,
#: saturated colour, so they are what the eye finds first.
CLASS_COLORS: dict[str, str] = {
    "ok": "#56B4E9",
    "learning": "#009E73",
    "trapped": "#D55E00",
    "collapsed": "#CC79A7",
    "diverged": "#000000",
    "pruned": "#999999",
}
CLASS_ORDER: tuple[str, ...] = ("ok", "learning", "trapped", "collapsed", "diverged", "pruned")

COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper
TEXT_WIDTH = 7.0  # inches: the full text width

#: Axis labels of the metrics a report can rank by.
METRIC_LABELS: dict[str, str] = {
    "episode_return": "episode return",
    "eval_return": "evaluation return",
    "final_return": "final return",
    "final_eval_return": "final evaluation return",
    "auc": "mean episode return over training",
    "entropy": "policy entropy (nats)",
}

FONT_SIZE = 8
#: Applied while a figure is built (text sizes are fixed when the artists are created).
STYLE: Any = {  # (Any: matplotlib types rcParams keys as a closed set of literals)
    "font.size": FONT_SIZE,
    "axes.labelsize": FONT_SIZE,
    "axes.titlesize": FONT_SIZE,
    "xtick.labelsize": FONT_SIZE,
    "ytick.labelsize": FONT_SIZE,
    "legend.fontsize": FONT_SIZE,
    "figure.titlesize": FONT_SIZE,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),  # type: ignore[attr-defined]
    "legend.frameon": False,
    "legend.handlelength": 2.2,
    "lines.linewidth": 1.2,
    # Text stays text in SVG (small files, editable in the paper's tools).
    "svg.fonttype": "none",
    "svg.hashsalt": "study",  # stable ids: the same store gives byte-identical SVGs
    "figure.dpi": 100,
}
PNG_DPI = 200

F = TypeVar("F", bound=Callable[..., Figure])


def _styled(fn: F) -> F:
    """Build the figure under :data:`STYLE` without touching the caller's rcParams."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _new_figure(width: float, height: float) -> Figure:
    # Constrained layout keeps labels and outside legends inside the canvas without the
    # second draw that bbox_inches="tight" costs at save time.
    return Figure(figsize=(width, height), layout="constrained")


def _fmt_steps(x: float, _pos: int | None = None) -> str:
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:g}M"
    if a >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


#: Tick labels for environment steps: 0, 250k, 1.5M (shorter than 1.5e6 with an offset).
steps_formatter = FuncFormatter(_fmt_steps)


def _wrap(label: str, width: int) -> str:
    """Wrap a "k=v, k=v" label at the commas, so no hyperparameter is split in two."""
    return "\n".join(textwrap.wrap(label, width=width, break_long_words=False,
                                   break_on_hyphens=False)) or label


def _style_for(i: int) -> dict[str, Any]:
    return {"color": OKABE_ITO[i % len(OKABE_ITO)],
            "linestyle": LINESTYLES[(i // len(OKABE_ITO) + i) % len(LINESTYLES)]}


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


# --------------------------------------------------------------------------------------
# learning curves


def _agg_metrics(agg: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    have = list(pd.unique(agg["metric"])) if "metric" in agg else ["episode_return"]
    if metrics is None:
        return [m for m in ("episode_return", "eval_return") if m in have] or have
    return [m for m in metrics if m in have]


def _agg_rows(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    return agg[agg["metric"] == metric] if "metric" in agg else agg


@_styled
def learning_curves_figure(
    agg: pd.DataFrame,
    config_ids: Sequence[str],
    labels: Mapping[str, str],
    *,
    metrics: Sequence[str] | None = None,
    center: str = "median",
    width: float = COLUMN_WIDTH,
) -> Figure:
    """Median (line) and inter-quartile band over seeds against environment steps.

    ``agg`` is :func:`study.analysis.curves.learning_curves` or ``aggregate_curves`` output
    (``metric, config_id, step, median, q25, q75, iqm, iqm_lo, iqm_hi``; a frame without
    ``metric`` is one metric). One panel per metric (episode return, then evaluation return
    when present), configs in ``config_ids`` order with a shared legend below naming each
    config by ``labels``. ``center="iqm"`` draws the IQM and its bootstrap band instead.
    """
    if center not in ("median", "iqm"):
        raise ValueError(f"center must be 'median' or 'iqm', got {center!r}")
    mid, lo, hi = (("median", "q25", "q75") if center == "median"
                   else ("iqm", "iqm_lo", "iqm_hi"))
    what = "median, IQR over seeds" if center == "median" else "IQM, 95% bootstrap CI"
    metrics = _agg_metrics(agg, metrics)
    n = max(1, len(metrics))
    fig = _new_figure(width, 1.9 * n + 0.35 * len(config_ids) + 0.3)
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    handles = []
    for ax, metric in zip(axes, metrics, strict=False):
        sub = _agg_rows(agg, metric)
        by_cfg = dict(tuple(sub.groupby("config_id", sort=False)))
        for i, cid in enumerate(config_ids):
            g = by_cfg.get(cid)
            if g is None or g.empty:
                continue
            st = _style_for(i)
            x = g["step"].to_numpy(float)
            (line,) = ax.plot(x, g[mid].to_numpy(float), lw=1.2, **st,
                              label=_wrap(labels.get(cid, cid), 55))
            ax.fill_between(x, g[lo].to_numpy(float), g[hi].to_numpy(float),
                            color=st["color"], alpha=0.18, lw=0)
            if ax is axes[0]:
                handles.append(line)
        ax.set_ylabel(f"{_metric_label(metric)}\n({what})")
    axes[-1].set_xlabel("environment steps")
    axes[-1].xaxis.set_major_formatter(steps_formatter)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=1)
    return fig


@_styled
def small_multiples_figure(
    agg: pd.DataFrame,
    config_ids: Sequence[str],
    labels: Mapping[str, str],
    *,
    metric: str = "episode_return",
    max_panels: int = 24,
    ncols: int = 4,
    total_configs: int | None = None,
) -> Figure:
    """One small panel per config (median and IQR band), shared axes, at most ``max_panels``.

    Panels follow ``config_ids`` (best first), so a capped grid keeps the configs worth
    looking at; the best config's median is repeated in grey in every panel as a common
    reference. ``total_configs`` (for the note under the grid) defaults to
    ``len(config_ids)``.
    """
    shown = list(config_ids)[:max_panels]
    total = len(config_ids) if total_configs is None else total_configs
    ncols = max(1, min(ncols, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    width = TEXT_WIDTH if ncols > 2 else COLUMN_WIDTH
    # A fixed grid instead of constrained layout: with dozens of panels the layout solver
    # (which measures every tick label) would cost more than drawing the curves.
    axes_h, bottom, left, top = 1.0, 0.62, 0.62, 0.02
    # Titles wrap to the panel's width (about 0.6 em per character at 8 pt), and the
    # title band is as tall as the longest one: three hyperparameters and a budget fit.
    panel_w = (width - left - 0.08) / ncols - 0.15
    chars = max(14, int(panel_w * 72 / (0.6 * FONT_SIZE)))
    titles = [_wrap(labels.get(c, c), chars) for c in shown]
    n_lines = max((t.count("\n") + 1 for t in titles), default=1)
    title_h = 0.08 + 0.14 * max(2, n_lines)
    height = nrows * (axes_h + title_h) + bottom + top
    fig = Figure(figsize=(width, height))
    gs = fig.add_gridspec(nrows, ncols, left=left / width, right=1 - 0.08 / width,
                          bottom=bottom / height, top=1 - (top + title_h) / height,
                          hspace=title_h / axes_h,
                          wspace=0.15 / ((width - left) / ncols - 0.15))
    axes = gs.subplots(sharex=True, sharey=True, squeeze=False)
    sub = _agg_rows(agg, metric)
    by_cfg = dict(tuple(sub.groupby("config_id", sort=False)))
    ref = by_cfg.get(shown[0]) if shown else None
    for k, ax in enumerate(axes.ravel()):
        if k >= len(shown):
            ax.set_axis_off()
            continue
        cid = shown[k]
        g = by_cfg.get(cid)
        if ref is not None and k > 0:
            ax.plot(ref["step"].to_numpy(float), ref["median"].to_numpy(float),
                    color="#999999", lw=0.8)
        if g is not None and not g.empty:
            x = g["step"].to_numpy(float)
            ax.plot(x, g["median"].to_numpy(float), color=OKABE_ITO[0], lw=1.0)
            ax.fill_between(x, g["q25"].to_numpy(float), g["q75"].to_numpy(float),
                            color=OKABE_ITO[0], alpha=0.25, lw=0)
        ax.set_title(titles[k], loc="left", pad=2)
        ax.xaxis.set_major_formatter(steps_formatter)
        ax.xaxis.set_major_locator(MaxNLocator(3))
    for ax in axes[-1, :]:
        ax.set_xlabel("environment steps")
    for ax in axes[:, 0]:
        ax.set_ylabel(_metric_label(metric))
    note = "median and IQR over seeds; grey: the best config"
    if total > len(shown):
        note += f"; best {len(shown)} of {total} configs shown"
    fig.text(0.5, 0.05 / height, note, ha="center", va="bottom", color="#555555")
    return fig


# --------------------------------------------------------------------------------------
# per-seed curves


def _segments(curves: pd.DataFrame, run_ids: Sequence[str], column: str) -> list[np.ndarray]:
    """``[n_points, 2]`` (step, value) arrays, one per run in ``run_ids`` order.

    NaN values stay in: LineCollection leaves a gap there, as a windowless log point
    should (joining across it would draw a return nobody observed).
    """
    sub = curves[curves["run_id"].isin(run_ids)]
    order = pd.Index(run_ids).get_indexer(sub["run_id"])
    idx = np.lexsort((sub["step"].to_numpy(float), order))
    rows = order[idx]
    xy = np.column_stack([sub["step"].to_numpy(float)[idx],
                          sub[column].to_numpy(float)[idx] if column in sub
                          else np.full(idx.size, np.nan)])
    cuts = np.searchsorted(rows, np.arange(1, len(run_ids)))
    return np.split(xy, cuts)


@_styled
def seed_curves_figure(
    curves: pd.DataFrame,
    classes: pd.DataFrame,
    label: str,
    *,
    metric: str = "episode_return",
    show_entropy: bool = True,
) -> Figure:
    """Every seed of one config, coloured by its failure class (trapped runs stand out).

    ``classes`` has one row per run of the config: ``run_id, classification`` and
    optionally ``plateau_step`` (marked on trapped runs). Runs are drawn as one
    LineCollection per class (one draw call, whatever the number of seeds), with a second
    panel of policy entropy when ``curves`` has any, because a trapped run's story is
    usually told there (entropy collapsed at its plateau). ``label`` names the config.
    """
    cls = classes.assign(classification=classes["classification"].astype(str))
    has_ent = (show_entropy and "entropy" in curves
               and np.isfinite(curves.loc[curves["run_id"].isin(cls["run_id"]),
                                          "entropy"].to_numpy(float)).any())
    columns = [metric] + (["entropy"] if has_ent else [])
    fig = _new_figure(COLUMN_WIDTH, 2.0 * len(columns) + 0.75)
    axes = fig.subplots(len(columns), 1, sharex=True, squeeze=False)[:, 0]
    run_ids = cls["run_id"].astype(str).tolist()
    handles: list[Any] = []
    for ax, column in zip(axes, columns, strict=True):
        segs = _segments(curves, run_ids, column)
        for c in CLASS_ORDER:
            mask = (cls["classification"] == c).to_numpy()
            if not mask.any():
                continue
            emphasis = c in ("trapped", "collapsed", "diverged")
            lc = LineCollection(
                [s for s, m in zip(segs, mask, strict=True) if m],
                colors=CLASS_COLORS[c], linewidths=1.1 if emphasis else 0.8,
                linestyles="--" if c == "diverged" else "-",
                alpha=1.0 if emphasis else 0.7, zorder=3 if emphasis else 2,
            )
            ax.add_collection(lc)
            if ax is axes[0]:
                handles.append(Line2D([], [], color=CLASS_COLORS[c],
                                      ls="--" if c == "diverged" else "-",
                                      label=f"{c} ({int(mask.sum())})"))
        ax.autoscale_view()
        ax.set_ylabel(_metric_label(column))
    # Plateau points of trapped runs: where the run stopped improving.
    if "plateau_step" in cls:
        tr = cls[(cls["classification"] == "trapped") & cls["plateau_step"].notna()]
        if len(tr):
            segs = _segments(curves, tr["run_id"].astype(str).tolist(), metric)
            px = tr["plateau_step"].to_numpy(float)
            py = np.array([_interp_finite(x, s) for x, s in zip(px, segs, strict=True)])
            axes[0].scatter(px, py, s=16, marker="o", facecolor="white",
                            edgecolor="#000000", lw=0.9, zorder=4)
            handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="#000000",
                                  label="plateau start"))
    axes[-1].set_xlabel("environment steps")
    axes[-1].xaxis.set_major_formatter(steps_formatter)
    fig.legend(handles=handles, loc="outside lower center", ncols=3,
               title=_wrap(label, 55), title_fontsize=FONT_SIZE)
    return fig


# --------------------------------------------------------------------------------------
# final-return distributions


def _interp_finite(x: float, seg: np.ndarray) -> float:
    """The curve ``seg`` at step ``x``, read across NaN windows (a marker needs a place)."""
    ok = np.isfinite(seg[:, 1])
    return float(np.interp(x, seg[ok, 0], seg[ok, 1])) if ok.any() else np.nan


class ModeLike(Protocol):
    """What the distribution figure needs of a mode (``study.analysis.failures.Mode`` has it)."""

    @property
    def index(self) -> int: ...
    @property
    def level(self) -> float: ...
    @property
    def lo(self) -> float: ...
    @property
    def hi(self) -> float: ...


def _boxplot(ax: Any, data: list[np.ndarray], positions: np.ndarray, **kw: Any) -> Any:
    # ``orientation`` replaced ``vert`` in matplotlib 3.10; support both.
    try:
        return ax.boxplot(data, positions=positions, orientation="horizontal", **kw)
    except TypeError:
        return ax.boxplot(data, positions=positions, vert=False, **kw)


@_styled
def final_distribution_figure(
    values: pd.DataFrame,
    config_ids: Sequence[str],
    labels: Mapping[str, str],
    *,
    modes: Mapping[str, Sequence[ModeLike]] | None = None,
    trapped_modes: Iterable[tuple[str, int]] = (),
    metric: str = "final_return",
    seed: int = 0,
) -> Figure:
    """Box plot plus every seed (jittered points) per config, with the detected modes.

    ``values``: one row per run with ``config_id, value`` and optionally
    ``classification`` (point colour). Configs are rows, in ``config_ids`` order from the
    top (best first), named by ``labels`` on the axis: horizontal boxes keep long
    hyperparameter labels readable. ``modes`` (config -> modes, lowest first) are marked
    for configs with more than one mode: a band over each mode's range with a tick at its
    level, vermillion for the modes in ``trapped_modes`` (``(config_id, mode.index)``).
    Runs without a finite value (diverged) are counted in the row label. Jitter is seeded.
    """
    trapped = set(trapped_modes)
    cids = list(config_ids)
    n = len(cids)
    pos = {c: float(n - 1 - i) for i, c in enumerate(cids)}  # best at the top
    v = values[values["config_id"].isin(cids)]
    val = v["value"].to_numpy(float)
    finite = np.isfinite(val)
    ylabels = _distribution_labels(v, cids, labels, finite)
    longest = max((len(s) for s in ylabels), default=0)
    width = TEXT_WIDTH if longest > 28 else COLUMN_WIDTH
    fig = _new_figure(width, 0.27 * n + 1.1)
    ax = fig.subplots()

    # Mode bands first, so boxes and points are drawn over them.
    bands = _mode_bands(ax, cids, pos, modes or {}, trapped)
    codes = pd.Categorical(v["config_id"], categories=cids).codes
    data = [val[(codes == i) & finite] for i in range(n)]
    _boxplot(ax, data, positions=np.array([pos[c] for c in cids]), widths=0.55,
             showfliers=False, whis=1.5, manage_ticks=False, patch_artist=False,
             medianprops={"color": "#000000", "lw": 1.2},
             boxprops={"color": "#444444", "lw": 0.8},
             whiskerprops={"color": "#444444", "lw": 0.8},
             capprops={"color": "#444444", "lw": 0.8})

    rng = np.random.default_rng(seed)
    y = np.array([pos[c] for c in cids])[codes] + rng.uniform(-0.2, 0.2, size=len(v))
    klass = (v["classification"].astype(str).to_numpy() if "classification" in v
             else np.full(len(v), "ok"))
    colors = np.array([CLASS_COLORS.get(k, "#0072B2") for k in klass], dtype=object)
    ax.scatter(val[finite], y[finite], s=7, c=list(colors[finite]), lw=0, alpha=0.85,
               zorder=3)

    ax.margins(x=0.03)
    ax.autoscale_view()
    ax.set_yticks(np.arange(n), ylabels[::-1])  # position 0 is the bottom row
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel(_metric_label(metric))
    ax.spines["left"].set_visible(False)
    ax.tick_params(axis="y", length=0)
    _distribution_legend(fig, set(klass[finite]), bands, bool(trapped))
    return fig


def _distribution_labels(v: pd.DataFrame, cids: Sequence[str], labels: Mapping[str, str],
                         finite: np.ndarray) -> list[str]:
    """Each config's row label, with its count of runs without a finite value."""
    out = []
    for c in cids:
        bad = int((~finite[(v["config_id"] == c).to_numpy()]).sum())
        out.append(labels.get(c, c) + (f" ({bad} non-finite)" if bad else ""))
    return out


def _mode_bands(ax: Any, cids: Sequence[str], pos: Mapping[str, float],
                modes: Mapping[str, Sequence[ModeLike]], trapped: set[tuple[str, int]]
                ) -> bool:
    """A band over each mode's range with a tick at its level, for the configs of more
    than one mode (vermillion when trapped); whether any was drawn."""
    band_y, band_lo, band_w, band_c, lev_x, lev_y, lev_c = [], [], [], [], [], [], []
    for c in cids:
        ms = list(modes.get(c, ()))
        if len(ms) < 2:
            continue
        for m in ms:
            col = CLASS_COLORS["trapped"] if (c, m.index) in trapped else "#777777"
            band_y.append(pos[c])
            band_lo.append(m.lo)
            band_w.append(max(m.hi - m.lo, 0.0))
            band_c.append(col)
            lev_x.append(m.level)
            lev_y.append(pos[c])
            lev_c.append(col)
    if band_y:
        ax.barh(band_y, band_w, left=band_lo, height=0.82, color=band_c, alpha=0.15, lw=0,
                zorder=1)
        ly = np.asarray(lev_y)
        ax.vlines(lev_x, ly - 0.41, ly + 0.41, colors=lev_c, lw=1.2, zorder=1.5)
    return bool(band_y)


def _distribution_legend(fig: Figure, classes: set[str], bands: bool, trapped: bool) -> None:
    """The legend below the plot: the run classes shown, and the mode bands if any."""
    present = [k for k in CLASS_ORDER if k in classes]
    handles: list[Any] = [Line2D([], [], ls="", marker="o", ms=4, mfc=CLASS_COLORS[k],
                                 mec="none", label=f"{k} run") for k in present]
    if bands:
        handles.append(Patch(color="#777777", alpha=0.3, lw=0, label="mode (range, level)"))
        if trapped:
            handles.append(Patch(color=CLASS_COLORS["trapped"], alpha=0.3, lw=0,
                                 label="trapped mode"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)))


# --------------------------------------------------------------------------------------
# hyperparameter sensitivity


def _is_numeric(s: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
        return False
    a = s.to_numpy(float)
    return bool(np.isfinite(a).all())  # inf (max_grad_norm = inf) cannot sit on an axis


def _log_axis(name: str, x: np.ndarray) -> bool:
    """Learning rates always; other positive values spanning two decades or more."""
    if x.size == 0 or (x <= 0).any():
        return False
    return name.endswith("_lr") or "lr" in name.split("_") or x.max() / x.min() >= 100


@_styled
def sensitivity_figure(
    values: pd.DataFrame,
    hyperparameters: Sequence[str],
    *,
    metric: str = "final_return",
    ncols: int = 3,
) -> Figure:
    """Final return against each hyperparameter, marginalised over everything else.

    ``values``: one row per run with ``value`` and the hyperparameter columns. Per value
    of a hyperparameter: the median (markers) and IQR (error bars) over every run with
    that value, i.e. over seeds *and* over the other hyperparameters, and each config's
    median as a faint dot, so the spread a marginal hides stays visible. Numeric values sit
    on a numeric axis (logarithmic for learning rates and ranges over two decades);
    choices, booleans and layer sizes are categories. Panels share the y axis. The IQR is
    drawn as error bars (a band would suggest values between the grid points).
    """
    hps = [h for h in hyperparameters if h in values.columns]
    n = max(1, len(hps))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    width = TEXT_WIDTH if ncols > 1 else COLUMN_WIDTH
    fig = _new_figure(width, 1.9 * nrows + 0.2)
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    val = values["value"].to_numpy(float)
    ok = np.isfinite(val)
    v = values.loc[ok]
    for k, ax in enumerate(axes.ravel()):
        if k >= len(hps):
            ax.set_axis_off()
            continue
        h = hps[k]
        col = v[h]
        numeric = _is_numeric(col)
        key = col if numeric else col.map(_category)
        g = v["value"].groupby(key.to_numpy(), sort=True)
        q = g.quantile([0.25, 0.5, 0.75]).unstack()
        xs = q.index.to_numpy()
        if numeric:
            x = xs.astype(float)
            ax.set_xscale("log" if _log_axis(h, x) else "linear")
        else:
            x = np.arange(len(xs), dtype=float)
            ax.set_xticks(x)
            ax.set_xticklabels([str(s) for s in xs])
            ax.set_xlim(-0.5, len(xs) - 0.5)
        lookup = pd.Series(x, index=xs)
        if "config_id" in v:
            per_cfg = v.groupby("config_id", sort=False).agg(
                value=("value", "median"), key=(h, "first"))
            ck = per_cfg["key"] if numeric else per_cfg["key"].map(_category)
            ax.scatter(lookup.reindex(ck.to_numpy()).to_numpy(float),
                       per_cfg["value"].to_numpy(float), s=6, color="#999999", lw=0,
                       zorder=1)
        med = q[0.5].to_numpy(float)
        # Error bars, not a band: the grid has values only where the bars are.
        ax.errorbar(x, med, yerr=[med - q[0.25].to_numpy(float), q[0.75].to_numpy(float) - med],
                    color=OKABE_ITO[0], marker="o", ms=3.5, lw=1.2, capsize=2.5,
                    ls="-" if numeric else "none",  # no line between unordered choices
                    elinewidth=1.0, zorder=3)
        if numeric and _grid_like(x, ax.get_xscale() == "log"):
            # Few grid values: tick exactly those, so each value reads off the axis.
            ax.set_xticks(x, [_category(float(a)) for a in xs])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(h)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{_metric_label(metric)}\n(median, IQR over runs)")
    return fig


def _grid_like(x: np.ndarray, log: bool) -> bool:
    """Whether values can each get a tick: at most 8, none closer to the next than 8% of
    the axis span (a grid; values an Optuna sampler drew lie anywhere, and their labels
    would overlap), and short to write."""
    if x.size > 8:
        return False
    t = np.sort(np.log10(x) if log else x)
    if t.size > 1 and np.diff(t).min() < 0.08 * (t[-1] - t[0]):
        return False
    return all(len(_category(float(a))) <= 7 for a in x)


def _category(x: object) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "true" if x else "false"
    if isinstance(x, (float, np.floating)):
        return "inf" if np.isinf(x) else f"{float(x):g}"
    return str(x)


# --------------------------------------------------------------------------------------
# filmstrips (study.render)

#: Filmstrip layout, in inches: the title above each strip, the label above each frame
#: (two lines), and the gap between strips placed side by side.
FILMSTRIP_TITLE_IN = 0.22
FILMSTRIP_LABEL_IN = 0.3
FILMSTRIP_GAP_IN = 0.2


def filmstrip_size(n_frames: Sequence[int], ncols: int, panel_width: float,
                   aspect: float, dpi: float) -> tuple[float, float, float]:
    """``(width, height, panel_height)`` in inches of :func:`filmstrip_figure`, each
    rounded to whole pixels at ``dpi`` (``aspect``: frame height / width)."""
    def px(inches: float) -> float:
        return round(inches * dpi) / dpi

    pw = px(panel_width)
    ph = px(panel_width * aspect)
    rows = max(math.ceil(n / ncols) for n in n_frames)
    gap, label, title = px(FILMSTRIP_GAP_IN), px(FILMSTRIP_LABEL_IN), px(FILMSTRIP_TITLE_IN)
    width = len(n_frames) * ncols * pw + (len(n_frames) - 1) * gap
    return width, title + rows * (label + ph), ph


@_styled
def filmstrip_figure(
    strips: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str]]],
    ncols: int,
    panel_width: float = 1.15,
    dpi: float = PNG_DPI,
    colors: Sequence[str] | None = None,
) -> Figure:
    """Frames of one or more episodes: each strip ``(title, frames, labels)`` is a grid of
    ``ncols`` columns (row by row), its title above it; strips stand side by side.

    ``frames`` are ``[H, W, 3]`` uint8 images (the first one's aspect sizes every panel),
    ``labels`` one (up to two-line) caption per frame, ``panel_width`` a frame's width in
    inches. Sizes are whole pixels at ``dpi`` (see :func:`filmstrip_size`), so a PNG saved
    at that resolution has exactly ``width * dpi`` x ``height * dpi`` pixels. ``colors``
    colour each strip's title and frame borders (e.g. by failure class).
    """
    if not strips or not all(len(f) for _, f, _ in strips):
        raise ValueError("filmstrip_figure needs at least one frame per strip")
    first = np.asarray(strips[0][1][0])
    aspect = first.shape[0] / first.shape[1]
    width, height, ph = filmstrip_size([len(f) for _, f, _ in strips], ncols, panel_width,
                                       aspect, dpi)
    pw = round(panel_width * dpi) / dpi
    gap = round(FILMSTRIP_GAP_IN * dpi) / dpi
    title_h = round(FILMSTRIP_TITLE_IN * dpi) / dpi
    label_h = round(FILMSTRIP_LABEL_IN * dpi) / dpi
    fig = Figure(figsize=(width, height), dpi=dpi)
    for s, (title, frames, labels) in enumerate(strips):
        color = colors[s] if colors is not None else "#333333"
        x0 = s * (ncols * pw + gap)
        fig.text((x0 + ncols * pw / 2) / width, 1 - title_h / 2 / height, title,
                 ha="center", va="center", color=color, fontweight="bold")
        for i, (frame, label) in enumerate(zip(frames, labels, strict=True)):
            r, c = divmod(i, ncols)
            bottom = height - title_h - (r + 1) * (label_h + ph)
            ax = fig.add_axes((
                (x0 + c * pw) / width, bottom / height, pw / width, ph / height))
            ax.imshow(np.asarray(frame), interpolation="antialiased", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(color if colors is not None else "#999999")
                spine.set_linewidth(0.8)
            ax.text(0.5, 1.0 + 0.04 * pw / ph, label, transform=ax.transAxes, ha="center",
                    va="bottom", linespacing=1.1, fontsize=FONT_SIZE - 1)
    return fig


# --------------------------------------------------------------------------------------
# Optuna


def optuna_figures(study: Any) -> tuple[dict[str, Figure], dict[str, str]]:
    """The optimisation history, parameter importances and intermediate values of an Optuna
    ``study``, drawn here in this module's style (Optuna's own matplotlib plots bring
    their ggplot theme and titles, and their labels are clipped at paper sizes).

    Returns ``(figures, notes)``: the figures that could be drawn, and for each that could
    not a one-line reason for the report (no completed trial, fewer than two for
    importances, no intermediate values, or the error Optuna raised computing them).
    """
    import optuna

    trials = study.get_trials(deepcopy=False)
    done = optuna.trial.TrialState.COMPLETE
    complete = [t for t in trials if t.state == done and t.value is not None]
    with_inter = [t for t in trials if t.intermediate_values]
    figures: dict[str, Figure] = {}
    notes: dict[str, str] = {}
    if complete:
        figures["optuna_history"] = _optuna_history(complete, _maximize(study))
    else:
        notes["optuna_history"] = "no completed trial"
    if len(complete) < 2:
        notes["optuna_importances"] = (f"needs at least 2 completed trials (the study has "
                                       f"{len(complete)})")
    else:
        try:
            imp = _importances(study)
            figures["optuna_importances"] = _optuna_importances(imp)
        except Exception as e:  # noqa: BLE001 - an evaluator failure becomes a report note
            notes["optuna_importances"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
    if with_inter:
        figures["optuna_intermediate"] = _optuna_intermediate(with_inter)
    else:
        notes["optuna_intermediate"] = "no trial reported intermediate values"
    return figures, notes


def _maximize(study: Any) -> bool:
    import optuna

    return study.direction == optuna.study.StudyDirection.MAXIMIZE


def _importances(study: Any) -> dict[str, float]:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning and friends
        return dict(optuna.importance.get_param_importances(study))


@_styled
def _optuna_history(complete: Sequence[Any], maximize: bool) -> Figure:
    """Each completed trial's objective (dots) and the best so far (step line)."""
    fig = _new_figure(COLUMN_WIDTH, 2.4)
    ax = fig.subplots()
    n = np.array([t.number for t in complete])
    v = np.array([float(t.value) for t in complete])
    order = np.argsort(n)
    n, v = n[order], v[order]
    best = np.maximum.accumulate(v) if maximize else np.minimum.accumulate(v)
    ax.scatter(n, v, s=12, color=OKABE_ITO[0], label="trial", zorder=3)
    ax.step(n, best, where="post", color=OKABE_ITO[1], lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best")
    return fig


@_styled
def _optuna_importances(imp: Mapping[str, float]) -> Figure:
    """Horizontal bars, the most important parameter at the top, each bar labelled."""
    names = list(imp)[::-1]
    vals = np.array([imp[k] for k in names], dtype=float)
    fig = _new_figure(COLUMN_WIDTH, 0.9 + 0.28 * len(names))
    ax = fig.subplots()
    ax.barh(np.arange(len(names)), vals, color=OKABE_ITO[0], height=0.6)
    ax.set_yticks(np.arange(len(names)), names)
    for i, x in enumerate(vals):
        ax.text(x, i, f" {x:.2f}", va="center", ha="left")
    ax.set_xlim(0, max(1e-9, float(vals.max())) * 1.2)
    ax.set_xlabel("importance (fANOVA)")
    return fig


@_styled
def _optuna_intermediate(trials: Sequence[Any]) -> Figure:
    """Every trial's intermediate values against its step, coloured by the trial's end
    state (pruned ones are the curves the pruner stopped)."""
    fig = _new_figure(COLUMN_WIDTH, 2.6)
    ax = fig.subplots()
    colors = {"COMPLETE": OKABE_ITO[0], "PRUNED": OKABE_ITO[3], "FAIL": "#000000"}
    seen: dict[str, Line2D] = {}
    for t in sorted(trials, key=lambda t: t.number):
        steps = sorted(t.intermediate_values)
        state = t.state.name
        (line,) = ax.plot(steps, [t.intermediate_values[k] for k in steps], lw=0.9,
                          alpha=0.8, color=colors.get(state, "#999999"))
        seen.setdefault(state, line)
    ax.set_xlabel("environment steps")
    ax.xaxis.set_major_formatter(steps_formatter)
    ax.set_ylabel("intermediate value")
    ax.legend(list(seen.values()), [f"{k.lower()} ({sum(t.state.name == k for t in trials)})"
                                    for k in seen], loc="best")
    return fig


# --------------------------------------------------------------------------------------
# saving


def save_figure(fig: Figure, directory: str | Path, stem: str,
                formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write ``directory/stem.<fmt>`` for each format; returns the paths written.

    PNG at :data:`PNG_DPI` for screens, SVG for papers; no timestamps in the metadata, so
    the same store gives the same files.
    """
    out = []
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        for fmt in formats:
            p = d / f"{stem}.{fmt}"
            meta = {"Date": None} if fmt == "svg" else ({"Software": None} if fmt == "png"
                                                          else None)
            # A figure legend below the axes can be wider than the figure: "tight" keeps it
            # whole. Figures without one keep their exact size (filmstrips rely on it).
            tight: dict[str, Any] = ({"bbox_inches": "tight", "pad_inches": 0.03}
                                     if fig.legends else {})
            fig.savefig(p, format=fmt, dpi=PNG_DPI, metadata=meta, facecolor="white", **tight)
            out.append(p)
    return out
