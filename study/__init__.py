"""study: hyperparameter sweeps and seed-variance studies for reinforcement learning."""

__version__ = "0.1.0"

#: The trainer's numerics, bumped by every change that alters any trained value (another
#: matmul form, chunk size or formula). Stores record it, and resuming a store trained
#: with other numerics is refused: its runs would not match the ones trained now.
NUMERICS = 3

# Light on purpose: ``import study.store`` (and every analysis command) must not import
# torch, gymnasium or numba. CartPoleSwingUp-v0/v1 are registered with gymnasium by
# study.trainer.envs when an environment is made (study.trainer.envs.register_envs).
