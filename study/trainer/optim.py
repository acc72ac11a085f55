"""Per-member optimizers for stacked parameters, with per-member gradient clipping.

Each member has its own learning rate, optimizer state and clipping threshold; a step is
one fused pass over all members' weights (study.trainer.kernels). Formulas follow ``torch.optim``
(RMSprop without momentum or centering; Adam with bias correction) after
``clip_grad_norm_``, with the member axis first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from study.trainer import kernels


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
        n = params[0].shape[0] if params else 0
        # Steps taken, per member: a member that sits a step out (PPO's target_kl) keeps
        # its own Adam bias correction.
        self.t = np.zeros(n, dtype=np.int64)
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
        active: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped step for every member (``lr``, ``max_norm``, ``loss_finite``: ``[S]``)
        that is ``active`` (default: all; the others sit this step out, unchanged).

        Returns the pre-clip gradient norm of each member and whether it stepped to finite
        parameters (False also for an active member that took no step; True for inactive
        ones).
        """
        stepping = loss_finite if active is None else loss_finite & active
        self.t += 1 if active is None else active.cpu().numpy().astype(np.int64)
        if not params:
            return torch.zeros_like(lr), loss_finite.clone()
        norms, ok = self._step(params, grads, lr, max_norm, stepping)
        if active is not None:
            ok = ok | ~active
        return norms, ok

    def _step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        lr: torch.Tensor,
        max_norm: torch.Tensor,
        loss_finite: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if params[0].device.type != "cpu" or params[0].dtype != torch.float32:
            return self._torch_step(params, grads, lr, max_norm, loss_finite)
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

    def _torch_step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        lr: torch.Tensor,
        max_norm: torch.Tensor,
        loss_finite: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` in torch operations (other devices and dtypes; a reference)."""

        def per_member(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return v.reshape(-1, *([1] * (like.dim() - 1)))

        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        norm = torch.linalg.vector_norm(norms, dim=0)
        stepping = loss_finite & torch.isfinite(norm)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        coef = torch.where(stepping, coef, torch.zeros_like(coef))
        lr = torch.where(stepping, lr, torch.zeros_like(lr))
        ok = stepping.clone()
        for p, g, st in zip(params, grads, self.state, strict=True):
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) * per_member(coef, g)
            keep = per_member(stepping, p)
            if self.kind == "rmsprop":
                sq = st[0].mul(self.alpha).addcmul_(g, g, value=1 - self.alpha)
                st[0].copy_(torch.where(keep, sq, st[0]))
                update = g / (sq.sqrt() + self.eps) * per_member(lr, p)
            else:
                m = st[0].mul(self.beta1).add_(g, alpha=1 - self.beta1)
                v = st[1].mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                st[0].copy_(torch.where(keep, m, st[0]))
                st[1].copy_(torch.where(keep, v, st[1]))
                t = torch.from_numpy(self.t).to(p.device, torch.float64)
                bc1 = (1 - self.beta1**t).to(p.dtype)
                bc2 = (1 - self.beta2**t).to(p.dtype)
                update = m / (v.sqrt() / per_member(bc2, p)**0.5 + self.eps) * per_member(
                    lr / bc1, p)
            p.copy_(torch.where(keep, p - update, p))
            ok &= torch.isfinite(p.flatten(1)).all(dim=1)
        return norm, ok & stepping

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.state = [[s[idx] for s in st] for st in self.state]
        self.t = self.t[idx.cpu().numpy()]
