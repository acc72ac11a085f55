"""Stable-Baselines3 A2C with our default hyperparameters: the usual single-run baseline.

Kept apart so that benchmarks import stable-baselines3 (the optional ``bench`` extra)
only when they need it.
"""

from __future__ import annotations

import time

import numpy as np


def sb3_available() -> bool:
    try:
        import stable_baselines3  # noqa: F401
    except ImportError:
        return False
    return True


def run_sb3_a2c(env_id: str, seed: int, total_steps: int, hp: dict) -> dict:
    """Train one SB3 A2C run with matched hyperparameters in this process (1 torch thread).

    Returns wall and CPU time of training, steps/s and final_return = mean return of
    episodes finished in the last 10% of each environment's steps (the same definition
    as ours).
    """
    import torch
    from stable_baselines3 import A2C
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.monitor import Monitor  # noqa: F401 (make_vec_env wraps it)

    torch.set_num_threads(1)
    n_envs = hp["num_envs"]
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    act = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[hp["activation"]]
    model = A2C(
        "MlpPolicy",
        env,
        learning_rate=hp["policy_lr"],
        n_steps=hp["n_steps"],
        gamma=hp["gamma"],
        gae_lambda=hp["lam"],
        ent_coef=hp["entropy_coef"],
        vf_coef=hp["value_coef"],
        max_grad_norm=hp["max_grad_norm"],
        normalize_advantage=hp["normalize_advantage"],
        use_rms_prop=hp["policy_optimizer"] == "rmsprop",
        policy_kwargs={
            "net_arch": {
                "pi": list(hp["policy_hidden_sizes"]),
                "vf": list(hp["value_hidden_sizes"]),
            },
            "activation_fn": act,
        },
        seed=seed,
        device="cpu",
        verbose=0,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_env = model.num_timesteps / n_envs
    finals = []
    for monitor in env.envs:
        lengths = np.cumsum(monitor.get_episode_lengths())
        returns = np.asarray(monitor.get_episode_rewards())
        finals.extend(returns[lengths > 0.9 * per_env])
    env.close()
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "steps_per_s": model.num_timesteps / wall,
        "final_return": float(np.mean(finals)) if finals else float("nan"),
    }
