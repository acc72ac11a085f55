"""Score references for normalising returns across environments.

A normalised score is ``(return - low) / (high - low)``: 0 is a uniformly random policy, 1
is the environment's documented "solved" level, so scores of different tasks can be
aggregated (rliable's IQM, optimality gap, performance profiles). A sweep's
``[normalize]`` table overrides these per env; envs without either have no normalised
score (and study.aggregate says so).

* ``low``, :data:`RANDOM_SCORES`: measured here by ``benchmarks/random_scores.py``, the mean
  return of 100 episodes of ``action_space.sample()`` (episode k reset with seed k), with
  the registered time limits of gymnasium 1.4.
* ``high``, :data:`SOLVED_SCORES`: gymnasium's ``reward_threshold`` of the registered env
  spec, the level its documentation calls solved; Pendulum-v1 has none, and we use 0, the
  upper bound of its reward (every step costs ``theta^2 + 0.1 thdot^2 + 0.001 u^2 >= 0``).
"""

from __future__ import annotations

__all__ = ["RANDOM_SCORES", "REFERENCES", "SOLVED_SCORES"]

RANDOM_SCORES: dict[str, float] = {
    "CartPole-v0": 25.0,
    "CartPole-v1": 25.0,
    "Acrobot-v1": -500.0,
    "MountainCar-v0": -200.0,
    "MountainCarContinuous-v0": -33.3,
    "Pendulum-v1": -1197.2,
    "LunarLander-v3": -191.0,
    "HalfCheetah-v5": -267.7,
    "Hopper-v5": 17.0,
    "Ant-v5": -47.5,
}

SOLVED_SCORES: dict[str, float] = {
    "CartPole-v0": 195.0,
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "MountainCar-v0": -110.0,
    "MountainCarContinuous-v0": 90.0,
    "Pendulum-v1": 0.0,
    "LunarLander-v3": 200.0,
    "HalfCheetah-v5": 4800.0,
    "Hopper-v5": 3800.0,
    "Ant-v5": 6000.0,
}

#: ``env id -> (low, high)`` for every env with both references.
REFERENCES: dict[str, tuple[float, float]] = {
    env: (RANDOM_SCORES[env], SOLVED_SCORES[env]) for env in RANDOM_SCORES
    if env in SOLVED_SCORES
}
