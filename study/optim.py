"""Per-member optimizers for stacked parameters, and per-member gradient clipping.

Each member has its own learning rate, optimizer state and clipping threshold; updates are
computed for all members at once. Formulas follow ``torch.optim`` exactly (RMSprop without
momentum or centering; Adam with bias correction), with the member axis first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[S]`` vector to broadcast against a ``[S, ...]`` tensor."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def member_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients of each member: ``sqrt(sum_p ||g_p[s]||^2)`` -> ``[S]``."""
    norms = [torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


def clip_coefficients(norm: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` per member, as ``clip_grad_norm_``; inf disables."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


class MemberOptimizer:
    """RMSprop (alpha 0.99, eps 1e-5, as SB3's A2C) or Adam (betas 0.9/0.999, eps 1e-8).

    Updates parameters and state in place. A member whose learning rate is 0 keeps its
    parameters exactly (the update is ``0 * finite``); the trainer uses that to freeze a
    member whose gradients came out non-finite.
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor]) -> None:
        self.kind = kind
        self.t = 0
        if kind == "rmsprop":
            self.alpha, self.eps = 0.99, 1e-5
            self.state = [[torch.zeros_like(p)] for p in params]
        elif kind == "adam":
            self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
            self.state = [[torch.zeros_like(p), torch.zeros_like(p)] for p in params]
        else:
            raise ValueError(f"unknown optimizer {kind!r}")

    @torch.no_grad()
    def step(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: torch.Tensor
    ) -> None:
        """One step for every member, with per-member learning rates ``lr [S]``."""
        self.t += 1
        for p, g, st in zip(params, grads, self.state, strict=True):
            lr_p = _per_member(lr, p)
            if self.kind == "rmsprop":
                sq = st[0].mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
                p.addcdiv_(g, sq.sqrt().add_(self.eps).div_(lr_p), value=-1.0)
            else:
                m = st[0].mul_(self.beta1).add_(g, alpha=1 - self.beta1)
                v = st[1].mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                bc1 = 1 - self.beta1**self.t
                bc2 = 1 - self.beta2**self.t
                denom = v.sqrt().div_(bc2**0.5).add_(self.eps).div_(lr_p / bc1)
                p.addcdiv_(m, denom, value=-1.0)

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.state = [[s[idx] for s in st] for st in self.state]
