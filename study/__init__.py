"""study: hyperparameter sweeps and seed-variance studies for reinforcement learning."""

from study.envs import register_envs as _register_envs

__version__ = "0.1.0"

#: The trainer's numerics, bumped by every change that alters any trained value (another
#: matmul form, chunk size or formula). Stores record it, and resuming a store trained
#: with other numerics is refused: its runs would not match the ones trained now.
NUMERICS = 3

_register_envs()
