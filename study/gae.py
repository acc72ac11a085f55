"""Generalized Advantage Estimation (Schulman et al. 2016) over a rollout.

For a rollout of length T (arrays shaped ``[T, ...]``):

    delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
    A_t     = delta_t + gamma * lam * (1 - dones_t) * A_{t+1},   A_T = 0

``next_values[t]`` is V of the true next observation: the final observation of the episode
when it ended at step t. A time-limit truncation therefore bootstraps from V(final obs),
a termination does not (the ``1 - terminated`` factor), and ``1 - dones`` (done =
terminated or truncated) stops the recursion so nothing leaks across episode boundaries.
lam = 0 gives the one-step TD error; lam = 1 gives the discounted return, bootstrapped at
truncations and at the end of the rollout, minus V.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from study import kernels

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def gae_advantages(
    rewards: Array,
    values: Array,
    next_values: Array,
    terminated: Array,
    dones: Array,
    gamma: float | Array,
    lam: float | Array,
) -> Array:
    """GAE advantages shaped like ``rewards`` (NumPy in, NumPy out; torch in, torch out).

    ``gamma`` and ``lam`` are floats or arrays broadcastable to one time slice
    ``rewards[t]`` (e.g. per-member values shaped ``[S, 1]`` for rewards ``[T, S, E]``).
    ``terminated`` and ``dones`` may be bool or float.
    """
    if _fast_path(rewards):
        return _gae_kernel(rewards, values, next_values, terminated, dones, gamma, lam)
    return _gae_vectorized(rewards, values, next_values, terminated, dones, gamma, lam)


def _gae_vectorized(rewards, values, next_values, terminated, dones, gamma, lam):
    """The recursion with one vectorized operation per time step (any dtype or device)."""
    if isinstance(rewards, torch.Tensor):
        dtype = rewards.dtype

        def as_float(x):
            return torch.as_tensor(x, device=rewards.device).to(dtype)

        advantages = torch.zeros_like(rewards)
    else:
        dtype = np.result_type(rewards.dtype, np.float32)

        def as_float(x):
            return np.asarray(x).astype(dtype)

        advantages = np.zeros(rewards.shape, dtype=dtype)

    rewards_f, values_f, next_f = as_float(rewards), as_float(values), as_float(next_values)
    not_term = 1 - as_float(terminated)
    not_done = 1 - as_float(dones)
    gamma_f, lam_f = as_float(gamma), as_float(lam)

    deltas = rewards_f + gamma_f * not_term * next_f - values_f
    last = deltas[0] * 0
    for t in range(rewards.shape[0] - 1, -1, -1):
        last = deltas[t] + gamma_f * lam_f * not_done[t] * last
        advantages[t] = last
    return advantages


def _fast_path(rewards: Array) -> bool:
    if isinstance(rewards, torch.Tensor):
        return rewards.dtype == torch.float32 and rewards.device.type == "cpu" and rewards.dim() > 1
    return rewards.dtype == np.float32 and rewards.ndim > 1


def _gae_kernel(rewards, values, next_values, terminated, dones, gamma, lam):
    """The recursion above as one compiled loop (float32 CPU inputs): same operations in
    the same order, so the same bits, in a fraction of the time of T vectorized steps."""
    is_torch = isinstance(rewards, torch.Tensor)
    as_np = (lambda x: x.detach().numpy()) if is_torch else np.asarray
    shape = tuple(rewards.shape)
    n_steps = shape[0]

    def flat(x, dtype):
        x = np.broadcast_to(as_np(x) if isinstance(x, torch.Tensor | np.ndarray) else x, shape)
        return np.ascontiguousarray(x, dtype=dtype).reshape(n_steps, -1)

    def per_slice(x):
        x = as_np(x) if isinstance(x, torch.Tensor | np.ndarray) else np.float32(x)
        return np.ascontiguousarray(np.broadcast_to(x, shape[1:]), dtype=np.float32).reshape(-1)

    out = np.empty((n_steps, int(np.prod(shape[1:]))), dtype=np.float32)
    kernels.gae_(
        flat(rewards, np.float32), flat(values, np.float32), flat(next_values, np.float32),
        flat(terminated, np.float32), flat(dones, np.float32), per_slice(gamma),
        per_slice(lam), out,
    )  # fmt: skip
    out = out.reshape(shape)
    return torch.from_numpy(out) if is_torch else out
