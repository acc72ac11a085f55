"""Per-member counter-based random streams.

Every member of a population owns independent streams (one per purpose: actions, env
resets, evaluation resets, minibatch shuffles). A stream is SplitMix64 with random access:
draw ``i`` of the stream with key ``k`` is ``mix64(k + (i + 1) * GOLDEN)``. Because a draw
depends only on (key, counter), a member's numbers are the same whether it is simulated
alone or inside any population, and the whole population is drawn in one vectorized NumPy
call instead of one generator call per member.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0

# Stream identifiers: spawn keys of numpy.random.SeedSequence, so streams of different
# purposes are unrelated even for the same seed.
STREAM_INIT = 0
STREAM_ACTIONS = 1
STREAM_RESET = 2
STREAM_EVAL_RESET = 3
STREAM_SHUFFLE = 4
STREAM_EVAL_ACTIONS = 5


def stream_key(seed: int, stream: int) -> np.uint64:
    """64-bit key of ``stream`` for ``seed`` (SeedSequence hashing, so nearby seeds differ)."""
    state = np.random.SeedSequence(entropy=int(seed), spawn_key=(int(stream),)).generate_state(
        2, dtype=np.uint64
    )
    return np.uint64(state[0] ^ (state[1] << np.uint64(1)))


def torch_seed(seed: int, stream: int = STREAM_INIT) -> int:
    """A 63-bit integer seed for ``torch.Generator`` derived from ``(seed, stream)``."""
    return int(stream_key(seed, stream) >> np.uint64(1))


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class MemberStreams:
    """One counter-based stream per member; draws are shaped ``[S, *shape]``.

    Each call to :meth:`uniform` consumes ``prod(shape)`` numbers of every member's stream,
    so members stay aligned with their solo runs as long as every member draws the same
    per-member shape, which the population trainer guarantees.
    """

    def __init__(self, seeds: Sequence[int], stream: int) -> None:
        self.keys = np.array([stream_key(s, stream) for s in seeds], dtype=np.uint64)
        self.counters = np.zeros(len(seeds), dtype=np.uint64)

    @property
    def n_members(self) -> int:
        return int(self.keys.shape[0])

    def bits(self, shape: tuple[int, ...]) -> np.ndarray:
        """Raw uint64 draws shaped ``[S, *shape]``."""
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        idx = np.arange(1, n + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self.keys[:, None] + (self.counters[:, None] + idx[None, :]) * _GOLDEN
            out = _mix64(x)
        self.counters += np.uint64(n)
        return out.reshape((self.n_members, *shape))

    def uniform(self, shape: tuple[int, ...]) -> np.ndarray:
        """Float64 draws in [0, 1), shaped ``[S, *shape]`` (53 random bits each): the top
        53 bits of :meth:`bits` times 2^-53, in one compiled loop (same numbers)."""
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        out = np.empty((self.n_members, n))
        _uniform_(self.keys, self.counters, out)
        self.counters += np.uint64(n)
        return out.reshape((self.n_members, *shape))

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal draws by Box-Muller, shaped ``[S, *shape]``."""
        u = self.uniform((2, *shape))
        u1 = 1.0 - u[:, 0]  # (0, 1], keeps log finite
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u[:, 1])


@numba.njit(cache=True, nogil=True)
def _uniform_(keys: np.ndarray, counters: np.ndarray, out: np.ndarray) -> None:
    """``out[s, i]`` = :func:`uniform_draw` ``(keys[s], counters[s] + i + 1)``."""
    for s in range(out.shape[0]):
        for i in range(out.shape[1]):
            out[s, i] = uniform_draw(keys[s], counters[s] + np.uint64(i + 1))


@numba.njit(cache=True, nogil=True)
def uniform_draw(key: np.uint64, counter: np.uint64) -> float:
    """Draw number ``counter`` (1-based) of the stream ``key``, in [0, 1): the top 53 bits
    of ``mix64(key + counter * GOLDEN)`` / 2^53 (compiled code's single draws)."""
    z = key + counter * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * _INV_2_53
