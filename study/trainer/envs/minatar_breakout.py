"""MinAtar Breakout compiled: the ``minatar`` package's game, bit for bit, for many games at once.

minatar's Breakout costs about 3 us per step in Python (its ``act``, the sticky-action
draw, ``state()`` building a fresh array), as much as the compiled MinAtar network's whole
update per step. Here the same game runs as one compiled loop over a population's games:
the same rules (``minatar/environments/breakout.py``, line for line), the same sticky
actions (``minatar.Environment.act``: with probability 0.1 the previous action again; the
previous action is kept across episodes) and the same random numbers: each game's
``numpy.random.RandomState`` (MT19937, one stream for the sticky draws and the resets'
ball side) is copied into arrays and advanced here exactly as numpy would
(``random_sample``: two 32-bit outputs, ``(a >> 5, b >> 6)``; legacy ``randint(2)``: one
output, masked to its lowest bit). tests/test_minatar_breakout.py plays long random games
against the package and compares every observation, reward and end, and the generators'
states.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.kernels import JIT_OPTIONS

__all__ = ["BreakoutGames", "step_games"]

_N, _M = 624, 397
_MATRIX_A, _UPPER, _LOWER = np.uint32(0x9908B0DF), np.uint32(0x80000000), np.uint32(0x7FFFFFFF)
#: Columns of the games' integer state.
_BALL_X, _BALL_Y, _DIR, _POS, _STRIKE, _LAST_X, _LAST_Y, _TERMINAL, _LAST_ACTION = range(9)
#: Breakout's action ids (minatar's ``action_map``: n, l, u, r, d, f).
_LEFT, _RIGHT = 1, 3
_CHANNELS = 4  # paddle, ball, trail, brick


@numba.njit(**JIT_OPTIONS)
def _twist(key):
    """MT19937's next 624 words (numpy's ``mt19937_gen``)."""
    for i in range(_N):
        y = (key[i] & _UPPER) | (key[(i + 1) % _N] & _LOWER)
        nxt = key[(i + _M) % _N] ^ (y >> np.uint32(1))
        if y & np.uint32(1):
            nxt ^= _MATRIX_A
        key[i] = nxt


@numba.njit(**JIT_OPTIONS)
def _next32(key, pos, g):
    """Game g's next 32-bit output (numpy's ``mt19937_next``)."""
    k = key[g]
    if pos[g] >= _N:
        _twist(k)
        pos[g] = 0
    y = k[pos[g]]
    pos[g] += 1
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@numba.njit(**JIT_OPTIONS)
def _uniform(key, pos, g):
    """``RandomState.rand()``: a double in [0, 1) from two outputs."""
    a = np.float64(_next32(key, pos, g) >> np.uint32(5))
    b = np.float64(_next32(key, pos, g) >> np.uint32(6))
    return (a * 67108864.0 + b) / 9007199254740992.0


@numba.njit(**JIT_OPTIONS)
def _reset(s, bricks, key, pos, g):
    """``Env.reset``: the ball's side is ``RandomState.randint(2)`` (legacy, masked: the
    lowest bit of one output)."""
    side = _next32(key, pos, g) & np.uint32(1)
    s[_BALL_Y] = 3
    s[_BALL_X], s[_DIR] = (0, 2) if side == 0 else (9, 3)
    s[_POS] = 4
    bricks[g] = 0
    bricks[g, 1:4, :] = 1
    s[_STRIKE] = 0
    s[_LAST_X], s[_LAST_Y] = s[_BALL_X], s[_BALL_Y]
    s[_TERMINAL] = 0


@numba.njit(**JIT_OPTIONS)
def _act(s, b, a):
    """``Env.act`` of one game (state ``s``, bricks ``b``): returns the reward."""
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
def _observe(s, b, out):
    """``Env.state()`` channels first: ``out[c, y, x]`` (uint8)."""
    out[:] = 0
    out[0, 9, s[_POS]] = 1
    out[1, s[_BALL_Y], s[_BALL_X]] = 1
    out[2, s[_LAST_Y], s[_LAST_X]] = 1
    out[3] = b


@numba.njit(**JIT_OPTIONS)
def step_games(state, bricks, key, pos, actions, sticky, obs, final, reward, done):
    """One step of every game (rows of the state arrays), in order: the sticky draw, the
    action, the observation it ends in; a finished game is reset (its next observation
    then the reset's)."""
    for g in range(state.shape[0]):
        s = state[g]
        a = actions[g]
        if _uniform(key, pos, g) < sticky:
            a = s[_LAST_ACTION]
        s[_LAST_ACTION] = a
        reward[g] = _act(s, bricks[g], a)
        done[g] = s[_TERMINAL] != 0
        _observe(s, bricks[g], final[g])
        if done[g]:
            _reset(s, bricks, key, pos, g)
            _observe(s, bricks[g], obs[g])
        else:
            obs[g] = final[g]


@numba.njit(**JIT_OPTIONS)
def _reset_all(state, bricks, key, pos, obs):
    for g in range(state.shape[0]):
        _reset(state[g], bricks, key, pos, g)
        _observe(state[g], bricks[g], obs[g])


class BreakoutGames:
    """The games of a population, taken over from ``minatar.Environment`` objects that have
    been seeded and reset (their Python state is not kept up to date afterwards)."""

    def __init__(self, games: list[Any]) -> None:
        n = len(games)
        self.sticky = float(games[0].sticky_action_prob)
        self.state = np.zeros((n, 9), dtype=np.int64)
        self.bricks = np.zeros((n, 10, 10), dtype=np.uint8)
        self.key = np.zeros((n, _N), dtype=np.uint32)
        self.pos = np.zeros(n, dtype=np.int64)
        for g, game in enumerate(games):
            env = game.env
            self.state[g] = (env.ball_x, env.ball_y, env.ball_dir, env.pos, env.strike,
                             env.last_x, env.last_y, env.terminal, game.last_action)
            self.bricks[g] = env.brick_map != 0
            _, key, position, *_ = game.random.get_state()
            self.key[g], self.pos[g] = key, position

    def reset(self) -> np.ndarray:
        """Every game reset (continuing its random numbers); the observations."""
        obs = np.empty((len(self.state), _CHANNELS, 10, 10), dtype=np.uint8)
        _reset_all(self.state, self.bricks, self.key, self.pos, obs)
        return obs

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(obs, final observations, rewards, ends)`` after the env actions ``actions``."""
        n = len(self.state)
        obs = np.empty((n, _CHANNELS, 10, 10), dtype=np.uint8)
        final = np.empty_like(obs)
        reward, done = np.empty(n), np.empty(n, dtype=np.bool_)
        step_games(self.state, self.bricks, self.key, self.pos,
                   np.ascontiguousarray(actions, dtype=np.int64), self.sticky, obs, final,
                   reward, done)
        return obs, final, reward, done
