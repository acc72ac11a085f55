"""MinAtar games compiled: the ``minatar`` package's games, bit for bit, many at once.

A MinAtar game costs 3 to 25 us per step in Python (its ``act``, the sticky-action draw,
``state()`` building a fresh array), as much as the compiled MinAtar network's whole update
per step or more. Here the same games run as one compiled loop over a population's games:
the same rules (each game's module here, line for line with ``minatar/environments/``), the
same sticky actions (``minatar.Environment.act``: with probability 0.1 the previous action
again; the previous action is kept across episodes) and the same random numbers: each
game's ``numpy.random.RandomState`` (MT19937, one stream for the sticky draws and any draws
of the game's own) is copied into arrays and advanced exactly as numpy would
(study.trainer.envs.numpy_mt).

A game's state is one row of integers (column 0: whether it ended; column 1: the last
action; then the game's own) and a few 10 x 10 maps. tests/test_minatar_compiled.py plays
long random games against the package and compares every observation, reward and end, and
the generators' states.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.envs import minatar_asterix as asterix
from study.trainer.envs import minatar_breakout as breakout
from study.trainer.envs import minatar_freeway as freeway
from study.trainer.envs import minatar_space_invaders as space_invaders
from study.trainer.envs.numpy_mt import KEY_WORDS, next32, uniform
from study.trainer.kernels import JIT_OPTIONS
from study.trainer.numba_cache import drop_stale_cache

__all__ = ["COMPILED", "CompiledGames", "step_games"]

drop_stale_cache()  # (this module's compiled loops call the games' modules)

#: The games that run compiled (minatar's names) and their codes in :func:`step_games`.
COMPILED = {"breakout": 0, "space_invaders": 1, "freeway": 2, "asterix": 3}
_MODULES = (breakout, space_invaders, freeway, asterix)
_TERMINAL, _LAST_ACTION = 0, 1  # the state's first two columns, in every game

# ----------------------------------------------------------------------- the games
@numba.njit(**JIT_OPTIONS)
def _reset(game, s, maps, key, pos, g):
    """``Env.reset`` of game g (Breakout's ball side is ``RandomState.randint(2)``)."""
    if game == 0:
        breakout.reset(s, maps, next32(key, pos, g) & np.uint32(1))
    elif game == 1:
        space_invaders.reset(s, maps)
    elif game == 2:
        freeway.reset(s, key, pos, g)
    else:
        asterix.reset(s)


@numba.njit(**JIT_OPTIONS)
def _act(game, s, maps, a, key, pos, g):
    if game == 0:
        return breakout.act(s, maps, a)
    if game == 1:
        return space_invaders.act(s, maps, a)
    if game == 2:
        return freeway.act(s, a, key, pos, g)
    return asterix.act(s, a, key, pos, g)


@numba.njit(**JIT_OPTIONS)
def _observe(game, s, maps, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (uint8)."""
    if game == 0:
        breakout.observe(s, maps, out)
    elif game == 1:
        space_invaders.observe(s, maps, out)
    elif game == 2:
        freeway.observe(s, out)
    else:
        asterix.observe(s, out)


@numba.njit(**JIT_OPTIONS)
def step_games(game, state, maps, key, pos, actions, sticky, obs, final, reward, done):
    """One step of every game (rows of the state arrays), in order: the sticky draw, the
    action, the observation it ends in; a finished game is reset (its next observation
    then the reset's)."""
    for g in range(state.shape[0]):
        s = state[g]
        a = actions[g]
        if uniform(key, pos, g) < sticky:
            a = s[_LAST_ACTION]
        s[_LAST_ACTION] = a
        reward[g] = _act(game, s, maps[g], a, key, pos, g)
        done[g] = s[_TERMINAL] != 0
        _observe(game, s, maps[g], final[g])
        if done[g]:
            _reset(game, s, maps[g], key, pos, g)
            _observe(game, s, maps[g], obs[g])
        else:
            obs[g] = final[g]


@numba.njit(**JIT_OPTIONS)
def _reset_all(game, state, maps, key, pos, obs):
    for g in range(state.shape[0]):
        _reset(game, state[g], maps[g], key, pos, g)
        _observe(game, state[g], maps[g], obs[g])


class CompiledGames:
    """The games of a population, taken over from ``minatar.Environment`` objects of one
    of :data:`COMPILED` that have been seeded and reset (their Python state is not kept up
    to date afterwards)."""

    def __init__(self, name: str, games: list[Any]) -> None:
        self.game = COMPILED[name]
        module = _MODULES[self.game]
        n = len(games)
        self.channels = module.CHANNELS
        self.sticky = float(games[0].sticky_action_prob)
        self.state = np.zeros((n, 2 + module.N_INTS), dtype=np.int64)
        self.maps = np.zeros((n, module.N_MAPS, 10, 10), dtype=np.uint8)
        self.key = np.zeros((n, KEY_WORDS), dtype=np.uint32)
        self.pos = np.zeros(n, dtype=np.int64)
        for g, game in enumerate(games):
            if game.env.random is not game.random:  # (Environment.seed makes them one)
                raise ValueError("compiled MinAtar games must be seeded first")
            module.take_over(game.env, self.state[g], self.maps[g])
            self.state[g, _LAST_ACTION] = game.last_action
            _, key, position, *_ = game.random.get_state()
            self.key[g], self.pos[g] = key, position

    def arrays(self) -> tuple[Any, ...]:
        """(game code, state, maps, generators' keys and positions, sticky probability)."""
        return self.game, self.state, self.maps, self.key, self.pos, self.sticky

    def reset(self) -> np.ndarray:
        """Every game reset (continuing its random numbers); the observations."""
        obs = np.empty((len(self.state), self.channels, 10, 10), dtype=np.uint8)
        _reset_all(self.game, self.state, self.maps, self.key, self.pos, obs)
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(obs, final observations, rewards, ends)`` after the env actions ``actions``."""
        n = len(self.state)
        obs = np.empty((n, self.channels, 10, 10), dtype=np.uint8)
        final = np.empty_like(obs)
        reward, done = np.empty(n), np.empty(n, dtype=np.bool_)
        step_games(self.game, self.state, self.maps, self.key, self.pos,
                   np.ascontiguousarray(actions, dtype=np.int64), self.sticky, obs, final,
                   reward, done)
        return obs, final, reward, done
