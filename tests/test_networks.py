"""Networks that plug in: CNN encoders on image tasks (MinAtar, Atari), the autograd
reference path against the hand-written MLP gradients, and bad network specs."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.sweeps.grid import main as grid_main
from study.sweeps.train import main as train_main
from study.trainer.networks import ActorCritic, reference_path
from study.trainer.population import CURVE_COLUMNS, Member, train_population

torch.set_num_threads(1)



def _needs(module: str) -> None:
    pytest.importorskip(module, reason=f"the optional {module!r} extra is not installed")


def _same(a, b) -> None:
    for k in CURVE_COLUMNS:
        np.testing.assert_array_equal(a.curve[k], b.curve[k], err_msg=k)
    assert a.final_return == b.final_return or (
        math.isnan(a.final_return) and math.isnan(b.final_return))


IMAGE = gym.spaces.Box(0, 255, (3, 12, 12), dtype=np.uint8)


@pytest.mark.parametrize("share", [True, False])
def test_cnn_matches_torch_modules_forward_and_gradients(share):
    """Each member's stacked network equals a plain torch network built from its own
    weights (torch.nn.Conv2d, ReLU, Flatten, Linear), outputs and gradients."""
    hp = cfg.resolve({"encoder": "cnn", "cnn_channels": [4, 6], "cnn_kernels": [3, 3],
                      "cnn_strides": [2, 1], "share_trunk": share,
                      "policy_hidden_sizes": [8] if share else [], "value_hidden_sizes":
                      [8] if share else [5], "activation": "relu"})
    seeds = [3, 4, 5]
    agent = ActorCritic(Structure.of(hp), seeds, IMAGE, gym.spaces.Discrete(4), torch.zeros(3),
                        torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (3, 7, 3, 12, 12), dtype=torch.uint8, generator=gen)
    out, values = agent.policy_and_values(obs)
    loss = (out.square().sum(dim=(1, 2)) + values.sum(dim=1)).sum()
    params = agent.all_params()
    grads = torch.autograd.grad(loss, params)
    for m in range(3):
        state = {k: torch.tensor(v) for k, v in agent.member_state(m).items()}

        def tower(name, x, state=state):
            h = x.float() / 255.0
            for j in range(2):
                w, b = state[f"{name}_enc.{2 * j}"], state[f"{name}_enc.{2 * j + 1}"]
                h = torch.relu(torch.nn.functional.conv2d(h, w, b, stride=(2, 1)[j]))
            return h.flatten(1)

        def mlp(x, name, state=state):
            n = sum(1 for k in state if k.startswith(f"{name}."))
            for j in range(n // 2):
                x = x @ state[f"{name}.{2 * j}"] + state[f"{name}.{2 * j + 1}"]
                if j < n // 2 - 1:
                    x = torch.relu(x)
            return x

        for v in state.values():
            v.requires_grad_(True)
        if share:
            h = torch.relu(mlp(tower("trunk", obs[m]), "trunk"))
            o, val = mlp(h, "pi"), mlp(h, "v")[:, 0]
        else:
            o, val = mlp(tower("pi", obs[m]), "pi"), mlp(tower("v", obs[m]), "v")[:, 0]
        torch.testing.assert_close(o, out[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(val, values[m], rtol=1e-5, atol=1e-6)
        ref = torch.autograd.grad(o.square().sum() + val.sum(), list(state.values()))
        by_name = dict(zip(state, ref, strict=True))
        names = [k for k in agent.member_state(m)]
        flat = {k: g[m] for k, g in zip(names, _ordered(agent, grads), strict=True)}
        for k in names:
            torch.testing.assert_close(flat[k], by_name[k].reshape(flat[k].shape),
                                       rtol=1e-4, atol=1e-5, msg=k)


def _ordered(agent, grads):
    """Gradients of all_params() reordered as member_state() names them."""
    by_id = {id(p): g for p, g in zip(agent.all_params(), grads, strict=True)}
    out = []
    for name in ("trunk_enc", "trunk", "pi_enc", "pi", "v_enc", "v"):
        out += [by_id[id(p)] for p in agent.groups.get(name, [])]
    return out


def test_bad_network_specs_are_refused_in_one_line(tmp_path, capsys):
    cases = [
        (["--env", "CartPole-v1", "--set", "encoder=nature_cnn"], "needs image observations"),
        (["--env", "CartPole-v1", "--set", "encoder=cnn"], "non-empty lists of one length"),
        (["--env", "CartPole-v1", "--set", "frame_stack=2"], "ALE/* environments only"),
        (["--env", "CartPole-v1", "--set", "cnn_channels=[4]"], 'only with encoder = "cnn"'),
    ]
    for args, expect in cases:
        rc = train_main([*args, "--seeds", "0", "--total-steps", "100", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert expect in err, err



def test_normalize_obs_on_images_is_refused_for_any_member_not_only_the_first():
    # normalize_obs is per member: a population is refused when any member sets it on
    # images (the check once read the first member's value only). Sweeps on ALE/MinAtar
    # are refused before that, when a config is resolved.
    _needs("minatar")
    with pytest.raises(cfg.ConfigError, match="normalize_obs = true applies to vector"):
        cfg.resolve({"normalize_obs": True}, env="MinAtar/Breakout-v1")
    plain = cfg.resolve({}, env="MinAtar/Breakout-v1")
    normed = {**plain, "normalize_obs": True}  # (as a generic image env would let through)
    for members in ([Member(normed, 0)], [Member(plain, 0), Member(normed, 1)]):
        with pytest.raises(cfg.ConfigError, match="normalize_obs = true applies to vector"):
            train_population("MinAtar/Breakout-v1", members, total_steps=40, log_every=20,
                             check_memory=False)

def test_minatar_cnn_member_is_bit_identical_alone_and_in_a_population():
    _needs("minatar")
    hps = [cfg.resolve({"policy_lr": lr, "clip_reward": clip}, env="MinAtar/Breakout-v1")
           for lr, clip in [(1e-3, False), (3e-3, True)]]
    population = [Member(hps[i % 2], s) for i, s in enumerate([1, 2, 3])]
    kw = dict(total_steps=400, log_every=200)
    together = train_population("MinAtar/Breakout-v1", population, **kw)
    alone = train_population("MinAtar/Breakout-v1", [population[2]], **kw)[0]
    _same(alone, together[2])
    again = train_population("MinAtar/Breakout-v1", [population[1], population[0]], **kw)
    _same(again[1], together[0])


def test_cnn_with_separate_towers_and_minibatches_is_bit_identical():
    _needs("minatar")
    hp = cfg.resolve({"share_trunk": False, "n_minibatches": 2, "value_iters": 2,
                      "normalize_advantage": True}, env="MinAtar/Breakout-v1")
    kw = dict(total_steps=240, log_every=120)
    together = train_population("MinAtar/Breakout-v1", [Member(hp, 7), Member(hp, 8)], **kw)
    _same(train_population("MinAtar/Breakout-v1", [Member(hp, 8)], **kw)[0], together[1])


def test_image_observations_stay_uint8_channels_first():
    _needs("minatar")
    from study.trainer.envs import env_spaces, make_population_env

    obs_space, _ = env_spaces("MinAtar/Breakout-v1")
    assert obs_space.shape == (4, 10, 10) and obs_space.dtype == np.uint8
    env = make_population_env("MinAtar/Breakout-v1", [0, 1], 3)
    obs = env.reset()
    assert obs.shape == (2, 3, 4, 10, 10) and obs.dtype == np.uint8
    assert set(np.unique(obs)) <= {0, 1}
    step = env.step(np.zeros((2, 3), dtype=np.int64))
    assert step.obs.dtype == np.uint8 and step.final_obs.dtype == np.uint8
    env.close()


def test_atari_preprocessing_shapes_and_reward_clipping():
    _needs("ale_py")
    _needs("cv2")
    from study.trainer.envs import env_spaces, make_population_env

    hp = cfg.resolve({"frame_stack": 2, "screen_size": 42, "grayscale": False},
                     env="ALE/Pong-v5")
    obs_space, act_space = env_spaces("ALE/Pong-v5", Structure.of(hp))
    assert obs_space.shape == (6, 42, 42) and obs_space.dtype == np.uint8  # 2 RGB frames
    assert act_space.n == 6
    default = cfg.resolve({}, env="ALE/Breakout-v5")
    assert env_spaces("ALE/Breakout-v5", Structure.of(default))[0].shape == (4, 84, 84)
    assert default["encoder"] == "nature_cnn" and default["clip_reward"]
    env = make_population_env("ALE/Breakout-v5", [0], 1, hp=Structure.of(default))
    env.reset()
    rng = np.random.default_rng(0)
    lost = [env.step(rng.integers(4, size=(1, 1))).life_lost[0, 0] for _ in range(400)]
    env.close()
    assert any(lost)  # random play loses a life within 1,600 frames


def test_clipped_rewards_are_learned_and_raw_returns_logged():
    """Pendulum's rewards are -16..0 per step: a member that clips learns from -1 (a much
    smaller value loss) while both log the same raw episode returns' scale."""
    hps = [cfg.resolve({"clip_reward": c, "num_envs": 2}) for c in (False, True)]
    runs = train_population("Pendulum-v1", [Member(hps[0], 3), Member(hps[1], 3)],
                            total_steps=2000, log_every=1000)
    plain, clipped = runs
    assert np.nanmax(plain.curve["episode_return"]) < -100
    assert np.nanmax(clipped.curve["episode_return"]) < -100
    assert np.nanmean(clipped.curve["value_loss"]) < 0.1 * np.nanmean(plain.curve["value_loss"])


@pytest.mark.slow
def test_tiny_minatar_population_learns():
    """Breakout-v1 with the MinAtar CNN: 6 seeds x 60k steps. A random policy scores about
    0.5 per episode here; after training the median is well above it."""
    _needs("minatar")
    hp = cfg.resolve({"entropy_coef": 0.01, "policy_lr": 1e-3, "value_lr": 1e-3,
                      "num_envs": 16}, env="MinAtar/Breakout-v1")
    runs = train_population("MinAtar/Breakout-v1", [Member(hp, s) for s in range(6)],
                            total_steps=60_000, log_every=10_000)
    first = np.array([r.curve["episode_return"][0] for r in runs])
    final = np.array([r.final_return for r in runs])
    assert np.median(final) > 2 * np.median(first), (first, final)
    assert (final > first).sum() >= 5, (first, final)


def test_reference_path_agrees_with_the_hand_written_gradients():
    """The accelerated MLP update (hand-written gradients, fused passes) against the
    autograd reference over a few updates: close, not bit-identical."""
    hp = cfg.resolve({"normalize_advantage": True, "entropy_coef": 0.01})
    members = [Member(hp, s) for s in (1, 2)]
    kw = dict(total_steps=400, log_every=80)
    fast = train_population("CartPole-v1", members, **kw)
    with reference_path():
        ref = train_population("CartPole-v1", members, **kw)
    for a, b in zip(fast, ref, strict=True):
        for k in ("policy_loss", "value_loss", "entropy", "grad_norm"):
            np.testing.assert_allclose(a.curve[k], b.curve[k], rtol=2e-3, atol=1e-5,
                                       err_msg=k)


def test_cnn_sweep_with_a_bad_spec_writes_nothing(tmp_path, capsys):
    _needs("minatar")
    sweep = tmp_path / "s.toml"
    sweep.write_text('name = "bad"\nenv = "MinAtar/Breakout-v1"\ntotal_steps = 400\n'
                     'log_every = 200\nseeds = [0]\n[hyperparameters]\nencoder = "cnn"\n'
                     'cnn_channels = [8, 8]\ncnn_kernels = [5, 5]\ncnn_strides = [2, 2]\n')
    out = tmp_path / "out"
    rc = grid_main([str(sweep), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "below 1x1" in err and "10x10 -> 3x3 -> 0x0" in err, err
    assert not out.exists()


@pytest.mark.parametrize("game", ["Breakout", "SpaceInvaders", "Seaquest"])
def test_minatar_population_equals_the_gymnasium_path(game):
    """The games stepped directly give the generic path's observations, rewards and ends,
    bit for bit, resets included."""
    _needs("minatar")
    from study.trainer.envs import env_spaces, generic_only, make_population_env

    env_id = f"MinAtar/{game}-v1"
    fast = make_population_env(env_id, [3, 4], 3)
    with generic_only(env_id):
        slow = make_population_env(env_id, [3, 4], 3)
        assert env_spaces(env_id) == (fast.observation_space, fast.action_space)
    np.testing.assert_array_equal(fast.reset(), slow.reset())
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(400):
        a = rng.integers(fast.action_space.n, size=(2, 3))
        x, y = fast.step(a), slow.step(a)
        for k in ("obs", "reward", "terminated", "truncated", "final_obs"):
            np.testing.assert_array_equal(getattr(x, k), getattr(y, k), err_msg=k)
        ends += int(x.terminated.sum())
    assert ends > 0
