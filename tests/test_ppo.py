"""PPO in the population trainer: the clipped objective against a direct implementation,
the rollout's ratio, per-member early stopping, bit-identity, defaults and bad input."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.sweeps.train import main as train_main
from study.trainer import updates
from study.trainer.networks import ActorCritic
from study.trainer.population import CURVE_COLUMNS, Member, train_population

torch.set_num_threads(1)

KW = dict(total_steps=1024, log_every=256)


def _ppo(**overrides):
    return cfg.resolve({"algorithm": "ppo", "n_steps": 64, "num_envs": 2, "n_minibatches": 4,
                        "n_epochs": 3, **overrides})


def _same(a, b) -> None:
    for k in CURVE_COLUMNS:
        np.testing.assert_array_equal(a.curve[k], b.curve[k], err_msg=k)
    assert a.final_return == b.final_return


@pytest.mark.parametrize("shared", [False, True])
def test_clipped_objective_and_gradient_match_a_direct_implementation(shared):
    """SB3's PPO loss written out per member with torch.distributions on a hand-made batch:
    ratios on both sides of the clip range, value clipping on, per-minibatch advantage
    normalization."""
    hp = _ppo(share_trunk=shared, policy_hidden_sizes=[8], value_hidden_sizes=[8],
              clip_range_vf=0.3, entropy_coef=0.01)
    space = gym.spaces.Box(-1, 1, (3,))
    agent = ActorCritic(Structure.of(hp), [0, 1], space, gym.spaces.Discrete(3), torch.zeros(2),
                        torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    S, B = 2, 9
    obs = torch.randn(S, B, 3, generator=g)
    actions = torch.randint(0, 3, (S, B), generator=g)
    with torch.no_grad():
        logp_now, _ = agent.log_prob_entropy(agent.policy_out(obs), actions)
    old_logp = logp_now + 0.4 * torch.randn(S, B, generator=g)  # ratios from 0.5 to 2
    old_values = torch.randn(S, B, generator=g)
    mb = updates.Minibatch(obs, actions, torch.randn(S, B, generator=g),
                           torch.randn(S, B, generator=g), True, old_logp, old_values)
    hps = {"clip_range": torch.tensor([0.2, 0.1]), "clip_range_vf": torch.tensor([0.3, 0.3]),
           "entropy_coef": torch.tensor([0.01, 0.0]), "value_coef": torch.tensor([0.5, 1.0]),
           "normalize_advantage": torch.tensor([1.0, 0.0])}
    terms, grads = updates.AutogradUpdate(agent, hp).ppo_policy_gradients(mb, hps)

    total = 0.0
    for m in range(S):
        h = obs[m]
        trunk = agent.trunk
        if shared:
            h = torch.tanh(h @ trunk[0][m] + trunk[1][m])
            logits = h @ agent.pi[0][m] + agent.pi[1][m]
            values = (h @ agent.v[0][m] + agent.v[1][m])[:, 0]
        else:
            logits = torch.tanh(h @ agent.pi[0][m] + agent.pi[1][m]) @ agent.pi[2][m] + \
                agent.pi[3][m]
        dist = torch.distributions.Categorical(logits=logits)
        adv = mb.adv[m]
        if m == 0:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        ratio = torch.exp(dist.log_prob(actions[m]) - old_logp[m])
        c = hps["clip_range"][m]
        pg = -torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - c, 1 + c)).mean()
        loss = pg - hps["entropy_coef"][m] * dist.entropy().mean()
        np.testing.assert_allclose(terms["pg"][m], pg.item(), rtol=1e-5)
        kl = ((ratio - 1) - torch.log(ratio)).mean()
        np.testing.assert_allclose(terms["approx_kl"][m], kl.item(), rtol=1e-5)
        frac = ((ratio - 1).abs() > c).float().mean()
        np.testing.assert_allclose(terms["clip_fraction"][m], frac.item())
        if shared:
            pred = old_values[m] + torch.clamp(values - old_values[m], -0.3, 0.3)
            loss = loss + hps["value_coef"][m] * ((mb.returns[m] - pred) ** 2).mean()
        total = total + loss
    want = torch.autograd.grad(total, agent.policy_params(), allow_unused=True)
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if exp is None else exp,
                                   rtol=1e-4, atol=1e-6)
    assert 0 < terms["clip_fraction"].min() and terms["clip_fraction"].max() < 1


def test_ratio_is_one_on_the_first_minibatch_of_the_first_epoch(monkeypatch):
    seen = []
    real = updates.ppo_surrogate

    def spy(logp, old_logp, adv, clip_range, **kwargs):
        seen.append(torch.exp(logp - old_logp).detach().clone())
        return real(logp, old_logp, adv, clip_range, **kwargs)

    monkeypatch.setattr(updates, "ppo_surrogate", spy)
    for env in ("CartPole-v1", "Pendulum-v1"):
        seen.clear()
        train_population(env, [Member(_ppo(), 3), Member(_ppo(policy_lr=1e-3), 4)],
                         total_steps=128, log_every=128)
        torch.testing.assert_close(seen[0], torch.ones_like(seen[0]), rtol=0, atol=1e-5)
        assert not torch.allclose(seen[-1], torch.ones_like(seen[-1]), atol=1e-4)


def test_target_kl_stops_only_the_member_that_crossed_it():
    strict, free = _ppo(target_kl=1e-4, policy_lr=3e-3), _ppo(policy_lr=3e-3)
    together = train_population("CartPole-v1", [Member(strict, 1), Member(free, 1)], **KW)
    _same(together[0], train_population("CartPole-v1", [Member(strict, 1)], **KW)[0])
    _same(together[1], train_population("CartPole-v1", [Member(free, 1)], **KW)[0])
    # The strict member stopped its epochs early: it moved less from the same start.
    kl_strict = np.nanmean(together[0].curve["approx_kl"])
    kl_free = np.nanmean(together[1].curve["approx_kl"])
    assert kl_strict < kl_free
    assert not np.array_equal(together[0].curve["policy_loss"], together[1].curve["policy_loss"])


@pytest.mark.parametrize("env_id,extra", [
    ("CartPole-v1", {"share_trunk": True, "policy_hidden_sizes": [16],
                     "value_hidden_sizes": [16]}),
    ("Pendulum-v1", {"clip_range_vf": 0.5, "normalize_obs": True}),
])
def test_ppo_member_is_bit_identical_alone_and_in_a_population(env_id, extra):
    hps = [_ppo(**extra, clip_range=c) for c in (0.2, 0.1)]
    pop = [Member(hps[0], 5), Member(hps[1], 6), Member(hps[0], 7)]
    together = train_population(env_id, pop, **KW)
    _same(together[2], train_population(env_id, [pop[2]], **KW)[0])
    _same(together[1], train_population(env_id, [pop[1], pop[0]], **KW)[0])
    assert np.isfinite(together[0].curve["approx_kl"]).all()
    a2c = train_population(env_id, [Member(cfg.resolve({}), 5)], total_steps=400,
                           log_every=200)[0]
    assert np.isnan(a2c.curve["approx_kl"]).all() and np.isnan(a2c.curve["clip_fraction"]).all()


def test_algorithm_defaults_follow_sb3_and_are_resolved():
    hp = cfg.resolve({"algorithm": "ppo"})
    assert (hp["n_steps"], hp["num_envs"], hp["n_minibatches"], hp["n_epochs"]) == (2048, 1, 32, 10)
    assert (hp["policy_lr"], hp["lam"], hp["clip_range"]) == (3e-4, 0.95, 0.2)
    assert hp["policy_optimizer"] == "adam" and hp["normalize_advantage"]
    assert cfg.resolve({"algorithm": "ppo", "n_steps": 128})["n_steps"] == 128
    assert cfg.resolve({})["n_steps"] == 5  # A2C unchanged


@pytest.mark.parametrize("sets,expect", [
    (["clip_range=0.1"], 'clip_range applies to algorithm = "ppo" only'),
    (["algorithm=ppo", "value_iters=4"], 'value_iters applies to algorithm = "a2c" only'),
    (["algorithm=ppo", "clip_range=0"], "clip_range = 0.0 is invalid"),
    (["algorithm=ppo", "n_epochs=0"], "n_epochs = 0 is invalid"),
    (["algorithm=ppo", "target_kl=-0.01"], "target_kl = -0.01 is invalid"),
    (["algorithm=sac"], "algorithm = 'sac' is invalid: expected one of a2c, ppo"),
])
def test_bad_ppo_input_is_one_line(capsys, sets, expect):
    args = [a for s in sets for a in ("--set", s)]
    rc = train_main(["--env", "CartPole-v1", *args, "--seeds", "0", "--total-steps", "64",
                     "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert expect in err, err


@pytest.mark.parametrize("env_id,extra", [("CartPole-v1", {"entropy_coef": 0.01}),
                                          ("Pendulum-v1", {"clip_range_vf": 0.2})])
def test_accelerated_ppo_agrees_with_the_autograd_reference(env_id, extra):
    """The hand-written PPO gradients (study.trainer.updates.AcceleratedMLPUpdate) against autograd
    over a few updates: close (sums run in other orders), not bit-identical."""
    from study.trainer.networks import reference_path

    members = [Member(_ppo(**extra), s) for s in (1, 2)]
    fast = train_population(env_id, members, total_steps=384, log_every=128)
    with reference_path():
        ref = train_population(env_id, members, total_steps=384, log_every=128)
    for a, b in zip(fast, ref, strict=True):
        for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"):
            np.testing.assert_allclose(a.curve[k], b.curve[k], rtol=1e-3, atol=1e-5, err_msg=k)
