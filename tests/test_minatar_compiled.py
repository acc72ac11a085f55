"""The compiled MinAtar games (study.trainer.envs.minatar_compiled) against the minatar
package's own: every observation, reward and end, and the random number generators, over
long random play with sticky actions and resets (and, for Breakout, walls of bricks
refilled; for Space Invaders, waves cleared)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("minatar")

from minatar import Environment  # noqa: E402

from study.trainer.envs.minatar_compiled import COMPILED, CompiledGames  # noqa: E402
from study.trainer.envs.numpy_mt import next32, randint, uniform  # noqa: E402


def _games(name: str, seeds: list[int]) -> list[Environment]:
    games = [Environment(name) for _ in seeds]
    for g, seed in zip(games, seeds, strict=True):
        g.seed(seed)
        g.reset()
    return games


def test_the_generator_is_numpys():
    rs = np.random.RandomState(12345)
    _, key, pos, *_ = rs.get_state()
    keys, positions = key[None].copy(), np.array([pos])
    # rand(), randint(2), Freeway's randint(1, 6) and Asterix's randint(n) over its free
    # lanes (no draw for one), past a twist
    lanes = [1 + i % 8 for i in range(3000)]
    expected = [rs.rand() if i % 4 == 1 else rs.randint(2) if i % 4 == 2
                else rs.randint(1, 6) if i % 4 == 3 else rs.randint(lanes[i])
                for i in range(3000)]
    got = [uniform(keys, positions, 0) if i % 4 == 1 else next32(keys, positions, 0) & 1
           if i % 4 == 2 else randint(keys, positions, 0, 1, 6) if i % 4 == 3
           else randint(keys, positions, 0, 0, lanes[i]) for i in range(3000)]
    assert got == expected
    assert np.array_equal(keys[0], rs.get_state()[1]) and positions[0] == rs.get_state()[2]


def _assert_same_state(ours, reference):
    """Every game's hidden state too (timers, speeds, ...), its generator's and its last
    action: the package's games taken over again equal ours."""
    again = CompiledGames(_name_of(ours), reference)
    for name in ("state", "maps", "key", "pos"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(again, name), err_msg=name)


def _step_both(ours, reference, actions, t):
    """Step our games and the package's with ``actions``: every reward, end, final and
    next observation the same; returns the rewards and ends."""
    obs, final, reward, done = ours.step(actions)
    for g, game in enumerate(reference):
        r, d = game.act(int(actions[g]))
        assert (reward[g], done[g]) == (r, d), (t, g)
        assert np.array_equal(final[g], np.moveaxis(game.state(), -1, 0)), (t, g)
        if d:
            game.reset()
        assert np.array_equal(obs[g], np.moveaxis(game.state(), -1, 0)), (t, g)
    return reward, done


def _name_of(ours):
    return next(k for k, v in COMPILED.items() if v == ours.game)


def _breakout_policy(reference, rng, t, ours):
    """Mostly follow the ball (n, l, r of the minimal set), so that some episodes last;
    every fourth game's wall cleared now and then (refilled on its next bounce)."""
    if t % 100 == 50:
        for g in range(0, len(reference), 4):
            reference[g].env.brick_map[:] = 0
            ours.maps[g] = 0
    follow = np.array([0 if g.env.ball_x == g.env.pos else 1 if g.env.ball_x < g.env.pos
                       else 2 for g in reference])
    return np.where(rng.random(len(reference)) < 0.8, follow, rng.integers(0, 3, len(follow)))


def _space_invaders_policy(reference, rng, t, ours):
    """Fire most of the time (n, l, r, f of the minimal set); now and then every fourth
    game's wave is cut to one alien above the cannon (which then moves every step), so
    that waves get cleared and the next ones come faster."""
    if t % 50 == 25:
        for g in range(0, len(reference), 4):
            env = reference[g].env
            env.alien_map[:] = 0
            env.alien_map[5, env.pos] = 1
            ours.maps[g, 0] = env.alien_map
    return np.where(rng.random(len(reference)) < 0.6, 3, rng.integers(0, 4, len(reference)))


def _freeway_policy(reference, rng, t, ours):
    """Mostly up (n, u, d of the minimal set), so that the chicken crosses (new cars)."""
    return np.where(rng.random(len(reference)) < 0.7, 1, rng.integers(0, 3, len(reference)))


def _asterix_policy(reference, rng, t, ours):
    """Random moves (n, l, u, r, d of the minimal set)."""
    return rng.integers(0, 5, len(reference))


@pytest.mark.parametrize("name,policy,min_ends,enough", [
    ("breakout", _breakout_policy, 100, 5),
    ("space_invaders", _space_invaders_policy, 100, 10),
    ("freeway", _freeway_policy, 32, 5),  # an episode is 2,500 steps
    ("asterix", _asterix_policy, 100, 3),
])
def test_long_random_play_is_the_packages_bit_for_bit(name, policy, min_ends, enough):
    seeds = list(range(100, 132))
    ours, reference = CompiledGames(name, _games(name, seeds)), _games(name, seeds)
    minimal = np.array(reference[0].minimal_action_set())
    rng = np.random.default_rng(0)
    n = len(seeds)
    episode = np.zeros(n)
    best = ends = 0
    for t in range(3000):
        reward, done = _step_both(ours, reference, minimal[policy(reference, rng, t, ours)], t)
        episode += reward
        best = max(best, episode.max())
        episode[done] = 0
        ends += int(done.sum())
    assert ends >= min_ends and best >= enough  # many episodes, some of them long
    if name == "space_invaders":  # waves cleared, the next ones faster
        assert max(g.env.ramp_index for g in reference) >= 2
    _assert_same_state(ours, reference)
    for game in reference:
        game.reset()
    expected = np.stack([np.moveaxis(g.state(), -1, 0) for g in reference])
    assert np.array_equal(ours.reset(), expected)


def test_space_invaders_from_any_state_is_the_packages():
    """Random boards (aliens down to the cannon's row and at the edges, bullets anywhere,
    timers about to fire, either direction) stepped a few times on both sides: the rare
    branches (aliens reaching the bottom, rows wrapping, ties in the nearest column)."""
    rng = np.random.default_rng(1)
    reference = _games("space_invaders", list(range(64)))
    for game in reference:
        env = game.env
        for m in ("alien_map", "f_bullet_map", "e_bullet_map"):
            getattr(env, m)[:] = rng.random((10, 10)) < (0.3 if m == "alien_map" else 0.1)
        env.pos, env.alien_dir = int(rng.integers(0, 10)), int(rng.choice([-1, 1]))
        env.alien_move_timer, env.alien_shot_timer, env.shot_timer = rng.integers(0, 3, 3)
        env.enemy_move_interval = int(rng.integers(6, 13))
    ours = CompiledGames("space_invaders", reference)
    minimal = np.array(reference[0].minimal_action_set())
    for t in range(6):
        _step_both(ours, reference, minimal[rng.integers(0, 4, len(reference))], t)
    _assert_same_state(ours, reference)
