"""PPO against Stable-Baselines3's PPO: learning parity and throughput, in one run.

    python benchmarks/ppo.py parity --env CartPole-v1 --seeds 16 --steps 50000
    python benchmarks/ppo.py parity --env InvertedPendulum-v5 --seeds 16 --steps 50000
    python benchmarks/ppo.py throughput --sizes 1 8 64 --steps 8192 --repeats 3

``parity``: our population (every seed one member, SB3's PPO defaults: one env, n_steps
2048, minibatches of 64, 10 epochs, Adam 3e-4, GAE 0.95, clip 0.2, [64, 64] tanh networks)
and SB3's PPO at its defaults, one run per seed, the same budget; median and IQR over seeds
of the final return (mean return of the episodes finished in the last 10% of each run's
steps, the same definition on both sides).

``throughput``: env steps/s of PPO populations of S members (one process, one thread) and
of SB3's PPO on the same env, interleaved, medians of ``--repeats``.
Results go to ``benchmarks/results/ppo_<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from study import config as cfg
from study.trainer.population import Member, train_population

RESULTS = Path(__file__).parent / "results"


def _sb3_ppo(env_id: str, seed: int, steps: int) -> dict:
    """One SB3 PPO run at its defaults (one env, MlpPolicy), 1 torch thread."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    env = make_vec_env(env_id, n_envs=1, seed=seed)
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - t0
    monitor = env.envs[0]
    lengths = np.cumsum(monitor.get_episode_lengths())
    returns = np.asarray(monitor.get_episode_rewards())
    final = returns[lengths > 0.9 * model.num_timesteps]
    env.close()
    return {"final_return": float(final.mean()) if final.size else float("nan"),
            "steps_per_s": model.num_timesteps / wall}


def _ours(env_id: str, seeds: list[int], steps: int) -> tuple[list[float], float]:
    hp = cfg.resolve({"algorithm": "ppo"}, env=env_id)
    t0 = time.perf_counter()
    runs = train_population(env_id, [Member(hp, s) for s in seeds], steps, log_every=steps)
    wall = time.perf_counter() - t0
    return [r.final_return for r in runs], len(seeds) * runs[0].env_steps / wall


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, float)
    q1, med, q3 = np.nanpercentile(v, [25, 50, 75])
    return {"median": med, "iqr": [q1, q3], "values": v.tolist()}


def parity(args: argparse.Namespace) -> dict:
    seeds = list(range(args.seeds))
    ours, ours_speed = _ours(args.env, seeds, args.steps)
    sb3 = [_sb3_ppo(args.env, s, args.steps) for s in seeds]
    out = {"env": args.env, "steps": args.steps, "seeds": args.seeds,
           "ours": {**_summary(ours), "steps_per_s": ours_speed},
           "sb3": {**_summary([r["final_return"] for r in sb3]),
                   "steps_per_s": statistics.median(r["steps_per_s"] for r in sb3)}}
    o, s = out["ours"], out["sb3"]
    print(f"{args.env}, {args.seeds} seeds x {args.steps:,} steps: ours median "
          f"{o['median']:.1f} IQR [{o['iqr'][0]:.1f}, {o['iqr'][1]:.1f}]; SB3 median "
          f"{s['median']:.1f} IQR [{s['iqr'][0]:.1f}, {s['iqr'][1]:.1f}]")
    return out


def throughput(args: argparse.Namespace) -> dict:
    hp = cfg.resolve({"algorithm": "ppo"}, env=args.env)
    train_population(args.env, [Member(hp, 0)], 2048, log_every=2048)  # compile, warm up
    ours: dict[int, list[float]] = {s: [] for s in args.sizes}
    sb3: list[float] = []
    for _ in range(args.repeats):
        for s in args.sizes:
            _, speed = _ours(args.env, list(range(s)), args.steps)
            ours[s].append(speed)
        sb3.append(_sb3_ppo(args.env, 0, args.steps)["steps_per_s"])
    base = statistics.median(sb3)
    print(f"PPO on {args.env}: SB3 {base:,.0f} env steps/s (median of {args.repeats})")
    print("| S | env steps/s | x SB3 |\n|---:|---:|---:|")
    rows = []
    for s in args.sizes:
        med = statistics.median(ours[s])
        rows.append({"S": s, "steps_per_s": med, "runs": ours[s], "ratio": med / base})
        print(f"| {s} | {med:,.0f} | {med / base:.1f}x |")
    return {"env": args.env, "sb3": base, "sb3_runs": sb3, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("parity", "throughput"))
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=50_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = parity(args) if args.mode == "parity" else throughput(args)
    RESULTS.mkdir(exist_ok=True)
    stem = args.env.replace("/", "_") if args.mode == "parity" else "throughput"
    out = RESULTS / f"ppo_{args.mode}_{stem}.json"
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
