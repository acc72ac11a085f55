"""numpy's legacy ``RandomState`` draws, compiled: its MT19937 generator and the draws the
MinAtar games make (``rand()``, legacy masked ``randint``), from the generator's state
(``RandomState.get_state()``: 624 key words and a position) kept in arrays, one row a
game, advanced exactly as numpy advances it. tests/test_minatar_compiled.py compares long
mixed sequences of draws with numpy's.
"""

from __future__ import annotations

import numba
import numpy as np

from study.trainer.kernels import JIT_OPTIONS

__all__ = ["KEY_WORDS", "next32", "randint", "uniform"]

KEY_WORDS = _N = 624
_M = 397
_MATRIX_A, _UPPER, _LOWER = np.uint32(0x9908B0DF), np.uint32(0x80000000), np.uint32(0x7FFFFFFF)


@numba.njit(**JIT_OPTIONS)
def _twist(key):
    """MT19937's next 624 words (numpy's ``mt19937_gen``)."""
    for i in range(_N):
        y = (key[i] & _UPPER) | (key[(i + 1) % _N] & _LOWER)
        nxt = key[(i + _M) % _N] ^ (y >> np.uint32(1))
        if y & np.uint32(1):
            nxt ^= _MATRIX_A
        key[i] = nxt


@numba.njit(**JIT_OPTIONS)
def next32(key, pos, g):
    """Game g's next 32-bit output (numpy's ``mt19937_next``)."""
    k = key[g]
    if pos[g] >= _N:
        _twist(k)
        pos[g] = 0
    y = k[pos[g]]
    pos[g] += 1
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@numba.njit(**JIT_OPTIONS)
def uniform(key, pos, g):
    """``RandomState.rand()``: a double in [0, 1) from two outputs."""
    a = np.float64(next32(key, pos, g) >> np.uint32(5))
    b = np.float64(next32(key, pos, g) >> np.uint32(6))
    return (a * 67108864.0 + b) / 9007199254740992.0


@numba.njit(**JIT_OPTIONS)
def randint(key, pos, g, low, high):
    """Legacy ``RandomState.randint(low, high)`` (int64): ``low`` plus the first of
    32-bit outputs masked to the bits of ``high - 1 - low`` that is at most it (numpy's
    masked rejection, ``buffered_bounded_masked_uint32``); no draw when the range is one
    number."""
    if high - 1 == low:
        return np.int64(low)
    rng = np.uint32(high - 1 - low)
    mask = rng
    for shift in (1, 2, 4, 8, 16):
        mask |= mask >> np.uint32(shift)
    while True:
        v = next32(key, pos, g) & mask
        if v <= rng:
            return low + np.int64(v)
