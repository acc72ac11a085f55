"""Env steps/s of a CartPole-v1 population in ONE process with one torch thread.

    python benchmarks/throughput.py [--sizes 1 8 64 256] [--seconds 8] [--repeats 3] [--no-sb3]

Default hyperparameters (SB3's A2C: 8 envs, 5-step rollouts, 64-64 tanh networks,
RMSprop). Each population size trains long enough to take a few seconds; SB3's A2C with the
same hyperparameters is measured in the same run for the speed-up column.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from study import config as cfg
from study.trainer.population import Member, train_population

try:
    from _sb3 import run_sb3_a2c, sb3_available
except ImportError:  # run as a module
    from benchmarks._sb3 import run_sb3_a2c, sb3_available


def population_rates(
    env_id: str, size: int, seconds: float, device: str, repeats: int
) -> tuple[list[float], int]:
    """Env steps/s of ``repeats`` timed runs of about ``seconds`` each (after a short
    calibration run, which also warms up compiled kernels and allocations)."""
    hp = cfg.resolve({})
    members = [Member(hp, s) for s in range(size)]
    t0 = time.perf_counter()
    train_population(env_id, members, 2000, log_every=10_000, device=device)
    rate = 2000 * size / (time.perf_counter() - t0)
    steps = max(4000, int(rate * seconds / size) // 40 * 40)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_population(env_id, members, steps, log_every=10_000, device=device)
        rates.append(steps * size / (time.perf_counter() - t0))
    return rates, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--seconds", type=float, default=8.0, help="target time per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per size (median shown)")
    p.add_argument("--sb3-steps", type=int, default=20_000)
    p.add_argument("--no-sb3", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.repeats < 1 or args.seconds <= 0 or min(args.sizes) < 1:
        p.error("--repeats and --sizes take integers >= 1, --seconds a number > 0")
    torch.set_num_threads(1)

    sb3_rate = None
    if not args.no_sb3 and sb3_available():
        sb3_rate = run_sb3_a2c(args.env, 0, args.sb3_steps, cfg.resolve({}))["steps_per_s"]
    rows = []
    for size in args.sizes:
        rates, steps = population_rates(args.env, size, args.seconds, args.device, args.repeats)
        rate = statistics.median(rates)
        rows.append(
            {
                "S": size,
                "steps_per_member": steps,
                "env_steps_per_s": rate,
                "runs_env_steps_per_s": rates,
                "speedup_vs_sb3": rate / sb3_rate if sb3_rate else None,
            }
        )

    print(f"# Throughput: {args.env}, default hyperparameters, 1 torch thread, {args.device}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print(f"Median of {args.repeats} timed runs per size; the range shows the machine's noise.\n")
    print("| population S | env steps/s (median) | range | vs SB3 A2C |")
    print("|---:|---:|---:|---:|")
    if sb3_rate:
        print(f"| SB3 A2C (1 run) | {sb3_rate:,.0f} | | 1.0x |")
    for r in rows:
        sp = f"{r['speedup_vs_sb3']:.1f}x" if r["speedup_vs_sb3"] else "n/a"
        lo, hi = min(r["runs_env_steps_per_s"]), max(r["runs_env_steps_per_s"])
        print(f"| {r['S']} | {r['env_steps_per_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | {sp} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sb3_steps_per_s": sb3_rate, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
