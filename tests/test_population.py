"""The population trainer: independence of members, determinism, divergence, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.trainer.population import CURVE_COLUMNS, Member, train_population

torch.set_num_threads(1)


def _assert_same_run(a, b):
    for k in CURVE_COLUMNS:
        np.testing.assert_array_equal(a.curve[k], b.curve[k], err_msg=k)
    assert a.status == b.status
    for x, y in [(a.final_return, b.final_return), (a.final_eval_return, b.final_eval_return)]:
        assert (math.isnan(x) and math.isnan(y)) or x == y


VARIANTS = [
    ("CartPole-v1", {}),
    (
        "CartPole-v1",
        {
            "normalize_advantage": True,
            "normalize_obs": True,
            "n_minibatches": 3,
            "value_iters": 2,
            "policy_optimizer": "adam",
            "value_target": "mc",
            "entropy_coef": 0.01,
        },
    ),
    (
        "CartPole-v1",
        {
            "share_trunk": True,
            "policy_hidden_sizes": [32],
            "value_hidden_sizes": [32],
            "activation": "relu",
        },
    ),
    ("CartPole-v0", {"policy_hidden_sizes": [], "value_hidden_sizes": [16]}),
    ("CartPoleSwingUp-v0", {"normalize_advantage": True, "log_std_init": -0.5}),
    ("Pendulum-v1", {"num_envs": 2, "value_optimizer": "adam"}),
    # One environment per member and a short rollout: the smallest shapes (batch of 2).
    ("MountainCar-v0", {"num_envs": 1, "n_steps": 2, "normalize_advantage": True}),
]


@pytest.mark.parametrize(
    "env_id,overrides", VARIANTS, ids=[f"{e}-{i}" for i, (e, _) in enumerate(VARIANTS)]
)
def test_member_is_bit_identical_alone_and_in_any_population(env_id, overrides):
    # Three configs that differ in scalar hyperparameters share one population.
    hps = [
        cfg.resolve({**overrides, "policy_lr": lr, "gamma": g, "lam": lam})
        for lr, g, lam in [(1e-3, 0.99, 0.95), (3e-3, 0.9, 1.0), (7e-4, 0.999, 0.0)]
    ]
    population = [Member(hps[i % 3], s) for i, s in enumerate([5, 11, 12, 13, 14])]
    budget = 600 if env_id == "MountainCar-v0" else 2000
    kwargs = dict(
        total_steps=budget, log_every=budget // 5, eval_every=budget // 2, eval_episodes=2
    )
    together = train_population(env_id, population, **kwargs)
    for j in (0, 4):
        alone = train_population(env_id, [population[j]], **kwargs)[0]
        _assert_same_run(alone, together[j])
    # ... and in a different population, in another position.
    other = train_population(env_id, [population[4], Member(hps[0], 99), population[0]], **kwargs)
    _assert_same_run(other[2], together[0])
    _assert_same_run(other[0], together[4])


def test_rerun_is_bit_identical_and_seeds_differ():
    hp = cfg.resolve({})
    a = train_population("CartPole-v1", [Member(hp, 1), Member(hp, 2)], 3000, log_every=500)
    b = train_population("CartPole-v1", [Member(hp, 1), Member(hp, 2)], 3000, log_every=500)
    for x, y in zip(a, b, strict=True):
        _assert_same_run(x, y)
    assert not np.array_equal(a[0].curve["policy_loss"], a[1].curve["policy_loss"])


def test_divergent_member_is_frozen_and_others_unaffected():
    good = cfg.resolve({"policy_lr": 1e-3})
    bad = cfg.resolve(
        {"policy_lr": 1e37, "max_grad_norm": "inf", "value_lr": 1e37, "value_max_grad_norm": "inf"}
    )
    pop = [Member(good, 3), Member(bad, 4), Member(good, 5)]
    res = train_population("CartPole-v1", pop, 4000, log_every=400)
    assert res[1].status == "diverged"
    assert res[1].diverged_at_step is not None and 0 < res[1].diverged_at_step <= 4000
    assert math.isnan(res[1].final_return)
    assert len(res[1].curve["step"]) < len(res[0].curve["step"])
    assert res[0].status == res[2].status == "ok"
    _assert_same_run(res[0], train_population("CartPole-v1", [pop[0]], 4000, log_every=400)[0])
    _assert_same_run(res[2], train_population("CartPole-v1", [pop[2]], 4000, log_every=400)[0])


def test_curve_columns_and_log_points():
    hp = cfg.resolve({"num_envs": 4, "n_steps": 5})  # 20 env steps per update
    (r,) = train_population("CartPole-v1", [Member(hp, 0)], 1000, log_every=200)
    assert set(r.curve) == set(CURVE_COLUMNS)
    np.testing.assert_array_equal(r.curve["step"], np.arange(200, 1001, 200))
    assert np.all(np.isnan(r.curve["eval_return"]))  # no evaluation requested
    assert r.env_steps == 1000
    # CartPole-v1 gives reward 1 per step, so a finished episode's return equals its length.
    ok = ~np.isnan(r.curve["episode_return"])
    np.testing.assert_allclose(r.curve["episode_return"][ok], r.curve["episode_length"][ok])


@pytest.mark.parametrize("overrides", [{}, {"share_trunk": True}])
def test_pruning_callback_stops_members(overrides):
    # A shared trunk leaves the value optimizer without parameters: stopping a member must
    # not trip over it.
    hp = cfg.resolve(overrides)
    calls = []

    def on_log(step, row):
        calls.append(step)
        return np.array([False, step >= 1000])

    res = train_population(
        "CartPole-v1", [Member(hp, 0), Member(hp, 1)], 2000, log_every=500, on_log=on_log
    )
    assert res[0].status == "ok" and res[1].status == "pruned"
    assert res[1].curve["step"][-1] == 1000 and res[0].curve["step"][-1] == 2000


def test_box_actions_are_clipped_for_the_env_only():
    hp = cfg.resolve({"log_std_init": 2.0})  # wide Gaussian: most samples are out of bounds
    (r,) = train_population("CartPoleSwingUp-v1", [Member(hp, 0)], 1000, log_every=500)
    assert r.status == "ok"
    # Rewards of SwingUp-v1 lie in [0, 1] per step, so returns are bounded by the length.
    ok = ~np.isnan(r.curve["episode_return"])
    assert np.all(r.curve["episode_return"][ok] <= r.curve["episode_length"][ok] + 1e-9)


def test_unsupported_space_is_a_clear_error():
    import gymnasium as gym

    class DictObs(gym.Env):
        observation_space = gym.spaces.Dict({"a": gym.spaces.Discrete(2)})
        action_space = gym.spaces.Discrete(2)

    if "StudyTestDictObs-v0" not in gym.registry:
        gym.register("StudyTestDictObs-v0", entry_point=lambda: DictObs())
    with pytest.raises(cfg.ConfigError, match="Dict"):
        train_population("StudyTestDictObs-v0", [Member(cfg.resolve({}), 0)], 100)


def test_learns_cartpole_with_small_budget():
    # Several seeds and the median, not one lucky seed. Random play scores about 22.
    hp = cfg.resolve(
        {
            "policy_optimizer": "adam",
            "policy_lr": 1e-3,
            "value_optimizer": "adam",
            "value_lr": 1e-3,
            "normalize_advantage": True,
            "n_steps": 16,
        }
    )
    res = train_population("CartPole-v1", [Member(hp, s) for s in range(6)], 25_000, log_every=2500)
    finals = np.array([r.final_return for r in res])
    assert np.nanmedian(finals) > 100, finals


@pytest.mark.parametrize("discrete", [True, False])
def test_hand_written_gradients_match_autograd(discrete):
    import gymnasium as gym

    from study.trainer.networks import ActorCritic

    space = gym.spaces.Discrete(3) if discrete else gym.spaces.Box(-1, 1, (2,))
    hp = cfg.resolve({"policy_hidden_sizes": [8, 8], "value_hidden_sizes": [8]})
    S, B = 3, 11
    agent = ActorCritic(
        Structure.of(hp), [0, 1, 2], gym.spaces.Box(-1, 1, (4,)), space,
        torch.tensor([0.0, -0.5, 0.3]),
        torch.device("cpu"),
    )
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(S, B, 4, generator=gen)
    actions = (
        torch.randint(0, 3, (S, B), generator=gen)
        if discrete
        else torch.randn(S, B, 2, generator=gen)
    )
    adv, ret = torch.randn(S, B, generator=gen), torch.randn(S, B, generator=gen)
    ent_coef, v_coef = torch.tensor([0.0, 0.01, 0.5]), torch.tensor([0.5, 1.0, 2.0])

    terms, grads = agent.policy_grads(obs, actions, adv, ent_coef, B)
    logp, ent = agent.log_prob_entropy(agent.policy_out(obs), actions)
    pg = -(logp * adv).mean(dim=1)
    loss = pg - ent_coef * ent.mean(dim=1)
    expected = torch.autograd.grad(loss.sum(), agent.policy_params())
    torch.testing.assert_close(terms["pg"], pg.detach())
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

    terms, grads = agent.value_grads(obs, ret, v_coef, B)
    v_loss = ((agent.values(obs) - ret) ** 2).mean(dim=1)
    expected = torch.autograd.grad((v_coef * v_loss).sum(), agent.value_params())
    torch.testing.assert_close(terms["v"], v_loss.detach())
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_obs_normalizer_tracks_each_members_running_mean_and_variance():
    from study.trainer.population import ObsNormalizer

    rng = np.random.default_rng(0)
    norm = ObsNormalizer(3, 2, np.array([True, False, True]))
    batches = [
        rng.normal(loc=[[1.0, -2.0]], scale=[[0.5, 3.0]], size=(3, 4, 2)).astype(np.float32)
        for _ in range(50)
    ]
    for b in batches:
        norm.update(b)
    seen = np.concatenate(batches, axis=1).astype(np.float64)  # [S, 200, D]
    np.testing.assert_allclose(norm.mean, seen.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.var, seen.var(axis=1), rtol=1e-4)
    x = batches[-1]
    out = norm(x)
    expected = np.clip((x - norm.mean[:, None]) / np.sqrt(norm.var[:, None] + 1e-8), -10, 10)
    np.testing.assert_allclose(out[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[1], x[1])  # member 1 does not normalize
