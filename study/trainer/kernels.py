"""Fused CPU loops, compiled by numba, for the elementwise work of a population update.

A population's small tensors make PyTorch pay one pass over memory, and one dispatch, per
operation: tanh as ``2 sigmoid(2x) - 1`` is four passes, and a clipped RMSprop step is about
ten per parameter. Each function here does its job in one pass.

Bit-identity: the loops treat one member at a time, in the same order, with IEEE
arithmetic only (no reassociation), so a member's numbers never depend on the rest of the
population. tanh is elementwise and fuses its multiply-adds, which gives the same bits in
vectorized and scalar code. Reductions over a member's elements use a fixed block of
``_LANES`` partial sums, which vectorizes without reordering anything between runs.
Compiled code is cached next to this file (``cache=True``), so only the first process
after an install pays the compile time (a few seconds).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from study.trainer.simd import vadd, vdiv, vlane, vload, vmul, vsplat, vsqrt, vstore, vsub
from study.trainer.views import flat

JIT_OPTIONS: dict[str, Any] = {"cache": True, "nogil": True, "error_model": "numpy"}
_JIT = JIT_OPTIONS
_F = np.float32
_LANES = 16

# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 7.905 (tanh rounds to +-1 in float32 beyond), the
# rational approximation of Eigen's fast float tanh: within 4e-7 of the true tanh.
_CLAMP = _F(7.90531110763549805)
_A1, _A3, _A5, _A7 = map(
    _F, (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
)
_A9, _A11, _A13 = map(_F, (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_B0, _B2, _B4, _B6 = map(
    _F, (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
)
# The same coefficients, highest power first (for study.trainer.nets' torch version).
TANH_CLAMP = float(_CLAMP)
TANH_P = tuple(float(c) for c in (_A13, _A11, _A9, _A7, _A5, _A3, _A1))
TANH_Q = tuple(float(c) for c in (_B6, _B4, _B2, _B0))


@numba.njit(**_JIT, fastmath={"contract"}, inline="always")
def _tanh1(v):
    v = _CLAMP if v > _CLAMP else v  # NaN stays NaN
    v = -_CLAMP if v < -_CLAMP else v
    v2 = v * v
    p = v2 * _A13 + _A11
    p = p * v2 + _A9
    p = p * v2 + _A7
    p = p * v2 + _A5
    p = p * v2 + _A3
    p = p * v2 + _A1
    q = v2 * _B6 + _B4
    q = q * v2 + _B2
    q = q * v2 + _B0
    r = (p * v) / q
    r = _F(1.0) if v == _CLAMP else r  # saturate exactly, as tanh does in float32
    return _F(-1.0) if v == -_CLAMP else r


@numba.njit(**_JIT, fastmath={"contract"})
def tanh_(a: np.ndarray) -> None:
    """``a <- tanh(a)`` in place (float32, C-contiguous).

    Multiply-adds are fused (FMA: one rounding each), which makes the polynomials faster
    and more accurate. A fused multiply-add gives the same bits in the vectorized loop and
    in its scalar remainder, so an element's result does not depend on where in the array
    (or in the population) it sits; tests/test_nets.py checks widths that leave remainders.
    """
    x = a.reshape(-1)
    for i in range(x.size):
        x[i] = _tanh1(x[i])


@numba.njit(**_JIT, fastmath={"contract"})
def tanh_into_(src: np.ndarray, dst: np.ndarray, t: int) -> None:
    """``dst[s, t] <- tanh(src[s])`` for every member s: ``src`` ``[S, E, F]``, ``dst``
    ``[S, T, E, F]`` (both C-contiguous), with :func:`tanh_`'s arithmetic."""
    for s in range(src.shape[0]):
        x = src[s].reshape(-1)
        y = dst[s, t].reshape(-1)
        for i in range(x.size):
            y[i] = _tanh1(x[i])


@numba.njit(**_JIT)
def tanh_backward_(g: np.ndarray, y: np.ndarray, bias_grad: np.ndarray) -> None:
    """Through ``y = tanh(x)``, ``[S, B, F]``: ``g <- g * (1 - y^2)`` in place (the gradient
    with respect to x) and ``bias_grad[s, 0, :] <- sum_b g[s, b, :]`` (rows in order).
    ``y`` may have more rows than ``g`` (the extra ones are ignored); it should be
    C-contiguous, as a strided row does not vectorize (5x slower)."""
    for s in range(g.shape[0]):
        tanh_backward_rows(g[s], y[s], bias_grad[s, 0])


@numba.njit(**_JIT)
def tanh_backward_rows(g: np.ndarray, y: np.ndarray, db: np.ndarray) -> None:
    """:func:`tanh_backward_` of one member: ``g`` ``[B, F]``, ``y`` ``[B', F]``, ``db`` ``[F]``.
    With contiguous rows, the sums of 64 (then 16) columns stay in registers over all rows
    (the same terms in the same order as one column at a time)."""
    j = 0
    if (g.itemsize == 4 and y.itemsize == 4 and db.itemsize == 4  # float32 (the vectors')
            and g.strides[1] == 4 and y.strides[1] == 4 and db.strides[0] == 4):
        while j + 4 * _LANES <= g.shape[1]:
            _tanh_backward_block(g, y, db, j)
            j += 4 * _LANES
        while j + _LANES <= g.shape[1]:
            d = vsplat(0.0)
            for b in range(g.shape[0]):
                d = vadd(d, _tanh_backward_vector(g[b], y[b], j))
            vstore(db, j, d)
            j += _LANES
    for c in range(j, g.shape[1]):
        d = _F(0.0)
        for b in range(g.shape[0]):
            v = g[b, c] * (_F(1.0) - y[b, c] * y[b, c])
            g[b, c] = v
            d += v
        db[c] = d


@numba.njit(**_JIT, inline="always")
def _tanh_backward_vector(gr, yr, j):
    """``gr[j:j + 16] *= 1 - yr[j:j + 16]^2`` (each operation rounded); returns the new
    values."""
    yv = vload(yr, j)
    v = vmul(vload(gr, j), vsub(vsplat(1.0), vmul(yv, yv)))
    vstore(gr, j, v)
    return v


@numba.njit(**_JIT)
def _tanh_backward_block(g, y, db, j):
    """:func:`tanh_backward_rows` of columns ``j : j + 64``."""
    d0 = d1 = d2 = d3 = vsplat(0.0)
    for b in range(g.shape[0]):
        gr, yr = g[b], y[b]
        d0 = vadd(d0, _tanh_backward_vector(gr, yr, j))
        d1 = vadd(d1, _tanh_backward_vector(gr, yr, j + _LANES))
        d2 = vadd(d2, _tanh_backward_vector(gr, yr, j + 2 * _LANES))
        d3 = vadd(d3, _tanh_backward_vector(gr, yr, j + 3 * _LANES))
    vstore(db, j, d0)
    vstore(db, j + _LANES, d1)
    vstore(db, j + 2 * _LANES, d2)
    vstore(db, j + 3 * _LANES, d3)


@numba.njit(**_JIT)
def _sum_squares(x: np.ndarray) -> np.float32:
    """``sum_j x_j^2`` of a 1-D array, in ``_LANES`` fixed partial sums (a register vector;
    the tail into the first), then the partial sums in order."""
    n_full = x.size - x.size % _LANES
    acc = vsplat(0.0)
    for j in range(0, n_full, _LANES):
        v = vload(x, j)
        acc = vadd(acc, vmul(v, v))
    first = vlane(acc, 0)
    for j in range(n_full, x.size):
        first += x[j] * x[j]
    total = _F(0.0) + first
    for k in range(1, _LANES):
        total += vlane(acc, k)
    return total


@numba.njit(**_JIT, inline="always")
def _any_non_finite(check) -> bool:
    """Whether a lane of ``check`` (a sum of ``p - p`` terms: 0, or NaN once a term was
    infinite or NaN) is not 0."""
    for k in range(_LANES):
        if vlane(check, k) != _F(0.0):
            return True
    return False


@numba.njit(**_JIT)
def _clip_coefficient(grads, s: int, max_norm: float) -> tuple[float, float]:
    """(grad norm, clip coefficient) of member s: ``min(1, max_norm / (norm + 1e-6))``."""
    sq = _F(0.0)
    for k in range(len(grads)):
        sq += _sum_squares(flat(grads[k][s]))
    norm = np.sqrt(sq)
    return norm, min(_F(1.0), _F(max_norm) / (norm + _F(1e-6)))


@numba.njit(**_JIT)
def rmsprop_step(params, grads, sq_avgs, lr, max_norm, loss_ok, alpha, eps):
    """Clip each member's gradient to ``max_norm`` and take one RMSprop step, in place.

    Per member, with c the clip coefficient of :func:`_clip_coefficient`:
        g = c * grad,   v <- alpha v + (1 - alpha) g^2,   p <- p - lr g / (sqrt(v) + eps)
    (``torch.optim.RMSprop`` without momentum or centering). A member whose loss
    (``loss_ok``) or gradient norm is not finite takes no step. Returns the pre-clip
    gradient norms and whether each member stepped to finite parameters.
    """
    n_members = lr.shape[0]
    norms = np.zeros(n_members, dtype=np.float32)
    ok = np.zeros(n_members, dtype=np.bool_)
    for s in range(n_members):
        norms[s], ok[s] = rmsprop_member(params, grads, sq_avgs, s, lr[s], max_norm[s],
                                         loss_ok[s], alpha, eps)
    return norms, ok


@numba.njit(**_JIT)
def rmsprop_member(params, grads, sq_avgs, s, lr, max_norm, loss_ok, alpha, eps):
    """:func:`rmsprop_step` of member s: ``(pre-clip norm, stepped to finite parameters)``."""
    return rmsprop_member_from(params, grads, s, sq_avgs, s, lr, max_norm, loss_ok, alpha, eps)


@numba.njit(**_JIT)
def rmsprop_member_from(params, grads, gs, sq_avgs, s, lr, max_norm, loss_ok, alpha, eps):
    """:func:`rmsprop_member` with member s's gradient at index ``gs`` of ``grads`` (a
    caller that steps each member as soon as its gradient is computed keeps one member's
    gradient, in cache, rather than every member's)."""
    a = _F(alpha)
    one_minus_a = _F(1.0) - a
    e = _F(eps)
    norm, coef = _clip_coefficient(grads, gs, max_norm)
    if not (loss_ok and np.isfinite(norm)):
        return norm, False
    bad = 0
    a_v, b_v, e_v, lr_v, c_v = vsplat(a), vsplat(one_minus_a), vsplat(e), vsplat(lr), vsplat(coef)
    for k in range(len(params)):
        p = flat(params[k][s])
        g = flat(grads[k][gs])
        v = flat(sq_avgs[k][s])
        n_full = p.size - p.size % _LANES
        check = vsplat(0.0)
        for j in range(0, n_full, _LANES):  # 16 elements at a time, each as below
            gj = vmul(vload(g, j), c_v)
            vj = vadd(vmul(a_v, vload(v, j)), vmul(b_v, vmul(gj, gj)))
            vstore(v, j, vj)
            pj = vsub(vload(p, j), vdiv(vmul(lr_v, gj), vadd(vsqrt(vj), e_v)))
            vstore(p, j, pj)
            check = vadd(check, vsub(pj, pj))
        bad |= np.int32(_any_non_finite(check))
        for j in range(n_full, p.size):
            gj = g[j] * coef
            vj = a * v[j] + one_minus_a * (gj * gj)
            v[j] = vj
            pj = p[j] - lr * gj / (np.sqrt(vj) + e)
            p[j] = pj
            bad |= np.int32(pj - pj != _F(0.0))  # NaN for inf and NaN alike
    return norm, bad == 0


@numba.njit(**_JIT)
def adam_step(params, grads, exp_avgs, exp_avg_sqs, t, lr, max_norm, loss_ok, beta1, beta2, eps):
    """Clip each member's gradient to ``max_norm`` and take one Adam step, in place.

    Per member, with c the clip coefficient and step count t:
        g = c * grad,  m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
        p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    (``torch.optim.Adam``); ``t[s]`` is member s's own step count. Non-finite members take
    no step, as in :func:`rmsprop_step`.
    """
    n_members = lr.shape[0]
    norms = np.zeros(n_members, dtype=np.float32)
    ok = np.zeros(n_members, dtype=np.bool_)
    for s in range(n_members):
        norms[s], ok[s] = adam_member(params, grads, exp_avgs, exp_avg_sqs, s, t[s], lr[s],
                                      max_norm[s], loss_ok[s], beta1, beta2, eps)
    return norms, ok


@numba.njit(**_JIT)
def adam_member(params, grads, exp_avgs, exp_avg_sqs, s, t, lr, max_norm, loss_ok, beta1,
                beta2, eps):
    """:func:`adam_step` of member s (its step count ``t``)."""
    b1, b2, e = _F(beta1), _F(beta2), _F(eps)
    norm, coef = _clip_coefficient(grads, s, max_norm)
    if not (loss_ok and np.isfinite(norm)):
        return norm, False
    bc1 = _F(1.0 - beta1 ** t)
    bc2_sqrt = _F(np.sqrt(1.0 - beta2 ** t))
    step = lr / bc1
    bad = 0
    b1_v, b2_v, e_v, step_v, c_v = vsplat(b1), vsplat(b2), vsplat(e), vsplat(step), vsplat(coef)
    nb1_v, nb2_v, bc2_v = vsplat(_F(1.0) - b1), vsplat(_F(1.0) - b2), vsplat(bc2_sqrt)
    for k in range(len(params)):
        p = flat(params[k][s])
        g = flat(grads[k][s])
        m = flat(exp_avgs[k][s])
        v = flat(exp_avg_sqs[k][s])
        n_full = p.size - p.size % _LANES
        check = vsplat(0.0)
        for j in range(0, n_full, _LANES):  # 16 elements at a time, each as below
            gj = vmul(vload(g, j), c_v)
            mj = vadd(vmul(b1_v, vload(m, j)), vmul(nb1_v, gj))
            vj = vadd(vmul(b2_v, vload(v, j)), vmul(nb2_v, vmul(gj, gj)))
            vstore(m, j, mj)
            vstore(v, j, vj)
            pj = vsub(vload(p, j), vdiv(vmul(step_v, mj), vadd(vdiv(vsqrt(vj), bc2_v), e_v)))
            vstore(p, j, pj)
            check = vadd(check, vsub(pj, pj))
        bad |= np.int32(_any_non_finite(check))
        for j in range(n_full, p.size):
            gj = g[j] * coef
            mj = b1 * m[j] + (_F(1.0) - b1) * gj
            vj = b2 * v[j] + (_F(1.0) - b2) * (gj * gj)
            m[j] = mj
            v[j] = vj
            pj = p[j] - step * mj / (np.sqrt(vj) / bc2_sqrt + e)
            p[j] = pj
            bad |= np.int32(pj - pj != _F(0.0))
    return norm, bad == 0


@numba.njit(**_JIT)
def _max_logit(logits: np.ndarray, s: int, e: int) -> float:
    """The largest logit of row ``[s, e]``, in float64."""
    top = np.float64(logits[s, e, 0])
    for a in range(1, logits.shape[2]):
        top = max(top, np.float64(logits[s, e, a]))
    return top


@numba.njit(**_JIT)
def sample_categorical(logits: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """Inverse-CDF draws ``out[s, e]`` from softmax(``logits[s, e]``) with uniforms ``u[s, e]``:
    the smallest action a with ``u < sum_{b <= a} p_b`` (the last action if rounding leaves
    ``u`` above the total). Probabilities in float64, after subtracting the max logit."""
    n_actions = logits.shape[2]
    probs = np.empty(n_actions, dtype=np.float64)
    for s in range(logits.shape[0]):
        for e in range(logits.shape[1]):
            top = _max_logit(logits, s, e)
            total = 0.0
            for a in range(n_actions):
                probs[a] = np.exp(np.float64(logits[s, e, a]) - top)
                total += probs[a]
            chosen = n_actions - 1
            cdf = 0.0
            for a in range(n_actions - 1):
                cdf += probs[a]
                if u[s, e] < cdf / total:
                    chosen = a
                    break
            out[s, e] = chosen


@numba.njit(**_JIT)
def categorical_logp(logits: np.ndarray, actions: np.ndarray, out: np.ndarray) -> None:
    """``out[s, e] = log softmax(logits[s, e])[actions[s, e]]`` (float64 arithmetic after
    subtracting the max logit, stored as float32): PPO's log pi_old(a|s) in the rollout."""
    for s in range(logits.shape[0]):
        for e in range(logits.shape[1]):
            top = _max_logit(logits, s, e)
            total = 0.0
            for a in range(logits.shape[2]):
                total += np.exp(np.float64(logits[s, e, a]) - top)
            out[s, e] = np.float64(logits[s, e, actions[s, e]]) - top - np.log(total)


@numba.njit(**_JIT)
def rollout_targets_(
    v_all, v_final, rewards, terminated, dones, alive, gamma, lam, mc, adv_out, ret_out
) -> None:
    """GAE advantages and value targets of a rollout, laid out ``[S', T * E]`` (row
    ``t * E + e``), for the learners ``alive`` (S' of them) of a population.

    ``v_all[k]`` holds V(s_0 .. s_T) of learner k (``(T + 1) * E`` values: row
    ``(t + 1) * E + e`` follows row ``t * E + e``), ``v_final[k]`` V of the final
    observation where step t was truncated (read only there). ``rewards``, ``terminated``
    and ``dones`` are the rollout buffers ``[T, S, E]`` of the whole population. With
    next value V' (V(final obs) on truncation, else the next row) and study.trainer.gae's float32
    recursion, ``adv = A^lam``; the value target is ``A^lam + V``, or ``A^1 + V`` (the
    discounted return bootstrapped at truncations and at the rollout's end) where ``mc``.
    """
    n_steps, _, n_envs = rewards.shape
    for k in range(alive.shape[0]):
        s = alive[k]
        g = gamma[k]
        gl = g * lam[k]
        for e in range(n_envs):
            last = _F(0.0)
            last_mc = _F(0.0)
            for t in range(n_steps - 1, -1, -1):
                row = t * n_envs + e
                term = terminated[t, s, e]
                done = dones[t, s, e]
                v = v_all[k, row]
                nv = v_final[k, row] if (done and not term) else v_all[k, row + n_envs]
                not_term = _F(1.0) - _F(term)
                not_done = _F(1.0) - _F(done)
                delta = _F(rewards[t, s, e]) + g * not_term * nv - v
                last = delta + gl * not_done * last
                adv_out[k, row] = last
                if mc[k]:
                    last_mc = delta + g * not_done * last_mc
                    ret_out[k, row] = last_mc + v
                else:
                    ret_out[k, row] = last + v


@numba.njit(**_JIT)
def record_step_(
    t, reward, terminated, truncated, buf_rew, buf_term, buf_done, ep_ret, ep_len,
    ret_sum, len_sum, ep_count, final_sum, final_count, final, last_ret,
) -> None:  # fmt: skip
    """Book-keeping of one vectorized step ``[S, E]``: store reward, terminated and done
    (terminated or truncated) at rollout step t, add the reward to each running episode,
    and close the episodes that ended into the per-member window sums (and, when
    ``final``, into the final-return sums), in environment order; ``last_ret[s, e]`` keeps
    the return of each environment's last finished episode."""
    for s in range(reward.shape[0]):
        for e in range(reward.shape[1]):
            r = reward[s, e]
            done = terminated[s, e] or truncated[s, e]
            buf_rew[t, s, e] = r
            buf_term[t, s, e] = terminated[s, e]
            buf_done[t, s, e] = done
            ep_ret[s, e] += r
            ep_len[s, e] += 1.0
            if done:
                ret_sum[s] += ep_ret[s, e]
                len_sum[s] += ep_len[s, e]
                ep_count[s] += 1.0
                if final:
                    final_sum[s] += ep_ret[s, e]
                    final_count[s] += 1.0
                last_ret[s, e] = ep_ret[s, e]
                ep_ret[s, e] = 0.0
                ep_len[s, e] = 0.0


@numba.njit(**_JIT)
def categorical_policy_grad(logits, actions, weights, ent_coef, g_out):
    """Policy-gradient terms of a Categorical policy over rows ``[S, B]``, in one pass.

    With log p = z - max z - log sum exp(z - max z) (as ``torch.log_softmax``),
    p = exp(z - max z) / sum exp(z - max z), H = -sum_a p log p, row weights w (A / n) and entropy
    coefficients c (c_ent / n, per member), writes the gradient of ``-w log p(a) - c H``
    with respect to the logits,
        g_out = w (p - onehot(a)) + c p (log p + H),
    and returns per member ``-sum_b w_b log p(a_b)`` and ``sum_b H_b``.
    """
    n_members, n_rows, n_actions = logits.shape
    pg = np.zeros(n_members, dtype=np.float32)
    ent = np.zeros(n_members, dtype=np.float32)
    p = np.empty(n_actions, dtype=np.float32)
    logp = np.empty(n_actions, dtype=np.float32)
    for s in range(n_members):
        c = ent_coef[s]
        for b in range(n_rows):
            z = logits[s, b]
            top = z[0]
            for a in range(1, n_actions):
                top = max(top, z[a])
            total = _F(0.0)
            for a in range(n_actions):
                p[a] = np.exp(z[a] - top)
                total += p[a]
            log_total = np.log(total)
            h = _F(0.0)
            for a in range(n_actions):
                logp[a] = (z[a] - top) - log_total
                p[a] = p[a] / total
                h -= p[a] * logp[a]
            chosen = actions[s, b]
            w = weights[s, b]
            pg[s] -= w * logp[chosen]
            ent[s] += h
            for a in range(n_actions):
                onehot = _F(1.0) if a == chosen else _F(0.0)
                g_out[s, b, a] = w * (p[a] - onehot) + c * p[a] * (logp[a] + h)
    return pg, ent


@numba.njit(**_JIT)
def advantage_stats_(adv, returns, values, normalize, explained_variance) -> None:
    """Per member (rows ``[S, N]``): the explained variance ``1 - Var[R - V] / Var[R]``
    (NaN when Var[R] = 0) into ``explained_variance``, then, where ``normalize``, the
    advantages standardised in place, ``(A - mean) / (std + 1e-8)`` with the unbiased std
    (N > 1). Two-pass means and variances, rows summed in order."""
    n_members, n = adv.shape
    for s in range(n_members):
        mean_r = _F(0.0)
        mean_d = _F(0.0)
        for j in range(n):
            mean_r += returns[s, j]
            mean_d += returns[s, j] - values[s, j]
        mean_r /= _F(n)
        mean_d /= _F(n)
        var_r = _F(0.0)
        var_d = _F(0.0)
        for j in range(n):
            dr = returns[s, j] - mean_r
            dd = (returns[s, j] - values[s, j]) - mean_d
            var_r += dr * dr
            var_d += dd * dd
        var_r /= _F(n)
        var_d /= _F(n)
        explained_variance[s] = _F(1.0) - var_d / var_r if var_r > _F(0.0) else np.nan
        if normalize[s] and n > 1:
            mean_a = _F(0.0)
            for j in range(n):
                mean_a += adv[s, j]
            mean_a /= _F(n)
            var_a = _F(0.0)
            for j in range(n):
                da = adv[s, j] - mean_a
                var_a += da * da
            std = np.sqrt(var_a / _F(n - 1))
            for j in range(n):
                adv[s, j] = (adv[s, j] - mean_a) / (std + _F(1e-8))
