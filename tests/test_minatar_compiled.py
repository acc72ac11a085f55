"""The compiled MinAtar games (study.trainer.envs.minatar_compiled) against the minatar
package's own: every observation, reward and end, and the random number generators, over
long random play with sticky actions and resets (and, for Breakout, walls of bricks
refilled; for Space Invaders, waves cleared)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("minatar")

from minatar import Environment  # noqa: E402

from study.trainer.envs.minatar_compiled import CompiledGames, next32, uniform  # noqa: E402


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
    expected = [rs.rand() if i % 3 else rs.randint(2) for i in range(2000)]  # past a twist
    got = [uniform(keys, positions, 0) if i % 3 else next32(keys, positions, 0) & 1
           for i in range(2000)]
    assert got == expected
    assert np.array_equal(keys[0], rs.get_state()[1]) and positions[0] == rs.get_state()[2]


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


@pytest.mark.parametrize("name,policy,enough", [
    ("breakout", _breakout_policy, 5),
    ("space_invaders", _space_invaders_policy, 10),
])
def test_long_random_play_is_the_packages_bit_for_bit(name, policy, enough):
    seeds = list(range(100, 132))
    ours, reference = CompiledGames(name, _games(name, seeds)), _games(name, seeds)
    minimal = np.array(reference[0].minimal_action_set())
    rng = np.random.default_rng(0)
    n = len(seeds)
    episode = np.zeros(n)
    best = ends = 0
    for t in range(3000):
        actions = minimal[policy(reference, rng, t, ours)]
        obs, final, reward, done = ours.step(actions)
        for g, game in enumerate(reference):
            r, d = game.act(int(actions[g]))
            assert (reward[g], done[g]) == (r, d), (t, g)
            assert np.array_equal(final[g], np.moveaxis(game.state(), -1, 0)), (t, g)
            if d:
                game.reset()
            assert np.array_equal(obs[g], np.moveaxis(game.state(), -1, 0)), (t, g)
        episode += reward
        best = max(best, episode.max())
        episode[done] = 0
        ends += int(done.sum())
    assert ends > 100 and best >= enough  # many episodes, some of them long
    if name == "space_invaders":  # waves cleared, the next ones faster
        assert max(g.env.ramp_index for g in reference) >= 2
    for g, game in enumerate(reference):
        _, key, pos, *_ = game.random.get_state()
        assert np.array_equal(ours.key[g], key) and ours.pos[g] == pos
        assert ours.state[g, 1] == game.last_action
        game.reset()
    expected = np.stack([np.moveaxis(g.state(), -1, 0) for g in reference])
    assert np.array_equal(ours.reset(), expected)
