"""MinAtar Breakout's rules, compiled (``minatar/environments/breakout.py``, line for line).

One game's state is a row of integers (see the columns below) and one map, the bricks;
study.trainer.envs.minatar_compiled steps many games at once with the package's sticky
actions and random numbers, and tests/test_minatar_compiled.py compares it with the
package.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.kernels import JIT_OPTIONS

__all__ = ["CHANNELS", "N_INTS", "N_MAPS", "act", "observe", "reset", "take_over"]

#: Columns of a game's integers (0 and 1 are minatar_compiled's: ended, last action).
_TERMINAL = 0
_BALL_X, _BALL_Y, _DIR, _POS, _STRIKE, _LAST_X, _LAST_Y = range(2, 9)
N_INTS, N_MAPS, CHANNELS = 7, 1, 4  # the game's own integers, its maps (bricks), channels
#: Breakout's action ids (minatar's ``action_map``: n, l, u, r, d, f).
_LEFT, _RIGHT = 1, 3


@numba.njit(**JIT_OPTIONS)
def reset(s, maps, side):
    """``Env.reset``, with the ball's side (``RandomState.randint(2)``) drawn already."""
    s[_BALL_Y] = 3
    s[_BALL_X], s[_DIR] = (0, 2) if side == 0 else (9, 3)
    s[_POS] = 4
    maps[0] = 0
    maps[0, 1:4, :] = 1
    s[_STRIKE] = 0
    s[_LAST_X], s[_LAST_Y] = s[_BALL_X], s[_BALL_Y]
    s[_TERMINAL] = 0


@numba.njit(**JIT_OPTIONS)
def act(s, maps, a):
    """``Env.act`` of one game (state ``s``, bricks ``maps[0]``): returns the reward."""
    b = maps[0]
    r = 0
    if s[_TERMINAL]:
        return r
    if a == _LEFT:
        s[_POS] = max(0, s[_POS] - 1)
    elif a == _RIGHT:
        s[_POS] = min(9, s[_POS] + 1)
    s[_LAST_X], s[_LAST_Y] = s[_BALL_X], s[_BALL_Y]
    d = s[_DIR]
    new_x = s[_BALL_X] + (-1 if d == 0 or d == 3 else 1)
    new_y = s[_BALL_Y] + (-1 if d == 0 or d == 1 else 1)
    strike_toggle = False
    if new_x < 0 or new_x > 9:
        new_x = min(max(new_x, 0), 9)
        s[_DIR] = (1, 0, 3, 2)[s[_DIR]]
    if new_y < 0:
        new_y = 0
        s[_DIR] = (3, 2, 1, 0)[s[_DIR]]
    elif b[new_y, new_x] == 1:
        strike_toggle = True
        if not s[_STRIKE]:
            r += 1
            s[_STRIKE] = 1
            b[new_y, new_x] = 0
            new_y = s[_LAST_Y]
            s[_DIR] = (3, 2, 1, 0)[s[_DIR]]
    elif new_y == 9:
        if not b.any():
            b[1:4, :] = 1
        if s[_BALL_X] == s[_POS]:
            s[_DIR] = (3, 2, 1, 0)[s[_DIR]]
            new_y = s[_LAST_Y]
        elif new_x == s[_POS]:
            s[_DIR] = (2, 3, 0, 1)[s[_DIR]]
            new_y = s[_LAST_Y]
        else:
            s[_TERMINAL] = 1
    if not strike_toggle:
        s[_STRIKE] = 0
    s[_BALL_X], s[_BALL_Y] = new_x, new_y
    return r


@numba.njit(**JIT_OPTIONS)
def observe(s, maps, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (paddle, ball, trail, brick)."""
    out[:] = 0
    out[0, 9, s[_POS]] = 1
    out[1, s[_BALL_Y], s[_BALL_X]] = 1
    out[2, s[_LAST_Y], s[_LAST_X]] = 1
    out[3] = maps[0]


def take_over(env: Any, s: np.ndarray, maps: np.ndarray) -> None:
    """Copy a package game's state (``minatar.environments.breakout.Env``) into ``s``
    and ``maps``."""
    s[_TERMINAL] = env.terminal
    s[2:2 + N_INTS] = (env.ball_x, env.ball_y, env.ball_dir, env.pos, env.strike, env.last_x,
              env.last_y)
    maps[0] = env.brick_map != 0
