"""Population environments: fast NumPy/numba ports and a generic gymnasium path.

:func:`make_population_env` is the single entry point: the ids registered in
:data:`FAST_ENVS` (CartPole, CartPoleSwingUp, Acrobot, Pendulum, MountainCar and
MountainCarContinuous; the MinAtar games, stepped without gymnasium's wrappers) get their
population implementations, every other gymnasium id is simulated with one ``gym.make``
instance per (member, environment).
:func:`register_fast_env` adds a port.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym

from study.config import ConfigError
from study.hyperparameters import Structure
from study.trainer.envs.base import PopulationEnv, Step
from study.trainer.envs.cartpole import CartPolePopulation, cartpole_spaces
from study.trainer.envs.classic import CLASSIC_ENVS, classic_spaces
from study.trainer.envs.generic import GymPopulationEnv, check_spaces, population_space
from study.trainer.envs.images import AtariOptions, env_options, make_atari, wrap_images
from study.trainer.envs.minatar import GAMES, MinAtarPopulation, minatar_spaces
from study.trainer.envs.swingup import SwingUpPopulation, swingup_spaces
from study.trainer.rng import STREAM_RESET

__all__ = [
    "FAST_ENVS",
    "FastEnv",
    "PopulationEnv",
    "Step",
    "env_spaces",
    "generic_only",
    "make_population_env",
    "make_single_env",
    "register_envs",
    "register_fast_env",
    "register_namespace",
]


@dataclass(frozen=True)
class FastEnv:
    """A registered population implementation of one gymnasium id.

    ``make(seeds, num_envs, stream)`` builds the population; ``spaces()`` returns the
    observation and action space of one environment (without building anything).
    """

    make: Callable[[Sequence[int], int, int], PopulationEnv]
    spaces: Callable[[], tuple[gym.spaces.Box, gym.spaces.Space]]


#: Ids with a population implementation (same dynamics as their gymnasium version).
FAST_ENVS: dict[str, FastEnv] = {}
_DISABLED: set[str] = set()


def register_fast_env(env_id: str, make: Callable[[Sequence[int], int, int], PopulationEnv],
                      spaces: Callable[[], tuple[gym.spaces.Box, gym.spaces.Space]]) -> None:
    """Make ``env_id`` use ``make(seeds, num_envs, stream)`` instead of the generic path."""
    FAST_ENVS[env_id] = FastEnv(make, spaces)


def _fast(env_id: str) -> FastEnv | None:
    if env_id.startswith("envpool:") and env_id not in FAST_ENVS:  # the envpool backend
        importlib.import_module("study.trainer.envs.envpool_backend").register(env_id)
    return None if env_id in _DISABLED else FAST_ENVS.get(env_id)


@contextlib.contextmanager
def generic_only(*env_ids: str) -> Iterator[None]:
    """Within the block, ``env_ids`` (default: every registered id) take the generic
    gymnasium path: benchmarks measure a port against it, tests compare the two."""
    ids = set(env_ids or FAST_ENVS)
    added = ids - _DISABLED
    _DISABLED.update(added)
    try:
        yield
    finally:
        _DISABLED.difference_update(added)


register_fast_env("CartPole-v0", lambda seeds, n, stream: CartPolePopulation(
    seeds, n, stream, max_episode_steps=200), cartpole_spaces)
register_fast_env("CartPole-v1", lambda seeds, n, stream: CartPolePopulation(
    seeds, n, stream, max_episode_steps=500), cartpole_spaces)
register_fast_env("CartPoleSwingUp-v0", lambda seeds, n, stream: SwingUpPopulation(
    seeds, n, stream, reward_version=0), swingup_spaces)
register_fast_env("CartPoleSwingUp-v1", lambda seeds, n, stream: SwingUpPopulation(
    seeds, n, stream, reward_version=1), swingup_spaces)
def _minatar(env_id: str, seeds: Sequence[int], num_envs: int, stream: int) -> PopulationEnv:
    return MinAtarPopulation(env_id, seeds, num_envs, stream)


for _name in GAMES:  # MinAtar: the games stepped directly (the package is imported lazily)
    for _v in ("v0", "v1"):
        _mid = f"MinAtar/{_name}-{_v}"
        register_fast_env(_mid, functools.partial(_minatar, _mid),
                          functools.partial(minatar_spaces, _mid))
for _id, _cls in CLASSIC_ENVS.items():
    register_fast_env(_id, _cls, functools.cache(functools.partial(classic_spaces,
                                                                   _cls.env_cls)))


def register_envs() -> None:
    """Register CartPoleSwingUp-v0/v1 with gymnasium (idempotent)."""
    for version in ("v0", "v1"):
        env_id = f"CartPoleSwingUp-{version}"
        if env_id not in gym.registry:
            gym.register(
                id=env_id,
                entry_point=f"study.trainer.envs.swingup:CartPoleSwingUp{version.upper()}",
                max_episode_steps=500,
            )


#: Namespaces whose ids exist once a package registers them: namespace -> (module to
#: import, the project's extra that installs it).
NAMESPACES: dict[str, tuple[str, str]] = {
    "ALE": ("ale_py", "atari"),
    "MinAtar": ("minatar", "minatar"),
}


def register_namespace(env_id: str) -> None:
    """Import the package behind ``ALE/...`` or ``MinAtar/...`` ids on demand (gymnasium
    1.x does not load plugins itself); a one-line hint names the extra when missing."""
    namespace = env_id.split("/", 1)[0] if "/" in env_id else ""
    if namespace not in NAMESPACES or env_id in gym.registry:
        return
    module, extra = NAMESPACES[namespace]
    try:
        package = importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"environment {env_id!r} needs the {module!r} package, not installed here: "
            f"pip install -e '.[{extra}]'") from None
    if namespace == "MinAtar":  # minatar 1.0.15 registers its ids only when asked
        importlib.import_module("minatar.gym").register_envs()
    else:
        gym.register_envs(package)


def _resolve(env_id: str) -> None:
    """ConfigError (one line, with close matches) unless ``env_id`` can be made."""
    register_envs()
    register_namespace(env_id)
    name = env_id
    if ":" in env_id:  # gymnasium's "module:EnvName-v0": importing registers the env
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            msg = f"environment {env_id!r}: cannot import module {module!r} ({e})"
            raise ConfigError(msg) from e
    if name not in gym.registry:
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown environment id {env_id!r}{hint}")


def env_spaces(env_id: str, hp: Structure | None = None
               ) -> tuple[gym.spaces.Box, gym.spaces.Space]:
    """``(observation_space, action_space)`` of one environment, as a population env
    built from ``env_id`` (preprocessed as ``hp`` says) reports them: observations flat
    float32, or uint8 ``[C, H, W]`` images.

    Cheap for :data:`FAST_ENVS` (no ``gym.make``); otherwise makes and closes one
    instance. Raises ConfigError for unknown ids and unsupported spaces.
    """
    fast = _fast(env_id)
    if fast is not None:
        return fast.spaces()
    env = make_single_env(env_id, hp)
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    check_spaces(env_id, obs_space, act_space)
    return population_space(cast(gym.spaces.Box, obs_space)), act_space


def _cannot_make(env_id: str, e: Exception) -> ConfigError:
    # e.g. a missing optional dependency (box2d, mujoco); keep the message to one line.
    text = str(e).strip()
    first_line = text.splitlines()[0] if text else type(e).__name__
    return ConfigError(f"environment {env_id!r} cannot be made: {first_line}")


def _instance(env_id: str, options: AtariOptions | None, render_mode: str | None) -> gym.Env:
    if options is not None:
        return wrap_images(make_atari(env_id, options, render_mode))
    kwargs: dict[str, Any] = {} if render_mode is None else {"render_mode": render_mode}
    return wrap_images(gym.make(env_id, **kwargs))


def make_single_env(env_id: str, hp: Structure | None = None,
                    render_mode: str | None = None) -> gym.Env:
    """One instance of ``env_id`` (its module or namespace imported first) as the trainer
    sees it: ``ALE/*`` preprocessed as ``hp`` says (default: the Atari protocol), image
    observations channel-first uint8. ConfigError (one line) when it cannot be made."""
    return make_env_instance(env_id, env_options(env_id, hp), render_mode)


def make_env_instance(env_id: str, options: AtariOptions | None,
                      render_mode: str | None = None) -> gym.Env:
    """:func:`make_single_env` with the preprocessing ``options`` given directly."""
    _resolve(env_id)
    try:
        return _instance(env_id, options, render_mode)
    except gym.error.Error as e:
        raise _cannot_make(env_id, e) from e


def make_population_env(
    env_id: str,
    seeds: Sequence[int],
    num_envs: int,
    stream: int = STREAM_RESET,
    hp: Structure | None = None,
) -> PopulationEnv:
    """A population of ``len(seeds)`` members x ``num_envs`` environments of ``env_id``
    (``ALE/*`` preprocessed as the hyperparameters ``hp`` say).

    ``stream`` picks the members' reset streams (``STREAM_RESET`` for training,
    ``STREAM_EVAL_RESET`` for evaluation), so training and evaluation environments of
    the same member never share initial states. Call ``reset()`` before ``step()``.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("a population needs at least one seed")
    if min(seeds) < 0:  # SeedSequence, behind every stream, needs non-negative entropy
        raise ConfigError(f"seeds must be integers >= 0, got {min(seeds)}")
    if int(num_envs) < 1:
        raise ConfigError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    fast = _fast(env_id)
    if fast is not None:
        return fast.make(seeds, int(num_envs), stream)
    _resolve(env_id)
    options = env_options(env_id, hp)
    try:
        return GymPopulationEnv(env_id, seeds, num_envs, stream,
                                make=lambda: _instance(env_id, options, None))
    except gym.error.Error as e:
        raise _cannot_make(env_id, e) from e
