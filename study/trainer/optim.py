"""Per-member optimizers for stacked parameters, with per-member gradient clipping.

Each member has its own learning rate, optimizer state and clipping threshold; a step is
one fused pass over all members' weights (study.trainer.kernels). Formulas follow ``torch.optim``
(RMSprop without momentum or centering; Adam with bias correction) after
``clip_grad_norm_``, with the member axis first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from study.trainer import kernels


def kernel_view(a: np.ndarray) -> np.ndarray:
    """The kernels' ``[S, a, b]`` view of an ``[S, ...]`` array: itself if 3-D, else
    ``[S, 1, n]``."""
    return a if a.ndim == 3 else a.reshape(a.shape[0], 1, -1)


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
        out.append(kernel_view(t.numpy()))
    return tuple(out)


class UpdateRule:
    """One optimizer's per-element rule, registered by name (:func:`register_rule`).

    ``n_state`` state tensors shaped like each parameter; :meth:`kernel_step` is the fused
    CPU float32 step over all members (clip, update, finiteness), :meth:`torch_update` the
    same rule in torch operations (other devices and dtypes, and the reference the kernel
    is tested against) for gradients already clipped.
    """

    n_state = 0

    def kernel_step(
        self, p: tuple[np.ndarray, ...], g: tuple[np.ndarray, ...],
        state: list[tuple[np.ndarray, ...]], t: np.ndarray, lr: np.ndarray,
        max_norm: np.ndarray, ok: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clip and step every member in place: (pre-clip norms, finite after the step)."""
        raise NotImplementedError

    def torch_update(self, g: torch.Tensor, state: list[torch.Tensor], keep: torch.Tensor,
                     lr: torch.Tensor, t: np.ndarray) -> torch.Tensor:
        """The step to subtract from a parameter, for clipped gradient ``g``; the state is
        updated in place where ``keep`` (``lr``: per member, broadcast like ``g``)."""
        raise NotImplementedError


#: name -> update rule (the values the ``policy_optimizer`` and ``value_optimizer`` keys allow)
RULES: dict[str, UpdateRule] = {}


def register_rule(name: str) -> Callable[[type[UpdateRule]], type[UpdateRule]]:
    """Class decorator: register an :class:`UpdateRule` under ``name``."""

    def add(cls: type[UpdateRule]) -> type[UpdateRule]:
        RULES[name] = cls()
        return cls

    return add


@register_rule("rmsprop")
class RMSprop(UpdateRule):
    """``torch.optim.RMSprop`` without momentum or centering (alpha 0.99, eps 1e-5, as SB3's
    A2C): ``v <- a v + (1 - a) g^2``, ``p <- p - lr g / (sqrt(v) + eps)``."""

    n_state = 1
    alpha, eps = 0.99, 1e-5

    def kernel_step(self, p: tuple[np.ndarray, ...], g: tuple[np.ndarray, ...],
                    state: list[tuple[np.ndarray, ...]], t: np.ndarray, lr: np.ndarray,
                    max_norm: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kernels.rmsprop_step(p, g, state[0], lr, max_norm, ok, self.alpha, self.eps)

    def torch_update(self, g: torch.Tensor, state: list[torch.Tensor], keep: torch.Tensor,
                     lr: torch.Tensor, t: np.ndarray) -> torch.Tensor:
        sq = state[0].mul(self.alpha).addcmul_(g, g, value=1 - self.alpha)
        state[0].copy_(torch.where(keep, sq, state[0]))
        return g / (sq.sqrt() + self.eps) * lr


@register_rule("adam")
class Adam(UpdateRule):
    """``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8) with bias correction by each
    member's own step count."""

    n_state = 2
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def kernel_step(self, p: tuple[np.ndarray, ...], g: tuple[np.ndarray, ...],
                    state: list[tuple[np.ndarray, ...]], t: np.ndarray, lr: np.ndarray,
                    max_norm: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kernels.adam_step(p, g, state[0], state[1], t, lr, max_norm, ok, self.beta1,
                                 self.beta2, self.eps)

    def torch_update(self, g: torch.Tensor, state: list[torch.Tensor], keep: torch.Tensor,
                     lr: torch.Tensor, t: np.ndarray) -> torch.Tensor:
        m = state[0].mul(self.beta1).add_(g, alpha=1 - self.beta1)
        v = state[1].mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        state[0].copy_(torch.where(keep, m, state[0]))
        state[1].copy_(torch.where(keep, v, state[1]))
        steps = torch.from_numpy(t).to(g.device, torch.float64)
        shape = (-1, *([1] * (g.dim() - 1)))
        bc1 = (1 - self.beta1**steps).to(g.dtype).reshape(shape)
        bc2 = (1 - self.beta2**steps).to(g.dtype).reshape(shape)
        return m / (v.sqrt() / bc2**0.5 + self.eps) * (lr / bc1)


class MemberOptimizer:
    """The registered update rule ``kind`` (:data:`RULES`: RMSprop, Adam) for a population.

    :meth:`step` clips each member's gradient to its own maximum norm and updates the
    parameters and state in place. A member whose loss or gradient is not finite takes no
    step; one whose step leaves a parameter non-finite is reported, so the trainer can
    freeze it.
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor]) -> None:
        if kind not in RULES:
            raise ValueError(f"unknown optimizer {kind!r}: expected one of {sorted(RULES)}")
        self.kind, self.rule = kind, RULES[kind]
        n = params[0].shape[0] if params else 0
        # Steps taken, per member: a member that sits a step out (PPO's target_kl) keeps
        # its own Adam bias correction.
        self.t = np.zeros(n, dtype=np.int64)
        self.state = [[torch.zeros_like(p.detach()) for _ in range(self.rule.n_state)]
                      for p in params]

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
        if not params:
            return torch.zeros_like(lr), loss_finite.clone()
        self.t += 1 if active is None else active.cpu().numpy().astype(np.int64)
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
        state = [_arrays([st[i] for st in self.state]) for i in range(self.rule.n_state)]
        norms, ok = self.rule.kernel_step(p_np, g_np, state, self.t, lr_np, mx_np, ok_np)
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
            update = self.rule.torch_update(g, st, keep, per_member(lr, p), self.t)
            p.copy_(torch.where(keep, p - update, p))
            ok &= torch.isfinite(p.flatten(1)).all(dim=1)
        return norm, ok & stepping

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.state = [[s[idx] for s in st] for st in self.state]
        if self.t.size:  # (no per-member counts without parameters: a shared trunk's
            self.t = self.t[idx.cpu().numpy()]  # value optimizer)
