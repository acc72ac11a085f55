"""The fused kernels against the plain formulas they replace (torch.optim, torch.tanh,
the vectorized GAE recursion, softmax sampling)."""

import numpy as np
import pytest
import torch

from study.trainer import kernels
from study.trainer.gae import gae_advantages
from study.trainer.optim import MemberOptimizer

torch.set_num_threads(1)

SHAPES = [(4, 64), (1, 64), (64, 64), (1, 64), (64, 2), (1, 2)]


def _population(n_members: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n_members, *shape, generator=gen) for shape in SHAPES]


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_clipped_step_matches_torch_optim_per_member(kind):
    n = 4
    params = _population(n, 0)
    lr = torch.tensor([7e-4, 1e-2, 3e-3, 1e-4])
    max_norm = torch.tensor([0.5, float("inf"), 5.0, 0.01])
    ours = MemberOptimizer(kind, params)
    refs = []
    for s in range(n):
        member = [torch.nn.Parameter(p[s].clone().double()) for p in params]
        opt = (
            torch.optim.RMSprop(member, lr=float(lr[s]), alpha=0.99, eps=1e-5)
            if kind == "rmsprop"
            else torch.optim.Adam(member, lr=float(lr[s]), betas=(0.9, 0.999), eps=1e-8)
        )
        refs.append((member, opt))
    for step in range(5):
        grads = _population(n, 100 + step)
        norms, ok = ours.step(params, grads, lr, max_norm, torch.ones(n, dtype=torch.bool))
        assert ok.all()
        for s, (member, opt) in enumerate(refs):
            for p, g in zip(member, grads, strict=True):
                p.grad = g[s].double().clone()
            ref_norm = torch.nn.utils.clip_grad_norm_(member, float(max_norm[s]))
            opt.step()
            torch.testing.assert_close(norms[s].double(), ref_norm, rtol=1e-5, atol=0)
    for s, (member, _) in enumerate(refs):
        for p, q in zip(params, member, strict=True):
            torch.testing.assert_close(p[s].double(), q.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_a_member_steps_the_same_bits_alone_and_in_a_population(kind):
    n = 7
    params = _population(n, 1)
    lr = torch.linspace(1e-4, 1e-2, n)
    max_norm = torch.full((n,), 0.5)
    opt = MemberOptimizer(kind, params)
    alone = [p[3:4].clone() for p in params]
    opt1 = MemberOptimizer(kind, alone)
    for step in range(3):
        grads = _population(n, 50 + step)
        opt.step(params, grads, lr, max_norm, torch.ones(n, dtype=torch.bool))
        opt1.step(alone, [g[3:4] for g in grads], lr[3:4], max_norm[3:4],
                  torch.ones(1, dtype=torch.bool))  # fmt: skip
    for p, q in zip(params, alone, strict=True):
        assert torch.equal(p[3], q[0])


def test_non_finite_members_take_no_step_and_are_reported():
    n = 3
    params = _population(n, 2)
    before = [p.clone() for p in params]
    grads = _population(n, 3)
    grads[2][1, 0, 0] = float("nan")  # member 1: NaN gradient
    loss_ok = torch.tensor([True, True, False])  # member 2: non-finite loss
    opt = MemberOptimizer("rmsprop", params)
    norms, ok = opt.step(params, grads, torch.full((n,), 1e-3), torch.full((n,), 0.5), loss_ok)
    assert ok.tolist() == [True, False, False]
    assert torch.isnan(norms[1])
    for p, b in zip(params, before, strict=True):
        assert not torch.equal(p[0], b[0])
        assert torch.equal(p[1], b[1]) and torch.equal(p[2], b[2])


def test_a_step_that_overflows_the_weights_is_reported():
    params = [torch.full((2, 1, 4), 3e38)]
    grads = [torch.tensor([[[-1.0] * 4], [[0.0] * 4]])]
    opt = MemberOptimizer("adam", params)
    lr = torch.tensor([1e38, 1e-3])  # Adam's first step moves member 0 by about lr
    _, ok = opt.step(params, grads, lr, torch.full((2,), float("inf")),
                     torch.ones(2, dtype=torch.bool))  # fmt: skip
    assert ok.tolist() == [False, True]
    assert torch.isinf(params[0][0]).all()


def test_tanh_is_within_4e7_of_torch_and_keeps_nan():
    x = torch.linspace(-20, 20, 400_001)
    y = x.clone()
    kernels.tanh_(y.numpy())
    assert (y.double() - torch.tanh(x.double())).abs().max() < 4e-7
    neg = -x
    kernels.tanh_(neg.numpy())
    assert torch.equal(neg, -y)  # odd, like tanh
    assert y.abs().max() <= 1.0
    z = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    kernels.tanh_(z.numpy())
    assert torch.isnan(z[0]) and z[1:].tolist() == [1.0, -1.0, 0.0]


def test_tanh_backward_gives_the_gradient_and_the_bias_gradient():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(5, 7, 16, generator=gen)
    y_all = torch.tanh(torch.randn(5, 9, 16, generator=gen))  # two rows more than g
    expected = g * (1 - y_all[:, :7] ** 2)
    db = torch.empty(5, 1, 16)
    kernels.tanh_backward_(g.numpy(), y_all.numpy(), db.numpy())
    torch.testing.assert_close(g, expected, rtol=0, atol=0)
    torch.testing.assert_close(db, expected.sum(dim=1, keepdim=True), rtol=1e-6, atol=1e-6)


def test_rollout_targets_give_the_bits_of_gae_advantages():
    # The trainer's fused targets against study.trainer.gae's recursion (the specification), with
    # truncations bootstrapped from V(final obs), MC members and a learner subset.
    rng = np.random.default_rng(5)
    T, S, E = 9, 5, 3
    alive = np.array([0, 2, 3, 4])
    k = len(alive)
    rewards = rng.normal(size=(T, S, E))
    terminated = rng.random((T, S, E)) < 0.2
    dones = terminated | (rng.random((T, S, E)) < 0.15)
    v_all = torch.from_numpy(rng.normal(size=(k, (T + 1) * E)).astype(np.float32))
    v_final = torch.from_numpy(rng.normal(size=(k, T * E)).astype(np.float32))
    hps = {"gamma": torch.tensor([0.9, 0.99, 0.999, 1.0]),
           "lam": torch.tensor([0.0, 0.5, 0.95, 1.0]),
           "mc": torch.tensor([False, True, False, True])}  # fmt: skip
    adv, ret = torch.empty(k, T * E), torch.empty(k, T * E)
    kernels.rollout_targets_(v_all.numpy(), v_final.numpy(), rewards, terminated, dones,
                             alive, hps["gamma"].numpy(), hps["lam"].numpy(),
                             hps["mc"].numpy(), adv.numpy(), ret.numpy())  # fmt: skip

    def tse(x):  # [S', T*E] -> [T, S', E]
        return x.reshape(k, T, E).transpose(0, 1)

    values, nxt = tse(v_all[:, : T * E]), tse(v_all[:, E:])
    trunc = torch.from_numpy((dones & ~terminated)[:, alive])
    nxt = torch.where(trunc, tse(v_final), nxt)
    r = torch.from_numpy(rewards[:, alive]).float()
    term, done = torch.from_numpy(terminated[:, alive]), torch.from_numpy(dones[:, alive])
    gamma, lam = hps["gamma"][:, None], hps["lam"][:, None]
    expected = gae_advantages(r, values, nxt, term, done, gamma, lam)
    mc = gae_advantages(r, values, nxt, term, done, gamma, 1.0)
    expected_ret = torch.where(hps["mc"][None, :, None], mc + values, expected + values)
    assert torch.equal(adv, expected.transpose(0, 1).reshape(k, T * E))
    assert torch.equal(ret, expected_ret.transpose(0, 1).reshape(k, T * E))


def test_categorical_sampling_follows_the_inverse_cdf():
    logits = np.log(np.array([[[0.2, 0.5, 0.3]]], dtype=np.float32))
    u = np.array([[0.0]])
    out = np.empty((1, 1), dtype=np.int64)
    picks = []
    for value in (0.0, 0.19, 0.21, 0.69, 0.71, 0.999999):
        u[0, 0] = value
        kernels.sample_categorical(logits, u, out)
        picks.append(int(out[0, 0]))
    assert picks == [0, 0, 1, 1, 2, 2]


def test_categorical_sampling_frequencies_match_softmax():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(3, 1, 4)).astype(np.float32)
    logits = np.repeat(logits, 20_000, axis=1)
    u = rng.random((3, 20_000))
    out = np.empty((3, 20_000), dtype=np.int64)
    kernels.sample_categorical(logits, u, out)
    probs = torch.softmax(torch.from_numpy(logits[:, 0]).double(), -1).numpy()
    for s in range(3):
        freq = np.bincount(out[s], minlength=4) / 20_000
        # 5 standard errors of a binomial proportion
        assert np.all(np.abs(freq - probs[s]) < 5 * np.sqrt(probs[s] * (1 - probs[s]) / 20_000))


@pytest.mark.parametrize("kind", ["rmsprop", "adam"])
def test_the_torch_fallback_step_matches_the_kernel(kind):
    # Other devices (CUDA) take MemberOptimizer._torch_step; it must agree with the kernel.
    n = 5
    a, b = _population(n, 7), _population(n, 7)
    lr = torch.tensor([7e-4, 1e-2, 3e-3, 1e-4, 1e-3])
    max_norm = torch.tensor([0.5, float("inf"), 5.0, 0.01, 0.5])
    loss_ok = torch.tensor([True, True, True, True, False])
    opt_a, opt_b = MemberOptimizer(kind, a), MemberOptimizer(kind, b)
    for step in range(4):
        grads = _population(n, 200 + step)
        na, oka = opt_a.step(a, grads, lr, max_norm, loss_ok)
        opt_b.t += 1
        nb, okb = opt_b._torch_step(b, grads, lr, max_norm, loss_ok)
        torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)
        assert oka.tolist() == okb.tolist() == [True, True, True, True, False]
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_optimizers_are_a_registry_that_config_offers_whole(monkeypatch):
    from study import config as cfg
    from study.trainer.optim import RULES, UpdateRule

    for key in ("policy_optimizer", "value_optimizer"):
        assert set(cfg.SPECS[key].choices) == set(RULES)

    class SGD(UpdateRule):  # a new rule: its torch step is all it needs off CPU float32
        def torch_update(self, g, state, keep, lr, t):  # noqa: ANN001, ANN202
            return g * lr

    monkeypatch.setitem(RULES, "sgd", SGD())
    p = [torch.ones(2, 3, 4, dtype=torch.float64)]
    g = [torch.full((2, 3, 4), 0.5, dtype=torch.float64)]
    opt = MemberOptimizer("sgd", p)
    norms, ok = opt.step(p, g, torch.tensor([0.1, 0.2], dtype=torch.float64),
                         torch.tensor([100.0, 100.0], dtype=torch.float64),
                         torch.tensor([True, True]))
    assert ok.all() and torch.allclose(norms, torch.full((2,), 0.5 * 12**0.5, dtype=torch.float64))
    assert torch.allclose(p[0][0], torch.full((3, 4), 0.95, dtype=torch.float64))
    assert torch.allclose(p[0][1], torch.full((3, 4), 0.90, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        MemberOptimizer("nope", p)
