"""The classic suite per env: our population against SB3 A2C on the same env, in one run.

    python benchmarks/suite_sb3.py [--sweep sweeps/classic_suite.toml] [--seconds 3]
        [--repeats 3] [--sb3-steps 10000] [--json FILE]

For each env of the sweep: env steps/s of the population the suite itself trains there
(every config of its grid x every seed, with the env's overrides: 4 x 10 = 40 members,
one torch thread, as ``python -m study.grid`` runs it), and of Stable-Baselines3's A2C
(the usual one run, ``num_envs`` environments, the suite's first config) on the same env.
The two are interleaved, ``--repeats`` times, and each column is the median; the ratio is
of the medians. Our population runs for about ``--seconds`` per timed run (its budget is
calibrated once per env, untimed, which also compiles the kernels); SB3 trains
``--sb3-steps`` env steps per run. The share of our training time spent in the
environments is reported too (the rest is the learner). Where envpool is installed, the
same population also trains on ``envpool:<env>`` (study/trainer/envs/envpool_backend.py: one
envpool per member), timed the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from study.sweeps.spec import load_sweep
from study.trainer.population import Member

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sb3 import run_sb3_a2c, sb3_available  # noqa: E402
from envs import timed_run  # noqa: E402


def suite_members(sweep_path: str, env: str) -> list[Member]:
    """The members of ``env``'s population in the suite: every config x every seed."""
    sweep = load_sweep(sweep_path)
    return [Member(hp, seed) for hp in sweep.configs(env) for seed in sweep.seeds]


def envpool_id(env: str) -> str | None:
    """``envpool:<env>``, registered, where envpool is installed and has the task."""
    try:
        from study.trainer.envs.envpool_backend import register

        register(f"envpool:{env}")
    except Exception:  # not installed, or no such task: no envpool column
        return None
    return f"envpool:{env}"


def _steps(env: str, members: list[Member], seconds: float) -> int:
    """Env steps per member for a timed run of about ``seconds`` (untimed calibration,
    which also compiles the kernels)."""
    n_batch = members[0].hyperparameters["num_envs"] * members[0].hyperparameters["n_steps"]
    rate, _ = timed_run(env, members, 4 * n_batch)
    rate, _ = timed_run(env, members, max(4 * n_batch, int(rate * 0.5 / len(members))))
    return max(4 * n_batch, int(rate * seconds / len(members)) // n_batch * n_batch)


def measure(sweep_path: str, env: str, seconds: float, repeats: int,
            sb3_steps: int) -> dict[str, object]:
    """Interleaved timed runs of our population (and on envpool) and of SB3 A2C on
    ``env``."""
    members = suite_members(sweep_path, env)
    steps = _steps(env, members, seconds)
    pool = envpool_id(env)
    pool_steps = _steps(pool, members, seconds) if pool else 0
    ours: list[tuple[float, float]] = []
    pooled: list[tuple[float, float]] = []
    sb3: list[float] = []
    for _ in range(repeats):
        ours.append(timed_run(env, members, steps))
        if pool:
            pooled.append(timed_run(pool, members, pool_steps))
        if sb3_available():
            sb3.append(run_sb3_a2c(env, 0, sb3_steps, dict(members[0].hyperparameters))[
                "steps_per_s"])
    row: dict[str, object] = {
        "env": env, "members": len(members), "steps_per_member": steps,
        "ours_steps_per_s": statistics.median(r[0] for r in ours),
        "ours_env_share": statistics.median(r[1] for r in ours),
        "ours_runs": [r[0] for r in ours],
        "envpool_steps_per_s": statistics.median(r[0] for r in pooled) if pooled else None,
        "envpool_env_share": statistics.median(r[1] for r in pooled) if pooled else None,
        "envpool_runs": [r[0] for r in pooled],
        "sb3_steps_per_s": statistics.median(sb3) if sb3 else None,
        "sb3_runs": sb3,
    }
    return row


def table(rows: list[dict[str, object]], args: argparse.Namespace, wall: float) -> str:
    """The Markdown report of the rows."""
    lines = [
        f"# Classic suite per env: our population vs SB3 A2C ({args.sweep}); median of "
        f"{args.repeats} interleaved runs, 1 torch thread",
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"whole run {wall:.0f} s",
        "",
        "| env | population | ours (env steps/s) | SB3 A2C (env steps/s) | ours / SB3 | "
        "env share of our time | ours on envpool | envpool / ours | envpool env share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, sb3, pool = float(r["ours_steps_per_s"]), r["sb3_steps_per_s"], \
            r["envpool_steps_per_s"]
        sb3_cols = f"{float(sb3):,.0f} | {ours / float(sb3):.0f}x" if sb3 else "n/a | n/a"
        pool_cols = (f"{float(pool):,.0f} | {float(pool) / ours:.2f}x | "
                     f"{float(r['envpool_env_share']):.0%}" if pool else "n/a | n/a | n/a")
        lines.append(f"| {r['env']} | {r['members']} x {r['steps_per_member']:,} steps | "
                     f"{ours:,.0f} | {sb3_cols} | {float(r['ours_env_share']):.0%} | "
                     f"{pool_cols} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", default="sweeps/classic_suite.toml")
    p.add_argument("--envs", nargs="+", help="a subset of the sweep's envs")
    p.add_argument("--seconds", type=float, default=3.0, help="target time per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    p.add_argument("--sb3-steps", type=int, default=10_000)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.repeats < 1 or args.seconds <= 0 or args.sb3_steps < 1:
        p.error("--repeats and --sb3-steps take integers >= 1, --seconds a number > 0")
    if not sb3_available():
        print("note: stable-baselines3 is not installed (pip install -e '.[bench]'): "
              "SB3 columns are n/a", file=sys.stderr)
    torch.set_num_threads(1)
    envs = args.envs or list(load_sweep(args.sweep).envs)
    t0 = time.perf_counter()
    rows = []
    for env in envs:
        rows.append(measure(args.sweep, env, args.seconds, args.repeats, args.sb3_steps))
        print(f"{env}: done", file=sys.stderr, flush=True)
    print(table(rows, args, time.perf_counter() - t0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
