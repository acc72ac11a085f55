"""study: hyperparameter sweeps and seed-variance studies for reinforcement learning.

The public API from Python (the commands are ``python -m study.grid`` and its siblings):

- training: :func:`train_population` of :class:`Member` s (hyperparameters, seed) into
  :class:`RunResult` s; the typed values :class:`Hyperparameters` and :class:`Structure`;
  :func:`resolve` (defaults and validation of a mapping of hyperparameters);
- sweeps: :func:`load_sweep` (a sweep file as a :class:`Sweep`);
- results: :func:`load_store` (a store's runs and curves as two DataFrames);
- :class:`ConfigError` (bad input; its message is one line), ``NUMERICS``.

Importing ``study`` is light (no torch, gymnasium or numba): each name is loaded on first
use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The trainer's numerics, bumped by every change that alters any trained value (another
#: matmul form, chunk size or formula). Stores record it, and resuming a store trained
#: with other numerics is refused: its runs would not match the ones trained now.
NUMERICS = 4

#: public name -> (module, attribute), loaded on first use (PEP 562)
_LAZY = {
    "train_population": ("study.trainer.population", "train_population"),
    "Member": ("study.trainer.population", "Member"),
    "RunResult": ("study.trainer.population", "RunResult"),
    "Hyperparameters": ("study.hyperparameters", "Hyperparameters"),
    "Structure": ("study.hyperparameters", "Structure"),
    "resolve": ("study.config", "resolve"),
    "ConfigError": ("study.config", "ConfigError"),
    "load_sweep": ("study.sweeps.spec", "load_sweep"),
    "Sweep": ("study.sweeps.spec", "Sweep"),
    "load_store": ("study.store", "load"),
}

__all__ = ["NUMERICS", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'study' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

# Light on purpose: ``import study.store`` (and every analysis command) must not import
# torch, gymnasium or numba. CartPoleSwingUp-v0/v1 are registered with gymnasium by
# study.trainer.envs when an environment is made (study.trainer.envs.register_envs).
