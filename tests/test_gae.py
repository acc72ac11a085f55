"""GAE against independent hand-written recursions."""

import numpy as np
import pytest
import torch

from study.trainer.gae import gae_advantages


def _reference(r, v, nv, term, done, gamma, lam):
    """Straightforward per-trajectory loops, written independently of study.trainer.gae."""
    T, n = r.shape
    adv = np.zeros((T, n))
    for j in range(n):
        running = 0.0
        for t in reversed(range(T)):
            g = gamma[j] if np.ndim(gamma) else gamma
            lm = lam[j] if np.ndim(lam) else lam
            delta = r[t, j] + (0.0 if term[t, j] else g * nv[t, j]) - v[t, j]
            running = delta + (0.0 if done[t, j] else g * lm * running)
            adv[t, j] = running
    return adv


def _random_rollout(rng, T=12, n=5):
    r = rng.normal(size=(T, n))
    v = rng.normal(size=(T, n))
    nv = rng.normal(size=(T, n))
    term = rng.random((T, n)) < 0.15
    trunc = (rng.random((T, n)) < 0.1) & ~term
    return r, v, nv, term, term | trunc


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.5, 0.0), (0.9, 1.0), (1.0, 0.7)])
def test_matches_reference_numpy(gamma, lam):
    rng = np.random.default_rng(0)
    r, v, nv, term, done = _random_rollout(rng)
    got = gae_advantages(r, v, nv, term, done, gamma, lam)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, _reference(r, v, nv, term, done, gamma, lam), rtol=1e-12)


def test_torch_in_torch_out_and_per_member_parameters():
    rng = np.random.default_rng(1)
    r, v, nv, term, done = _random_rollout(rng, n=4)
    gamma = np.array([0.9, 0.99, 0.5, 1.0])
    lam = np.array([0.0, 0.95, 1.0, 0.5])
    got = gae_advantages(
        *(torch.tensor(x) for x in (r, v, nv, term, done)), torch.tensor(gamma), torch.tensor(lam)
    )
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(
        got.numpy(), _reference(r, v, nv, term, done, gamma, lam), rtol=1e-12
    )


def test_lambda_zero_is_td_error():
    rng = np.random.default_rng(2)
    r, v, nv, term, done = _random_rollout(rng)
    td = r + 0.97 * (1 - term) * nv - v
    np.testing.assert_allclose(gae_advantages(r, v, nv, term, done, 0.97, 0.0), td, rtol=1e-12)


def test_lambda_one_is_discounted_return_minus_value():
    # One episode, no ending inside the rollout:
    # A_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V_T - V_t.
    T, gamma = 6, 0.9
    r = np.arange(1.0, T + 1)[:, None]
    v = np.linspace(0.5, 2.0, T)[:, None]
    nv = np.vstack([v[1:], [[3.0]]])
    zeros = np.zeros((T, 1), dtype=bool)
    got = gae_advantages(r, v, nv, zeros, zeros, gamma, 1.0)
    for t in range(T):
        ret = sum(gamma**k * r[t + k, 0] for k in range(T - t)) + gamma ** (T - t) * 3.0
        assert got[t, 0] == pytest.approx(ret - v[t, 0], rel=1e-12)


def test_truncation_bootstraps_termination_does_not_and_nothing_leaks():
    r = np.array([[1.0], [1.0], [1.0]])
    v = np.zeros((3, 1))
    nv = np.array([[0.0], [10.0], [0.0]])  # step 1 ends an episode; V(final obs) = 10
    after = np.array([[100.0]])  # huge value in the next episode must not leak backwards
    nv[2] = after
    term = np.zeros((3, 1), dtype=bool)
    done = np.array([[False], [True], [False]])
    truncated = gae_advantages(r, v, nv, term, done, 0.5, 1.0)
    assert truncated[1, 0] == pytest.approx(1.0 + 0.5 * 10.0)
    assert truncated[0, 0] == pytest.approx(1.0 + 0.5 * truncated[1, 0])
    term[1] = True
    terminated = gae_advantages(r, v, nv, term, done, 0.5, 1.0)
    assert terminated[1, 0] == pytest.approx(1.0)
    assert terminated[0, 0] == pytest.approx(1.5)
    assert terminated[2, 0] == pytest.approx(1.0 + 0.5 * 100.0)
