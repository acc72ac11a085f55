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

from typing import Any, TypeVar

import numpy as np
import torch

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
    if isinstance(rewards, torch.Tensor):
        dtype = rewards.dtype

        def as_float(x: Any) -> Any:
            return torch.as_tensor(x, device=rewards.device).to(dtype)

        advantages = torch.zeros_like(rewards)
    else:
        dtype = np.result_type(rewards.dtype, np.float32)

        def as_float(x: Any) -> Any:
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
