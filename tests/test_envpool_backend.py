"""The optional envpool backend (``envpool:<task>`` ids): skipped where envpool is missing.

Members stay independent (alone or in any population, bit-identical), re-runs are
bit-identical, an ended episode's last observation is kept as ``final_obs`` (truncations
bootstrap from it) while ``obs`` is already reset, and bad ids are one-line errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from study.config import ConfigError, resolve

envpool = pytest.importorskip("envpool")

from study.trainer.envs import envpool_backend as eb  # noqa: E402
from study.trainer.population import Member, train_population  # noqa: E402


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """Register the ids as study.trainer.envs would (its _fast hook), and forget them after."""
    from study.trainer import envs

    monkeypatch.setattr(envs, "FAST_ENVS", dict(envs.FAST_ENVS))
    for env_id in ("envpool:CartPole-v1", "envpool:Pendulum-v1"):
        eb.register(env_id)


def _train(env_id: str, seeds: list[int], steps: int = 1200) -> dict[int, object]:
    hp = resolve({"num_envs": 4, "policy_hidden_sizes": [8], "value_hidden_sizes": [8]})
    results = train_population(env_id, [Member(hp, s) for s in seeds], steps, log_every=200)
    return dict(zip(seeds, results, strict=True))


def _same(a, b) -> None:  # noqa: ANN001
    assert a.status == b.status
    assert (np.isnan(a.final_return) and np.isnan(b.final_return)) or (
        a.final_return == b.final_return)
    for key in a.curve:
        np.testing.assert_array_equal(np.asarray(a.curve[key]), np.asarray(b.curve[key]))


@pytest.mark.parametrize("env_id", ["envpool:CartPole-v1", "envpool:Pendulum-v1"])
def test_a_member_is_bit_identical_alone_in_a_population_and_on_a_rerun(env_id):
    alone = _train(env_id, [7])[7]
    crowd = _train(env_id, [3, 7, 11])
    again = _train(env_id, [3, 7, 11])
    _same(alone, crowd[7])
    for s in (3, 7, 11):
        _same(crowd[s], again[s])
    assert crowd[3].final_return != crowd[7].final_return or not math.isfinite(
        crowd[3].final_return)


def test_ended_episodes_keep_their_last_observation_and_are_reset_at_once():
    # Pendulum never terminates: every episode is truncated at 200 steps, and its last
    # observation follows from the one before it (theta' = theta + thdot' * dt).
    env = eb.EnvpoolPopulationEnv("envpool:Pendulum-v1", [1, 2], 3)
    obs = env.reset()
    assert obs.shape == (2, 3, 3) and obs.dtype == np.float32
    rng = np.random.default_rng(0)
    for t in range(1, 401):
        prev = obs
        step = env.step(rng.uniform(-2, 2, size=(2, 3, 1)).astype(np.float32))
        ended = step.truncated
        assert not step.terminated.any()
        assert ended.all() if t % 200 == 0 else not ended.any()
        keep = ~ended
        np.testing.assert_array_equal(step.obs[keep], step.final_obs[keep])
        if ended.any():
            fin, before = step.final_obs[ended], prev[ended]
            theta = np.arctan2(fin[:, 1], fin[:, 0])
            theta0 = np.arctan2(before[:, 1], before[:, 0])
            gap = np.angle(np.exp(1j * (theta - theta0 - fin[:, 2] * 0.05)))
            assert np.abs(gap).max() < 1e-4  # the true next state, not a reset one
            assert not np.allclose(step.obs[ended], fin)  # obs: the new episode's start
        obs = step.obs
    env.close()


def test_envs_of_a_member_depend_on_its_seed_alone():
    a = eb.EnvpoolPopulationEnv("envpool:CartPole-v1", [5, 9], 4).reset()
    b = eb.EnvpoolPopulationEnv("envpool:CartPole-v1", [9], 4).reset()
    np.testing.assert_array_equal(a[1], b[0])
    assert not np.array_equal(a[0], a[1])
    assert len({tuple(r) for r in a[0]}) == 4  # each env its own initial state


def test_bad_ids_are_one_line_errors(monkeypatch):
    with pytest.raises(ConfigError, match=r"envpool has no task 'CartPole-v9'.*CartPole-v1"):
        eb.register("envpool:CartPole-v9")
    import builtins

    real = builtins.__import__

    def no_envpool(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if name == "envpool":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_envpool)
    with pytest.raises(ConfigError, match="need the 'envpool' package"):
        eb.register("envpool:Acrobot-v1")


def test_a_grid_sweep_runs_on_the_backend(tmp_path):
    from study import store
    from study.sweeps.grid import main as grid_main

    (tmp_path / "s.toml").write_text(
        'name = "ep"\nenv = "envpool:CartPole-v1"\ntotal_steps = 800\nlog_every = 200\n'
        'seeds = [1, 2]\n[hyperparameters]\nnum_envs = 4\n')
    assert grid_main([str(tmp_path / "s.toml"), "--out", str(tmp_path / "out"),
                      "--quiet"]) == 0
    runs = store.load_runs(tmp_path / "out")
    assert runs["env"].unique().tolist() == ["envpool:CartPole-v1"] and len(runs) == 2
