"""The compiled MinAtar network (study.trainer.compiled_cnn) against the autograd reference:
passes, gradients and a few optimizer steps close to it; which networks it serves; and a
member's bits the same alone, inside a population and on a re-run."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.trainer.compiled_cnn import CompiledCNNUpdate
from study.trainer.networks import ActorCritic, reference_path
from study.trainer.optim import MemberOptimizer
from study.trainer.updates import AutogradUpdate, Minibatch, make_update

torch.set_num_threads(1)

T, E = 5, 8
N = T * E
#: MinAtar-like observations: binary planes (and, below, small integers).
SPACE = gym.spaces.Box(0, 1, (4, 10, 10), dtype=np.uint8)


def _agent(overrides: dict | None = None, space: gym.spaces.Box = SPACE, n_actions: int = 3,
           seeds: tuple[int, ...] = (0, 1, 2), shake: float = 0.05) -> ActorCritic:
    """A MinAtar-CNN actor-critic whose weights are moved off their initial values (biases
    non-zero, so some ReLUs are off and some on everywhere)."""
    hp = cfg.resolve({"encoder": "minatar_cnn", "share_trunk": True, "policy_hidden_sizes": [],
                      "value_hidden_sizes": [], **(overrides or {})})
    agent = ActorCritic(Structure.of(hp), list(seeds), space, gym.spaces.Discrete(n_actions),
                        torch.zeros(len(seeds)), torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in agent.all_params():
            p.add_(shake * torch.randn(p.shape, generator=gen))
    return agent


def _rollout(n_members: int, space: gym.spaces.Box = SPACE, high: int = 1,
             density: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Observations of T steps ``[T, S, E, C, H, W]`` and the ones after them."""
    rng = np.random.default_rng(seed)
    shape = (T, n_members, E, *space.shape)
    obs = rng.integers(1, high + 1, shape) * (rng.random(shape) < density)
    last = obs[-1, :, ::-1].copy()
    return torch.from_numpy(obs.astype(np.uint8)), torch.from_numpy(last.astype(np.uint8))


def _passes(update: AutogradUpdate, obs: torch.Tensor, last: torch.Tensor
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    n_members = obs.shape[1]
    update.begin_rollout(n_members, T, E)
    outs = [update.rollout_pass(obs[t], t).clone() for t in range(T)]
    rows = obs.transpose(0, 1).reshape(n_members, N, *obs.shape[3:])
    return outs, update.state_values(rows, last).clone()


def _minibatch(obs: torch.Tensor, seed: int = 1) -> Minibatch:
    n_members = obs.shape[1]
    gen = torch.Generator().manual_seed(seed)
    rows = obs.transpose(0, 1).reshape(n_members, N, *obs.shape[3:])
    return Minibatch(rows, torch.randint(0, 3, (n_members, N), generator=gen),
                     torch.randn(n_members, N, generator=gen),
                     torch.randn(n_members, N, generator=gen), True)


def test_it_serves_the_minatar_network_and_only_where_it_reproduces_it():
    agent = _agent()
    structure = Structure.of(cfg.resolve({"encoder": "minatar_cnn", "share_trunk": True,
                                          "policy_hidden_sizes": [], "value_hidden_sizes": []}))
    assert isinstance(make_update(agent, structure), CompiledCNNUpdate)
    with reference_path():
        assert type(make_update(_agent(), structure)) is AutogradUpdate
    for overrides in ({"share_trunk": False}, {"algorithm": "ppo"}, {"n_minibatches": 2},
                      {"policy_hidden_sizes": [32], "value_hidden_sizes": [32]}):
        other = Structure.of(cfg.resolve({"encoder": "minatar_cnn", "share_trunk": True,
                                          "policy_hidden_sizes": [],
                                          "value_hidden_sizes": [], **overrides}))
        assert not isinstance(make_update(_agent(overrides), other), CompiledCNNUpdate), overrides


@pytest.mark.parametrize("high", [1, 7])  # binary planes; small integers, scaled by 1/7
def test_passes_and_gradients_are_autograds(high):
    space = gym.spaces.Box(0, high, (4, 10, 10), dtype=np.uint8)
    agent = _agent(space=space)
    fast, ref = CompiledCNNUpdate(agent, None), AutogradUpdate(agent, None)  # type: ignore[arg-type]
    obs, last = _rollout(3, space, high=high)
    outs, values = _passes(fast, obs, last)
    ref_outs, ref_values = _passes(ref, obs, last)
    for a, b in zip(outs, ref_outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=2e-6)
    mb = _minibatch(obs)
    coefs = torch.tensor([0.01, 0.0, 0.05]), torch.tensor([0.5, 1.0, 0.25])
    terms, grads = fast.policy_gradients(mb, *coefs)
    ref_terms, ref_grads = ref.policy_gradients(mb, *coefs)
    assert set(terms) == set(ref_terms)
    for k in terms:
        np.testing.assert_allclose(terms[k], ref_terms[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for p, g, r in zip(agent.policy_params(), grads, ref_grads, strict=True):
        assert g.shape == p.shape
        scale = float(r.abs().max())
        assert scale > 0
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * scale)


def test_a_few_updates_stay_close_to_autograds():
    """Five RMSprop steps of three members from the same weights on the same rollouts:
    the weights stay within float32 noise of the reference's."""
    agents = [_agent(), _agent()]
    updates = [CompiledCNNUpdate(agents[0], None), AutogradUpdate(agents[1], None)]  # type: ignore[arg-type]
    opts = [MemberOptimizer("rmsprop", a.policy_params()) for a in agents]
    lr, clip = torch.full((3,), 1e-3), torch.full((3,), 0.5)
    coefs = torch.full((3,), 0.01), torch.full((3,), 0.5)
    for step in range(5):
        obs, last = _rollout(3, seed=step)
        for agent, update, opt in zip(agents, updates, opts, strict=True):
            _passes(update, obs, last)
            terms, grads = update.policy_gradients(_minibatch(obs, seed=step), *coefs)
            opt.step(agent.policy_params(), grads, lr, clip, torch.isfinite(terms["loss"]))
    moved = False
    for a, b in zip(agents[0].policy_params(), agents[1].policy_params(), strict=True):
        np.testing.assert_allclose(a.detach(), b.detach(), rtol=1e-4, atol=2e-6)
        moved |= not torch.equal(a, b)
    assert moved  # (the paths are not the same arithmetic: the test compares two things)


def test_a_member_is_the_same_alone_and_inside_any_population():
    """Member s's passes and gradients depend on its own weights and rows only."""
    seeds = (4, 5, 6)
    together = _agent(seeds=seeds)
    obs, last = _rollout(3)
    update = CompiledCNNUpdate(together, None)  # type: ignore[arg-type]
    outs, values = _passes(update, obs, last)
    _, grads = update.policy_gradients(_minibatch(obs), torch.full((3,), 0.01),
                                       torch.full((3,), 0.5))
    grads = [g.clone() for g in grads]
    for i in (2, 0):
        alone = _agent(seeds=(seeds[i],))
        with torch.no_grad():  # the same weights as member i of the population
            for p, q in zip(alone.all_params(), together.all_params(), strict=True):
                p.copy_(q[i:i + 1])
        single = CompiledCNNUpdate(alone, None)  # type: ignore[arg-type]
        one_outs, one_values = _passes(single, obs[:, i:i + 1], last[i:i + 1])
        mb = _minibatch(obs)
        mb_one = Minibatch(mb.obs[i:i + 1], mb.actions[i:i + 1], mb.adv[i:i + 1],
                           mb.returns[i:i + 1], True)
        _, one_grads = single.policy_gradients(mb_one, torch.full((1,), 0.01),
                                               torch.full((1,), 0.5))
        for a, b in zip(outs, one_outs, strict=True):
            assert torch.equal(a[i:i + 1], b)
        assert torch.equal(values[i:i + 1], one_values)
        for g, g1 in zip(grads, one_grads, strict=True):
            assert torch.equal(g[i:i + 1], g1)


def test_minatar_training_is_bit_identical_on_the_compiled_path():
    pytest.importorskip("minatar")
    from study.trainer.population import CURVE_COLUMNS, Member, train_population

    hp = cfg.resolve({"policy_lr": 3e-3}, env="MinAtar/Breakout-v1")
    kw = dict(total_steps=640, log_every=320)
    together = train_population("MinAtar/Breakout-v1", [Member(hp, s) for s in (3, 4)], **kw)
    again = train_population("MinAtar/Breakout-v1", [Member(hp, 4)], **kw)[0]
    for k in CURVE_COLUMNS:
        np.testing.assert_array_equal(together[1].curve[k], again.curve[k], err_msg=k)
    with reference_path():
        ref = train_population("MinAtar/Breakout-v1", [Member(hp, 4)], **kw)[0]
    # The reference learns from the same first rollout: the first window's losses agree
    # closely (later ones drift apart as soon as one sampled action differs) but not to the
    # bit: the trainer took the compiled path (MinAtar's defaults), not autograd.
    for k in ("policy_loss", "value_loss", "entropy"):
        np.testing.assert_allclose(again.curve[k][0], ref.curve[k][0], rtol=1e-3, err_msg=k)
    assert not np.array_equal(again.curve["policy_loss"], ref.curve["policy_loss"])


@pytest.mark.parametrize("env_id", ["MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1",
                                    "MinAtar/Freeway-v1", "MinAtar/Asterix-v1"])
def test_member_by_member_rollouts_are_the_step_by_step_rollouts(monkeypatch, env_id):
    """compiled_cnn.play (each member's whole rollout, then the next member's) gives the
    trainer's step-by-step rollouts to the bit: curves, final returns and trained weights,
    also after a member stopped learning."""
    pytest.importorskip("minatar")
    from study.trainer import compiled_cnn
    from study.trainer.population import CURVE_COLUMNS, Member, train_population

    hp = cfg.resolve({"policy_lr": 3e-3}, env=env_id)
    members = [Member(hp, s) for s in (3, 4, 5)]

    def prune_first(step, row):
        return np.array([step == 320, False, False])

    def train():
        return train_population(env_id, members, total_steps=1280,
                                log_every=320, on_log=prune_first, save_policies=True)

    played = []
    play_rollout = CompiledCNNUpdate.play_rollout
    monkeypatch.setattr(CompiledCNNUpdate, "play_rollout",
                        lambda self, *a: played.append(1) or play_rollout(self, *a))
    member_major = train()
    assert len(played) == 1280 // 40  # every rollout (8 envs x 5 steps) played at once
    monkeypatch.setattr(compiled_cnn, "rollout_player", lambda trainer: None)
    step_major = train()
    assert len(played) == 1280 // 40
    assert [r.status for r in member_major] == ["pruned", "ok", "ok"]
    for a, b in zip(member_major, step_major, strict=True):
        assert (a.status, a.env_steps) == (b.status, b.env_steps)
        np.testing.assert_array_equal(a.final_return, b.final_return)
        for k in CURVE_COLUMNS:
            np.testing.assert_array_equal(a.curve[k], b.curve[k], err_msg=k)
        assert a.policy_state is not None and b.policy_state is not None
        assert a.policy_state.keys() == b.policy_state.keys()
        for k in a.policy_state:
            np.testing.assert_array_equal(a.policy_state[k], b.policy_state[k], err_msg=k)


@pytest.mark.parametrize("env_id,overrides,member_major", [
    ("MinAtar/Breakout-v1", {}, True),
    ("MinAtar/SpaceInvaders-v1", {}, True),
    ("MinAtar/Asterix-v1", {}, True),
    ("MinAtar/Seaquest-v1", {}, False),  # its games are not compiled
    ("MinAtar/Breakout-v1", {"share_trunk": False}, False),  # autograd's update
    ("MinAtar/Breakout-v1", {"algorithm": "ppo"}, False),
])
def test_rollouts_run_member_by_member_where_they_reproduce_the_trainers(
        env_id, overrides, member_major):
    pytest.importorskip("minatar")
    from study.trainer import compiled_cnn
    from study.trainer.population import Member, _check_members, _Trainer

    members = [Member(cfg.resolve(overrides, env=env_id), 0)]
    trainer = _Trainer(env_id, members, _check_members(members), 40, "cpu")
    trainer.obs = trainer.observe(trainer.env.reset(), update=True)
    assert (compiled_cnn.rollout_player(trainer) is not None) == member_major


def test_the_fused_rmsprop_step_is_the_optimizers_step():
    """policy_step takes each member's RMSprop step inside the backward loop: the same
    weights, optimizer state, norms and finiteness as the gradients and then
    MemberOptimizer.step, bit for bit (a member with a non-finite loss takes no step)."""
    obs, last = _rollout(3)
    hps = {"entropy_coef": torch.tensor([0.01, 0.02, 0.0]),
           "value_coef": torch.tensor([0.5, 0.5, 1.0]),
           "policy_lr": torch.tensor([1e-3, 3e-3, 1e-2]),
           "max_grad_norm": torch.tensor([0.5, 0.05, 10.0])}
    results = []
    for fused in (True, False):
        agent = _agent()
        update = CompiledCNNUpdate(agent, None)  # type: ignore[arg-type]
        opt = MemberOptimizer("rmsprop", agent.policy_params())
        for step in range(3):
            _passes(update, obs, last)
            mb = _minibatch(obs, seed=step)
            if step == 2:
                mb.adv[1, 0] = float("nan")  # member 1's loss is not finite: no step
            if fused:
                terms, norm, ok = update.policy_step(mb, hps, opt)
            else:
                terms, norm, ok = AutogradUpdate.policy_step(update, mb, hps, opt)
        results.append(([p.detach().clone() for p in agent.policy_params()],
                        [st[0].clone() for st in opt.state], norm, ok, opt.t.copy()))
    (p1, s1, n1, ok1, t1), (p2, s2, n2, ok2, t2) = results
    assert ok1.tolist() == ok2.tolist() == [True, False, True]
    torch.testing.assert_close(n1, n2, rtol=0, atol=0, equal_nan=True)  # (member 1's: NaN)
    assert (t1 == t2).all()
    for a, b in [*zip(p1, p2, strict=True), *zip(s1, s2, strict=True)]:
        assert torch.equal(a, b)


def test_values_of_any_rows_are_autograds():
    """V of a batch of observations (the bootstrap of truncated episodes) by the compiled
    pass, for as many rows as a whole rollout."""
    agent = _agent()
    obs, _ = _rollout(3)
    rows = obs.transpose(0, 1).reshape(3, N, *obs.shape[3:])
    fast = CompiledCNNUpdate(agent, None).values(rows)  # type: ignore[arg-type]
    np.testing.assert_allclose(fast, agent.values(rows).detach(), rtol=1e-5, atol=2e-6)


def test_adam_takes_the_unfused_step_with_the_compiled_gradients():
    pytest.importorskip("minatar")
    from study.trainer.population import Member, train_population

    hp = cfg.resolve({"policy_optimizer": "adam", "policy_lr": 3e-4}, env="MinAtar/Breakout-v1")
    kw = dict(total_steps=320, log_every=160)
    fast = train_population("MinAtar/Breakout-v1", [Member(hp, 2)], **kw)[0]
    with reference_path():
        ref = train_population("MinAtar/Breakout-v1", [Member(hp, 2)], **kw)[0]
    for k in ("policy_loss", "value_loss", "entropy", "grad_norm"):
        np.testing.assert_allclose(fast.curve[k][0], ref.curve[k][0], rtol=1e-3, err_msg=k)
