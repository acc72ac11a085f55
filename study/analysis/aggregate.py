"""``python -m study.aggregate RESULTS_DIR``: which config is best across tasks, and how sure.

Agarwal et al. 2021 (rliable) aggregates normalised scores over runs and tasks with
stratified bootstrap confidence intervals; this module does the same over a store's
``normalized_return`` (see :mod:`study.analysis.scores` and a sweep's ``[normalize]`` table).

Every statistic takes one data shape, a score matrix ``x[run, task]`` of one config (the
same seeds on every task), and a batch of them ``x[..., run, task]`` (bootstrap replicates):

* median = median over tasks of the per-task mean over runs;
* IQM = mean of the middle 50% of all runs x tasks scores (``trim_mean(x, 0.25)``);
* mean = mean over tasks of the per-task mean;
* optimality gap = ``gamma - mean(min(x, gamma))`` with ``gamma = 1`` (how far below
  "solved" the config stays, lower is better);
* performance profile at tau = mean over tasks of the fraction of runs scoring above tau.

Confidence intervals are percentile intervals of a stratified bootstrap: each replicate
draws, for every task separately, as many runs with replacement as the task has.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from study.analysis import stats
from study.config import SPECS, ConfigError
from study.text import latex_tabular, markdown_table

__all__ = [
    "METRICS",
    "aggregate_table",
    "efficiency_curves",
    "efficiency_figure",
    "iqm",
    "main",
    "mean",
    "median",
    "optimality_gap",
    "performance_profile",
    "profile_figure",
    "probability_of_improvement",
    "score_matrices",
    "score_references",
    "render",
    "stratified_bootstrap",
    "table_note",
    "study_runs",
]

Metric = Callable[[np.ndarray], np.ndarray]


def median(x: np.ndarray) -> np.ndarray:
    """Median over tasks of the per-task mean score: ``median_t mean_r x[r, t]``."""
    return np.median(x.mean(axis=-2), axis=-1)


def iqm(x: np.ndarray) -> np.ndarray:
    """Interquartile mean of all ``runs x tasks`` scores: with the ``n`` scores sorted,
    ``k = floor(n / 4)`` cut from each end and the rest averaged."""
    return np.asarray(stats.iqm(x.reshape(*x.shape[:-2], -1), axis=-1))


def mean(x: np.ndarray) -> np.ndarray:
    """Mean over tasks of the per-task mean score."""
    return x.mean(axis=-2).mean(axis=-1)


def optimality_gap(x: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """``gamma - mean(min(x, gamma))``: the mean shortfall below the target ``gamma``."""
    return gamma - np.minimum(x, gamma).mean(axis=(-2, -1))


#: The aggregate metrics of the table, in column order.
METRICS: dict[str, Metric] = {"iqm": iqm, "median": median, "mean": mean,
                              "optimality_gap": optimality_gap}


def performance_profile(x: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """Fraction of runs scoring above each tau, averaged over tasks: ``[..., len(taus)]``."""
    above = x[..., None] > np.asarray(taus)
    return above.mean(axis=-3).mean(axis=-2)


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """``P(X > Y) + 0.5 P(X = Y)`` averaged over tasks, X a run of config x and Y one of
    config y on the same task (the Mann-Whitney statistic ``U / (n m)`` per task)."""
    per_task = []
    for t in range(x.shape[1]):
        a, b = x[:, t][:, None], y[:, t][None, :]
        per_task.append(float(((a > b) + 0.5 * (a == b)).mean()))
    return float(np.mean(per_task))


def stratified_bootstrap(x: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """``n_boot`` replicates ``[n_boot, runs, tasks]`` of ``x[run, task]``: every task's
    runs resampled with replacement, independently of the other tasks."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, *x.shape))
    return np.take_along_axis(np.broadcast_to(x, idx.shape), idx, axis=1)


def _ci(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha], axis=0)
    return lo, hi


# --------------------------------------------------------------------------------------
# from a store


def _axes(runs: pd.DataFrame) -> list[str]:
    """Hyperparameters that vary within some env: what tells configs apart across tasks
    (per-env overrides are constant within an env and do not split configs)."""
    names = [n for n in SPECS if n in runs.columns]
    return [n for n in names if runs.groupby("env")[n].nunique(dropna=False).max() > 1]


def _check_one_budget(runs: pd.DataFrame) -> None:
    """ConfigError when an env's runs were trained at several budgets (an edited sweep
    resumed into the same store): their scores are not one task's."""
    budgets = runs.groupby("env")[["total_steps", "log_every"]].nunique()
    mixed = budgets[(budgets > 1).any(axis=1)]
    if len(mixed):
        env = mixed.index[0]
        steps = sorted(runs.loc[runs["env"] == env, "total_steps"].unique())
        raise ConfigError(f"the runs of {env!r} were trained at more than one budget "
                          f"(total_steps {', '.join(f'{s:,}' for s in steps)}); aggregate a "
                          f"store of one budget per env (copy the runs you want, or re-run "
                          f"the sweep into another --out)")


def _check_one_normalization(runs: pd.DataFrame) -> None:
    """ConfigError when an env's runs were normalised with different references (a
    ``[normalize]`` entry edited between runs): ``normalized_return`` must be one affine
    function of ``final_return`` per env."""
    for env, group in runs.groupby("env"):
        ok = group[["final_return", "normalized_return"]].dropna().drop_duplicates()
        if len(ok) < 3:
            continue
        slope, intercept = np.polyfit(ok["final_return"], ok["normalized_return"], 1)
        fitted = slope * ok["final_return"] + intercept
        if not np.allclose(fitted, ok["normalized_return"], rtol=1e-6, atol=1e-9):
            raise ConfigError(
                f"the runs of {env!r} were normalized with different score references (the "
                f"sweep's [normalize] changed between runs); re-run the sweep with --fresh")


def study_runs(runs: pd.DataFrame, phase: str | None = None) -> tuple[pd.DataFrame, str]:
    """``(runs to aggregate, what they are)``. A grid store's runs as they are; of an
    Optuna store (a ``phase`` column) the runs of one phase: ``"tune"`` (default), the
    tuning runs of its COMPLETE trials (pruned and failed trials lack tasks), or
    ``"confirm"``, the held-out confirmation runs. Pruned runs never count."""
    runs = runs[runs["status"] != "pruned"]
    has_phase = "phase" in runs.columns and runs["phase"].notna().any()
    if not has_phase:
        if phase is not None:
            raise ConfigError(f"--phase {phase}: this store is a grid's, it has no phases; "
                              f"expected no --phase")
        return runs, "runs"
    phase = phase or "tune"
    sel = runs["phase"].fillna("").astype(str).eq(phase)
    if phase == "tune":
        sel &= runs["trial_state"].fillna("").astype(str).eq("COMPLETE")
    picked = runs[sel.to_numpy()]
    if picked.empty:
        raise ConfigError(f"this Optuna store has no {phase} runs"
                          + (" of COMPLETE trials" if phase == "tune" else "")
                          + ("; run study.optuna with --confirm K first" if phase == "confirm"
                             else ""))
    what = ("tuning runs of the study's COMPLETE trials" if phase == "tune"
            else "held-out confirmation runs")
    return picked, what


def score_matrices(runs: pd.DataFrame) -> tuple[dict[tuple, np.ndarray], list[str], list[str]]:
    """``({config: x[seed, task]}, tasks, axes)`` from a runs table with
    ``normalized_return``. ConfigError (one line) when a task has no normalised score or
    a config lacks a (task, seed) pair."""
    tasks = sorted(runs["env"].astype(str).unique())
    missing = runs.groupby("env")["normalized_return"].apply(lambda s: s.notna().any())
    absent = [t for t in tasks if not missing.get(t, False)]
    ended = runs.groupby("env")["final_return"].apply(lambda s: s.notna().any())
    unfinished = [t for t in absent if not ended.get(t, False)]
    if unfinished:
        raise ConfigError(
            f"task {unfinished[0]!r} has no score: none of its runs finished an episode "
            f"(final_return is NaN everywhere); train it longer ([overrides] total_steps)")
    if absent:
        raise ConfigError(
            f"task {absent[0]!r} has no normalized score (no score references for it); add "
            f'[normalize] "{absent[0]}" = [low, high] to the sweep file and re-run it, or '
            f"use an env listed in study.analysis.scores")
    _check_one_budget(runs)
    _check_one_normalization(runs)
    axes = _axes(runs)
    seeds = sorted(runs["seed"].unique())
    out: dict[tuple, np.ndarray] = {}
    keys = axes or ["sweep"]
    for key, group in runs.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        table = group.pivot_table(index="seed", columns="env", values="normalized_return",
                                  aggfunc="first", dropna=False)
        table = table.reindex(index=seeds, columns=tasks)
        if table.isna().to_numpy().any():
            t = table.columns[table.isna().any(axis=0)][0]
            raise ConfigError(f"config {dict(zip(keys, key, strict=True))} has no score for "
                              f"task {t!r} on every seed; aggregates need every (task, seed)"
                              f" pair (a run diverged, or the sweep is incomplete)")
        out[key] = table.to_numpy(dtype=float)
    return out, tasks, axes


def aggregate_table(matrices: dict[tuple, np.ndarray], axes: Sequence[str],
                    n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
                    ) -> pd.DataFrame:
    """One row per config: its hyperparameters, then each metric with its CI bounds
    (``iqm``, ``iqm_lo``, ``iqm_hi``, ...), best IQM first."""
    rows = []
    for key, x in matrices.items():
        row = dict(zip(axes or ["sweep"], key, strict=True))
        reps = stratified_bootstrap(x, n_boot, seed)
        for name, fn in METRICS.items():
            lo, hi = _ci(fn(reps), confidence)
            row.update({name: float(fn(x)), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
        row["tasks"], row["seeds"] = x.shape[1], x.shape[0]
        rows.append(row)
    return pd.DataFrame(rows).sort_values("iqm", ascending=False, kind="stable",
                                          ignore_index=True)


def table_note(matrices: dict[tuple, np.ndarray], tasks: Sequence[str], table: pd.DataFrame,
               reps: int, what: str = "runs") -> str:
    """The sentence above the table: what it aggregates, how, and the probability that
    the best config beats the second best."""
    note = (("Aggregates" if what == "runs" else f"Of the {what}: aggregates")
            + f" of normalized final return over {len(tasks)} tasks "
            f"({', '.join(tasks)}) x {table['seeds'].iloc[0]} seeds, 95% stratified "
            f"bootstrap CIs ({reps} replicates); best IQM first")
    if len(matrices) >= 2:
        keys = sorted(matrices, key=lambda k: -float(iqm(matrices[k])))
        poi = probability_of_improvement(matrices[keys[0]], matrices[keys[1]])
        note += f"; P(best > second best) = {poi:.2f}"
    return note


def render(table: pd.DataFrame, fmt: str, note: str) -> str:
    """The table as Markdown (the note above it), CSV (data only, full precision) or
    LaTeX (booktabs; the note as a comment)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    shown = table.copy()
    for c in shown.columns:
        if shown[c].dtype.kind == "f":  # hyperparameters as given, statistics to 3 places
            spec = ".4g" if c in SPECS else ".3f"
            shown[c] = shown[c].map(lambda v, spec=spec: f"{v:{spec}}")
    header = [str(c) for c in shown.columns]
    rows = [[str(v) for v in r] for r in shown.itertuples(index=False)]
    if fmt == "latex":
        # Numbers still numeric (the counts) right-aligned, text left, as pandas' to_latex
        # wrote this table before.
        align = "".join("r" if pd.api.types.is_numeric_dtype(shown[c]) else "l"
                        for c in shown.columns)
        return latex_tabular(header, [(None, rows)], align,
                             comments=[r"needs \usepackage{booktabs}", note])
    return f"{note}\n\n" + markdown_table(header, rows)


# --------------------------------------------------------------------------------------
# sample efficiency

#: Fractions of each env's budget at which the sample-efficiency curves are compared
#: (envs of one sweep may have different budgets).
FRACTIONS = np.linspace(0.05, 1.0, 20)


def score_references(root: Path, envs: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``(low, high)`` per env: the store's resolved ``sweep.toml`` ``[normalize]`` table,
    else the shipped :data:`study.analysis.scores.REFERENCES` (read as data: no env is built)."""
    import tomllib

    from study.analysis.scores import REFERENCES

    try:
        table = tomllib.loads((root / "sweep.toml").read_text()).get("normalize", {})
    except (OSError, ValueError):
        table = {}
    refs = {}
    for env in envs:
        pair = table.get(env) or REFERENCES.get(env)
        if pair is None:
            raise ConfigError(f"task {env!r} has no score references; add [normalize] "
                              f'"{env}" = [low, high] to the sweep file')
        refs[env] = (float(pair[0]), float(pair[1]))
    return refs


def efficiency_curves(runs: pd.DataFrame, curves: pd.DataFrame, axes: Sequence[str],
                      refs: dict[str, tuple[float, float]], n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """Aggregate IQM of the normalised training return against the fraction of each
    env's budget, with 95% stratified bootstrap CIs: one row per (config, fraction).

    Each run's curve (``episode_return`` at its log points) is normalised with its env's
    references and linearly interpolated at :data:`FRACTIONS` of its ``total_steps``; at
    each fraction the config's ``[seed, task]`` matrix is aggregated as in the table.
    """
    keys = list(axes) or ["sweep"]
    merged = curves.merge(runs[["run_id", "env", "seed", "total_steps", *keys]], on="run_id")
    rows = []
    for key, group in merged.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        tasks = sorted(group["env"].unique())
        seeds = sorted(group["seed"].unique())
        cube = np.full((len(FRACTIONS), len(seeds), len(tasks)), np.nan)
        # The rows of each (env, seed), in their order: one stable sort, not a groupby.
        cell = (pd.Index(tasks).get_indexer(group["env"]) * len(seeds)
                + pd.Index(seeds).get_indexer(group["seed"]))
        order = np.argsort(cell, kind="stable")
        cells, starts = np.unique(cell[order], return_index=True)
        step = group["step"].to_numpy(float)[order]
        ret = group["episode_return"].to_numpy(float)[order]
        budget = group["total_steps"].to_numpy()[order]
        for c, a, b in zip(cells, starts, [*starts[1:], len(order)], strict=True):
            ti, si = divmod(int(c), len(seeds))
            low, high = refs[tasks[ti]]
            x = step[a:b] / float(budget[a])
            y = (ret[a:b] - low) / (high - low)
            ok = np.isfinite(y)
            if ok.any():  # one log point fills its own fraction only
                inside = (FRACTIONS >= x[ok].min() - 1e-9) & (FRACTIONS <= x[ok].max() + 1e-9)
                cube[inside, si, ti] = np.interp(FRACTIONS[inside], x[ok], y[ok])
        for f, mat in zip(FRACTIONS, cube, strict=True):
            if np.isnan(mat).any():
                continue  # not every (seed, task) has reached this fraction yet
            lo, hi = _ci(iqm(stratified_bootstrap(mat, n_boot, seed)), 0.95)
            rows.append({**dict(zip(keys, key, strict=True)), "fraction": float(f),
                         "iqm": float(iqm(mat)), "iqm_lo": float(lo), "iqm_hi": float(hi)})
    return pd.DataFrame(rows)


#: Size (inches) of the figures of the command line; the report draws them a column wide.
FIGSIZE = (5.0, 3.2)


def _figure(xlabel: str, ylabel: str, draw: Callable[[Any], None],
            size: tuple[float, float] = FIGSIZE) -> Any:
    """One figure: ``draw(ax)`` plots the series, the rest is shared. A matplotlib Figure
    not attached to pyplot (the caller saves it; nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # below the axes: labels of several hyperparameters are long
        fig.set_figheight(size[1] + 0.16 * len(handles))
        fig.legend(handles, labels, loc="outside lower center", ncols=1, fontsize=7)
    return fig


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)


def _label(axes: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{a}={v:.4g}" if isinstance(v, float) else f"{a}={v}"
                     for a, v in zip(axes, values, strict=True)) or "all runs"


def efficiency_figure(table: pd.DataFrame, axes: Sequence[str], top: int = 4,
                      size: tuple[float, float] = FIGSIZE) -> Any:
    """Sample-efficiency curves (:func:`efficiency_curves`) of the ``top`` configs by
    final IQM, with their CI bands: a matplotlib Figure."""
    keys = list(axes) or ["sweep"]
    final = table[table["fraction"] == table["fraction"].max()]
    best = final.sort_values("iqm", ascending=False)[keys].head(top)

    def draw(ax: Any) -> None:
        for _, cfg in best.iterrows():
            mine = table[(table[keys] == cfg[keys]).all(axis=1)]
            ax.plot(mine["fraction"], mine["iqm"], label=_label(keys, cfg[keys].tolist()))
            ax.fill_between(mine["fraction"], mine["iqm_lo"], mine["iqm_hi"], alpha=0.2)

    return _figure("fraction of each env's training budget", "IQM normalized return",
                   draw, size)


def profile_figure(matrices: dict[tuple, np.ndarray], axes: Sequence[str], n_boot: int,
                   seed: int = 0, top: int = 4, size: tuple[float, float] = FIGSIZE) -> Any:
    """Performance profiles of the ``top`` configs by IQM with stratified bootstrap CI
    bands: a matplotlib Figure."""
    taus = np.linspace(-0.25, 1.25, 61)
    ranked = sorted(matrices, key=lambda k: -float(iqm(matrices[k])))[:top]

    def draw(ax: Any) -> None:
        for key in ranked:
            x = matrices[key]
            reps = stratified_bootstrap(x, n_boot, seed)
            lo, hi = _ci(performance_profile(reps, taus), 0.95)
            ax.plot(taus, performance_profile(x, taus), label=_label(axes, key))
            ax.fill_between(taus, lo, hi, alpha=0.2)

    return _figure("normalized score tau", "fraction of runs with score > tau", draw, size)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.aggregate RESULTS_DIR [--format markdown|csv|latex] ...``."""
    from study import store
    from study.cli_util import ArgumentParser, positive_int, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = ArgumentParser(prog="python -m study.aggregate", description=__doc__.split(
            "\n")[0].replace("``", ""))
        ap.add_argument("results_dir", help="a results store of a sweep over several envs")
        ap.add_argument("--format", choices=("markdown", "csv", "latex"), default="markdown")
        ap.add_argument("--reps", type=positive_int, default=2000,
                        help="bootstrap replicates (default 2000)")
        ap.add_argument("--out", metavar="FILE", help="write the table here (default stdout)")
        ap.add_argument("--figure", metavar="PNG",
                        help="also draw the performance profiles of the best configs")
        ap.add_argument("--efficiency", metavar="PNG",
                        help="also draw sample-efficiency curves (aggregate IQM of the "
                             "normalized training return against the fraction of the budget) "
                             "and write their numbers next to it as CSV")
        ap.add_argument("--phase", choices=("tune", "confirm"),
                        help="of an Optuna store: aggregate its tuning runs (default; "
                             "COMPLETE trials) or its held-out confirmation runs")
        ap.add_argument("--importance", action="store_true",
                        help="also rank the hyperparameters by PED-ANOVA importance, across "
                             "tasks, per task, and how often seeds agree on the top one")
        args = ap.parse_args(args_in)
        runs = store.load_runs(args.results_dir)
        if "normalized_return" not in runs.columns:
            raise ConfigError(f"{args.results_dir}: its runs have no normalized_return "
                              f"(written by an older version); re-run its sweep")
        if runs[runs["status"] != "pruned"].empty:
            raise ConfigError(f"{args.results_dir}: every run was pruned; nothing to aggregate")
        runs, what = study_runs(runs, args.phase)
        matrices, tasks, axes = score_matrices(runs)
        table = aggregate_table(matrices, axes, n_boot=args.reps)
        text = render(table, args.format, table_note(matrices, tasks, table, args.reps, what))
        if args.importance and not axes:
            text += "\nHyperparameter importance: no hyperparameter varies in this store.\n"
        elif args.importance:
            from study.analysis.importance import MIN_CONFIGS, importance_table

            imp = importance_table(runs, axes).reset_index()
            few = (f"; NaN: fewer than {MIN_CONFIGS} configs, too few to estimate"
                   if len(matrices) < MIN_CONFIGS else "")
            text += "\n" + render(imp, args.format, (
                "Hyperparameter importance (PED-ANOVA over the grid's configs; per task on "
                "final_return; top_on_seeds: share of seeds whose own ranking puts it first"
                f"{few})"))
        if args.out:
            store.atomic_write_text(args.out, text)
        else:
            sys.stdout.write(text)
        if args.figure:
            _save(profile_figure(matrices, axes, min(args.reps, 1000)), Path(args.figure))
        if args.efficiency:
            root = Path(args.results_dir)
            eff = efficiency_curves(runs, store.load_curves(root), axes,
                                    score_references(root, tasks), min(args.reps, 1000))
            _save(efficiency_figure(eff, axes), Path(args.efficiency))
            store.atomic_write_text(Path(args.efficiency).with_suffix(".csv"),
                                    eff.to_csv(index=False))
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

