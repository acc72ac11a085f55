"""Classic-control ports against the generic gymnasium path and SB3 A2C, in one process.

    python benchmarks/envs.py [--envs Acrobot-v1 Pendulum-v1 ...] [--size 64] [--seconds 4]
        [--repeats 3] [--sb3-steps 20000] [--json FILE]

For each env: env steps/s of an S-member population (default hyperparameters, one torch
thread) on the port and on the generic path (``study.trainer.envs.generic_only``: one seeded
``gym.make`` per environment, what every env used before its port), interleaved, median
of ``--repeats``; the share of training time spent stepping and resetting environments on
each; and SB3's A2C with the same hyperparameters on the same env, in the same run. Both
paths give bit-identical results (tests/test_classic_envs.py); only the time differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Sequence

import torch

import study.trainer.population as population
from study import config as cfg
from study.trainer.envs import generic_only, make_population_env
from study.trainer.population import Member, train_population

try:
    from _sb3 import run_sb3_a2c, sb3_available
except ImportError:  # run as a module
    from benchmarks._sb3 import run_sb3_a2c, sb3_available

DEFAULT_ENVS = ("Acrobot-v1", "Pendulum-v1", "MountainCar-v0", "MountainCarContinuous-v0")


class _TimedEnv:
    """A population env whose ``reset`` and ``step`` add their wall time to ``clock``."""

    def __init__(self, env: object, clock: list[float]) -> None:
        self._env, self._clock = env, clock

    def reset(self):  # noqa: ANN201
        t0 = time.perf_counter()
        try:
            return self._env.reset()
        finally:
            self._clock[0] += time.perf_counter() - t0

    def step(self, actions):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        try:
            return self._env.step(actions)
        finally:
            self._clock[0] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)


def timed_run(env_id: str, members: Sequence[Member], steps: int) -> tuple[float, float]:
    """``(env steps/s, share of the wall time spent in the environments)`` of one run."""
    clock = [0.0]

    def make(*args: object, **kwargs: object) -> _TimedEnv:
        return _TimedEnv(make_population_env(*args, **kwargs), clock)  # type: ignore[arg-type]

    real = population.make_population_env
    population.make_population_env = make
    try:
        t0 = time.perf_counter()
        train_population(env_id, members, steps, log_every=10**9)
        wall = time.perf_counter() - t0
    finally:
        population.make_population_env = real
    return steps * len(members) / wall, clock[0] / wall


def measure(env_id: str, size: int, seconds: float, repeats: int) -> dict[str, object]:
    members = [Member(cfg.resolve({}), s) for s in range(size)]
    steps: dict[str, int] = {}
    for path in ("port", "generic"):  # calibration: about `seconds` per timed run
        with generic_only(env_id) if path == "generic" else contextlib.nullcontext():
            rate, _ = timed_run(env_id, members, 2000)
        steps[path] = max(2000, int(rate * seconds / size) // 40 * 40)
    runs: dict[str, list[tuple[float, float]]] = {"port": [], "generic": []}
    for _ in range(repeats):  # interleaved: the machine's drift hits both alike
        for path in ("generic", "port"):
            with generic_only(env_id) if path == "generic" else contextlib.nullcontext():
                runs[path].append(timed_run(env_id, members, steps[path]))
    out: dict[str, object] = {"env": env_id, "S": size}
    for path, rs in runs.items():
        out[f"{path}_steps_per_s"] = statistics.median(r[0] for r in rs)
        out[f"{path}_env_share"] = statistics.median(r[1] for r in rs)
        out[f"{path}_runs"] = [r[0] for r in rs]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=list(DEFAULT_ENVS))
    p.add_argument("--size", type=int, default=64, help="population size S")
    p.add_argument("--seconds", type=float, default=4.0, help="target time per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--sb3-steps", type=int, default=20_000)
    p.add_argument("--no-sb3", action="store_true")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.repeats < 1 or args.seconds <= 0 or args.size < 1 or args.sb3_steps < 1:
        p.error("--repeats, --size and --sb3-steps take integers >= 1, --seconds a number > 0")
    torch.set_num_threads(1)
    rows = []
    for env_id in args.envs:
        row = measure(env_id, args.size, args.seconds, args.repeats)
        row["sb3_steps_per_s"] = None
        if not args.no_sb3 and sb3_available():
            row["sb3_steps_per_s"] = run_sb3_a2c(env_id, 0, args.sb3_steps,
                                                 cfg.resolve({}))["steps_per_s"]
        rows.append(row)
        print(f"{env_id}: done", flush=True)

    print(f"\n# Classic-control ports: S = {args.size}, default hyperparameters, 1 torch "
          f"thread; median of {args.repeats} interleaved runs")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    print("| env | generic path (before) | port (after) | after / before | SB3 A2C | "
          "after / SB3 | env share before | env share after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        before, after, sb3 = r["generic_steps_per_s"], r["port_steps_per_s"], r["sb3_steps_per_s"]
        sb3_cols = f"{sb3:,.0f} | {after / sb3:.0f}x" if sb3 else "n/a | n/a"
        print(f"| {r['env']} | {before:,.0f} | {after:,.0f} | {after / before:.1f}x | "
              f"{sb3_cols} | {r['generic_env_share']:.0%} | {r['port_env_share']:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
