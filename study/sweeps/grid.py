"""``python -m study.grid SWEEP.toml``: a hyperparameter grid x seeds, resumable.

    python -m study.grid sweeps/quickstart.toml              # -> results/quickstart/
    python -m study.grid sweeps/cartpole_grid.toml --dry-run
    python -m study.grid sweeps/cartpole_grid.toml --backend dask --scheduler tcp://host:8786

Re-running the same command skips the runs already stored and runs the rest, so an
interrupted sweep (Ctrl-C, a crash, ``kill -9``) is resumed by running it again.
With ``--scheduler`` the chunks go to an existing Dask cluster, whose workers must be able
to import ``study`` (the same version) and send results back; only this process writes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from study import store
from study.analysis import stats
from study.cli_util import ArgumentParser, positive_int, run_cli
from study.config import ConfigError
from study.sweeps.manifest import EXIT_INTERRUPTED, Record
from study.sweeps.runner import BACKENDS, Outcome, Plan, check_scheduler, execute, make_plan
from study.sweeps.spec import Sweep, grid_axes, load_sweep
from study.trainer.envs.memory import check_fits

__all__ = ["best_configs", "main"]



def _available_cores() -> int:
    # The cores this process may run on (container/taskset limits), not the machine's.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="study.grid", description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="sweep file (TOML), e.g. sweeps/quickstart.toml")
    p.add_argument("--out", metavar="DIR", help="results directory (default results/<name>)")
    p.add_argument("--n-jobs", type=positive_int, default=None, metavar="N",
                   help="parallel workers (default: all cores; with --scheduler the "
                        "cluster's workers decide)")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="loky (default) or dask; --scheduler implies dask")
    p.add_argument("--scheduler", metavar="ADDR",
                   help="Dask scheduler address, e.g. tcp://host:8786 (default: a local "
                        "cluster of --n-jobs worker processes)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (configs, seeds, runs, populations, env steps) and exit")
    p.add_argument("--fresh", action="store_true",
                   help="delete the results directory first instead of resuming")
    p.add_argument("--quiet", action="store_true", help="no plan, progress bar or table")
    p.add_argument("--population-size", type=positive_int, default=64, metavar="N",
                   help="most runs trained together in one population (default 64)")
    return p


# --------------------------------------------------------------------------------------
# manifest


def _manifest_fields(plan: Plan, n_jobs: int, backend: str) -> dict[str, Any]:
    """The grid's own manifest fields (see :func:`study.sweeps.manifest.new_manifest`)."""
    return {"backend": backend, "n_jobs": n_jobs, "population_size": plan.population_size,
            "runs": {"in_sweep": len(plan.runs), "already_stored": len(plan.runs) - plan.pending,
                     "to_run": plan.pending, "ran": 0}}


# --------------------------------------------------------------------------------------
# summary


def best_configs(runs: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` configs with the highest IQM of final_return across seeds (the ranking
    statistic of every table and report; ties broken by the smaller IQR).

    Columns: config_id, iqm, median, q25, q75, iqr, seeds, diverged; NaN returns (diverged
    runs) are left out of the statistics and counted in ``diverged``.
    """
    g = runs.groupby("config_id", sort=False)["final_return"]
    table = pd.DataFrame({
        "iqm": g.agg(lambda x: stats.iqm(x.to_numpy(dtype=float))),
        "median": g.median(),
        "q25": g.quantile(0.25),
        "q75": g.quantile(0.75),
        "seeds": g.size(),
        "diverged": runs.assign(d=runs["status"].eq("diverged")).groupby(
            "config_id", sort=False)["d"].sum(),
    })
    table["iqr"] = table["q75"] - table["q25"]
    table = table.sort_values(["iqm", "iqr"], ascending=[False, True], na_position="last",
                              kind="stable")
    return table.head(k).reset_index()


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if pd.isna(x) else f"{x:.4g}"
    return str(x)


def _summary(sweep: Sweep, plan: Plan, out: Path, outcome: Outcome) -> str:
    runs = store.load_runs(out, allow_empty=True)
    ids = {r.run_id for r in plan.runs}
    mine = runs[runs["run_id"].isin(ids)]
    counts = mine["status"].value_counts()
    status = ", ".join(f"{n} {s}" for s, n in counts.items())
    rate = outcome.env_steps / outcome.wall_s if outcome.wall_s > 0 else float("nan")
    lines = [
        f"results: {out} ({len(mine)} of {len(plan.runs)} runs of this sweep stored: {status})",
    ]
    if outcome.runs_done:
        lines.append(f"ran {outcome.runs_done} runs, {outcome.env_steps:,} env steps in "
                     f"{outcome.wall_s:.1f} s ({rate:,.0f} env steps/s)")
    for env in sweep.envs:  # raw returns are comparable within an env only
        here = mine[mine["env"] == env]
        if len(here):
            title = f" on {env}" if len(sweep.envs) > 1 else ""
            lines += _best_lines(sweep, here, 5 if len(sweep.envs) == 1 else 3, title)
    if len(mine):
        if len(sweep.envs) > 1:
            lines.append(f"across envs: python -m study.aggregate {out}")
        lines.append(f'load with: study.store.load("{out}")  or  '
                     f'pandas.read_parquet("{out / store.RUNS_DIR}")')
    return "\n".join(lines)


def _best_lines(sweep: Sweep, runs: pd.DataFrame, k: int, title: str) -> list[str]:
    """The top ``k`` configs of ``runs`` as an aligned text table."""
    best = best_configs(runs, k)
    axes = list(grid_axes(sweep))
    first = runs.drop_duplicates("config_id").set_index("config_id")
    header = ["rank", "IQM", "median", "IQR", "[q25, q75]", "diverged", *axes, "config_id"]
    rows = []
    for i, b in best.iterrows():
        hp = first.loc[b["config_id"]]
        rows.append([
            str(i + 1), _fmt(b["iqm"]), _fmt(b["median"]), _fmt(b["iqr"]),
            f"[{_fmt(b['q25'])}, {_fmt(b['q75'])}]", f"{b['diverged']}/{b['seeds']}",
            *[_fmt(hp[a]) for a in axes], b["config_id"],
        ])
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    n_seeds = len(sweep.seeds)
    lines = [f"best configs{title} by IQM of final_return over {n_seeds} seed"
             f"{'s' if n_seeds != 1 else ''}:"]
    lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
              for r in [header, *rows]]
    return lines


# --------------------------------------------------------------------------------------
# main


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    backend = args.backend or ("dask" if args.scheduler else "loky")
    if args.scheduler and backend != "dask":
        raise ConfigError("--scheduler is invalid with --backend loky: expected --backend dask")
    n_jobs = args.n_jobs or _available_cores()

    sweep = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path("results") / sweep.name
    if args.fresh and out.exists() and not store.is_store(out) and \
            any(not q.name.startswith(".") for q in out.iterdir()):
        raise store.StoreError(
            f"{out}: --fresh refuses to delete a directory that is not a results store")
    plan, corrupt = _plan(sweep, out, args)
    notes = _store_notes(sweep, out, corrupt) if not args.fresh else []
    memory = None
    if plan.chunks and not args.scheduler:  # a cluster's memory is not ours to measure
        at_once = sorted(plan.chunks, key=lambda c: -len(c.runs))[:n_jobs]
        memory = check_fits([(c.env, [r.hyperparameters for r in c.runs], len(c.runs))
                             for c in at_once], f"{sweep.source}: ")

    if args.dry_run:
        print(plan.describe(out))
        if memory:
            print(f"  memory:      {memory}")
        for note in notes:
            print(f"  note:        {note}")
        if args.fresh and store.is_store(out):
            print(f"  --fresh:     would delete the existing results in {out} first")
        return 0

    if args.scheduler and plan.pending:
        check_scheduler(args.scheduler)  # an unreachable cluster writes nothing

    # Validation is over: from here on the store is written, by this driver alone.
    command = shlex.join(["python", "-m", "study.grid",
                          *(sys.argv[1:] if argv is None else argv)])
    _check_writable(out)
    with store.driver_lock(out):
        # Re-read the store now that it is ours: a driver that just finished may have
        # stored some of the runs planned above.
        plan, corrupt = _plan(sweep, out, args)
        if corrupt:
            store.set_aside(out, corrupt)
        if not args.quiet:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        return _write(args, sweep, plan, out, command, n_jobs, backend)


def _plan(sweep: Sweep, out: Path, args: argparse.Namespace) -> tuple[Plan, list[str]]:
    """The plan (what is stored is skipped) and the keys of unreadable chunks."""
    if args.fresh:
        return make_plan(sweep, args.population_size, set()), []
    corrupt = store.corrupt_chunks(out) if store.is_store(out) else []
    store.check_compatible(out, sweep.envs, corrupt)
    stored = store.stored_run_ids(out, corrupt) if store.is_store(out) else set()
    return make_plan(sweep, args.population_size, stored), corrupt


def _store_notes(sweep: Sweep, out: Path, corrupt: Sequence[str]) -> list[str]:
    """What the user should know about the store before it is resumed: unreadable chunk
    files (set aside, their runs trained again) and runs stored at another budget (an
    edited sweep under the same name: tables show the budget when it varies)."""
    notes = []
    if corrupt:
        notes.append(f"{len(corrupt)} chunk(s) with unreadable files (e.g. "
                     f"chunk-{corrupt[0]}.parquet) are set aside as .corrupt-* and their "
                     f"runs trained again")
    if store.is_store(out):
        budgets = store.read_columns(out, ["env", "total_steps", "log_every"], corrupt)
        expect = pd.DataFrame([(e, sweep.budget(e).total_steps, sweep.budget(e).log_every)
                               for e in sweep.envs],
                              columns=["env", "want_steps", "want_log"])
        budgets = budgets.merge(expect, on="env", how="inner")  # other envs: other notes
        other = budgets[(budgets["total_steps"] != budgets["want_steps"])
                        | (budgets["log_every"] != budgets["want_log"])]
        if len(other):
            seen = sorted({f"total_steps {t:,}, log_every {e:,}"
                           for t, e in zip(other["total_steps"], other["log_every"],
                                           strict=True)})
            notes.append(f"{len(other)} stored runs belong to another budget ("
                         f"{'; '.join(seen[:3])}); this sweep trains total_steps "
                         f"{sweep.total_steps:,}, log_every {sweep.log_every:,}")
    return notes


def _check_writable(out: Path) -> None:
    """ConfigError before anything is written when ``out`` cannot be written (a
    read-only file system, no permission)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(probe) else "permission denied"
        raise ConfigError(f"--out {out}: cannot write in {probe} ({why})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _write(args: argparse.Namespace, sweep: Sweep, plan: Plan, out: Path, command: str,
           n_jobs: int, backend: str) -> int:
    """Train the plan into the store at ``out`` (its driver lock held) and report."""
    if args.fresh:
        store.remove_store(out)
    out.mkdir(parents=True, exist_ok=True)
    record = Record.start(out, sweep, command, _manifest_fields(plan, n_jobs, backend))
    if not args.quiet:
        print(plan.describe(out), flush=True)

    def finish(status: str, outcome: Outcome | None) -> None:
        if outcome is None:
            return record.finish(status)
        record.data["runs"]["ran"] = outcome.runs_done
        record.finish(status, {"wall_s": round(outcome.wall_s, 3),
                               "env_steps": outcome.env_steps})

    try:
        outcome = execute(plan, out, n_jobs=n_jobs, backend=backend, scheduler=args.scheduler,
                          show_progress=not args.quiet)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk may refuse this write too
            finish("failed", None)
        raise
    if outcome.interrupted:
        finish("interrupted", outcome)
        kept = len(store.stored_run_ids(out) & {r.run_id for r in plan.runs})
        print(f"interrupted: dropped the populations in flight; kept {outcome.runs_done} runs "
              f"finished now, {kept} of {len(plan.runs)} runs of this sweep are stored in "
              f"{out}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finish("complete", outcome)
    if args.quiet:
        print(f"results: {out}")
    else:
        print(_summary(sweep, plan, out, outcome))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input, 130 after Ctrl-C)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
