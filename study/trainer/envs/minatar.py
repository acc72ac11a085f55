"""MinAtar (Young & Tian 2019) populations stepped directly, without gymnasium's wrappers.

``gym.make("MinAtar/<Game>-v1")`` wraps one ``minatar.Environment`` in four Python layers
(order enforcing, the env checker, ``minatar.gym.BaseEnv``, our channel-first wrapper),
which cost several times the game's own step. :class:`MinAtarPopulation` holds the same
``minatar.Environment`` objects, seeds them the same way (the member's 32-bit instance
seeds, once, at the first reset), maps actions through the same action set and transposes
all observations at once: the same games, bit for bit (tests/test_networks.py compares it
with the generic path). Every game but Seaquest, after its games are seeded and reset,
runs compiled (study.trainer.envs.minatar_compiled: the same games and random
numbers, tested against the package).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from study.trainer.envs.base import Step
from study.trainer.envs.generic import instance_seed
from study.trainer.envs.minatar_compiled import COMPILED, CompiledGames
from study.trainer.rng import STREAM_RESET

__all__ = ["GAMES", "MinAtarPopulation", "minatar_spaces"]

#: Gymnasium names of the five games (``MinAtar/<name>-v0|v1``) and minatar's own.
GAMES = {"Asterix": "asterix", "Breakout": "breakout", "Freeway": "freeway",
         "Seaquest": "seaquest", "SpaceInvaders": "space_invaders"}


def _game(env_id: str) -> tuple[str, bool]:
    """``(minatar game name, minimal action set?)`` of a ``MinAtar/<Game>-v0|v1`` id."""
    name, version = env_id.split("/", 1)[1].rsplit("-", 1)
    return GAMES[name], version == "v1"


def _environment(game: str) -> Any:
    from study.trainer.envs import register_namespace  # the one-line hint when minatar is missing

    register_namespace(f"MinAtar/{next(k for k, v in GAMES.items() if v == game)}-v1")
    from minatar import Environment

    return Environment(env_name=game)


@functools.cache
def minatar_spaces(env_id: str) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """Observation space (uint8 ``[C, 10, 10]``) and action space of one game."""
    game, minimal = _game(env_id)
    env = _environment(game)
    h, w, c = env.state_shape()
    n_actions = len(env.minimal_action_set()) if minimal else env.num_actions()
    return gym.spaces.Box(0, 1, (c, h, w), dtype=np.uint8), gym.spaces.Discrete(n_actions)


class MinAtarPopulation:
    """``S x E`` MinAtar games of one id (see the module docstring)."""

    def __init__(self, env_id: str, seeds: Sequence[int], num_envs: int,
                 stream: int = STREAM_RESET) -> None:
        game, minimal = _game(env_id)
        self.game = game
        self.n_members, self.n_envs = len(seeds), int(num_envs)
        self.games = [_environment(game) for _ in range(self.n_members * self.n_envs)]
        first = self.games[0]
        self.action_set = np.asarray(first.minimal_action_set() if minimal
                                     else range(first.num_actions()))
        self.observation_space, self.action_space = minatar_spaces(env_id)
        self._seeds = [instance_seed(s, e, stream, 32) for s in seeds for e in range(num_envs)]
        self._seeded = False
        self._compiled: CompiledGames | None = None
        h, w, c = first.state_shape()
        self._state = np.zeros((len(self.games), h, w, c), dtype=bool)

    @property
    def compiled_games(self) -> CompiledGames | None:
        """The games as compiled state (those of ``minatar_compiled.COMPILED``, from the
        first reset on), or None."""
        return self._compiled

    def _obs(self, states: np.ndarray) -> np.ndarray:
        chw = np.ascontiguousarray(np.moveaxis(states, -1, 1), dtype=np.uint8)
        return chw.reshape(self.n_members, self.n_envs, *chw.shape[1:])

    def reset(self) -> np.ndarray:
        if self._compiled is not None:
            return self._obs_chw(self._compiled.reset())
        for i, g in enumerate(self.games):
            if not self._seeded:  # seeded once: afterwards each game continues its RNG
                g.seed(self._seeds[i])
            g.reset()
            self._state[i] = g.state()
        self._seeded = True
        if self.game in COMPILED:
            self._compiled = CompiledGames(self.game, self.games)
        return self._obs(self._state)

    def _obs_chw(self, obs: np.ndarray) -> np.ndarray:
        return obs.reshape(self.n_members, self.n_envs, *obs.shape[1:])

    def step(self, actions: np.ndarray) -> Step:
        if not self._seeded:
            raise RuntimeError("call reset() before step()")
        n = len(self.games)
        shape = (self.n_members, self.n_envs)
        if self._compiled is not None:
            obs, final, reward, done = self._compiled.step(
                self.action_set[np.asarray(actions).reshape(n)])
            return Step(obs=self._obs_chw(obs), reward=reward.reshape(shape),
                        terminated=done.reshape(shape), truncated=np.zeros(shape, dtype=bool),
                        final_obs=self._obs_chw(final))
        acts = self.action_set[np.asarray(actions).reshape(n)].tolist()
        states = self._state
        ends = []  # (game, the state its episode ended in)
        rewards, done = [], np.zeros(n, dtype=bool)
        for i, g in enumerate(self.games):  # (the loop that costs: a few Python calls a game)
            r, d = g.act(acts[i])
            rewards.append(r)
            state = g.env.state()
            if d:
                done[i] = True
                ends.append((i, state))
                g.reset()
                state = g.env.state()
            states[i] = state
        final = states
        if ends:
            final = states.copy()
            for i, state in ends:
                final[i] = state
        return Step(obs=self._obs(states),
                    reward=np.asarray(rewards, dtype=np.float64).reshape(shape),
                    terminated=done.reshape(shape), truncated=np.zeros(shape, dtype=bool),
                    final_obs=self._obs(final))

    def close(self) -> None:
        """Nothing to release (no display is opened)."""
