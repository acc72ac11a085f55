"""Population A2C/GAE: S members (hyperparameters, seed) trained as one vectorized computation.

Read it top to bottom like a CleanRL script: :meth:`_Trainer.train` is the loop, and each
of its steps is one short method, for all members at once:

1. :meth:`~_Trainer.collect_rollout`: ``n_steps`` steps of ``num_envs`` environments per
   member, actions sampled from each member's own stream;
2. :meth:`~_Trainer.compute_targets`: GAE advantages and value targets (truncations
   bootstrap from the value of the final observation);
3. :meth:`~_Trainer.update`: a policy pass and ``value_iters`` value passes over
   minibatches, gradients from study.trainer.updates (the autograd reference, or a registered
   acceleration of it for the network at hand), per-member optimizers;
4. :meth:`~_Trainer.log`: curve points and evaluations every ``log_every`` env steps.

The networks (study.trainer.networks) own their weights and forward passes; nothing here depends
on which network a population has.

Members never touch each other:

* every member owns its random streams (init, actions, env resets, shuffles; see rng.py);
* weights are stacked ``[S, ...]`` and applied per member (nets.py);
* advantage normalization, gradient clipping, optimizer state and learning rates are per
  member, and the loss is the sum over members of per-member means, so the gradient of a
  member depends on nothing but its own data.

Hence a member's results are bit-identical alone or inside any population.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from study import config as cfg
from study.hyperparameters import Hyperparameters, Structure
from study.schema import CURVE_COLUMNS
from study.schema import UPDATE_METRICS as _UPDATE_METRICS
from study.trainer import compiled_a2c, compiled_value, kernels
from study.trainer import compiled_cnn as _compiled_cnn  # (also registers its update)
from study.trainer.alloc import keep_freed_memory
from study.trainer.envs import Step, make_population_env
from study.trainer.envs.memory import check_fits
from study.trainer.gae import gae_advantages
from study.trainer.networks import ActorCritic, check_network
from study.trainer.optim import MemberOptimizer
from study.trainer.rng import STREAM_ACTIONS, STREAM_EVAL_RESET, STREAM_SHUFFLE, MemberStreams
from study.trainer.updates import Minibatch, make_update, row_mean, row_var

_EVAL_MAX_STEPS = 100_000  # safety cap for environments without a time limit


@dataclass(frozen=True)
class Member:
    """One member of a population: resolved hyperparameters (every key, as a mapping or
    a :class:`~study.hyperparameters.Hyperparameters`) and a seed."""

    hyperparameters: Mapping[str, Any] | Hyperparameters
    seed: int


@dataclass
class RunResult:
    """Everything a run produced; ``curve`` maps CURVE_COLUMNS to arrays of log points."""

    seed: int
    hyperparameters: dict[str, Any]
    status: str  # "ok" | "diverged" | "pruned"
    diverged_at_step: int | None
    final_return: float
    final_eval_return: float
    wall_s: float
    env_steps: int
    curve: dict[str, np.ndarray]
    policy_state: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: For a diverged run: what went non-finite first, and at which env step.
    diverged_reason: str | None = None


# --------------------------------------------------------------------------------------
# Observation normalization (per member running mean/std, as SB3's VecNormalize)
# --------------------------------------------------------------------------------------


class ObsNormalizer:
    """Running mean/variance per member over its own observations; clip to +-10."""

    def __init__(self, n_members: int, obs_dim: int, enabled: np.ndarray) -> None:
        self.mean = np.zeros((n_members, obs_dim))
        self.var = np.ones((n_members, obs_dim))
        self.count = np.full(n_members, 1e-4)
        self.enabled = enabled.reshape(-1, 1, 1)
        self.active = bool(enabled.any())

    def update(self, obs: np.ndarray) -> None:
        """Chan et al.'s parallel update with the batch ``obs [S, E, D]``."""
        if not self.active:
            return
        obs = obs.astype(np.float64)
        n = obs.shape[1]
        batch_mean = obs.mean(axis=1)
        batch_var = obs.var(axis=1)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * (n / total)[:, None]
        m2 = (
            self.var * self.count[:, None]
            + batch_var * n
            + delta**2 * (self.count * n / total)[:, None]
        )
        self.var = m2 / total[:, None]
        self.count = total

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.active:  # images stay uint8 until the network's first layer
            return obs if obs.dtype == np.uint8 else obs.astype(np.float32, copy=False)
        obs = obs.astype(np.float64)
        normed = np.clip((obs - self.mean[:, None]) / np.sqrt(self.var[:, None] + 1e-8), -10, 10)
        return np.where(self.enabled, normed, obs).astype(np.float32)


class RewardNormalizer:
    """Per member, rewards scaled by the running std of the discounted return (SB3's
    ``VecNormalize(norm_reward=True)``): per environment ``R_t = gamma R_{t-1} + r_t``
    (reset to 0 when an episode ends), a running variance of R over the member's own
    environments, and ``r_t / sqrt(var + 1e-8)`` clipped to +-10 for learning. Episode
    returns, curves and final returns stay in the environment's units."""

    def __init__(self, n_envs: int, enabled: np.ndarray, gamma: np.ndarray) -> None:
        n = len(enabled)
        self.enabled = enabled.reshape(-1, 1)
        self.gamma = gamma.reshape(-1, 1).astype(np.float64)
        self.active = bool(enabled.any())
        self.ret = np.zeros((n, n_envs))
        self.mean, self.var, self.count = np.zeros(n), np.ones(n), np.full(n, 1e-4)

    def __call__(self, reward: np.ndarray, done: np.ndarray) -> np.ndarray:
        """The rewards ``[S, E]`` to learn from this step."""
        self.ret = self.ret * self.gamma + reward
        n = self.ret.shape[1]
        batch_mean, batch_var = self.ret.mean(axis=1), self.ret.var(axis=1)
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n
                    + delta**2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total
        scaled = np.clip(reward / np.sqrt(self.var[:, None] + 1e-8), -10.0, 10.0)
        self.ret[done] = 0.0
        return np.where(self.enabled, scaled, reward)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _member_tensor(values: Sequence[Hyperparameters], name: str, device: torch.device
                   ) -> torch.Tensor:
    """Hyperparameter ``name`` of every member, ``[S]`` (the per-member scalars the update
    reads as tensors)."""
    return torch.tensor([float(getattr(v, name)) for v in values], dtype=torch.float32,
                        device=device)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` per member (NaN when Var[returns] = 0)."""
    var_y = row_var(returns).squeeze(1)
    ev = 1 - row_var(returns - values).squeeze(1) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def _minibatches(n: int, n_minibatches: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, n_minibatches + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [S, M]`` of ``x [S, N, ...]`` per member.

    One ``index_select`` over the flattened rows: 5x faster than ``take_along_dim``, which
    broadcasts the indices over every feature (64 members x 2048 rows x 4: 0.43 ms against
    2.2 ms).
    """
    n_members, n_rows = x.shape[0], x.shape[1]
    flat = idx + torch.arange(n_members, device=idx.device).unsqueeze(1) * n_rows
    rows = x.reshape(n_members * n_rows, *x.shape[2:]).index_select(0, flat.reshape(-1))
    return rows.reshape(*idx.shape, *x.shape[2:])


def _stable_argsort(u: np.ndarray) -> np.ndarray:
    """``np.argsort(u, axis=1, kind="stable")``, at half its cost: a quicksort's order is
    the stable one whenever a row has no ties (almost always, for float64 uniforms), and
    the stable sort runs only when one has."""
    order = np.argsort(u, axis=1)
    ranked = np.take_along_axis(u, order, axis=1)
    if (ranked[:, 1:] == ranked[:, :-1]).any():
        return np.argsort(u, axis=1, kind="stable")
    return order


def _rollout_targets(
    v_all: torch.Tensor,
    v_final: torch.Tensor | None,
    rewards: np.ndarray,
    terminated: np.ndarray,
    dones: np.ndarray,
    alive: np.ndarray,
    hps: dict[str, torch.Tensor],
    trunc: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and value targets ``[S', T * E]`` of the learners ``alive``.

    ``v_all`` is V(s_0 .. s_T) per learner (``[S', (T + 1) * E]``), ``v_final`` V of the
    final observations (``[S', T * E]``; needed only where ``trunc``, the truncations of
    the learners); the buffers are ``[T, S, E]`` for the whole population. Value targets
    are ``A + V``, or the discounted return (GAE with lambda = 1, plus V) for members
    whose ``value_target`` is "mc".
    """
    n_steps, _, n_envs = rewards.shape
    n_alive, n_batch = len(alive), n_steps * n_envs
    if v_all.device.type == "cpu" and v_all.dtype == torch.float32:
        adv, ret = torch.empty(n_alive, n_batch), torch.empty(n_alive, n_batch)
        kernels.rollout_targets_(
            v_all.numpy(), (v_all if v_final is None else v_final).numpy(), rewards,
            terminated, dones, np.asarray(alive, dtype=np.int64), hps["gamma"].numpy(),
            hps["lam"].numpy(), hps["mc"].numpy(), adv.numpy(), ret.numpy(),
        )  # fmt: skip
        return adv, ret
    dev = v_all.device
    values = v_all[:, :n_batch].reshape(n_alive, n_steps, n_envs).transpose(0, 1)
    next_values = v_all[:, n_envs:].reshape(n_alive, n_steps, n_envs).transpose(0, 1)
    if v_final is not None:
        v_final = v_final.reshape(n_alive, n_steps, n_envs).transpose(0, 1)
        next_values = torch.where(torch.from_numpy(trunc).to(dev), v_final, next_values)
    r = torch.from_numpy(rewards[:, alive]).to(dev).float()
    term = torch.from_numpy(terminated[:, alive]).to(dev)
    done = torch.from_numpy(dones[:, alive]).to(dev)
    gamma, lam = hps["gamma"][:, None], hps["lam"][:, None]
    adv = gae_advantages(r, values, next_values, term, done, gamma, lam)
    returns = adv + values
    if bool(hps["mc"].any()):
        mc = gae_advantages(r, values, next_values, term, done, gamma, 1.0)
        returns = torch.where(hps["mc"][None, :, None], mc + values, returns)
    # [T, S, E] -> [S, T*E]
    adv = adv.transpose(0, 1).reshape(n_alive, n_batch)
    return adv, returns.transpose(0, 1).reshape(n_alive, n_batch)


def _check_members(members: Sequence[Member]) -> Structure:
    if not members:
        raise cfg.ConfigError("a population needs at least one member")
    first = Hyperparameters.of(members[0].hyperparameters).structure()
    for m in members[1:]:
        if Hyperparameters.of(m.hyperparameters).structure() != first:
            raise ValueError("members of one population must share structural hyperparameters")
    return first


class _Windows:
    """Per-member accumulators for one logging window and for the final 10% of steps
    (episodes are added by :func:`study.trainer.kernels.record_step_`)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reset()
        self.final_sum = np.zeros(n)
        self.final_count = np.zeros(n)

    def reset(self) -> None:
        self.ret_sum = np.zeros(self.n)
        self.len_sum = np.zeros(self.n)
        self.ep_count = np.zeros(self.n)
        self.metric_sum = {k: np.zeros(self.n) for k in _UPDATE_METRICS}
        self.updates = np.zeros(self.n)

    def row(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {
                "episode_return": np.where(self.ep_count > 0, self.ret_sum / self.ep_count, np.nan),
                "episode_length": np.where(self.ep_count > 0, self.len_sum / self.ep_count, np.nan),
            }
            for k in _UPDATE_METRICS:
                out[k] = np.where(self.updates > 0, self.metric_sum[k] / self.updates, np.nan)
        return out


# --------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------


def _final_return(final_sum: float, final_count: float, last_returns: np.ndarray) -> float:
    """A run's final return: the mean return of the episodes that finished in the last 10%
    of its env steps; when none did (episodes longer than that window), the mean over its
    environments of each one's last finished episode; NaN only if no episode ever ended."""
    if final_count:
        return float(final_sum / final_count)
    finished = last_returns[np.isfinite(last_returns)]
    return float(finished.mean()) if finished.size else float("nan")


def _note_env_faults(step: Step, global_step: int, env_fault: list[str | None]) -> None:
    """Record, per member, the first env step at which its environments returned a
    non-finite reward or observation (the reason a divergence is then reported with)."""
    for what, values in (("reward", step.reward), ("observation", step.obs)):
        if np.isfinite(values).all():  # the usual case: one pass, no per-member work
            continue
        bad = ~np.isfinite(values.reshape(len(env_fault), -1)).all(axis=1)
        for i in np.flatnonzero(bad):
            if env_fault[i] is None:
                env_fault[i] = (f"the environment returned a non-finite {what} at env step "
                                f"{global_step}")



def train_population(
    env_id: str,
    members: Sequence[Member],
    total_steps: int,
    log_every: int = 1000,
    eval_every: int = 0,
    eval_episodes: int = 10,
    device: str = "cpu",
    save_policies: bool = False,
    on_log: Callable[[int, dict[str, np.ndarray]], np.ndarray | None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    check_memory: bool = True,
) -> list[RunResult]:
    """Train every member for ``total_steps`` env steps; results in the order of ``members``.

    ``on_log(step, row)`` is called at every log point with ``row[column]`` shaped ``[S]``
    (NaN for members no longer training); it may return a bool ``[S]`` mask of members to
    stop now (status "pruned"). ``on_progress(n)`` receives env steps done since its last
    call, summed over members. A member whose loss, gradients or weights go non-finite stops
    learning at that update and is reported "diverged"; the others carry on.
    ``check_memory`` refuses (ConfigError) a population too large for the memory available
    before anything is built; drivers that checked it already pass False.
    """
    # One thread: with several, MKL splits a batched matmul by the population size, and a
    # member's bits would depend on who else is in its population.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_start = time.perf_counter()
        keep_freed_memory()
        hp = _check_members(members)
        if check_memory:  # drivers check all the populations they start together instead
            check_fits([(env_id, [m.hyperparameters for m in members], len(members))],
                       fewer="the population")
        trainer = _Trainer(env_id, members, hp, total_steps, device)
        return trainer.train(_Schedule(log_every, eval_every, eval_episodes), save_policies,
                             on_log, on_progress, t_start)
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class _Schedule:
    """When to log and evaluate (env steps) and how many episodes an evaluation plays."""

    log_every: int
    eval_every: int
    eval_episodes: int


@dataclass
class _Rollout:
    """One rollout of the whole population, ``[T, S, E, ...]`` (the first axis is time)."""

    obs: np.ndarray
    final_obs: np.ndarray  # observation after each step where it was a truncation
    actions: np.ndarray
    rewards: np.ndarray  # what the members learn from (clipped or scaled)
    terminated: np.ndarray  # for learning (a lost life counts where asked)
    dones: np.ndarray
    logp: list[torch.Tensor]  # PPO: log pi_old(a|s) per step, [S', E] of the learners


@dataclass
class _Batch:
    """A rollout's learning rows per learner ``[S', T * E, ...]`` with their targets."""

    obs: torch.Tensor
    actions: torch.Tensor
    adv: torch.Tensor
    returns: torch.Tensor
    explained_variance: torch.Tensor
    old_logp: torch.Tensor | None = None  # PPO: the rollout's log-probabilities
    old_values: torch.Tensor | None = None  # and values


class _Trainer:
    """The state of one population's training; :meth:`train` is the loop."""

    def __init__(self, env_id: str, members: Sequence[Member], hp: Structure,
                 total_steps: int, device: str) -> None:
        self.env_id, self.members, self.hp = env_id, members, hp
        values = [Hyperparameters.of(m.hyperparameters) for m in members]
        self.dev = torch.device(device)
        self.seeds = [int(m.seed) for m in members]
        self.n_mem = len(members)
        self.n_envs, self.n_steps = hp.num_envs, hp.n_steps
        self.n_batch = self.n_envs * self.n_steps
        self.n_updates = max(1, math.ceil(total_steps / self.n_batch))
        self.total_effective = self.n_updates * self.n_batch
        self.final_from = 0.9 * self.total_effective

        self.env = make_population_env(env_id, self.seeds, self.n_envs, hp=hp)
        self.n_evals = 0
        obs_space, act_space = self.env.observation_space, self.env.action_space
        check_network(env_id, hp, obs_space, any(v.normalize_obs for v in values))
        self.obs_shape = tuple(obs_space.shape or ())
        self.discrete = isinstance(act_space, gym.spaces.Discrete)
        self.act_shape: tuple[int, ...] = () if self.discrete else tuple(act_space.shape or ())
        if isinstance(act_space, gym.spaces.Box):
            self.act_low = np.broadcast_to(act_space.low, self.act_shape).astype(np.float64)
            self.act_high = np.broadcast_to(act_space.high, self.act_shape).astype(np.float64)

        # Per-member scalar hyperparameters; rows follow `alive` (members still learning).
        self.hps = {n: _member_tensor(values, n, self.dev)
                    for n in cfg.SCALAR if n not in ("value_target",)}
        self.hps["mc"] = torch.tensor([v.value_target == "mc" for v in values],
                                      device=self.dev)
        self.agent = ActorCritic(hp, self.seeds, obs_space, act_space, self.hps["log_std_init"],
                                 self.dev)
        self.updater = make_update(self.agent, hp)
        self.ppo = hp.algorithm == "ppo"
        self.pi_opt = MemberOptimizer(hp.policy_optimizer, self.agent.policy_params())
        self.v_opt = MemberOptimizer(hp.value_optimizer, self.agent.value_params())
        self.alive = np.arange(self.n_mem)  # members still learning, in population order

        self.normalizer = ObsNormalizer(self.n_mem, int(np.prod(self.obs_shape)),
                                        np.array([v.normalize_obs for v in values]))
        self.reward_norm = RewardNormalizer(
            self.n_envs, np.array([v.normalize_reward for v in values]),
            np.array([v.gamma for v in values]))
        # Per-member masks, or None when no member asks (the usual case: no per-step work).
        clip_reward = np.array([v.clip_reward for v in values])
        self.clip_reward = clip_reward if clip_reward.any() else None
        life_loss = np.array([v.terminal_on_life_loss for v in values])
        self.life_loss = life_loss if life_loss.any() else None
        self.action_rng = MemberStreams(self.seeds, STREAM_ACTIONS)
        self.shuffle_rng = MemberStreams(self.seeds, STREAM_SHUFFLE)

        n = self.n_mem
        self.status = np.array(["ok"] * n, dtype=object)
        self.diverged_at: list[int | None] = [None] * n
        self.reasons: list[str | None] = [None] * n
        self.stopped_at = np.full(n, -1)  # global step at which a member stopped learning
        self.policy_states: list[dict[str, np.ndarray] | None] = [None] * n
        self.curves: dict[str, list[np.ndarray]] = {c: [] for c in CURVE_COLUMNS}
        self.windows = _Windows(n)
        self.ep_ret = np.zeros((n, self.n_envs))
        self.ep_len = np.zeros((n, self.n_envs))
        self.last_ret = np.full((n, self.n_envs), np.nan)  # each env's last finished episode
        self.env_fault: list[str | None] = [None] * n  # the first non-finite env output seen
        self.last_eval = np.full(n, np.nan)
        self.global_step = 0
        self.save_policies = False
        self.player: _compiled_cnn.Player = self.play
        # The same updates as one compiled loop, where it reproduces them (same bits).
        self.compiled = (compiled_a2c.CompiledA2C.build(self) if compiled_a2c.accepts(self)
                         else None)
        # Full-batch value steps as one compiled call per update, where it reproduces them.
        self.value_fit = (compiled_value.CompiledValueFit.build(self)
                          if self.compiled is None and compiled_value.accepts(self) else None)

    # ------------------------------------------------------------------- the loop
    def train(self, schedule: _Schedule, save_policies: bool,
              on_log: Callable[[int, dict[str, np.ndarray]], np.ndarray | None] | None,
              on_progress: Callable[[int], None] | None, t_start: float) -> list[RunResult]:
        """Collect a rollout, compute its targets, update, log; until the budget is spent
        or no member is learning."""
        self.save_policies = save_policies
        self.obs = self.observe(self.env.reset(), update=True)
        # Each member's whole rollout at once where that gives the same bits (compiled games).
        self.player = _compiled_cnn.rollout_player(self) or self.play
        self.next_log = schedule.log_every
        self.next_eval = schedule.eval_every if schedule.eval_every > 0 else math.inf
        update = 0
        while update < self.n_updates and len(self.alive):
            if self.compiled is not None:  # every update up to the next log point at once
                update += self.compiled_updates(on_progress, self.n_updates - update)
            else:
                rollout = self.collect_rollout()
                if on_progress is not None:
                    on_progress(self.n_batch * len(self.alive))
                batch = self.compute_targets(rollout)
                stats, diverged = self.update(batch)
                self.record(stats)
                self.stop(diverged.cpu().numpy(), "diverged", self.global_step)
                update += 1
            self.log(schedule, on_log, last=update == self.n_updates)
        if save_policies:
            for pos, i in enumerate(self.alive):
                self.policy_states[i] = self.policy_state(pos, int(i))
        self.env.close()
        return self.results((time.perf_counter() - t_start) / self.n_mem)

    def compiled_updates(self, on_progress: Callable[[int], None] | None, left: int) -> int:
        """The updates up to the next log point (at most ``left``) by the compiled loop;
        learners that went non-finite stop at the update they did. Returns how many."""
        assert self.compiled is not None
        n = min(left, max(1, math.ceil((self.next_log - self.global_step) / self.n_batch)))
        start = self.global_step
        diverged_at = self.compiled.run(n)
        if (diverged_at >= 0).all():  # every learner stopped: the trainer stops there too
            n = int(diverged_at.max()) + 1
        self.global_step += n * self.n_batch
        if on_progress is not None:
            done = np.where(diverged_at >= 0, diverged_at + 1, n)
            on_progress(int(done.sum()) * self.n_batch)
        members = self.alive[diverged_at >= 0]
        for u in np.unique(diverged_at[diverged_at >= 0]):
            which = np.isin(self.alive, members[diverged_at[diverged_at >= 0] == u])
            self.stop(which, "diverged", start + (int(u) + 1) * self.n_batch)
        return n

    # ------------------------------------------------------------------- 1. rollout
    def collect_rollout(self) -> _Rollout:
        """``n_steps`` vectorized steps of every environment of every member."""
        shape = (self.n_steps, self.n_mem, self.n_envs)
        ro = _Rollout(
            obs=np.zeros((*shape, *self.obs_shape), dtype=self.obs.dtype),
            final_obs=np.zeros((*shape, *self.obs_shape), dtype=self.obs.dtype),
            actions=np.zeros((*shape, *self.act_shape)),
            rewards=np.zeros(shape), terminated=np.zeros(shape, dtype=bool),
            dones=np.zeros(shape, dtype=bool), logp=[])
        # The rollout's random draws in one call, for every member (alive or not), so each
        # member's stream advances the same way whoever else is in the population.
        if self.discrete:
            draws = self.action_rng.uniform((self.n_steps, self.n_envs))
        else:
            draws = self.action_rng.normal((self.n_steps, self.n_envs, *self.act_shape))
        self.updater.begin_rollout(len(self.alive), self.n_steps, self.n_envs)
        for t, (actions, step) in enumerate(self.player(ro, draws)):
            self.global_step += self.n_envs
            ro.obs[t], ro.actions[t] = self.obs, actions
            self.record_step(ro, t, step)
            next_obs = self.observe(step.obs, update=True)
            if step.truncated.any():  # V(final obs) is only needed to bootstrap truncations
                ro.final_obs[t] = self.observe(step.final_obs)
            self.obs = next_obs
        return ro

    def play(self, ro: _Rollout, draws: np.ndarray) -> Iterator[tuple[np.ndarray, Step]]:
        """The rollout's steps, one at a time (the caller moves ``self.obs`` on between
        them): every learner's pass on the current observations, every member's actions
        from this step's ``draws``, the environments' step."""
        for t in range(self.n_steps):
            out = self.updater.rollout_pass(self.to_torch(self.learning_rows(self.obs)), t)
            actions = self.act(out, False, draws[:, t])
            if self.ppo:
                ro.logp.append(self.log_prob(out, actions))
            yield actions, self.env.step(self.env_actions(actions))

    @torch.no_grad()
    def log_prob(self, out: torch.Tensor, actions: np.ndarray) -> torch.Tensor:
        """log pi(a|s) ``[S', E]`` of the learners' sampled ``actions`` (as the update will
        see them: float32 for Box)."""
        if self.discrete and out.device.type == "cpu" and out.dtype == torch.float32:
            logp = torch.empty(out.shape[:2])
            kernels.categorical_logp(np.ascontiguousarray(out.numpy()),
                                     np.ascontiguousarray(self.learning_rows(actions)),
                                     logp.numpy())
            return logp
        a = self.to_torch(self.learning_rows(actions))
        return self.agent.log_prob_entropy(out, a if self.discrete else a.float())[0]

    def observe(self, raw: np.ndarray, update: bool = False) -> np.ndarray:
        """Observations ``[S, E, ...]`` as the networks take them (normalised where asked,
        after updating the running statistics with ``raw`` when ``update``)."""
        raw = raw.reshape(self.n_mem, -1, *self.obs_shape)
        if update:
            self.normalizer.update(raw)
        return self.normalizer(raw)

    def record_step(self, ro: _Rollout, t: int, step: Step) -> None:
        """Store step t's rewards and ends, and add finished episodes to the windows."""
        w = self.windows
        kernels.record_step_(
            t, step.reward, step.terminated, step.truncated, ro.rewards, ro.terminated,
            ro.dones, self.ep_ret, self.ep_len, w.ret_sum, w.len_sum, w.ep_count,
            w.final_sum, w.final_count, self.global_step > self.final_from, self.last_ret,
        )  # fmt: skip
        _note_env_faults(step, self.global_step, self.env_fault)
        # Learn from clipped or scaled rewards; episodes keep the raw ones.
        clip = self.clip_reward is not None
        if self.clip_reward is not None:
            ro.rewards[t] = np.where(self.clip_reward[:, None], np.sign(step.reward), step.reward)
        if self.reward_norm.active:
            ro.rewards[t] = self.reward_norm(ro.rewards[t] if clip else step.reward,
                                             step.terminated | step.truncated)
        if step.life_lost is not None and self.life_loss is not None:  # a lost life ends
            lost = step.life_lost & self.life_loss[:, None]      # learning's episode only
            ro.terminated[t] |= lost
            ro.dones[t] |= lost

    # ------------------------------------------------------------------- 2. targets
    def compute_targets(self, ro: _Rollout) -> _Batch:
        """GAE advantages and value targets from the pre-update value function; advantages
        normalised per member where asked."""
        n_alive, n_batch, cols = len(self.alive), self.n_batch, self.learning_cols

        def rows(x: np.ndarray) -> torch.Tensor:  # [T, S, E, ...] -> [S', T * E, ...]
            t = self.to_torch(np.ascontiguousarray(cols(x).swapaxes(0, 1)))
            return t.reshape(n_alive, n_batch, *x.shape[3:])

        obs = rows(ro.obs)
        # V(s_0..s_T): row t*E + e of the rollout is followed by row (t+1)*E + e.
        v_all = self.updater.state_values(obs, self.to_torch(self.learning_rows(self.obs)))
        with torch.no_grad():
            trunc = cols(ro.dones) & ~cols(ro.terminated)
            v_final = None
            if trunc.any():
                # Time-limit truncation bootstraps from V(final obs), not V(reset obs). Only
                # whether this pass runs depends on the population, never its per-member values.
                v_final = self.updater.values(rows(ro.final_obs))
            adv, returns = _rollout_targets(v_all, v_final, ro.rewards, ro.terminated, ro.dones,
                                            self.alive, self.hps, trunc)
            # PPO normalises advantages per minibatch (study.trainer.updates), A2C per rollout.
            which = self.hps["normalize_advantage"] > 0
            ev = self._normalize_advantages(adv, returns, v_all[:, :n_batch],
                                            torch.zeros_like(which) if self.ppo else which)
        actions = rows(ro.actions)
        batch = _Batch(obs, actions if self.discrete else actions.float(), adv, returns, ev)
        if self.ppo:
            batch.old_logp = torch.cat(ro.logp, dim=1)
            batch.old_values = v_all[:, :n_batch].detach().clone()
        return batch

    def _normalize_advantages(self, adv: torch.Tensor, returns: torch.Tensor,
                              values: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Normalise ``adv`` in place for the members ``which``; returns the explained
        variance of ``values`` per member."""
        if self.dev.type == "cpu":
            ev = torch.empty(len(self.alive))
            kernels.advantage_stats_(adv.numpy(), returns.numpy(), values.numpy(),
                                     which.numpy(), ev.numpy())
            return ev
        if adv.shape[1] > 1:
            mean, std = row_mean(adv), row_var(adv, correction=1).sqrt()
            normed = (adv - mean) / (std + 1e-8)
            adv.copy_(torch.where(which[:, None], normed, adv))
        return _explained_variance(values, returns)

    # ------------------------------------------------------------------- 3. update
    def update(self, batch: _Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The algorithm's update (:meth:`update_a2c` or :meth:`update_ppo`): the update's
        metrics per learner and which learners went non-finite."""
        return self.update_ppo(batch) if self.ppo else self.update_a2c(batch)

    def update_a2c(self, batch: _Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One policy pass and ``value_iters`` value passes over minibatches."""
        n_alive, hps = len(self.alive), self.hps
        spans = _minibatches(self.n_batch, self.hp.n_minibatches)
        stats = {k: torch.zeros(n_alive, device=self.dev) for k in _UPDATE_METRICS}
        diverged = torch.zeros(n_alive, dtype=torch.bool, device=self.dev)
        shuffled = self.shuffled(batch, self.permutation(len(spans)))
        for lo, hi in spans:
            terms, norm, finite = self.updater.policy_step(self.minibatch(shuffled, lo, hi),
                                                           hps, self.pi_opt)
            diverged |= ~finite
            stats["policy_loss"] += terms["pg"] / len(spans)
            stats["entropy"] += terms["ent"] / len(spans)
            stats["grad_norm"] += norm / len(spans)
            if self.agent.share_trunk:
                stats["value_loss"] += terms["v"] / len(spans)
        if self.value_fit is not None:  # the loop below as one compiled call (same bits)
            stats["value_loss"], finite = self.value_fit.run(
                batch.obs, batch.returns, hps["value_coef"], hps["value_lr"],
                hps["value_max_grad_norm"])
            diverged |= ~finite
        else:
            for _ in range(0 if self.agent.share_trunk else self.hp.value_iters):
                shuffled = self.shuffled(batch, self.permutation(len(spans)))
                v_loss_sum = torch.zeros(n_alive, device=self.dev)
                for lo, hi in spans:
                    terms, grads = self.updater.value_gradients(
                        self.minibatch(shuffled, lo, hi), hps["value_coef"])
                    _, finite = self.v_opt.step(self.agent.value_params(), grads,
                                                hps["value_lr"], hps["value_max_grad_norm"],
                                                torch.isfinite(terms["loss"]))
                    diverged |= ~finite
                    v_loss_sum += terms["v"]
                stats["value_loss"] = v_loss_sum / len(spans)
        stats["explained_variance"] = batch.explained_variance
        stats["approx_kl"] = stats["clip_fraction"] = torch.full_like(stats["entropy"], math.nan)
        return stats, diverged

    def update_ppo(self, batch: _Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``n_epochs`` passes over shuffled minibatches, each a policy step (and a value
        step for separate networks) on PPO's losses. A member whose approximate KL on a
        minibatch passes ``1.5 x target_kl`` (as SB3) takes no more steps this update; the
        others carry on. Every epoch's shuffle is drawn whoever is still training, so a
        member's streams never depend on the others. Metrics are means over the
        minibatches each member trained on."""
        n_alive, hps, shared = len(self.alive), self.hps, self.agent.share_trunk
        spans = _minibatches(self.n_batch, self.hp.n_minibatches)
        stats = {k: torch.zeros(n_alive, device=self.dev) for k in _UPDATE_METRICS}
        steps = torch.zeros(n_alive, device=self.dev)
        diverged = torch.zeros(n_alive, dtype=torch.bool, device=self.dev)
        active = torch.ones(n_alive, dtype=torch.bool, device=self.dev)
        for _ in range(self.hp.n_epochs):
            perm = self.permutation(len(spans))
            if not bool(active.any()):
                continue  # (the shuffle was drawn all the same)
            shuffled = self.shuffled(batch, perm)
            for lo, hi in spans:
                if not bool(active.any()):
                    break
                mb = self.minibatch(shuffled, lo, hi)
                terms, grads = self.updater.ppo_policy_gradients(mb, hps)
                active &= ~(terms["approx_kl"] > 1.5 * hps["target_kl"])
                norm, ok = self.pi_opt.step(self.agent.policy_params(), grads, hps["policy_lr"],
                                            hps["max_grad_norm"], torch.isfinite(terms["loss"]),
                                            active)
                if not shared:
                    v_terms, v_grads = self.updater.ppo_value_gradients(mb, hps)
                    _, v_ok = self.v_opt.step(self.agent.value_params(), v_grads,
                                              hps["value_lr"], hps["value_max_grad_norm"],
                                              torch.isfinite(v_terms["loss"]), active)
                    ok, terms["v"] = ok & v_ok, v_terms["v"]
                diverged |= ~ok
                every = bool(active.all())
                terms["grad_norm"] = norm
                for key, name in (("pg", "policy_loss"), ("ent", "entropy"), ("v", "value_loss"),
                                  ("approx_kl", "approx_kl"), ("clip_fraction", "clip_fraction"),
                                  ("grad_norm", "grad_norm")):
                    stats[name] += terms[key] if every else torch.where(active, terms[key], 0.0)
                steps += active.to(steps.dtype)
        stats = {k: v / steps for k, v in stats.items()}
        stats["explained_variance"] = batch.explained_variance
        return stats, diverged

    def permutation(self, n_minibatches: int) -> torch.Tensor | None:
        """Each learner's own shuffle of the rollout's rows (None with one minibatch)."""
        if n_minibatches == 1:
            return None
        u = self.shuffle_rng.uniform((self.n_batch,))[self.alive]
        return torch.from_numpy(_stable_argsort(u)).to(self.dev)

    @staticmethod
    def shuffled(batch: _Batch, perm: torch.Tensor | None) -> _Batch:
        """The batch's rows in each learner's order ``perm`` (itself without ``perm``),
        gathered once per pass so that minibatches are slices."""
        if perm is None:
            return batch

        def rows(x: torch.Tensor) -> torch.Tensor:
            return _gather(x, perm)

        def maybe(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else rows(x)

        return _Batch(rows(batch.obs), rows(batch.actions), rows(batch.adv),
                      rows(batch.returns), batch.explained_variance, maybe(batch.old_logp),
                      maybe(batch.old_values))

    @staticmethod
    def minibatch(batch: _Batch, lo: int, hi: int) -> Minibatch:
        """Rows ``lo:hi`` of a (shuffled) batch, contiguous per learner."""
        if lo == 0 and hi == batch.adv.shape[1]:
            return Minibatch(batch.obs, batch.actions, batch.adv, batch.returns, full=True,
                             old_logp=batch.old_logp, old_values=batch.old_values)

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x[:, lo:hi].contiguous()

        def maybe(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else rows(x)

        return Minibatch(rows(batch.obs), rows(batch.actions), rows(batch.adv),
                         rows(batch.returns), full=False, old_logp=maybe(batch.old_logp),
                         old_values=maybe(batch.old_values))

    # ------------------------------------------------------------------- 4. logging
    def record(self, stats: dict[str, torch.Tensor]) -> None:
        for k in _UPDATE_METRICS:
            self.windows.metric_sum[k][self.alive] += stats[k].cpu().numpy()
        self.windows.updates[self.alive] += 1

    def log(self, schedule: _Schedule,
            on_log: Callable[[int, dict[str, np.ndarray]], np.ndarray | None] | None,
            last: bool) -> None:
        """A log point (with an evaluation when one is due) every ``log_every`` env steps;
        the last update always logs."""
        step = self.global_step
        if not (step >= self.next_log or last):
            return
        while self.next_log <= step:
            self.next_log += schedule.log_every
        row = self.windows.row()
        row["step"] = np.full(self.n_mem, float(step))
        row["eval_return"] = np.full(self.n_mem, np.nan)
        if schedule.eval_every > 0 and (step >= self.next_eval or last) and len(self.alive):
            while self.next_eval <= step:
                self.next_eval += schedule.eval_every
            self.last_eval = self.evaluate(schedule.eval_episodes)
            row["eval_return"] = self.last_eval
        learning = np.zeros(self.n_mem, dtype=bool)
        learning[self.alive] = True
        for k in CURVE_COLUMNS:
            if k != "step":
                row[k] = np.where(learning, row[k], np.nan)
            self.curves[k].append(row[k])
        self.windows.reset()
        if on_log is not None and len(self.alive):
            prune = on_log(step, row)
            if prune is not None:
                self.stop(np.asarray(prune, dtype=bool)[self.alive], "pruned", step)

    # ------------------------------------------------------------------- helpers
    def to_torch(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.dev)

    def learning_rows(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` ([S, ...]) of the members still learning (no copy while all are)."""
        return x if len(self.alive) == self.n_mem else x[self.alive]

    def learning_cols(self, x: np.ndarray) -> np.ndarray:
        """:meth:`learning_rows` of a rollout buffer ``[T, S, ...]``."""
        return x if len(self.alive) == self.n_mem else x[:, self.alive]

    def act(self, out: torch.Tensor, deterministic: bool, draws: np.ndarray | None
            ) -> np.ndarray:
        """Actions for all S members from the policy output of the alive ones; ``draws``
        are this step's uniforms ``[S, E]`` (discrete) or normals ``[S, E, *act]`` (Box)."""
        alive, n_mem = self.alive, self.n_mem
        if self.discrete:
            logits = np.ascontiguousarray(out.detach().cpu().numpy())
            full = np.zeros((n_mem, out.shape[1]), dtype=np.int64)
            if deterministic:
                full[alive] = logits.argmax(-1)
                return full
            assert draws is not None  # sampling needs this step's uniforms
            if len(alive) == n_mem:
                kernels.sample_categorical(logits, draws, full)
            else:
                part = np.empty(logits.shape[:2], dtype=np.int64)
                kernels.sample_categorical(logits, draws[alive], part)
                full[alive] = part
            return full
        out_np = out.detach().cpu().numpy().astype(np.float64)
        actions = np.zeros((n_mem, out.shape[1], *self.act_shape))
        if deterministic:
            actions[alive] = out_np
        else:
            assert draws is not None and self.agent.log_std is not None  # a Gaussian policy
            std = np.exp(self.agent.log_std.detach().cpu().numpy().astype(np.float64))
            actions[alive] = out_np + std[:, None] * draws[alive]
        return actions

    def env_actions(self, a: np.ndarray) -> np.ndarray:
        # The env gets clipped actions; the log-prob is of the unclipped sample.
        return a if self.discrete else np.clip(a, self.act_low, self.act_high).astype(np.float32)

    def evaluate(self, episodes: int) -> np.ndarray:
        """Mean return of one deterministic episode per eval env, per member.

        Evaluation k gets fresh environments seeded from (seed, k): how long another
        member's evaluation runs must not shift this member's starting states.
        """
        self.n_evals += 1
        eval_env = make_population_env(
            self.env_id, self.seeds, episodes,
            stream=STREAM_EVAL_RESET + 1000 * self.n_evals, hp=self.hp)
        obs = eval_env.reset()
        returns = np.zeros((self.n_mem, episodes))
        finished = np.zeros((self.n_mem, episodes), dtype=bool)
        for _ in range(_EVAL_MAX_STEPS):
            x = self.normalizer(obs.reshape(self.n_mem, episodes, *self.obs_shape))[self.alive]
            with torch.no_grad():
                out = self.agent.policy_out(self.to_torch(x))
            step = eval_env.step(self.env_actions(self.act(out, True, None)))
            returns += np.where(finished, 0.0, step.reward)
            finished |= step.terminated | step.truncated
            obs = step.obs
            if finished[self.alive].all():
                break
        eval_env.close()
        result = np.full(self.n_mem, np.nan)
        result[self.alive] = returns[self.alive].mean(axis=1)
        return result

    def policy_state(self, pos: int, i: int) -> dict[str, np.ndarray]:
        """Weights of the learner at ``pos`` (member i), with the observation statistics
        that its inputs were normalised with, when it normalised them."""
        state = self.agent.member_state(pos)
        if self.normalizer.enabled[i].item():
            state["obs_mean"] = self.normalizer.mean[i].copy()
            state["obs_var"] = self.normalizer.var[i].copy()
        return state

    def stop(self, local: np.ndarray, why: str, step: int) -> None:
        """Stop members at positions ``local`` of `alive`; compact the learner tensors."""
        if not local.any():
            return
        for pos in np.flatnonzero(local):
            i = self.alive[pos]
            self.status[i] = why
            self.stopped_at[i] = step
            if why == "diverged":
                self.diverged_at[i] = step
                self.reasons[i] = self.env_fault[i] or (
                    f"non-finite loss, gradient or weights in the update at env step {step}")
            if self.save_policies:
                self.policy_states[i] = self.policy_state(int(pos), int(i))
        keep = torch.from_numpy(np.flatnonzero(~local)).to(self.dev)
        self.agent.select(keep)
        self.pi_opt.select(keep)
        self.v_opt.select(keep)
        for k in self.hps:
            self.hps[k] = self.hps[k][keep]
        self.alive = self.alive[~local]

    def results(self, wall: float) -> list[RunResult]:
        stacked = {k: np.stack(v, axis=1) if v else np.zeros((self.n_mem, 0))
                   for k, v in self.curves.items()}
        out = []
        for i, m in enumerate(self.members):
            n_points = stacked["step"].shape[1]
            if self.stopped_at[i] >= 0:  # the curve ends at the last log point while learning
                n_points = int((stacked["step"][i] <= self.stopped_at[i]).sum())
            ok = self.status[i] == "ok"
            final = _final_return(self.windows.final_sum[i], self.windows.final_count[i],
                                  self.last_ret[i])
            out.append(RunResult(
                seed=m.seed, hyperparameters=(
                    m.hyperparameters.to_dict() if isinstance(m.hyperparameters, Hyperparameters)
                    else dict(m.hyperparameters)), status=str(self.status[i]),
                diverged_at_step=self.diverged_at[i], diverged_reason=self.reasons[i],
                final_return=float(final) if ok else float("nan"),
                final_eval_return=float(self.last_eval[i]) if ok else float("nan"),
                wall_s=wall,
                env_steps=(int(self.stopped_at[i]) if self.stopped_at[i] >= 0
                           else self.total_effective),
                curve={k: stacked[k][i, :n_points].copy() for k in CURVE_COLUMNS},
                policy_state=self.policy_states[i]))
        return out
