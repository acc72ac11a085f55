"""Fused CPU loops, compiled by numba, for the elementwise work of a population update.

A population's small tensors make PyTorch pay one pass over memory, and one dispatch, per
operation: tanh as ``2 sigmoid(2x) - 1`` is four passes, and a clipped RMSprop step is about
ten per parameter. Each function here does its job in one pass.

Bit-identity: every loop treats one member at a time, in the same order, with IEEE
arithmetic only (no fast-math, no reassociation), so a member's numbers never depend on the
rest of the population. Reductions over a member's elements use a fixed block of
``_LANES`` partial sums, which vectorizes without reordering anything between runs.
Compiled code is cached next to this file (``cache=True``), so only the first process
after an install pays the compile time (a few seconds).
"""

from __future__ import annotations

import numba
import numpy as np

JIT_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}
_JIT = JIT_OPTIONS
_F = np.float32
_LANES = 16

# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 7.905 (tanh rounds to +-1 in float32 beyond), the
# rational approximation of Eigen's fast float tanh: at most 4e-7 from the true tanh.
_CLAMP = _F(7.90531110763549805)
_A1, _A3, _A5, _A7 = map(
    _F, (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08)
)
_A9, _A11, _A13 = map(_F, (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_B0, _B2, _B4, _B6 = map(
    _F, (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
)
# The same coefficients, highest power first (for study.nets' torch version).
TANH_CLAMP = float(_CLAMP)
TANH_P = tuple(float(c) for c in (_A13, _A11, _A9, _A7, _A5, _A3, _A1))
TANH_Q = tuple(float(c) for c in (_B6, _B4, _B2, _B0))


@numba.njit(**_JIT)
def tanh_(a: np.ndarray) -> None:
    """``a <- tanh(a)`` in place (float32, C-contiguous)."""
    x = a.reshape(-1)
    for i in range(x.size):
        v = x[i]
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
        x[i] = (p * v) / q


@numba.njit(**_JIT)
def tanh_backward_(g: np.ndarray, y: np.ndarray, bias_grad: np.ndarray) -> None:
    """Through ``y = tanh(x)``, ``[S, B, F]``: ``g <- g * (1 - y^2)`` in place (the gradient
    with respect to x) and ``bias_grad[s, 0, :] <- sum_b g[s, b, :]`` (rows in order).
    ``y`` may have more rows than ``g`` (the extra ones are ignored); it should be
    C-contiguous, as a strided row does not vectorize (5x slower)."""
    for s in range(g.shape[0]):
        db = bias_grad[s, 0]
        db[:] = 0.0
        for b in range(g.shape[1]):
            gr = g[s, b]
            yr = y[s, b]
            for j in range(g.shape[2]):
                v = gr[j] * (_F(1.0) - yr[j] * yr[j])
                gr[j] = v
                db[j] += v


@numba.njit(**_JIT)
def _sum_squares(x: np.ndarray) -> float:
    """``sum_j x_j^2`` of a 1-D array, in ``_LANES`` fixed partial sums (then in order)."""
    acc = np.zeros(_LANES, dtype=np.float32)
    n_full = x.size - x.size % _LANES
    for j in range(0, n_full, _LANES):
        for k in range(_LANES):
            acc[k] += x[j + k] * x[j + k]
    for j in range(n_full, x.size):
        acc[0] += x[j] * x[j]
    total = _F(0.0)
    for k in range(_LANES):
        total += acc[k]
    return total


@numba.njit(**_JIT)
def _clip_coefficient(grads, s: int, max_norm: float) -> tuple[float, float]:
    """(grad norm, clip coefficient) of member s: ``min(1, max_norm / (norm + 1e-6))``."""
    sq = _F(0.0)
    for k in range(len(grads)):
        sq += _sum_squares(grads[k][s].reshape(-1))
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
    a = _F(alpha)
    one_minus_a = _F(1.0) - a
    e = _F(eps)
    for s in range(n_members):
        norm, coef = _clip_coefficient(grads, s, max_norm[s])
        norms[s] = norm
        if not (loss_ok[s] and np.isfinite(norm)):
            continue
        step = lr[s]
        bad = 0
        for k in range(len(params)):
            p = params[k][s].reshape(-1)
            g = grads[k][s].reshape(-1)
            v = sq_avgs[k][s].reshape(-1)
            for j in range(p.size):
                gj = g[j] * coef
                vj = a * v[j] + one_minus_a * (gj * gj)
                v[j] = vj
                pj = p[j] - step * gj / (np.sqrt(vj) + e)
                p[j] = pj
                bad |= np.int32(pj - pj != _F(0.0))  # NaN for inf and NaN alike
        ok[s] = bad == 0
    return norms, ok


@numba.njit(**_JIT)
def adam_step(params, grads, exp_avgs, exp_avg_sqs, t, lr, max_norm, loss_ok, beta1, beta2, eps):
    """Clip each member's gradient to ``max_norm`` and take one Adam step, in place.

    Per member, with c the clip coefficient and step count t:
        g = c * grad,  m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,
        p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    (``torch.optim.Adam``). Non-finite members take no step, as in :func:`rmsprop_step`.
    """
    n_members = lr.shape[0]
    norms = np.zeros(n_members, dtype=np.float32)
    ok = np.zeros(n_members, dtype=np.bool_)
    b1, b2, e = _F(beta1), _F(beta2), _F(eps)
    bc1 = _F(1.0 - beta1**t)
    bc2_sqrt = _F(np.sqrt(1.0 - beta2**t))
    for s in range(n_members):
        norm, coef = _clip_coefficient(grads, s, max_norm[s])
        norms[s] = norm
        if not (loss_ok[s] and np.isfinite(norm)):
            continue
        step = lr[s] / bc1
        bad = 0
        for k in range(len(params)):
            p = params[k][s].reshape(-1)
            g = grads[k][s].reshape(-1)
            m = exp_avgs[k][s].reshape(-1)
            v = exp_avg_sqs[k][s].reshape(-1)
            for j in range(p.size):
                gj = g[j] * coef
                mj = b1 * m[j] + (_F(1.0) - b1) * gj
                vj = b2 * v[j] + (_F(1.0) - b2) * (gj * gj)
                m[j] = mj
                v[j] = vj
                pj = p[j] - step * mj / (np.sqrt(vj) / bc2_sqrt + e)
                p[j] = pj
                bad |= np.int32(pj - pj != _F(0.0))
        ok[s] = bad == 0
    return norms, ok


@numba.njit(**_JIT)
def sample_categorical(logits: np.ndarray, u: np.ndarray, out: np.ndarray) -> None:
    """Inverse-CDF draws ``out[s, e]`` from softmax(``logits[s, e]``) with uniforms ``u[s, e]``:
    the smallest action a with ``u < sum_{b <= a} p_b`` (the last action if rounding leaves
    ``u`` above the total). Probabilities in float64, after subtracting the max logit."""
    n_actions = logits.shape[2]
    probs = np.empty(n_actions, dtype=np.float64)
    for s in range(logits.shape[0]):
        for e in range(logits.shape[1]):
            top = np.float64(logits[s, e, 0])
            for a in range(1, n_actions):
                top = max(top, np.float64(logits[s, e, a]))
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
def gae_(rewards, values, next_values, terminated, dones, gamma, lam, out) -> None:
    """GAE over ``[T, N]`` arrays (study.gae's recursion, in the same float32 order):
    ``delta = r + (gamma (1 - term)) next - v``, ``A_t = delta + (gamma lam (1 - done)) A_{t+1}``.
    ``gamma`` and ``lam`` are ``[N]``."""
    n_steps, n = rewards.shape
    for i in range(n):
        g = gamma[i]
        gl = g * lam[i]
        last = _F(0.0)
        for t in range(n_steps - 1, -1, -1):
            not_term = _F(1.0) - _F(terminated[t, i])
            not_done = _F(1.0) - _F(dones[t, i])
            delta = rewards[t, i] + g * not_term * next_values[t, i] - values[t, i]
            last = delta + gl * not_done * last
            out[t, i] = last
