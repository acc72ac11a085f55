"""Population A2C/GAE: S members (hyperparameters, seed) trained as one vectorized computation.

Read it top to bottom like a CleanRL script: :func:`train_population` collects a rollout of
``n_steps`` steps from ``num_envs`` environments per member, computes GAE advantages, takes
policy and value gradient steps, and logs, for all members at once.

Members never touch each other:

* every member owns its random streams (init, actions, env resets, shuffles; see rng.py);
* weights are stacked ``[S, ...]`` and applied with batched matmuls (nets.py);
* advantage normalization, gradient clipping, optimizer state and learning rates are per
  member, and the loss is the sum over members of per-member means, so the gradient of a
  member depends on nothing but its own data.

Hence a member's results are bit-identical alone or inside any population.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from study import config as cfg
from study import kernels
from study.alloc import keep_freed_memory
from study.envs import Step, make_population_env
from study.envs.memory import check_fits
from study.gae import gae_advantages
from study.nets import Prepared, backward, forward_cached
from study.networks import ActorCritic, check_network
from study.optim import MemberOptimizer
from study.rng import STREAM_ACTIONS, STREAM_EVAL_RESET, STREAM_SHUFFLE, MemberStreams

CURVE_COLUMNS: tuple[str, ...] = (
    "step",
    "episode_return",
    "episode_length",
    "entropy",
    "policy_loss",
    "value_loss",
    "explained_variance",
    "grad_norm",
    "eval_return",
)
_UPDATE_METRICS = ("entropy", "policy_loss", "value_loss", "explained_variance", "grad_norm")
_EVAL_MAX_STEPS = 100_000  # safety cap for environments without a time limit


@dataclass(frozen=True)
class Member:
    """One member of a population: resolved hyperparameters (all keys) and a seed."""

    hyperparameters: dict[str, Any]
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


def _member_tensor(members: Sequence[Member], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(
        [float(m.hyperparameters[name]) for m in members], dtype=torch.float32, device=device
    )


def _row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1, keepdim. Built on ``sum``: torch's ``var``/``std`` kernels pick a
    reduction order that depends on the number of rows (members), ``sum`` does not."""
    return x.sum(dim=1, keepdim=True) / x.shape[1]


def _row_var(x: torch.Tensor, correction: int = 0) -> torch.Tensor:
    """Two-pass variance over dim 1 (keepdim), population-independent (see _row_mean)."""
    return ((x - _row_mean(x)) ** 2).sum(dim=1, keepdim=True) / (x.shape[1] - correction)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
    """``1 - Var[returns - values] / Var[returns]`` per member (NaN when Var[returns] = 0)."""
    var_y = _row_var(returns).squeeze(1)
    ev = 1 - _row_var(returns - values).squeeze(1) / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def _minibatches(n: int, n_minibatches: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, n_minibatches + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [S, M]`` of ``x [S, N, ...]`` per member."""
    if x.dim() == 2:
        return torch.take_along_dim(x, idx, dim=1)
    shape = (*idx.shape, *([1] * (x.dim() - 2)))
    return torch.take_along_dim(x, idx.reshape(shape), dim=1)


# Rows per chunk when a loss is evaluated over a large batch: gradients are accumulated
# chunk by chunk so activations stay in cache (2-3x faster on 32k-sample batches). It
# depends only on the batch size, never on the population, so members stay bit-identical.
CHUNK_ROWS = 1024


def _chunked_gradients(
    terms_fn: Callable[[int, int], dict[str, torch.Tensor]],
    params: list[torch.Tensor],
    n_rows: int,
    chunk_rows: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Per-member means of the terms ``terms_fn(a, b)`` returns (sums over rows a:b, each
    ``[S]``) over ``n_rows`` rows, and the gradients of the mean of ``terms["loss"]``, by
    autograd over chunks of ``chunk_rows`` rows (default :data:`CHUNK_ROWS`).

    The loss summed over members has, for each member, the gradient of its own mean loss.
    """
    total: dict[str, torch.Tensor] = {}
    grads: list[torch.Tensor] | None = None
    chunk = chunk_rows or CHUNK_ROWS
    for a in range(0, n_rows, chunk):
        terms = terms_fn(a, min(a + chunk, n_rows))
        terms = {k: v / n_rows for k, v in terms.items()}
        g = torch.autograd.grad(terms["loss"].sum(), params, allow_unused=True)
        g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]
        grads = g if grads is None else [x + y for x, y in zip(grads, g, strict=True)]
        for k, v in terms.items():
            total[k] = v.detach() if k not in total else total[k] + v.detach()
    assert grads is not None
    return total, grads


def _manual_chunks(
    fn: Callable[[int, int], tuple[dict[str, torch.Tensor], list[torch.Tensor]]], n_rows: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Accumulate the terms and gradients ``fn(a, b)`` returns over row chunks."""
    total: dict[str, torch.Tensor] = {}
    grads: list[torch.Tensor] = []
    for a in range(0, n_rows, CHUNK_ROWS):
        terms, g = fn(a, min(a + CHUNK_ROWS, n_rows))
        grads = g if not grads else [x.add_(y) for x, y in zip(grads, g, strict=True)]
        total = terms if not total else {k: total[k] + v for k, v in terms.items()}
    return total, grads


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


def _value_terms(agent: ActorCritic, obs: torch.Tensor, returns: torch.Tensor,
                 value_coef: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over these rows of ``(V(s) - R)^2`` and of ``c_v`` times it (``loss``)."""
    v = ((agent.values(obs) - returns) ** 2).sum(dim=1)
    return {"v": v, "loss": value_coef * v}


def _check_members(members: Sequence[Member]) -> dict[str, Any]:
    if not members:
        raise cfg.ConfigError("a population needs at least one member")
    first = members[0].hyperparameters
    key = cfg.structural_key(first)
    for m in members[1:]:
        if cfg.structural_key(m.hyperparameters) != key:
            raise ValueError("members of one population must share structural hyperparameters")
    return dict(first)


class _Windows:
    """Per-member accumulators for one logging window and for the final 10% of steps
    (episodes are added by :func:`study.kernels.record_step_`)."""

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
        return _train(env_id, members, total_steps, log_every, eval_every, eval_episodes,
                      device, save_policies, on_log, on_progress, check_memory)
    finally:
        torch.set_num_threads(threads)


def _train(env_id: str, members: Sequence[Member], total_steps: int, log_every: int,
           eval_every: int, eval_episodes: int, device: str, save_policies: bool,
           on_log: Callable[[int, dict[str, np.ndarray]], np.ndarray | None] | None,
           on_progress: Callable[[int], None] | None, check_memory: bool) -> list[RunResult]:
    """:func:`train_population`'s body, run with one torch thread."""
    t_start = time.perf_counter()
    keep_freed_memory()
    hp = _check_members(members)
    if check_memory:  # drivers check all the populations they start together instead
        check_fits([(env_id, hp, len(members))], fewer="the population")
    dev = torch.device(device)
    seeds = [int(m.seed) for m in members]
    n_mem = len(members)
    n_envs, n_steps = int(hp["num_envs"]), int(hp["n_steps"])
    n_batch = n_envs * n_steps
    n_updates = max(1, math.ceil(total_steps / n_batch))
    total_effective = n_updates * n_batch
    final_from = 0.9 * total_effective

    env = make_population_env(env_id, seeds, n_envs, hp=hp)
    n_evals = 0
    obs_space, act_space = env.observation_space, env.action_space
    check_network(env_id, hp, obs_space)
    obs_shape = tuple(obs_space.shape)
    obs_dim = int(np.prod(obs_shape))
    discrete = isinstance(act_space, gym.spaces.Discrete)
    act_shape: tuple[int, ...] = () if discrete else tuple(act_space.shape)
    if not discrete:
        act_low = np.broadcast_to(act_space.low, act_shape).astype(np.float64)
        act_high = np.broadcast_to(act_space.high, act_shape).astype(np.float64)

    # Per-member scalar hyperparameters; rows follow `alive` (members still learning).
    hps = {n: _member_tensor(members, n, dev) for n in cfg.SCALAR if n not in ("value_target",)}
    hps["mc"] = torch.tensor(
        [m.hyperparameters["value_target"] == "mc" for m in members], device=dev
    )
    agent = ActorCritic(hp, seeds, obs_space, act_space, hps["log_std_init"], dev)
    pi_opt = MemberOptimizer(hp["policy_optimizer"], agent.policy_params())
    v_opt = MemberOptimizer(hp["value_optimizer"], agent.value_params())
    alive = np.arange(n_mem)  # members still learning, in population order
    normalizer = ObsNormalizer(
        n_mem, obs_dim, np.array([bool(m.hyperparameters["normalize_obs"]) for m in members])
    )
    reward_norm = RewardNormalizer(
        n_envs, np.array([bool(m.hyperparameters.get("normalize_reward")) for m in members]),
        np.array([float(m.hyperparameters["gamma"]) for m in members]))
    clip_reward = np.array([bool(m.hyperparameters["clip_reward"]) for m in members])
    life_loss = np.array([bool(m.hyperparameters["terminal_on_life_loss"]) for m in members])
    action_rng = MemberStreams(seeds, STREAM_ACTIONS)
    shuffle_rng = MemberStreams(seeds, STREAM_SHUFFLE)

    status = np.array(["ok"] * n_mem, dtype=object)
    diverged_at: list[int | None] = [None] * n_mem
    reasons: list[str | None] = [None] * n_mem
    stopped_at = np.full(n_mem, -1)  # global step at which a member stopped learning
    policy_states: list[dict[str, np.ndarray] | None] = [None] * n_mem
    curves: dict[str, list[np.ndarray]] = {c: [] for c in CURVE_COLUMNS}
    windows = _Windows(n_mem)
    ep_ret = np.zeros((n_mem, n_envs))
    ep_len = np.zeros((n_mem, n_envs))
    last_ret = np.full((n_mem, n_envs), np.nan)  # each env's last finished episode
    env_fault: list[str | None] = [None] * n_mem  # the first non-finite env output seen
    last_eval = np.full(n_mem, np.nan)

    def to_torch(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(dev)

    def learning_rows(x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` ([S, ...]) of the members still learning (no copy while all are)."""
        return x if len(alive) == n_mem else x[alive]

    def learning_cols(x: np.ndarray) -> np.ndarray:
        """:func:`learning_rows` of a rollout buffer ``[T, S, ...]``."""
        return x if len(alive) == n_mem else x[:, alive]

    def act(out: torch.Tensor, deterministic: bool, draws: np.ndarray | None) -> np.ndarray:
        """Actions for all S members from the policy output of the alive ones; ``draws``
        are this step's uniforms ``[S, E]`` (discrete) or normals ``[S, E, *act]`` (Box)."""
        if discrete:
            logits = np.ascontiguousarray(out.detach().cpu().numpy())
            full = np.zeros((n_mem, out.shape[1]), dtype=np.int64)
            if deterministic:
                full[alive] = logits.argmax(-1)
            elif len(alive) == n_mem:
                kernels.sample_categorical(logits, draws, full)
            else:
                part = np.empty(logits.shape[:2], dtype=np.int64)
                kernels.sample_categorical(logits, draws[alive], part)
                full[alive] = part
            return full
        out_np = out.detach().cpu().numpy().astype(np.float64)
        full = np.zeros((n_mem, out.shape[1], *act_shape))
        if deterministic:
            full[alive] = out_np
        else:
            noise = draws
            std = np.exp(agent.log_std.detach().cpu().numpy().astype(np.float64))
            full[alive] = out_np + std[:, None] * noise[alive]
        return full

    def env_actions(a: np.ndarray) -> np.ndarray:
        # The env gets clipped actions; the log-prob is of the unclipped sample.
        return a if discrete else np.clip(a, act_low, act_high).astype(np.float32)

    def evaluate() -> np.ndarray:
        """Mean return of one deterministic episode per eval env, per member.

        Evaluation k gets fresh environments seeded from (seed, k): how long another
        member's evaluation runs must not shift this member's starting states.
        """
        nonlocal n_evals
        eval_env = make_population_env(
            env_id, seeds, eval_episodes, stream=STREAM_EVAL_RESET + 1000 * (n_evals + 1), hp=hp
        )
        n_evals += 1
        obs = eval_env.reset()
        returns = np.zeros((n_mem, eval_episodes))
        finished = np.zeros((n_mem, eval_episodes), dtype=bool)
        for _ in range(_EVAL_MAX_STEPS):
            x = normalizer(obs.reshape(n_mem, eval_episodes, *obs_shape))[alive]
            with torch.no_grad():
                out = agent.policy_out(to_torch(x))
            step = eval_env.step(env_actions(act(out, True, None)))
            returns += np.where(finished, 0.0, step.reward)
            finished |= step.terminated | step.truncated
            obs = step.obs
            if finished[alive].all():
                break
        eval_env.close()
        result = np.full(n_mem, np.nan)
        result[alive] = returns[alive].mean(axis=1)
        return result

    def policy_state(pos: int, i: int) -> dict[str, np.ndarray]:
        """Weights of the learner at ``pos`` (member i), with the observation statistics
        that its inputs were normalised with, when it normalised them."""
        state = agent.member_state(pos)
        if normalizer.enabled[i].item():
            state["obs_mean"] = normalizer.mean[i].copy()
            state["obs_var"] = normalizer.var[i].copy()
        return state

    def stop(local: np.ndarray, why: str, step: int) -> None:
        """Stop members at positions ``local`` of `alive`; compact the learner tensors."""
        nonlocal alive
        if not local.any():
            return
        for pos in np.flatnonzero(local):
            i = alive[pos]
            status[i] = why
            stopped_at[i] = step
            if why == "diverged":
                diverged_at[i] = step
                reasons[i] = env_fault[i] or (
                    f"non-finite loss, gradient or weights in the update at env step {step}")
            if save_policies:
                policy_states[i] = policy_state(int(pos), int(i))
        keep = torch.from_numpy(np.flatnonzero(~local)).to(dev)
        agent.select(keep)
        pi_opt.select(keep)
        v_opt.select(keep)
        for k in hps:
            hps[k] = hps[k][keep]
        alive = alive[~local]

    def optimize(
        opt: MemberOptimizer,
        params: list[torch.Tensor],
        loss_per_member: torch.Tensor,
        grads: list[torch.Tensor],
        lr: torch.Tensor,
        max_norm: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped gradient step; returns (pre-clip grad norm, ok mask) per member.

        A member whose loss, gradient or new weights are not finite is reported (not ok)
        so the caller can freeze it; with a non-finite loss or gradient it takes no step.
        """
        return opt.step(params, grads, lr, max_norm, torch.isfinite(loss_per_member))

    # ---------------------------------------------------------------- the training loop
    obs_raw = env.reset().reshape(n_mem, n_envs, *obs_shape)
    normalizer.update(obs_raw)
    obs = normalizer(obs_raw)
    next_log = log_every
    next_eval = eval_every if eval_every > 0 else math.inf
    global_step = 0

    n_mb = int(hp["n_minibatches"])
    for update in range(n_updates):
        if len(alive) == 0:
            break
        # 1. Rollout: n_steps vectorized steps of every environment of every member.
        buf_obs = np.zeros((n_steps, n_mem, n_envs, *obs_shape), dtype=obs.dtype)
        buf_next = np.zeros_like(buf_obs)
        buf_act = np.zeros((n_steps, n_mem, n_envs, *act_shape))
        buf_rew = np.zeros((n_steps, n_mem, n_envs))
        buf_term = np.zeros((n_steps, n_mem, n_envs), dtype=bool)
        buf_done = np.zeros((n_steps, n_mem, n_envs), dtype=bool)
        # With one policy step on the whole (small) batch, the forward passes that choose the
        # actions are kept and reused for the gradient step (the weights have not changed).
        reuse_policy = agent.accelerated and n_mb == 1 and n_batch <= CHUNK_ROWS
        rollout_fwd: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        # Networks whose passes are costly (CNNs) compute the values in the rollout's passes.
        rollout_values: list[torch.Tensor] = []
        # The rollout's random draws in one call, for every member (alive or not), so each
        # member's stream advances the same way whoever else is in the population.
        if discrete:
            draws = action_rng.uniform((n_steps, n_envs))
        else:
            draws = action_rng.normal((n_steps, n_envs, *act_shape))
        policy_net = Prepared(agent.pi) if reuse_policy else None
        # Hidden activations of the rollout's policy passes, member-major [S, T, E, width]:
        # member s's rows t * E + e are contiguous, ready for the gradient step.
        hidden = [
            torch.empty(len(alive), n_steps, n_envs, w.shape[2], device=dev)
            for w, _, _ in (policy_net.layers[:-1] if policy_net is not None else [])
        ]
        for t in range(n_steps):
            if policy_net is not None:
                x = to_torch(learning_rows(obs))
                out, cache = forward_cached(x, policy_net, agent.activation, into=(hidden, t))
                rollout_fwd.append((out, cache[:1]))
            elif agent.values_in_rollout:
                with torch.no_grad():
                    out, v = agent.policy_and_values(to_torch(learning_rows(obs)))
                rollout_values.append(v)
            else:
                with torch.no_grad():
                    out = agent.policy_out(to_torch(learning_rows(obs)))
            actions = act(out, False, draws[:, t])
            step = env.step(env_actions(actions))
            global_step += n_envs
            buf_obs[t], buf_act[t] = obs, actions
            kernels.record_step_(
                t, step.reward, step.terminated, step.truncated, buf_rew, buf_term, buf_done,
                ep_ret, ep_len, windows.ret_sum, windows.len_sum, windows.ep_count,
                windows.final_sum, windows.final_count, global_step > final_from, last_ret,
            )  # fmt: skip
            _note_env_faults(step, global_step, env_fault)
            # Learn from clipped or scaled rewards; episodes keep the raw ones.
            if clip_reward.any():
                buf_rew[t] = np.where(clip_reward[:, None], np.sign(step.reward), step.reward)
            if reward_norm.active:
                buf_rew[t] = reward_norm(buf_rew[t] if clip_reward.any() else step.reward,
                                         step.terminated | step.truncated)
            if step.life_lost is not None and life_loss.any():  # a lost life ends learning's
                lost = step.life_lost & life_loss[:, None]      # episode, not the game's
                buf_term[t] |= lost
                buf_done[t] |= lost

            next_raw = step.obs.reshape(n_mem, n_envs, *obs_shape)
            normalizer.update(next_raw)
            if step.truncated.any():  # V(final obs) is only needed to bootstrap truncations
                buf_next[t] = normalizer(step.final_obs.reshape(n_mem, n_envs, *obs_shape))
            obs = normalizer(next_raw)
        if on_progress is not None:
            on_progress(n_batch * len(alive))

        # 2. Advantages and value targets from the pre-update value function.
        a_idx, n_alive = alive, len(alive)
        b_obs = to_torch(np.ascontiguousarray(learning_cols(buf_obs).swapaxes(0, 1))).reshape(
            n_alive, n_batch, *obs_shape
        )
        # V(s_0..s_T) in one pass: row t*E + e of the rollout is followed by row (t+1)*E + e.
        # With one value step on the whole (small) batch, the pass doubles as the forward
        # pass of that step: its activations are kept for the backward pass.
        fused_value = (
            agent.accelerated and int(hp["value_iters"]) * n_mb == 1 and n_batch <= CHUNK_ROWS
        )
        all_obs = torch.cat([b_obs, to_torch(learning_rows(obs))], dim=1)
        if fused_value:
            v_all, v_cache = forward_cached(all_obs, agent.v, agent.activation)
            v_all = v_all.squeeze(-1)
        elif agent.values_in_rollout:
            with torch.no_grad():
                v_last = agent.values(to_torch(learning_rows(obs)))
            v_all = torch.cat([*rollout_values, v_last], dim=1)
        else:
            with torch.no_grad():
                v_all = agent.values(all_obs)
        with torch.no_grad():
            trunc = learning_cols(buf_done) & ~learning_cols(buf_term)
            v_final = None
            if trunc.any():
                # Time-limit truncation bootstraps from V(final obs), not V(reset obs). Only
                # whether this pass runs depends on the population, never its per-member values.
                b_next = to_torch(np.ascontiguousarray(learning_cols(buf_next).swapaxes(0, 1)))
                v_final = agent.values(b_next.reshape(n_alive, n_batch, *obs_shape))
            adv, returns = _rollout_targets(
                v_all, v_final, buf_rew, buf_term, buf_done, a_idx, hps, trunc
            )
            values_flat = v_all[:, :n_batch]
            if dev.type == "cpu":
                ev = torch.empty(n_alive)
                kernels.advantage_stats_(
                    adv.numpy(), returns.numpy(), values_flat.numpy(),
                    hps["normalize_advantage"].numpy() > 0, ev.numpy(),
                )  # fmt: skip
            else:
                if n_batch > 1:
                    mean, std = _row_mean(adv), _row_var(adv, correction=1).sqrt()
                    normed = (adv - mean) / (std + 1e-8)
                    adv = torch.where(hps["normalize_advantage"][:, None] > 0, normed, adv)
                ev = _explained_variance(values_flat, returns)
        b_act = to_torch(np.ascontiguousarray(learning_cols(buf_act).swapaxes(0, 1))).reshape(
            len(a_idx), n_batch, *act_shape
        )
        if not discrete:
            b_act = b_act.float()

        # 3. Gradient steps: one policy pass and `value_iters` value passes over minibatches.
        spans = _minibatches(n_batch, n_mb)

        def permutation() -> torch.Tensor | None:
            if n_mb == 1:
                return None
            u = shuffle_rng.uniform((n_batch,))[alive]
            return torch.from_numpy(np.argsort(u, axis=1, kind="stable")).to(dev)

        stats = {k: torch.zeros(n_alive, device=dev) for k in _UPDATE_METRICS}
        diverged = torch.zeros(n_alive, dtype=torch.bool, device=dev)
        entropy_coef, value_coef = hps["entropy_coef"], hps["value_coef"]

        perm = permutation()
        for lo, hi in spans:
            idx = None if perm is None else perm[:, lo:hi]
            mb = {"obs": b_obs, "act": b_act, "adv": adv, "ret": returns}
            if idx is not None:
                mb = {k: _gather(v, idx) for k, v in mb.items()}

            def policy_terms(
                a: int, b: int, mb=mb, ent_c=entropy_coef, v_c=value_coef
            ) -> dict[str, torch.Tensor]:
                obs_c = mb["obs"][:, a:b]
                if agent.share_trunk:
                    out, values = agent.policy_and_values(obs_c)
                else:
                    out = agent.policy_out(obs_c)
                logp, entropy = agent.log_prob_entropy(out, mb["act"][:, a:b])
                terms = {"pg": -(logp * mb["adv"][:, a:b]).sum(dim=1), "ent": entropy.sum(dim=1)}
                terms["loss"] = terms["pg"] - ent_c * terms["ent"]
                if agent.share_trunk:
                    terms["v"] = ((values - mb["ret"][:, a:b]) ** 2).sum(dim=1)
                    terms["loss"] = terms["loss"] + v_c * terms["v"]
                return terms

            params = agent.policy_params()
            if not agent.accelerated:
                terms, grads = _chunked_gradients(policy_terms, params, hi - lo, agent.chunk_rows)
            elif reuse_policy:
                forward = (
                    torch.cat([o for o, _ in rollout_fwd], dim=1),
                    [
                        torch.cat([c[0] for _, c in rollout_fwd], dim=1),
                        *(h.reshape(n_alive, n_batch, -1) for h in hidden),
                    ],
                )
                terms, grads = agent.policy_grads(
                    b_obs, b_act, adv, entropy_coef, n_batch, forward=forward
                )
            else:
                terms, grads = _manual_chunks(
                    lambda a, b, mb=mb, n=hi - lo, c=entropy_coef: agent.policy_grads(
                        mb["obs"][:, a:b], mb["act"][:, a:b], mb["adv"][:, a:b], c, n
                    ),
                    hi - lo,
                )
            norm, finite = optimize(
                pi_opt, params, terms["loss"], grads, hps["policy_lr"], hps["max_grad_norm"]
            )
            diverged |= ~finite
            stats["policy_loss"] += terms["pg"] / len(spans)
            stats["entropy"] += terms["ent"] / len(spans)
            stats["grad_norm"] += norm / len(spans)
            if agent.share_trunk:
                stats["value_loss"] += terms["v"] / len(spans)

        for _ in range(0 if agent.share_trunk else int(hp["value_iters"])):
            perm = permutation()
            v_loss_sum = torch.zeros(n_alive, device=dev)
            for lo, hi in spans:
                if fused_value:  # reuse the forward pass of step 2, without its s_T rows
                    err = v_all[:, :n_batch] - returns
                    v_loss = (err * err).sum(dim=1) / n_batch
                    g_out = ((2.0 / n_batch) * value_coef.reshape(-1, 1) * err).unsqueeze(-1)
                    grads = backward(g_out, v_cache, agent.v, agent.activation)
                    terms = {"v": v_loss, "loss": value_coef * v_loss}
                else:
                    idx = None if perm is None else perm[:, lo:hi]
                    mb_obs = b_obs if idx is None else _gather(b_obs, idx)
                    mb_ret = returns if idx is None else _gather(returns, idx)
                if not fused_value and not agent.accelerated:
                    terms, grads = _chunked_gradients(
                        lambda a, b, o=mb_obs, r=mb_ret, c=value_coef: _value_terms(
                            agent, o[:, a:b], r[:, a:b], c),
                        agent.value_params(), hi - lo, agent.chunk_rows)
                elif not fused_value:
                    terms, grads = _manual_chunks(
                        lambda a, b, o=mb_obs, r=mb_ret, n=hi - lo, c=value_coef: agent.value_grads(
                            o[:, a:b], r[:, a:b], c, n
                        ),
                        hi - lo,
                    )
                _, finite = optimize(
                    v_opt,
                    agent.value_params(),
                    terms["loss"],
                    grads,
                    hps["value_lr"],
                    hps["value_max_grad_norm"],
                )
                diverged |= ~finite
                v_loss_sum += terms["v"]
            stats["value_loss"] = v_loss_sum / len(spans)
        stats["explained_variance"] = ev

        for k in _UPDATE_METRICS:
            windows.metric_sum[k][a_idx] += stats[k].cpu().numpy()
        windows.updates[a_idx] += 1
        stop(diverged.cpu().numpy(), "diverged", global_step)

        # 4. Logging (and evaluation) every `log_every` env steps; the last update always logs.
        last = update == n_updates - 1
        if global_step >= next_log or last:
            while next_log <= global_step:
                next_log += log_every
            row = windows.row()
            row["step"] = np.full(n_mem, float(global_step))
            row["eval_return"] = np.full(n_mem, np.nan)
            if eval_every > 0 and (global_step >= next_eval or last) and len(alive):
                while next_eval <= global_step:
                    next_eval += eval_every
                last_eval = evaluate()
                row["eval_return"] = last_eval
            learning = np.zeros(n_mem, dtype=bool)
            learning[alive] = True
            for k in CURVE_COLUMNS:
                if k != "step":
                    row[k] = np.where(learning, row[k], np.nan)
            for k in CURVE_COLUMNS:
                curves[k].append(row[k])
            windows.reset()
            if on_log is not None and len(alive):
                prune = on_log(global_step, row)
                if prune is not None:
                    stop(np.asarray(prune, dtype=bool)[alive], "pruned", global_step)

    if save_policies:
        for pos, i in enumerate(alive):
            policy_states[i] = policy_state(pos, int(i))
    env.close()

    wall = (time.perf_counter() - t_start) / n_mem
    stacked = {k: np.stack(v, axis=1) if v else np.zeros((n_mem, 0)) for k, v in curves.items()}
    results = []
    for i, m in enumerate(members):
        n_points = stacked["step"].shape[1]
        if stopped_at[i] >= 0:  # the curve ends at the last log point while learning
            n_points = int((stacked["step"][i] <= stopped_at[i]).sum())
        curve = {k: stacked[k][i, :n_points].copy() for k in CURVE_COLUMNS}
        ok = status[i] == "ok"
        final = _final_return(windows.final_sum[i], windows.final_count[i], last_ret[i])
        results.append(
            RunResult(
                seed=m.seed,
                hyperparameters=dict(m.hyperparameters),
                status=str(status[i]),
                diverged_at_step=diverged_at[i],
                diverged_reason=reasons[i],
                final_return=float(final) if ok else float("nan"),
                final_eval_return=float(last_eval[i]) if ok else float("nan"),
                wall_s=wall,
                env_steps=int(stopped_at[i]) if stopped_at[i] >= 0 else total_effective,
                curve=curve,
                policy_state=policy_states[i],
            )
        )
    return results
