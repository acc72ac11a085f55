"""The ``[optuna]`` table of a sweep file: validation, and what Optuna needs from it.

A sweep file for ``python -m study.optuna`` carries, besides the usual keys (``env``,
``total_steps``, ``seeds``, ``[hyperparameters]``, ``[eval]``)::

    [optuna]
    n_trials = 60
    seeds_per_trial = 5          # tuning seeds; the same for every trial (paired comparisons)
    objective = "iqm"            # iqm | median | mean | cvar25 (mean of the worst quarter) of...
    metric = "final_return"      # ...final_return | final_eval_return | auc
    sampler = "tpe"              # tpe | random | gp | cmaes | grid
    pruner = "median"            # none | median | halving | hyperband
    test_seeds = 10              # held-out seeds for --confirm, disjoint from tuning seeds
    [optuna.space]
    policy_lr = { low = 1e-4, high = 1e-1, log = true }
    value_iters = { low = 1, high = 80 }          # an int hyperparameter: an int range
    gamma = { choices = [0.99, 0.995, 0.999] }    # (or gamma = [0.99, 0.995, 0.999])

Optional keys: ``sampler_seed`` (0), ``trials_per_batch`` (``max(1, 64 // seeds_per_trial)``:
trials trained together as one population), ``pruner_startup_trials`` (5: finished trials
before the pruner may prune), ``pruner_warmup_steps`` (``total_steps // 5``: env steps a
trial trains before it can be pruned) and ``confirm_top`` (5: configs re-run on the test
seeds at the end of a study).

Pruners: ``median`` (Optuna's MedianPruner with the startup trials and warm-up above),
``halving`` (successive halving) and ``hyperband`` (Hyperband over successive-halving
brackets), both with ``min_resource`` the first log point at or after the warm-up and,
for ``hyperband``, ``max_resource = total_steps``; steps are env steps of log points.
``wilcoxon`` is refused: it needs independent problem instances as steps, and the log
points of a learning curve are not.

:func:`parse_optuna` checks all of it before anything runs, as :mod:`study.sweeps.spec` does for
grids: every problem is a one-line :class:`~study.config.ConfigError` naming the file and
the key. :class:`OptunaSettings` then turns the table into Optuna distributions, a sampler,
a pruner and the objective (an aggregate over seeds).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from study.analysis import stats
from study.config import SPECS, ConfigError, check_name, coerce
from study.sweeps.spec import format_value

__all__ = [
    "DROPPED_PRUNERS",
    "METRICS",
    "OBJECTIVES",
    "OPTUNA_KEYS",
    "PRUNERS",
    "SAMPLERS",
    "OptunaSettings",
    "Param",
    "aggregate",
    "parse_optuna",
]

OBJECTIVES: dict[str, str] = {
    "iqm": "interquartile mean over seeds",
    "median": "median over seeds",
    "mean": "mean over seeds",
    "cvar25": "mean of the worst quarter of the seeds",
}
METRICS: dict[str, str] = {
    "final_return": "mean return of the episodes finished in the last 10% of training",
    "final_eval_return": "return of the last evaluation (needs [eval] every > 0)",
    "auc": "mean episode_return over all log points (area under the learning curve)",
}
SAMPLERS: tuple[str, ...] = ("tpe", "random", "gp", "cmaes", "grid")
PRUNERS: tuple[str, ...] = ("none", "median", "halving", "hyperband")
#: Pruners once offered and why they are not: a sweep naming one gets this as its error.
DROPPED_PRUNERS: dict[str, str] = {
    "wilcoxon": "it compares trials step by step as independent problem instances, and the "
                "log points of one learning curve are not independent",
}

#: Keys of the [optuna] table and what each must be (shown in error messages).
OPTUNA_KEYS: dict[str, str] = {
    "n_trials": "an integer >= 1",
    "seeds_per_trial": "an integer >= 1",
    "objective": "one of " + ", ".join(OBJECTIVES),
    "metric": "one of " + ", ".join(METRICS),
    "sampler": "one of " + ", ".join(SAMPLERS),
    "pruner": "one of " + ", ".join(PRUNERS),
    "test_seeds": "an integer >= 1",
    "sampler_seed": "an integer >= 0",
    "trials_per_batch": "an integer >= 1",
    "pruner_startup_trials": "an integer >= 0",
    "pruner_warmup_steps": "an integer >= 0 and < total_steps",
    "confirm_top": "an integer >= 1",
    "space": "a table of hyperparameter = { low, high[, log, step] } or { choices = [...] }",
}
_RANGE_KEYS = ("low", "high", "log", "step")
_ENTRY_KEYS = (*_RANGE_KEYS, "choices")
DEFAULT_N_TRIALS = 50
DEFAULT_SEEDS_PER_TRIAL = 5
DEFAULT_TEST_SEEDS = 10  # used by --confirm when the table sets no test_seeds
POPULATION_TARGET = 64  # default batch: about this many runs (trials x seeds) per population


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _label(value: Any) -> Any:
    """The value as an Optuna categorical choice (JSON-safe scalars only).

    Int lists become "[64, 64]" and an infinite float becomes "inf"; everything else (bool,
    int, finite float, str) is kept, so params read naturally in Optuna's own tools.
    """
    if isinstance(value, tuple):
        return format_value(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


# --------------------------------------------------------------------------------------
# one searched hyperparameter


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter: a float or int range, or a list of choices.

    ``choices`` holds canonical values (as :func:`study.config.coerce` returns them) and
    ``labels`` the matching Optuna choices (see :func:`_label`).
    """

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.labels))
        assert self.low is not None and self.high is not None  # a range has both ends
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,
                                   step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                 step=None if self.step is None else float(self.step))

    def value(self, raw: Any) -> Any:
        """The canonical hyperparameter value of an Optuna param value ``raw``."""
        if self.kind == "categorical":
            for label, choice in zip(self.labels, self.choices, strict=True):
                # type() too: True == 1 in Python, but they are different choices.
                if type(label) is type(raw) and label == raw:
                    return choice
            raise ValueError(f"{raw!r} is not a choice of {self.name}")
        if self.kind == "int":
            return int(raw)
        return float(raw)

    def column_value(self, raw: Any) -> Any:
        """The value as stored in a ``param_<name>`` column (int lists as "[64, 64]")."""
        v = self.value(raw)
        return format_value(v) if isinstance(v, tuple) else v

    def to_jsonable(self) -> dict[str, Any]:
        """The entry as written in a sweep file (for the study's settings record)."""
        if self.kind == "categorical":
            return {"choices": [_label(c) for c in self.choices]}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    @property
    def grid_values(self) -> list[Any]:
        """Every value of the parameter, for the grid sampler (choices only)."""
        return list(self.labels)


def _parse_param(name: str, entry: Any, where: str) -> Param:
    spec = check_name(name, where)
    w = f"{where}{name}: "
    if isinstance(entry, list):  # shorthand: name = [a, b, c]
        entry = {"choices": entry}
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{w}{entry!r} is invalid: expected {{ low = L, high = H }} (optionally log = true, "
            f"step = S) or {{ choices = [...] }}"
        )
    for key in entry:
        if key not in _ENTRY_KEYS:
            raise ConfigError(
                f"{w}unknown key {key!r}; allowed: {', '.join(_ENTRY_KEYS)}"
            )
    if "choices" in entry:
        extra = [k for k in _RANGE_KEYS if k in entry]
        if extra:
            raise ConfigError(
                f"{w}choices cannot be combined with {', '.join(extra)}: expected either "
                f"{{ low, high }} or {{ choices = [...] }}"
            )
        values = entry["choices"]
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{w}choices = {values!r} is invalid: expected a non-empty list, each value "
                f"{spec.allowed}"
            )
        choices = tuple(coerce(name, v, w) for v in values)
        for a, b in itertools.combinations(choices, 2):
            if a == b and type(a) is type(b):
                raise ConfigError(f"{w}choices lists {format_value(a)} twice: expected "
                                  f"distinct values")
        return Param(name, "categorical", choices=choices,
                     labels=tuple(_label(c) for c in choices))

    if spec.kind not in ("int", "float"):
        raise ConfigError(
            f"{w}a range is invalid for this hyperparameter: expected {{ choices = [...] }}, "
            f"each {spec.allowed}"
        )
    for key in ("low", "high"):
        if key not in entry:
            raise ConfigError(f"{w}missing {key!r}: expected {{ low = L, high = H }} or "
                              f"{{ choices = [...] }}")
    bounds = []
    for key in ("low", "high"):
        v = entry[key]
        ok = _is_int(v) if spec.kind == "int" else (_is_number(v) and math.isfinite(v))
        if not ok:
            what = "an integer" if spec.kind == "int" else "a finite number"
            raise ConfigError(f"{w}{key} = {v!r} is invalid: expected {what} "
                              f"({name} is {spec.allowed})")
        # The bounds themselves must be allowed values of the hyperparameter.
        bounds.append(coerce(name, v, f"{w}{key}: "))
    low, high = bounds
    if low >= high:
        raise ConfigError(f"{w}low = {low} >= high = {high} is invalid: expected low < high")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{w}log = {log!r} is invalid: expected true or false")
    if log and low <= 0:
        raise ConfigError(f"{w}log = true needs low > 0 (got low = {low})")
    step = entry.get("step")
    if step is not None:
        if log:
            raise ConfigError(f"{w}step cannot be combined with log = true")
        ok = _is_int(step) if spec.kind == "int" else _is_number(step)
        if not ok or step <= 0 or (not math.isfinite(step)):
            what = "an integer >= 1" if spec.kind == "int" else "a number > 0"
            raise ConfigError(f"{w}step = {step!r} is invalid: expected {what}")
        if step > high - low:
            raise ConfigError(f"{w}step = {step} is invalid: expected at most high - low = "
                              f"{high - low}")
        step = int(step) if spec.kind == "int" else float(step)
    return Param(name, spec.kind, low=low, high=high, log=log, step=step)


# --------------------------------------------------------------------------------------
# objectives


#: The objectives on finite values (study.analysis.stats imports SciPy only when a function
#: needs it, so a worker that scores an objective starts without it).
_OBJECTIVE_FNS: dict[str, Callable[[np.ndarray], float]] = {
    "iqm": lambda v: float(stats.iqm(v)),
    "median": lambda v: float(np.median(v)),
    "mean": lambda v: float(np.mean(v)),
    "cvar25": lambda v: stats.cvar(v, 0.25),
}


def aggregate(objective: str, values: Sequence[float] | np.ndarray) -> float:
    """The objective (``iqm`` | ``median`` | ``mean`` | ``cvar25``) of per-seed values.

    NaN values are skipped; NaN if there is no finite value.
    """
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return _OBJECTIVE_FNS[objective](x)


# --------------------------------------------------------------------------------------
# the table


def _grid_sampler_class() -> type:
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler without its ``study.stop()`` at the end of the grid.

        ``Study.stop`` only works inside ``Study.optimize``; under ask-and-tell it raises
        from ``tell``. The driver caps the number of trials at the grid size instead.
        """

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return AskTellGridSampler


def _AskTellGridSampler(search_space: Mapping[str, Sequence[Any]], seed: int) -> Any:  # noqa: N802
    return _grid_sampler_class()(search_space, seed=seed)



@dataclass(frozen=True)
class OptunaSettings:
    """A validated ``[optuna]`` table."""

    n_trials: int
    seeds_per_trial: int
    objective: str
    metric: str
    sampler: str
    pruner: str
    test_seeds: int | None  # None: the table sets none (no confirmation at the end)
    sampler_seed: int
    trials_per_batch: int
    pruner_startup_trials: int
    pruner_warmup_steps: int
    confirm_top: int
    space: tuple[Param, ...]

    # -- the search space --------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.space)

    def param(self, name: str) -> Param:
        for p in self.space:
            if p.name == name:
                return p
        raise KeyError(name)

    def distributions(self) -> dict[str, Any]:
        """``{name: optuna distribution}`` for ``study.ask(fixed_distributions=...)``."""
        return {p.name: p.distribution() for p in self.space}

    def overrides(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical hyperparameter values of a trial's Optuna params."""
        return {p.name: p.value(params[p.name]) for p in self.space if p.name in params}

    def grid_size(self) -> int | None:
        """Number of points of the grid sampler's grid (None for other samplers)."""
        if self.sampler != "grid":
            return None
        return math.prod(len(p.labels) for p in self.space)

    def space_jsonable(self) -> dict[str, Any]:
        return {p.name: p.to_jsonable() for p in self.space}

    # -- Optuna objects ------------------------------------------------------------------
    def make_sampler(self, seed: int) -> Any:
        """A fresh sampler seeded with ``seed``.

        TPE runs with ``constant_liar``: the trials of a batch (and of other workers) are
        asked while earlier ones still run, and the lie keeps them from piling up on the
        same spot.
        """
        import warnings

        import optuna

        with warnings.catch_warnings():
            # multivariate/constant_liar/GP are flagged experimental; they are what we want.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if self.sampler == "tpe":
                return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                  constant_liar=True)
            if self.sampler == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            if self.sampler == "gp":
                return optuna.samplers.GPSampler(seed=seed)
            if self.sampler == "cmaes":
                return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
            return _AskTellGridSampler(
                {p.name: p.grid_values for p in self.space}, seed=seed
            )

    def make_pruner(self, log_every: int, total_steps: int) -> Any:
        """The pruner; intermediate values are reported at env-step log points, so
        resources (``min_resource``, ``max_resource``) are env steps of log points."""
        import optuna

        if self.pruner == "none":
            return optuna.pruners.NopPruner()
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=self.pruner_startup_trials,
                n_warmup_steps=self.pruner_warmup_steps,
            )
        low, high = self.pruner_resources(log_every, total_steps)
        if self.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=3)
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=high,
                                              reduction_factor=3)

    def pruner_resources(self, log_every: int, total_steps: int) -> tuple[int, int]:
        """``(min_resource, max_resource)`` of the halving pruners: the first log point
        at or after the warm-up (at least one log point in), and the budget."""
        first = max(1, math.ceil(self.pruner_warmup_steps / log_every)) * log_every
        return min(first, total_steps), total_steps

    def aggregate(self, values: Sequence[float] | np.ndarray) -> float:
        """The objective of per-seed values (NaN skipped)."""
        return aggregate(self.objective, values)

    def describe(self) -> str:
        return (f"{self.objective} of {self.metric} over {self.seeds_per_trial} seeds, "
                f"sampler {self.sampler}, pruner {self.pruner}")


@overload
def _int_key(table: Mapping[str, Any], key: str, default: int, low: int, where: str) -> int:
    ...


@overload
def _int_key(table: Mapping[str, Any], key: str, default: None, low: int,
             where: str) -> int | None:
    ...


def _int_key(table: Mapping[str, Any], key: str, default: int | None, low: int,
             where: str) -> int | None:
    if key not in table:
        return default
    v = table[key]
    if not _is_int(v) or v < low:
        raise ConfigError(f"{where}{key} = {v!r} is invalid: expected {OPTUNA_KEYS[key]}")
    return int(v)


def _choice_key(table: Mapping[str, Any], key: str, default: str,
                allowed: Sequence[str], where: str) -> str:
    v = table.get(key, default)
    if not isinstance(v, str) or v.lower() not in allowed:
        import difflib

        m = difflib.get_close_matches(str(v), list(allowed), n=1)
        hint = f" (did you mean {m[0]!r}?)" if m else ""
        raise ConfigError(f"{where}{key} = {v!r} is invalid{hint}: expected {OPTUNA_KEYS[key]}")
    return v.lower()


def _pruner_key(table: Mapping[str, Any], where: str) -> str:
    v = table.get("pruner")
    if isinstance(v, str) and v.lower() in DROPPED_PRUNERS:
        raise ConfigError(f"{where}pruner = {v!r} is no longer offered: "
                          f"{DROPPED_PRUNERS[v.lower()]}; expected {OPTUNA_KEYS['pruner']} "
                          f"(hyperband: successive halving over the same learning curves)")
    return _choice_key(table, "pruner", "median", PRUNERS, where)


def parse_optuna(
    table: Mapping[str, Any] | None,
    *,
    source: str = "<sweep>",
    fixed: Mapping[str, Any] | None = None,
    total_steps: int,
    eval_every: int = 0,
) -> OptunaSettings:
    """Validate a sweep's ``[optuna]`` table; every problem is a one-line ConfigError.

    ``fixed`` are the sweep's ``[hyperparameters]`` (a key may not be both fixed and
    searched); ``total_steps`` bounds the pruner warm-up; ``eval_every`` must be on for
    ``metric = "final_eval_return"``.
    """
    where = f"{source}: [optuna] "
    if table is None:
        raise ConfigError(f"{source}: no [optuna] table: expected [optuna] with n_trials, "
                          f"seeds_per_trial, ... and an [optuna.space] table to search")
    unknown = [k for k in table if k not in OPTUNA_KEYS]
    if unknown:
        import difflib

        m = difflib.get_close_matches(unknown[0], list(OPTUNA_KEYS), n=1)
        hint = f" (did you mean {m[0]!r}?)" if m else ""
        raise ConfigError(f"{where}unknown key {unknown[0]!r}{hint}; allowed: "
                          f"{', '.join(OPTUNA_KEYS)}")
    n_trials = _int_key(table, "n_trials", DEFAULT_N_TRIALS, 1, where)
    spt = _int_key(table, "seeds_per_trial", DEFAULT_SEEDS_PER_TRIAL, 1, where)
    objective = _choice_key(table, "objective", "iqm", tuple(OBJECTIVES), where)
    metric = _choice_key(table, "metric", "final_return", tuple(METRICS), where)
    sampler = _choice_key(table, "sampler", "tpe", SAMPLERS, where)
    pruner = _pruner_key(table, where)
    test_seeds = _int_key(table, "test_seeds", None, 1, where)
    sampler_seed = _int_key(table, "sampler_seed", 0, 0, where)
    batch = _int_key(table, "trials_per_batch", max(1, POPULATION_TARGET // spt), 1, where)
    startup = _int_key(table, "pruner_startup_trials", 5, 0, where)
    warmup = _int_key(table, "pruner_warmup_steps", total_steps // 5, 0, where)
    if warmup >= total_steps:
        raise ConfigError(f"{where}pruner_warmup_steps = {warmup} is invalid: expected "
                          f"{OPTUNA_KEYS['pruner_warmup_steps']} = {total_steps}")
    confirm_top = _int_key(table, "confirm_top", 5, 1, where)
    if metric == "final_eval_return" and eval_every <= 0:
        raise ConfigError(f"{where}metric = 'final_eval_return' needs evaluation: expected "
                          f"[eval] every > 0")
    if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ConfigError(f"{where}sampler = 'cmaes' needs the 'cmaes' package "
                          f"(pip install cmaes); expected another sampler or cmaes installed")

    space_raw = table.get("space")
    swhere = f"{source}: [optuna.space] "
    if space_raw is None:
        raise ConfigError(f"{source}: missing [optuna.space]: expected a table of "
                          f"hyperparameter = {{ low, high }} or {{ choices = [...] }}")
    if not isinstance(space_raw, dict):
        raise ConfigError(f"{where}space = {space_raw!r} is invalid: expected "
                          f"{OPTUNA_KEYS['space']}")
    if not space_raw:
        raise ConfigError(f"{swhere}is empty: expected at least one hyperparameter to search")
    fixed = fixed or {}
    space = []
    for name, entry in space_raw.items():
        check_name(name, swhere)
        if name in fixed:
            raise ConfigError(
                f"{swhere}{name} is also set in [hyperparameters]; expected each "
                f"hyperparameter in at most one of [hyperparameters] and [optuna.space]"
            )
        space.append(_parse_param(name, entry, swhere))
    if sampler == "grid":
        ranged = [p.name for p in space if p.kind != "categorical"]
        if ranged:
            raise ConfigError(f"{swhere}{ranged[0]}: sampler = 'grid' needs "
                              f"{{ choices = [...] }} for every searched hyperparameter")
    return OptunaSettings(
        n_trials=int(n_trials), seeds_per_trial=int(spt), objective=objective, metric=metric,
        sampler=sampler, pruner=pruner, test_seeds=test_seeds, sampler_seed=int(sampler_seed),
        trials_per_batch=int(batch), pruner_startup_trials=int(startup),
        pruner_warmup_steps=int(warmup), confirm_top=int(confirm_top), space=tuple(space),
    )


def is_structural(name: str) -> bool:
    """Whether searching ``name`` splits a batch into several populations."""
    return SPECS[name].structural
