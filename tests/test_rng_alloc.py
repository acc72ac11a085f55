"""Counter-based streams against a plain-Python SplitMix64.

(The allocator setting's page-fault check counts OS counters, so it is a benchmark:
``python benchmarks/timing_checks.py``.)"""

import numpy as np

from study.trainer.rng import MemberStreams, stream_key

MASK = (1 << 64) - 1


def _splitmix(key: int, i: int) -> int:
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_uniform_draws_are_splitmix64_by_counter():
    seeds = [0, 7, 123456789]
    streams = MemberStreams(seeds, 1)
    first = streams.uniform((2, 3))
    second = streams.uniform((4,))  # continues each member's counter
    for m, seed in enumerate(seeds):
        key = int(stream_key(seed, 1))
        expected = [(_splitmix(key, i) >> 11) / 2.0**53 for i in range(10)]
        assert first[m].ravel().tolist() == expected[:6]
        assert second[m].tolist() == expected[6:]
    assert np.array_equal(MemberStreams(seeds, 1).bits((6,)) >> np.uint64(11),
                          (first.reshape(3, 6) * 2.0**53).astype(np.uint64))  # fmt: skip


def test_a_members_draws_do_not_depend_on_the_population():
    alone = MemberStreams([42], 3).uniform((5, 8))
    together = MemberStreams([1, 42, 2], 3).uniform((5, 8))
    assert np.array_equal(alone[0], together[1])
