"""Population environments from envpool: ``envpool:<task id>``, e.g. ``envpool:CartPole-v1``.

An optional backend (``pip install envpool``; 1.2.5 here) for the ids envpool implements
(classic control, LunarLander-v3, MuJoCo v3-v5, ...), selected by the id prefix
``envpool:``. It keeps the contract of :class:`study.trainer.envs.base.PopulationEnv`:

* **one envpool per member**, each with ``num_envs`` environments and one thread, every
  environment seeded by envpool's ``env_seed`` with a seed derived from (member seed, env
  index, stream) alone (:func:`study.trainer.envs.generic.instance_seed`, 31 bits: envpool's seeds
  are int32). A member's trajectory therefore never depends on the other members, and
  re-runs are bit-identical;
* **autoreset as the generic path does it**: envpool resets an ended environment on the
  *next* ``step`` call (that call's action is ignored and it returns the reset observation
  with reward 0). The step that ends an episode does return the episode's true last
  observation, so this backend keeps it as ``final_obs`` (truncations bootstrap from it
  exactly as on the generic path) and resets the ended environments at once with
  ``reset(env_id)``, so ``obs`` is already the next episode's first observation and no
  action is ever ignored.

The two backends do not agree bit for bit: envpool's C++ environments draw initial states
from their own RNG (and compute in their own precision), so the same member seed gives
other episodes than gymnasium's; the dynamics, rewards and time limits are the same.

The id must be registered before use: :func:`register` (``study.trainer.envs`` calls it for
``envpool:`` ids, see its ``_fast``); an unregistered ``envpool:X`` would otherwise be read
as gymnasium's ``module:EnvName`` form and silently make gymnasium's own ``X``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np

from study.config import ConfigError
from study.trainer.envs.base import Step
from study.trainer.envs.generic import check_spaces, flat_box, instance_seed
from study.trainer.rng import STREAM_RESET

__all__ = ["PREFIX", "EnvpoolPopulationEnv", "envpool_spaces", "is_envpool_id", "register"]

PREFIX = "envpool:"
#: envpool seeds are C++ int32.
SEED_BITS = 31


def is_envpool_id(env_id: str) -> bool:
    """Whether ``env_id`` names the envpool backend (``envpool:<task>``)."""
    return env_id.startswith(PREFIX)


def _envpool() -> Any:
    try:
        import envpool
    except ImportError:
        raise ConfigError("environment ids 'envpool:...' need the 'envpool' package, not "
                          "installed here: pip install envpool") from None
    return envpool


def _task(env_id: str) -> str:
    """The envpool task of ``envpool:<task>``; ConfigError (with close matches) if envpool
    does not know it."""
    task = env_id[len(PREFIX):]
    known = _envpool().list_all_envs()
    if task not in known:
        close = difflib.get_close_matches(task, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(PREFIX + c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown environment id {env_id!r}: envpool has no task "
                          f"{task!r}{hint}")
    return task


def _make_pool(task: str, seeds: Sequence[int]) -> Any:
    """One envpool of ``len(seeds)`` environments, environment i seeded with seeds[i]."""
    return _envpool().make(task, env_type="gymnasium", num_envs=len(seeds),
                           batch_size=len(seeds), num_threads=1, seed=0,
                           env_seed=[int(s) for s in seeds])


@functools.cache
def envpool_spaces(env_id: str) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """``(observation_space, action_space)`` of one environment, as the population env
    reports them (observations flattened to 1-D float32)."""
    pool = _make_pool(_task(env_id), [0])
    obs, act = pool.observation_space, pool.action_space
    _close(pool)
    check_spaces(env_id, obs, act)
    return flat_box(obs), act


def _close(pool: Any) -> None:
    close = getattr(pool, "close", None)
    if callable(close):
        close()


class EnvpoolPopulationEnv:
    """``S`` envpools of ``E`` environments each: member ``m`` steps ``pools[m]`` alone."""

    def __init__(self, env_id: str, seeds: Sequence[int], num_envs: int,
                 stream: int = STREAM_RESET) -> None:
        if len(seeds) == 0 or num_envs < 1:
            raise ValueError("need at least one seed and num_envs >= 1")
        self.env_id = env_id
        self.n_members = len(seeds)
        self.n_envs = int(num_envs)
        self.observation_space, self.action_space = envpool_spaces(env_id)
        task = _task(env_id)
        self.pools = [_make_pool(task, [instance_seed(s, e, stream, SEED_BITS)
                                        for e in range(self.n_envs)]) for s in seeds]
        self._ids = np.arange(self.n_envs, dtype=np.int32)
        self._obs_dim = int(self.observation_space.shape[0])
        self._discrete = isinstance(self.action_space, gym.spaces.Discrete)

    def _flat(self, obs: Any, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(observations [k, obs_dim] float32, their env indices)``."""
        o = np.asarray(obs, dtype=np.float32).reshape(len(info["env_id"]), self._obs_dim)
        return o, np.asarray(info["env_id"], dtype=np.int64)

    def reset(self) -> np.ndarray:
        """Reset every environment; ``[S, E, obs_dim]`` float32."""
        out = np.empty((self.n_members, self.n_envs, self._obs_dim), dtype=np.float32)
        for m, pool in enumerate(self.pools):
            obs, info = pool.reset(self._ids)
            o, ids = self._flat(obs, info)
            out[m, ids] = o
        return out

    def _actions(self, actions: np.ndarray) -> np.ndarray:
        if self._discrete:
            return np.asarray(actions, dtype=np.int64) + int(
                cast(gym.spaces.Discrete, self.action_space).start)
        return np.asarray(actions, dtype=self.action_space.dtype)

    def step(self, actions: np.ndarray) -> Step:
        """Step every environment; those whose episode ended keep their last observation
        in ``final_obs`` and are reset at once (``obs`` is the next episode's first)."""
        shape = (self.n_members, self.n_envs)
        obs = np.empty((*shape, self._obs_dim), dtype=np.float32)
        reward = np.empty(shape, dtype=np.float64)
        terminated = np.empty(shape, dtype=bool)
        truncated = np.empty(shape, dtype=bool)
        acts = self._actions(actions)
        for m, pool in enumerate(self.pools):
            o, r, te, tr, info = pool.step(acts[m], self._ids)
            o, ids = self._flat(o, info)
            obs[m, ids] = o
            reward[m, ids] = np.asarray(r, dtype=np.float64)
            terminated[m, ids] = np.asarray(te, dtype=bool)
            truncated[m, ids] = np.asarray(tr, dtype=bool)
        final_obs = obs.copy()
        for m in map(int, np.flatnonzero((terminated | truncated).any(axis=1))):
            ended = self._ids[terminated[m] | truncated[m]]
            o, info = self.pools[m].reset(ended)
            o, ids = self._flat(o, info)
            obs[m, ids] = o
        return Step(obs, reward, terminated, truncated, final_obs)

    def close(self) -> None:
        for pool in self.pools:
            _close(pool)
        self.pools = []


def register(env_id: str) -> None:
    """Make ``study.trainer.envs.make_population_env`` and ``env_spaces`` build ``env_id``
    (``envpool:<task>``) with this backend. ConfigError (one line) when envpool is missing
    or has no such task."""
    from study.trainer.envs import FAST_ENVS, register_fast_env

    if env_id in FAST_ENVS:
        return
    _task(env_id)
    register_fast_env(
        env_id,
        lambda seeds, n, stream: EnvpoolPopulationEnv(env_id, seeds, n, stream),
        lambda: envpool_spaces(env_id),
    )
