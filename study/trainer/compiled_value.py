"""Full-batch value fitting compiled: ``value_iters`` steps over a large rollout, member by member.

Seed 000's agents fit V for 80 full-batch steps on every 32k-sample rollout (the a2c_blog_*
sweeps): that is most of their training time. The trainer computes each step as
``AcceleratedMLPUpdate.value_gradients`` does for a large batch: row chunks of
:data:`~study.trainer.updates.CHUNK_ROWS`, each a forward and a backward pass over all
members in torch, the chunks' gradients added in order, then the optimizer step.
:class:`CompiledValueFit` runs all of an update's value steps for one member in one compiled
call, and gives the same bits, not merely close ones:

* each product sums its terms in the order torch's kernel does for that shape (the modes of
  study.trainer.compiled, found by asking torch for these row counts), but with the sums of
  a tile held in registers (study.trainer.simd), along whichever axis suits the product:
  the hidden layer is computed twice, along its units for the gradient sums over rows, and
  along the rows for the value head (a dot product per row, whose four partial sums then
  stay in registers);
* torch's own sums: the bias gradient's cascade (compiled.torch_column_sums) kept in
  registers, compiled.torch_row_sum for the loss;
* the optimizer step is the trainer's kernel (kernels.adam_member / rmsprop_member).

It serves value networks with one hidden layer of a multiple of 16 units (tanh or relu;
the blog's 64 ReLU units), A2C with one minibatch where the trainer does not already fuse
the value step into its rollout, on the CPU in float32 (:func:`accepts`); anything else
keeps the torch path. tests/test_compiled.py compares whole training runs with and without
it, bit for bit. On seed 000's SwingUp agent it takes a third of the torch path's time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch

from study.trainer.compiled import (
    _STEP_POWER,
    ACTIVATIONS,
    BLOCKED,
    DOT4,
    FMA,
    SEPARATE,
    CompiledMLP,
    _k_block,
    _product,
    _term,
    _tile,
    arrays,
    torch_column_sums,
    torch_row_sum,
)
from study.trainer.compiled_a2c import _optimizer_step, _rule
from study.trainer.kernels import (
    _A1,
    _A3,
    _A5,
    _A7,
    _A9,
    _A11,
    _A13,
    _B0,
    _B2,
    _B4,
    _B6,
    _CLAMP,
    JIT_OPTIONS,
)
from study.trainer.simd import (
    LANES,
    vadd,
    vdiv,
    vfma,
    vload,
    vmul,
    vsplat,
    vstore,
    vsub,
    vwhere_eq,
    vwhere_gt,
    vwhere_le,
    vwhere_lt,
)
from study.trainer.updates import CHUNK_ROWS, AcceleratedMLPUpdate

if TYPE_CHECKING:
    from study.trainer.population import _Trainer

__all__ = ["CompiledValueFit", "accepts"]

_F = np.float32
_RELU = ACTIVATIONS["relu"]
# A plan's columns: the hidden layer's and the head's forward modes, then the weight
# gradients' (hidden, head).
_HIDDEN, _HEAD, _W_HIDDEN, _W_HEAD = range(4)
_SUMS_IN_ORDER = (FMA, SEPARATE, BLOCKED + FMA, BLOCKED + SEPARATE)


# ------------------------------------------------------------------ vector helpers
@numba.njit(**JIT_OPTIONS, inline="always")
def _vtanh(v):
    """``kernels._tanh1`` in every lane (the same operations, so the same bits)."""
    clamp, one = vsplat(_CLAMP), vsplat(1.0)
    v = vwhere_gt(v, clamp, clamp, v)
    v = vwhere_lt(v, vsplat(-_CLAMP), vsplat(-_CLAMP), v)
    v2 = vmul(v, v)
    p = vfma(v2, vsplat(_A13), vsplat(_A11))
    p = vfma(p, v2, vsplat(_A9))
    p = vfma(p, v2, vsplat(_A7))
    p = vfma(p, v2, vsplat(_A5))
    p = vfma(p, v2, vsplat(_A3))
    p = vfma(p, v2, vsplat(_A1))
    q = vfma(v2, vsplat(_B6), vsplat(_B4))
    q = vfma(q, v2, vsplat(_B2))
    q = vfma(q, v2, vsplat(_B0))
    r = vdiv(vmul(p, v), q)
    r = vwhere_eq(v, clamp, one, r)
    return vwhere_eq(v, vsplat(-_CLAMP), vsplat(-1.0), r)


@numba.njit(**JIT_OPTIONS, inline="always")
def _vactivate(v, act):
    """compiled._activate in every lane: relu as ``clamp_(min=0)``, or tanh."""
    zero = vsplat(0.0)
    return vwhere_lt(v, zero, zero, v) if act == _RELU else _vtanh(v)


# ------------------------------------------------------------------ forward
@numba.njit(**JIT_OPTIONS)
def _hidden_rows(x, w, b, fused, act, h):
    """``h[r, :] = act(sum_k x[r, k] w[k, :] + b)``, k in order from zero, for two rows by 64
    columns at a time (the hidden layer for the gradient sums over rows)."""
    zero = vsplat(0.0)
    n_rows, width = h.shape
    for j in range(0, width, 4 * LANES):
        c0, c1, c2, c3 = _tile(j, width)
        for r in range(0, n_rows, 2):
            r2 = min(r + 1, n_rows - 1)  # (an odd last row is computed twice)
            xr, xq = x[r], x[r2]
            a0 = a1 = a2 = a3 = e0 = e1 = e2 = e3 = zero
            for k in range(x.shape[1]):
                wk = w[k]
                w0, w1, w2, w3 = vload(wk, c0), vload(wk, c1), vload(wk, c2), vload(wk, c3)
                xv, yv = vsplat(xr[k]), vsplat(xq[k])
                a0, a1 = _term(a0, xv, w0, fused), _term(a1, xv, w1, fused)
                a2, a3 = _term(a2, xv, w2, fused), _term(a3, xv, w3, fused)
                e0, e1 = _term(e0, yv, w0, fused), _term(e1, yv, w1, fused)
                e2, e3 = _term(e2, yv, w2, fused), _term(e3, yv, w3, fused)
            _store_hidden(h[r], c0, c1, c2, c3, a0, a1, a2, a3, b, act)
            _store_hidden(h[r2], c0, c1, c2, c3, e0, e1, e2, e3, b, act)


@numba.njit(**JIT_OPTIONS, inline="always")
def _store_hidden(out, c0, c1, c2, c3, a0, a1, a2, a3, b, act):
    """A row's four sums plus the bias, through the activation, into ``out``."""
    vstore(out, c0, _vactivate(vadd(a0, vload(b, c0)), act))
    vstore(out, c1, _vactivate(vadd(a1, vload(b, c1)), act))
    vstore(out, c2, _vactivate(vadd(a2, vload(b, c2)), act))
    vstore(out, c3, _vactivate(vadd(a3, vload(b, c3)), act))


@numba.njit(**JIT_OPTIONS, inline="always")
def _head_terms(p, hv, wv, fused):
    """One hidden unit's term added to a head's sum: rounded once (fused) or twice."""
    return vfma(hv, wv, p) if fused else vadd(p, vmul(hv, wv))


@numba.njit(**JIT_OPTIONS)
def _values_by_rows(xt, w, b, fused, act, w2, b2, head, out):
    """V of the first 16 * (R // 16) rows: four hidden units of 16 rows at a time (vectors
    along the rows of ``xt`` ``[D, R]``), as :func:`_hidden_rows` computes them, then summed
    into the head in registers with the head's mode (DOT4: four partial sums over j mod 4,
    added pairwise at the end; else one sum in order). The hidden width is a multiple of
    16, so of 4."""
    zero = vsplat(0.0)
    head_fused = head == FMA
    for r0 in range(0, xt.shape[1] - xt.shape[1] % LANES, LANES):
        p0 = p1 = p2 = p3 = zero
        for j in range(0, w.shape[1], 4):
            a0 = a1 = a2 = a3 = zero
            for k in range(xt.shape[0]):
                xv, wk = vload(xt[k], r0), w[k]
                a0 = _term(a0, xv, vsplat(wk[j]), fused)
                a1 = _term(a1, xv, vsplat(wk[j + 1]), fused)
                a2, a3 = (_term(a2, xv, vsplat(wk[j + 2]), fused),
                          _term(a3, xv, vsplat(wk[j + 3]), fused))
            h0 = _vactivate(vadd(a0, vsplat(b[j])), act)
            h1 = _vactivate(vadd(a1, vsplat(b[j + 1])), act)
            h2 = _vactivate(vadd(a2, vsplat(b[j + 2])), act)
            h3 = _vactivate(vadd(a3, vsplat(b[j + 3])), act)
            w0, w1, w2_, w3 = vsplat(w2[j]), vsplat(w2[j + 1]), vsplat(w2[j + 2]), vsplat(w2[j + 3])
            if head == DOT4:
                p0, p1 = vadd(p0, vmul(h0, w0)), vadd(p1, vmul(h1, w1))
                p2, p3 = vadd(p2, vmul(h2, w2_)), vadd(p3, vmul(h3, w3))
            else:
                p0 = _head_terms(p0, h0, w0, head_fused)
                p0 = _head_terms(p0, h1, w1, head_fused)
                p0 = _head_terms(p0, h2, w2_, head_fused)
                p0 = _head_terms(p0, h3, w3, head_fused)
        v = vadd(vadd(p0, p2), vadd(p1, p3)) if head == DOT4 else p0
        vstore(out, r0, vadd(v, vsplat(b2)))


# ------------------------------------------------------------------ backward
@numba.njit(**JIT_OPTIONS)
def _head_gradient(h, g, mode, out):
    """``out = h^T g`` for a one-wide ``g`` ``[R]``: per column a sum over rows with
    compiled's ``mode`` (in order from zero, or in blocks of :func:`_k_block` rows, the
    blocks' sums added in order); 64 columns at a time."""
    n_rows, width = h.shape
    fused = mode % BLOCKED == FMA
    step = _k_block(n_rows) if mode >= BLOCKED else n_rows
    zero = vsplat(0.0)
    for j in range(0, width, 4 * LANES):
        c0, c1, c2, c3 = _tile(j, width)
        t0 = t1 = t2 = t3 = zero
        for r0 in range(0, n_rows, step):
            a0 = a1 = a2 = a3 = zero
            for r in range(r0, min(r0 + step, n_rows)):
                hr, gv = h[r], vsplat(g[r])
                a0 = _term(a0, vload(hr, c0), gv, fused)
                a1 = _term(a1, vload(hr, c1), gv, fused)
                a2 = _term(a2, vload(hr, c2), gv, fused)
                a3 = _term(a3, vload(hr, c3), gv, fused)
            if r0 == 0:
                t0, t1, t2, t3 = a0, a1, a2, a3
            else:
                t0, t1, t2, t3 = vadd(t0, a0), vadd(t1, a1), vadd(t2, a2), vadd(t3, a3)
        vstore(out, c0, t0)
        vstore(out, c1, t1)
        vstore(out, c2, t2)
        vstore(out, c3, t3)


@numba.njit(**JIT_OPTIONS)
def _passed_down(g, w2, h, act, dh, db):
    """The gradient at the hidden layer's input: ``0 + g[r] w2`` (a product with one term),
    through the activation as the trainer does, and ``db`` its sum over rows: tanh as
    ``kernels.tanh_backward_rows`` (rows in order); relu as ``threshold_backward`` then
    torch's sum (compiled.torch_column_sums: its cascade kept in registers for each 32
    columns, the rest after)."""
    zero, one = vsplat(0.0), vsplat(1.0)
    n_rows, width = dh.shape
    cascade = act == _RELU and width % (2 * LANES) == 0
    step = 1 << _STEP_POWER
    mask = step - 1
    for j in range(0, width, 4 * LANES):
        c0, c1, c2, c3 = _tile(j, width)
        w0, w1, w2_, w3 = vload(w2, c0), vload(w2, c1), vload(w2, c2), vload(w2, c3)
        s0 = s1 = s2 = s3 = zero  # the sums (tanh), or the cascade's first level (relu)
        l10 = l11 = l12 = l13 = l20 = l21 = l22 = l23 = l30 = l31 = l32 = l33 = zero
        for r in range(n_rows):
            gv, hr, out = vsplat(g[r]), h[r], dh[r]
            d0, d1 = vadd(zero, vmul(gv, w0)), vadd(zero, vmul(gv, w1))
            d2, d3 = vadd(zero, vmul(gv, w2_)), vadd(zero, vmul(gv, w3))
            y0, y1, y2, y3 = vload(hr, c0), vload(hr, c1), vload(hr, c2), vload(hr, c3)
            if act == _RELU:
                d0, d1 = vwhere_le(y0, zero, zero, d0), vwhere_le(y1, zero, zero, d1)
                d2, d3 = vwhere_le(y2, zero, zero, d2), vwhere_le(y3, zero, zero, d3)
            else:
                d0 = vmul(d0, vsub(one, vmul(y0, y0)))
                d1 = vmul(d1, vsub(one, vmul(y1, y1)))
                d2 = vmul(d2, vsub(one, vmul(y2, y2)))
                d3 = vmul(d3, vsub(one, vmul(y3, y3)))
            vstore(out, c0, d0)
            vstore(out, c1, d1)
            vstore(out, c2, d2)
            vstore(out, c3, d3)
            s0, s1, s2, s3 = vadd(s0, d0), vadd(s1, d1), vadd(s2, d2), vadd(s3, d3)
            i = r + 1
            if not cascade or i & mask != 0:
                continue
            l10, l11, l12, l13 = vadd(l10, s0), vadd(l11, s1), vadd(l12, s2), vadd(l13, s3)
            s0 = s1 = s2 = s3 = zero
            if i & (mask << _STEP_POWER) != 0:
                continue
            l20, l21, l22, l23 = vadd(l20, l10), vadd(l21, l11), vadd(l22, l12), vadd(l23, l13)
            l10 = l11 = l12 = l13 = zero
            if i & (mask << 2 * _STEP_POWER) != 0:
                continue
            l30, l31, l32, l33 = vadd(l30, l20), vadd(l31, l21), vadd(l32, l22), vadd(l33, l23)
            l20 = l21 = l22 = l23 = zero
        if cascade:
            s0 = vadd(vadd(vadd(s0, l10), l20), l30)
            s1 = vadd(vadd(vadd(s1, l11), l21), l31)
            s2 = vadd(vadd(vadd(s2, l12), l22), l32)
            s3 = vadd(vadd(vadd(s3, l13), l23), l33)
        vstore(db, c0, s0)
        vstore(db, c1, s1)
        vstore(db, c2, s2)
        vstore(db, c3, s3)
    if act == _RELU and not cascade:
        torch_column_sums(dh, db)


@numba.njit(**JIT_OPTIONS)
def _weight_gradient(x, g, mode, out):
    """``out = x^T g`` (``x`` ``[R, D]``, ``g`` ``[R, H]``): each element a sum over rows
    with compiled's ``mode`` (see :func:`_head_gradient`); two rows of ``out`` by 64
    columns at a time."""
    n_rows, n_in = x.shape
    width = g.shape[1]
    fused = mode % BLOCKED == FMA
    step = _k_block(n_rows) if mode >= BLOCKED else n_rows
    zero = vsplat(0.0)
    for i in range(0, n_in, 2):
        i2 = min(i + 1, n_in - 1)
        for j in range(0, width, 4 * LANES):
            c0, c1, c2, c3 = _tile(j, width)
            t0 = t1 = t2 = t3 = u0 = u1 = u2 = u3 = zero
            for r0 in range(0, n_rows, step):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
                for r in range(r0, min(r0 + step, n_rows)):
                    gr = g[r]
                    xv, yv = vsplat(x[r, i]), vsplat(x[r, i2])
                    g0, g1, g2, g3 = vload(gr, c0), vload(gr, c1), vload(gr, c2), vload(gr, c3)
                    a0, a1 = _term(a0, xv, g0, fused), _term(a1, xv, g1, fused)
                    a2, a3 = _term(a2, xv, g2, fused), _term(a3, xv, g3, fused)
                    b0, b1 = _term(b0, yv, g0, fused), _term(b1, yv, g1, fused)
                    b2, b3 = _term(b2, yv, g2, fused), _term(b3, yv, g3, fused)
                if r0 == 0:
                    t0, t1, t2, t3, u0, u1, u2, u3 = a0, a1, a2, a3, b0, b1, b2, b3
                else:
                    t0, t1, t2, t3 = vadd(t0, a0), vadd(t1, a1), vadd(t2, a2), vadd(t3, a3)
                    u0, u1, u2, u3 = vadd(u0, b0), vadd(u1, b1), vadd(u2, b2), vadd(u3, b3)
            o, q = out[i], out[i2]
            vstore(o, c0, t0)
            vstore(o, c1, t1)
            vstore(o, c2, t2)
            vstore(o, c3, t3)
            vstore(q, c0, u0)
            vstore(q, c1, u1)
            vstore(q, c2, u2)
            vstore(q, c3, u3)


# ------------------------------------------------------------------ one chunk, one member
@numba.njit(**JIT_OPTIONS)
def _chunk_gradients(x, xt, ret, n_total, coef, v, k, act, plan, bufs, grads):
    """Member k's value loss over these rows (``x`` ``[R, D]``, ``xt`` its transpose,
    ``ret`` ``[R]``), as ``c_v`` times the sum of ``(V - R)^2`` divided by ``n_total``; its
    gradients into ``grads`` (dW1 ``[D, H]``, db1 ``[H]``, dw2 ``[H]``, db2 ``[1]``) as
    ``ActorCritic.value_grads`` and ``nets.backward`` compute them. Returns the loss term
    ``v`` (before ``c_v``)."""
    h_all, dh_all, pad_all, vec_all = bufs
    n = x.shape[0]
    h, dh, pad = h_all[:n], dh_all[:n], pad_all[:n]
    values, squares, g = vec_all[0, :n], vec_all[1, :n], vec_all[2, :n]
    w1, b1, b2 = v[0][k], v[1][k, 0], v[3][k, 0, 0]
    w2 = np.ascontiguousarray(v[2][k, :, 0])
    d_w1, d_b1, d_w2, d_b2 = grads
    fused = plan[_HIDDEN] == FMA
    _hidden_rows(x, w1, b1, fused, act, h)
    _values_by_rows(xt, w1, b1, fused, act, w2, b2, plan[_HEAD], values)
    done = n - n % LANES
    if done < n:  # the rows left over: compiled's own product of the head
        tail = np.empty((n - done, 1), dtype=np.float32)
        _product(h[done:], v[2][k], tail, plan[_HEAD], v[3][k, 0])
        values[done:] = tail[:, 0]
    for r in range(n):
        e = values[r] - ret[r]
        squares[r] = e * e
        g[r] = coef * e  # the loss's gradient with respect to V
        pad[r, 0] = g[r]  # (the trainer pads a width of 1 to 2)
    v_term = torch_row_sum(squares) / _F(n_total)
    sums = np.empty(2, dtype=np.float32)
    torch_column_sums(pad, sums)
    d_b2[0] = sums[0]
    _head_gradient(h, g, plan[_W_HEAD], d_w2)
    _passed_down(g, w2, h, act, dh, d_b1)
    _weight_gradient(x, dh, plan[_W_HIDDEN], d_w1)
    return v_term


@numba.njit(**JIT_OPTIONS)
def fit_member(k, x, ret, v, act, plans, n_steps, coef, value_coef, lr, max_norm, optimizer,
               bufs, chunk_grads, grads):
    """``n_steps`` full-batch value steps of learner k on ``x`` ``[N, D]`` and ``ret``
    ``[N]``: gradients over chunks of CHUNK_ROWS rows added in order, then the clipped
    optimizer step. Returns (the last step's value loss, every step finite)."""
    kind, rule, state, t = optimizer
    n_rows = x.shape[0]
    xt = np.ascontiguousarray(x.T)
    step_grads = (np.empty_like(chunk_grads[0]), np.empty_like(chunk_grads[1]),
                  np.empty_like(chunk_grads[2]), np.empty_like(chunk_grads[3]))
    d_w1, d_b1, d_w2, d_b2 = step_grads
    v_total = _F(0.0)
    all_ok = True
    for _ in range(n_steps):
        v_total = _F(0.0)
        loss_total = _F(0.0)
        for a in range(0, n_rows, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, n_rows)
            plan = plans[0] if b - a == CHUNK_ROWS else plans[1]
            first = a == 0
            target = step_grads if first else chunk_grads
            v_term = _chunk_gradients(x[a:b], xt[:, a:b], ret[a:b], n_rows, coef, v, k, act,
                                      plan, bufs, target)
            if not first:
                d_w1 += chunk_grads[0]
                d_b1 += chunk_grads[1]
                d_w2 += chunk_grads[2]
                d_b2 += chunk_grads[3]
            v_total = v_term if first else v_total + v_term
            loss = value_coef * v_term
            loss_total = loss if first else loss_total + loss
        grads[0][k] = d_w1
        grads[1][k, 0] = d_b1
        grads[2][k, :, 0] = d_w2
        grads[3][k, 0] = d_b2
        t[k] += 1
        _, ok = _optimizer_step(kind, v, grads, state, k, t[k], lr, max_norm,
                                np.isfinite(loss_total), rule)
        all_ok &= ok
    return v_total, all_ok


@numba.njit(**JIT_OPTIONS)
def fit_values(obs, returns, v, act, plans, n_steps, coefs, value_coefs, lrs, max_norms,
               optimizer, bufs, chunk_grads, grads, v_loss, ok):
    """:func:`fit_member` for every learner (``obs`` ``[S, N, D]``, ``returns`` ``[S, N]``)."""
    for k in range(obs.shape[0]):
        v_loss[k], ok[k] = fit_member(k, obs[k], returns[k], v, act, plans, n_steps, coefs[k],
                                      value_coefs[k], lrs[k], max_norms[k], optimizer, bufs,
                                      chunk_grads, grads)


# ------------------------------------------------------------------ the trainer's side
def accepts(trainer: _Trainer) -> bool:
    """Whether :class:`CompiledValueFit` reproduces this trainer's value steps (see the
    module docstring); the plans it needs are checked when it is built."""
    hp, agent, updater = trainer.hp, trainer.agent, trainer.updater
    return (isinstance(updater, AcceleratedMLPUpdate) and not updater.fused_value
            and hp.algorithm == "a2c" and hp.n_minibatches == 1 and not agent.share_trunk
            and agent.accelerated and len(agent.v) == 4 and agent.v[0].shape[2] % LANES == 0
            and trainer.dev.type == "cpu"
            and hp.value_optimizer in ("rmsprop", "adam")
            and CompiledMLP.for_network(agent.v, agent.activation) is not None)


def _plan(net: CompiledMLP, rows: int) -> np.ndarray | None:
    """The modes of a chunk of ``rows`` rows, or None where this module does not compute
    them (or torch's sums over that many rows are not the ones it reproduces)."""
    forward, backward = net.forward_plan(rows), net.backward_plan(rows, rows)
    if forward is None or backward is None or not _sums_match(rows, net.shapes[0][1]):
        return None
    w_modes = backward[0]
    if (forward[0] not in (FMA, SEPARATE) or forward[1] not in (FMA, SEPARATE, DOT4)
            or w_modes[0] not in _SUMS_IN_ORDER or w_modes[1] not in _SUMS_IN_ORDER):
        return None
    return np.array([forward[0], forward[1], w_modes[0], w_modes[1]], dtype=np.int64)


def _sums_match(rows: int, width: int) -> bool:
    """Whether torch's column sums (the padded head's and the hidden layer's) and row sums
    over ``rows`` rows are the ones compiled reproduces."""
    g = torch.Generator().manual_seed(4)
    for cols in (2, width):
        x = torch.randn(2, rows, cols, generator=g)
        out = np.empty(cols, dtype=np.float32)
        for s in range(2):
            torch_column_sums(np.ascontiguousarray(x[s].numpy()), out)
            if not np.array_equal(out, x.sum(dim=1)[s].numpy()):
                return False
    y = torch.randn(2, rows, generator=g)
    return all(torch_row_sum(y[s].numpy()) == y.sum(dim=1)[s].item() for s in range(2))


class CompiledValueFit:
    """The compiled value steps of one trainer (:func:`accepts` it first); :meth:`build`
    returns None where a chunk has no plan this module computes."""

    def __init__(self, trainer: _Trainer, plans: np.ndarray) -> None:
        self.trainer = trainer
        self.plans = plans

    @classmethod
    def build(cls, trainer: _Trainer) -> CompiledValueFit | None:
        net = CompiledMLP.for_network(trainer.agent.v, trainer.agent.activation)
        assert net is not None  # accepts() checked it
        n = trainer.n_batch
        sizes = [min(n, CHUNK_ROWS), n % CHUNK_ROWS or min(n, CHUNK_ROWS)]
        plans = [_plan(net, rows) for rows in sizes]
        if any(p is None for p in plans):
            return None
        return cls(trainer, np.stack([p for p in plans if p is not None]))

    def run(self, obs: torch.Tensor, returns: torch.Tensor, value_coef: torch.Tensor,
            lr: torch.Tensor, max_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``value_iters`` value steps of every learner on its rollout (``obs``
        ``[S', N, D]``, ``returns`` ``[S', N]``): (the last step's value loss, whether every
        step stayed finite), per learner. Weights and optimizer state change in place."""
        tr = self.trainer
        v = arrays(p.detach() for p in tr.agent.v)
        opt = tr.v_opt
        kind, rule = _rule(opt.kind)
        state = [arrays(st[i] for st in opt.state) for i in range(len(opt.state[0]))]
        optimizer = (kind, rule, (state[0], state[-1]), opt.t)
        n_learners, n = returns.shape
        c = value_coef.numpy().astype(np.float32)
        coefs = np.float32(2.0 / n) * c  # as value_grads: (2 / n) * c_v, then times the error
        v_loss = np.empty(n_learners, dtype=np.float32)
        ok = np.empty(n_learners, dtype=np.bool_)
        fit_values(np.ascontiguousarray(obs.numpy()), np.ascontiguousarray(returns.numpy()),
                   v, ACTIVATIONS[tr.agent.activation], self.plans, tr.hp.value_iters, coefs,
                   c, lr.numpy().astype(np.float32), max_norm.numpy().astype(np.float32),
                   optimizer, _buffers(tr.agent.v, min(n, CHUNK_ROWS)),
                   _chunk_grads(tr.agent.v), arrays(torch.empty_like(p).numpy()
                                                    for p in tr.agent.v), v_loss, ok)
        return torch.from_numpy(v_loss), torch.from_numpy(ok)


def _buffers(v: Sequence[torch.Tensor], rows: int) -> tuple[Any, ...]:
    """One member's chunk buffers (reused chunk after chunk, member after member): the
    hidden activations, their gradient, the head's padded gradient, and V, the squared
    errors and the head's gradient."""
    width = v[0].shape[2]
    return (np.empty((rows, width), dtype=np.float32), np.empty((rows, width), dtype=np.float32),
            np.zeros((rows, 2), dtype=np.float32), np.empty((3, rows), dtype=np.float32))


def _chunk_grads(v: Sequence[torch.Tensor]) -> tuple[np.ndarray, ...]:
    """A chunk's gradients (dW1, db1, dw2, db2) before they are added to the step's."""
    n_in, width = v[0].shape[1], v[0].shape[2]
    return (np.empty((n_in, width), dtype=np.float32), np.empty(width, dtype=np.float32),
            np.empty(width, dtype=np.float32), np.empty(1, dtype=np.float32))
