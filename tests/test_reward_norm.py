"""Per-member reward normalization: SB3's VecNormalize(norm_reward) semantics, members that
do not use it untouched, ids of runs stored before the key existed unchanged."""

from __future__ import annotations

import numpy as np

from study.config import resolve
from study.sweeps.spec import _id_payload, run_id
from study.trainer.population import Member, RewardNormalizer, train_population


def test_scaling_follows_the_running_std_of_the_discounted_return():
    rn = RewardNormalizer(2, np.array([True, False]), np.array([0.9, 0.9]))
    rng = np.random.default_rng(0)
    ret, returns = np.zeros(2), []
    for t in range(50):
        r = rng.normal(1.0, 2.0, (2, 2))
        done = np.zeros((2, 2), dtype=bool)
        done[:, t % 2] = t % 7 == 6
        out = rn(r, done)
        ret = ret * 0.9 + r[0]  # member 0's discounted returns, by hand
        returns.append(ret.copy())
        var = np.var(np.concatenate(returns)) if t else np.var(returns[0])
        np.testing.assert_allclose(out[0], np.clip(r[0] / np.sqrt(var + 1e-8), -10, 10),
                                   rtol=1e-3)
        np.testing.assert_array_equal(out[1], r[1])  # the member without it: raw
        ret[done[0]] = 0.0


def test_run_ids_of_the_default_are_those_of_before():
    hp = resolve({})
    payload = _id_payload("CartPole-v1", hp, 1000, 100, 0, 10)
    assert "normalize_reward" not in payload["hyperparameters"]
    on = resolve({"normalize_reward": True})
    assert run_id("CartPole-v1", hp, 1, 1000, 100) != run_id("CartPole-v1", on, 1, 1000, 100)


def test_a_member_learns_from_scaled_rewards_and_reports_raw_returns():
    base = {"num_envs": 2, "n_steps": 5}
    plain, scaled = resolve(base), resolve({**base, "normalize_reward": True})
    a = train_population("Pendulum-v1", [Member(plain, 1), Member(scaled, 1)], 2000,
                         log_every=500)
    alone = train_population("Pendulum-v1", [Member(scaled, 1)], 2000, log_every=500)
    assert not np.array_equal(a[0].curve["policy_loss"], a[1].curve["policy_loss"])
    for k in a[1].curve:  # bit-identical alone and beside a member without it (whatever
        np.testing.assert_array_equal(a[1].curve[k], alone[0].curve[k])  # torch's threads)
    assert a[1].final_return < 0  # Pendulum's raw returns, not scaled ones
