"""NumPy-vectorized population CartPole (gymnasium CartPole-v0 / CartPole-v1 dynamics).

The physics, thresholds, reward and reset distribution are those of gymnasium's
``classic_control/cartpole.py`` (euler integrator, reward 1.0 on every step including the
terminating one) with the time limit of the registered ``TimeLimit`` wrapper (200 steps
for v0, 500 for v1). Arithmetic is written in the same order as gymnasium's so that a
population environment and ``gym.make("CartPole-v1")`` started from the same state and
driven by the same actions agree to the last bit.

This module also holds what every fast population environment shares: per-environment
counter-based reset draws (:class:`ResetDraws`) and the state layout, time limit and
autoreset logic (:class:`FastPopulationEnv`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numba
import numpy as np

from study.trainer.envs.base import Step
from study.trainer.kernels import JIT_OPTIONS
from study.trainer.rng import _GOLDEN, _INV_2_53, STREAM_RESET, MemberStreams, _mix64


class ResetDraws:
    """Uniform draws for environment resets, one counter-based stream per member.

    Reset number ``n`` of environment ``e`` of a member uses draws
    ``(n * E + e) * K + k`` (``k < K``) of that member's stream (the MemberStreams
    stream of the given id), i.e. each "round" of resets owns a block ``[E, K]`` of the
    stream, laid out like ``MemberStreams.uniform((E, K))``. A draw depends only on the
    member's key, the environment index and the reset number, so a member's resets are
    the same alone or inside any population, and any reset can be computed at any time
    (random access), which lets the population compute them ahead in batches.
    """

    def __init__(self, seeds: Sequence[int], n_envs: int, n_draws: int, stream: int) -> None:
        keys = MemberStreams(seeds, stream).keys  # [S] uint64
        self.keys = keys
        self.n_envs = int(n_envs)
        self.n_draws = int(n_draws)
        # Flat over (member, env), indexed by ``member * E + env``.
        self._keys = np.repeat(keys, self.n_envs)
        self._env_index = np.tile(np.arange(self.n_envs, dtype=np.uint64), len(keys))

    def uniform(self, reset_numbers: np.ndarray) -> np.ndarray:
        """Draws in [0, 1) shaped ``[R, N, K]`` for reset numbers ``[R, N]`` of every
        environment (``N = S * E`` flat over ``member * E + env``)."""
        n = np.asarray(reset_numbers, dtype=np.uint64)
        first = (n * np.uint64(self.n_envs) + self._env_index) * np.uint64(self.n_draws)
        offsets = np.arange(1, self.n_draws + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = (first[..., None] + offsets) * _GOLDEN + self._keys[:, None]
            bits = _mix64(x)
        return (bits >> np.uint64(11)).astype(np.float64) * _INV_2_53


class FastPopulationEnv:
    """Base of the NumPy population environments: state, time limit and autoreset.

    Subclasses keep their state as ``self._state`` shaped ``[C, S, E]`` float64, one
    contiguous ``[S, E]`` plane per component (arithmetic on contiguous planes is about
    twice as fast as on interleaved components). The first ``obs_dim`` rows are the
    observation, in order; ``state_rows`` says where x, x_dot, theta, theta_dot live.
    Subclasses implement :meth:`_sample` and :meth:`_advance`.

    Reset states are computed ahead, ``R`` per environment, in one batch whenever some
    environment has used up its ``R`` (a reset costs a few gathers instead of ~20 small
    NumPy calls of hashing). Because the draws are random access, recomputing the unused
    ones in the next batch gives the same values, so what an environment gets is
    independent of when batches happen and of the other members.

    ``elapsed_steps`` (``[S, E]`` int64) counts steps since each environment's last reset,
    like gymnasium's ``TimeLimit``; it may be modified in place (tests do).
    """

    observation_space: gym.spaces.Box
    action_space: gym.spaces.Space
    #: The port's name in study.trainer.compiled_a2c's compiled environments, where it has
    #: compiled versions of :meth:`_advance` and :meth:`_sample` (None: it has not).
    compiled_port: str | None = None
    n_draws: int  # uniforms consumed by one environment reset
    n_components: int  # rows of self._state
    obs_dim: int  # leading rows of self._state that form the observation
    state_rows: tuple[int, ...]  # rows of the state (CartPole: x, x_dot, theta, theta_dot)

    def __init__(
        self,
        seeds: Sequence[int],
        num_envs: int,
        stream: int = STREAM_RESET,
        max_episode_steps: int = 500,
    ) -> None:
        if len(seeds) == 0 or num_envs < 1:
            raise ValueError("need at least one seed and num_envs >= 1")
        self.n_members = len(seeds)
        self.n_envs = int(num_envs)
        self.max_episode_steps = int(max_episode_steps)
        n = self.n_members * self.n_envs
        self._state = np.zeros((self.n_components, self.n_members, self.n_envs))
        self.elapsed_steps = np.zeros((self.n_members, self.n_envs), dtype=np.int64)
        # Flat views over (member, env) for the autoreset scatter.
        self._flat_state = self._state.reshape(self.n_components, -1)
        self._flat_elapsed = self.elapsed_steps.reshape(-1)
        # Reset states computed ahead: about 4 MB at most, at least 2 per environment.
        self._draws = ResetDraws(seeds, self.n_envs, self.n_draws, stream)
        self._ahead = int(np.clip(2**19 // (n * (self.n_components + self.obs_dim)), 2, 16))
        self._resets_done = np.zeros(n, dtype=np.int64)  # before the current batch
        self._batch_used = np.zeros(n, dtype=np.int64)  # of the current batch
        self._batch_ready = False
        self._batch_state = np.empty((self._ahead, n, self.n_components))
        self._batch_obs = np.empty((self._ahead, n, self.obs_dim), dtype=np.float32)
        self._obs_axes = (1, 2, 0)
        self._started = False

    # -- subclass hooks -------------------------------------------------------------
    def _sample(self, u: np.ndarray) -> np.ndarray:
        """Fresh states ``[..., C]`` from uniforms ``[..., n_draws]``."""
        raise NotImplementedError

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Advance ``self._state`` one step in place; return ``(reward, terminated)``."""
        raise NotImplementedError

    # -- internals --------------------------------------------------------------------
    def _observe(self, state: np.ndarray) -> np.ndarray:
        """Float32 observations ``[S, E, obs_dim]`` of states ``[C, S, E]``."""
        # transpose + astype is one C-level pass (np.moveaxis costs more in Python).
        return state[: self.obs_dim].transpose(self._obs_axes).astype(np.float32, order="C")

    def _refill(self) -> None:
        """Compute the next ``R`` reset states of every environment."""
        self._resets_done += self._batch_used
        self._batch_used[:] = 0
        self._batch_ready = True
        numbers = self._resets_done + np.arange(self._ahead)[:, None]  # [R, N]
        fresh = self._sample(self._draws.uniform(numbers))  # [R, N, C]
        self._batch_state[:] = fresh
        self._batch_obs[:] = fresh[..., : self.obs_dim]

    def _reset_envs(self, flat_envs: np.ndarray) -> np.ndarray:
        """Give the listed environments (flat ``member * E + env``) their next reset state;
        returns the batch slots used (for ``self._batch_obs``)."""
        used = self._batch_used[flat_envs]
        if not self._batch_ready or used.max() >= self._ahead:
            self._refill()
            used = self._batch_used[flat_envs]
        _reset_from_batch(flat_envs, used, self._batch_state, self._flat_state,
                          self._batch_used, self._flat_elapsed)  # fmt: skip
        return used

    # -- PopulationEnv ----------------------------------------------------------------
    def reset(self) -> np.ndarray:
        """Reset every environment (continuing the reset streams); ``[S, E, obs_dim]``."""
        self._reset_envs(np.arange(self.n_members * self.n_envs))
        self._started = True
        return self._observe(self._state)

    def step(self, actions: np.ndarray) -> Step:
        """Step every environment; environments that end are reset (see :class:`Step`)."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        reward, terminated = self._advance(actions)
        shape = (self.n_members, self.n_envs)
        truncated = np.empty(shape, dtype=bool)
        final_obs = np.empty((*shape, self.obs_dim), dtype=np.float32)
        obs = np.empty_like(final_obs)
        ended = np.empty(self.n_members * self.n_envs, dtype=np.int64)
        # gymnasium's TimeLimit truncates whenever the limit is reached, even on the
        # step that also terminates (then both flags are True).
        n_ended = _count_and_observe(self._state, self.elapsed_steps, self.max_episode_steps,
                                     terminated, truncated, final_obs, obs, ended)  # fmt: skip
        if n_ended:
            ended = ended[:n_ended]
            used = self._reset_envs(ended)
            obs.reshape(-1, self.obs_dim)[ended] = self._batch_obs[used, ended]
        return Step(obs, reward, terminated, truncated, final_obs)

    def close(self) -> None:
        """Nothing to release."""

    # -- the compiled loop's access (study.trainer.compiled_a2c) ---------------------
    def reset_numbers(self) -> np.ndarray:
        """The number of the next reset of each environment, ``[S, E]`` uint64: its state
        comes from draws ``(n * E + e) * K + 1 ..`` of its member's reset stream."""
        return (self._resets_done + self._batch_used).astype(np.uint64).reshape(
            self.n_members, self.n_envs)

    def set_reset_numbers(self, numbers: np.ndarray) -> None:
        """Continue from reset numbers ``[S, E]`` (after a compiled loop reset environments
        itself; the states computed ahead are recomputed when next needed)."""
        self._resets_done[:] = numbers.reshape(-1).astype(np.int64)
        self._batch_used[:] = 0
        self._batch_ready = False

    @property
    def reset_keys(self) -> np.ndarray:
        """Each member's reset stream key, ``[S]`` uint64."""
        return self._draws.keys

    # -- state access (tests, debugging) ----------------------------------------------
    def get_state(self) -> np.ndarray:
        """Physical state ``[S, E, 4]`` float64 in gymnasium's ``env.unwrapped.state`` order
        (x, x_dot, theta, theta_dot)."""
        return self._state[list(self.state_rows)].transpose(1, 2, 0).copy()

    def set_state(self, state: np.ndarray) -> None:
        """Overwrite the physical state with ``[S, E, 4]`` values (gymnasium's order)."""
        planes = np.moveaxis(np.asarray(state, dtype=np.float64), -1, 0)
        for row, plane in zip(self.state_rows, planes, strict=True):
            self._state[row] = plane
        self._started = True

    def observe(self) -> np.ndarray:
        """Observations ``[S, E, obs_dim]`` of the current state."""
        return self._observe(self._state)


@numba.njit(**JIT_OPTIONS)
def _count_and_observe(state, elapsed, max_steps, terminated, truncated, final_obs, obs, ended):
    """After a step: count it in ``elapsed`` (``[S, E]``), flag time-limit truncations,
    write the float32 observations of ``state`` (``[C, S, E]``, leading rows) into
    ``final_obs`` and ``obs``, and list the environments that ended (flat ``s * E + e``,
    ascending) in ``ended``; returns how many did."""
    n_members, n_envs = terminated.shape
    obs_dim = final_obs.shape[2]
    n = 0
    for s in range(n_members):
        for e in range(n_envs):
            steps = elapsed[s, e] + 1
            elapsed[s, e] = steps
            truncated[s, e] = steps >= max_steps
            for k in range(obs_dim):
                v = np.float32(state[k, s, e])
                final_obs[s, e, k] = v
                obs[s, e, k] = v
            if terminated[s, e] or truncated[s, e]:
                ended[n] = s * n_envs + e
                n += 1
    return n


@numba.njit(**JIT_OPTIONS)
def _reset_from_batch(flat_envs, used, batch_state, flat_state, batch_used, flat_elapsed):
    """Environments ``flat_envs`` take reset states ``batch_state[used[i], flat_envs[i]]``."""
    for i in range(flat_envs.shape[0]):
        env = flat_envs[i]
        for c in range(flat_state.shape[0]):
            flat_state[c, env] = batch_state[used[i], env, c]
        batch_used[env] = used[i] + 1
        flat_elapsed[env] = 0


# Physics constants of gymnasium's CartPoleEnv.
GRAVITY = 9.8
MASSCART = 1.0
MASSPOLE = 0.1
TOTAL_MASS = MASSPOLE + MASSCART
LENGTH = 0.5  # half the pole's length
POLEMASS_LENGTH = MASSPOLE * LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4


def cartpole_spaces() -> tuple[gym.spaces.Box, gym.spaces.Discrete]:
    """Observation and action space of one CartPole environment (as gymnasium's)."""
    high = np.array([X_THRESHOLD * 2, np.inf, THETA_THRESHOLD * 2, np.inf], dtype=np.float32)
    return gym.spaces.Box(-high, high, dtype=np.float32), gym.spaces.Discrete(2)


class CartPolePopulation(FastPopulationEnv):
    """``S x E`` CartPole environments stepped together (one compiled loop per step).

    ``max_episode_steps`` is 200 for CartPole-v0 and 500 for CartPole-v1. Actions are
    ``[S, E]`` integers 0 (push left) or 1 (push right).
    """

    n_draws = 4
    compiled_port = "cartpole"
    # Rows x, x_dot, theta, theta_dot: the observation as it is.
    n_components = 4
    obs_dim = 4
    state_rows = (0, 1, 2, 3)

    def __init__(
        self,
        seeds: Sequence[int],
        num_envs: int,
        stream: int = STREAM_RESET,
        max_episode_steps: int = 500,
    ) -> None:
        super().__init__(seeds, num_envs, stream, max_episode_steps)
        self.observation_space, self.action_space = cartpole_spaces()

    def _sample(self, u: np.ndarray) -> np.ndarray:
        # gymnasium: np_random.uniform(-0.05, 0.05, size=4) = low + (high - low) * u
        return -0.05 + 0.1 * u

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        terminated = np.empty((self.n_members, self.n_envs), dtype=bool)
        # Actions must be 0 or 1 (gymnasium asserts it; we do not check).
        _cartpole_step(self._state, np.asarray(actions), terminated)
        return np.ones((self.n_members, self.n_envs)), terminated


@numba.njit(**JIT_OPTIONS)
def _cartpole_step(state: np.ndarray, actions: np.ndarray, terminated: np.ndarray) -> None:
    """Advance states ``[4, S, E]`` (x, x_dot, theta, theta_dot) one step in place.

    The operations of gymnasium's ``CartPoleEnv.step`` in the same order (and the same
    libm cos and sin), so the results agree to the last bit; Euler from the old state.
    """
    for s in range(actions.shape[0]):
        for e in range(actions.shape[1]):
            x, x_dot = state[0, s, e], state[1, s, e]
            theta, theta_dot = state[2, s, e], state[3, s, e]
            force = FORCE_MAG if actions[s, e] == 1 else -FORCE_MAG
            costheta = math.cos(theta)
            sintheta = math.sin(theta)
            temp = (force + POLEMASS_LENGTH * (theta_dot * theta_dot) * sintheta) / TOTAL_MASS
            thetaacc = (GRAVITY * sintheta - costheta * temp) / (
                LENGTH * (4.0 / 3.0 - MASSPOLE * (costheta * costheta) / TOTAL_MASS)
            )
            xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
            x = x + TAU * x_dot
            state[0, s, e] = x
            state[1, s, e] = x_dot + TAU * xacc
            theta = theta + TAU * theta_dot
            state[2, s, e] = theta
            state[3, s, e] = theta_dot + TAU * thetaacc
            terminated[s, e] = (
                x < -X_THRESHOLD or x > X_THRESHOLD
                or theta < -THETA_THRESHOLD or theta > THETA_THRESHOLD
            )  # fmt: skip


@numba.njit(**JIT_OPTIONS)
def compiled_sample(u: np.ndarray, state: np.ndarray) -> None:
    """:meth:`CartPolePopulation._sample` of one environment: ``state[c]`` from ``u[c]``."""
    for c in range(4):
        state[c] = -0.05 + 0.1 * u[c]


@numba.njit(**JIT_OPTIONS)
def compiled_step(state: np.ndarray, actions: np.ndarray, terminated: np.ndarray,
                  reward: np.ndarray) -> None:
    """:meth:`CartPolePopulation._advance` into ``terminated`` and ``reward`` (``[S, E]``)."""
    _cartpole_step(state, actions, terminated)
    reward[:] = 1.0
