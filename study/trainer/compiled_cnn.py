"""The MinAtar network's passes compiled: one ReLU convolution, one dense ReLU layer, heads.

The autograd reference (study.trainer.updates.AutogradUpdate) runs a CNN member by member
through torch's convolutions and autograd, whose start-up costs dominate on MinAtar's small
images (about a quarter of the machine's convolution peak). :class:`CompiledCNNUpdate` is
its acceleration for the network MinAtar studies use (``encoder = "minatar_cnn"``: one
convolution, then a dense layer, shared by the two heads with no hidden layers after it;
a discrete policy; A2C with one minibatch): every member's forward pass is one compiled
loop, its backward pass hand-written, the rollout's passes are the update's forward pass
(A2C's weights do not change between them), and with RMSprop each member's step is taken
right after its gradients, while they are in cache. With the MinAtar game compiled too
(study.trainer.envs.minatar_compiled), :func:`play` runs each member's whole rollout, its
passes, sampled actions and games' steps, before the next member's (:func:`rollout_player`).

How it is fast:

* **Registers.** The convolution keeps eight output positions' 16 channels in registers
  over its taps; its kernel gradient, eight taps' sums over the rollout's positions. The
  dense layer's three products (forward ``h W``, the weight gradient ``h^T g``, the input
  gradient ``g W^T``) are study.trainer.compiled's register tiles (four rows by 64
  columns of sums over the whole inner loop, about 110 GFLOP/s here); the heads are
  16-lane dot products (study.trainer.simd).
* **Member by member.** A member's dense layer is half a megabyte: a rollout played step
  by step reads every member's again at every step, which at 64 members is the size of
  the shared cache, and a pass then waits on memory (55 us against 30 to 40 with its
  weights in cache). :func:`play` reads each member's weights once a rollout.
* **Nothing allocated per update**: the rollout's activations, the backward pass's
  buffers and, with the step fused, one member's gradients are kept and reused.

Close to the reference, not bit-identical: sums run in other orders than torch's (oneDNN's
convolutions, MKL's products); tests/test_compiled_cnn.py compares passes, gradients and
a few updates with autograd (allclose). A member's arithmetic reads only its own weights
and rows, in an order fixed by the network's shapes, so a member gives the same bits alone,
in any population and on every re-run (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
import torch

from study.hyperparameters import Structure
from study.trainer import kernels
from study.trainer.compiled import _tiles_fma, _transpose_into
from study.trainer.envs.base import Step
from study.trainer.envs.minatar import MinAtarPopulation
from study.trainer.envs.minatar_compiled import CompiledGames, step_games
from study.trainer.kernels import JIT_OPTIONS
from study.trainer.networks import ActorCritic, accelerations_enabled
from study.trainer.numba_cache import drop_stale_cache
from study.trainer.optim import MemberOptimizer, kernel_view
from study.trainer.simd import LANES, vfma, vlane, vload, vsplat, vstore, vwhere_le
from study.trainer.updates import AutogradUpdate, Minibatch, Terms, register_acceleration
from study.trainer.views import view

if TYPE_CHECKING:
    from study.trainer.population import _Trainer

__all__ = ["CompiledCNNUpdate", "Player", "accepts", "rollout_player"]

#: A rollout's steps from the trainer's rollout and draws: (every member's actions, the
#: environments' step), in order (``_Trainer.play``, or :func:`rollout_player`'s).
Player = Callable[[Any, np.ndarray], Iterable[tuple[np.ndarray, Step]]]

drop_stale_cache()

_F = np.float32
#: ``backward``'s ``step`` after its arrays when it takes none.
_NO_STEP = (np.zeros(0, _F), np.zeros(0, _F), np.zeros(0, np.bool_), 0.0, 0.0,
            np.zeros(0, _F), np.zeros(0, np.bool_))


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(_F)


def _as3(arrays: Any) -> tuple[np.ndarray, ...]:
    """The optimizer kernels' ``[S, a, b]`` views of ``arrays``."""
    return tuple(kernel_view(a) for a in arrays)


# ----------------------------------------------------------------------- convolution
# A convolution of one image, with ``xf`` the image as float32 (times the scale), flat, and
# ``at[p]`` / ``tap_at[t]`` the offsets in it of output position p's window and of tap
# ``t = (c k + dy) k + dx`` within a window, sums
#     z[p, o] = bias[o] + sum over taps t, in order, of xf[at[p] + tap_at[t]] taps[t, o]
# with fused multiply-adds, 16 channels to a register. Eight positions' sums are kept in
# registers at once (independent chains; one chain alone waits on each add). Offsets are
# unsigned: numba checks a signed index for a negative value at every load, which cost a
# third of the loop.


@numba.njit(**JIT_OPTIONS)
def _offsets(n_c, height, width, k, stride, n_h, n_w):
    """``(at, tap_at)`` of a ``[C, H, W]`` image (see above)."""
    at = np.empty(n_h * n_w, dtype=np.uint64)
    for oy in range(n_h):
        for ox in range(n_w):
            at[oy * n_w + ox] = oy * stride * width + ox * stride
    tap_at = np.empty(n_c * k * k, dtype=np.uint64)
    for c in range(n_c):
        for dy in range(k):
            for dx in range(k):
                tap_at[(c * k + dy) * k + dx] = (c * height + dy) * width + dx
    return at, tap_at


@numba.njit(**JIT_OPTIONS, inline="always")
def _eight(i, n):
    """Eight indices from i, those past the last clamped to it (computed again, stored
    to the same place)."""
    last = n - 1
    return (min(i, last), min(i + 1, last), min(i + 2, last), min(i + 3, last),
            min(i + 4, last), min(i + 5, last), min(i + 6, last), min(i + 7, last))


@numba.njit(**JIT_OPTIONS, inline="always")
def _fma8(a0, a1, a2, a3, a4, a5, a6, a7, x, i0, i1, i2, i3, i4, i5, i6, i7, w):
    """``a_j + x[i_j] w`` for eight sums (fused)."""
    return (vfma(vsplat(x[i0]), w, a0), vfma(vsplat(x[i1]), w, a1),
            vfma(vsplat(x[i2]), w, a2), vfma(vsplat(x[i3]), w, a3),
            vfma(vsplat(x[i4]), w, a4), vfma(vsplat(x[i5]), w, a5),
            vfma(vsplat(x[i6]), w, a6), vfma(vsplat(x[i7]), w, a7))


@numba.njit(**JIT_OPTIONS, inline="always")
def _vrelu(v):
    """max(v, 0) lane by lane, NaN kept (as torch.relu)."""
    zero = vsplat(0.0)
    return vwhere_le(v, zero, zero, v)


@numba.njit(**JIT_OPTIONS)
def _conv(xf, at, tap_at, taps, bias, z):
    """ReLU(``z[p O + o]``) (flat, ``O`` a multiple of 16) for every position (see
    above)."""
    n_o = bias.shape[0]
    n_pos, n_taps = at.shape[0], tap_at.shape[0]
    for o in range(0, n_o, LANES):
        b = vload(bias, o)
        for p in range(0, n_pos, 8):
            p0, p1, p2, p3, p4, p5, p6, p7 = _eight(p, n_pos)
            q0, q1, q2, q3, q4, q5, q6, q7 = (at[p0], at[p1], at[p2], at[p3], at[p4], at[p5],
                                              at[p6], at[p7])
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = b
            for t in range(n_taps):
                d = tap_at[t]
                a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(
                    a0, a1, a2, a3, a4, a5, a6, a7, xf, q0 + d, q1 + d, q2 + d, q3 + d,
                    q4 + d, q5 + d, q6 + d, q7 + d, vload(taps, t * n_o + o))
            vstore(z, p0 * n_o + o, _vrelu(a0))
            vstore(z, p1 * n_o + o, _vrelu(a1))
            vstore(z, p2 * n_o + o, _vrelu(a2))
            vstore(z, p3 * n_o + o, _vrelu(a3))
            vstore(z, p4 * n_o + o, _vrelu(a4))
            vstore(z, p5 * n_o + o, _vrelu(a5))
            vstore(z, p6 * n_o + o, _vrelu(a6))
            vstore(z, p7 * n_o + o, _vrelu(a7))


@numba.njit(**JIT_OPTIONS)
def _conv_weight_grad(xf, at, tap_at, gz, dtaps):
    """The kernel's gradient, ``dtaps[t, o]`` = the sum over images r, then positions p, in
    order, of ``xf[r, at[p] + tap_at[t]] gz[r, p O + o]`` (fused, from zero); eight taps'
    sums in registers at once."""
    n_rows, n_o = xf.shape[0], dtaps.shape[1]
    n_pos, n_taps = at.shape[0], tap_at.shape[0]
    zero = vsplat(0.0)
    for o in range(0, n_o, LANES):
        for t in range(0, n_taps, 8):
            t0, t1, t2, t3, t4, t5, t6, t7 = _eight(t, n_taps)
            d0, d1, d2, d3, d4, d5, d6, d7 = (tap_at[t0], tap_at[t1], tap_at[t2], tap_at[t3],
                                              tap_at[t4], tap_at[t5], tap_at[t6], tap_at[t7])
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            for r in range(n_rows):
                x, g = xf[r], gz[r]
                for p in range(n_pos):
                    q = at[p]
                    a0, a1, a2, a3, a4, a5, a6, a7 = _fma8(
                        a0, a1, a2, a3, a4, a5, a6, a7, x, q + d0, q + d1, q + d2, q + d3,
                        q + d4, q + d5, q + d6, q + d7, vload(g, p * n_o + o))
            vstore(dtaps[t0], o, a0)
            vstore(dtaps[t1], o, a1)
            vstore(dtaps[t2], o, a2)
            vstore(dtaps[t3], o, a3)
            vstore(dtaps[t4], o, a4)
            vstore(dtaps[t5], o, a5)
            vstore(dtaps[t6], o, a6)
            vstore(dtaps[t7], o, a7)


@numba.njit(**JIT_OPTIONS)
def _as_float(x, scale, xf):
    """``xf = x * scale`` (float32), an image a row, for images ``x`` ``[R, C, H, W]``
    (C-contiguous)."""
    flat = view(x, (x.shape[0], x[0].size))
    for r in range(flat.shape[0]):
        img, out = flat[r], xf[r]
        for i in range(img.shape[0]):
            out[i] = _F(img[i]) * scale


@numba.njit(**JIT_OPTIONS, inline="always")
def _relu(v):
    """max(v, 0), NaN kept (as torch.relu)."""
    return v if not v <= 0 else _F(0.0)


@numba.njit(**JIT_OPTIONS)
def _kernel_rows(w, out):
    """``out[(c k + dy) k + dx, o] = w[o, c, dy, dx]``: the kernel, one row per tap."""
    n_o, n_c, k, _ = w.shape
    for o in range(n_o):
        for c in range(n_c):
            for dy in range(k):
                for dx in range(k):
                    out[(c * k + dy) * k + dx, o] = w[o, c, dy, dx]


# ----------------------------------------------------------------------- dense layers
@numba.njit(**JIT_OPTIONS)
def _bias_relu(z, bias):
    for r in range(z.shape[0]):
        for j in range(z.shape[1]):
            z[r, j] = _relu(z[r, j] + bias[j])


@numba.njit(**JIT_OPTIONS, inline="always")
def _dot(a, b):
    """``sum_j a[j] b[j]``: 16 partial sums (lane l: the terms j = l mod 16, in order,
    fused), then the lanes in order; the rest of an odd length in order after them."""
    n = a.shape[0]
    full = n // LANES * LANES
    acc = vsplat(0.0)
    for j in range(0, full, LANES):
        acc = vfma(vload(a, j), vload(b, j), acc)
    total = _F(0.0)
    for lane in range(LANES):
        total += vlane(acc, lane)
    for j in range(full, n):
        total += a[j] * b[j]
    return total


@numba.njit(**JIT_OPTIONS)
def _heads(h, w_pi_t, b_pi, w_v, b_v, logits, values):
    """``logits = h W_pi + b_pi``, ``values = h w_v + b_v`` (``w_pi_t`` ``[A, U]``)."""
    for r in range(h.shape[0]):
        for a in range(w_pi_t.shape[0]):
            logits[r, a] = _dot(h[r], w_pi_t[a]) + b_pi[a]
        values[r] = _dot(h[r], w_v) + b_v


@numba.njit(**JIT_OPTIONS)
def _heads_backward(h2, gl, gv, w_pi_t, w_v, dw_pi_t, dw_v, db_pi, g2):
    """The heads' gradients (``dw_pi_t`` ``[A, U]``, ``dw_v`` ``[U]``, ``db_pi`` ``[A]``;
    returns the value bias's) and the gradient into the dense layer's ReLU, ``g2``."""
    n_rows, n_act = gl.shape
    dw_pi_t[:, :] = 0.0
    dw_v[:] = 0.0
    db_pi[:] = 0.0
    db_v = _F(0.0)
    n_units = h2.shape[1]
    for r in range(n_rows):
        h, g, v = h2[r], g2[r], gv[r]
        db_v += v
        for j in range(n_units):
            dw_v[j] += v * h[j]
            g[j] = v * w_v[j]
        for a in range(n_act):
            c = gl[r, a]
            db_pi[a] += c
            dw, w = dw_pi_t[a], w_pi_t[a]
            for j in range(n_units):
                dw[j] += c * h[j]
                g[j] += c * w[j]
        for j in range(n_units):
            if not h[j] > 0:
                g[j] = 0.0
    return db_v


# ----------------------------------------------------------------------- passes
@numba.njit(**JIT_OPTIONS)
def member_forward(x, scale, params, s, h1, h2, logits, values, scratch):
    """Member s's pass on its rows ``x`` ``[R, C, H, W]``: the convolution's ReLU outputs
    into ``h1`` ``[R, F]`` (flattened channel, row, column, as torch), the dense layer's
    into ``h2``, then ``logits`` and ``values`` (see :func:`forward`)."""
    wc, bc, wf, bf, w_pi, b_pi, w_v, b_v = params
    taps, z, w_pi_t, w_v1, xf, at, tap_at = scratch
    n_o = wc.shape[1]
    n_pos = at.shape[0]
    _kernel_rows(wc[s], view(taps, (tap_at.shape[0], n_o)))
    _as_float(x, scale, xf)
    for r in range(x.shape[0]):
        _conv(xf[r], at, tap_at, taps, bc[s], z)
        _transpose_into(view(z, (n_pos, n_o)), view(h1[r], (n_o, n_pos)))
    _tiles_fma(h1, wf[s], h2)
    _bias_relu(h2, bf[s, 0])
    _transpose_into(w_pi[s], w_pi_t)
    w_v1[:] = w_v[s, :, 0]
    _heads(h2, w_pi_t, b_pi[s, 0], w_v1, b_v[s, 0, 0], logits, values)


@numba.njit(**JIT_OPTIONS)
def forward(x, scale, params, h1, h2, logits, values, row0, scratch):
    """Every member's pass (:func:`member_forward`) on its rows ``x`` ``[S, R, C, H, W]``,
    into rows ``row0`` on of ``h1``, ``h2``, ``logits``, ``values``. ``params``: (kernel,
    its bias, dense weight ``[S, F, U]``, bias, policy head ``[S, U, A]``, bias, value head
    ``[S, U, 1]``, bias); ``scratch``: (taps ``[C k k O]``, positions ``[P O]``, policy
    head transposed ``[A, U]``, value head ``[U]``, images ``[R, C H W]``,
    :func:`_offsets`)."""
    rows = slice(row0, row0 + x.shape[1])
    for s in range(x.shape[0]):
        member_forward(x[s], scale, params, s, h1[s, rows], h2[s, rows], logits[s, rows],
                       values[s, rows], scratch)


@numba.njit(**JIT_OPTIONS)
def backward(x, scale, params, h1, h2, g_logits, g_values, grads, work, step):
    """Gradients of every member's loss with respect to its parameters (``grads``, in
    ``params``' order and shapes), from the loss's gradients with respect to the logits
    ``[S, N, A]`` and the values ``[S, N]``, and the forward pass's ``h1``, ``h2`` of the
    same rows ``x``. ``work``: (dense weight transposed ``[U, F]``, ``g_h2`` ``[N, U]``,
    ``g_h1`` ``[N, F]``, taps' gradient ``[C k k, O]``, positions' gradients ``[N, P O]``,
    policy head and its gradient transposed ``[A, U]`` each, value head and its gradient
    ``[U]`` each, images ``[N, C H W]``, :func:`_offsets`). ``step``: (whether to take
    each member's RMSprop step right after its gradients, which then go to index 0 of
    ``grads``, one member's room; the parameters, gradients and optimizer state as
    ``[S, a, b]`` views, as ``MemberOptimizer`` passes them; learning
    rates, clipping norms, finite losses, alpha, eps; the pre-clip norms and finiteness
    it returns per member)."""
    wc, bc, wf, bf, w_pi, b_pi, w_v, b_v = params
    fused, p3, g3, sq3, lr, max_norm, loss_ok, alpha, eps, norms, finite = step
    dwc, dbc, dwf, dbf, dw_pi, db_pi, dw_v, db_v = grads
    wf_t, g2, g1, dtaps, gz, w_pi_t, dw_pi_t, w_v1, dw_v1, xf, at, tap_at = work
    n_o, k, n_c = wc.shape[1], wc.shape[3], wc.shape[2]
    n_rows = g_logits.shape[1]
    n_pos = at.shape[0]
    g2, g1, gz, xf = g2[:n_rows], g1[:n_rows], gz[:n_rows], xf[:n_rows]
    for s in range(x.shape[0]):
        gs = 0 if fused else s  # (fused: one member's gradients at a time)
        hs = h1[s, :n_rows]
        _transpose_into(w_pi[s], w_pi_t)
        w_v1[:] = w_v[s, :, 0]
        db_v[gs, 0, 0] = _heads_backward(h2[s, :n_rows], g_logits[s], g_values[s], w_pi_t, w_v1,
                                        dw_pi_t, dw_v1, db_pi[gs, 0], g2)
        _transpose_into(dw_pi_t, dw_pi[gs])
        dw_v[gs, :, 0] = dw_v1
        # The dense layer: bias, weights (h1^T g2), input (g2 W^T).
        db = dbf[gs, 0]
        db[:] = 0.0
        for r in range(n_rows):
            for j in range(db.shape[0]):
                db[j] += g2[r, j]
        _tiles_fma(hs.T, g2, dwf[gs])
        _transpose_into(wf[s], wf_t)
        _tiles_fma(g2, wf_t, g1)
        # The convolution: the ReLU's mask, positions' gradients (channels last), bias,
        # kernel.
        dbc[gs, :] = 0.0
        for r in range(n_rows):
            g, h = g1[r], hs[r]
            for i in range(g.shape[0]):
                if not h[i] > 0:
                    g[i] = 0.0
            _transpose_into(view(g, (n_o, n_pos)), view(gz[r], (n_pos, n_o)))
            for p in range(n_pos):
                for o in range(n_o):
                    dbc[gs, o] += gz[r, p * n_o + o]
        _as_float(x[s], scale, xf)
        _conv_weight_grad(xf, at, tap_at, gz, dtaps)
        for o in range(n_o):
            for c in range(n_c):
                for dy in range(k):
                    for dx in range(k):
                        dwc[gs, o, c, dy, dx] = dtaps[(c * k + dy) * k + dx, o]
        if fused:
            norms[s], finite[s] = kernels.rmsprop_member_from(
                p3, g3, gs, sq3, s, lr[s], max_norm[s], loss_ok[s], alpha, eps)


@numba.njit(**JIT_OPTIONS)
def play(obs, scale, params, cache, scratch, member, draws, action_set, games, out):
    """A rollout member by member, each member's steps while its weights are in cache:
    for t < T, member s's pass on its observations (into ``cache``'s rows ``t E`` on, as
    :func:`forward`), its actions sampled from ``draws`` ``[S, T, E]`` (as the trainer's
    ``act``: ``kernels.sample_categorical``), its games' step; then its V(s_T). Members
    that stopped learning (``member[s] < 0``) play action 0. ``obs``: ``[S, E, C, H, W]``;
    ``cache``: the rollout's ``h1``, ``h2``, logits, values (as :func:`forward`'s), then one
    member's ``h1``, ``h2``, logits for V(s_T) and V(s_T) ``[S', E]``; ``games``:
    the compiled games' code, arrays and sticky probability (``CompiledGames.arrays``);
    ``out``: (actions ``[T, S, E]``, next observations, final observations, rewards,
    ends, one member's env actions)."""
    h1, h2, logits, values, v_h1, v_h2, v_logits, v_last = cache
    game, state, maps, key, pos, sticky = games
    actions, next_obs, final, rewards, dones, env_a = out
    n_mem, n_steps, n_envs = draws.shape
    for s in range(n_mem):
        i = member[s]
        lo, hi = s * n_envs, (s + 1) * n_envs
        for t in range(n_steps):
            x = obs[s] if t == 0 else next_obs[t - 1, s]
            if i >= 0:
                rows = slice(t * n_envs, (t + 1) * n_envs)
                member_forward(x, scale, params, i, h1[i, rows], h2[i, rows], logits[i, rows],
                               values[i, rows], scratch)
                kernels.sample_categorical(logits[i:i + 1, rows], draws[s:s + 1, t],
                                           actions[t, s:s + 1])
            else:
                actions[t, s] = 0
            for e in range(n_envs):
                env_a[e] = action_set[actions[t, s, e]]
            step_games(game, state[lo:hi], maps[lo:hi], key[lo:hi], pos[lo:hi], env_a,
                       sticky, next_obs[t, s], final[t, s], rewards[t, s], dones[t, s])
        if i >= 0:
            member_forward(next_obs[n_steps - 1, s], scale, params, i, v_h1, v_h2, v_logits,
                           v_last[i], scratch)


# ----------------------------------------------------------------------- the update
def accepts(agent: ActorCritic, hp: Structure) -> bool:
    """Networks and updates :class:`CompiledCNNUpdate` serves (see the module docstring)."""
    enc = agent.groups.get("trunk_enc", [])
    return (accelerations_enabled() and agent.share_trunk and agent.discrete and agent.image
            and len(agent.convs) == 1 and len(enc) == 4 and not agent.trunk
            and enc[0].device.type == "cpu" and enc[0].dtype == torch.float32
            and enc[0].shape[1] % LANES == 0  # channels: whole registers
            and min(enc[2].shape[1:]) >= LANES  # the dense layer's products as register tiles
            and hp.algorithm == "a2c" and hp.n_minibatches == 1)


class CompiledCNNUpdate(AutogradUpdate):
    """:func:`forward` for the rollout's passes and V(s_T) (or :func:`play`, through
    :meth:`play_rollout`, for the whole rollout), :func:`backward` for the policy step
    (policy and value losses through the shared trunk)."""

    def __init__(self, agent: ActorCritic, hp: Structure) -> None:
        super().__init__(agent, hp)
        self.scale = _F(agent.scale)
        self._cache: tuple[np.ndarray, ...] = ()
        enc = agent.groups["trunk_enc"]
        n_o, n_c, k = enc[0].shape[1], enc[0].shape[2], enc[0].shape[3]
        n_feat, n_units = enc[2].shape[1], enc[2].shape[2]
        n_pos, n_act = n_feat // n_o, agent.act_dim
        *_, n_h, n_w = agent.conv_layers[0]
        _, height, width = agent.obs_shape
        self._offsets = _offsets(n_c, height, width, k, agent.convs[0][2], n_h, n_w)
        self._scratch = (np.empty(n_c * k * k * n_o, dtype=_F), np.empty(n_pos * n_o, _F),
                         np.empty((n_act, n_units), _F), np.empty(n_units, _F))
        self._dims = (n_c * k * k, n_o, n_pos, n_feat, n_units, n_act, n_c * height * width)
        self._images: dict[int, np.ndarray] = {}
        self._buffers: tuple[np.ndarray, ...] | None = None
        self._grad_arrays: tuple[np.ndarray, ...] | None = None
        self._member_bufs: tuple[np.ndarray, ...] | None = None
        self._value_bufs: tuple[np.ndarray, ...] | None = None
        self._play_bufs: tuple[np.ndarray, ...] | None = None
        self._v_last: np.ndarray | None = None  # V(s_T), where :meth:`play_rollout` took it

    def _floats(self, n_rows: int) -> np.ndarray:
        """A buffer for ``n_rows`` images as float32."""
        if n_rows not in self._images:
            self._images[n_rows] = np.empty((n_rows, self._dims[-1]), _F)
        return self._images[n_rows]

    def _params(self) -> tuple[np.ndarray, ...]:
        return tuple(p.detach().numpy() for p in self.agent.policy_params())

    def begin_rollout(self, n_learners: int, n_steps: int, n_envs: int) -> None:
        super().begin_rollout(n_learners, n_steps, n_envs)
        self._v_last = None
        n = n_steps * n_envs
        _, _, _, n_feat, n_units, n_act, _ = self._dims
        if not self._cache or self._cache[0].shape[:2] != (n_learners, n):
            self._cache = (np.zeros((n_learners, n, n_feat), _F),
                           np.zeros((n_learners, n, n_units), _F),
                           np.zeros((n_learners, n, n_act), _F), np.zeros((n_learners, n), _F))

    def _forward(self, x: torch.Tensor, cache: tuple[np.ndarray, ...], row0: int) -> None:
        x_np = np.ascontiguousarray(x.numpy())
        forward(x_np, self.scale, self._params(), *cache, row0,
                (*self._scratch, self._floats(x_np.shape[1]), *self._offsets))

    def rollout_pass(self, x: torch.Tensor, t: int) -> torch.Tensor:
        n_envs = x.shape[1]
        self._forward(x, self._cache, t * n_envs)
        return torch.from_numpy(self._cache[2][:, t * n_envs:(t + 1) * n_envs])

    def values(self, obs: torch.Tensor) -> torch.Tensor:
        """V of observations ``[S, B, ...]`` by the compiled pass (its buffers kept per
        shape: V(s_T) is asked for every update)."""
        shape = (obs.shape[0], obs.shape[1])
        if self._value_bufs is None or self._value_bufs[3].shape != shape:
            _, _, _, n_feat, n_units, n_act, _ = self._dims
            self._value_bufs = (np.empty((*shape, n_feat), _F), np.empty((*shape, n_units), _F),
                                np.empty((*shape, n_act), _F), np.empty(shape, _F))
        self._forward(obs, self._value_bufs, 0)
        return torch.from_numpy(self._value_bufs[3].copy())

    def state_values(self, obs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The rollout's values, then V(``last``), the observations the rollout ended in:
        :meth:`play_rollout` took it already where it played the rollout (the same pass on
        the same observations)."""
        if self._v_last is None:
            v_last = self.values(last)
        else:
            assert tuple(last.shape[:2]) == self._v_last.shape, "not this rollout's end"
            v_last = torch.from_numpy(self._v_last)
        return torch.cat([torch.from_numpy(self._cache[3]), v_last], dim=1)

    def play_rollout(self, obs: np.ndarray, draws: np.ndarray, member: np.ndarray,
                     games: CompiledGames, action_set: np.ndarray) -> tuple[np.ndarray, ...]:
        """A rollout by :func:`play`: its passes into the cache (as :meth:`rollout_pass`
        for every t), V(s_T) kept for :meth:`state_values`; returns (actions, next
        observations, final observations, rewards, ends), each ``[T, S, E, ...]``."""
        n_mem, n_steps, n_envs = draws.shape
        n_learners = self._cache[0].shape[0]
        _, _, _, n_feat, n_units, n_act, _ = self._dims
        if self._play_bufs is None or self._play_bufs[3].shape != (n_learners, n_envs):
            self._play_bufs = (np.empty((n_envs, n_feat), _F), np.empty((n_envs, n_units), _F),
                               np.empty((n_envs, n_act), _F), np.empty((n_learners, n_envs), _F))
        shape = (n_steps, n_mem, n_envs)
        nxt = np.empty((*shape, *obs.shape[2:]), np.uint8)  # fresh: the trainer keeps views
        out = (np.empty(shape, np.int64), nxt, np.empty_like(nxt), np.empty(shape),
               np.empty(shape, np.bool_), np.empty(n_envs, np.int64))
        play(np.ascontiguousarray(obs), self.scale, self._params(),
             (*self._cache, *self._play_bufs),
             (*self._scratch, self._floats(n_envs), *self._offsets), member, draws, action_set,
             games.arrays(), out)
        self._v_last = self._play_bufs[3]
        return out[:5]

    def policy_gradients(self, mb: Minibatch, entropy_coef: torch.Tensor,
                         value_coef: torch.Tensor) -> tuple[Terms, list[torch.Tensor]]:
        if not mb.full:
            return super().policy_gradients(mb, entropy_coef, value_coef)
        terms, g_logits, g_values = self._losses(mb, entropy_coef, value_coef)
        params = self._params()
        grads = self._grads(params)
        p3, g3 = _as3(params), _as3(grads)
        self._backward(mb, params, g_logits, g_values, grads, (False, p3, g3, p3, *_NO_STEP))
        return terms, [torch.from_numpy(g) for g in grads]

    def policy_step(self, mb: Minibatch, hps: Mapping[str, torch.Tensor],
                    optimizer: MemberOptimizer) -> tuple[Terms, torch.Tensor, torch.Tensor]:
        """With RMSprop, each member's clipped step right after its gradients (the
        kernel ``MemberOptimizer.step`` runs, ``kernels.rmsprop_member``; the same bits),
        while they are still in cache."""
        if not mb.full or optimizer.kind != "rmsprop":
            return super().policy_step(mb, hps, optimizer)
        terms, g_logits, g_values = self._losses(mb, hps["entropy_coef"], hps["value_coef"])
        params = self._params()
        grads = self._member_grads(params)
        rule: Any = optimizer.rule
        norms = np.zeros(len(params[0]), dtype=_F)
        finite = np.zeros(len(params[0]), dtype=np.bool_)
        optimizer.t += 1  # (as MemberOptimizer.step: every member takes part)
        step = (True, _as3(params), _as3(grads),
                _as3(st[0].detach().numpy() for st in optimizer.state),
                _f32(hps["policy_lr"]), _f32(hps["max_grad_norm"]),
                torch.isfinite(terms["loss"]).numpy(), rule.alpha, rule.eps, norms, finite)
        self._backward(mb, params, g_logits, g_values, grads, step)
        return terms, torch.from_numpy(norms), torch.from_numpy(finite)

    def _losses(self, mb: Minibatch, entropy_coef: torch.Tensor, value_coef: torch.Tensor
                ) -> tuple[Terms, np.ndarray, np.ndarray]:
        """The loss terms (per-member means) and the loss's gradients with respect to the
        rollout's logits and values."""
        _, _, logits, v = self._cache
        n = mb.n_rows
        g_logits = np.empty_like(logits)
        adv = mb.adv.numpy().astype(_F, copy=False)
        ent_c = _f32(entropy_coef)
        pg, ent = kernels.categorical_policy_grad(
            logits, np.ascontiguousarray(mb.actions.numpy()).astype(np.int64, copy=False),
            adv / _F(n), ent_c / _F(n), g_logits)
        err = v - mb.returns.numpy()
        v_loss = (err * err).sum(axis=1) / _F(n)
        v_c = _f32(value_coef)
        g_values = ((_F(2.0 / n) * v_c)[:, None] * err).astype(_F)
        ent = ent / _F(n)
        terms = {"pg": pg, "ent": ent, "v": v_loss, "loss": pg - ent_c * ent + v_c * v_loss}
        return ({k: torch.from_numpy(np.asarray(t, dtype=_F)) for k, t in terms.items()},
                g_logits, g_values)

    def _backward(self, mb: Minibatch, params: tuple[np.ndarray, ...], g_logits: np.ndarray,
                  g_values: np.ndarray, grads: tuple[np.ndarray, ...],
                  step: tuple[Any, ...]) -> None:
        h1, h2, _, _ = self._cache
        backward(np.ascontiguousarray(mb.obs.numpy()), self.scale, params, h1, h2, g_logits,
                 g_values, grads, (*self._work(mb.n_rows), *self._offsets), step)

    def _work(self, n: int) -> tuple[Any, ...]:
        """:func:`backward`'s buffers (kept: a fresh half-megabyte per member and update
        cost page faults)."""
        if self._buffers is None or self._buffers[1].shape[0] < n:
            n_taps, n_o, n_pos, n_feat, n_units, n_act, n_pixels = self._dims
            self._buffers = (np.empty((n_units, n_feat), _F), np.empty((n, n_units), _F),
                             np.empty((n, n_feat), _F), np.empty((n_taps, n_o), _F),
                             np.empty((n, n_pos * n_o), _F), np.empty((n_act, n_units), _F),
                             np.empty((n_act, n_units), _F), np.empty(n_units, _F),
                             np.empty(n_units, _F), np.empty((n, n_pixels), _F))
        return self._buffers

    def _member_grads(self, params: tuple[np.ndarray, ...]
                      ) -> tuple[np.ndarray, ...]:
        """Gradient arrays for one member (``[1, ...]``): with the step fused, a member's
        gradients are used up before the next member's are written, and one buffer that
        stays in cache spares writing and reading back, per member, a gradient the size
        of its weights."""
        if self._member_bufs is None or self._member_bufs[0].shape[1:] != params[0].shape[1:]:
            self._member_bufs = tuple(np.zeros((1, *p.shape[1:]), _F) for p in params)
        return self._member_bufs

    def _grads(self, params: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Gradient arrays, reused from update to update while the learners stay the same
        (the optimizer step reads them before the next update writes them)."""
        if self._grad_arrays is None or self._grad_arrays[0].shape != params[0].shape:
            self._grad_arrays = tuple(np.empty_like(p) for p in params)
        return self._grad_arrays


register_acceleration(accepts, CompiledCNNUpdate)


def rollout_player(trainer: _Trainer) -> Player | None:
    """The trainer's rollouts by :func:`play`, where its updater is
    :class:`CompiledCNNUpdate`, its games run compiled and its observations go to the
    network as the games give them (no normalization); else None. The same bits as the
    trainer's step-by-step ``play`` (the same passes, draws and games, in another order:
    each member's weights are read once a rollout, not once a step; tested)."""
    env, updater = trainer.env, trainer.updater
    if not (isinstance(updater, CompiledCNNUpdate) and isinstance(env, MinAtarPopulation)
            and env.compiled_games is not None and not trainer.normalizer.active
            and trainer.obs.dtype == np.uint8 and not trainer.ppo):  # (PPO needs log pi)
        return None
    games, action_set = env.compiled_games, np.ascontiguousarray(env.action_set, np.int64)

    def player(ro: Any, draws: np.ndarray) -> list[tuple[np.ndarray, Step]]:
        member = np.full(trainer.n_mem, -1, np.int64)
        member[trainer.alive] = np.arange(len(trainer.alive))
        actions, nxt, final, rewards, ends = updater.play_rollout(trainer.obs, draws, member,
                                                                  games, action_set)
        no_truncation = np.zeros(rewards.shape[1:], np.bool_)
        return [(actions[t], Step(obs=nxt[t], reward=rewards[t], terminated=ends[t],
                                  truncated=no_truncation, final_obs=final[t]))
                for t in range(len(actions))]

    return player
