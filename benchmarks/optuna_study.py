"""Benchmark: a seed-robust Optuna study with ``study.sweeps.optuna`` vs the rl-zoo way.

    python benchmarks/optuna_study.py                          # 40 trials x 5 seeds x 50k
    python benchmarks/optuna_study.py --trials 12 --steps 20000 --sb3-runs 2   # smaller
    python benchmarks/optuna_study.py --skip-sb3               # only study.optuna

``study.sweeps.optuna``: a CartPole-v1 study of ``--trials`` trials, each trained on ``--seeds``
tuning seeds for ``--steps`` env steps (default 40 x 5 x 50k = 10M env steps), TPE over
policy_lr, value_lr, gamma and lambda, batches of ``64 // seeds`` trials trained as one
population, in one process (``--n-jobs 1``) unless asked otherwise. It runs through
``study.sweeps.optuna.main`` into a temporary directory and is timed end to end (Optuna, the
journal file and the Parquet store included). No pruner by default, so every seed-run
trains its full budget and the seed-run counts compare like with like.

The rl-zoo way (rl-baselines3-zoo's ``--optimize``): one stable-baselines3 A2C run per
trial, one seed, trials one after another in one process. It is timed on ``--sb3-runs``
runs with configs of the study's first trials (same env, budget, n_envs=8, n_steps=5,
64-64 tanh networks, RMSprop) and extrapolated linearly to the study's trial count.
Without stable-baselines3 (``pip install -e ".[bench]"``), our own trainer with a
population of one stands in for it (``--baseline single``).

Prints Markdown-ready figures: wall time, trials/minute, seed-runs/minute and the
speed-up in seed-runs/minute (target: >= 20x).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(p))

SWEEP = """\
name = "bench-optuna"
env = "CartPole-v1"
total_steps = {steps}
log_every = {log_every}
seeds = {{ count = {seeds}, base = 1000 }}
[hyperparameters]
num_envs = 8
[optuna]
n_trials = {trials}
seeds_per_trial = {seeds}
objective = "iqm"
metric = "final_return"
sampler = "tpe"
pruner = "{pruner}"
trials_per_batch = {batch}
[optuna.space]
policy_lr = {{ low = 1e-4, high = 1e-1, log = true }}
value_lr = {{ low = 1e-4, high = 1e-1, log = true }}
gamma = {{ choices = [0.99, 0.995, 0.999] }}
lam = {{ low = 0.8, high = 1.0 }}
"""


def bench_study(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import pandas as pd

    from study import store
    from study.sweeps.optuna import main

    sweep = tmp / "bench_optuna.toml"
    batch = args.batch_size or max(1, 64 // args.seeds)
    sweep.write_text(SWEEP.format(steps=args.steps, log_every=min(1000, args.steps),
                                  seeds=args.seeds, trials=args.trials, pruner=args.pruner,
                                  batch=batch))
    out = tmp / "out"
    argv = [str(sweep), "--out", str(out), "--n-jobs", str(args.n_jobs), "--quiet"]
    t0, c0 = time.perf_counter(), _cpu_s()
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the figures
        rc = main(argv)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    if rc != 0:
        raise SystemExit(f"study.optuna exited with {rc}")
    trials = pd.read_parquet(out / "trials.parquet")
    runs = store.load_runs(out)
    manifest = json.loads((out / "manifest.json").read_text())
    best = trials.loc[trials["value"].idxmax()] if trials["value"].notna().any() else None
    return {
        "wall_s": wall, "cpu_s": cpu, "trials": len(trials), "seed_runs": len(runs), "batch": batch,
        "env_steps": int(manifest.get("env_steps", 0)),
        "states": trials["state"].value_counts().to_dict(),
        "best_value": None if best is None else float(best["value"]),
        "best_params": None if best is None else {
            c[len("param_"):]: best[c] for c in trials.columns if c.startswith("param_")},
        "hyperparameters": [
            {c[len("param_"):]: r[c] for c in trials.columns if c.startswith("param_")}
            for _, r in trials.sort_values("number").iterrows()
        ],
    }


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (worker processes).

    On a machine shared with other work, wall time measures the neighbours too; CPU time
    of one single-threaded process does not, so both are reported.
    """
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _config(params: dict[str, Any]) -> dict[str, Any]:
    from study.config import resolve

    return resolve({"num_envs": 8, **params})


def bench_baseline(kind: str, configs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """One run per trial, sequentially, one seed each; returns per-run wall times."""
    import torch

    torch.set_num_threads(1)
    if kind == "sb3":
        import stable_baselines3  # noqa: F401  (import cost paid before timing)
    walls, cpus = [], []
    for i, hp in enumerate(configs):
        t0, c0 = time.perf_counter(), _cpu_s()
        if kind == "sb3":
            from _sb3 import run_sb3_a2c

            run_sb3_a2c("CartPole-v1", i, steps, hp)
        else:
            from study.trainer.population import Member, train_population

            train_population("CartPole-v1", [Member(hp, i)], steps, log_every=1000)
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    return {"kind": kind, "runs": len(walls), "per_run_s": walls, "per_run_cpu_s": cpus,
            "mean_run_s": sum(walls) / len(walls), "mean_run_cpu_s": sum(cpus) / len(cpus),
            "steps": steps}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=5, help="tuning seeds per trial")
    p.add_argument("--steps", type=int, default=50_000, help="env steps per run")
    p.add_argument("--n-jobs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=None,
                   help="trials per population batch (default 64 // seeds)")
    p.add_argument("--pruner", default="none", help="study pruner (default none)")
    p.add_argument("--baseline", choices=("sb3", "single"), default=None,
                   help="sb3 (default when installed) or our trainer with one member")
    p.add_argument("--sb3-runs", type=int, default=3, help="baseline runs timed (default 3)")
    p.add_argument("--sb3-steps", type=int, default=None,
                   help="env steps per baseline run (default --steps; the time is scaled)")
    p.add_argument("--skip-sb3", action="store_true", help="no baseline")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)

    from _sb3 import sb3_available

    baseline = args.baseline or ("sb3" if sb3_available() else "single")
    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}",
        "trials": args.trials, "seeds": args.seeds, "steps": args.steps,
        "n_jobs": args.n_jobs,
    }
    with tempfile.TemporaryDirectory(prefix="study-bench-optuna-") as tmp:
        print(f"study.optuna: {args.trials} trials x {args.seeds} seeds x {args.steps:,} "
              f"env steps ...", file=sys.stderr, flush=True)
        st = bench_study(args, Path(tmp))
    result["study"] = st
    sb = None
    if not args.skip_sb3:
        steps = args.sb3_steps or args.steps
        configs = [_config(h) for h in st["hyperparameters"][: args.sb3_runs]]
        print(f"baseline ({baseline}): {len(configs)} runs x {steps:,} env steps, one after "
              f"another ...", file=sys.stderr, flush=True)
        sb = bench_baseline(baseline, configs, steps)
        # Scale to the study's budget per run, then to its number of trials.
        sb["per_trial_s"] = sb["mean_run_s"] * args.steps / steps
        sb["extrapolated_s"] = sb["per_trial_s"] * args.trials
        sb["extrapolated_cpu_s"] = sb["mean_run_cpu_s"] * args.steps / steps * args.trials
        result["baseline"] = sb

    minutes = st["wall_s"] / 60
    ours_trials_min = st["trials"] / minutes
    ours_runs_min = st["seed_runs"] / minutes
    label = {"sb3": "SB3 A2C", "single": "study trainer, population of 1"}[baseline]
    lines = [
        f"### Optuna study: {args.trials} trials x {args.seeds} seeds x {args.steps:,} env "
        f"steps on CartPole-v1",
        "",
        f"Machine: {result['machine']}; study.optuna with --n-jobs {args.n_jobs}, "
        f"batches of {st['batch']} trials, pruner {args.pruner}.",
        "",
        "| method | trials | seed-runs | wall time | trials/min | seed-runs/min |",
        "|---|---:|---:|---:|---:|---:|",
        f"| study.optuna: {args.seeds} seeds/trial, batched populations (measured) | "
        f"{st['trials']} | {st['seed_runs']} | {_duration(st['wall_s'])} | "
        f"{ours_trials_min:,.1f} | {ours_runs_min:,.1f} |",
    ]
    if sb:
        sb_min = sb["extrapolated_s"] / 60
        sb_trials_min = args.trials / sb_min
        lines.append(
            f"| rl-zoo way: {label}, 1 run/trial, sequential (extrapolated from "
            f"{sb['runs']} x {sb['steps']:,} steps, {sb['mean_run_s']:.1f} s/run) | "
            f"{args.trials} | {args.trials} | {_duration(sb['extrapolated_s'])} | "
            f"{sb_trials_min:,.2f} | {sb_trials_min:,.2f} |")
        speedup = ours_runs_min / sb_trials_min
        result["speedup_seed_runs_per_min"] = speedup
        result["speedup_trials_per_min"] = ours_trials_min / sb_trials_min
        # The same ratio in CPU time: what it would be on an otherwise idle machine.
        cpu_speedup = (st["seed_runs"] / st["cpu_s"]) / (args.trials / sb["extrapolated_cpu_s"])
        result["speedup_seed_runs_per_cpu_min"] = cpu_speedup
        target = "meets" if speedup >= 20 else "misses"
        lines += ["",
                  f"**{speedup:,.0f}x more seed-runs per minute** of wall time ({target} the "
                  f">= 20x target), and {ours_trials_min / sb_trials_min:,.1f}x more trials "
                  f"per minute while judging each trial on {args.seeds} seeds instead of one.",
                  f"In CPU time (robust to other load on the machine): study.optuna "
                  f"{st['cpu_s'] / 60:.1f} CPU-min for {st['seed_runs']} seed-runs, the "
                  f"baseline {sb['mean_run_cpu_s']:.1f} CPU-s per run: **{cpu_speedup:,.0f}x** "
                  f"more seed-runs per CPU-minute."]
    lines += ["", f"Study: {st['env_steps']:,} env steps, trial states {st['states']}; best "
                  f"IQM of final_return {st['best_value']:.1f} with "
                  + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in (st["best_params"] or {}).items()) + "."]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
