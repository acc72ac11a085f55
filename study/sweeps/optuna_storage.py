"""The one place that touches Optuna's internals (``study._storage``, ``study._study_id``,
``trial._trial_id``): system attributes of studies and trials, and user attributes of
trials known only as FrozenTrials. Optuna's public API has neither; its storages have,
and every storage (journal, RDB) implements them.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial

__all__ = [
    "set_study_system_attr",
    "set_trial_system_attr",
    "set_trial_user_attr",
    "study_system_attr",
]

Trial = optuna.Trial | FrozenTrial


def study_system_attr(study: optuna.Study, key: str) -> Any:
    """The study's system attribute ``key`` (None if unset).

    Args:
        study: an Optuna study.
        key: the attribute's name.
    """
    return study._storage.get_study_system_attrs(study._study_id).get(key)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set the study's system attribute ``key`` (JSON-serializable ``value``).

    Args:
        study: an Optuna study.
        key: the attribute's name.
        value: its new value.
    """
    study._storage.set_study_system_attr(study._study_id, key, value)


def set_trial_system_attr(study: optuna.Study, trial: Trial, key: str, value: Any) -> None:
    """Set a system attribute of ``trial`` (running, or a FrozenTrial of ``study``).

    Args:
        study: the trial's study.
        trial: the trial.
        key: the attribute's name.
        value: its new value (JSON-serializable).
    """
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def set_trial_user_attr(study: optuna.Study, trial: Trial, key: str, value: Any) -> None:
    """Set a user attribute of ``trial``, also of a FrozenTrial (which has no setter).

    Args:
        study: the trial's study.
        trial: the trial.
        key: the attribute's name.
        value: its new value (JSON-serializable).
    """
    study._storage.set_trial_user_attr(trial._trial_id, key, value)
