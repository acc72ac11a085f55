"""A2C on compiled population environments as one compiled loop: no Python per step.

The population trainer (study.trainer.population) runs each update as Python calls over the
whole population: a rollout of ``n_steps`` vectorized steps, the targets, the gradients and
the optimizer steps. At everyday population sizes (one config, a few seeds) that Python and
torch's per-operation start-up cost most of the time. :class:`CompiledA2C` runs the same
updates member by member in one compiled call per log window: a member's rollout (policy
pass, sampling, environment step, episode book-keeping), its GAE targets, both networks'
gradients and both optimizer steps, with its weights, activations and optimizer state in
cache, then the next member.

The same bits as the trainer's own path, not merely close: every step is the arithmetic of
the kernel the trainer would call (study.trainer.kernels; the products and torch's sums
reproduced by study.trainer.compiled, their modes found by asking torch), in the same
order. tests/test_compiled.py trains with and without it and compares every curve value,
return and weight. It serves what it reproduces (:func:`accepts`): A2C with one minibatch
and one value step, separate tanh or relu MLPs, a discrete policy, no observation or reward
normalisation, on a compiled environment port (:data:`PORTS`: CartPole-v0 and v1); anything
else keeps the trainer's own path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numba
import numpy as np
import torch

from study.schema import UPDATE_METRICS
from study.trainer import kernels
from study.trainer.compiled import (
    ACTIVATIONS,
    BLOCKED,
    CompiledMLP,
    arrays,
    backward_member,
    backward_work,
    forward_member,
    torch_column_sums,
    torch_row_sum,
)
from study.trainer.envs import cartpole
from study.trainer.envs.cartpole import FastPopulationEnv
from study.trainer.kernels import JIT_OPTIONS
from study.trainer.numba_cache import drop_stale_cache
from study.trainer.optim import RULES
from study.trainer.rng import uniform_draw
from study.trainer.updates import CHUNK_ROWS, AcceleratedMLPUpdate
from study.trainer.views import borrowed, borrowed_list, view

if TYPE_CHECKING:
    from study.trainer.population import _Trainer

__all__ = ["CompiledA2C", "accepts"]


drop_stale_cache()

_F = np.float32
_RULE_IDS = {"rmsprop": 0, "adam": 1}  # the ``kind`` of _optimizer_step
#: Columns of the per-learner hyperparameter table the loop reads, and their indices.
_HP = ("policy_lr", "value_lr", "max_grad_norm", "value_max_grad_norm", "entropy_coef",
       "value_coef", "gamma", "lam")
_PI_LR, _V_LR, _PI_CLIP, _V_CLIP, _ENT_COEF, _V_COEF, _GAMMA, _LAM = range(len(_HP))
# Where each update metric goes (study.schema.UPDATE_METRICS' order).
_ENTROPY, _POLICY_LOSS, _VALUE_LOSS, _EXPLAINED_VARIANCE, _GRAD_NORM = (
    UPDATE_METRICS.index(name) for name in
    ("entropy", "policy_loss", "value_loss", "explained_variance", "grad_norm"))


class EnvArrays(NamedTuple):
    """The population environment's and the action streams' state the loop advances."""

    state: np.ndarray  # [C, S, E] float64
    elapsed: np.ndarray  # [S, E] steps since reset
    resets: np.ndarray  # [S, E] uint64 number of each env's next reset
    reset_keys: np.ndarray  # [S] uint64
    n_draws: int  # uniforms per reset
    max_steps: int  # time limit
    act_keys: np.ndarray  # [S] uint64
    act_counters: np.ndarray  # [S] uint64


class Book(NamedTuple):
    """Episode book-keeping (``kernels.record_step_``'s running sums), per member."""

    ep_ret: np.ndarray
    ep_len: np.ndarray
    last_ret: np.ndarray
    ret_sum: np.ndarray
    len_sum: np.ndarray
    ep_count: np.ndarray
    final_sum: np.ndarray
    final_count: np.ndarray


class Rollout(NamedTuple):
    """One member's rollout buffers (reused member after member)."""

    x_all: np.ndarray  # [T * E + E, D] observations, then the ones after the rollout
    pi_hidden: np.ndarray  # the policy's activations (compiled.forward_member's layout)
    logits: np.ndarray  # [T * E, A]
    actions: np.ndarray  # [T, E]
    final_obs: np.ndarray  # [T * E, D] the observation each step ended in
    rewards: np.ndarray  # [T, 1, E]
    terminated: np.ndarray  # [T, 1, E]
    dones: np.ndarray  # [T, 1, E]
    draws: np.ndarray  # [T, E] the action draws
    step: tuple[np.ndarray, np.ndarray, np.ndarray]  # [1, E] a step's terminations,
    #   truncations and rewards
    reset: tuple[np.ndarray, np.ndarray]  # a reset's uniforms, its state [C]


class Values(NamedTuple):
    """One member's value-pass buffers."""

    hidden: np.ndarray  # activations of V(s_0 .. s_T)'s pass
    v_all: np.ndarray  # [T * E + E] V(s_0 .. s_T)
    v_final: np.ndarray  # [T * E] V(final obs)
    final_hidden: np.ndarray  # activations of that pass


class Plans(NamedTuple):
    """Product modes (compiled.CompiledMLP) of every pass of the loop."""

    pi_forward: np.ndarray
    v_forward: np.ndarray
    v_final: np.ndarray
    pi_backward: tuple[np.ndarray, np.ndarray]
    v_backward: tuple[np.ndarray, np.ndarray]


#: The compiled environment ports (``FastPopulationEnv.compiled_port``). A fixed list
#: rather than functions passed in: numba caches a compiled function only when everything
#: it calls is known when it compiles. A port must never return a non-finite observation
#: or reward (the loop does not note environment faults as the trainer does; CartPole's
#: state stays bounded because its episodes end first).
PORTS = {"cartpole": 0}


@numba.njit(**JIT_OPTIONS)
def _env_step(port, state, actions, terminated, reward):
    if port == 0:
        cartpole.compiled_step(state, actions, terminated, reward)


@numba.njit(**JIT_OPTIONS)
def _env_sample(port, u, state):
    if port == 0:
        cartpole.compiled_sample(u, state)


@numba.njit(**JIT_OPTIONS)
def _optimizer_step(kind, params, grads, state, k, t, lr, max_norm, loss_ok, rule):
    """One clipped step of learner k (``kind`` 0: RMSprop, 1: Adam; ``rule``: its
    constants; ``state``: its one or two lists of state arrays)."""
    if kind == 0:
        return kernels.rmsprop_member(params, grads, state[0], k, lr, max_norm, loss_ok,
                                      rule[0], rule[1])
    return kernels.adam_member(params, grads, state[0], state[1], k, t, lr, max_norm, loss_ok,
                               rule[0], rule[1], rule[2])


@numba.njit(**JIT_OPTIONS)
def _rollout(k, s, u, n_steps, env, port, obs, pi, pi_modes, act, bufs, book, gs0,
             final_from):
    """Member s's rollout of update u: policy passes (activations kept for the gradient),
    actions, environment steps with autoreset, and the episodes' book-keeping."""
    state, elapsed, resets, reset_keys = env.state, env.elapsed, env.resets, env.reset_keys
    act_keys, act_counters, n_draws = env.act_keys, env.act_counters, env.n_draws
    x_all, pi_hidden, logits, actions = bufs.x_all, bufs.pi_hidden, bufs.logits, bufs.actions
    final_obs = bufs.final_obs
    n_envs, obs_dim = obs.shape[1], obs.shape[2]
    draws = bufs.draws
    for i in range(n_steps * n_envs):  # MemberStreams.uniform((T, E)) of this member
        draws[i // n_envs, i % n_envs] = uniform_draw(act_keys[s],
                                                      act_counters[s] + np.uint64(i + 1))
    act_counters[s] += np.uint64(n_steps * n_envs)
    step_term, step_trunc, step_rew = bufs.step
    u_reset, fresh = bufs.reset
    for t in range(n_steps):
        rows = slice(t * n_envs, (t + 1) * n_envs)
        x_all[rows] = obs[s]
        forward_member(x_all[rows], pi, k, pi_modes, act, pi_hidden, t * n_envs, logits[rows])
        kernels.sample_categorical(view(logits[rows], (1, n_envs, logits.shape[1])),
                                   draws[t:t + 1], actions[t:t + 1])
        _env_step(port, state[:, s:s + 1], actions[t:t + 1], step_term, step_rew)
        for e in range(n_envs):
            steps = elapsed[s, e] + 1
            elapsed[s, e] = steps
            step_trunc[0, e] = steps >= env.max_steps
            for c in range(obs_dim):
                final_obs[t * n_envs + e, c] = np.float32(state[c, s, e])
            if step_term[0, e] or step_trunc[0, e]:  # its next reset state (as ResetDraws)
                first = (resets[s, e] * np.uint64(n_envs) + np.uint64(e)) * np.uint64(n_draws)
                for d in range(n_draws):
                    u_reset[d] = uniform_draw(reset_keys[s], first + np.uint64(d + 1))
                _env_sample(port, u_reset, fresh)
                state[:, s, e] = fresh
                resets[s, e] += np.uint64(1)
                elapsed[s, e] = 0
            for c in range(obs_dim):
                obs[s, e, c] = np.float32(state[c, s, e])
        final = np.float64(gs0 + (u * n_steps + t + 1) * n_envs) > final_from
        kernels.record_step_(
            t, step_rew, step_term, step_trunc, bufs.rewards, bufs.terminated, bufs.dones,
            book.ep_ret[s:s + 1], book.ep_len[s:s + 1], book.ret_sum[s:s + 1],
            book.len_sum[s:s + 1], book.ep_count[s:s + 1], book.final_sum[s:s + 1],
            book.final_count[s:s + 1], final, book.last_ret[s:s + 1])  # fmt: skip
    x_all[n_steps * n_envs:] = obs[s]


@numba.njit(**JIT_OPTIONS)
def _value_targets(k, hp, flags, v, v_modes, v_final_modes, act, bufs, v_bufs, adv, ret, ev):
    """V(s_0 .. s_T), V of truncations' final observations, GAE targets, advantage
    normalisation and explained variance (``kernels.rollout_targets_``, ``advantage_stats_``)."""
    x_all, final_obs = bufs.x_all, bufs.final_obs
    rewards, terminated, dones = bufs.rewards, bufs.terminated, bufs.dones
    v_hidden, v_all, v_final, v_final_hidden = (v_bufs.hidden, v_bufs.v_all, v_bufs.v_final,
                                                v_bufs.final_hidden)
    n = adv.shape[1]
    forward_member(x_all, v, k, v_modes, act, v_hidden, 0, view(v_all, (v_all.size, 1)))
    truncated = False
    for i in range(dones.size):
        truncated |= dones.flat[i] and not terminated.flat[i]
    if truncated:  # (the trainer computes it for every row; only these are read)
        forward_member(final_obs, v, k, v_final_modes, act, v_final_hidden, 0,
                       view(v_final, (v_final.size, 1)))
    alive = np.zeros(1, dtype=np.int64)
    bootstrap = v_final if truncated else v_all
    kernels.rollout_targets_(view(v_all, (1, v_all.size)), view(bootstrap, (1, bootstrap.size)),
                             rewards, terminated, dones, alive, hp[k, _GAMMA:_GAMMA + 1],
                             hp[k, _LAM:_LAM + 1], flags[k, 0:1], adv, ret)
    kernels.advantage_stats_(adv, ret, view(v_all, (1, n)), flags[k, 1:2], ev)


@numba.njit(**JIT_OPTIONS)
def _policy_step(k, hp, pi, pi_modes, act, pi_opt, bufs, adv, rule_kind, rule, t, metrics,
                 grads, work):
    """A2C's policy gradient (``kernels.categorical_policy_grad``, then the backward pass)
    and the clipped optimizer step; returns whether the member stays finite."""
    x_all, pi_hidden, logits, actions = bufs.x_all, bufs.pi_hidden, bufs.logits, bufs.actions
    n = adv.shape[1]
    n_actions = logits.shape[1]
    weights = adv / _F(n)
    coef = np.empty(1, dtype=np.float32)
    coef[0] = hp[k, _ENT_COEF] / _F(n)
    g_out = np.empty((1, n, n_actions), dtype=np.float32)
    pg, ent = kernels.categorical_policy_grad(
        view(logits, (1, n, n_actions)), view(actions, (1, n)), weights, coef, g_out)
    entropy = ent[0] / _F(n)
    loss = pg[0] - hp[k, _ENT_COEF] * entropy
    backward_member(g_out[0], x_all, pi_hidden, pi, k, pi_modes[0], pi_modes[1], act, grads,
                    work)
    torch_column_sums(g_out[0], grads[len(grads) - 1][k, 0])
    norm, ok = _optimizer_step(rule_kind, pi, grads, pi_opt, k, t, hp[k, _PI_LR],
                               hp[k, _PI_CLIP], np.isfinite(loss), rule)
    metrics[_POLICY_LOSS] = pg[0]
    metrics[_ENTROPY] = entropy
    metrics[_GRAD_NORM] = norm
    return ok


@numba.njit(**JIT_OPTIONS)
def _value_step(k, hp, v, v_modes, act, v_opt, bufs, v_bufs, ret, rule_kind, rule, t, metrics,
                grads, work):
    """The value loss ``c_v (V(s) - R)^2`` of the fused value step (the V(s_0 .. s_T) pass
    is its forward pass), its backward pass and the clipped optimizer step."""
    x_all, v_hidden, v_all = bufs.x_all, v_bufs.hidden, v_bufs.v_all
    n = ret.shape[1]
    err = np.empty(n, dtype=np.float32)
    squares = np.empty(n, dtype=np.float32)
    for i in range(n):
        err[i] = v_all[i] - ret[0, i]
        squares[i] = err[i] * err[i]
    v_loss = torch_row_sum(squares) / _F(n)
    coef = _F(2.0 / n) * hp[k, _V_COEF]
    g_out = np.empty((n, 1), dtype=np.float32)
    for i in range(n):
        g_out[i, 0] = coef * err[i]
    pad = np.zeros((n, 2), dtype=np.float32)  # the trainer pads a width of 1 to 2
    pad[:, 0] = g_out[:, 0]
    backward_member(g_out, x_all, v_hidden, v, k, v_modes[0], v_modes[1], act, grads, work)
    sums = np.empty(2, dtype=np.float32)
    torch_column_sums(pad, sums)
    grads[len(grads) - 1][k, 0, 0] = sums[0]
    _, ok = _optimizer_step(rule_kind, v, grads, v_opt, k, t, hp[k, _V_LR], hp[k, _V_CLIP],
                            np.isfinite(hp[k, _V_COEF] * v_loss), rule)
    metrics[_VALUE_LOSS] = v_loss
    return ok


@numba.njit(**JIT_OPTIONS)
def run_updates(alive, n_updates, n_steps, gs0, final_from, hp, flags, env, port, obs, pi, v, act,
                plans, optimizers, book, windows, scratch, diverged_at):
    """``n_updates`` A2C updates of every learner (``alive[k]`` is learner k's member), one
    member after another. ``windows``: (metric sums ``[M, S]``, update counts ``[S]``);
    ``scratch``: :func:`_scratch`'s buffers; ``diverged_at[k]`` is set to the update at which
    learner k went non-finite (it then stops), else left at -1."""
    # Every array from here on borrowed (study.trainer.views): the caller keeps them alive.
    pi_kind, pi_rule, pi_state, pi_t, v_kind, v_rule, v_state, v_t = borrowed(optimizers)
    pi_state = (borrowed_list(pi_state[0]), borrowed_list(pi_state[1]))
    v_state = (borrowed_list(v_state[0]), borrowed_list(v_state[1]))
    metric_sum, updates = borrowed(windows)
    bufs, v_bufs = borrowed(scratch[0]), borrowed(scratch[1])
    pi_grads, v_grads = borrowed_list(scratch[2]), borrowed_list(scratch[3])
    work = borrowed(scratch[4])
    pi, v = borrowed_list(pi), borrowed_list(v)
    alive, hp, flags, env, obs, plans, book, diverged_at = borrowed(
        (alive, hp, flags, env, obs, plans, book, diverged_at))
    n = n_steps * obs.shape[1]
    adv = np.empty((1, n), dtype=np.float32)
    ret = np.empty((1, n), dtype=np.float32)
    ev = np.empty(1, dtype=np.float32)
    metrics = np.empty(metric_sum.shape[0], dtype=np.float32)
    for k in range(alive.shape[0]):
        s = alive[k]
        for u in range(n_updates):
            _rollout(k, s, u, n_steps, env, port, obs, pi, plans.pi_forward, act, bufs, book,
                     gs0, final_from)
            _value_targets(k, hp, flags, v, plans.v_forward, plans.v_final, act, bufs, v_bufs,
                           adv, ret, ev)
            metrics[:] = np.nan  # approx_kl and clip_fraction: PPO's
            pi_t[k] += 1
            ok = _policy_step(k, hp, pi, plans.pi_backward, act, pi_state, bufs, adv, pi_kind,
                              pi_rule,
                              pi_t[k], metrics, pi_grads, work)
            v_t[k] += 1
            ok &= _value_step(k, hp, v, plans.v_backward, act, v_state, bufs, v_bufs, ret, v_kind,
                              v_rule,
                              v_t[k], metrics, v_grads, work)
            metrics[_EXPLAINED_VARIANCE] = ev[0]
            for m in range(metrics.shape[0]):
                metric_sum[m, s] += np.float64(metrics[m])
            updates[s] += 1.0
            if not ok:
                diverged_at[k] = u
                break


def accepts(trainer: _Trainer) -> bool:
    """Whether :class:`CompiledA2C` reproduces this trainer's updates (see the module
    docstring); the plans it needs are checked when it is built."""
    hp, agent, env = trainer.hp, trainer.agent, trainer.env
    return (isinstance(trainer.updater, AcceleratedMLPUpdate)
            and hp.algorithm == "a2c" and hp.n_minibatches == 1 and hp.value_iters == 1
            and trainer.n_batch <= CHUNK_ROWS and trainer.discrete and agent.accelerated
            and trainer.dev.type == "cpu"
            and _port(env) is not None
            and hp.policy_optimizer in _RULE_IDS and hp.value_optimizer in _RULE_IDS
            and not trainer.normalizer.active and not trainer.reward_norm.active
            and trainer.clip_reward is None and trainer.life_loss is None
            and CompiledMLP.for_network(agent.pi, agent.activation) is not None
            and CompiledMLP.for_network(agent.v, agent.activation) is not None)


def _port(env: object) -> int | None:
    """The compiled port of this environment's own class (a subclass that changes the
    dynamics does not inherit its parent's port)."""
    name = type(env).__dict__.get("compiled_port")
    return PORTS.get(name) if isinstance(name, str) else None


def _rule(name: str) -> tuple[int, np.ndarray]:
    """(``kind``, constants) of an update rule for :func:`_optimizer_step`."""
    rule: Any = RULES[name]
    if _RULE_IDS[name] == 0:
        return 0, np.array([rule.alpha, rule.eps, 0.0])
    return 1, np.array([rule.beta1, rule.beta2, rule.eps])


class CompiledA2C:
    """The compiled loop for one trainer (:func:`accepts` it first); :meth:`build` returns
    None where some pass has no plan that reproduces torch's bits."""

    def __init__(self, trainer: _Trainer, plans: Plans) -> None:
        self.trainer = trainer
        self.plans = plans
        self._scratch: tuple[Any, ...] | None = None  # built on the first run, then reused

    @classmethod
    def build(cls, trainer: _Trainer) -> CompiledA2C | None:
        agent = trainer.agent
        pi = CompiledMLP.for_network(agent.pi, agent.activation)
        v = CompiledMLP.for_network(agent.v, agent.activation)
        assert pi is not None and v is not None  # accepts() checked it
        n, n_envs = trainer.n_batch, trainer.n_envs
        pi_forward, v_forward, v_final = (pi.forward_plan(n_envs), v.forward_plan(n + n_envs),
                                          v.forward_plan(n))
        pi_back, v_back = pi.backward_plan(n, n), v.backward_plan(n, n + n_envs)
        if (pi_forward is None or v_forward is None or v_final is None or pi_back is None
                or v_back is None or not _sums_match(n, trainer.agent.act_dim)):
            return None
        # A forward product summed in MKL's blocks (over more than 192 inputs: a layer that
        # wide) reproduces torch's bits in CompiledMLP's own passes but not inside this loop
        # (seen with a 256-unit value layer: one ulp apart; cause not found yet). Such
        # networks keep the trainer's path.
        forward: list[np.ndarray] = [pi_forward, v_forward, v_final]
        if any(int(np.max(modes)) >= BLOCKED for modes in forward):
            return None
        return cls(trainer, Plans(pi_forward, v_forward, v_final, pi_back, v_back))

    def run(self, n_updates: int) -> np.ndarray:
        """``n_updates`` updates of every learner; returns, per learner, the update at which
        it went non-finite (-1: none). The trainer's state (weights, optimizer state,
        environments, observations, streams, episode and window sums) is updated in place."""
        tr = self.trainer
        env = tr.env
        assert isinstance(env, FastPopulationEnv)  # accepts() checked its port
        resets = env.reset_numbers()
        env_arrays = EnvArrays(env._state, env.elapsed_steps, resets, env.reset_keys,
                               env.n_draws, env.max_episode_steps, tr.action_rng.keys,
                               tr.action_rng.counters)
        hp = np.stack([tr.hps[name].numpy() for name in _HP], axis=1).astype(np.float32)
        flags = np.stack([tr.hps["mc"].numpy(), tr.hps["normalize_advantage"].numpy() > 0],
                         axis=1)
        w = tr.windows
        metric_sum = np.stack([w.metric_sum[name] for name in UPDATE_METRICS])
        diverged_at = np.full(len(tr.alive), -1, dtype=np.int64)
        pi_kind, pi_rule = _rule(tr.pi_opt.kind)
        v_kind, v_rule = _rule(tr.v_opt.kind)
        optimizers = (pi_kind, pi_rule, _state(tr.pi_opt.state), tr.pi_opt.t,
                      v_kind, v_rule, _state(tr.v_opt.state), tr.v_opt.t)
        pi, v = _arrays(tr.agent.pi), _arrays(tr.agent.v)
        run_updates(
            np.ascontiguousarray(tr.alive, dtype=np.int64), n_updates, tr.n_steps,
            tr.global_step, float(tr.final_from), hp, flags, env_arrays,
            _port(env), tr.obs, pi, v, ACTIVATIONS[tr.agent.activation],
            self.plans, optimizers,
            Book(tr.ep_ret, tr.ep_len, tr.last_ret, w.ret_sum, w.len_sum, w.ep_count,
                 w.final_sum, w.final_count), (metric_sum, w.updates),
            self._buffers(), diverged_at)
        for i, name in enumerate(UPDATE_METRICS):
            w.metric_sum[name][:] = metric_sum[i]
        env.set_reset_numbers(resets)  # the environments continue from here in Python too
        return diverged_at

    def _buffers(self) -> tuple[Any, ...]:
        """:func:`_scratch`'s buffers, the same on every run (a log window at S = 1 is a
        few milliseconds: building them again each time cost a sixth of it). One run of a
        trainer at a time, as the trainer runs them."""
        if self._scratch is None:
            tr = self.trainer
            assert isinstance(tr.env, FastPopulationEnv)
            self._scratch = _scratch(tr.agent.pi, tr.agent.v, tr.n_steps, tr.n_envs, tr.env)
        return self._scratch


def _scratch(pi: Sequence[torch.Tensor], v: Sequence[torch.Tensor], n_steps: int,
             n_envs: int, env: FastPopulationEnv) -> tuple[Any, ...]:
    """One member's buffers for :func:`run_updates` (reused member after member): the
    rollout's (observations then the last ones, policy activations, logits, actions,
    final observations, rewards, terminations, ends, a step's and a reset's), the value
    pass's (activations, V(s_0 .. s_T), V(final obs), their activations), both networks'
    gradients and the backward passes' buffers."""
    n = n_steps * n_envs
    obs_dim = env.obs_dim

    def width(params: Sequence[torch.Tensor]) -> int:
        return max(p.shape[2] for p in params[0:-2:2])

    n_pi, n_v = len(pi) // 2 - 1, len(v) // 2 - 1
    bufs = Rollout(np.empty((n + n_envs, obs_dim), dtype=np.float32),
                   np.empty((n_pi, n, width(pi)), dtype=np.float32),
                   np.empty((n, pi[-1].shape[2]), dtype=np.float32),
                   np.empty((n_steps, n_envs), dtype=np.int64),
                   np.zeros((n, obs_dim), dtype=np.float32),
                   np.empty((n_steps, 1, n_envs)),
                   np.empty((n_steps, 1, n_envs), dtype=np.bool_),
                   np.empty((n_steps, 1, n_envs), dtype=np.bool_),
                   np.empty((n_steps, n_envs)),
                   (np.empty((1, n_envs), dtype=np.bool_), np.empty((1, n_envs), dtype=np.bool_),
                    np.empty((1, n_envs))),
                   (np.empty(env.n_draws), np.empty(env._state.shape[0])))
    v_bufs = Values(np.empty((n_v, n + n_envs, width(v)), dtype=np.float32),
                    np.empty(n + n_envs, dtype=np.float32), np.empty(n, dtype=np.float32),
                    np.empty((n_v, n, width(v)), dtype=np.float32))
    return (bufs, v_bufs, arrays(np.empty(p.shape, dtype=np.float32) for p in pi),
            arrays(np.empty(p.shape, dtype=np.float32) for p in v), backward_work([*pi, *v], n))


def _arrays(params: list[torch.Tensor]) -> Any:
    return arrays(p.detach() for p in params)


def _state(state: list[list[torch.Tensor]]) -> tuple[Any, Any]:
    """An optimizer's state as (first state list, second state list): the first again
    where the rule has one (RMSprop)."""
    per_kind = [arrays(st[i] for st in state) for i in range(len(state[0]))]
    return (per_kind[0], per_kind[-1])


def _sums_match(n: int, n_actions: int) -> bool:
    """Whether torch's sums over this many rows are the ones the loop reproduces."""
    g = torch.Generator().manual_seed(3)
    for width in {2, n_actions}:  # the value head's padded width, the policy's
        cols = torch.randn(2, n, width, generator=g)
        expected = cols.sum(dim=1).numpy()
        out = np.empty(width, dtype=np.float32)
        for s in range(2):
            torch_column_sums(np.ascontiguousarray(cols[s].numpy()), out)
            if not np.array_equal(out, expected[s]):
                return False
    rows = torch.randn(2, n, generator=g)
    return all(torch_row_sum(rows[s].numpy()) == rows.sum(dim=1)[s].item() for s in range(2))
