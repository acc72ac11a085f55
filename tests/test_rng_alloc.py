"""Counter-based streams against a plain-Python SplitMix64, and the allocator setting."""

import subprocess
import sys

import numpy as np
import pytest

from study.rng import MemberStreams, stream_key

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


_FAULTS = """
import resource, numpy as np
from study.alloc import keep_freed_memory
if {keep}:
    assert keep_freed_memory() and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    blocks = [np.ones(1 << 18) for _ in range(4)]  # 4 x 2 MiB, then all freed
before = faults()
for _ in range(50):
    blocks = [np.ones(1 << 18) for _ in range(4)]
    del blocks
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_reallocation():
    def faults(keep: bool) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS.format(keep=keep)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return int(out.stdout)

    # Without it, glibc gives the freed 8 MiB back (trim) and faults it in again: about
    # 2,000 pages per round. With it the pages stay mapped.
    assert faults(False) > 50 * 1000
    assert faults(True) < 200
