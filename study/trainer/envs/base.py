"""The interface every population environment implements.

A population environment simulates ``S`` members x ``E`` environments each. Arrays are
shaped ``[S, E, ...]``. Environments of one member are driven only by that member's
random streams, so a member's trajectory never depends on who else is in the population.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import gymnasium as gym
import numpy as np


@dataclass
class Step:
    """What one vectorized step returns.

    ``obs`` is the observation to act on next (already reset where an episode ended);
    ``final_obs`` is the true next observation, equal to ``obs`` except where an episode
    ended, where it holds the last observation of that episode (for bootstrapping on
    truncation). ``reward`` is float64; ``terminated``/``truncated`` are bool.
    """

    obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray
    #: Where the environment reports lives (ALE): which environments lost one this step.
    life_lost: np.ndarray | None = None


class PopulationEnv(Protocol):
    n_members: int
    n_envs: int
    observation_space: gym.spaces.Box  # of ONE environment (flat float32, or uint8 CHW)
    action_space: gym.spaces.Space  # of ONE environment: Discrete or Box

    def reset(self) -> np.ndarray:
        """Reset every environment; returns observations ``[S, E, *obs_shape]``: float32,
        or uint8 ``[C, H, W]`` images."""
        ...

    def step(self, actions: np.ndarray) -> Step:
        """Step with actions ``[S, E]`` (int64, Discrete) or ``[S, E, *act_shape]`` (float,
        Box, already clipped to the bounds); environments that end are reset automatically."""
        ...

    def close(self) -> None: ...
