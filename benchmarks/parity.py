"""Learning parity with Stable-Baselines3: 16 seeds, CartPole-v1, 100k steps, matched A2C.

    python benchmarks/parity.py [--seeds 16] [--steps 100000] [--n-jobs 2]

Reports median and IQR of final_return (mean return of training episodes finished in the
last 10% of steps) for SB3's A2C (one run per seed, joblib) and for ours (one population).
Ours must not learn worse.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from joblib import Parallel, delayed

from study import config as cfg
from study.trainer.population import Member, train_population

try:
    from _sb3 import run_sb3_a2c
except ImportError:
    from benchmarks._sb3 import run_sb3_a2c


def _summary(x: np.ndarray) -> str:
    q25, med, q75 = np.nanpercentile(x, [25, 50, 75])
    return f"{med:.1f} | [{q25:.1f}, {q75:.1f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    torch.set_num_threads(1)
    hp = cfg.resolve(cfg.parse_set(args.set))

    t0 = time.perf_counter()
    ours = train_population(
        args.env, [Member(hp, s) for s in range(args.seeds)], args.steps, log_every=args.steps // 20
    )
    ours_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    sb3 = Parallel(n_jobs=args.n_jobs)(
        delayed(run_sb3_a2c)(args.env, s, args.steps, hp) for s in range(args.seeds)
    )
    sb3_wall = time.perf_counter() - t0
    ours_final = np.array([r.final_return for r in ours])
    sb3_final = np.array([r["final_return"] for r in sb3])

    print(f"# Parity: {args.env}, {args.seeds} seeds x {args.steps:,} steps, A2C defaults\n")
    print("| implementation | median final_return | IQR | wall (s) |")
    print("|---|---:|---:|---:|")
    print(f"| SB3 A2C (joblib, {args.n_jobs} jobs) | {_summary(sb3_final)} | {sb3_wall:.0f} |")
    print(f"| study (one population) | {_summary(ours_final)} | {ours_wall:.0f} |")
    verdict = np.nanmedian(ours_final) >= np.nanmedian(sb3_final) - 0.1 * abs(
        np.nanmedian(sb3_final)
    )
    print(f"\nours learns at least as well (median within 10% or better): {verdict}")


if __name__ == "__main__":
    main()
