"""MinAtar Asterix's rules, compiled (``minatar/environments/asterix.py``, line for line).

One game's state is a row of integers (see the columns below; the eight lanes' entities
last: present, x, moving right, gold; lane i's entity is on row i + 1) and no maps. The
game draws from the game's generator when it spawns an entity (``_spawn_entity``: two
``rand()``, then ``randint`` over the free lanes). study.trainer.envs.minatar_compiled
steps many games at once with the package's sticky actions and random numbers, and
tests/test_minatar_compiled.py compares it with the package.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.envs.numpy_mt import randint, uniform
from study.trainer.kernels import JIT_OPTIONS

__all__ = ["CHANNELS", "N_INTS", "N_MAPS", "act", "observe", "reset", "take_over"]

#: Columns of a game's integers (0 and 1 are minatar_compiled's: ended, last action).
_TERMINAL = 0
(_PLAYER_X, _PLAYER_Y, _SHOT_TIMER, _SPAWN_SPEED, _SPAWN_TIMER, _MOVE_SPEED, _MOVE_TIMER,
 _RAMP_TIMER, _RAMP_INDEX, _RAMPING) = range(2, 12)
_LANES_AT, _N_LANES = 12, 8  # lane i: columns _LANES_AT + 4 i + (present, x, right, gold)
_PRESENT, _X, _RIGHT, _GOLD = range(4)
N_INTS, N_MAPS, CHANNELS = 10 + 4 * _N_LANES, 0, 4  # the game's own integers, maps, channels
#: The package's constants and action ids (its ``action_map``: n, l, u, r, d, f).
_RAMP_INTERVAL, _INIT_SPAWN_SPEED, _INIT_MOVE_INTERVAL = 100, 10, 5
_LEFT, _UP, _RIGHT_ACTION, _DOWN = 1, 2, 3, 4


@numba.njit(**JIT_OPTIONS)
def reset(s):
    """``Env.reset``."""
    s[_PLAYER_X] = s[_PLAYER_Y] = 5
    s[_LANES_AT:] = 0
    s[_SHOT_TIMER] = 0
    s[_SPAWN_SPEED] = s[_SPAWN_TIMER] = _INIT_SPAWN_SPEED
    s[_MOVE_SPEED] = s[_MOVE_TIMER] = _INIT_MOVE_INTERVAL
    s[_RAMP_TIMER] = _RAMP_INTERVAL
    s[_RAMP_INDEX] = 0
    s[_TERMINAL] = 0


@numba.njit(**JIT_OPTIONS)
def _spawn(s, key, pos, g):
    """``Env._spawn_entity``: its side and kind from two ``rand()``, then one of the free
    lanes (``randint`` over them, in order); nothing when every lane is taken (after the
    two draws)."""
    right = uniform(key, pos, g) < 1.0 / 2.0
    gold = uniform(key, pos, g) < 1.0 / 3.0
    free = np.empty(_N_LANES, dtype=np.int64)
    n_free = 0
    for i in range(_N_LANES):
        if not s[_LANES_AT + 4 * i + _PRESENT]:
            free[n_free] = i
            n_free += 1
    if n_free == 0:
        return
    lane = s[_LANES_AT + 4 * free[randint(key, pos, g, 0, n_free)]:][:4]
    lane[_PRESENT], lane[_X], lane[_RIGHT], lane[_GOLD] = 1, 0 if right else 9, right, gold


@numba.njit(**JIT_OPTIONS)
def _meet(s, lane):
    """The player and the entity of ``lane`` on the same cell: gold is taken (returns 1),
    an enemy ends the game."""
    if lane[_GOLD]:
        lane[:] = 0  # (an empty lane is all zeros, as take_over writes it)
        return 1
    s[_TERMINAL] = 1
    return 0


@numba.njit(**JIT_OPTIONS)
def act(s, a, key, pos, g):
    """``Env.act`` of one game (state ``s``): returns the reward."""
    r = 0
    if s[_TERMINAL]:
        return r
    if s[_SPAWN_TIMER] == 0:
        _spawn(s, key, pos, g)
        s[_SPAWN_TIMER] = s[_SPAWN_SPEED]
    if a == _LEFT:
        s[_PLAYER_X] = max(0, s[_PLAYER_X] - 1)
    elif a == _RIGHT_ACTION:
        s[_PLAYER_X] = min(9, s[_PLAYER_X] + 1)
    elif a == _UP:
        s[_PLAYER_Y] = max(1, s[_PLAYER_Y] - 1)
    elif a == _DOWN:
        s[_PLAYER_Y] = min(8, s[_PLAYER_Y] + 1)
    for i in range(_N_LANES):
        lane = s[_LANES_AT + 4 * i:_LANES_AT + 4 * i + 4]
        if lane[_PRESENT] and lane[_X] == s[_PLAYER_X] and i + 1 == s[_PLAYER_Y]:
            r += _meet(s, lane)
    if s[_MOVE_TIMER] == 0:
        s[_MOVE_TIMER] = s[_MOVE_SPEED]
        for i in range(_N_LANES):
            lane = s[_LANES_AT + 4 * i:_LANES_AT + 4 * i + 4]
            if lane[_PRESENT]:
                lane[_X] += 1 if lane[_RIGHT] else -1
                if lane[_X] < 0 or lane[_X] > 9:
                    lane[:] = 0
                elif lane[_X] == s[_PLAYER_X] and i + 1 == s[_PLAYER_Y]:
                    r += _meet(s, lane)
    s[_SPAWN_TIMER] -= 1
    s[_MOVE_TIMER] -= 1
    if s[_RAMPING] and (s[_SPAWN_SPEED] > 1 or s[_MOVE_SPEED] > 1):
        if s[_RAMP_TIMER] >= 0:
            s[_RAMP_TIMER] -= 1
        else:
            if s[_MOVE_SPEED] > 1 and s[_RAMP_INDEX] % 2:
                s[_MOVE_SPEED] -= 1
            if s[_SPAWN_SPEED] > 1:
                s[_SPAWN_SPEED] -= 1
            s[_RAMP_INDEX] += 1
            s[_RAMP_TIMER] = _RAMP_INTERVAL
    return r


@numba.njit(**JIT_OPTIONS)
def observe(s, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (player, enemy, trail, gold)."""
    out[:] = 0
    out[0, s[_PLAYER_Y], s[_PLAYER_X]] = 1
    for i in range(_N_LANES):
        lane = s[_LANES_AT + 4 * i:_LANES_AT + 4 * i + 4]
        if lane[_PRESENT]:
            x = lane[_X]
            out[3 if lane[_GOLD] else 1, i + 1, x] = 1
            back_x = x - 1 if lane[_RIGHT] else x + 1
            if 0 <= back_x <= 9:
                out[2, i + 1, back_x] = 1


def take_over(env: Any, s: np.ndarray, maps: np.ndarray) -> None:
    """Copy a package game's state (``minatar.environments.asterix.Env``) into ``s``."""
    s[_TERMINAL] = env.terminal
    s[2:_LANES_AT] = (env.player_x, env.player_y, env.shot_timer, env.spawn_speed,
                      env.spawn_timer, env.move_speed, env.move_timer, env.ramp_timer,
                      env.ramp_index, env.ramping)
    for i, entity in enumerate(env.entities):
        if entity is not None:
            x, y, right, gold = entity
            assert y == i + 1, "an entity off its lane"
            s[_LANES_AT + 4 * i:_LANES_AT + 4 * i + 4] = (1, x, right, gold)
        else:
            s[_LANES_AT + 4 * i:_LANES_AT + 4 * i + 4] = 0
