"""The trainer's curve columns: one definition for the trainer, the store and readers.

Kept free of heavy imports, so reading a store never imports torch.
"""

from __future__ import annotations

__all__ = ["CURVE_COLUMNS", "UPDATE_METRICS"]

#: What an update reports per member, averaged over a log window. ``approx_kl`` and
#: ``clip_fraction`` are PPO's (NaN for A2C).
UPDATE_METRICS: tuple[str, ...] = (
    "entropy",
    "policy_loss",
    "value_loss",
    "explained_variance",
    "grad_norm",
    "approx_kl",
    "clip_fraction",
)

#: The columns of a run's learning curve, one row per log point.
CURVE_COLUMNS: tuple[str, ...] = (
    "step",
    "episode_return",
    "episode_length",
    *UPDATE_METRICS[:5],
    "eval_return",
    *UPDATE_METRICS[5:],
)
