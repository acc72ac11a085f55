"""MinAtar Freeway's rules, compiled (``minatar/environments/freeway.py``, line for line).

One game's state is a row of integers (see the columns below; the eight cars' x, y, timer
and speed last) and no maps. The game draws its cars' speeds and directions from the
game's generator (``_randomize_cars``: ``randint(1, 6, 8)``, then ``rand(8)``) at a reset
and whenever the chicken crosses. study.trainer.envs.minatar_compiled steps many games at
once with the package's sticky actions and random numbers, and
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
_POS, _MOVE_TIMER, _TERMINATE_TIMER = 2, 3, 4
_CARS, _N_CARS = 5, 8  # car i: columns _CARS + 4 i + (x, y, timer, speed)
_X, _Y, _TIMER, _SPEED = range(4)
N_INTS, N_MAPS, CHANNELS = 3 + 4 * _N_CARS, 0, 7  # the game's own integers, maps, channels
#: The package's constants and action ids (its ``action_map``: n, l, u, r, d, f).
_PLAYER_SPEED, _TIME_LIMIT = 3, 2500
_UP, _DOWN = 2, 4


@numba.njit(**JIT_OPTIONS)
def _randomize_cars(s, initialize, key, pos, g):
    """``Env._randomize_cars``: speeds ``randint(1, 6, 8)``, their signs from
    ``rand(8) - 0.5``; cars placed at x = 0, one a lane, when ``initialize``."""
    speeds = np.empty(_N_CARS, dtype=np.int64)
    for i in range(_N_CARS):
        speeds[i] = randint(key, pos, g, 1, 6)
    for i in range(_N_CARS):
        u = uniform(key, pos, g) - 0.5
        speeds[i] *= 1 if u > 0 else -1 if u < 0 else 0
    for i in range(_N_CARS):
        car = s[_CARS + 4 * i:_CARS + 4 * i + 4]
        if initialize:
            car[_X], car[_Y] = 0, i + 1
        car[_TIMER], car[_SPEED] = abs(speeds[i]), speeds[i]


@numba.njit(**JIT_OPTIONS)
def reset(s, key, pos, g):
    """``Env.reset``."""
    _randomize_cars(s, True, key, pos, g)
    s[_POS] = 9
    s[_MOVE_TIMER] = _PLAYER_SPEED
    s[_TERMINATE_TIMER] = _TIME_LIMIT
    s[_TERMINAL] = 0


@numba.njit(**JIT_OPTIONS)
def act(s, a, key, pos, g):
    """``Env.act`` of one game (state ``s``): returns the reward."""
    r = 0
    if s[_TERMINAL]:
        return r
    if a == _UP and s[_MOVE_TIMER] == 0:
        s[_MOVE_TIMER] = _PLAYER_SPEED
        s[_POS] = max(0, s[_POS] - 1)
    elif a == _DOWN and s[_MOVE_TIMER] == 0:
        s[_MOVE_TIMER] = _PLAYER_SPEED
        s[_POS] = min(9, s[_POS] + 1)
    if s[_POS] == 0:  # across
        r += 1
        _randomize_cars(s, False, key, pos, g)
        s[_POS] = 9
    for i in range(_N_CARS):
        car = s[_CARS + 4 * i:_CARS + 4 * i + 4]
        if car[_X] == 4 and car[_Y] == s[_POS]:
            s[_POS] = 9
        if car[_TIMER] == 0:
            car[_TIMER] = abs(car[_SPEED])
            car[_X] += 1 if car[_SPEED] > 0 else -1
            if car[_X] < 0:
                car[_X] = 9
            elif car[_X] > 9:
                car[_X] = 0
            if car[_X] == 4 and car[_Y] == s[_POS]:
                s[_POS] = 9
        else:
            car[_TIMER] -= 1
    if s[_MOVE_TIMER] > 0:
        s[_MOVE_TIMER] -= 1
    s[_TERMINATE_TIMER] -= 1
    if s[_TERMINATE_TIMER] < 0:
        s[_TERMINAL] = 1
    return r


@numba.njit(**JIT_OPTIONS)
def observe(s, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (chicken, car, then a car's trail
    in the channel of its speed, 1 to 5)."""
    out[:] = 0
    out[0, s[_POS], 4] = 1
    for i in range(_N_CARS):
        car = s[_CARS + 4 * i:_CARS + 4 * i + 4]
        x, y, speed = car[_X], car[_Y], car[_SPEED]
        out[1, y, x] = 1
        back_x = x - 1 if speed > 0 else x + 1
        if back_x < 0:
            back_x = 9
        elif back_x > 9:
            back_x = 0
        if 1 <= abs(speed) <= 5:  # (the package has no trail for a speed of 0 either)
            out[1 + abs(speed), y, back_x] = 1


def take_over(env: Any, s: np.ndarray, maps: np.ndarray) -> None:
    """Copy a package game's state (``minatar.environments.freeway.Env``) into ``s``."""
    s[_TERMINAL] = env.terminal
    s[2:_CARS] = (env.pos, env.move_timer, env.terminate_timer)
    s[_CARS:] = np.asarray(env.cars, dtype=np.int64).reshape(-1)
