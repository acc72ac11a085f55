"""The compiled MinAtar Breakout (study.trainer.envs.minatar_breakout) against the minatar
package's own game: every observation, reward and end, and the random number generators,
over long random play with sticky actions, resets and walls of bricks refilled."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("minatar")

from minatar import Environment  # noqa: E402

from study.trainer.envs.minatar_breakout import BreakoutGames, _next32, _uniform  # noqa: E402


def _games(seeds: list[int]) -> list[Environment]:
    games = [Environment("breakout") for _ in seeds]
    for g, seed in zip(games, seeds, strict=True):
        g.seed(seed)
        g.reset()
    return games


def test_the_generator_is_numpys():
    rs = np.random.RandomState(12345)
    _, key, pos, *_ = rs.get_state()
    keys, positions = key[None].copy(), np.array([pos])
    expected = [rs.rand() if i % 3 else rs.randint(2) for i in range(2000)]  # past a twist
    got = [_uniform(keys, positions, 0) if i % 3 else _next32(keys, positions, 0) & 1
           for i in range(2000)]
    assert got == expected
    assert np.array_equal(keys[0], rs.get_state()[1]) and positions[0] == rs.get_state()[2]


def test_long_random_play_is_the_packages_bit_for_bit():
    seeds = list(range(100, 132))
    ours, reference = BreakoutGames(_games(seeds)), _games(seeds)
    minimal = np.array(reference[0].minimal_action_set())
    rng = np.random.default_rng(0)
    n = len(seeds)
    episode = np.zeros(n)
    best = ends = 0
    for t in range(3000):
        if t % 100 == 50:  # every fourth game's wall cleared: refilled on its next bounce
            for g in range(0, n, 4):
                reference[g].env.brick_map[:] = 0
                ours.bricks[g] = 0
        # Mostly follow the ball (n, l, r of the minimal set), so that some episodes last;
        # random actions otherwise.
        follow = np.array([0 if g.env.ball_x == g.env.pos else 1 if g.env.ball_x < g.env.pos
                           else 2 for g in reference])
        actions = minimal[np.where(rng.random(n) < 0.8, follow, rng.integers(0, 3, n))]
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
    assert ends > 100 and best >= 5  # many episodes, some of them long
    for g, game in enumerate(reference):
        _, key, pos, *_ = game.random.get_state()
        assert np.array_equal(ours.key[g], key) and ours.pos[g] == pos
        assert ours.state[g, 8] == game.last_action
        game.reset()
    expected = np.stack([np.moveaxis(g.state(), -1, 0) for g in reference])
    assert np.array_equal(ours.reset(), expected)
