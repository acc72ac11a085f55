"""Population versions of gymnasium's classic-control tasks beyond CartPole.

``Acrobot-v1``, ``Pendulum-v1``, ``MountainCar-v0`` and ``MountainCarContinuous-v0``,
each stepped by one compiled loop over all ``S x E`` environments. They reproduce the
generic gymnasium path (:class:`study.trainer.envs.generic.GymPopulationEnv`) bit for bit, resets
included, so training on them gives the same values as before they existed:

* **Dynamics.** Each kernel performs gymnasium's operations in gymnasium's order, in
  gymnasium's dtypes: where gymnasium mixes a float32 action or float32 state with
  Python floats, NumPy 2 computes in float32 (NEP 50), and so does the kernel. Squares
  written ``x**2`` on NumPy scalars are libm's ``pow`` (not ``x*x``: the two differ in
  the last bit about once in a thousand), called here by its glibc alias ``powf64`` /
  ``powf32`` so that LLVM cannot turn it into a multiplication.
* **Resets.** Every environment owns a NumPy ``Generator(PCG64(seed))`` seeded like a
  gymnasium instance of the generic path (:func:`~study.trainer.envs.generic.instance_seed` of
  the member seed, the environment index and the stream) and draws its reset states with
  gymnasium's own ``uniform`` calls, so a member's resets depend on nothing else.
* **Time limits** are those of the registered ``TimeLimit`` wrappers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import Sequence
from typing import cast

import gymnasium as gym
import numba
import numpy as np
from gymnasium.envs.classic_control import (
    AcrobotEnv,
    Continuous_MountainCarEnv,
    MountainCarEnv,
    PendulumEnv,
)
from numba import types

from study.trainer.envs.cartpole import FastPopulationEnv
from study.trainer.envs.generic import instance_seed
from study.trainer.kernels import JIT_OPTIONS
from study.trainer.rng import STREAM_RESET

__all__ = [
    "AcrobotPopulation",
    "MountainCarContinuousPopulation",
    "MountainCarPopulation",
    "PendulumPopulation",
    "classic_spaces",
]


def _has_glibc_pow_aliases() -> bool:
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return False
    return hasattr(libm, "powf64") and hasattr(libm, "powf32")


if _has_glibc_pow_aliases():
    _pow = types.ExternalFunction("powf64", types.float64(types.float64, types.float64))
    _powf = types.ExternalFunction("powf32", types.float32(types.float32, types.float32))
    EXACT_POW = True
else:  # pragma: no cover - non-glibc systems: within one ulp per square of gymnasium's
    EXACT_POW = False

    @numba.njit(**JIT_OPTIONS)
    def _pow(x, y):  # noqa: ANN001, ANN202
        return math.pow(x, y)

    @numba.njit(**JIT_OPTIONS)
    def _powf(x, y):  # noqa: ANN001, ANN202
        return np.float32(math.pow(x, y))


def classic_spaces(env_cls: type[gym.Env]) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """Observation and action space of one environment, as gymnasium's class makes them
    (built without ``gym.make``: no wrappers, no rendering)."""
    env = env_cls()
    try:
        return cast(gym.spaces.Box, env.observation_space), env.action_space
    finally:
        env.close()


class SeededPopulationEnv(FastPopulationEnv):
    """A fast population env whose resets are drawn by per-environment NumPy generators
    exactly as a seeded gymnasium instance draws them (see the module docstring).

    Subclasses set the class attributes of :class:`FastPopulationEnv`, ``env_cls`` and
    ``max_episode_steps``, and implement :meth:`_draw` (one reset state, gymnasium's calls)
    and :meth:`_advance`.
    """

    env_cls: type[gym.Env]
    default_max_episode_steps: int

    def __init__(self, seeds: Sequence[int], num_envs: int, stream: int = STREAM_RESET,
                 max_episode_steps: int | None = None) -> None:
        super().__init__(seeds, num_envs, stream,
                         max_episode_steps or self.default_max_episode_steps)
        self.observation_space, self.action_space = classic_spaces(self.env_cls)
        self._rngs = [np.random.Generator(np.random.PCG64(instance_seed(s, e, stream)))
                      for s in seeds for e in range(self.n_envs)]

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """One reset state ``[C]`` (float64 rows, observation rows first)."""
        raise NotImplementedError

    def _sample(self, u: np.ndarray) -> np.ndarray:  # pragma: no cover - not used
        raise NotImplementedError("resets are drawn by _draw")

    def _reset_envs(self, flat_envs: np.ndarray) -> np.ndarray:
        for env in flat_envs.tolist():
            fresh = self._draw(self._rngs[env])
            self._flat_state[:, env] = fresh
            self._batch_obs[0, env] = fresh[: self.obs_dim]
        self._flat_elapsed[flat_envs] = 0
        return np.zeros(len(flat_envs), dtype=np.int64)

    def set_state(self, state: np.ndarray) -> None:
        """Overwrite the physical state with ``[S, E, k]`` values in the order of
        gymnasium's ``env.unwrapped.state``; the observation rows follow from it."""
        super().set_state(state)
        self._derive()

    def _derive(self) -> None:
        """Recompute the observation rows from the physical rows (after set_state)."""


def _actions(actions: np.ndarray, shape: tuple[int, int], dtype: type) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(actions, dtype=dtype).reshape(shape))


# --------------------------------------------------------------------------------------
# Acrobot-v1


class AcrobotPopulation(SeededPopulationEnv):
    """``Acrobot-v1``: rows cos t1, sin t1, cos t2, sin t2, dt1, dt2 (the observation),
    then t1, t2; actions 0, 1, 2 (torque -1, 0, +1); RK4 over 0.2 s, book dynamics."""

    env_cls = AcrobotEnv
    default_max_episode_steps = 500
    n_components = 8
    obs_dim = 6
    state_rows = (6, 7, 4, 5)  # gymnasium's state: theta1, theta2, dtheta1, dtheta2
    n_draws = 4

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        s = rng.uniform(low=-0.1, high=0.1, size=(4,)).astype(np.float32)
        # gymnasium's _get_ob on the float32 state: float32 cos and sin
        obs = np.array([np.cos(s[0]), np.sin(s[0]), np.cos(s[1]), np.sin(s[1]), s[2], s[3]],
                       dtype=np.float32)
        return np.concatenate([obs.astype(np.float64), s[:2].astype(np.float64)])

    def _derive(self) -> None:
        t1, t2 = self._state[6], self._state[7]
        self._state[0], self._state[1] = np.cos(t1), np.sin(t1)
        self._state[2], self._state[3] = np.cos(t2), np.sin(t2)

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.n_members, self.n_envs)
        reward = np.empty(shape)
        terminated = np.empty(shape, dtype=bool)
        _acrobot_step(self._state, _actions(actions, shape, np.int64), reward, terminated)
        return reward, terminated


_MAX_VEL_1 = 4 * np.pi
_MAX_VEL_2 = 9 * np.pi


@numba.njit(**JIT_OPTIONS)
def _acrobot_dsdt(t1, t2, dt1, dt2, a):  # noqa: ANN001, ANN202
    """AcrobotEnv._dsdt ("book"), constants folded exactly as Python evaluates them."""
    m1 = m2 = l1 = 1.0
    lc1 = lc2 = 0.5
    moi = 1.0
    g = 9.8
    c2 = np.cos(t2)
    s2 = np.sin(t2)
    d1 = m1 * lc1**2 + m2 * (l1**2 + lc2**2 + 2 * l1 * lc2 * c2) + moi + moi
    d2 = m2 * (lc2**2 + l1 * lc2 * c2) + moi
    phi2 = m2 * lc2 * g * np.cos(t1 + t2 - np.pi / 2.0)
    phi1 = (-m2 * l1 * lc2 * _pow(dt2, 2.0) * s2
            - 2 * m2 * l1 * lc2 * dt2 * dt1 * s2
            + (m1 * lc1 + m2 * l1) * g * np.cos(t1 - np.pi / 2)
            + phi2)
    ddt2 = ((a + d2 / d1 * phi1 - m2 * l1 * lc2 * _pow(dt1, 2.0) * s2 - phi2)
            / (m2 * lc2**2 + moi - _pow(d2, 2.0) / d1))
    ddt1 = -(d2 * ddt2 + phi1) / d1
    return dt1, dt2, ddt1, ddt2


@numba.njit(**JIT_OPTIONS)
def _wrap(x, m, big):  # noqa: ANN001, ANN202
    diff = big - m
    while x > big:
        x = x - diff
    while x < m:
        x = x + diff
    return x


@numba.njit(**JIT_OPTIONS)
def _bound(x, m, big):  # noqa: ANN001, ANN202
    # min(max(x, m), M) with Python's builtins (NaN stays NaN)
    if m > x:
        x = m
    if big < x:
        x = big
    return x


@numba.njit(**JIT_OPTIONS)
def _acrobot_step(state, actions, reward, terminated):  # noqa: ANN001, ANN202
    """Advance ``[8, S, E]`` states one RK4 step of 0.2 s (gymnasium's ``rk4``: the
    torque rides along as a fifth component whose derivative is 0)."""
    dt = 0.2 - 0
    h = dt / 2.0
    w = dt / 6.0
    for s in range(actions.shape[0]):
        for e in range(actions.shape[1]):
            a = float(actions[s, e]) - 1.0  # AVAIL_TORQUE = [-1.0, 0.0, +1]
            y0, y1, y2, y3 = state[6, s, e], state[7, s, e], state[4, s, e], state[5, s, e]
            a1, b1, c1, d1 = _acrobot_dsdt(y0, y1, y2, y3, a)
            a2, b2, c2, d2 = _acrobot_dsdt(y0 + h * a1, y1 + h * b1, y2 + h * c1,
                                           y3 + h * d1, a + h * 0.0)
            a3, b3, c3, d3 = _acrobot_dsdt(y0 + h * a2, y1 + h * b2, y2 + h * c2,
                                           y3 + h * d2, a + h * 0.0)
            a4, b4, c4, d4 = _acrobot_dsdt(y0 + dt * a3, y1 + dt * b3, y2 + dt * c3,
                                           y3 + dt * d3, a + dt * 0.0)
            n0 = y0 + w * (a1 + 2 * a2 + 2 * a3 + a4)
            n1 = y1 + w * (b1 + 2 * b2 + 2 * b3 + b4)
            n2 = y2 + w * (c1 + 2 * c2 + 2 * c3 + c4)
            n3 = y3 + w * (d1 + 2 * d2 + 2 * d3 + d4)
            n0 = _wrap(n0, -np.pi, np.pi)
            n1 = _wrap(n1, -np.pi, np.pi)
            n2 = _bound(n2, -_MAX_VEL_1, _MAX_VEL_1)
            n3 = _bound(n3, -_MAX_VEL_2, _MAX_VEL_2)
            state[6, s, e], state[7, s, e], state[4, s, e], state[5, s, e] = n0, n1, n2, n3
            state[0, s, e], state[1, s, e] = np.cos(n0), np.sin(n0)
            state[2, s, e], state[3, s, e] = np.cos(n1), np.sin(n1)
            done = -np.cos(n0) - np.cos(n1 + n0) > 1.0
            terminated[s, e] = done
            reward[s, e] = 0.0 if done else -1.0


# --------------------------------------------------------------------------------------
# Pendulum-v1


class PendulumPopulation(SeededPopulationEnv):
    """``Pendulum-v1``: rows cos th, sin th, thdot (the observation), then th; actions
    ``[S, E, 1]`` torques (float32, clipped to [-2, 2] as gymnasium clips them)."""

    env_cls = PendulumEnv
    default_max_episode_steps = 200
    n_components = 4
    obs_dim = 3
    state_rows = (3, 2)  # th, thdot
    n_draws = 2

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        high = np.array([np.pi, 1.0])
        th, thdot = rng.uniform(low=-high, high=high)
        return np.array([np.cos(th), np.sin(th), thdot, th])

    def _derive(self) -> None:
        self._state[0], self._state[1] = np.cos(self._state[3]), np.sin(self._state[3])

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.n_members, self.n_envs)
        reward = np.empty(shape)
        _pendulum_step(self._state, _actions(actions, shape, np.float32), reward)
        return reward, np.zeros(shape, dtype=bool)


@numba.njit(**JIT_OPTIONS)
def _clip(x, low, high):  # noqa: ANN001, ANN202
    # np.clip: NaN stays NaN
    return x if x != x else min(max(x, low), high)


@numba.njit(**JIT_OPTIONS)
def _pendulum_step(state, actions, reward):  # noqa: ANN001, ANN202
    g, m, length, dt = 10.0, 1.0, 1.0, 0.05
    for s in range(actions.shape[0]):
        for e in range(actions.shape[1]):
            th, thdot = state[3, s, e], state[2, s, e]
            u = _clip(actions[s, e], np.float32(-2.0), np.float32(2.0))  # float32
            normalized = ((th + np.pi) % (2 * np.pi)) - np.pi
            # 0.001 * u**2 and 3.0 * u are float32 products (a float32 scalar meets a
            # Python float); the sums with float64 terms are float64.
            costs = (_pow(normalized, 2.0) + 0.1 * _pow(thdot, 2.0)
                     + np.float32(np.float32(0.001) * _powf(u, np.float32(2.0))))
            torque = np.float32(np.float32(3.0 / (m * length**2)) * u)
            newthdot = thdot + (3 * g / (2 * length) * np.sin(th) + torque) * dt
            newthdot = _clip(newthdot, -8.0, 8.0)
            newth = th + newthdot * dt
            state[3, s, e], state[2, s, e] = newth, newthdot
            state[0, s, e], state[1, s, e] = np.cos(newth), np.sin(newth)
            reward[s, e] = -costs


# --------------------------------------------------------------------------------------
# MountainCar-v0 and MountainCarContinuous-v0


class MountainCarPopulation(SeededPopulationEnv):
    """``MountainCar-v0``: rows position, velocity; actions 0, 1, 2 (push left, none,
    right)."""

    env_cls = MountainCarEnv
    default_max_episode_steps = 200
    n_components = 2
    obs_dim = 2
    state_rows = (0, 1)
    n_draws = 1

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.uniform(low=-0.6, high=-0.4), 0])

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.n_members, self.n_envs)
        terminated = np.empty(shape, dtype=bool)
        _mountaincar_step(self._state, _actions(actions, shape, np.int64), terminated)
        return np.full(shape, -1.0), terminated


@numba.njit(**JIT_OPTIONS)
def _mountaincar_step(state, actions, terminated):  # noqa: ANN001, ANN202
    for s in range(actions.shape[0]):
        for e in range(actions.shape[1]):
            position, velocity = state[0, s, e], state[1, s, e]
            velocity += (actions[s, e] - 1) * 0.001 + math.cos(3 * position) * (-0.0025)
            velocity = _clip(velocity, -0.07, 0.07)
            position += velocity
            position = _clip(position, -1.2, 0.6)
            if position == -1.2 and velocity < 0:
                velocity = 0.0
            terminated[s, e] = position >= 0.5 and velocity >= 0
            state[0, s, e], state[1, s, e] = position, velocity


class MountainCarContinuousPopulation(SeededPopulationEnv):
    """``MountainCarContinuous-v0``: rows position, velocity, then a flag that is 1 until
    the first step after a reset; actions ``[S, E, 1]`` forces (float32).

    gymnasium keeps the state in float64 after a reset and in float32 after every step,
    and NumPy's arithmetic follows the state's dtype: the flag picks the same rounding.
    """

    env_cls = Continuous_MountainCarEnv
    default_max_episode_steps = 999
    n_components = 3
    obs_dim = 2
    state_rows = (0, 1)
    n_draws = 1

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return np.array([rng.uniform(low=-0.6, high=-0.4), 0, 1.0])

    def set_state(self, state: np.ndarray) -> None:
        """As gymnasium's ``env.unwrapped.state``: float32 values, as after a step."""
        super().set_state(state)
        self._state[2] = 0.0

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = (self.n_members, self.n_envs)
        reward = np.empty(shape)
        terminated = np.empty(shape, dtype=bool)
        _continuous_mountaincar_step(self._state, _actions(actions, shape, np.float32),
                                     reward, terminated)
        return reward, terminated


@numba.njit(**JIT_OPTIONS)
def _continuous_mountaincar_step(state, actions, reward, terminated):  # noqa: ANN001, ANN202
    f32 = np.float32
    for s in range(actions.shape[0]):
        for e in range(actions.shape[1]):
            a = actions[s, e]
            p, v = state[0, s, e], state[1, s, e]
            # force = min(max(a, -1.0), 1.0): a float32 action, or a Python float bound
            clamped = a < -1.0 or a > 1.0
            bound = -1.0 if a < -1.0 else 1.0
            if state[2, s, e] != 0.0:  # float64 state (the first step after a reset)
                c = 0.0025 * math.cos(3 * p)
                if clamped:
                    x = bound * 0.0015 - c
                else:
                    x = np.float64(f32(f32(a * f32(0.0015)) - f32(c)))
                v = v + x
                v = 0.07 if v > 0.07 else v
                v = -0.07 if v < -0.07 else v
                p = p + v
                p = 0.6 if p > 0.6 else p
                p = -1.2 if p < -1.2 else p
                if p == -1.2 and v < 0:
                    v = 0.0
                done = p >= 0.45 and v >= 0
            else:  # float32 state: float32 arithmetic and comparisons
                p32, v32 = f32(p), f32(v)
                c = 0.0025 * math.cos(np.float64(f32(3 * p32)))  # Python: cos of a double
                if clamped:
                    x32 = f32(bound * 0.0015 - c)
                else:
                    x32 = f32(f32(a * f32(0.0015)) - f32(c))
                v32 = f32(v32 + x32)
                v32 = f32(0.07) if v32 > f32(0.07) else v32
                v32 = f32(-0.07) if v32 < f32(-0.07) else v32
                p32 = f32(p32 + v32)
                p32 = f32(0.6) if p32 > f32(0.6) else p32
                p32 = f32(-1.2) if p32 < f32(-1.2) else p32
                if p32 == f32(-1.2) and v32 < 0:
                    v32 = f32(0.0)
                done = p32 >= f32(0.45) and v32 >= 0
                p, v = np.float64(p32), np.float64(v32)
            terminated[s, e] = done
            reward[s, e] = (100.0 if done else 0.0) - _pow(np.float64(a), 2.0) * 0.1
            state[0, s, e], state[1, s, e] = np.float64(f32(p)), np.float64(f32(v))
            state[2, s, e] = 0.0


#: The ports by gymnasium id: (population class, time limit of the registered id).
CLASSIC_ENVS: dict[str, type[SeededPopulationEnv]] = {
    "Acrobot-v1": AcrobotPopulation,
    "Pendulum-v1": PendulumPopulation,
    "MountainCar-v0": MountainCarPopulation,
    "MountainCarContinuous-v0": MountainCarContinuousPopulation,
}
