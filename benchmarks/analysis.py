"""Benchmark: the full analysis of a large sweep (tables, failure report, every figure).

    python benchmarks/analysis.py                    # 50 configs x 20 seeds x 500 points
    python benchmarks/analysis.py --configs 10 --seeds 8 --points 200 --keep DIR

A synthetic results store of ``configs x seeds`` runs with ``points`` curve points each is
written with pandas (the schema of ``study.store``), then ``study.report.build_report`` runs
on it end to end: loading, the seed table, the failure report, curve aggregation, every
figure saved as PNG and SVG, and the HTML and Markdown. The timing breakdown is printed as
a Markdown table, followed by the wall time of ``python -m study.report`` on the same store
in a fresh process (interpreter start and imports included, as a user sees it).
Target (issue 4): under 20 s for 1,000 runs x 500 points on 2 cores.

The store has what makes the analysis work hard: a grid over three hyperparameters, a
third of the configs bimodal (some seeds trapped at a low plateau with collapsed entropy),
weak configs, runs still learning at the end, a few diverged runs (non-finite final
return, curve cut short) and log windows without a finished episode (NaN).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from study import store  # noqa: E402
from study.config import SPECS, defaults  # noqa: E402


def _hp_cell(name: str, value: object) -> object:
    # Layer sizes are stored as strings ("[64, 64]"), as the runner writes them.
    if SPECS[name].kind == "intlist":
        return "[" + ", ".join(str(int(v)) for v in value) + "]"  # type: ignore[union-attr]
    return value


def make_store(path: str | Path, n_configs: int = 50, n_seeds: int = 20, n_points: int = 500,
               log_every: int = 1000, seed: int = 0) -> Path:
    """Write a synthetic results store at ``path`` and return it (vectorized, ~1 s).

    Configs are the first ``n_configs`` points of a policy_lr x value_lr x lam grid. Each
    config has a success level set by its learning rates; configs with a large policy_lr
    are bimodal (a share of seeds plateaus at -75 with entropy near zero), the smallest
    policy_lr is still learning at the end, and the largest diverges on some seeds.
    """
    root = Path(path)
    rng = np.random.default_rng(seed)
    grid = list(itertools.product([0.03, 0.01, 0.003, 0.001, 0.0003],
                                  [0.01, 0.003, 0.001, 0.0003, 0.0001], [0.95, 1.0]))
    reps = -(-n_configs // len(grid))
    grid = (grid * reps)[:n_configs]
    n_runs = n_configs * n_seeds
    cfg = np.repeat(np.arange(n_configs), n_seeds)
    plr = np.array([g[0] for g in grid])[cfg]
    vlr = np.array([g[1] for g in grid])[cfg]
    lam = np.array([g[2] for g in grid])[cfg]

    # Success level (-25 .. -5): best near policy_lr 3e-3, value_lr 1e-3; lam 0.95 helps.
    q = (np.exp(-0.5 * (np.log10(plr / 3e-3) / 0.6) ** 2)
         * np.exp(-0.5 * (np.log10(vlr / 1e-3) / 0.9) ** 2) * np.where(lam < 1, 1.0, 0.9))
    level = -25 + 20 * q + rng.normal(0, 1.5, n_runs)
    # Large policy steps sometimes lock the policy in early: a plateau at -75, far below.
    trapped = rng.random(n_runs) < np.where(plr >= 0.01, 0.35, 0.0)
    level = np.where(trapped, -75 + rng.normal(0, 1.5, n_runs), level)
    diverged = (plr >= 0.03) & (rng.random(n_runs) < 0.1)
    slow = plr <= 0.0003  # still learning at the end

    steps = (np.arange(1, n_points + 1) * log_every).astype(np.int64)
    t = steps[None, :] / steps[-1]
    tau = np.where(trapped, 0.08, np.where(slow, 1.5, 0.2))[:, None]
    start = -100.0
    ret = start + (level[:, None] - start) * (1 - np.exp(-t / tau))
    ret = ret + rng.normal(0, 3.0, (n_runs, n_points))
    ret[rng.random((n_runs, n_points)) < 0.01] = np.nan  # windows without an episode
    ent0 = 1.4
    ent = np.where(trapped[:, None], 0.05 + (ent0 - 0.05) * np.exp(-t / 0.05),
                   0.6 + (ent0 - 0.6) * np.exp(-t / 0.5))
    ent = ent + rng.normal(0, 0.02, (n_runs, n_points))
    div_at = np.full(n_runs, -1)
    div_at[diverged] = rng.integers(n_points // 4, n_points - 1, diverged.sum())
    cut = np.arange(n_points)[None, :] > div_at[:, None]
    cut &= diverged[:, None]
    ret[cut] = np.nan
    ent[cut] = np.nan
    evalr = np.full((n_runs, n_points), np.nan)
    every = max(1, n_points // 20)
    evalr[:, every - 1::every] = ret[:, every - 1::every] + rng.normal(0, 1.0, (n_runs, 1))

    run_ids = np.array([f"c{c:03d}-s{s:02d}" for c, s in
                        itertools.product(range(n_configs), range(n_seeds))])
    final = np.full(n_runs, np.nan)  # a diverged run has no final return
    final[~diverged] = np.nanmean(ret[~diverged, -10:], axis=1)
    hp = {k: _hp_cell(k, v) for k, v in defaults().items()}
    runs = pd.DataFrame({
        "run_id": run_ids,
        "config_id": [f"c{c:03d}" for c in cfg],
        "seed": np.tile(np.arange(n_seeds), n_configs).astype(np.int64),
        "env": "Synthetic-v0",
        "total_steps": np.int64(steps[-1]),
        "log_every": np.int64(log_every),
        **{k: [v] * n_runs for k, v in hp.items()},
    })
    runs["policy_lr"], runs["value_lr"], runs["lam"] = plr, vlr, lam
    runs["final_return"] = final
    runs["final_eval_return"] = np.where(diverged, np.nan, evalr[:, -1])
    runs["status"] = np.where(diverged, "diverged", "ok")
    runs["diverged_at_step"] = pd.Series(
        np.where(diverged, steps[np.maximum(div_at, 0)], 0), dtype="Int64").where(diverged)
    runs["wall_s"] = 1.0
    runs["sweep"] = "bench"
    curves = pd.DataFrame({
        "run_id": np.repeat(run_ids, n_points),
        "step": np.tile(steps, n_runs),
        "episode_return": ret.ravel(),
        "episode_length": np.full(n_runs * n_points, 200.0),
        "entropy": ent.ravel(),
        "policy_loss": rng.normal(0, 0.1, n_runs * n_points),
        "value_loss": np.abs(rng.normal(1, 0.1, n_runs * n_points)),
        "explained_variance": rng.uniform(0, 1, n_runs * n_points),
        "grad_norm": np.abs(rng.normal(0.5, 0.1, n_runs * n_points)),
        "eval_return": evalr.ravel(),
    })
    root.mkdir(parents=True, exist_ok=True)
    store.write_manifest(root, {"format": store.FORMAT, "env": "Synthetic-v0", "sweep": "bench"})
    (root / "sweep.toml").write_text('name = "bench"\nenv = "Synthetic-v0"\n')
    (root / "runs").mkdir(exist_ok=True)
    (root / "curves").mkdir(exist_ok=True)
    runs.to_parquet(root / "runs" / "chunk-0.parquet", index=False)
    curves.to_parquet(root / "curves" / "chunk-0.parquet", index=False)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--points", type=int, default=500)
    ap.add_argument("--keep", metavar="DIR", help="write the store and report here and keep them")
    args = ap.parse_args(argv)

    from study.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        root = make_store(base / "store", args.configs, args.seeds, args.points)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = build_report(root, base / "report")
        total = time.perf_counter() - t0
        # The command as a user runs it: a fresh interpreter, imports included.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "study.report", str(root), "--out",
                        str(base / "report")], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        cli = time.perf_counter() - t0

    n_runs = args.configs * args.seeds
    print(f"## Analysis benchmark: {n_runs:,} runs x {args.points} curve points "
          f"({args.configs} configs x {args.seeds} seeds)\n")
    print(f"{platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}; synthetic store written in {t_make:.2f} s "
          "(not counted).\n")
    print("| stage | seconds |")
    print("|---|---:|")
    for stage, s in result.timings.items():
        print(f"| {stage} | {s:.2f} |")
    print(f"| **total (`build_report`, in process)** | **{total:.2f}** |")
    print(f"| **`python -m study.report` (fresh process, imports included)** | **{cli:.2f}** |")
    target = 20.0
    worst = max(total, cli)
    print(f"\n{'Within' if worst < target else 'OVER'} the {target:.0f} s target.")
    if result.notes:
        print("\nNotes: " + "; ".join(result.notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
