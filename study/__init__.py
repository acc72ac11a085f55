"""study: hyperparameter sweeps and seed-variance studies for reinforcement learning."""

from study.envs import register_envs as _register_envs

__version__ = "0.1.0"

_register_envs()
