"""Per-member optimizers for stacked parameters, with per-member gradient clipping.

Each member has its own learning rate, optimizer state and clipping threshold; a step is
one fused pass over all members' weights (study.kernels). Formulas follow ``torch.optim``
(RMSprop without momentum or centering; Adam with bias correction) after
``clip_grad_norm_``, with the member axis first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from study import kernels


def _arrays(tensors: Sequence[torch.Tensor], copy_ok: bool = False) -> tuple[np.ndarray, ...]:
    """Float32 ``[S, a, b]`` NumPy views of ``[S, ...]`` tensors, which the kernels update in
    place; only with ``copy_ok`` (gradients) may a non-contiguous tensor be copied."""
    out = []
    for t in tensors:
        t = t.detach()
        if not t.is_contiguous():
            if not copy_ok:
                raise ValueError("optimizer state and parameters must be contiguous")
            t = t.contiguous()
        a = t.numpy()
        out.append(a if a.ndim == 3 else a.reshape(a.shape[0], 1, -1))
    return tuple(out)


class MemberOptimizer:
    """RMSprop (alpha 0.99, eps 1e-5, as SB3's A2C) or Adam (betas 0.9/0.999, eps 1e-8).

    :meth:`step` clips each member's gradient to its own maximum norm and updates the
    parameters and state in place. A member whose loss or gradient is not finite takes no
    step; one whose step leaves a parameter non-finite is reported, so the trainer can
    freeze it.
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor]) -> None:
        self.kind = kind
        self.t = 0
        if kind == "rmsprop":
            self.alpha, self.eps = 0.99, 1e-5
            self.state = [[torch.zeros_like(p.detach())] for p in params]
        elif kind == "adam":
            self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
            self.state = [[torch.zeros_like(p.detach()) for _ in range(2)] for p in params]
        else:
            raise ValueError(f"unknown optimizer {kind!r}")

    @torch.no_grad()
    def step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        lr: torch.Tensor,
        max_norm: torch.Tensor,
        loss_finite: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped step for every member (``lr``, ``max_norm``, ``loss_finite``: ``[S]``).

        Returns the pre-clip gradient norm of each member and whether it stepped to finite
        parameters (False also for a member that took no step).
        """
        self.t += 1
        if not params:
            n = lr.shape[0]
            return torch.zeros(n), loss_finite.clone()
        p_np = _arrays(params)
        g_np = _arrays(grads, copy_ok=True)
        lr_np = lr.detach().numpy().astype(np.float32, copy=False)
        mx_np = max_norm.detach().numpy().astype(np.float32, copy=False)
        ok_np = loss_finite.detach().numpy()
        if self.kind == "rmsprop":
            norms, ok = kernels.rmsprop_step(
                p_np, g_np, _arrays([s[0] for s in self.state]), lr_np, mx_np, ok_np,
                self.alpha, self.eps,
            )  # fmt: skip
        else:
            norms, ok = kernels.adam_step(
                p_np, g_np, _arrays([s[0] for s in self.state]),
                _arrays([s[1] for s in self.state]), self.t, lr_np, mx_np, ok_np,
                self.beta1, self.beta2, self.eps,
            )  # fmt: skip
        return torch.from_numpy(norms), torch.from_numpy(ok)

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.state = [[s[idx] for s in st] for st in self.state]
