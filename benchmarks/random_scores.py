"""Measure the random-policy scores shipped in ``study/analysis/scores.py``.

    python benchmarks/random_scores.py [--episodes 100] [--envs CartPole-v1 ...]

For each env: the mean return of ``--episodes`` episodes of the uniform random policy
(``action_space.sample()``), episode k reset with seed k and the action space seeded with
k, through ``gym.make`` with the registered time limit. Prints a Markdown table and the
Python dict to paste into ``study/analysis/scores.py``.
"""

from __future__ import annotations

import argparse
import warnings

import gymnasium as gym
import numpy as np

DEFAULT_ENVS = ("CartPole-v0", "CartPole-v1", "Acrobot-v1", "MountainCar-v0",
                "MountainCarContinuous-v0", "Pendulum-v1", "LunarLander-v3", "HalfCheetah-v5",
                "Hopper-v5", "Walker2d-v5", "Ant-v5")


def random_score(env_id: str, episodes: int) -> tuple[float, float]:
    """Mean and standard error of the random policy's return over ``episodes``."""
    env = gym.make(env_id)
    returns = []
    for k in range(episodes):
        env.reset(seed=k)
        env.action_space.seed(k)
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            total += float(r)
            done = term or trunc
        returns.append(total)
    env.close()
    x = np.asarray(returns)
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=list(DEFAULT_ENVS))
    p.add_argument("--episodes", type=int, default=100)
    args = p.parse_args()
    if args.episodes < 2:
        p.error("--episodes must be at least 2")
    warnings.simplefilter("ignore")
    rows = {}
    print("| env | random policy (mean return) | standard error |\n|---|---:|---:|")
    for env_id in args.envs:
        try:
            mean, se = random_score(env_id, args.episodes)
        except gym.error.Error as e:  # an extra that is not installed
            print(f"| {env_id} | skipped: {str(e).splitlines()[0]} | |")
            continue
        rows[env_id] = round(mean, 1)
        print(f"| {env_id} | {mean:.1f} | {se:.1f} |")
    print("\nRANDOM_SCORES =", rows)


if __name__ == "__main__":
    main()
