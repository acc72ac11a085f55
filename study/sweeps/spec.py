"""Sweep files: parsing, validation, expansion into runs, and a resolved TOML form.

A sweep file (``sweeps/*.toml``) names an environment, a training budget, seeds, fixed
hyperparameters and a grid of hyperparameter axes. :func:`load_sweep` validates all of it
before anything runs and raises :class:`~study.config.ConfigError` with a one-line message
naming the file, the key and what is allowed. :meth:`Sweep.runs` expands configs x seeds
into :class:`Run` objects with deterministic ids, so a store can tell which runs it holds.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from study.config import (
    ALE_ONLY,
    ID_OMIT_AT_DEFAULT,
    SPECS,
    ConfigError,
    check_name,
    coerce,
    env_defaults,
    env_family,
    resolve,
    to_jsonable,
)
from study.text import format_value  # re-exported: runner and search_space import it here

__all__ = [
    "Run",
    "Sweep",
    "config_id",
    "format_value",
    "grid_axes",
    "load_sweep",
    "parse_sweep",
    "run_id",
    "sweep_to_toml",
    "validate_env_id",
]

#: Top-level keys of a sweep file and what each must be (shown in error messages).
TOP_LEVEL: dict[str, str] = {
    "name": "a name of at most 100 letters, digits, '.', '_' or '-'",
    "description": "a string",
    "env": "a registered gymnasium environment id, or a list of distinct ids",
    "total_steps": "an integer in [1, 10**12]",
    "log_every": "an integer >= 1 and <= total_steps",
    "seeds": "a non-empty list of distinct integers >= 0, or { count = N, base = B }",
    "save_policies": "true or false",
    "hyperparameters": "a table of hyperparameter = value",
    "grid": "a table of hyperparameter = [values, ...]",
    "eval": "a table with every (env steps, 0 = off) and episodes",
    "optuna": "a table (read by study.optuna; ignored by grid sweeps)",
    "overrides": 'per-env tables, e.g. [overrides."Pendulum-v1"] total_steps = 200_000',
    "normalize": 'per-env score references, e.g. "CartPole-v1" = [22.3, 475.0]',
}
#: Keys an [overrides."<env>"] table may set besides hyperparameters.
_OVERRIDE_BUDGET = ("total_steps", "log_every")
_REQUIRED = ("env", "total_steps", "seeds")
_EVAL_KEYS = {"every": "an integer in [0, total_steps] (env steps; 0 = no evaluation)",
              "episodes": "an integer in [1, 100_000]"}
_SEED_KEYS = {"count": "an integer in [1, 1_000_000]", "base": "an integer >= 0"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: Limits that keep a typo from becoming a hang or an out-of-memory: a sweep file is read
#: up to MAX_FILE_BYTES, a budget is at most MAX_STEPS env steps per run (int64-safe with
#: room for S * E), and a sweep expands to at most MAX_RUNS runs.
MAX_FILE_BYTES = 1 << 20
MAX_STEPS = 10**12
MAX_RUNS = 1_000_000
MAX_EPISODES = 100_000
# Seeds are stored in an int64 Parquet column.
_MAX_SEED = 2**63 - 1
_ID_LEN = 16


def _suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _is_int(value: Any) -> bool:
    # TOML booleans are Python bools, which are ints; they are never valid integers here.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Budget:
    """How long runs train and how they are measured: the part of a run's identity that
    is not its hyperparameters or seed."""

    #: env steps per run (the trainer rounds up to whole updates)
    total_steps: int
    #: env steps between curve points
    log_every: int
    #: env steps between evaluations (0: none)
    eval_every: int = 0
    #: episodes per evaluation
    eval_episodes: int = 10

    def config_id(self, env: str, hp: Mapping[str, Any]) -> str:
        """:func:`study.sweeps.spec.config_id` of ``hp`` on ``env`` at this budget.

        Args:
            env: the env id.
            hp: resolved hyperparameters.
        """
        return config_id(env, hp, self.total_steps, self.log_every, self.eval_every,
                         self.eval_episodes)

    def run_id(self, env: str, hp: Mapping[str, Any], seed: int) -> str:
        """:func:`study.sweeps.spec.run_id` of ``hp`` and ``seed`` on ``env`` at this budget.

        Args:
            env: the env id.
            hp: resolved hyperparameters.
            seed: the run's seed.
        """
        return run_id(env, hp, seed, self.total_steps, self.log_every, self.eval_every,
                      self.eval_episodes)

    def train_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`study.trainer.population.train_population`
        after ``total_steps``."""
        return {"log_every": self.log_every, "eval_every": self.eval_every,
                "eval_episodes": self.eval_episodes}


@dataclass(frozen=True)
class Run:
    """One training run: a resolved config and a seed."""

    run_id: str
    config_id: str
    seed: int
    hyperparameters: Mapping[str, Any] = field(compare=False)
    env: str = field(default="", compare=False)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file. ``fixed`` and ``grid`` hold canonical (coerced) values.

    ``env`` is the first (often the only) environment; ``envs`` all of them, each run
    with every config and seed. ``overrides[env]`` holds that env's own budget
    (``total_steps``, ``log_every``) and fixed hyperparameters; ``normalize[env]`` its
    ``(low, high)`` score references.
    """

    name: str
    env: str
    total_steps: int
    log_every: int
    seeds: tuple[int, ...]
    fixed: Mapping[str, Any]
    grid: Mapping[str, tuple[Any, ...]]
    description: str = ""
    save_policies: bool = False
    eval_every: int = 0
    eval_episodes: int = 10
    optuna: Mapping[str, Any] | None = None
    source: str = "<sweep>"
    envs: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    normalize: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.envs:
            object.__setattr__(self, "envs", (self.env,))

    def budget(self, env: str) -> Budget:
        """The budget of the runs on ``env`` (its ``[overrides]`` included)."""
        own = self.overrides.get(env, {})
        return Budget(int(own.get("total_steps", self.total_steps)),
                      int(own.get("log_every", self.log_every)), self.eval_every,
                      self.eval_episodes)

    def configs(self, env: str | None = None) -> list[dict[str, Any]]:
        """Every resolved config of the grid on ``env`` (default: the first env; file
        order, the last axis varies fastest)."""
        own = {k: v for k, v in self.overrides.get(env or self.env, {}).items()
               if k not in ("total_steps", "log_every")}
        axes = list(self.grid.items())
        out = []
        for combo in itertools.product(*(values for _, values in axes)):
            overrides = {**self.fixed, **own}
            overrides.update({name: value for (name, _), value in zip(axes, combo, strict=True)})
            out.append(resolve(overrides, f"{self.source}: ", env=env or self.env))
        return out

    def runs(self) -> list[Run]:
        """envs x configs x seeds, env-major then config-major (all seeds of config 0,
        then config 1, ...)."""
        out: list[Run] = []
        for env in self.envs:
            budget = self.budget(env)
            for hp in self.configs(env):
                cid = budget.config_id(env, hp)
                out.extend(Run(budget.run_id(env, hp, seed), cid, seed, hp, env)
                           for seed in self.seeds)
        return out

    @property
    def n_configs(self) -> int:
        """Configs per environment."""
        return math.prod(len(v) for v in self.grid.values())

    @property
    def n_runs(self) -> int:
        return self.n_configs * len(self.seeds) * len(self.envs)

    @property
    def env_steps(self) -> int:
        """Env steps the whole sweep asks for (before any rounding by the trainer)."""
        return sum(self.budget(e).total_steps * self.n_configs * len(self.seeds)
                   for e in self.envs)


# --------------------------------------------------------------------------------------
# ids


def _digest(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha1(text.encode()).hexdigest()[:_ID_LEN]


def _id_payload(env: str, hp: Mapping[str, Any], total_steps: int, log_every: int,
                eval_every: int, eval_episodes: int) -> dict[str, Any]:
    resolved = {k: v for k, v in resolve(hp).items()
                if not (k in ID_OMIT_AT_DEFAULT and v == SPECS[k].default)}
    payload: dict[str, Any] = {
        "env": env,
        "hyperparameters": to_jsonable(resolved),
        "total_steps": int(total_steps),
        "log_every": int(log_every),
    }
    # Evaluation changes stored values (eval_return, final_eval_return), so a sweep whose
    # evaluation settings change must not reuse old runs. It enters the hash only when on,
    # so sweeps without evaluation hash exactly (env, hyperparameters, seed, steps, log).
    if eval_every > 0:
        payload["eval"] = {"every": int(eval_every), "episodes": int(eval_episodes)}
    return payload


def config_id(env: str, hp: Mapping[str, Any], total_steps: int, log_every: int,
              eval_every: int = 0, eval_episodes: int = 10) -> str:
    """16 hex chars identifying a config (a run id without the seed)."""
    return _digest(_id_payload(env, hp, total_steps, log_every, eval_every, eval_episodes))


def run_id(env: str, hp: Mapping[str, Any], seed: int, total_steps: int, log_every: int,
           eval_every: int = 0, eval_episodes: int = 10) -> str:
    """16 hex chars: sha1 of the canonical JSON of env, resolved hyperparameters, seed,
    total_steps and log_every (and the evaluation settings when evaluation is on)."""
    payload = _id_payload(env, hp, total_steps, log_every, eval_every, eval_episodes)
    payload["seed"] = int(seed)
    return _digest(payload)


# --------------------------------------------------------------------------------------
# parsing


def validate_env_id(env: str, where: str = "") -> str:
    """``env`` if gymnasium knows it; otherwise ConfigError with the closest registered id.

    ``module:EnvName-v0`` (gymnasium's form for an env registered by importing a module)
    imports the module: a sweep file is trusted code, as a script would be.
    """
    import gymnasium as gym

    from study.trainer.envs import env_spaces, register_envs, register_namespace

    register_envs()  # CartPoleSwingUp-v0/v1
    try:
        register_namespace(env)  # ALE/*, MinAtar/*: their package, or the extra to install
    except ConfigError as e:
        raise ConfigError(f"{where}env = {env!r}: {e}") from None
    if ":" not in env and env not in gym.registry:
        raise ConfigError(
            f"{where}env = {env!r} is not a registered gymnasium environment"
            f"{_suggest(env, gym.registry.keys())}; expected an id such as 'CartPole-v1'"
        )
    # Registered is not enough: the env must also be makeable, with spaces the trainer
    # supports (e.g. an optional dependency may be missing).
    try:
        env_spaces(env)
    except ConfigError as e:
        raise ConfigError(f"{where}env = {env!r}: {e}") from None
    return env


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file. Every problem is a one-line ConfigError."""
    p = Path(path)
    src = str(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such sweep file") from None
    except IsADirectoryError:
        raise ConfigError(f"{src}: is a directory, expected a .toml sweep file") from None
    except OSError as e:
        raise ConfigError(f"{src}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{src}: larger than {MAX_FILE_BYTES // 1024} KiB; expected a TOML "
                          f"sweep file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{src}: not valid UTF-8 text, expected a TOML sweep file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{src}: malformed TOML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"{src}: arrays or tables nested too deeply; expected a TOML sweep "
                          f"file") from None
    return parse_sweep(data, source=src, default_name=p.stem)


def _int_value(value: Any, key: str, allowed: str, low: int, where: str,
               high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ConfigError(f"{where}{key} = {value!r} is invalid: expected {allowed}")
    return int(value)


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"{where}unknown key {key!r}{_suggest(key, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key} = {value!r} is invalid: expected {TOP_LEVEL[key]}")
    return value


def _parse_seeds(value: Any, where: str) -> tuple[int, ...]:
    allowed = TOP_LEVEL["seeds"]
    if isinstance(value, dict):
        _check_keys(value, _SEED_KEYS, f"{where}[seeds] ")
        if "count" not in value:
            raise ConfigError(f"{where}seeds table needs count; expected {allowed}")
        count = _int_value(value["count"], "seeds.count", _SEED_KEYS["count"], 1, where,
                           MAX_RUNS)
        base = _int_value(value.get("base", 0), "seeds.base", _SEED_KEYS["base"], 0, where)
        if base + count - 1 > _MAX_SEED:
            raise ConfigError(f"{where}seeds.base + count exceeds 2**63 - 1")
        return tuple(range(base, base + count))
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}seeds = {value!r} is invalid: expected {allowed}")
    seen: set[int] = set()
    for s in value:
        if not _is_int(s) or not 0 <= s <= _MAX_SEED:
            raise ConfigError(
                f"{where}seeds: {s!r} is invalid: expected integers >= 0 (and < 2**63)"
            )
        if s in seen:
            raise ConfigError(f"{where}seeds: {s} appears twice; expected distinct seeds")
        seen.add(s)
    return tuple(int(s) for s in value)


def parse_sweep(data: Mapping[str, Any], source: str = "<sweep>",
                default_name: str | None = None) -> Sweep:
    """Validate a parsed sweep file (a dict from tomllib) and return a :class:`Sweep`."""
    where = f"{source}: "
    _check_keys(data, TOP_LEVEL, where)
    grid_env = isinstance(data.get("grid"), dict) and "env" in data["grid"]
    for key in _REQUIRED:
        if key not in data and not (key == "env" and grid_env):
            raise ConfigError(f"{where}missing required key {key!r}: expected {TOP_LEVEL[key]}")

    name = data.get("name", default_name)
    if name is None:
        raise ConfigError(f"{where}missing required key 'name': expected {TOP_LEVEL['name']}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{where}name = {name!r} is invalid: expected {TOP_LEVEL['name']}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where}description = {description!r} is invalid: expected a string")
    envs = _parse_envs(data, where)
    env = envs[0]
    total_steps = _int_value(data["total_steps"], "total_steps", TOP_LEVEL["total_steps"], 1,
                             where, MAX_STEPS)
    log_every = _int_value(data.get("log_every", min(1000, total_steps)), "log_every",
                           TOP_LEVEL["log_every"], 1, where)
    if log_every > total_steps:
        raise ConfigError(
            f"{where}log_every = {log_every} is invalid: expected at most total_steps = "
            f"{total_steps}"
        )
    seeds = _parse_seeds(data["seeds"], where)
    save_policies = data.get("save_policies", False)
    if not isinstance(save_policies, bool):
        raise ConfigError(
            f"{where}save_policies = {save_policies!r} is invalid: expected true or false"
        )

    fixed_raw = _table(data, "hyperparameters", where)
    fixed = {k: coerce(k, v, f"{where}[hyperparameters] ") for k, v in fixed_raw.items()}

    grid_raw = {k: v for k, v in _table(data, "grid", where).items() if k != "env"}
    grid: dict[str, tuple[Any, ...]] = {}
    for key, values in grid_raw.items():
        gwhere = f"{where}[grid] "
        spec = check_name(key, gwhere)
        if key in fixed:
            raise ConfigError(
                f"{gwhere}{key} is also set in [hyperparameters]; expected each hyperparameter "
                f"in at most one of [hyperparameters] and [grid]"
            )
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{gwhere}{key} = {values!r} is invalid: expected a non-empty list of values, "
                f"each {spec.allowed}"
            )
        axis = tuple(coerce(key, v, gwhere) for v in values)
        for a, b in itertools.combinations(axis, 2):
            if a == b:
                raise ConfigError(
                    f"{gwhere}{key} lists {format_value(a)} twice; expected distinct values"
                )
        grid[key] = axis

    eval_raw = _table(data, "eval", where)
    _check_keys(eval_raw, _EVAL_KEYS, f"{where}[eval] ")
    eval_every = _int_value(eval_raw.get("every", 0), "eval.every", _EVAL_KEYS["every"], 0,
                            where, total_steps)
    eval_episodes = _int_value(eval_raw.get("episodes", 10), "eval.episodes",
                               _EVAL_KEYS["episodes"], 1, where, MAX_EPISODES)
    optuna = _table(data, "optuna", where) if "optuna" in data else None
    overrides = _parse_overrides(data, envs, grid, where)
    for e, own in overrides.items():
        steps = own.get("total_steps", total_steps)
        if own.get("log_every", log_every) > steps or eval_every > steps:
            raise ConfigError(
                f"{where}[overrides.{json.dumps(e)}] total_steps = {steps} is invalid: "
                f"expected at least log_every and eval.every")

    sweep = Sweep(
        name=name, env=env, total_steps=total_steps, log_every=log_every, seeds=seeds,
        fixed=fixed, grid=grid, description=description, save_policies=save_policies,
        eval_every=eval_every, eval_episodes=eval_episodes, optuna=optuna, source=source,
        envs=envs, overrides=overrides, normalize=_parse_normalize(data, envs, where),
    )
    if sweep.n_runs > MAX_RUNS:
        raise ConfigError(
            f"{where}{sweep.n_configs:,} configs x {len(seeds):,} seeds = {sweep.n_runs:,} runs; "
            f"expected at most {MAX_RUNS:,} (split the sweep, or shorten the [grid] axes)")
    # Cross-key constraints (e.g. n_minibatches <= num_envs * n_steps) can only fail for
    # some grid points; resolve every config now so nothing fails after runs have started.
    for e in envs:
        sweep.configs(e)
    return sweep


def _parse_envs(data: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """``env = "id"``, ``env = ["id", ...]`` or ``[grid] env = [...]``: distinct,
    validated ids."""
    grid: dict[str, Any] = data["grid"] if isinstance(data.get("grid"), dict) else {}
    if "env" in data and "env" in grid:
        raise ConfigError(f"{where}env is set both at the top and in [grid]; expected one")
    key, raw = ("[grid] env", grid["env"]) if "env" in grid else ("env", data["env"])
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{where}{key} = {raw!r} is invalid: expected {TOP_LEVEL['env']}")
    if len(set(values)) < len(values):
        raise ConfigError(f"{where}{key} lists an environment twice; expected distinct ids")
    for v in values:
        validate_env_id(v, where)
    return tuple(values)


def _check_swept(env: str, envs: Sequence[str], where: str) -> None:
    if env not in envs:
        raise ConfigError(f"{where}names an environment the sweep does not run; expected one "
                          f"of {', '.join(envs)}")


def _parse_overrides(data: Mapping[str, Any], envs: Sequence[str],
                     grid: Mapping[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``[overrides."<env>"]``: that env's budget and fixed hyperparameters."""
    out: dict[str, dict[str, Any]] = {}
    for env, table in _table(data, "overrides", where).items():
        owhere = f"{where}[overrides.{json.dumps(env)}] "
        _check_swept(env, envs, owhere)
        if not isinstance(table, dict):
            raise ConfigError(f"{owhere}is invalid: expected a table of key = value")
        own: dict[str, Any] = {}
        for key, value in table.items():
            if key in _OVERRIDE_BUDGET:
                own[key] = _int_value(value, key, "an integer in [1, 10**12]", 1, owhere,
                                      MAX_STEPS)
            elif key in grid:
                raise ConfigError(f"{owhere}{key} is a [grid] axis; expected per-env values "
                                  f"of fixed hyperparameters only")
            else:
                own[key] = coerce(key, value, owhere)
        out[env] = own
    return out


def _parse_normalize(data: Mapping[str, Any], envs: Sequence[str],
                     where: str) -> dict[str, tuple[float, float]]:
    """``[normalize] "<env>" = [low, high]`` with finite low < high, envs of the sweep."""
    out: dict[str, tuple[float, float]] = {}
    for env, value in _table(data, "normalize", where).items():
        nwhere = f"{where}[normalize] {json.dumps(env)} "
        _check_swept(env, envs, nwhere)
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, int | float) and not isinstance(v, bool)
                      and math.isfinite(v) for v in value))
        if not ok or value[0] >= value[1]:
            raise ConfigError(f"{nwhere}= {value!r} is invalid: expected [low, high], two "
                              f"finite numbers with low < high (e.g. a random policy's score "
                              f"and a solved score)")
        out[env] = (float(value[0]), float(value[1]))
    return out


# --------------------------------------------------------------------------------------
# formatting


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_table(lines: list[str], header: str, table: Mapping[str, Any]) -> None:
    """Scalars first under ``[header]``, then sub-tables as ``[header.sub]``."""
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    subs = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines.append("")
    lines.append(f"[{header}]")
    lines.extend(f"{_toml_key(k)} = {_toml_scalar(v)}" for k, v in scalars.items())
    for k, v in subs.items():
        _toml_table(lines, f"{header}.{_toml_key(k)}", v)


def _resolved_fixed(sweep: Sweep) -> dict[str, Any]:
    """The fixed hyperparameters with the defaults filled in: those every env of the sweep
    resolves alike (a default that differs by env family stays implicit), without keys that
    do not apply to these envs (Atari preprocessing elsewhere, cnn_* without a CNN)."""
    fixed = resolve(sweep.fixed, env=sweep.env)
    family_defaults = [env_defaults(e) for e in sweep.envs]
    out = {}
    for k, v in fixed.items():
        if k in sweep.grid:
            continue
        if k not in sweep.fixed and any(d[k] != family_defaults[0][k] for d in family_defaults):
            continue
        if k in ALE_ONLY and all(env_family(e) != "ALE" for e in sweep.envs):
            continue
        if k.startswith("cnn_") and not v and k not in sweep.fixed:
            continue
        out[k] = v
    return out


def sweep_to_toml(sweep: Sweep) -> str:
    """The sweep as resolved: explicit seeds, every hyperparameter not on the grid at its
    resolved value (defaults filled in). Loading the result gives the same runs."""
    lines = [
        f"# Resolved from {sweep.source}: defaults filled in, seeds listed explicitly.",
        f"name = {_toml_scalar(sweep.name)}",
        f"description = {_toml_scalar(sweep.description)}",
        f"env = {_toml_scalar(sweep.env if len(sweep.envs) == 1 else list(sweep.envs))}",
        f"total_steps = {sweep.total_steps}",
        f"log_every = {sweep.log_every}",
        f"seeds = {_toml_scalar(list(sweep.seeds))}",
        f"save_policies = {_toml_scalar(sweep.save_policies)}",
    ]
    _toml_table(lines, "hyperparameters", _resolved_fixed(sweep))
    if sweep.grid:
        _toml_table(lines, "grid", {k: list(values) for k, values in sweep.grid.items()})
    _toml_table(lines, "eval", {"every": sweep.eval_every, "episodes": sweep.eval_episodes})
    for env, own in sweep.overrides.items():
        _toml_table(lines, f"overrides.{json.dumps(env)}", own)
    if sweep.normalize:
        _toml_table(lines, "normalize", {e: list(v) for e, v in sweep.normalize.items()})
    if sweep.optuna is not None:
        _toml_table(lines, "optuna", sweep.optuna)
    return "\n".join(lines) + "\n"


def grid_axes(sweep: Sweep) -> Sequence[str]:
    """Names of the hyperparameters the grid varies (those worth showing per config)."""
    return [k for k, v in sweep.grid.items() if len(v) > 1]

