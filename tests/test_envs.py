"""Population environments: dynamics vs gymnasium / the reference, time limits, autoreset,
per-member determinism, the generic gymnasium path and input errors."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

from study.config import ConfigError
from study.trainer.envs import (
    FAST_ENVS,
    env_spaces,
    generic_only,
    make_population_env,
    register_envs,
)
from study.trainer.envs.generic import instance_seed
from study.trainer.envs.swingup import CartPoleSwingUpV0, CartPoleSwingUpV1
from study.trainer.rng import STREAM_EVAL_RESET, STREAM_RESET, MemberStreams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CARTPOLE_LIMITS = {"CartPole-v0": 200, "CartPole-v1": 500}

register_envs()  # CartPoleSwingUp-v0/v1 with gymnasium


def _random_cartpole_states(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """States spread over and just around the termination thresholds."""
    state = rng.uniform(-1, 1, (*shape, 4)) * np.array([2.6, 2.0, 0.23, 3.0])
    flat = state.reshape(-1, 4)
    # Exactly on / a hair inside / a hair outside the thresholds.
    thr = 12 * 2 * math.pi / 360
    flat[0, 0], flat[1, 0], flat[2, 0] = 2.4, -2.4 + 1e-12, 2.4 - 1e-12
    flat[3, 2], flat[4, 2], flat[5, 2] = thr, -thr, thr - 1e-12
    return state


def _policy_actions(seed: int, t: int, shape: tuple[int, ...], discrete: bool) -> np.ndarray:
    """Actions that depend only on (member seed, step), as a member's policy would."""
    rng = np.random.default_rng([seed, t])
    if discrete:
        return rng.integers(0, 2, shape)
    return rng.uniform(-1, 1, (*shape, 1))


# --- CartPole vs gymnasium ---------------------------------------------------------------


@pytest.mark.parametrize("env_id", ["CartPole-v0", "CartPole-v1"])
def test_cartpole_step_matches_gymnasium(env_id: str) -> None:
    S, E = 2, 4
    pop = make_population_env(env_id, [3, 4], E)
    pop.reset()
    singles = [gym.make(env_id).unwrapped for _ in range(S * E)]
    for env in singles:
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    n_terminated = 0
    for _ in range(50):
        state = _random_cartpole_states(rng, (S, E))
        actions = rng.integers(0, 2, (S, E))
        pop.set_state(state)
        pop.elapsed_steps[:] = 0
        out = pop.step(actions)
        for i, env in enumerate(singles):
            s, e = divmod(i, E)
            env.state = state[s, e].copy()
            env.steps_beyond_terminated = None
            obs, reward, terminated, truncated, _ = env.step(int(actions[s, e]))
            np.testing.assert_allclose(out.final_obs[s, e], obs, rtol=1e-6, atol=1e-7)
            # Same operations in the same order: bit-identical, not just close.
            np.testing.assert_array_equal(out.final_obs[s, e], obs)
            assert out.reward[s, e] == reward
            assert out.terminated[s, e] == terminated
            assert not out.truncated[s, e]
            n_terminated += terminated
    assert n_terminated > 20  # the threshold states were exercised


@pytest.mark.parametrize("env_id", ["CartPole-v0", "CartPole-v1"])
def test_cartpole_full_episode_lockstep_with_time_limit(env_id: str) -> None:
    """Whole episodes through gymnasium's TimeLimit: truncation at 200 (v0) / 500 (v1)."""
    limit = CARTPOLE_LIMITS[env_id]
    pop = make_population_env(env_id, [11], 1)
    obs = pop.reset()
    env = gym.make(env_id)
    env.reset(seed=0)
    env.unwrapped.state = pop.get_state()[0, 0].copy()
    t = 0
    while True:
        t += 1
        o = obs[0, 0]
        action = int(3 * o[2] + o[3] + 0.1 * o[0] + 0.3 * o[1] > 0)  # balances
        g_obs, g_rew, g_term, g_trunc, _ = env.step(action)
        out = pop.step(np.array([[action]]))
        np.testing.assert_array_equal(out.final_obs[0, 0], g_obs)
        assert (out.reward[0, 0], out.terminated[0, 0], out.truncated[0, 0]) == (
            g_rew,
            g_term,
            g_trunc,
        )
        obs = out.obs
        if g_term or g_trunc:
            break
    assert t == limit and g_trunc and not g_term
    # Autoreset: a fresh episode, the clock restarted.
    assert np.all(np.abs(obs[0, 0]) <= 0.05)
    assert pop.elapsed_steps[0, 0] == 0


@pytest.mark.parametrize("env_id", ["CartPole-v1", "CartPoleSwingUp-v1"])
def test_terminated_and_truncated_on_the_same_step_like_timelimit(env_id: str) -> None:
    limit = 500
    pop = make_population_env(env_id, [0], 1)
    pop.reset()
    start = np.array([[[2.399, 1.0, 0.0 if env_id == "CartPole-v1" else math.pi, 0.0]]])
    pop.set_state(start)
    pop.elapsed_steps[:] = limit - 1
    action = np.array([[1]]) if env_id == "CartPole-v1" else np.ones((1, 1, 1))
    out = pop.step(action)

    env = gym.make(env_id)
    env.reset(seed=0)
    env.unwrapped.state = start[0, 0].copy()
    wrapper = env
    while not isinstance(wrapper, gym.wrappers.TimeLimit):
        wrapper = wrapper.env
    wrapper._elapsed_steps = limit - 1
    g_obs, _, g_term, g_trunc, _ = env.step(action[0, 0])
    assert g_term and g_trunc
    assert out.terminated[0, 0] and out.truncated[0, 0]
    np.testing.assert_array_equal(out.final_obs[0, 0], g_obs)


def test_autoreset_final_obs_semantics() -> None:
    pop = make_population_env("CartPole-v1", [5, 6], 3)
    pop.reset()
    state = np.zeros((2, 3, 4))
    state[1, 2] = [2.39, 1.0, 0.0, 0.0]  # leaves the track this step
    pop.set_state(state)
    pop.elapsed_steps[:] = 7
    out = pop.step(np.ones((2, 3), dtype=np.int64))
    done = np.zeros((2, 3), dtype=bool)
    done[1, 2] = True
    np.testing.assert_array_equal(out.terminated, done)
    assert not out.truncated.any()
    assert out.final_obs[1, 2, 0] > 2.4  # the true last observation
    assert np.all(np.abs(out.obs[1, 2]) <= 0.05)  # already the next episode's first
    np.testing.assert_array_equal(out.obs[~done], out.final_obs[~done])
    assert pop.elapsed_steps[1, 2] == 0 and np.all(pop.elapsed_steps[~done] == 8)
    assert out.obs is not out.final_obs
    assert out.obs.dtype == np.float32 and out.final_obs.dtype == np.float32
    assert out.reward.dtype == np.float64 and out.terminated.dtype == bool
    assert out.obs.flags["C_CONTIGUOUS"] and out.obs.shape == (2, 3, 4)


def test_step_before_reset_raises() -> None:
    pop = make_population_env("CartPole-v1", [0], 2)
    with pytest.raises(RuntimeError):
        pop.step(np.zeros((1, 2), dtype=np.int64))


# --- SwingUp ---------------------------------------------------------------------------


def _reference_step(state: np.ndarray, action: float) -> tuple[list[float], float]:
    """Hand transcription of gym-cartpole-swingup 0.1.4's transition (plain floats)."""
    g, forcemag, dt, friction = 9.82, 10.0, 0.01, 0.1
    m_c, m_p, length = 0.5, 0.5, 0.6
    masstotal, mpl = m_c + m_p, m_p * length
    x, x_dot, theta, theta_dot = (float(v) for v in state)
    f = min(max(action, -1.0), 1.0) * forcemag
    s, c = math.sin(theta), math.cos(theta)
    xdot_update = (
        -2 * mpl * theta_dot**2 * s + 3 * m_p * g * s * c + 4 * f - 4 * friction * x_dot
    ) / (4 * masstotal - 3 * m_p * c**2)
    thetadot_update = (
        -3 * mpl * theta_dot**2 * s * c + 6 * masstotal * g * s + 6 * (f - friction * x_dot) * c
    ) / (4 * length * masstotal - 3 * mpl * c**2)
    new = [
        x + x_dot * dt,
        x_dot + xdot_update * dt,
        theta + theta_dot * dt,
        theta_dot + thetadot_update * dt,
    ]
    return new, math.cos(new[2])


@pytest.mark.parametrize("cls", [CartPoleSwingUpV0, CartPoleSwingUpV1])
def test_swingup_single_env_matches_reference_formulas(cls: type) -> None:
    env = cls()
    env.reset(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(200):
        state = rng.uniform(-1, 1, 4) * np.array([2.6, 5.0, 7.0, 15.0])
        action = float(rng.uniform(-1.5, 1.5))  # includes out-of-range: clipped
        env.state = state.copy()
        obs, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
        new, cos_new = _reference_step(state, float(np.float32(action)))
        np.testing.assert_allclose(env.state, new, rtol=1e-12, atol=1e-12)
        x, x_dot, theta, theta_dot = new
        expected_obs = [x, x_dot, math.cos(theta), math.sin(theta), theta_dot]
        np.testing.assert_allclose(obs, expected_obs, rtol=1e-6, atol=1e-7)
        assert obs.dtype == np.float32 and obs.shape == (5,)
        expected_reward = cos_new if cls is CartPoleSwingUpV0 else (1 + cos_new) / 2
        assert reward == pytest.approx(expected_reward, rel=1e-12, abs=1e-12)
        assert terminated == (abs(x) > 2.4) and truncated is False


@pytest.mark.parametrize("version", [0, 1])
def test_swingup_population_matches_single_env(version: int) -> None:
    env_id = f"CartPoleSwingUp-v{version}"
    S, E = 2, 3
    pop = make_population_env(env_id, [8, 9], E)
    pop.reset()
    single = (CartPoleSwingUpV0 if version == 0 else CartPoleSwingUpV1)()
    single.reset(seed=0)
    rng = np.random.default_rng(2)
    n_terminated = 0
    for _ in range(40):
        state = rng.uniform(-1, 1, (S, E, 4)) * np.array([2.6, 5.0, 7.0, 15.0])
        state[0, 0, 0], state[0, 1, 0] = 2.4, -2.4 + 1e-12
        actions = rng.uniform(-1, 1, (S, E, 1))
        pop.set_state(state)
        pop.elapsed_steps[:] = 0
        out = pop.step(actions)
        for s in range(S):
            for e in range(E):
                single.state = state[s, e].copy()
                obs, reward, terminated, _, _ = single.step(actions[s, e])
                np.testing.assert_allclose(out.final_obs[s, e], obs, rtol=1e-6, atol=1e-7)
                np.testing.assert_array_equal(out.final_obs[s, e], obs)  # same arithmetic
                assert out.reward[s, e] == pytest.approx(reward, rel=1e-12, abs=1e-12)
                assert out.terminated[s, e] == terminated
                n_terminated += terminated
    assert n_terminated > 5


@pytest.mark.parametrize("version", [0, 1])
def test_swingup_time_limit_500(version: int) -> None:
    env_id = f"CartPoleSwingUp-v{version}"
    env = gym.make(env_id)
    assert env.spec.max_episode_steps == 500
    env.reset(seed=0)
    pop = make_population_env(env_id, [0], 2)
    pop.reset()
    zero = np.zeros(1, dtype=np.float32)
    for t in range(1, 501):
        _, _, g_term, g_trunc, _ = env.step(zero)
        out = pop.step(np.zeros((1, 2, 1)))
        assert not g_term and not out.terminated.any()
        assert g_trunc == (t == 500)
        assert np.all(out.truncated == (t == 500))
    assert np.all(pop.elapsed_steps == 0)


def test_swingup_reset_distribution() -> None:
    pop = make_population_env("CartPoleSwingUp-v1", list(range(4)), 512)
    pop.reset()
    state = pop.get_state().reshape(-1, 4)
    np.testing.assert_allclose(state.mean(0), [0, 0, math.pi, 0], atol=0.03)
    np.testing.assert_allclose(state.std(0), 0.2, atol=0.015)
    obs = pop.observe().reshape(-1, 5)
    np.testing.assert_allclose(obs[:, 2], np.cos(state[:, 2]), rtol=1e-6)
    np.testing.assert_allclose(obs[:, 3], np.sin(state[:, 2]), rtol=1e-5, atol=1e-7)
    env = CartPoleSwingUpV1()
    draws = np.array([env.reset(seed=i)[0] is not None and env.state for i in range(500)])
    np.testing.assert_allclose(draws.mean(0), [0, 0, math.pi, 0], atol=0.05)
    np.testing.assert_allclose(draws.std(0), 0.2, atol=0.03)


def test_swingup_gymnasium_api_and_render() -> None:
    from gymnasium.utils.env_checker import check_env

    env = gym.make("CartPoleSwingUp-v1", render_mode="rgb_array")
    check_env(env.unwrapped)
    env.reset(seed=0)
    assert env.unwrapped.state.shape == (4,) and env.unwrapped.state.dtype == np.float64
    img = env.render()
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[:2] == (400, 600)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 2  # something was drawn
    env.step(np.ones(1, dtype=np.float32))
    assert env.render().shape == img.shape
    env.close()
    assert CartPoleSwingUpV1.metadata["render_fps"] > 0


# --- RNG: resets, member independence ---------------------------------------------------


def test_cartpole_reset_distribution_and_stream_layout() -> None:
    seeds, E = [3, 1, 4], 64
    obs = make_population_env("CartPole-v1", seeds, E).reset()
    assert obs.shape == (3, E, 4) and obs.dtype == np.float32
    assert np.all(np.abs(obs) <= 0.05)
    assert np.abs(obs.mean()) < 0.01 and obs.std() > 0.025
    # The first reset of every env is the member's MemberStreams block [E, 4].
    u = MemberStreams(seeds, STREAM_RESET).uniform((E, 4))
    np.testing.assert_array_equal(obs, (-0.05 + 0.1 * u).astype(np.float32))
    eval_obs = make_population_env("CartPole-v1", seeds, E, stream=STREAM_EVAL_RESET).reset()
    assert not np.array_equal(obs, eval_obs)


def test_every_autoreset_draws_the_documented_stream_block() -> None:
    """Reset n of env e is block n, row e of the member's MemberStreams, however reset
    states are computed ahead (more than 16 resets per env forces refills)."""
    seeds, E = [21, 22], 2
    pop = make_population_env("CartPole-v0", seeds, E)
    streams = MemberStreams(seeds, STREAM_RESET)
    blocks = [(-0.05 + 0.1 * streams.uniform((E, 4))).astype(np.float32)]
    np.testing.assert_array_equal(pop.reset(), blocks[0])
    resets = np.ones((len(seeds), E), dtype=int)
    rng = np.random.default_rng(3)
    for _ in range(700):
        out = pop.step(rng.integers(0, 2, (len(seeds), E)))
        for s, e in zip(*np.nonzero(out.terminated | out.truncated), strict=True):
            while len(blocks) <= resets[s, e]:
                blocks.append((-0.05 + 0.1 * streams.uniform((E, 4))).astype(np.float32))
            np.testing.assert_array_equal(out.obs[s, e], blocks[resets[s, e]][s, e])
            resets[s, e] += 1
    assert resets.min() > 20


def _rollout(env_id: str, seeds: list[int], num_envs: int, steps: int) -> dict[int, list]:
    """Per member seed, every array of every step (actions depend on the member only)."""
    pop = make_population_env(env_id, seeds, num_envs)
    discrete = isinstance(pop.action_space, gym.spaces.Discrete)
    first = pop.reset()
    records: dict[int, list] = {s: [first[i]] for i, s in enumerate(seeds)}
    for t in range(steps):
        if env_id.startswith("CartPoleSwingUp"):
            # Full force for 60 steps in a row: the cart leaves the track, resets.
            actions = np.stack([_policy_actions(s, t // 60, (num_envs,), False) for s in seeds])
            actions = np.sign(actions)
        else:
            actions = np.stack([_policy_actions(s, t, (num_envs,), discrete) for s in seeds])
        out = pop.step(actions)
        for i, s in enumerate(seeds):
            records[s].append(
                (out.obs[i], out.reward[i], out.terminated[i], out.truncated[i], out.final_obs[i])
            )
    pop.close()
    return records


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(
            x if isinstance(x, tuple) else (x,), y if isinstance(y, tuple) else (y,), strict=True
        ):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(
    ("env_id", "steps"),
    [
        ("CartPole-v0", 600),  # > 16 resets per env: reset batches refilled at other times
        ("CartPole-v1", 300),
        ("CartPoleSwingUp-v0", 300),
        ("CartPoleSwingUp-v1", 300),
        ("Pendulum-v1", 210),  # truncation at 200
        ("MountainCar-v0", 210),
        ("Acrobot-v1", 510),  # truncation at 500
        ("MountainCarContinuous-v0", 1000),  # truncation at 999
    ],
)
def test_member_trajectory_independent_of_population(env_id: str, steps: int) -> None:
    E = 3 if env_id in FAST_ENVS else 2
    alone = _rollout(env_id, [7], E, steps)
    inside = _rollout(env_id, [1, 7, 3, 9, 5], E, steps)
    again = _rollout(env_id, [7], E, steps)
    _assert_same(alone[7], inside[7])
    _assert_same(alone[7], again[7])
    dones = sum(int((r[2] | r[3]).sum()) for r in alone[7][1:])
    assert dones >= E  # autoresets happened inside the compared window
    assert not np.array_equal(inside[1][0], inside[7][0])  # different seeds differ
    assert not np.array_equal(inside[3][0], inside[9][0])


# --- generic path ---------------------------------------------------------------------


def test_generic_pendulum_matches_seeded_gymnasium() -> None:
    seeds, E = [2, 5], 2
    with generic_only("Pendulum-v1"):
        pop = make_population_env("Pendulum-v1", seeds, E)
    assert type(pop).__name__ == "GymPopulationEnv"
    obs = pop.reset()
    assert obs.shape == (2, E, 3) and obs.dtype == np.float32
    ref = gym.make("Pendulum-v1")
    ref_obs, _ = ref.reset(seed=instance_seed(5, 1, STREAM_RESET))
    np.testing.assert_array_equal(obs[1, 1], ref_obs)
    rng = np.random.default_rng(0)
    for t in range(205):
        actions = rng.uniform(-2, 2, (2, E, 1)).astype(np.float32)
        out = pop.step(actions)
        g_obs, g_rew, g_term, g_trunc, _ = ref.step(actions[1, 1])
        np.testing.assert_array_equal(out.final_obs[1, 1], g_obs)
        assert out.reward[1, 1] == pytest.approx(float(g_rew))
        assert (out.terminated[1, 1], out.truncated[1, 1]) == (g_term, g_trunc)
        if g_trunc:
            assert t == 199 and out.truncated.all()
            g_obs, _ = ref.reset()  # unseeded: the env's own RNG continues
            np.testing.assert_array_equal(out.obs[1, 1], g_obs)
            assert not np.array_equal(out.obs, out.final_obs)
    assert out.reward.dtype == np.float64
    pop.close()


def test_generic_mountaincar_discrete() -> None:
    with generic_only():
        pop = make_population_env("MountainCar-v0", [0], 3)
    assert type(pop).__name__ == "GymPopulationEnv"
    assert isinstance(pop.action_space, gym.spaces.Discrete)
    obs = pop.reset()
    assert obs.shape == (1, 3, 2)
    for t in range(200):
        out = pop.step(np.full((1, 3), t % 3, dtype=np.int64))
    assert out.truncated.all() and not out.terminated.any()
    pop.close()


class _DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,))})
    action_space = gym.spaces.Discrete(2)


class _MultiDiscreteActEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.MultiDiscrete([2, 3])


class _MatrixObsEnv(gym.Env):
    """Box observations of shape (2, 3), float64: flattened to 6 float32."""

    observation_space = gym.spaces.Box(-1, 1, (2, 3), dtype=np.float64)
    action_space = gym.spaces.Box(-1, 1, (2,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.np_random.uniform(-1, 1, (2, 3)), {}

    def step(self, action):
        self.t += 1
        obs = np.full((2, 3), float(np.sum(action)) / 4)
        return obs, float(self.t), self.t >= 3, False, {}


@pytest.fixture(scope="module")
def toy_envs() -> None:
    for name, cls in [
        ("DictObs", _DictObsEnv),
        ("MultiDiscreteAct", _MultiDiscreteActEnv),
        ("MatrixObs", _MatrixObsEnv),
    ]:
        env_id = f"StudyTest{name}-v0"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=cls, disable_env_checker=True)


@pytest.mark.usefixtures("toy_envs")
@pytest.mark.parametrize(
    ("env_id", "named"),
    [("StudyTestDictObs-v0", "Dict"), ("StudyTestMultiDiscreteAct-v0", "MultiDiscrete")],
)
def test_unsupported_spaces_raise_config_error(env_id: str, named: str) -> None:
    for make in (lambda: make_population_env(env_id, [0], 1), lambda: env_spaces(env_id)):
        with pytest.raises(ConfigError) as info:
            make()
        message = str(info.value)
        assert named in message and env_id in message and "\n" not in message


@pytest.mark.usefixtures("toy_envs")
def test_generic_flattens_box_observations() -> None:
    pop = make_population_env("StudyTestMatrixObs-v0", [0, 1], 2)
    assert pop.observation_space.shape == (6,) and pop.observation_space.dtype == np.float32
    assert env_spaces("StudyTestMatrixObs-v0")[0] == pop.observation_space
    assert pop.reset().shape == (2, 2, 6)
    for _ in range(3):
        out = pop.step(np.ones((2, 2, 2)))
    assert out.terminated.all() and out.final_obs.dtype == np.float32
    np.testing.assert_allclose(out.final_obs, 0.5)
    assert not np.allclose(out.obs, 0.5)  # reset observations


def test_unknown_env_id_raises_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        make_population_env("CartPol-v1", [0], 1)
    message = str(info.value)
    assert "'CartPol-v1'" in message and "CartPole-v1" in message and "\n" not in message
    with pytest.raises(ConfigError, match="NoSuchEnv"):
        env_spaces("NoSuchEnv-v0")


@pytest.mark.parametrize("env_id", FAST_ENVS)
def test_fast_env_spaces_match_gymnasium(env_id: str) -> None:
    """A port reports the spaces the generic path would (gymnasium's, images made uint8
    channel-first)."""
    from study.trainer.envs import make_single_env
    from study.trainer.envs.generic import population_space

    if env_id.startswith("MinAtar/"):
        pytest.importorskip("minatar")
    obs_space, act_space = env_spaces(env_id)
    env = make_single_env(env_id)
    assert obs_space == population_space(env.observation_space)
    assert act_space == env.action_space
    pop = make_population_env(env_id, [0], 1)
    assert pop.observation_space == obs_space and pop.action_space == act_space
    assert pop.reset().shape == (1, 1, *obs_space.shape)
