"""Benchmark: the full analysis of a large sweep (tables, failure report, every figure).

    python benchmarks/analysis.py                    # 50 configs x 20 seeds x 500 points
    python benchmarks/analysis.py --configs 10 --seeds 8 --points 200 --keep DIR
    python benchmarks/analysis.py --tasks 6 --points 200 --repeat 3   # across tasks

A synthetic results store of ``configs x seeds`` runs with ``points`` curve points each is
written with pandas (the schema of ``study.store``), then ``study.report.build.build_report`` runs
on it end to end: loading, the seed table, the failure report, curve aggregation, every
figure saved as PNG and SVG, and the HTML and Markdown. The timing breakdown is printed as
a Markdown table, followed by the wall time of ``python -m study.report`` on the same store
in a fresh process (interpreter start and imports included, as a user sees it).
Target (issue 4): under 20 s for 1,000 runs x 500 points on 2 cores.

``--tasks N`` (2..6) writes the same configs x seeds for each of N real envs (CartPole-v1,
Acrobot-v1, LunarLander-v3, MountainCarContinuous-v0, Pendulum-v1, MountainCar-v0: envs
with shipped score references, so ``normalized_return`` is filled as a sweep fills it),
and also times ``python -m study.aggregate`` (the table; with ``--figure`` and
``--efficiency``; with ``--importance`` too), each in a fresh process, ``--repeat`` times
(median). Target (issue 13): 50 configs x 6 tasks x 20 seeds aggregated, report included,
in under 30 s (results in benchmarks/results/analysis_tasks.md).

The store has what makes the analysis work hard: a grid over three hyperparameters, a
third of the configs bimodal (some seeds trapped at a low plateau with collapsed entropy),
weak configs, runs still learning at the end, a few diverged runs (non-finite final
return, curve cut short) and log windows without a finished episode (NaN).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
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
from study.analysis.scores import REFERENCES  # noqa: E402
from study.config import SPECS, defaults  # noqa: E402
from study.sweeps.runner import _normalized  # noqa: E402  (how a sweep fills normalized_return)


def _hp_cell(name: str, value: object) -> object:
    # Layer sizes are stored as strings ("[64, 64]"), as the runner writes them.
    if SPECS[name].kind == "intlist":
        return "[" + ", ".join(str(int(v)) for v in value) + "]"  # type: ignore[union-attr]
    return value


#: The envs of a ``--tasks N`` store, in order: real ids with shipped score references
#: (:data:`study.analysis.scores.REFERENCES`), so ``normalized_return`` is filled as a sweep
#: fills it.
#: Per env: its budget (total_steps, as in sweeps/classic_suite.toml), how far the best
#: config gets towards "solved" (a normalized score), and where its best policy_lr lies.
TASKS: dict[str, tuple[int, float, float]] = {
    "CartPole-v1": (100_000, 1.0, 3e-3),
    "Acrobot-v1": (100_000, 0.95, 1e-3),
    "LunarLander-v3": (200_000, 0.7, 1e-3),
    "MountainCarContinuous-v0": (100_000, 0.4, 3e-3),
    "Pendulum-v1": (200_000, 0.25, 3e-4),
    "MountainCar-v0": (200_000, 0.15, 1e-2),
}


def make_store(path: str | Path, n_configs: int = 50, n_seeds: int = 20, n_points: int = 500,
               log_every: int = 1000, seed: int = 0, n_tasks: int = 1) -> Path:
    """Write a synthetic results store at ``path`` and return it (vectorized, ~1 s a task).

    Configs are the first ``n_configs`` points of a policy_lr x value_lr x lam grid. Each
    config has a success level set by its learning rates; configs with a large policy_lr
    are bimodal (a share of seeds plateaus at -75 with entropy near zero), the smallest
    policy_lr is still learning at the end, and the largest diverges on some seeds.

    ``n_tasks`` 1 is one env, ``Synthetic-v0``, in its own return units (no normalized
    score). ``n_tasks`` > 1 is the first ``n_tasks`` envs of :data:`TASKS`, each with the
    same configs x seeds, as a multi-env sweep writes them: one chunk per env, config and
    run ids per env, the env's own budget (``n_points`` log points), returns on the env's
    scale (the same curve shapes mapped between its random and solved references, each env
    with its own best policy_lr and ceiling) and ``normalized_return`` filled by the
    runner's own function. No run of a multi-env store diverges: study.aggregate needs
    every (config, task, seed) score, so a store it can aggregate has none.
    """
    if n_tasks == 1:
        return _write_store(Path(path), [_env_frames(
            np.random.default_rng(seed), "Synthetic-v0", "", n_configs, n_seeds, n_points,
            log_every)], "Synthetic-v0")
    if not 1 <= n_tasks <= len(TASKS):
        raise ValueError(f"n_tasks must be 1..{len(TASKS)}")
    envs = list(TASKS)[:n_tasks]
    rng = np.random.default_rng(seed)
    frames = []
    for i, env in enumerate(envs):
        budget, ceiling, best_lr = TASKS[env]
        frames.append(_env_frames(rng, env, f"t{i}-", n_configs, n_seeds, n_points,
                                  max(1, budget // n_points), ceiling=ceiling,
                                  best_lr=best_lr))
    return _write_store(Path(path), frames, envs)


def _write_store(root: Path, frames: list[tuple[pd.DataFrame, pd.DataFrame]],
                 env: str | list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    store.write_manifest(root, {"format": store.FORMAT, "env": env, "sweep": "bench"})
    envs = ", ".join(f'"{e}"' for e in ([env] if isinstance(env, str) else env))
    (root / "sweep.toml").write_text(
        f'name = "bench"\nenv = {envs if isinstance(env, str) else "[" + envs + "]"}\n')
    (root / "runs").mkdir(exist_ok=True)
    (root / "curves").mkdir(exist_ok=True)
    for i, (runs, curves) in enumerate(frames):
        runs.to_parquet(root / "runs" / f"chunk-{i}.parquet", index=False)
        curves.to_parquet(root / "curves" / f"chunk-{i}.parquet", index=False)
    return root


def _env_frames(rng: np.random.Generator, env: str, prefix: str, n_configs: int,
                n_seeds: int, n_points: int, log_every: int, ceiling: float | None = None,
                best_lr: float = 3e-3) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs and curves rows of one env. ``ceiling`` None: Synthetic-v0's own units
    (-100 at the start, -5 at best) and divergence; else the env's (low, high) references
    map the same shapes to its scale, -100 to low and 0 to ``low + ceiling * (high - low)``,
    and no run diverges."""
    grid = list(itertools.product([0.03, 0.01, 0.003, 0.001, 0.0003],
                                  [0.01, 0.003, 0.001, 0.0003, 0.0001], [0.95, 1.0]))
    reps = -(-n_configs // len(grid))
    grid = (grid * reps)[:n_configs]
    n_runs = n_configs * n_seeds
    cfg = np.repeat(np.arange(n_configs), n_seeds)
    plr = np.array([g[0] for g in grid])[cfg]
    vlr = np.array([g[1] for g in grid])[cfg]
    lam = np.array([g[2] for g in grid])[cfg]

    # Success level (-25 .. -5): best near policy_lr best_lr, value_lr 1e-3; lam 0.95 helps.
    q = (np.exp(-0.5 * (np.log10(plr / best_lr) / 0.6) ** 2)
         * np.exp(-0.5 * (np.log10(vlr / 1e-3) / 0.9) ** 2) * np.where(lam < 1, 1.0, 0.9))
    level = -25 + 20 * q + rng.normal(0, 1.5, n_runs)
    # Large policy steps sometimes lock the policy in early: a plateau at -75, far below.
    trapped = rng.random(n_runs) < np.where(plr >= 0.01, 0.35, 0.0)
    level = np.where(trapped, -75 + rng.normal(0, 1.5, n_runs), level)
    p_div = 0.1 if ceiling is None else 0.0  # the same draws either way
    diverged = (plr >= 0.03) & (rng.random(n_runs) < p_div)
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

    run_ids = np.array([f"{prefix}c{c:03d}-s{s:02d}" for c, s in
                        itertools.product(range(n_configs), range(n_seeds))])
    final = np.full(n_runs, np.nan)  # a diverged run has no final return
    final[~diverged] = np.nanmean(ret[~diverged, -10:], axis=1)
    length = np.full((n_runs, n_points), 200.0)
    refs = None
    if ceiling is not None:  # the env's scale: -100 is a random policy, 0 its ceiling
        refs = REFERENCES[env]
        low, high = refs
        span = ceiling * (high - low) / 100.0
        ret, final, evalr = (low + (x + 100.0) * span for x in (ret, final, evalr))
        length = _episode_length(env, ret)
    hp = {k: _hp_cell(k, v) for k, v in defaults().items()}
    runs = pd.DataFrame({
        "run_id": run_ids,
        "config_id": [f"{prefix}c{c:03d}" for c in cfg],
        "seed": np.tile(np.arange(n_seeds), n_configs).astype(np.int64),
        "env": env,
        "total_steps": np.int64(steps[-1]),
        "log_every": np.int64(log_every),
        **{k: [v] * n_runs for k, v in hp.items()},
    })
    runs["policy_lr"], runs["value_lr"], runs["lam"] = plr, vlr, lam
    runs["final_return"] = final
    if refs is not None:  # as the runner writes it, with the runner's function
        runs["normalized_return"] = [_normalized(f, refs) for f in final]
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
        "episode_length": length.ravel(),
        "entropy": ent.ravel(),
        "policy_loss": rng.normal(0, 0.1, n_runs * n_points),
        "value_loss": np.abs(rng.normal(1, 0.1, n_runs * n_points)),
        "explained_variance": rng.uniform(0, 1, n_runs * n_points),
        "grad_norm": np.abs(rng.normal(0.5, 0.1, n_runs * n_points)),
        "eval_return": evalr.ravel(),
    })
    return runs, curves


def _episode_length(env: str, ret: np.ndarray) -> np.ndarray:
    """Plausible mean episode lengths for returns ``ret`` of ``env``."""
    if env.startswith("CartPole"):  # +1 a step
        return np.clip(ret, 8, 500)
    if env in ("Acrobot-v1", "MountainCar-v0"):  # -1 a step until the goal
        return np.clip(-ret, 60, 500 if env == "Acrobot-v1" else 200)
    limit = {"Pendulum-v1": 200, "MountainCarContinuous-v0": 999}.get(env, 400)
    return np.full(ret.shape, float(limit))


def _cli(args: list[str], repeat: int) -> list[float]:
    """Wall seconds of ``python -m ARGS`` in a fresh process, ``repeat`` times."""
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", *args], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def _fmt(times: list[float]) -> str:
    if len(times) == 1:
        return f"{times[0]:.2f}"
    return f"{statistics.median(times):.2f} ({', '.join(f'{t:.2f}' for t in times)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--points", type=int, default=500)
    ap.add_argument("--tasks", type=int, default=1,
                    help=f"envs in the store (1: Synthetic-v0; 2..{len(TASKS)}: real env ids "
                         "with score references, and study.aggregate is timed too)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each command this many times and report the median")
    ap.add_argument("--keep", metavar="DIR", help="write the store and report here and keep them")
    args = ap.parse_args(argv)

    from study.report.build import build_report

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        root = make_store(base / "store", args.configs, args.seeds, args.points,
                          n_tasks=args.tasks)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = build_report(root, base / "report")
        total = time.perf_counter() - t0
        # The commands as a user runs them: a fresh interpreter, imports included.
        agg: dict[str, list[float]] = {}
        if args.tasks > 1:
            out = base / "aggregate"
            out.mkdir(exist_ok=True)
            agg["`python -m study.aggregate STORE` (the table)"] = _cli(
                ["study.aggregate", str(root)], args.repeat)
            agg["... `--figure` `--efficiency` (table, profiles, efficiency curves + CSV)"] = _cli(
                ["study.aggregate", str(root), "--figure", str(out / "profiles.png"),
                 "--efficiency", str(out / "efficiency.png")], args.repeat)
            agg["... `--figure` `--efficiency` `--importance` (all its outputs)"] = _cli(
                ["study.aggregate", str(root), "--figure", str(out / "profiles.png"),
                 "--efficiency", str(out / "efficiency.png"), "--importance"], args.repeat)
        cli = _cli(["study.report", str(root), "--out", str(base / "report")], args.repeat)

    n_runs = args.configs * args.seeds * args.tasks
    tasks = f" x {args.tasks} tasks" if args.tasks > 1 else ""
    print(f"## Analysis benchmark: {n_runs:,} runs x {args.points} curve points "
          f"({args.configs} configs{tasks} x {args.seeds} seeds)\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; synthetic store written in {t_make:.2f} s "
          "(not counted).\n")
    if args.tasks > 1:
        print("Envs: " + ", ".join(f"{e} ({TASKS[e][0]:,} steps)"
                                   for e in list(TASKS)[:args.tasks]) + ".\n")
    print("| stage | seconds |")
    print("|---|---:|")
    for stage, s in result.timings.items():
        print(f"| {stage} | {s:.2f} |")
    print(f"| **total (`build_report`, in process)** | **{total:.2f}** |")
    many = f", median of {args.repeat} (each run)" if args.repeat > 1 else ""
    print(f"\nFresh processes (interpreter start and imports included, as a user runs "
          f"them), wall seconds{many}:\n")
    print("| command | seconds |")
    print("|---|---:|")
    for what, times in agg.items():
        print(f"| {what} | {_fmt(times)} |")
    print(f"| `python -m study.report STORE` | {_fmt(cli)} |")
    worst = statistics.median(cli)
    if agg:
        both = statistics.median(list(agg.values())[-1]) + statistics.median(cli)
        print(f"| **aggregate (all outputs) + report** | **{both:.2f}** |")
        worst = both
    target = 30.0 if args.tasks > 1 else 20.0  # issue 13 (across tasks), issue 4 (one env)
    worst = max(total, worst)
    print(f"\n{'Within' if worst < target else 'OVER'} the {target:.0f} s target.")
    if result.notes:
        print("\nNotes: " + "; ".join(result.notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
