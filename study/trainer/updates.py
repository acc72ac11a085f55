"""How a population's gradients are computed: the autograd reference and its accelerations.

The trainer (study.trainer.population) asks an *update* object for four things, in this order in
every update: the policy outputs of each rollout step (:meth:`AutogradUpdate.rollout_pass`),
the state values V(s_0 .. s_T) of the rollout (:meth:`~AutogradUpdate.state_values`), and
the gradients of the policy and value losses over a minibatch
(:meth:`~AutogradUpdate.policy_gradients`, :meth:`~AutogradUpdate.value_gradients`; A2C's
policy step through :meth:`~AutogradUpdate.policy_step`, which an acceleration may fuse
with the optimizer's step).

:class:`AutogradUpdate` is the reference: autograd over the stacked weights, for any
network and loss. An acceleration computes the same quantities faster for the networks it
serves, and is registered with :func:`register_acceleration`; :func:`make_update` picks
the first whose predicate accepts the network. :class:`AcceleratedMLPUpdate` serves
separate MLPs on flat observations (hand-written gradients, fused kernels, the rollout's
forward passes reused by the update); tests/test_networks.py checks it against the
reference (close, not bit-identical: sums run in other orders).

Losses are per-member means over the rows of a minibatch, summed over members, so each
member's gradient is that of its own loss. Terms returned are ``[S]`` per-member means:
``pg`` (policy gradient loss), ``ent`` (entropy), ``v`` (value loss) and ``loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from study.hyperparameters import Structure
from study.trainer.nets import Prepared, backward, forward_cached
from study.trainer.networks import ActorCritic
from study.trainer.optim import MemberOptimizer

__all__ = ["CHUNK_ROWS", "AcceleratedMLPUpdate", "AutogradUpdate", "Minibatch",
           "clipped_value_error", "make_update", "ppo_surrogate", "register_acceleration"]

# Rows per chunk when a loss is evaluated over a large batch: gradients are accumulated
# chunk by chunk so activations stay in cache (2-3x faster on 32k-sample batches). It
# depends only on the batch size, never on the population, so members stay bit-identical.
CHUNK_ROWS = 1024


@dataclass
class Minibatch:
    """Rows of the rollout for one gradient step, ``[S, B, ...]`` per learner; ``full``
    when they are the whole rollout in its own order (no shuffling). PPO's also carry the
    rollout's log-probabilities of the actions and its values."""

    obs: torch.Tensor
    actions: torch.Tensor
    adv: torch.Tensor
    returns: torch.Tensor
    full: bool
    old_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.adv.shape[1]


Terms = dict[str, torch.Tensor]
#: ``(values, a, b) -> [S, b - a]`` squared value errors of rows a:b.
ValueError_ = Callable[[torch.Tensor, int, int], torch.Tensor]


def chunked_gradients(terms_fn: Callable[[int, int], Terms], params: list[torch.Tensor],
                      n_rows: int, chunk_rows: int | None = None
                      ) -> tuple[Terms, list[torch.Tensor]]:
    """Per-member means of the terms ``terms_fn(a, b)`` returns (sums over rows a:b, each
    ``[S]``) over ``n_rows`` rows, and the gradients of the mean of ``terms["loss"]``, by
    autograd over chunks of ``chunk_rows`` rows (default :data:`CHUNK_ROWS`)."""
    total: Terms = {}
    grads: list[torch.Tensor] | None = None
    chunk = chunk_rows or CHUNK_ROWS
    for a in range(0, n_rows, chunk):
        terms = terms_fn(a, min(a + chunk, n_rows))
        terms = {k: v / n_rows for k, v in terms.items()}
        raw = torch.autograd.grad(terms["loss"].sum(), params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, raw, strict=True)]
        grads = g if grads is None else [x + y for x, y in zip(grads, g, strict=True)]
        for k, v in terms.items():
            total[k] = v.detach() if k not in total else total[k] + v.detach()
    assert grads is not None
    return total, grads


def manual_chunks(fn: Callable[[int, int], tuple[Terms, list[torch.Tensor]]], n_rows: int
                  ) -> tuple[Terms, list[torch.Tensor]]:
    """Accumulate the terms and gradients ``fn(a, b)`` returns over row chunks."""
    total: Terms = {}
    grads: list[torch.Tensor] = []
    for a in range(0, n_rows, CHUNK_ROWS):
        terms, g = fn(a, min(a + CHUNK_ROWS, n_rows))
        grads = g if not grads else [x.add_(y) for x, y in zip(grads, g, strict=True)]
        total = terms if not total else {k: total[k] + v for k, v in terms.items()}
    return total, grads


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1, keepdim. Built on ``sum``: torch's ``var``/``std`` kernels pick a
    reduction order that depends on the number of rows (members), ``sum`` does not."""
    return x.sum(dim=1, keepdim=True) / x.shape[1]


def row_var(x: torch.Tensor, correction: int = 0) -> torch.Tensor:
    """Two-pass variance over dim 1 (keepdim), population-independent (see row_mean)."""
    return ((x - row_mean(x)) ** 2).sum(dim=1, keepdim=True) / (x.shape[1] - correction)


def normalized(adv: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """``(A - mean) / (std + 1e-8)`` per member (unbiased std) for the members ``which``."""
    if adv.shape[1] < 2:
        return adv
    normed = (adv - row_mean(adv)) / (row_var(adv, correction=1).sqrt() + 1e-8)
    return torch.where(which[:, None], normed, adv)


def ppo_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                  clip_range: torch.Tensor, with_weight: bool = False) -> Any:
    """PPO's clipped surrogate (Schulman et al. 2017), row sums per member:

        r = exp(log pi(a|s) - log pi_old(a|s)),
        pg = -min(r A, clip(r, 1 - c, 1 + c) A),
        approx_kl = (r - 1) - log r   (an unbiased, non-negative KL(pi_old || pi) estimate),
        clip_fraction = [|r - 1| > c].

    ``with_weight`` also returns ``-d pg / d log pi`` per row: ``A r`` where the unclipped
    term is the smaller (ties included), else 0 (for hand-written gradients).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    c = clip_range[:, None]
    clipped = torch.minimum(torch.maximum(ratio, 1.0 - c), 1.0 + c)
    unclipped, bounded = ratio * adv, clipped * adv
    surrogate = torch.minimum(unclipped, bounded)
    with torch.no_grad():
        kl = ((ratio - 1.0) - log_ratio).sum(dim=1)
        fraction = ((ratio - 1.0).abs() > c).to(ratio.dtype).sum(dim=1)
    terms = {"pg": -surrogate.sum(dim=1), "approx_kl": kl, "clip_fraction": fraction}
    if not with_weight:
        return terms
    return terms, torch.where(unclipped <= bounded, unclipped, 0.0)


def clipped_value_error(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                        clip_range_vf: torch.Tensor) -> torch.Tensor:
    """``(V' - R)^2`` with ``V' = V_old + clip(V - V_old, -c, c)`` (SB3's value clipping;
    V itself where c is infinite, i.e. no clipping)."""
    c = clip_range_vf[:, None]
    clipped = old_values + torch.maximum(torch.minimum(values - old_values, c), -c)
    pred = torch.where(torch.isinf(c), values, clipped)
    return (pred - returns) ** 2


class AutogradUpdate:
    """The reference: every gradient by autograd over the stacked weights."""

    def __init__(self, agent: ActorCritic, hp: Structure) -> None:
        self.agent = agent
        self._values: list[torch.Tensor] = []

    def begin_rollout(self, n_learners: int, n_steps: int, n_envs: int) -> None:
        """Called before each rollout."""
        self._values = []

    @torch.no_grad()
    def rollout_pass(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Policy outputs ``[S, E, ...]`` for the observations ``x`` of rollout step t."""
        if self.agent.values_in_rollout:
            out, v = self.agent.policy_and_values(x)
            self._values.append(v)
            return out
        return self.agent.policy_out(x)

    @torch.no_grad()
    def values(self, obs: torch.Tensor) -> torch.Tensor:
        """V ``[S, B]`` of observations ``[S, B, ...]`` (the bootstrap of truncations)."""
        return self.agent.values(obs)

    @torch.no_grad()
    def state_values(self, obs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """V(s_0 .. s_T) ``[S, (T + 1) * E]`` of the rollout's observations ``obs``
        ``[S, T * E, ...]`` followed by the observations after it, ``last``."""
        if self.agent.values_in_rollout:
            return torch.cat([*self._values, self.agent.values(last)], dim=1)
        return self.agent.values(torch.cat([obs, last], dim=1))

    def policy_gradients(self, mb: Minibatch, entropy_coef: torch.Tensor,
                         value_coef: torch.Tensor) -> tuple[Terms, list[torch.Tensor]]:
        """A2C's policy loss ``pg - c_ent * ent`` with ``pg = -A log pi(a|s)`` (plus
        ``c_v (V(s) - R)^2`` with a shared trunk)."""
        return self._policy_loss(
            mb, lambda logp, a, b: {"pg": -(logp * mb.adv[:, a:b]).sum(dim=1)},
            lambda values, a, b: (values - mb.returns[:, a:b]) ** 2, entropy_coef, value_coef)

    def policy_step(self, mb: Minibatch, hps: Mapping[str, torch.Tensor],
                    optimizer: MemberOptimizer) -> tuple[Terms, torch.Tensor, torch.Tensor]:
        """:meth:`policy_gradients` and the optimizer's clipped step with them; returns the
        terms, the pre-clip gradient norms and whether each member stepped to finite
        weights (an acceleration may fuse the two, member by member)."""
        terms, grads = self.policy_gradients(mb, hps["entropy_coef"], hps["value_coef"])
        norm, finite = optimizer.step(self.agent.policy_params(), grads, hps["policy_lr"],
                                      hps["max_grad_norm"], torch.isfinite(terms["loss"]))
        return terms, norm, finite

    def value_gradients(self, mb: Minibatch, value_coef: torch.Tensor
                        ) -> tuple[Terms, list[torch.Tensor]]:
        """Value loss ``c_v * (V(s) - R)^2`` of separate value networks."""
        return self._value_loss(mb, lambda values, a, b: (values - mb.returns[:, a:b]) ** 2,
                                value_coef)

    def ppo_policy_gradients(self, mb: Minibatch, hps: Mapping[str, torch.Tensor]
                             ) -> tuple[Terms, list[torch.Tensor]]:
        """PPO's policy loss ``pg - c_ent * ent`` (:func:`ppo_surrogate`; plus
        ``c_v`` times the clipped value error with a shared trunk), advantages normalised
        per minibatch where asked (as SB3 and CleanRL do)."""
        assert mb.old_logp is not None
        old_logp = mb.old_logp
        adv = normalized(mb.adv, hps["normalize_advantage"] > 0)
        return self._policy_loss(
            mb, lambda logp, a, b: ppo_surrogate(logp, old_logp[:, a:b], adv[:, a:b],
                                                 hps["clip_range"]),
            self._ppo_value_error(mb, hps), hps["entropy_coef"], hps["value_coef"])

    def ppo_value_gradients(self, mb: Minibatch, hps: Mapping[str, torch.Tensor]
                            ) -> tuple[Terms, list[torch.Tensor]]:
        """PPO's value loss of separate value networks, ``c_v`` times the clipped error."""
        return self._value_loss(mb, self._ppo_value_error(mb, hps), hps["value_coef"])

    @staticmethod
    def _ppo_value_error(mb: Minibatch, hps: Mapping[str, torch.Tensor]) -> ValueError_:
        assert mb.old_values is not None
        old = mb.old_values
        return lambda values, a, b: clipped_value_error(values, old[:, a:b], mb.returns[:, a:b],
                                                        hps["clip_range_vf"])

    def _policy_loss(self, mb: Minibatch, pg_terms: Callable[[torch.Tensor, int, int], Terms],
                     value_error: ValueError_, entropy_coef: torch.Tensor,
                     value_coef: torch.Tensor) -> tuple[Terms, list[torch.Tensor]]:
        """Gradients of ``pg - c_ent * ent`` (+ ``c_v * value_error`` with a shared trunk)
        with respect to the policy's parameters; ``pg_terms(log pi(a|s), a, b)`` gives
        ``pg`` (and any other terms) of rows a:b."""
        agent = self.agent

        def terms(a: int, b: int) -> Terms:
            obs = mb.obs[:, a:b]
            if agent.share_trunk:
                out, values = agent.policy_and_values(obs)
            else:
                out = agent.policy_out(obs)
            logp, entropy = agent.log_prob_entropy(out, mb.actions[:, a:b])
            t = pg_terms(logp, a, b)
            t["ent"] = entropy.sum(dim=1)
            t["loss"] = t["pg"] - entropy_coef * t["ent"]
            if agent.share_trunk:
                t["v"] = value_error(values, a, b).sum(dim=1)
                t["loss"] = t["loss"] + value_coef * t["v"]
            return t

        return chunked_gradients(terms, agent.policy_params(), mb.n_rows, agent.chunk_rows)

    def _value_loss(self, mb: Minibatch, value_error: ValueError_, value_coef: torch.Tensor
                    ) -> tuple[Terms, list[torch.Tensor]]:
        agent = self.agent

        def terms(a: int, b: int) -> Terms:
            v = value_error(agent.values(mb.obs[:, a:b]), a, b).sum(dim=1)
            return {"v": v, "loss": value_coef * v}

        return chunked_gradients(terms, agent.value_params(), mb.n_rows, agent.chunk_rows)


class AcceleratedMLPUpdate(AutogradUpdate):
    """Separate MLPs on flat observations: hand-written gradients
    (:meth:`ActorCritic.policy_grads`, :meth:`ActorCritic.value_grads`). With one policy
    step on a small whole batch, the rollout's policy passes keep their activations
    (member-major, contiguous) and are that step's forward pass; with one value step, the
    pass that computes V(s_0 .. s_T) is that step's forward pass."""

    def __init__(self, agent: ActorCritic, hp: Structure) -> None:
        super().__init__(agent, hp)
        n_mb = hp.n_minibatches
        n_batch = hp.num_envs * hp.n_steps
        a2c = hp.algorithm == "a2c"  # PPO's epochs change the weights: nothing to reuse
        self.reuse_policy = a2c and n_mb == 1 and n_batch <= CHUNK_ROWS
        self.fused_value = a2c and hp.value_iters * n_mb == 1 and n_batch <= CHUNK_ROWS
        self._net: Prepared | None = None
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._hidden: list[torch.Tensor] = []

    def begin_rollout(self, n_learners: int, n_steps: int, n_envs: int) -> None:
        super().begin_rollout(n_learners, n_steps, n_envs)
        self._outputs = []
        self._policy = Prepared(self.agent.pi)
        self._net = self._policy if self.reuse_policy else None
        # Hidden activations of the rollout's policy passes, member-major [S, T, E, width]:
        # member s's rows t * E + e are contiguous, ready for the gradient step.
        dev = self.agent.pi[0].device
        self._hidden = [torch.empty(n_learners, n_steps, n_envs, w.shape[2], device=dev)
                        for w, _, _ in (self._net.layers[:-1] if self._net else [])]

    def rollout_pass(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self._net is None:  # the same values as the policy's own forward pass, faster
            return forward_cached(x, self._policy, self.agent.activation)[0]
        out, cache = forward_cached(x, self._net, self.agent.activation, into=(self._hidden, t))
        self._outputs.append((out, cache[0]))
        return out

    def state_values(self, obs: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        v_all, cache = forward_cached(torch.cat([obs, last], dim=1), self.agent.v,
                                      self.agent.activation)
        if not self.fused_value:  # the value network's own pass, without autograd's costs
            return v_all.squeeze(-1)
        self._v_cache = cache
        self._v_all = v_all.squeeze(-1)
        return self._v_all

    def policy_gradients(self, mb: Minibatch, entropy_coef: torch.Tensor,
                         value_coef: torch.Tensor) -> tuple[Terms, list[torch.Tensor]]:
        agent = self.agent
        if self._net is not None and mb.full:
            n = mb.n_rows
            forward = (torch.cat([o for o, _ in self._outputs], dim=1),
                       [torch.cat([x for _, x in self._outputs], dim=1),
                        *(h.reshape(h.shape[0], n, -1) for h in self._hidden)])
            return agent.policy_grads(mb.obs, mb.actions, mb.adv, entropy_coef, n,
                                      forward=forward)
        return manual_chunks(lambda a, b: agent.policy_grads(
            mb.obs[:, a:b], mb.actions[:, a:b], mb.adv[:, a:b], entropy_coef, mb.n_rows),
            mb.n_rows)

    def value_gradients(self, mb: Minibatch, value_coef: torch.Tensor
                        ) -> tuple[Terms, list[torch.Tensor]]:
        agent = self.agent
        if self.fused_value and mb.full:  # the V(s_0 .. s_T) pass, without its s_T rows
            n = mb.n_rows
            err = self._v_all[:, :n] - mb.returns
            v_loss = (err * err).sum(dim=1) / n
            g_out = ((2.0 / n) * value_coef.reshape(-1, 1) * err).unsqueeze(-1)
            grads = backward(g_out, self._v_cache, agent.v, agent.activation)
            return {"v": v_loss, "loss": value_coef * v_loss}, grads
        return manual_chunks(lambda a, b: agent.value_grads(
            mb.obs[:, a:b], mb.returns[:, a:b], value_coef, mb.n_rows), mb.n_rows)


    def ppo_policy_gradients(self, mb: Minibatch, hps: Mapping[str, torch.Tensor]
                             ) -> tuple[Terms, list[torch.Tensor]]:
        """PPO's policy loss by the hand-written gradients: the surrogate's weight on
        d log pi is ``A r`` where the unclipped term is the smaller one, else 0."""
        agent = self.agent
        old_logp = mb.old_logp
        assert old_logp is not None
        adv = normalized(mb.adv, hps["normalize_advantage"] > 0)

        def chunk(a: int, b: int) -> tuple[Terms, list[torch.Tensor]]:
            def surrogate(logp: torch.Tensor) -> tuple[torch.Tensor, Terms]:
                t, weight = ppo_surrogate(logp, old_logp[:, a:b], adv[:, a:b],
                                          hps["clip_range"], with_weight=True)
                return weight, {k: v / mb.n_rows for k, v in t.items()}

            return agent.policy_grads(mb.obs[:, a:b], mb.actions[:, a:b], adv[:, a:b],
                                      hps["entropy_coef"], mb.n_rows, surrogate=surrogate)

        return manual_chunks(chunk, mb.n_rows)

    def ppo_value_gradients(self, mb: Minibatch, hps: Mapping[str, torch.Tensor]
                            ) -> tuple[Terms, list[torch.Tensor]]:
        agent = self.agent
        old_values = mb.old_values
        assert old_values is not None
        return manual_chunks(lambda a, b: agent.value_grads(
            mb.obs[:, a:b], mb.returns[:, a:b], hps["value_coef"], mb.n_rows,
            clip=(old_values[:, a:b], hps["clip_range_vf"])), mb.n_rows)


Accepts = Callable[[ActorCritic, Structure], bool]
_ACCELERATIONS: list[tuple[Accepts, type[AutogradUpdate]]] = []


def register_acceleration(accepts: Accepts, update: type[AutogradUpdate]) -> None:
    """Use ``update`` where ``accepts(network, hyperparameters)`` (tried in registration
    order)."""
    _ACCELERATIONS.append((accepts, update))


def make_update(agent: ActorCritic, hp: Structure) -> AutogradUpdate:
    """The first registered acceleration that accepts ``agent``, else the reference."""
    for accepts, update in _ACCELERATIONS:
        if accepts(agent, hp):
            return update(agent, hp)
    return AutogradUpdate(agent, hp)


register_acceleration(lambda agent, hp: agent.accelerated, AcceleratedMLPUpdate)
