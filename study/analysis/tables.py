"""The seed table: one row per config, every number a seed-variance study needs.

Columns: the hyperparameters that differ between configs (and the budget, ``total_steps``
or ``log_every``, when it differs: a sweep edited under the same name stores both), then
``config_id``, ``n_seeds`` (runs, pruned ones left out), ``n`` (runs with a finite
metric), ``median``, ``q25``, ``q75``, ``iqr``, ``mean``, ``std`` (ddof 1), ``iqm`` with
``iqm_lo``/``iqm_hi`` (95% percentile interval of a seeded bootstrap over the config's
seeds), ``min``, ``max``, ``n_failed``, ``failure_rate`` with ``failure_lo``/``failure_hi``
(95% Wilson interval), ``p_improve`` (probability that a seed of the best config beats a
seed of this one), and with ``per_seed`` one ``seed_<seed>`` column per seed (the classic
table). An Optuna store's table has a leading ``phase`` column: held-out confirmation
("confirm") and tuning ("tune") rows are ranked apart, each on its own seeds.

A run fails when :func:`study.analysis.failures.classify_runs` calls it trapped, collapsed or
diverged. Only a run whose status is "diverged" is diverged: it has no metric (NaN, left
out of every statistic) but counts as a failure; a run with status ok and no final return
(no episode finished in its last 10% of steps) is left out of the statistics ("4 of 5"
seeds) and fails only if its curve says so. Trapped and collapsed runs have a real, low
return and stay in the statistics. Rows are ranked by IQM, best first, ties by median,
then config id. Every bootstrap is seeded by the config id, so the same store always gives
the same table, whatever else is in it. CSV holds every number at full precision (it is
data); Markdown and LaTeX round for people.

CLI: ``python -m study.tables RESULTS_DIR [--metric M] [--per-seed] [--format F]
[--top K] [--out FILE] [--check REFERENCE_DIR]``. An incomplete store (an interrupted
sweep) or one mixing budgets is said first: in the Markdown, as LaTeX comments, and on
stderr for CSV, LaTeX and ``--check``.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from study.analysis import stats
from study.analysis.failures import (
    FAILED,
    budget_note,
    classify_runs,
    decimals_for,
    fmt_number,
    hyperparameter_columns,
    plain,
)
from study.config import ConfigError
from study.text import (
    BOOKTABS_NOTE,
    format_value,
    latex_escape,
    latex_tabular,
    markdown_table,
)

__all__ = [
    "FORMATS",
    "METRICS",
    "compare_tables",
    "format_table",
    "latex_escape",
    "main",
    "run_metric",
    "seed_table",
]

METRICS: tuple[str, ...] = ("final_return", "final_eval_return", "auc")
FORMATS: tuple[str, ...] = ("markdown", "csv", "latex")

#: Columns in the unit of the metric (printed with the metric's decimals).
_VALUE_COLS = ("median", "q25", "q75", "iqr", "mean", "std", "iqm", "iqm_lo", "iqm_hi",
               "min", "max")
#: Proportions and probabilities (printed with 3 decimals).
_RATE_COLS = ("failure_rate", "failure_lo", "failure_hi", "p_improve")
_INT_COLS = ("n_seeds", "n", "n_failed")
_RATE_DECIMALS = 3
#: Phases of an Optuna store's runs, in the order their tables are shown.
PHASES: tuple[str, ...] = ("confirm", "tune")
#: What each phase's table holds (Markdown and LaTeX captions).
PHASE_CAPTIONS: dict[str, str] = {
    "confirm": "Held-out confirmation: the top configs re-run on the test seeds, ranked by "
               "those seeds only",
    "tune": "Tuning: every trial's config on the tuning seeds",
}


def run_metric(runs: pd.DataFrame, curves: pd.DataFrame | None, metric: str) -> pd.Series:
    """The metric of every run (index of ``runs``); NaN for diverged and pruned runs.

    ``final_return`` and ``final_eval_return`` are the runs' columns; ``auc`` is the mean
    of the run's ``episode_return`` log points, NaN windows skipped (the area under the
    curve divided by its length, for evenly spaced log points).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if metric == "auc":
        if curves is None or len(curves) == 0 or "episode_return" not in curves:
            raise ConfigError("metric auc needs curves, and there are none")
        auc = curves.groupby("run_id", sort=False)["episode_return"].mean()
        values = runs["run_id"].map(auc).astype(float)
    else:
        if metric not in runs:
            raise ConfigError(f"metric {metric} is not a column of the runs")
        values = runs[metric].astype(float)
    bad = runs["status"].astype(str).isin(["diverged", "pruned"]).to_numpy()
    return values.where(~bad)


def seed_table(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None = None,
    metric: str = "final_return",
    per_seed: bool = False,
    top: int | None = None,
    *,
    classification: pd.DataFrame | None = None,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The seed table of ``runs`` (see the module docstring for the columns).

    ``curves`` are needed for ``metric="auc"`` and to find trapped and collapsed runs
    (without them only diverged runs count as failures). ``classification`` may pass the
    result of :func:`study.analysis.failures.classify_runs` when the caller already has it. ``top``
    keeps the best ``top`` rows (``p_improve`` is still relative to the best config
    overall). Runs of an Optuna store (a ``phase`` column, "tune" and "confirm") give one
    table per phase, held-out confirmation first, each ranked on its own seeds only, with
    a leading ``phase`` column. Raises ConfigError (one line) when there is nothing to
    tabulate.
    """
    for c in ("run_id", "config_id", "seed", "status"):
        if c not in runs:
            raise ConfigError(f"runs lack the column {c!r}")
    if top is not None and top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    if len(runs) == 0:
        raise ConfigError("no runs to tabulate")
    runs = runs[runs["status"].astype(str) != "pruned"]
    if len(runs) == 0:
        raise ConfigError("every run was pruned: nothing to tabulate")
    runs = runs.sort_values(["config_id", "seed"], kind="stable").reset_index(drop=True)
    values = run_metric(runs, curves, metric).to_numpy()
    if not np.isfinite(values).any():
        why = {"final_eval_return": " (no run was evaluated)"}.get(metric, "")
        raise ConfigError(f"metric {metric} has no finite value in these runs{why}")

    if classification is None:
        classification = classify_runs(runs, curves)
    cls = runs["run_id"].map(classification.set_index("run_id")["classification"].astype(str))
    diverged = (cls == "diverged").to_numpy() | (runs["status"] == "diverged").to_numpy()
    failed = diverged | cls.isin(FAILED).to_numpy()
    values = np.where(diverged, np.nan, values)  # a diverged run has no metric
    hps = hyperparameter_columns(runs)
    args = (hps, per_seed, top, n_boot, confidence, seed)
    phases = _phases(runs)
    if phases is None:
        df = _table(runs, values, failed, *args)
    else:
        parts = []
        for ph in phases:
            sel = (runs["phase"].fillna("").astype(str) == ph).to_numpy()
            part = _table(runs[sel], values[sel], failed[sel], *args)
            parts.append(part.assign(phase=ph)[["phase", *part.columns]])
        df = pd.concat(parts, ignore_index=True)
    df.attrs["metric"] = metric
    return df


def _phases(runs: pd.DataFrame) -> list[str] | None:
    """The phases of an Optuna store's runs, held-out confirmation first; None when the
    runs have one phase (a grid, or a study without confirmation)."""
    if "phase" not in runs:
        return None
    found = set(runs["phase"].fillna("").astype(str))
    if len(found) < 2:
        return None
    order = {p: i for i, p in enumerate(PHASES)}
    return sorted(found, key=lambda p: (order.get(p, len(order)), p))


def _table(runs: pd.DataFrame, values: np.ndarray, failed: np.ndarray, hps: list[str],
           per_seed: bool, top: int | None, n_boot: int, confidence: float,
           seed: int) -> pd.DataFrame:
    """One seed table: a row per config, ranked by IQM (ties: median, then config id)."""
    cfg = runs["config_id"].astype(str).to_numpy()
    first = runs.drop_duplicates("config_id").set_index("config_id")
    rows = []
    per_config: dict[str, np.ndarray] = {}
    for cid in pd.unique(cfg):  # a loop over configs; each is a handful of numpy calls
        sel = cfg == cid
        v = values[sel]
        fin = v[np.isfinite(v)]
        per_config[cid] = fin
        n_seeds, k = int(sel.sum()), int(failed[sel].sum())
        lo_f, hi_f = stats.wilson_interval(k, n_seeds, confidence)
        row = {h: first.at[cid, h] for h in hps}
        row.update(config_id=cid, n_seeds=n_seeds, n=int(fin.size))
        row.update(_summary(fin, n_boot, confidence, stats.key_seed(seed, cid)))
        row.update(n_failed=k, failure_rate=k / n_seeds, failure_lo=lo_f, failure_hi=hi_f)
        if per_seed:
            for s, x in zip(runs["seed"].to_numpy()[sel], v, strict=True):
                row[f"seed_{int(s)}"] = x
        rows.append(row)

    df = pd.DataFrame(rows)
    df = df.sort_values(["iqm", "median", "config_id"], ascending=[False, False, True],
                        na_position="last", kind="stable").reset_index(drop=True)
    best = per_config[df["config_id"].iloc[0]]
    df["p_improve"] = [
        np.nan if i == 0 else stats.probability_of_improvement(best, per_config[c])
        for i, c in enumerate(df["config_id"])
    ]
    seed_cols = sorted((c for c in df.columns if c.startswith("seed_")),
                       key=lambda c: int(c.split("_", 1)[1]))
    cols = [*hps, "config_id", "n_seeds", "n", *_VALUE_COLS, "n_failed", "failure_rate",
            "failure_lo", "failure_hi", "p_improve", *seed_cols]
    df = df[cols]
    return df.head(top).reset_index(drop=True) if top is not None else df


def _summary(fin: np.ndarray, n_boot: int, confidence: float, key: list[int]) -> dict:
    """The value columns of one config from its finite metric values (NaN without any)."""
    if not fin.size:
        return {c: np.nan for c in _VALUE_COLS}
    q25, med, q75 = stats.quantiles(fin, (0.25, 0.5, 0.75))
    point, lo, hi = stats.stratified_bootstrap_ci(fin, "iqm", n_boot=n_boot,
                                                  confidence=confidence, seed=key)
    return dict(median=med, q25=q25, q75=q75, iqr=q75 - q25, mean=fin.mean(),
                std=fin.std(ddof=1) if fin.size > 1 else np.nan, iqm=point, iqm_lo=lo,
                iqm_hi=hi, min=fin.min(), max=fin.max())


# --------------------------------------------------------------------------------------
# formatting


def _kinds(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(hyperparameter columns, seed columns) of a seed table."""
    cols = list(df.columns)
    hps = cols[: cols.index("config_id")] if "config_id" in cols else []
    seeds = [c for c in cols if c.startswith("seed_")]
    return [h for h in hps if h != "phase"], seeds


def _value_decimals(df: pd.DataFrame) -> int:
    _, seeds = _kinds(df)
    cols = [c for c in (*_VALUE_COLS, *seeds) if c in df]
    return decimals_for(df[cols].to_numpy(dtype=float)) if cols else 2


def _full(v: object) -> str:
    """A number at full precision (the shortest text that reads back to the same float),
    "" for a missing value: CSV is data, rounding is for people."""
    if v is None or v is pd.NA or (isinstance(v, float | np.floating) and math.isnan(v)):
        return ""
    if isinstance(v, int | np.integer):
        return str(int(v))
    return repr(float(v))  # type: ignore[arg-type]


def _csv(df: pd.DataFrame) -> str:
    hps, _ = _kinds(df)
    labels = {"config_id", "phase", *hps}
    out = pd.DataFrame({c: df[c].map(format_value if c in labels else _full) for c in df})
    buf = io.StringIO()
    out.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def _display(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows for people: intervals folded into one cell each."""
    hps, seeds = _kinds(df)
    d = _value_decimals(df)

    def num(x: float, dec: int = d) -> str:
        return "-" if pd.isna(x) else fmt_number(x, dec)

    def pct(x: float) -> str:
        return "-" if pd.isna(x) else f"{100 * x:.0f}%"

    header = [*hps, "config", "seeds", "median", "IQR", "mean +/- sd", "IQM [95% CI]", "min",
              "max", "failed [95% CI]", "P(best > this)", *seeds]
    rows = []
    for r in df.to_dict("records"):
        seeds_txt = str(r["n"]) if r["n"] == r["n_seeds"] else f"{r['n']} of {r['n_seeds']}"
        rows.append([
            *[format_value(r[h]) for h in hps], str(r["config_id"]), seeds_txt,
            num(r["median"]), f"{num(r['iqr'])} [{num(r['q25'])}, {num(r['q75'])}]",
            f"{num(r['mean'])} +/- {num(r['std'])}",
            f"{num(r['iqm'])} [{num(r['iqm_lo'])}, {num(r['iqm_hi'])}]",
            num(r["min"]), num(r["max"]),
            f"{r['n_failed']}/{r['n_seeds']} = {pct(r['failure_rate'])} "
            f"[{pct(r['failure_lo'])}, {pct(r['failure_hi'])}]",
            num(r["p_improve"], 2), *[num(r[s]) for s in seeds],
        ])
    return header, rows


def ranking_sentence(metric: str) -> str:
    """How every table and report of this package ranks configs."""
    return (f"one row per config, ranked by the IQM of {metric} (interquartile mean over "
            "seeds; ties: median), best first")


def _parts(df: pd.DataFrame, trim: bool = True) -> list[tuple[str | None, pd.DataFrame]]:
    """The table as ``(phase, rows)`` pieces (one piece, phase None, without phases); with
    ``trim`` a piece keeps only the seed columns its own runs have."""
    if "phase" not in df:
        return [(None, df)]
    out: list[tuple[str | None, pd.DataFrame]] = []
    for ph in pd.unique(df["phase"]):
        sub = df[df["phase"] == ph].drop(columns="phase").reset_index(drop=True)
        empty = [c for c in sub if trim and c.startswith("seed_") and sub[c].isna().all()]
        out.append((str(ph), sub.drop(columns=empty)))
    return out


def format_table(df: pd.DataFrame, fmt: str = "markdown") -> str:
    """A seed table as ``markdown``, ``csv`` (every column, full precision: data) or
    ``latex``.

    Markdown and LaTeX are for people: values in the metric's unit get
    :func:`study.analysis.failures.decimals_for` decimals (about 4 significant digits, the same for
    every row), rates and probabilities 3, intervals are folded into one cell ("IQM [lo,
    hi]"), and a first line says how rows are ranked; an Optuna table's phases become
    separate tables (Markdown) or row groups (LaTeX). LaTeX is a booktabs ``tabular``
    (``\\usepackage{booktabs}``, said in a comment) with every special character escaped.
    """
    if fmt == "csv":
        return _csv(df)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    metric = df.attrs.get("metric", "final_return")
    title = f"Seed table{'s' if 'phase' in df else ''} of {metric}: {ranking_sentence(metric)}"
    if fmt == "markdown":
        out = [title + (", tuning and held-out seeds apart." if "phase" in df else ".")]
        for ph, sub in _parts(df):
            out += ["", f"{PHASE_CAPTIONS.get(ph, ph)}."] if ph else []
            out += ["", _markdown_table(sub).rstrip()]
        return "\n".join(out) + "\n"
    return _latex(df, title)


def _markdown_table(df: pd.DataFrame) -> str:
    """One seed table in Markdown: labels left, numbers right."""
    header, rows = _display(df)
    return markdown_table(header, rows, _align(df, len(header)))


def _align(df: pd.DataFrame, n_columns: int) -> str:
    """Column alignment of a displayed table: its hyperparameters and config id left, every
    number right."""
    hps, _ = _kinds(df)
    return "l" * (len(hps) + 1) + "r" * (n_columns - len(hps) - 1)


def _latex(df: pd.DataFrame, title: str) -> str:
    """The seed table(s) as one booktabs tabular; an Optuna table's phases as captioned
    row groups under one header (every piece keeps every column)."""
    parts = _parts(df, trim=False)
    header, _ = _display(parts[0][1])
    sections = [(PHASE_CAPTIONS.get(ph, ph) if ph else None, _display(sub)[1])
                for ph, sub in parts]
    return latex_tabular(header, sections, _align(parts[0][1], len(header)),
                         comments=[f"{title}.", BOOKTABS_NOTE])


# --------------------------------------------------------------------------------------
# --check


def _decimals_of(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def _same(ref: str, new: str) -> bool:
    """Equal at the reference's printed precision (numbers), or equal text."""
    if ref == new:
        return True
    try:
        r, n = float(ref), float(new)
    except ValueError:
        return False
    if math.isnan(r) or math.isnan(n):
        return math.isnan(r) and math.isnan(n)
    d = _decimals_of(ref.strip())
    return fmt_number(n, d) == fmt_number(r, d)


def compare_tables(reference_csv: str, new_csv: str, max_lines: int = 50) -> list[str]:
    """Differences between two seed tables in CSV form (empty when they match).

    Rows are matched by ``config_id`` (by position without one) and must come in the same
    order; numbers are compared at the precision printed in the reference, so a reference
    written by ``--format csv`` matches a recomputation exactly.
    """
    def read(text: str) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)

    ref, new = read(reference_csv), read(new_csv)
    out: list[str] = []
    missing = [c for c in ref.columns if c not in new.columns]
    extra = [c for c in new.columns if c not in ref.columns]
    if missing:
        out.append(f"columns missing from the recomputed table: {', '.join(missing)}")
    if extra:
        out.append(f"columns not in the reference: {', '.join(extra)}")
    if any(c.startswith("seed_") for c in missing + extra):
        out.append("(was one of them written with --per-seed and the other without?)")
    key = "config_id" if "config_id" in ref.columns and "config_id" in new.columns else None
    rk = ref[key].tolist() if key else [str(i) for i in range(len(ref))]
    nk = new[key].tolist() if key else [str(i) for i in range(len(new))]
    gone = [k for k in rk if k not in set(nk)]
    added = [k for k in nk if k not in set(rk)]
    if gone:
        out.append(f"configs missing from the recomputed table: {', '.join(gone)}")
    if added:
        out.append(f"configs not in the reference: {', '.join(added)}")
    common = [k for k in rk if k in set(nk)]
    if [k for k in nk if k in set(rk)] != common:
        out.append("row order differs (the ranking changed): reference "
                   f"{', '.join(common)}; recomputed {', '.join(k for k in nk if k in set(rk))}")
    ri = {k: i for i, k in enumerate(rk)}
    ni = {k: i for i, k in enumerate(nk)}
    cols = [c for c in ref.columns if c in new.columns]
    for k in common:
        for c in cols:
            a, b = ref.at[ri[k], c], new.at[ni[k], c]
            if not _same(a, b):
                out.append(f"config {k}, {c}: reference {a or '(empty)'}, "
                           f"recomputed {b or '(empty)'}")
    if len(out) > max_lines:
        out = out[:max_lines] + [f"... and {len(out) - max_lines} more differences"]
    return out


# --------------------------------------------------------------------------------------
# CLI


def _load(path: str, need_curves: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Runs and curves of a results store; StoreError (one line) if it is not one."""
    from study import store

    runs = store.load_runs(path)
    curves = store.load_curves(path, allow_empty=True)
    if need_curves and len(curves) == 0:
        raise ConfigError(f"{path}: the store has no curves (needed for --metric auc)")
    return runs, (curves if len(curves) else None)


def store_notes(path: str | Path, runs: pd.DataFrame) -> list[str]:
    """What a reader must know before trusting a store's tables: that it is incomplete
    (:func:`study.analysis.failures.incomplete_note`), that its runs mix budgets."""
    from study.analysis.failures import incomplete_note

    return [n for n in (incomplete_note(path), budget_note(runs)) if n]


def _with_notes(text: str, fmt: str, notes: Sequence[str]) -> str:
    """Notes at the top where the format has room for prose: Markdown lines (bold for an
    incomplete store), LaTeX comments; CSV is data and gets none (see :func:`main`)."""
    if not notes or fmt == "csv":
        return text
    if fmt == "latex":
        return "".join(f"% {n}\n" for n in notes) + text
    return "".join(f"**{n}**\n\n" if n.startswith("incomplete") else f"{n}\n\n"
                   for n in notes) + text


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.tables``: print (or write, or check) the seed table."""
    from study.cli_util import ArgumentParser, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = _parser(ArgumentParser)
        args = ap.parse_args(args_in)
        store_dir = args.results_dir or args.check
        if store_dir is None:
            ap.error("the following arguments are required: results_dir")
        if args.top is not None and args.top < 1:
            ap.error(f"--top must be at least 1, got {args.top}")
        ref_text = _reference(args.check) if args.check else None
        runs, curves = _load(store_dir, args.metric == "auc")
        table = seed_table(runs, curves, args.metric, args.per_seed, args.top)
        notes = store_notes(store_dir, runs)
        # On stderr wherever stdout is data (CSV) or a verdict (--check); LaTeX gets them
        # as comments too, which a reader of the typeset table would never see.
        if notes and (ref_text is not None or args.format in ("csv", "latex")):
            print("\n".join(f"note: {n}" for n in notes), file=sys.stderr)
        if ref_text is not None:
            return _check(ref_text, table, store_dir, args.check)
        text = _with_notes(format_table(table, args.format), args.format, notes)
        if args.out:
            try:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text)
            except OSError as e:
                raise ConfigError(f"cannot write {args.out}: {e.strerror or e}") from None
        else:
            sys.stdout.write(text)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_cli(body, argv)


def _parser(cls: type) -> argparse.ArgumentParser:
    ap = cls(prog="python -m study.tables",
             description=plain("The seed table of a results store: per config median, IQR, "
                               "mean, IQM with a bootstrap CI, failure rate and "
                               "P(improvement), ranked by IQM."),
             epilog=plain(__doc__.split("\n\nCLI:")[0].split("\n\n", 1)[1]),
             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", nargs="?",
                    help="results store (default: REFERENCE_DIR with --check)")
    ap.add_argument("--metric", choices=METRICS, default="final_return")
    ap.add_argument("--per-seed", action="store_true",
                    help="add one column per seed (the classic seed table)")
    ap.add_argument("--format", choices=FORMATS, default="markdown")
    ap.add_argument("--top", type=int, metavar="K", help="only the best K configs")
    ap.add_argument("--out", metavar="FILE", help="write the table here, not to stdout")
    ap.add_argument("--check", metavar="REFERENCE_DIR",
                    help="compare with REFERENCE_DIR/seed_table.csv; exit 1 if it differs")
    return ap


def _reference(ref_dir: str) -> str:
    ref_file = Path(ref_dir) / "seed_table.csv"
    try:
        return ref_file.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {ref_file}: {e.strerror or e}") from None


def _check(ref_text: str, table: pd.DataFrame, store_dir: str, ref_dir: str) -> int:
    diffs = compare_tables(ref_text, format_table(table, "csv"))
    if diffs:
        print(f"seed table of {store_dir} differs from {ref_dir}/seed_table.csv:")
        print("\n".join(f"  {d}" for d in diffs))
        return 1
    print(f"seed table of {store_dir} matches {ref_dir}/seed_table.csv "
          f"({len(table)} configs, {len(table.columns)} columns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
