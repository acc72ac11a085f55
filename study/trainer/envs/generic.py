"""Population environment for any gymnasium id: ``S x E`` ``gym.make`` instances.

Slow compared with the NumPy CartPole/SwingUp, but works for every environment with a
Box observation space and a Discrete or Box action space. Each instance is seeded once,
with a seed derived from ``(member seed, env index, stream)``, and then keeps its own
RNG across resets, so a member's environments never depend on the other members.
Autoreset is done here (not by a gymnasium vector env) so the semantics are exactly
those of :class:`study.trainer.envs.base.Step` whatever gymnasium's autoreset mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from study.config import ConfigError
from study.trainer.envs.base import Step
from study.trainer.rng import STREAM_RESET


def check_spaces(env_id: str, observation_space: gym.Space, action_space: gym.Space) -> None:
    """ConfigError naming the space unless observations are Box and actions Discrete/Box."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ConfigError(
            f"environment {env_id!r} has observation space {observation_space}; "
            "only Box observation spaces are supported"
        )
    if not isinstance(action_space, gym.spaces.Discrete | gym.spaces.Box):
        raise ConfigError(
            f"environment {env_id!r} has action space {action_space}; "
            "only Discrete and Box action spaces are supported"
        )


def flat_box(space: gym.spaces.Box) -> gym.spaces.Box:
    """``space`` flattened to 1-D float32 (how the population env reports observations)."""
    return gym.spaces.Box(
        space.low.reshape(-1).astype(np.float32),
        space.high.reshape(-1).astype(np.float32),
        dtype=np.float32,
    )


#: Environments whose reset seeds must fit in fewer bits than 63, by id namespace
#: (MinAtar seeds a ``numpy.random.RandomState``: 32 bits).
SEED_BITS: dict[str, int] = {"MinAtar": 32}


def seed_bits(env_id: str) -> int:
    """How many bits the reset seeds of ``env_id`` may have (63 unless it is known to take
    fewer)."""
    return SEED_BITS.get(env_id.split("/", 1)[0] if "/" in env_id else "", 63)


def instance_seed(member_seed: int, env_index: int, stream: int, bits: int = 63) -> int:
    """Seed for ``reset(seed=...)`` of environment ``env_index`` of a member: the top
    ``bits`` bits of one 64-bit draw of the SeedSequence of ``(member seed, stream, env
    index)``, so narrower seeds are still a function of that member and env alone."""
    ss = np.random.SeedSequence(entropy=int(member_seed), spawn_key=(int(stream), int(env_index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(64 - bits))


def _warn_once(caught: Sequence[warnings.WarningMessage]) -> None:
    """Re-issue each distinct warning of the instances once (a deprecation notice of
    Hopper-v4, say, is printed by every one of its 512 instances otherwise)."""
    seen: set[tuple[type, str]] = set()
    for w in caught:
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def population_space(space: gym.spaces.Box) -> gym.spaces.Box:
    """How a population env reports one environment's observations: images (uint8
    ``[C, H, W]``, see study.trainer.envs.images) as they are, anything else flattened to
    float32."""
    return space if space.dtype == np.uint8 and len(space.shape) == 3 else flat_box(space)


class GymPopulationEnv:
    """``S x E`` gymnasium environments (with their registered ``TimeLimit``) in a loop.

    Observations are ``[S, E, obs_dim]`` float32, or ``[S, E, C, H, W]`` uint8 for images
    (see :func:`population_space`). Discrete actions arrive as ``[S, E]`` indices
    ``0..n-1`` (the space's ``start`` is added here); Box actions as ``[S, E, *shape]``,
    cast to the space's dtype. Environments that report ``lives`` (ALE) also report, per
    step, which ones lost a life (``Step.life_lost``).
    """

    def __init__(
        self,
        env_id: str,
        seeds: Sequence[int],
        num_envs: int,
        stream: int = STREAM_RESET,
        make: Callable[[], gym.Env] | None = None,
    ) -> None:
        if len(seeds) == 0 or num_envs < 1:
            raise ValueError("need at least one seed and num_envs >= 1")
        self.env_id = env_id
        self.n_members = len(seeds)
        self.n_envs = int(num_envs)
        make = make or (lambda: gym.make(env_id))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = make()
            single_obs: Any = first.observation_space
            single_act = first.action_space
            try:
                check_spaces(env_id, single_obs, single_act)
            except ConfigError:
                first.close()
                raise
            others = [make() for _ in range(self.n_members * self.n_envs - 1)]
        _warn_once(caught)
        self.envs: list[gym.Env] = [first, *others]
        self.single_observation_space: gym.spaces.Box = single_obs
        self.observation_space = population_space(single_obs)
        self.action_space = single_act
        bits = seed_bits(env_id)
        self._seeds = [instance_seed(seed, e, stream, bits)
                       for seed in seeds for e in range(self.n_envs)]
        self._seeded = False
        self._stepped = False
        space = self.observation_space
        self._obs = np.zeros((self.n_members * self.n_envs, *space.shape), dtype=space.dtype)
        self._lives = np.zeros(len(self.envs), dtype=np.int64)

    def _shape(self, flat: np.ndarray) -> np.ndarray:
        return flat.reshape(self.n_members, self.n_envs, *flat.shape[1:])

    def _as_obs(self, obs: Any) -> np.ndarray:
        return np.asarray(obs, dtype=self._obs.dtype).reshape(self._obs.shape[1:])

    def _reset_one(self, i: int) -> np.ndarray:
        # Seed only the first reset: afterwards each env continues its own RNG.
        seed = None if self._seeded else self._seeds[i]
        obs, info = self.envs[i].reset(seed=seed)
        self._lives[i] = info.get("lives", 0)
        return self._as_obs(obs)

    def reset(self) -> np.ndarray:
        """Reset every environment; ``[S, E, *obs_shape]``."""
        # gymnasium's env checker warns on each instance's first reset and step: once here.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(len(self.envs)):
                self._obs[i] = self._reset_one(i)
        _warn_once(caught)
        self._seeded = True
        self._stepped = False
        return self._shape(self._obs.copy())

    def step(self, actions: np.ndarray) -> Step:
        """Step every environment, resetting those whose episode ended."""
        if self._stepped:
            return self._step(actions)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = self._step(actions)
        _warn_once(caught)
        self._stepped = True
        return out

    def _step(self, actions: np.ndarray) -> Step:
        if not self._seeded:
            raise RuntimeError("call reset() before step()")
        n = len(self.envs)
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            flat_actions = [int(a) + int(space.start) for a in np.asarray(actions).reshape(n)]
        else:
            acts = np.asarray(actions, dtype=space.dtype).reshape(n, *(space.shape or ()))
            flat_actions = [acts[i].copy() for i in range(n)]
        reward = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        final_obs = np.empty_like(self._obs)
        life_lost = np.zeros(n, dtype=bool)
        for i, env in enumerate(self.envs):
            obs, r, term, trunc, info = env.step(flat_actions[i])
            final_obs[i] = self._as_obs(obs)
            reward[i], terminated[i], truncated[i] = float(r), bool(term), bool(trunc)
            lives = info.get("lives", 0)
            life_lost[i] = lives < self._lives[i]
            self._lives[i] = lives
            self._obs[i] = self._reset_one(i) if term or trunc else final_obs[i]
        return Step(
            obs=self._shape(self._obs.copy()),
            reward=self._shape(reward),
            terminated=self._shape(terminated),
            truncated=self._shape(truncated),
            final_obs=self._shape(final_obs),
            life_lost=self._shape(life_lost),
        )

    def close(self) -> None:
        """Close every instance."""
        for env in self.envs:
            env.close()
