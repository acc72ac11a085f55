"""Benchmark: the whole CartPole grid with ``study.grid`` vs the usual way (SB3, one run per task).

    python benchmarks/sweep.py                      # full grid + SB3 subset, n_jobs=2
    python benchmarks/sweep.py --skip-sb3           # only the grid
    python benchmarks/sweep.py --sb3-runs 4 --sb3-steps 50000

The grid (``sweeps/cartpole_grid.toml``: 36 configs x 5 seeds x 100k env steps = 18M env
steps) runs through ``study.sweeps.grid.main`` into a temporary directory, timed end to end
(worker start-up, training and writing the store included).

"The usual way" is one stable-baselines3 A2C run per joblib task with the same n_jobs and,
as far as SB3 allows, the same hyperparameters: n_envs=8, n_steps=5, gamma, gae_lambda,
RMSprop, max_grad_norm, vf_coef 0.5, separate 64-64 tanh policy and value networks. SB3
has one optimizer and learning rate for both networks, so it gets the config's policy_lr.
It is timed on a small subset of the grid's runs (in warm workers, so start-up is not
multiplied) and extrapolated linearly to the grid's env steps: ``wall x 18M / subset steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def _sb3_run(env_id: str, hp: dict[str, Any], seed: int, steps: int) -> tuple[float, float]:
    """Train one SB3 A2C run in a worker; returns its training (wall, CPU) seconds."""
    from benchmarks._sb3 import run_sb3_a2c

    r = run_sb3_a2c(env_id, seed, steps, hp)
    return r["wall_s"], r["cpu_s"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _warm(_: int) -> int:
    import stable_baselines3  # noqa: F401  (import cost paid before timing)
    import torch  # noqa: F401

    return os.getpid()


def bench_study(sweep: Path, n_jobs: int, population_size: int) -> dict[str, Any]:
    from study import store
    from study.sweeps.grid import main

    with tempfile.TemporaryDirectory(prefix="study-bench-") as tmp:
        out = Path(tmp) / "out"
        argv = [str(sweep), "--out", str(out), "--n-jobs", str(n_jobs), "--quiet",
                "--population-size", str(population_size)]
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)  # no stale workers in the CPU count
        t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
        rc = main(argv)
        wall = time.perf_counter() - t0
        # Stop the workers so their CPU time is accounted to us (RUSAGE_CHILDREN counts
        # reaped children only): CPU seconds do not depend on what else the machine runs.
        get_reusable_executor().shutdown(wait=True)
        cpu = time.process_time() - c0 + _children_cpu() - k0
        if rc != 0:
            raise SystemExit(f"study.grid exited with {rc}")
        manifest = json.loads((out / "manifest.json").read_text())
        runs = store.load_runs(out)
        best = runs.groupby("config_id")["final_return"].median().max()
    return {"wall_s": wall, "cpu_s": cpu, "env_steps": manifest["env_steps"], "runs": len(runs),
            "best_median_final_return": float(best),
            "statuses": runs["status"].value_counts().to_dict()}


def bench_sb3(sweep: Path, n_jobs: int, n_runs: int, steps: int) -> dict[str, Any]:
    from joblib import Parallel, delayed

    from study.sweeps.spec import load_sweep

    s = load_sweep(sweep)
    runs = s.runs()[:n_runs]
    parallel = Parallel(n_jobs=n_jobs, backend="loky")
    parallel(delayed(_warm)(i) for i in range(n_jobs))  # start and warm the workers
    t0 = time.perf_counter()
    timings = parallel(delayed(_sb3_run)(s.env, dict(r.hyperparameters), r.seed, steps)
                       for r in runs)
    wall = time.perf_counter() - t0
    total = n_runs * steps
    cpu = sum(c for _, c in timings)
    return {"wall_s": wall, "cpu_s": cpu, "env_steps": total, "per_run": timings,
            "extrapolated_s": wall * s.env_steps / total,
            "extrapolated_cpu_s": cpu * s.env_steps / total, "grid_env_steps": s.env_steps}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", type=Path, default=ROOT / "sweeps" / "cartpole_grid.toml")
    p.add_argument("--n-jobs", type=int, default=2)
    # 90, not study.grid's default 64: the grid's 180 runs then make 2 populations, one per
    # worker, instead of 3 (60 each), where the third leaves a core idle for a third of the
    # time at n_jobs=2. Chunking never depends on n_jobs, so the benchmark picks it.
    p.add_argument("--population-size", type=int, default=90,
                   help="most runs per population (default 90 = 180 runs / 2 workers)")
    p.add_argument("--sb3-runs", type=int, default=2, help="SB3 runs timed (default 2)")
    p.add_argument("--sb3-steps", type=int, default=20_000, help="env steps per SB3 run")
    p.add_argument("--skip-sb3", action="store_true")
    p.add_argument("--skip-study", action="store_true")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)

    from study.sweeps.spec import load_sweep

    sweep = load_sweep(args.sweep)
    result: dict[str, Any] = {
        "sweep": str(args.sweep), "n_jobs": args.n_jobs, "load": os.getloadavg(),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    if not args.skip_study:
        print(f"running {sweep.n_runs} runs x {sweep.total_steps:,} steps with study.grid "
              f"(n_jobs={args.n_jobs}) ...", file=sys.stderr, flush=True)
        result["study"] = bench_study(args.sweep, args.n_jobs, args.population_size)
    if not args.skip_sb3:
        print(f"timing {args.sb3_runs} SB3 A2C runs x {args.sb3_steps:,} steps "
              f"(n_jobs={args.n_jobs}) ...", file=sys.stderr, flush=True)
        result["sb3"] = bench_sb3(args.sweep, args.n_jobs, args.sb3_runs, args.sb3_steps)

    lines = [
        f"### {sweep.name}: {sweep.n_configs} configs x {len(sweep.seeds)} seeds x "
        f"{sweep.total_steps:,} env steps = {sweep.env_steps:,} env steps, n_jobs={args.n_jobs}",
        "",
        f"Machine: {result['machine']}.",
        "",
        "| method | wall time | env steps/s | CPU time | env steps per CPU-s |",
        "|---|---:|---:|---:|---:|",
    ]
    st, sb = result.get("study"), result.get("sb3")
    full = sweep.name == "cartpole-grid"  # the targets are stated for the full grid
    if st:
        lines.append(f"| study.grid, populations of <= {args.population_size} "
                     f"(whole grid, measured) | {_duration(st['wall_s'])} | "
                     f"{st['env_steps'] / st['wall_s']:,.0f} | {_duration(st['cpu_s'])} | "
                     f"{st['env_steps'] / st['cpu_s']:,.0f} |")
    if sb:
        lines.append(f"| SB3 A2C, one run per joblib task (extrapolated from {args.sb3_runs} x "
                     f"{args.sb3_steps:,} steps in {sb['wall_s']:.1f} s) | "
                     f"{_duration(sb['extrapolated_s'])} | "
                     f"{sb['env_steps'] / sb['wall_s']:,.0f} | "
                     f"{_duration(sb['extrapolated_cpu_s'])} | "
                     f"{sb['env_steps'] / sb['cpu_s']:,.0f} |")
    lines.append("")
    lines.append(f"Load average before/after: {result['load'][0]:.2f} / "
                 f"{os.getloadavg()[0]:.2f} (wall times count other processes' use of "
                 f"the cores; CPU times do not).")
    lines.append("")
    if st:
        lines.append(f"study.grid: {st['runs']} runs stored ({st['statuses']}); best config's "
                     f"median final_return {st['best_median_final_return']:.1f}.")
        lines.append(f"Whole grid in {st['wall_s']:.1f} s"
                     + (f" ({'meets' if st['wall_s'] < 60 else 'misses'} the < 60 s target)."
                        if full else "."))
    if st and sb:
        speedup = sb["extrapolated_s"] / st["wall_s"]
        result["speedup"] = speedup
        target = f" ({'meets' if speedup >= 50 else 'misses'} the >= 50x target)" if full else ""
        cpu_speedup = sb["extrapolated_cpu_s"] / st["cpu_s"]
        result["cpu_speedup"] = cpu_speedup
        lines.append(f"**Speed-up: {speedup:,.0f}x** in wall time over one SB3 run per task"
                     f"{target}; {cpu_speedup:,.0f}x in CPU time.")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
