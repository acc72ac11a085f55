"""study.trainer.views: borrowed arrays and inline reshapes for compiled loops."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from study.trainer.simd import vlane, vload
from study.trainer.views import borrowed, borrowed_list, flat, view


@numba.njit
def _write_through_borrowed(a, pair):
    b = borrowed(a)
    for i in range(b.shape[0]):
        row = b[i]  # a view of a borrowed array: no owner either
        row[0] = -1.0
    x, y = borrowed(pair)
    x[1] = 7.0
    lst = borrowed_list([y, y])
    lst[1][1, 2] = 9.0
    return b.shape[0], x.shape, lst[0].shape


def test_borrowed_arrays_are_the_same_memory():
    a = np.zeros((3, 4), dtype=np.float32)
    pair = (np.zeros(2), np.zeros((2, 3), dtype=np.float32))
    rows, x_shape, y_shape = _write_through_borrowed(a, pair)
    assert (rows, x_shape, y_shape) == (3, (2,), (2, 3))
    assert np.array_equal(a[:, 0], [-1.0] * 3) and not a[:, 1:].any()
    assert pair[0][1] == 7.0 and pair[1][1, 2] == 9.0


@numba.njit
def _views(a):
    return view(a, (2, 8)).copy(), view(a[1:], 12).copy(), view(a, (2, 2, 2)).copy(), flat(a)


def test_view_reshapes_the_leading_elements_of_a_contiguous_array():
    a = np.arange(32, dtype=np.float32).reshape(4, 8)
    two, row, cube, whole = _views(a)
    assert np.array_equal(two, a.reshape(-1)[:16].reshape(2, 8))
    assert np.array_equal(row, a.reshape(-1)[8:20])  # from row 1 on, into row 2
    assert np.array_equal(cube, a.reshape(-1)[:8].reshape(2, 2, 2))
    assert np.array_equal(whole, a.reshape(-1)) and np.shares_memory(whole, a)


@numba.njit
def _view_of_a_local(n):
    return view(np.arange(n, dtype=np.float32) * np.float32(2), (2, n // 2))


@numba.njit
def _too_large(a):
    return view(a, (3, a.shape[1]))


def test_a_view_keeps_its_array_alive_and_stays_inside_it():
    assert np.array_equal(_view_of_a_local(8), (np.arange(8) * 2).reshape(2, 4))
    with pytest.raises(ValueError, match="larger than its array"):
        _too_large(np.zeros((2, 4), dtype=np.float32))


def test_view_takes_only_contiguous_arrays():
    with pytest.raises(numba.core.errors.TypingError, match="C-contiguous"):
        _views(np.zeros((4, 16), dtype=np.float32)[:, ::2])


@numba.njit
def _lanes(x):
    v = vload(x, 0)
    return np.array([vlane(v, i) for i in range(16)])


def test_vlane_reads_each_lane():
    x = np.arange(16, dtype=np.float32) * 1.5
    assert np.array_equal(_lanes(x), x)
