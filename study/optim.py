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

    ``step`` returns the new parameters rather than mutating them, so the caller can keep
    the old values for members whose update came out non-finite (divergence).
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

    def step(
        self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Proposed ``(new_params, new_state)``; commit with :meth:`commit`."""
        self.t += 1
        new_params, new_state = [], []
        for p, g, st in zip(params, grads, self.state, strict=True):
            lr_p = _per_member(lr, p)
            if self.kind == "rmsprop":
                sq = st[0] * self.alpha + (1 - self.alpha) * g * g
                new_params.append(p - lr_p * g / (sq.sqrt() + self.eps))
                new_state.append([sq])
            else:
                m = st[0] * self.beta1 + (1 - self.beta1) * g
                v = st[1] * self.beta2 + (1 - self.beta2) * g * g
                bc1 = 1 - self.beta1**self.t
                bc2 = 1 - self.beta2**self.t
                denom = v.sqrt() / (bc2**0.5) + self.eps
                new_params.append(p - (lr_p / bc1) * m / denom)
                new_state.append([m, v])
        return new_params, new_state

    def commit(self, new_state: list[list[torch.Tensor]], keep: torch.Tensor) -> None:
        """Accept the proposed state for members where ``keep`` ([S] bool) is true."""
        for st, new in zip(self.state, new_state, strict=True):
            for i in range(len(st)):
                st[i] = torch.where(_per_member(keep, st[i]), new[i], st[i])

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.state = [[s[idx] for s in st] for st in self.state]
