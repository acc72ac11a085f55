"""A2C on CartPole-v1 in JAX, PureJaxRL style: the whole training run of one seed
is one jitted function, and ``jax.vmap`` over seeds trains a population of S of them.

    python benchmarks/_jax_a2c.py [--seeds 8] [--steps 100000] [--pin CORE]

(trains S seeds with our default hyperparameters and prints their final returns).

It is the comparison point of benchmarks/throughput.py for study's population trainer,
so it runs the same algorithm with the same hyperparameters (``study.config.resolve({})``,
SB3's A2C defaults) and reads top to bottom like a CleanRL/PureJaxRL script: the
environment, network init, env step, rollout (``lax.scan`` over ``n_steps``), GAE (a
reverse ``lax.scan``), losses, update, and the train loop (``lax.scan`` over updates).

The environment is gymnasium's CartPole-v1 written here as two pure functions,
:func:`env_reset` and :func:`env_step` (vmapped over envs, auto-reset inside the rollout's
scan): the same constants, Euler integrator, termination bounds, reward of 1 on every step
(the terminating one included), reset state uniform in [-0.05, 0.05]^4 and 500-step time
limit (a truncation). Its state is float32 (as gymnax's), where gymnasium keeps float64 and
returns float32 observations.

As in study's trainer:

* separate policy (obs-64-64-actions) and value (obs-64-64-1) MLPs, orthogonal init with
  gains sqrt(2) for hidden layers, 0.01 for the policy head and 1 for the value head,
  zero biases;
* A2C losses ``-mean(A log pi(a|s)) - c_ent mean(H)`` and ``c_v mean((V(s) - R)^2)`` with
  R = A + V, each network clipped to its own max gradient norm (torch's
  ``clip_grad_norm_`` formula) and stepped by its own RMSprop;
* GAE where a time-limit truncation bootstraps from V(final observation) and a
  termination does not (``bootstrap_truncation``; PureJaxRL's scripts instead treat a
  truncation as a termination);
* the final return: mean return of the episodes that ended in the last 10% of a seed's
  env steps (else the mean of each env's last finished episode).

Differences that remain: the random streams (JAX's PRNG, for actions and resets) are not
study's, so runs match in distribution, not bit for bit; torch's ``orthogonal_`` draws
an ``[out, in]`` matrix and JAX's initializer an ``[in, out]`` one (the same Haar
distribution); the policy's forward pass over the rollout runs twice (once to act, once
inside the gradient), where study reuses the rollout's activations; V(final obs) is
computed for every step when ``bootstrap_truncation`` (under ``vmap`` a conditional runs
both branches), where study computes it only in rollouts that had a truncation; and a seed
whose loss goes non-finite keeps stepping (study stops it as "diverged").

XLA's CPU thread pool is sized when the backend starts, which the first JAX computation
does: call :func:`configure_xla` (and pin the process) before this module's first training.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from study.trainer.envs.cartpole import (
    FORCE_MAG,
    GRAVITY,
    LENGTH,
    MASSPOLE,
    POLEMASS_LENGTH,
    TAU,
    THETA_THRESHOLD,
    TOTAL_MASS,
    X_THRESHOLD,
)

Array = jax.Array
Params = list[tuple[Array, Array]]  # [(w [in, out], b [out]), ...] per layer

#: XLA flags for a single-threaded CPU runtime (Eigen's matmuls on the calling thread).
#: ``intra_op_parallelism_threads`` is not an XLA flag (XLA would ignore it); the size of
#: XLA's CPU thread pool follows the CPUs the process may run on, hence ``--pin``.
SINGLE_THREAD_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def configure_xla() -> None:
    """Ask XLA for a single-threaded CPU runtime: must run before the backend starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if SINGLE_THREAD_XLA_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA_FLAGS}".strip()


@dataclass(frozen=True)
class A2CConfig:
    """Hyperparameters of one seed's run (the population shares them)."""

    total_steps: int  # env steps per seed (rounded up to whole rollouts)
    num_envs: int = 8
    n_steps: int = 5
    gamma: float = 0.99
    lam: float = 1.0
    policy_lr: float = 7e-4
    value_lr: float = 7e-4
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    value_max_grad_norm: float = 0.5
    normalize_advantage: bool = False
    policy_hidden: tuple[int, ...] = (64, 64)
    value_hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    # torch.optim.RMSprop as study's trainer and SB3's A2C set it up (no momentum, not
    # centred). optax puts eps inside the sqrt by default, torch outside:
    # ``eps_in_sqrt=False`` below gives torch's p -= lr g / (sqrt(v) + eps).
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 1e-5
    bootstrap_truncation: bool = True

    @property
    def batch(self) -> int:
        return self.num_envs * self.n_steps

    @property
    def n_updates(self) -> int:
        return max(1, math.ceil(self.total_steps / self.batch))

    @classmethod
    def from_hyperparameters(cls, hp: Mapping[str, Any], total_steps: int,
                             bootstrap_truncation: bool = True) -> A2CConfig:
        """The config of study's resolved hyperparameters ``hp``: only what this script
        implements (A2C, separate MLPs, RMSprop, one policy and one value pass over the
        whole rollout, raw observations and rewards, GAE targets)."""
        supported = {"algorithm": "a2c", "policy_optimizer": "rmsprop",
                     "value_optimizer": "rmsprop", "n_minibatches": 1, "value_iters": 1,
                     "share_trunk": False, "normalize_obs": False, "normalize_reward": False,
                     "value_target": "gae", "encoder": "mlp"}
        other = {k: hp[k] for k, v in supported.items() if k in hp and hp[k] != v}
        if other:
            raise ValueError(f"the JAX A2C does not implement {other}")
        return cls(
            total_steps=total_steps, num_envs=hp["num_envs"], n_steps=hp["n_steps"],
            gamma=hp["gamma"], lam=hp["lam"], policy_lr=hp["policy_lr"],
            value_lr=hp["value_lr"], entropy_coef=hp["entropy_coef"],
            value_coef=hp["value_coef"], max_grad_norm=hp["max_grad_norm"],
            value_max_grad_norm=hp["value_max_grad_norm"],
            normalize_advantage=bool(hp["normalize_advantage"]),
            policy_hidden=tuple(hp["policy_hidden_sizes"]),
            value_hidden=tuple(hp["value_hidden_sizes"]), activation=hp["activation"],
            bootstrap_truncation=bootstrap_truncation,
        )  # fmt: skip


# ------------------------------------------------------------------ environment

# gymnasium's CartPole-v1 constants ("euler" integrator), as study's own port has them.
MAX_EPISODE_STEPS = 500  # CartPole-v1's TimeLimit
OBS_DIM = 4
N_ACTIONS = 2


class EnvState(NamedTuple):
    physics: Array  # [4] float32: x, x_dot, theta, theta_dot (also the observation)
    time: Array  # int32 steps since the last reset


def env_reset(key: Array) -> tuple[Array, EnvState]:
    """A new episode: every state variable uniform in [-0.05, 0.05]."""
    physics = jax.random.uniform(key, (OBS_DIM,), jnp.float32, -0.05, 0.05)
    return physics, EnvState(physics, jnp.zeros((), jnp.int32))


def env_step(state: EnvState, action: Array) -> tuple[Array, EnvState, Array, Array, Array]:
    """One step of one env (no reset): ``(obs, state, reward, terminated, truncated)``."""
    x, x_dot, theta, theta_dot = state.physics
    force = jnp.where(action == 1, FORCE_MAG, -FORCE_MAG)
    costheta, sintheta = jnp.cos(theta), jnp.sin(theta)
    temp = (force + POLEMASS_LENGTH * theta_dot**2 * sintheta) / TOTAL_MASS
    thetaacc = (GRAVITY * sintheta - costheta * temp) / (
        LENGTH * (4.0 / 3.0 - MASSPOLE * costheta**2 / TOTAL_MASS))
    xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
    x, x_dot, theta, theta_dot = (x + TAU * x_dot, x_dot + TAU * xacc,
                                  theta + TAU * theta_dot, theta_dot + TAU * thetaacc)
    physics = jnp.stack([x, x_dot, theta, theta_dot])
    time = state.time + 1
    terminated = (x < -X_THRESHOLD) | (x > X_THRESHOLD) | (theta < -THETA_THRESHOLD) | (
        theta > THETA_THRESHOLD)
    truncated = time >= MAX_EPISODE_STEPS
    return physics, EnvState(physics, time), jnp.ones((), jnp.float32), terminated, truncated


# ------------------------------------------------------------------ networks


def init_mlp(key: Array, sizes: Sequence[int], head_gain: float) -> Params:
    """Orthogonal weights (gain sqrt(2) for hidden layers, ``head_gain`` for the last),
    zero biases."""
    gains = [math.sqrt(2.0)] * (len(sizes) - 2) + [head_gain]
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.nn.initializers.orthogonal(g)(k, (n_in, n_out)), jnp.zeros(n_out))
            for k, g, n_in, n_out in zip(keys, gains, sizes[:-1], sizes[1:], strict=True)]


def mlp(params: Params, x: Array, activation: Callable[[Array], Array]) -> Array:
    for w, b in params[:-1]:
        x = activation(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def clip_grad_norm(grads: Params, max_norm: float) -> Params:
    """torch's ``clip_grad_norm_``: scale by min(1, max_norm / (norm + 1e-6)).
    (``optax.clip_by_global_norm`` scales by max_norm / norm, without the 1e-6.)"""
    norm = optax.global_norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef, grads)


# ------------------------------------------------------------------ training state


class Transition(NamedTuple):
    obs: Array  # [E, obs_dim]
    action: Array  # [E]
    reward: Array  # [E]
    terminated: Array  # [E]
    done: Array  # [E] terminated or truncated
    truncated: Array  # [E]
    final_obs: Array  # [E, obs_dim] the observation the step reached, before any reset


class RunnerState(NamedTuple):
    pi_params: Params
    v_params: Params
    pi_opt: optax.OptState
    v_opt: optax.OptState
    env_state: EnvState  # [E] per leaf
    obs: Array  # [E, obs_dim]
    key: Array
    step: Array  # env steps taken by this seed (all its envs)
    ep_ret: Array  # [E] return of each env's running episode
    last_ret: Array  # [E] return of each env's last finished episode (NaN: none yet)
    final_sum: Array  # returns of the episodes that ended in the last 10% of steps
    final_count: Array


def make_train(cfg: A2CConfig) -> Callable[[Array], dict[str, Array]]:
    """``train(key) -> outputs`` for one seed, to wrap in ``jax.jit(jax.vmap(...))``."""
    n_actions, obs_dim = N_ACTIONS, OBS_DIM
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu}[cfg.activation]
    final_from = 0.9 * cfg.n_updates * cfg.batch
    rmsprop = {"decay": cfg.rmsprop_alpha, "eps": cfg.rmsprop_eps, "eps_in_sqrt": False}
    pi_tx = optax.rmsprop(cfg.policy_lr, **rmsprop)
    v_tx = optax.rmsprop(cfg.value_lr, **rmsprop)

    def policy(params: Params, obs: Array) -> Array:
        return mlp(params, obs, act)

    def value(params: Params, obs: Array) -> Array:
        return mlp(params, obs, act)[..., 0]

    def train(key: Array) -> dict[str, Array]:
        # ---- init: networks, optimizers, environments
        key, k_pi, k_v, k_env = jax.random.split(key, 4)
        pi_params = init_mlp(k_pi, [obs_dim, *cfg.policy_hidden, n_actions], 0.01)
        v_params = init_mlp(k_v, [obs_dim, *cfg.value_hidden, 1], 1.0)
        obs, env_state = jax.vmap(env_reset)(jax.random.split(k_env, cfg.num_envs))
        zeros = jnp.zeros(cfg.num_envs)
        runner = RunnerState(pi_params, v_params, pi_tx.init(pi_params), v_tx.init(v_params),
                             env_state, obs, key, jnp.zeros((), jnp.int32), zeros,
                             jnp.full(cfg.num_envs, jnp.nan), jnp.zeros(()), jnp.zeros(()))

        # ---- one vectorized env step: act, step, auto-reset, episode book-keeping
        def step_envs(r: RunnerState, _: None) -> tuple[RunnerState, Transition]:
            key, k_act, k_reset = jax.random.split(r.key, 3)
            action = jax.random.categorical(k_act, policy(r.pi_params, r.obs))
            final_obs, env_state, reward, terminated, truncated = jax.vmap(env_step)(
                r.env_state, action)
            done = terminated | truncated
            reset_obs, reset_state = jax.vmap(env_reset)(
                jax.random.split(k_reset, cfg.num_envs))
            obs = jnp.where(done[:, None], reset_obs, final_obs)
            env_state = EnvState(obs, jnp.where(done, reset_state.time, env_state.time))
            step = r.step + cfg.num_envs
            ep_ret = r.ep_ret + reward
            ended = jnp.where(done & (step > final_from), ep_ret, 0.0)
            transition = Transition(r.obs, action, reward, terminated, done, truncated,
                                    final_obs)
            r = r._replace(
                env_state=env_state, obs=obs, key=key, step=step,
                ep_ret=jnp.where(done, 0.0, ep_ret),
                last_ret=jnp.where(done, ep_ret, r.last_ret),
                final_sum=r.final_sum + ended.sum(),
                final_count=r.final_count + (done & (step > final_from)).sum(),
            )  # fmt: skip
            return r, transition

        # ---- GAE over the rollout [T, E] (reverse scan)
        def gae(tr: Transition, values: Array, next_values: Array) -> Array:
            def backward(adv_next: Array, x: tuple[Array, ...]) -> tuple[Array, Array]:
                reward, v, v_next, terminated, done = x
                delta = reward + cfg.gamma * (1.0 - terminated) * v_next - v
                adv = delta + cfg.gamma * cfg.lam * (1.0 - done) * adv_next
                return adv, adv

            xs = (tr.reward, values, next_values, tr.terminated.astype(values.dtype),
                  tr.done.astype(values.dtype))
            return jax.lax.scan(backward, jnp.zeros(cfg.num_envs), xs, reverse=True)[1]

        # ---- losses
        def policy_loss(params: Params, obs: Array, action: Array, adv: Array) -> Array:
            logp_all = jax.nn.log_softmax(policy(params, obs))
            logp = jnp.take_along_axis(logp_all, action[:, None], axis=1)[:, 0]
            entropy = -(jnp.exp(logp_all) * logp_all).sum(axis=1)
            return -(adv * logp).mean() - cfg.entropy_coef * entropy.mean()

        # ---- one update: rollout, targets, a policy step and a value step
        def update(r: RunnerState, _: None) -> tuple[RunnerState, Array]:
            r, tr = jax.lax.scan(step_envs, r, None, cfg.n_steps)
            obs = tr.obs.reshape(cfg.batch, obs_dim)
            # V(s_0..s_{T-1}) with its VJP: the value gradient reuses this forward pass.
            values, value_vjp = jax.vjp(lambda p: value(p, obs), r.v_params)
            values = values.reshape(cfg.n_steps, cfg.num_envs)
            next_values = jnp.concatenate([values[1:], value(r.v_params, r.obs)[None]])
            if cfg.bootstrap_truncation:  # a truncation bootstraps from V(final obs)
                v_final = value(r.v_params, tr.final_obs)
                next_values = jnp.where(tr.truncated, v_final, next_values)
            adv = gae(tr, values, next_values)
            returns = adv + values
            adv = adv.reshape(cfg.batch)
            if cfg.normalize_advantage:
                adv = (adv - adv.mean()) / (adv.std(ddof=1) + 1e-8)

            pi_loss, pi_grads = jax.value_and_grad(policy_loss)(
                r.pi_params, obs, tr.action.reshape(cfg.batch), adv)
            pi_updates, pi_opt = pi_tx.update(clip_grad_norm(pi_grads, cfg.max_grad_norm),
                                              r.pi_opt)
            # d/dV of c_v mean((V - R)^2), pulled back through the value network
            error = (values - returns).reshape(cfg.batch)
            (v_grads,) = value_vjp(2.0 * cfg.value_coef * error / cfg.batch)
            v_updates, v_opt = v_tx.update(
                clip_grad_norm(v_grads, cfg.value_max_grad_norm), r.v_opt)
            r = r._replace(pi_params=optax.apply_updates(r.pi_params, pi_updates),
                           v_params=optax.apply_updates(r.v_params, v_updates),
                           pi_opt=pi_opt, v_opt=v_opt)
            return r, pi_loss + cfg.value_coef * (error**2).mean()

        # ---- the train loop
        runner, losses = jax.lax.scan(update, runner, None, cfg.n_updates)
        return {"final_sum": runner.final_sum, "final_count": runner.final_count,
                "last_ret": runner.last_ret, "last_loss": losses[-1]}

    return train


def final_returns(out: Mapping[str, Array]) -> np.ndarray:
    """Per seed: the mean return of the episodes that ended in the last 10% of its env
    steps; if none did, the mean over its envs of each one's last finished episode (NaN
    if no episode ever ended), as study's trainer defines it."""
    total, count = np.asarray(out["final_sum"]), np.asarray(out["final_count"])
    last = np.asarray(out["last_ret"])
    with np.errstate(invalid="ignore", divide="ignore"):
        fallback = np.nanmean(np.where(np.isfinite(last), last, np.nan), axis=1)
        return np.where(count > 0, total / np.maximum(count, 1), fallback)


@dataclass
class Population:
    """A population of ``size`` seeds compiled for ``cfg``: ``compile_s`` is the time of
    tracing, lowering and compiling; :meth:`run` executes the compiled program."""

    cfg: A2CConfig
    size: int
    compiled: Any
    compile_s: float

    @classmethod
    def compile(cls, cfg: A2CConfig, size: int) -> Population:
        t0 = time.perf_counter()
        keys = jax.random.split(jax.random.key(0), size)
        compiled = jax.jit(jax.vmap(make_train(cfg))).lower(keys).compile()
        return cls(cfg, size, compiled, time.perf_counter() - t0)

    def run(self, seed: int = 0) -> tuple[float, np.ndarray]:
        """Train the population (seeds drawn from ``seed``): wall seconds of the compiled
        program (keys made beforehand, outputs waited for) and final returns per seed."""
        keys = jax.random.split(jax.random.key(seed), self.size)
        keys.block_until_ready()
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.compiled(keys))
        return time.perf_counter() - t0, final_returns(out)

    @property
    def env_steps(self) -> int:
        """Env steps of one run, all seeds together."""
        return self.cfg.n_updates * self.cfg.batch * self.size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="population size S")
    p.add_argument("--steps", type=int, default=100_000, help="env steps per seed")
    p.add_argument("--pin", type=int, help="run on this CPU core only")
    p.add_argument("--truncation-as-termination", action="store_true",
                   help="PureJaxRL's convention: no bootstrap from V(final obs)")
    args = p.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    configure_xla()
    from study import config

    cfg = A2CConfig.from_hyperparameters(config.resolve({}), args.steps,
                                         not args.truncation_as_termination)
    pop = Population.compile(cfg, args.seeds)
    wall, finals = pop.run()
    print(f"JAX A2C, CartPole-v1: {args.seeds} seeds x {cfg.n_updates * cfg.batch:,} steps; "
          f"compile {pop.compile_s:.1f} s, run {wall:.1f} s "
          f"({pop.env_steps / wall:,.0f} env steps/s)")
    print("final returns:", " ".join(f"{x:.1f}" for x in finals))
    print(f"median final return: {np.median(finals):.1f}")


if __name__ == "__main__":
    main()
