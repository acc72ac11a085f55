"""Which hyperparameters matter, for grid studies too: PED-ANOVA over the grid's configs.

Optuna's importance evaluators work on trials; a grid's configs are turned into trials
with ``optuna.trial.create_trial`` (one per config, its value the mean score over seeds)
and scored with PED-ANOVA (Watanabe et al. 2023: how differently each hyperparameter is
distributed among the top quantile of configs than among all of them; it needs no
scikit-learn, unlike fANOVA). Eimer et al. (2023) found such rankings seed-sensitive, so
:func:`importance_table` also ranks them on each seed alone and reports how often a
seed's most important hyperparameter is the overall one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["MIN_CONFIGS", "importance_table", "importances"]

#: PED-ANOVA compares the top 10% of configs with all of them: below this many configs
#: the comparison is degenerate (a 2 x 2 grid gives every hyperparameter 0.5), so the
#: importance is reported as not estimable (NaN).
MIN_CONFIGS = 8


def _distribution(values: Sequence[object]) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    numeric = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numeric) == len(values) and all(math.isfinite(float(v)) for v in numeric):
        lo, hi = float(min(numeric)), float(max(numeric))
        return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 10)
    return CategoricalDistribution(sorted({str(v) for v in values}))


def importances(configs: pd.DataFrame, axes: Sequence[str], value: str) -> pd.Series:
    """PED-ANOVA importance of each of ``axes`` (NaN when it cannot be computed: fewer than
    two configs, or a constant value), from one row per config with column ``value``."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import create_trial

    axes = [a for a in axes if configs[a].nunique() > 1]
    rows = configs[np.isfinite(configs[value].astype(float))]
    if len(rows) < MIN_CONFIGS or not axes or rows[value].nunique() < 2:
        return pd.Series(np.nan, index=list(axes), dtype=float)
    dists = {a: _distribution(rows[a].tolist()) for a in axes}
    trials = [create_trial(
        params={a: (str(r[a]) if isinstance(dists[a], CategoricalDistribution)
                    else float(r[a])) for a in axes},
        distributions=dists, value=float(r[value])) for _, r in rows.iterrows()]
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="maximize")
        study.add_trials(trials)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices
            got = optuna.importance.get_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator(), normalize=True)
    except (ValueError, RuntimeError):
        return pd.Series(np.nan, index=list(axes), dtype=float)
    finally:
        optuna.logging.set_verbosity(previous)
    return pd.Series({a: float(got.get(a, np.nan)) for a in axes}, dtype=float)


def importance_table(runs: pd.DataFrame, axes: Sequence[str],
                     value: str = "normalized_return") -> pd.DataFrame:
    """One row per hyperparameter: its importance across tasks (configs scored by their
    mean ``value`` over tasks and seeds), per task (mean ``final_return`` over seeds), and
    ``top_on_seeds``: the fraction of seeds on which, ranked by that seed's runs alone, it
    is the most important hyperparameter (1.0: every seed agrees)."""
    keys = list(axes)
    overall = importances(runs.groupby(keys, as_index=False)[value].mean(), keys, value)
    table = pd.DataFrame({"importance": overall})
    for env, group in runs.groupby("env", sort=True):
        per_task = group.groupby(keys, as_index=False)["final_return"].mean()
        table[str(env)] = importances(per_task, keys, "final_return")
    best = overall.idxmax() if overall.notna().any() else None
    tops = []
    for _, group in runs.groupby("seed"):
        imp = importances(group.groupby(keys, as_index=False)[value].mean(), keys, value)
        if imp.notna().any():
            tops.append(imp.idxmax())
    table["top_on_seeds"] = [
        (sum(t == a for t in tops) / len(tops)) if tops and best is not None else np.nan
        for a in table.index]
    return table.sort_values("importance", ascending=False).rename_axis("hyperparameter")
