"""Member-blocked MLP passes compiled by numba, with the bits of the torch products they replace.

The accelerated MLP path (study.trainer.nets: ``forward_cached``, ``backward``) computes each
layer with torch's batched products and a few fused kernels, one operation over all members
at a time. Here a member's whole pass (every layer, its activations, its gradients) is one
loop over that member's weights; study.trainer.compiled_a2c builds its A2C loop on them.

Same bits, not merely close. torch's CPU products (MKL) sum every output element over the
inner index in order, starting from zero, in a way that depends on the kernel MKL picks for
the shape (:data:`MODES`; measured here: fused multiply-adds for most, separately rounded
products for outputs narrower than 9, a four-way interleaved dot product for a transposed
operand, and blocks of 192 terms for longer sums; one- and two-row products match none).
So :class:`CompiledMLP` asks torch: for every product of a pass it runs torch's own pass
(``forward_cached``/``backward``) on random data of this network's exact shapes and keeps
the mode whose bits match. A pass with a product that no mode matches is left to torch
(:meth:`CompiledMLP.forward_plan` returns None). Activations are tanh (``kernels._tanh1``,
the rational tanh of ``kernels.tanh_``) or relu; hidden bias gradients come from
``kernels.tanh_backward_rows`` for tanh and from torch's own sum (:func:`torch_column_sums`,
its cascade reproduced) for relu, as does the output layer's bias gradient in the loop. A
member's arithmetic never looks at another member's data, so bit-identity across
populations holds as before.

Fast where it can be: a product at least 16 outputs wide keeps a tile of four rows by 64
columns of sums in registers (study.trainer.simd) over the whole inner loop, adding the
terms in the same order (about 105 GFLOP/s on 64-wide layers, against 66-80 with a load
and a store of each sum every four terms); the weights' transposes for the backward pass
are copied in 16 x 16 blocks transposed in registers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numba
import numpy as np
import torch

from study.trainer import kernels
from study.trainer.kernels import JIT_OPTIONS, _tanh1
from study.trainer.simd import (
    LANES,
    transpose16,
    vadd,
    vfma,
    vlane,
    vload,
    vload4_rows,
    vload4_tiled,
    vmul,
    vsplat,
    vstore,
)
from study.trainer.views import view

__all__ = ["ACTIVATIONS", "BLOCKED", "DOT4", "FMA", "MODES", "SEPARATE", "CompiledMLP",
           "arrays", "backward_member", "backward_work", "forward_member", "torch_column_sums",
           "torch_row_sum", "torch_passes"]

#: How a product sums its terms: in order with fused multiply-adds (FMA) or with separately
#: rounded products (SEPARATE), or as four interleaved partial sums of rounded products
#: added pairwise at the end (DOT4: MKL's dot-product kernel, for a transposed operand);
#: ``BLOCKED + mode``: the same within blocks of the inner dimension (long sums).
FMA, SEPARATE, DOT4, BLOCKED = 1, 0, 2, 3
MODES = (FMA, SEPARATE, DOT4, BLOCKED + FMA, BLOCKED + SEPARATE)

#: Activations (``CompiledMLP.activation``): none (the output layer), tanh, relu.
NONE, TANH, RELU = 0, 1, 2
ACTIVATIONS = {"tanh": TANH, "relu": RELU}
_NO_BIAS = np.zeros(0, dtype=np.float32)


@numba.njit(**JIT_OPTIONS, inline="always")
def _product_rows(a, b, out):
    """``out[i, :] = sum_k a[i, k] b[k, :]``, k in order from zero. Four rows at a time, so
    that each row of ``b`` is loaded once for four (every element's sum keeps its order).
    Inlined into its callers below, whose fastmath flags decide whether each multiply-add
    is fused: numba compiles inlined code with the caller's flags."""
    n_rows, n_inner = a.shape
    width = out.shape[1]
    out[:, :] = 0.0
    k_full = n_inner // 4 * 4
    i = 0
    while i + 4 <= n_rows:
        o0, o1, o2, o3 = out[i], out[i + 1], out[i + 2], out[i + 3]
        for k in range(0, k_full, 4):  # four terms per load and store of an output
            b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
            x00, x01, x02, x03 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
            x10, x11, x12, x13 = a[i + 1, k], a[i + 1, k + 1], a[i + 1, k + 2], a[i + 1, k + 3]
            x20, x21, x22, x23 = a[i + 2, k], a[i + 2, k + 1], a[i + 2, k + 2], a[i + 2, k + 3]
            x30, x31, x32, x33 = a[i + 3, k], a[i + 3, k + 1], a[i + 3, k + 2], a[i + 3, k + 3]
            for j in range(width):
                v0, v1, v2, v3 = b0[j], b1[j], b2[j], b3[j]
                o0[j] = o0[j] + x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
                o1[j] = o1[j] + x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
                o2[j] = o2[j] + x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
                o3[j] = o3[j] + x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
        for k in range(k_full, n_inner):
            x0, x1, x2, x3 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k]
            bk = b[k]
            for j in range(width):
                v = bk[j]
                o0[j] += x0 * v
                o1[j] += x1 * v
                o2[j] += x2 * v
                o3[j] += x3 * v
        i += 4
    while i < n_rows:
        o = out[i]
        for k in range(n_inner):
            x = a[i, k]
            bk = b[k]
            for j in range(width):
                o[j] += x * bk[j]
        i += 1


@numba.njit(**JIT_OPTIONS, fastmath={"contract"})
def _product_fma(a, b, out):
    """:func:`_product_rows` with fused multiply-adds."""
    _product_rows(a, b, out)


@numba.njit(**JIT_OPTIONS)
def _product_separate(a, b, out):
    """:func:`_product_rows` with every product rounded before it is added."""
    _product_rows(a, b, out)


@numba.njit(**JIT_OPTIONS, inline="always")
def _tile(j, width):
    """The four 16-lane column blocks from ``j`` (blocks past the last repeat it: they
    compute the same sums again and store them to the same place)."""
    last = width - LANES
    return (min(j, last), min(j + LANES, last), min(j + 2 * LANES, last),
            min(j + 3 * LANES, last))


@numba.njit(**JIT_OPTIONS, inline="always")
def _term(acc, x, y, fused):
    """``acc + x y``: rounded once (fused) or twice."""
    return vfma(x, y, acc) if fused else vadd(acc, vmul(x, y))


@numba.njit(**JIT_OPTIONS, inline="always")
def _terms4(s0, s1, s2, s3, x, y0, y1, y2, y3, fused):
    """Four sums' next terms, the scalar ``x`` times four vectors (:func:`_term` each)."""
    xv = vsplat(x)
    return (_term(s0, xv, y0, fused), _term(s1, xv, y1, fused), _term(s2, xv, y2, fused),
            _term(s3, xv, y3, fused))


@numba.njit(**JIT_OPTIONS, inline="always")
def _product_tiles(a, b, out, fused):
    """:func:`_product_rows` for an ``out`` at least 16 wide whose rows, and b's, are
    contiguous: tiles of four rows by 64 columns whose sums stay in registers over the whole
    of k (in order from zero, as there), instead of a load and a store of each sum every
    four terms. Rows and columns past the last are clamped to it (computed again, stored to
    the same place). (Adding the bias and the activation to the registers before the
    store was measured slower than the separate passes.)"""
    n_rows, n_inner = a.shape
    width = out.shape[1]
    zero = vsplat(0.0)
    for j in range(0, width, 4 * LANES):
        c0, c1, c2, c3 = _tile(j, width)
        for r in range(0, n_rows, 4):
            r1, r2, r3 = min(r + 1, n_rows - 1), min(r + 2, n_rows - 1), min(r + 3, n_rows - 1)
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for k in range(n_inner):
                bk = b[k]
                y0, y1, y2, y3 = vload(bk, c0), vload(bk, c1), vload(bk, c2), vload(bk, c3)
                s00, s01, s02, s03 = _terms4(s00, s01, s02, s03, a[r, k], y0, y1, y2, y3, fused)
                s10, s11, s12, s13 = _terms4(s10, s11, s12, s13, a[r1, k], y0, y1, y2, y3, fused)
                s20, s21, s22, s23 = _terms4(s20, s21, s22, s23, a[r2, k], y0, y1, y2, y3, fused)
                s30, s31, s32, s33 = _terms4(s30, s31, s32, s33, a[r3, k], y0, y1, y2, y3, fused)
            cols = (c0, c1, c2, c3)
            _store_tile(out[r], cols, s00, s01, s02, s03)
            _store_tile(out[r1], cols, s10, s11, s12, s13)
            _store_tile(out[r2], cols, s20, s21, s22, s23)
            _store_tile(out[r3], cols, s30, s31, s32, s33)


@numba.njit(**JIT_OPTIONS, inline="always")
def _store_tile(row, cols, v0, v1, v2, v3):
    c0, c1, c2, c3 = cols
    vstore(row, c0, v0)
    vstore(row, c1, v1)
    vstore(row, c2, v2)
    vstore(row, c3, v3)


@numba.njit(**JIT_OPTIONS)
def _tiles_fma(a, b, out):
    """:func:`_product_tiles` with fused multiply-adds."""
    _product_tiles(a, b, out, True)


@numba.njit(**JIT_OPTIONS)
def _tiles_separate(a, b, out):
    """:func:`_product_tiles` with every product rounded before it is added."""
    _product_tiles(a, b, out, False)


@numba.njit(**JIT_OPTIONS, inline="always")
def _tiled(mode, b, out):
    """Whether :func:`_product_tiles` serves this product."""
    return (mode == FMA or mode == SEPARATE) and out.shape[1] >= LANES and (
        b.strides[1] == b.itemsize and out.strides[1] == out.itemsize)


@numba.njit(**JIT_OPTIONS, inline="always")
def _dot4(x, y, full, n_inner):
    """``(p0 + p2) + (p1 + p3)`` for one output: ``p_m`` the sum over k = m mod 4 (in order)
    of the rounded products ``x[k] y[k]``."""
    p0 = p1 = p2 = p3 = np.float32(0.0)
    for k in range(0, full, 4):
        p0 += x[k] * y[k]
        p1 += x[k + 1] * y[k + 1]
        p2 += x[k + 2] * y[k + 2]
        p3 += x[k + 3] * y[k + 3]
    for k in range(full, n_inner):
        if k % 4 == 0:
            p0 += x[k] * y[k]
        elif k % 4 == 1:
            p1 += x[k] * y[k]
        else:
            p2 += x[k] * y[k]
    return (p0 + p2) + (p1 + p3)


@numba.njit(**JIT_OPTIONS)
def _product_dot4(a, b, out):
    """``out[i, j] = (p0 + p2) + (p1 + p3)``, ``p_m`` the sum over k = m mod 4 (in order) of
    the rounded products ``a[i, k] b[k, j]``. With a multiple of 4 terms and contiguous
    rows of ``a``, four rows' partial sums are one register vector (lane 4r + m: row r's
    ``p_m``) over a contiguous copy of ``b``'s columns; the rows left over, and other
    shapes, one output at a time."""
    n_rows, n_inner = a.shape
    full = n_inner // 4 * 4
    bt = np.ascontiguousarray(b.T)
    i = 0
    if full == n_inner and (n_inner == 1 or a.strides[1] == a.itemsize):
        zero = vsplat(0.0)
        while i + 4 <= n_rows:
            a0, a1, a2, a3 = a[i], a[i + 1], a[i + 2], a[i + 3]
            for j in range(out.shape[1]):
                y = bt[j]
                p = zero
                for k in range(0, n_inner, 4):
                    p = vadd(p, vmul(vload4_rows(a0, a1, a2, a3, k), vload4_tiled(y, k)))
                for r in range(4):
                    out[i + r, j] = ((vlane(p, 4 * r) + vlane(p, 4 * r + 2))
                                     + (vlane(p, 4 * r + 1) + vlane(p, 4 * r + 3)))
            i += 4
    while i < n_rows:
        for j in range(out.shape[1]):
            out[i, j] = _dot4(a[i], bt[j], full, n_inner)
        i += 1


@numba.njit(**JIT_OPTIONS, inline="always")
def _product_columns(a, b, out, fused):
    """:func:`_product_rows` for a narrow ``out`` (fewer than :data:`_NARROW` columns) and an
    ``a`` whose columns are contiguous (a transposed operand: a weight gradient ``h^T g``):
    each output's sum runs over k in the same order, vectorized along a's columns instead of
    along out's narrow rows: 64 of a's rows by two columns of sums in registers over all of
    k (rows and columns past the last clamped to it), where a has at least 16 rows."""
    n_rows, n_inner = a.shape
    width = out.shape[1]
    acc = np.empty((width, n_rows), dtype=np.float32)
    if n_rows < LANES or a.itemsize != 4 or b.itemsize != 4:  # (the vectors are float32)
        acc[:, :] = 0.0
        for k in range(n_inner):
            ak = a[:, k]
            for j in range(width):
                x = b[k, j]
                acc_j = acc[j]
                for i in range(n_rows):
                    acc_j[i] = acc_j[i] + ak[i] * x
    else:
        for i in range(0, n_rows, 4 * LANES):
            c0, c1, c2, c3 = _tile(i, n_rows)
            for j in range(0, width, 2):
                _columns_tile(a, b, acc, c0, c1, c2, c3, j, min(j + 1, width - 1), fused)
    for i in range(n_rows):
        for j in range(width):
            out[i, j] = acc[j, i]


@numba.njit(**JIT_OPTIONS, inline="always")
def _columns_tile(a, b, acc, c0, c1, c2, c3, j0, j1, fused):
    """``acc[j, c : c + 16] = sum_k a[c : c + 16, k] b[k, j]`` (k in order from zero) for the
    column blocks c0 .. c3 and the columns j0, j1, the sums in registers (fused or
    rounded multiply-adds)."""
    zero = vsplat(0.0)
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
    for k in range(a.shape[1]):
        col = a[:, k]
        y0, y1, y2, y3 = vload(col, c0), vload(col, c1), vload(col, c2), vload(col, c3)
        s00, s01, s02, s03 = _terms4(s00, s01, s02, s03, b[k, j0], y0, y1, y2, y3, fused)
        s10, s11, s12, s13 = _terms4(s10, s11, s12, s13, b[k, j1], y0, y1, y2, y3, fused)
    _store_tile(acc[j0], (c0, c1, c2, c3), s00, s01, s02, s03)
    _store_tile(acc[j1], (c0, c1, c2, c3), s10, s11, s12, s13)


@numba.njit(**JIT_OPTIONS, fastmath={"contract"})
def _product_columns_fma(a, b, out):
    """:func:`_product_columns` with fused multiply-adds."""
    _product_columns(a, b, out, True)


@numba.njit(**JIT_OPTIONS)
def _product_columns_separate(a, b, out):
    """:func:`_product_columns` with every product rounded before it is added."""
    _product_columns(a, b, out, False)


#: Outputs narrower than this are summed along the other operand (:func:`_product_columns`).
_NARROW = 8


@numba.njit(**JIT_OPTIONS)
def _k_block(n_inner):
    """The inner-dimension block of MKL's kernels (measured): the whole of up to 192 terms,
    two halves of up to 384, else blocks of 192."""
    if n_inner <= 192:
        return n_inner
    if n_inner <= 384:
        return (n_inner + 1) // 2
    return 192


@numba.njit(**JIT_OPTIONS)
def _product_in_order(a, b, out, mode):
    if _tiled(mode, b, out):
        if mode == FMA:
            _tiles_fma(a, b, out)
        else:
            _tiles_separate(a, b, out)
    elif mode != DOT4 and out.shape[1] < _NARROW and a.strides[0] == a.itemsize:
        if mode == FMA:
            _product_columns_fma(a, b, out)
        else:
            _product_columns_separate(a, b, out)
    elif mode == FMA:
        _product_fma(a, b, out)
    elif mode == SEPARATE:
        _product_separate(a, b, out)
    else:
        _product_dot4(a, b, out)


@numba.njit(**JIT_OPTIONS)
def _add_bias(out, bias):
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += bias[j]


@numba.njit(**JIT_OPTIONS)
def _product(a, b, out, mode, bias):
    """``out = a @ b (+ bias)`` with ``mode``'s sums, the bias (when not empty) added as
    ``baddbmm`` adds it: after the sum, or in the BLOCKED modes (each block of
    :func:`_k_block` inner terms summed from zero, the blocks' sums added in order) after
    the first block."""
    if mode < BLOCKED:
        _product_in_order(a, b, out, mode)
        if bias.size:
            _add_bias(out, bias)
        return
    n_inner = a.shape[1]
    block = _k_block(n_inner)
    _product_in_order(a[:, :block], b[:block], out, mode - BLOCKED)
    if bias.size:
        _add_bias(out, bias)
    if block == n_inner:
        return
    part = np.empty_like(out)
    for k0 in range(block, n_inner, block):
        k1 = min(k0 + block, n_inner)
        _product_in_order(a[:, k0:k1], b[k0:k1], part, mode - BLOCKED)
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                out[i, j] += part[i, j]


@numba.njit(**JIT_OPTIONS, fastmath={"contract"})
def _activate(out, act, bias):
    """``out <- act(out + bias)``: the bias (when not empty) added as :func:`_add_bias` adds
    it, in the same pass; tanh with ``kernels.tanh_``'s arithmetic, relu as torch's
    ``clamp_(min=0)`` (NaN stays NaN). (An add is not contracted with what follows it.)"""
    if act == NONE:
        if bias.size:
            _add_bias(out, bias)
        return
    for i in range(out.shape[0]):
        o = out[i]
        if bias.size:
            for j in range(o.shape[0]):
                o[j] = _activate1(o[j] + bias[j], act)
        else:
            for j in range(o.shape[0]):
                o[j] = _activate1(o[j], act)


@numba.njit(**JIT_OPTIONS, inline="always")
def _activate1(v, act):
    if act == TANH:
        return _tanh1(v)
    return np.float32(0.0) if v < 0.0 else v


@numba.njit(**JIT_OPTIONS)
def _act_backward(g, h, act, db):
    """The gradient ``g`` ``[R, W]`` through the activation whose output is ``h``, in place,
    and its row sums (the bias gradient) into ``db``, as the trainer computes them:
    ``kernels.tanh_backward_`` for tanh, ``threshold_backward`` then torch's sum for relu."""
    if act == TANH:
        kernels.tanh_backward_rows(g, h, db)
        return
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            if not h[i, j] > 0.0:
                g[i, j] = 0.0
    torch_column_sums(g, db)


@numba.njit(**JIT_OPTIONS, inline="always")
def _layer(hidden, layer, width):
    """Hidden layer ``layer``'s activations, ``[R, width]`` contiguous (``hidden``:
    ``[L - 1, R, max width]``, each layer's block at the start of its plane)."""
    rows = hidden.shape[1]
    return view(hidden[layer], (rows, width))


@numba.njit(**JIT_OPTIONS)
def forward_member(x, params, s, modes, act, hidden, row0, out):
    """Member s's pass through an MLP: ``x`` ``[R, D]``; ``params`` the list ``(w0, b0,
    w1, b1, ...)`` of stacked weights ``[S, K, N]`` and biases ``[S, 1, N]``; ``modes[l]``
    layer l's product mode; ``act`` the hidden layers' activation (:data:`ACTIVATIONS`);
    hidden layer l's activations into rows ``row0 : row0 + R`` of :func:`_layer` ``(hidden,
    l)``, the output into ``out`` ``[R, N]``."""
    n_layers = len(params) // 2
    h = x
    for layer in range(n_layers - 1):
        width = params[2 * layer].shape[2]
        dst = _layer(hidden, layer, width)[row0:row0 + x.shape[0]]
        bias = params[2 * layer + 1][s, 0]
        if modes[layer] < BLOCKED:  # the bias added in the activation's pass
            _product(h, params[2 * layer][s], dst, modes[layer], _NO_BIAS)
            _activate(dst, act, bias)
        else:
            _product(h, params[2 * layer][s], dst, modes[layer], bias)
            _activate(dst, act, _NO_BIAS)
        h = dst
    _product(h, params[2 * n_layers - 2][s], out, modes[n_layers - 1],
             params[2 * n_layers - 1][s, 0])


@numba.njit(**JIT_OPTIONS)
def backward_member(g_out, x, hidden, params, s, w_modes, x_modes, act, grads, work):
    """Member s's weight gradients, by the chain rule through an MLP, into ``grads[k][s]``
    (the tuple ``(dw0, db0, ...)`` like ``params``), for every layer but the output layer's
    bias. ``g_out`` ``[R, N]``: the loss's gradient with respect to the output; ``x``
    ``[R', D]`` and ``hidden`` (as :func:`forward_member` fills it, R' rows): the pass's
    inputs and activations (R' >= R; rows past R are ignored). Layer l's weight gradient
    ``h^T g`` is summed over rows in order with ``w_modes[l]``; the gradient passed down,
    ``g w^T``, over outputs in order with ``x_modes[l]``, then through the tanh as
    ``kernels.tanh_backward_`` does (which also gives the bias gradient of the layer below).
    ``work``: :func:`backward_work`'s buffers (reused, rather than allocated per layer).
    """
    n_layers = len(params) // 2
    n_rows = g_out.shape[0]
    g = g_out
    for layer in range(n_layers - 1, -1, -1):
        w = params[2 * layer][s]
        n_in = w.shape[0]
        h = x[:n_rows] if layer == 0 else _layer(hidden, layer - 1, n_in)[:n_rows]
        _product(h.T, g, grads[2 * layer][s], w_modes[layer], _NO_BIAS)
        if layer == 0:
            break
        w_t = view(work[2], (w.shape[1], n_in))
        _transpose_into(w, w_t)
        g_down = view(work[layer % 2], (n_rows, n_in))  # (not the buffer g is in)
        _product(g, w_t, g_down, x_modes[layer], _NO_BIAS)
        _act_backward(g_down, h, act, grads[2 * layer - 1][s, 0])
        g = g_down


def backward_work(params: Sequence[Any], rows: int) -> tuple[np.ndarray, ...]:
    """:func:`backward_member`'s buffers for up to ``rows`` rows of a network with these
    parameters (arrays or tensors): two for the gradients passed down (one layer's, the
    next's) and one for a transposed weight."""
    width = max(max(p.shape[1:]) for p in params[0::2])
    return (np.empty(rows * width, dtype=np.float32), np.empty(rows * width, dtype=np.float32),
            np.empty(width * width, dtype=np.float32))


@numba.njit(**JIT_OPTIONS)
def _transpose_into(w, out):
    """``out[:, :] = w.T`` (``out`` C-contiguous): in 16 x 16 blocks transposed in registers
    where both sides are multiples of 16 and w's rows are contiguous (3.5 times as fast as
    an element at a time on 64 x 64)."""
    n, m = w.shape
    if n % LANES or m % LANES or w.strides[1] != w.itemsize:
        for i in range(n):
            for j in range(m):
                out[j, i] = w[i, j]
        return
    for r0 in range(0, n, LANES):
        for c0 in range(0, m, LANES):
            transpose16(w, out, r0, c0)


@numba.njit(**JIT_OPTIONS)
def mlp_forward(x, params, modes, act, hidden, out):
    """:func:`forward_member` for every member: ``x`` ``[S, R, D]``, ``hidden``
    ``[S, L - 1, R, max width]``, ``out`` ``[S, R, N]``."""
    for s in range(x.shape[0]):
        forward_member(x[s], params, s, modes, act, hidden[s], 0, out[s])


@numba.njit(**JIT_OPTIONS)
def mlp_backward(g_out, x, hidden, params, w_modes, x_modes, act, grads, work):
    """:func:`backward_member` for every member (``g_out`` ``[S, R, N]``, ``x`` and
    ``hidden`` as :func:`mlp_forward` fills them; ``work``: :func:`backward_work`'s)."""
    for s in range(g_out.shape[0]):
        backward_member(g_out[s], x[s], hidden[s], params, s, w_modes, x_modes, act, grads,
                        work)


# torch's sums (ATen's cpu/SumKernel.cpp), reproduced for the AVX2 kernels (vectors of 8):
# a cascade of four accumulator levels that adds level l into level l + 1 every 16^l items.
_LEVELS, _STEP_POWER, _VEC = 4, 4, 8


@numba.njit(**JIT_OPTIONS)
def _add_item(x, start, stride, i, n_cols, lanes, acc):
    """``acc[0, c, :] += x[start + (i * n_cols + c) * stride:][:lanes]`` for every column c."""
    for c in range(n_cols):
        base = start + (i * n_cols + c) * stride
        for lane in range(lanes):
            acc[0, c, lane] += x[base + lane]


@numba.njit(**JIT_OPTIONS)
def _multi_row_sum(x, start, stride, size, n_cols, lanes, acc):
    """``multi_row_sum``: ``acc[0, c, :]`` <- the sum over items i < ``size`` of the
    ``lanes`` floats at ``x[start + (i * n_cols + c) * stride:]``, through the cascade
    (``acc``: ``[4, n_cols, lanes]`` scratch)."""
    acc[:] = 0.0
    step = 1 << _STEP_POWER  # (more levels' worth only past 2^16 items)
    mask = step - 1
    i = 0
    while i + step <= size:
        for _ in range(step):
            _add_item(x, start, stride, i, n_cols, lanes, acc)
            i += 1
        for level in range(1, _LEVELS):
            for c in range(n_cols):
                for lane in range(lanes):
                    acc[level, c, lane] += acc[level - 1, c, lane]
                    acc[level - 1, c, lane] = 0.0
            if i & (mask << (level * _STEP_POWER)) != 0:
                break
    while i < size:
        _add_item(x, start, stride, i, n_cols, lanes, acc)
        i += 1
    for level in range(1, _LEVELS):
        for c in range(n_cols):
            for lane in range(lanes):
                acc[0, c, lane] += acc[level, c, lane]


@numba.njit(**JIT_OPTIONS)
def _row_sum(x, start, stride, size, lanes, out):
    """``row_sum``: the sum of ``size`` items of ``lanes`` floats (item i at ``x[start + i *
    stride:]``) as four interleaved partial sums (:func:`_multi_row_sum` over groups of
    four), the leftover items added to the first, then the four added in order."""
    acc = np.empty((_LEVELS, 4, lanes), dtype=np.float32)
    full = size // 4
    _multi_row_sum(x, start, stride, full, 4, lanes, acc)
    for i in range(full * 4, size):
        for lane in range(lanes):
            acc[0, 0, lane] += x[start + i * stride + lane]
    for c in range(1, 4):
        for lane in range(lanes):
            acc[0, 0, lane] += acc[0, c, lane]
    out[:] = acc[0, 0]


@numba.njit(**JIT_OPTIONS)
def _column_cascade(g, j0, lanes, out):
    """:func:`_multi_row_sum` of columns ``j0 : j0 + lanes`` of ``g`` ``[R, N]`` (one item of
    ``lanes`` floats per row) into ``out``. Each level a vector of its own and a run-time
    number of lanes: the loops over lanes are then vectorized (a constant count gets them
    unrolled into scalar code)."""
    levels = np.zeros((_LEVELS, lanes), dtype=np.float32)
    a0, a1, a2, a3 = levels[0], levels[1], levels[2], levels[3]
    n_rows = g.shape[0]
    step = 1 << _STEP_POWER
    mask = step - 1
    i = 0
    while i + step <= n_rows:
        for _ in range(step):
            row = g[i, j0:j0 + lanes]
            for lane in range(lanes):
                a0[lane] += row[lane]
            i += 1
        for lane in range(lanes):
            a1[lane] += a0[lane]
            a0[lane] = 0.0
        if i & (mask << _STEP_POWER) != 0:
            continue
        for lane in range(lanes):
            a2[lane] += a1[lane]
            a1[lane] = 0.0
        if i & (mask << 2 * _STEP_POWER) != 0:
            continue
        for lane in range(lanes):
            a3[lane] += a2[lane]
            a2[lane] = 0.0
    while i < n_rows:
        row = g[i, j0:j0 + lanes]
        for lane in range(lanes):
            a0[lane] += row[lane]
        i += 1
    for lane in range(lanes):
        out[lane] = ((a0[lane] + a1[lane]) + a2[lane]) + a3[lane]


@numba.njit(**JIT_OPTIONS)
def torch_column_sums(g, out):
    """``out[j] = sum_i g[i, j]`` as torch sums the middle dimension of ``[S, R, N]``
    (``g``: C-contiguous ``[R, N]``): columns in groups of 32 by :func:`_multi_row_sum`
    over the rows (:func:`_column_cascade`), the rest one by one by :func:`_row_sum`."""
    n_rows, n_cols = g.shape
    flat = g.reshape(-1)
    one = np.empty(1, dtype=np.float32)
    j = 0
    while j + 4 * _VEC <= n_cols:
        _column_cascade(g, j, 4 * _VEC, out[j:j + 4 * _VEC])
        j += 4 * _VEC
    while j < n_cols:
        _row_sum(flat, j, n_cols, n_rows, 1, one)
        out[j] = one[0]
        j += 1


@numba.njit(**JIT_OPTIONS)
def torch_row_sum(x):
    """``sum_i x[i]`` as torch sums a contiguous row (``[S, n].sum(dim=1)``): vectors of 8
    by :func:`_row_sum`, then the tail elements in order, then the 8 lanes (fewer than 8
    elements: :func:`_row_sum` of the elements)."""
    n = x.shape[0]
    n_vec = n // _VEC
    lanes = np.zeros(_VEC, dtype=np.float32)
    if n_vec == 0:
        _row_sum(x, 0, 1, n, 1, lanes)
        return lanes[0]
    _row_sum(x, 0, _VEC, n_vec, _VEC, lanes)
    total = np.float32(0.0)
    for i in range(n_vec * _VEC, n):
        total += x[i]
    for lane in range(_VEC):
        total += lanes[lane]
    return total


def arrays(tensors: Iterable[torch.Tensor | np.ndarray]) -> Any:
    """A network's stacked arrays as a numba typed list: one compiled version of the passes
    serves every depth (a tuple's type would name its length). Built in compiled code:
    appending from Python costs about a millisecond an item."""
    return _typed_list(tuple(t.numpy() if isinstance(t, torch.Tensor) else t
                             for t in tensors))


@numba.njit(**JIT_OPTIONS)
def _typed_list(items):
    out = numba.typed.List()
    for item in items:
        out.append(item)
    return out


_ENABLED = [True]


@contextlib.contextmanager
def torch_passes() -> Iterator[None]:
    """Within the block, trainers built take the torch path (no compiled A2C loop, no
    compiled passes): what tests and benchmarks compare the compiled ones with."""
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = True


class CompiledMLP:
    """One stacked MLP's compiled passes, each with its product modes found by comparing
    with torch's own (see the module docstring); a plan per number of rows."""

    def __init__(self, params: Sequence[torch.Tensor], activation: str = "tanh") -> None:
        self.shapes = [tuple(int(n) for n in p.shape[1:]) for p in params]
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self._forward: dict[int, np.ndarray | None] = {}
        self._backward: dict[tuple[int, int], tuple[np.ndarray, np.ndarray] | None] = {}

    @classmethod
    def for_network(cls, params: Sequence[torch.Tensor], activation: str
                    ) -> CompiledMLP | None:
        """The compiled passes of a network they serve (tanh or relu MLPs with a hidden
        layer and inputs wider than 1, float32 on the CPU), else None."""
        p = params[0]
        if (not _ENABLED[0] or activation not in ACTIVATIONS or len(params) < 4
                or p.dtype != torch.float32 or p.device.type != "cpu" or p.shape[1] < 2):
            return None
        return cls(params, activation)

    @property
    def n_layers(self) -> int:
        return len(self.shapes) // 2

    def _random(self, rows: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Random weights and inputs of this network's shapes, for four members: enough
        numbers that a wrong mode cannot match by chance, even for a two-unit head."""
        g = torch.Generator().manual_seed(seed)
        params = [torch.randn(4, *shape, generator=g) * (0.5 if i % 2 == 0 else 0.1)
                  for i, shape in enumerate(self.shapes)]
        return params, torch.randn(4, rows, self.shapes[0][0], generator=g)

    def forward_plan(self, rows: int) -> np.ndarray | None:
        """Product modes of a forward pass over ``rows`` rows per member (None: some layer
        matches no mode; leave that pass to torch)."""
        if rows not in self._forward:
            self._forward[rows] = self._find_forward_modes(rows)
        return self._forward[rows]

    def _find_forward_modes(self, rows: int) -> np.ndarray | None:
        from study.trainer.nets import forward_cached

        params, x = self._random(rows, 0)
        out, inputs = forward_cached(x, params, self.activation)
        expected = [*inputs[1:], out]
        modes = np.full(self.n_layers, FMA, dtype=np.int64)
        for layer in range(self.n_layers):
            for mode in MODES:
                modes[layer] = mode
                got = self.forward(x, params, modes)
                if torch.equal(got[1][layer + 1] if layer + 1 < self.n_layers else got[0],
                               expected[layer]):
                    break
            else:
                return None
        return modes

    def backward_plan(self, rows: int, input_rows: int
                      ) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight-gradient modes, passed-down gradient modes) of a backward pass over
        ``rows`` rows whose cached inputs hold ``input_rows`` rows (None: leave it to torch)."""
        key = (rows, input_rows)
        if key not in self._backward:
            self._backward[key] = self._find_backward_modes(rows, input_rows)
        return self._backward[key]

    def _find_backward_modes(self, rows: int, input_rows: int
                             ) -> tuple[np.ndarray, np.ndarray] | None:
        from study.trainer.nets import backward, forward_cached

        params, x = self._random(input_rows, 1)
        _, inputs = forward_cached(x, params, self.activation)
        g_out = torch.randn(4, rows, self.shapes[-1][-1],
                            generator=torch.Generator().manual_seed(2))
        expected = backward(g_out, inputs, params, self.activation)
        w_modes = np.full(self.n_layers, FMA, dtype=np.int64)
        x_modes = np.full(self.n_layers, FMA, dtype=np.int64)
        # Products in the order they feed each other: dW of the top layer, then the gradient
        # passed down (seen in the bias gradient below it), then that layer's dW, ...
        order = [(w_modes, self.n_layers - 1, 2 * self.n_layers - 2)]
        for layer in range(self.n_layers - 1, 0, -1):
            order += [(x_modes, layer, 2 * layer - 1), (w_modes, layer - 1, 2 * layer - 2)]
        for modes, layer, check in order:
            for mode in MODES:
                modes[layer] = mode
                got = self.backward(g_out, inputs, params, (w_modes, x_modes))
                if torch.equal(got[check], expected[check]):
                    break
            else:
                return None
        return w_modes, x_modes

    # The passes themselves ---------------------------------------------------------------
    @property
    def width(self) -> int:
        """The widest hidden layer (the activation buffers' last dimension)."""
        return max(shape[1] for shape in self.shapes[0:-2:2])

    def forward(self, x: torch.Tensor, params: Sequence[torch.Tensor], modes: np.ndarray
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward_cached``'s ``(output, layer inputs)``, computed with ``modes``."""
        n, rows = x.shape[0], x.shape[1]
        hidden = np.zeros((n, self.n_layers - 1, rows, self.width), dtype=np.float32)
        out = torch.empty(n, rows, params[-1].shape[2])
        mlp_forward(np.ascontiguousarray(x.numpy()), arrays(p.detach() for p in params),
                    modes, self.act, hidden, out.numpy())
        acts = [torch.from_numpy(hidden[:, i].reshape(n, -1)[:, : rows * p.shape[2]]
                                 .reshape(n, rows, p.shape[2]))
                for i, p in enumerate(params[0:-2:2])]
        return out, [x, *acts]

    def backward(self, grad_out: torch.Tensor, inputs: Sequence[torch.Tensor],
                 params: Sequence[torch.Tensor], modes: tuple[np.ndarray, np.ndarray]
                 ) -> list[torch.Tensor]:
        """``nets.backward``'s gradients ``[dw0, db0, ...]``, computed with ``modes``."""
        n, rows = inputs[0].shape[0], inputs[0].shape[1]
        hidden = np.zeros((n, self.n_layers - 1, rows, self.width), dtype=np.float32)
        for i, h in enumerate(inputs[1:]):
            hidden[:, i].reshape(n, -1)[:, : rows * h.shape[2]] = h.numpy().reshape(n, -1)
        grads = [torch.empty(p.shape) for p in params]
        mlp_backward(np.ascontiguousarray(grad_out.numpy()),
                     np.ascontiguousarray(inputs[0].numpy()), hidden,
                     arrays(p.detach() for p in params), modes[0], modes[1], self.act,
                     arrays(grads), backward_work(params, grad_out.shape[1]))
        # The output layer's bias gradient as nets.backward takes it (a width of 1 padded).
        g = grad_out
        if g.shape[-1] == 1:
            g = torch.cat([g, torch.zeros_like(g)], dim=-1)
        grads[-1] = g.sum(dim=1, keepdim=True)[..., : params[-1].shape[2]]
        return grads
