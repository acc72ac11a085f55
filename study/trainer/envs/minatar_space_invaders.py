"""MinAtar Space Invaders' rules, compiled (``minatar/environments/space_invaders.py``, line
for line).

One game's state is a row of integers (see the columns below) and three maps: aliens,
friendly bullets, enemy bullets (0 or 1 in every cell, as the package's float maps are).
study.trainer.envs.minatar_compiled steps many games at once with the package's sticky
actions and random numbers, and tests/test_minatar_compiled.py compares it with the
package. The game draws no random numbers of its own.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.kernels import JIT_OPTIONS

__all__ = ["CHANNELS", "N_INTS", "N_MAPS", "act", "observe", "reset", "take_over"]

#: Columns of a game's integers (0 and 1 are minatar_compiled's: ended, last action).
_TERMINAL = 0
_POS, _DIR, _INTERVAL, _MOVE_TIMER, _SHOT_TIMER, _RAMP, _COOL_DOWN, _RAMPING = range(2, 10)
N_INTS, N_MAPS, CHANNELS = 8, 3, 6  # the game's own integers, its maps, channels
_ALIEN, _FRIENDLY, _ENEMY = range(3)  # the maps
#: The package's constants and action ids (its ``action_map``: n, l, u, r, d, f).
_SHOT_COOL_DOWN, _ENEMY_MOVE_INTERVAL, _ENEMY_SHOT_INTERVAL = 5, 12, 10
_LEFT, _RIGHT, _FIRE = 1, 3, 5


@numba.njit(**JIT_OPTIONS)
def reset(s, maps):
    """``Env.reset``."""
    s[_POS] = 5
    maps[:] = 0
    maps[_ALIEN, 0:4, 2:8] = 1
    s[_DIR] = -1
    s[_INTERVAL] = _ENEMY_MOVE_INTERVAL
    s[_MOVE_TIMER] = s[_INTERVAL]
    s[_SHOT_TIMER] = _ENEMY_SHOT_INTERVAL
    s[_RAMP] = 0
    s[_COOL_DOWN] = 0
    s[_TERMINAL] = 0


@numba.njit(**JIT_OPTIONS)
def _roll_rows(m, shift):
    """``np.roll(m, shift, axis=0)`` in place for a shift of 1 or -1."""
    if shift > 0:
        last = m[9].copy()
        for y in range(9, 0, -1):
            m[y] = m[y - 1]
        m[0] = last
    else:
        first = m[0].copy()
        for y in range(9):
            m[y] = m[y + 1]
        m[9] = first


@numba.njit(**JIT_OPTIONS)
def _roll_columns(m, shift):
    """``np.roll(m, shift, axis=1)`` in place for a shift of 1 or -1."""
    for y in range(10):
        row = m[y]
        if shift > 0:
            last = row[9]
            for x in range(9, 0, -1):
                row[x] = row[x - 1]
            row[0] = last
        else:
            first = row[0]
            for x in range(9):
                row[x] = row[x + 1]
            row[9] = first


@numba.njit(**JIT_OPTIONS)
def _shoot(s, alien, enemy):
    """An enemy bullet from the alien nearest the cannon (``Env._nearest_alien``: columns
    by distance, the lower index first on a tie; in it, the bottom-most alien, the highest
    row)."""
    pos = s[_POS]
    for d in range(10):
        for i in (pos - d, pos + d):
            if 0 <= i <= 9 and alien[:, i].any():
                y = 9
                while alien[y, i] != 1:
                    y -= 1
                enemy[y, i] = 1
                return
            if d == 0:
                break


@numba.njit(**JIT_OPTIONS)
def act(s, maps, a):
    """``Env.act`` of one game (state ``s``, ``maps``): returns the reward."""
    alien, friendly, enemy = maps[_ALIEN], maps[_FRIENDLY], maps[_ENEMY]
    r = 0
    if s[_TERMINAL]:
        return r
    if a == _FIRE and s[_COOL_DOWN] == 0:
        friendly[9, s[_POS]] = 1
        s[_COOL_DOWN] = _SHOT_COOL_DOWN
    elif a == _LEFT:
        s[_POS] = max(0, s[_POS] - 1)
    elif a == _RIGHT:
        s[_POS] = min(9, s[_POS] + 1)
    _roll_rows(friendly, -1)
    friendly[9, :] = 0
    _roll_rows(enemy, 1)
    enemy[0, :] = 0
    if enemy[9, s[_POS]]:
        s[_TERMINAL] = 1
    if alien[9, s[_POS]]:
        s[_TERMINAL] = 1
    if s[_MOVE_TIMER] == 0:
        s[_MOVE_TIMER] = min(np.count_nonzero(alien), s[_INTERVAL])
        if (alien[:, 0].any() and s[_DIR] < 0) or (alien[:, 9].any() and s[_DIR] > 0):
            s[_DIR] = -s[_DIR]
            if alien[9, :].any():
                s[_TERMINAL] = 1
            _roll_rows(alien, 1)
        else:
            _roll_columns(alien, s[_DIR])
        if alien[9, s[_POS]]:
            s[_TERMINAL] = 1
    if s[_SHOT_TIMER] == 0:
        s[_SHOT_TIMER] = _ENEMY_SHOT_INTERVAL
        _shoot(s, alien, enemy)
    for y in range(10):
        for x in range(10):
            if alien[y, x] and friendly[y, x]:  # (both are 0 or 1)
                r += 1
                alien[y, x] = friendly[y, x] = 0
    if s[_COOL_DOWN] > 0:
        s[_COOL_DOWN] -= 1
    s[_MOVE_TIMER] -= 1
    s[_SHOT_TIMER] -= 1
    if np.count_nonzero(alien) == 0:
        if s[_INTERVAL] > 6 and s[_RAMPING]:
            s[_INTERVAL] -= 1
            s[_RAMP] += 1
        alien[0:4, 2:8] = 1
    return r


@numba.njit(**JIT_OPTIONS)
def observe(s, maps, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (cannon, alien, alien moving left,
    alien moving right, friendly bullet, enemy bullet)."""
    out[:] = 0
    out[0, 9, s[_POS]] = 1
    out[1] = maps[_ALIEN]
    out[2 if s[_DIR] < 0 else 3] = maps[_ALIEN]
    out[4] = maps[_FRIENDLY]
    out[5] = maps[_ENEMY]


def take_over(env: Any, s: np.ndarray, maps: np.ndarray) -> None:
    """Copy a package game's state (``minatar.environments.space_invaders.Env``) into ``s``
    and ``maps``."""
    s[_TERMINAL] = env.terminal
    s[2:2 + N_INTS] = (env.pos, env.alien_dir, env.enemy_move_interval, env.alien_move_timer,
               env.alien_shot_timer, env.ramp_index, env.shot_timer, env.ramping)
    for m, name in ((_ALIEN, "alien_map"), (_FRIENDLY, "f_bullet_map"),
                    (_ENEMY, "e_bullet_map")):
        maps[m] = getattr(env, name) != 0
