"""The classic-control ports (Acrobot, Pendulum, MountainCar, MountainCarContinuous).

Two kinds of check, both bit for bit:

* against the generic gymnasium path (one seeded ``gym.make`` per environment) over long
  rollouts with policies that reach every ending (termination, truncation) and many
  resets: dynamics, rewards, flags, autoreset and the reset draws themselves;
* in lockstep with gymnasium's own env class from hand-set edge states (angles to wrap,
  velocities and positions at their bounds, the left wall, actions out of bounds).

And a population trained on a port equals the same population trained on gymnasium.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from study.trainer.envs import FAST_ENVS, generic_only, make_population_env
from study.trainer.envs.classic import CLASSIC_ENVS, EXACT_POW
from study.trainer.envs.generic import GymPopulationEnv

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEEDS, E = [0, 5, 9], 4


def _random_steps(env_id: str) -> int:
    return CLASSIC_ENVS[env_id].default_max_episode_steps + 20


def _policy(env_id: str, obs: np.ndarray, rng: np.random.Generator, t: int) -> np.ndarray:
    """Random actions until every episode has run into the time limit, then energy
    pumping (episodes end at the goal, at the walls, in the swing-up)."""
    shape = obs.shape[:2]
    pump = t >= _random_steps(env_id)
    if env_id == "Acrobot-v1":
        greedy = np.where(obs[..., 5] > 0, 2, 0)
        return np.where(rng.random(shape) < (0.2 if pump else 1.0), rng.integers(0, 3, shape),
                        greedy)
    if env_id == "MountainCar-v0":
        greedy = np.where(obs[..., 1] > 0, 2, 0)
        return np.where(rng.random(shape) < (0.3 if pump else 1.0), rng.integers(0, 3, shape),
                        greedy)
    if env_id == "MountainCarContinuous-v0":
        sign = np.where(obs[..., 1] >= 0, 1.0, -1.0) if pump else rng.choice([-1.0, 1.0], shape)
        # magnitudes past the bounds too: gymnasium clamps them with Python floats
        return (sign * rng.uniform(0.2, 1.6, shape))[..., None].astype(np.float32)
    return rng.uniform(-2.5, 2.5, (*shape, 1)).astype(np.float32)  # Pendulum, past bounds


@pytest.mark.parametrize("env_id", list(CLASSIC_ENVS))
def test_port_equals_the_generic_gymnasium_path(env_id: str) -> None:
    fast = make_population_env(env_id, SEEDS, E)
    assert type(fast) is CLASSIC_ENVS[env_id]
    generic = GymPopulationEnv(env_id, SEEDS, E)
    obs = fast.reset()
    np.testing.assert_array_equal(obs, generic.reset())
    rng = np.random.default_rng(0)
    ended = {"terminated": 0, "truncated": 0}
    for t in range(_random_steps(env_id) + 600):
        actions = _policy(env_id, obs, rng, t)
        a, b = fast.step(actions), generic.step(actions)
        for field in ("obs", "reward", "terminated", "truncated", "final_obs"):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype, field
            if not np.array_equal(x, y):
                where = tuple(np.argwhere(x != y)[0])
                pytest.fail(f"step {t}: {field}{list(where)} {x[where]!r} != {y[where]!r}")
        ended["terminated"] += int(a.terminated.sum())
        ended["truncated"] += int(a.truncated.sum())
        obs = a.obs
    assert ended["truncated"] >= E  # episodes ran into the time limit
    if env_id != "Pendulum-v1":  # Pendulum never terminates
        assert ended["terminated"] >= 20
    generic.close()


def _lockstep(env_id: str, states: list[np.ndarray], actions: list) -> int:
    """Step gymnasium's env class and the port from each state; returns terminations."""
    cls = CLASSIC_ENVS[env_id]
    single = cls.env_cls()
    single.reset(seed=0)
    pop = make_population_env(env_id, [0], 1)
    pop.reset()
    n_terminated = 0
    for state in states:
        for action in actions:
            single.state = state.copy()
            pop.set_state(np.asarray(state, dtype=np.float64).reshape(1, 1, -1))
            pop.elapsed_steps[:] = 0
            out = pop.step(np.asarray(action).reshape(1, 1, *np.shape(action)))
            obs, reward, terminated, _, _ = single.step(action)
            np.testing.assert_array_equal(out.final_obs[0, 0], obs)
            assert out.reward[0, 0] == reward, (state, action)
            assert out.terminated[0, 0] == terminated, (state, action)
            n_terminated += bool(terminated)
    return n_terminated


def test_acrobot_edges_lockstep() -> None:
    pi, v1, v2 = np.pi, 4 * np.pi, 9 * np.pi
    states = [np.array(s) for s in (
        [pi - 1e-9, -pi + 1e-9, v1, -v2],       # wraps both angles, velocities at the bounds
        [3.1, 3.0, 12.0, 27.0],                 # velocities clipped
        [-3.1, 0.2, -12.5, 28.2],
        [pi, 0.0, 0.0, 0.0],                    # upright: terminal
        [2.0, 1.0, 3.0, -5.0],
        [0.0, 0.0, 0.0, 0.0],
    )]
    assert _lockstep("Acrobot-v1", states, [0, 1, 2]) >= 3


def test_pendulum_edges_lockstep() -> None:
    states = [np.array(s) for s in ([np.pi, 8.0], [-np.pi, -8.0], [7.5, 7.9], [-20.0, 0.0],
                                    [0.0, 0.0], [3.0, -7.99])]
    actions = [np.array([a], dtype=np.float32) for a in (-2.0, 2.0, 0.3, -3.7, 5.0, 0.0)]
    _lockstep("Pendulum-v1", states, actions)


def test_mountaincar_edges_lockstep() -> None:
    states = [np.array(s) for s in ([-1.2, -0.07], [-1.19, -0.069], [0.49, 0.07],
                                    [0.5, 0.0], [0.45, -0.001], [-0.5, 0.0699])]
    assert _lockstep("MountainCar-v0", states, [0, 1, 2]) >= 2


def test_mountaincar_continuous_edges_lockstep() -> None:
    # gymnasium keeps this env's state in float32 after every step
    states = [np.array(s, dtype=np.float32) for s in (
        [-1.2, -0.07], [-1.1999, -0.0699], [0.44, 0.07], [0.45, 0.0], [0.6, 0.07],
        [-0.5, 0.0699], [0.4499, 0.0001])]
    actions = [np.array([a], dtype=np.float32) for a in (-1.0, 1.0, 0.37, -1.5, 2.0, 0.0)]
    assert _lockstep("MountainCarContinuous-v0", states, actions) >= 6


def test_glibc_pow_is_used_here() -> None:
    # The bit-identity above relies on calling libm's pow for NumPy's x**2; on glibc it is.
    assert EXACT_POW


@pytest.mark.parametrize("env_id", ["Acrobot-v1", "MountainCarContinuous-v0"])
def test_a_member_is_the_same_alone_and_in_a_population(env_id: str) -> None:
    def rollout(seeds: list[int]) -> list[np.ndarray]:
        pop = make_population_env(env_id, seeds, 2)
        rows = [pop.reset()[seeds.index(7)]]
        rng = np.random.default_rng(1)
        for t in range(600):
            actions = _policy(env_id, np.zeros((1, 2, 6)), rng, t)
            out = pop.step(np.repeat(actions, len(seeds), axis=0))
            i = seeds.index(7)
            rows += [out.obs[i], out.reward[i], out.terminated[i], out.final_obs[i]]
        return rows

    alone, inside = rollout([7]), rollout([3, 7, 11])
    for x, y in zip(alone, inside, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("env_id", ["Acrobot-v1", "Pendulum-v1"])
def test_training_on_a_port_equals_training_on_gymnasium(env_id: str) -> None:
    from study.config import resolve
    from study.trainer.population import Member, train_population

    members = [Member(resolve({"num_envs": 2, "n_steps": 8}), s) for s in (1, 2)]

    def curves() -> list[dict[str, np.ndarray]]:
        return [r.curve for r in train_population(env_id, members, 1200, log_every=400)]

    fast = curves()
    with generic_only(env_id):
        assert env_id in FAST_ENVS and type(make_population_env(env_id, [0], 1)) is \
            GymPopulationEnv
        slow = curves()
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_port_spaces_match_gymnasium() -> None:
    for env_id in CLASSIC_ENVS:
        env = gym.make(env_id)
        pop = make_population_env(env_id, [0], 1)
        assert pop.observation_space == env.observation_space
        assert pop.action_space == env.action_space
        assert pop.max_episode_steps == env.spec.max_episode_steps
