"""How much memory a population will take, known before it is built.

512 ``ALE/Breakout-v5`` instances (S = 64 members x 8 envs) took over 16 GiB before the first
update; a population that cannot fit should be refused with one line, before anything is
written, not killed by the OOM killer half-way through a sweep. :func:`population_bytes`
estimates the three parts that grow with the population:

* **environments**: ``S * E`` times the marginal memory of one instance, measured once per
  env id in this process (:func:`instance_bytes`: the resident-set growth from making and
  resetting a few instances after the first, which pays for imports and shared tables); the
  NumPy ports hold a few floats per environment;
* **rollout buffers**: per member, ``(n_steps + 1) * E`` rows of the observation (float32)
  and of every hidden activation of both networks, kept for the backward pass, plus a
  scratch copy of the same size;
* **networks**: per member, the parameters with their gradients and two optimizer moments.

The estimate is an upper-bound style guess (it ignores the allocator's reuse), good to a
factor of about 1.5; :func:`check_fits` compares it with the memory available now.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from study.config import ConfigError
from study.hyperparameters import Hyperparameters, Structure

__all__ = ["PopulationMemory", "available_bytes", "check_fits", "instance_bytes",
           "population_bytes"]

_FLOAT = 4
_FAST_ENV_BYTES = 256  # a port's state: a few float64 rows per environment
_MIN_INSTANCE_BYTES = 64 * 1024  # a gymnasium instance is at least a few objects
_MEASURED = 4  # instances made after the first to measure the marginal cost


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """MemAvailable of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def instance_bytes(env_id: str, hp: Structure | None = None) -> int:
    """Marginal resident memory of one more environment instance of ``env_id`` (``ALE/*``
    preprocessed as ``hp`` says): the resident-set growth from making and resetting 4
    instances after a first one, over 4."""
    from study.trainer.envs.images import env_options

    return _instance_bytes(env_id, env_options(env_id, hp))


@functools.cache
def _instance_bytes(env_id: str, options: Any) -> int:
    from study.trainer.envs import FAST_ENVS, make_env_instance

    if env_id in FAST_ENVS:
        return _FAST_ENV_BYTES
    first = make_env_instance(env_id, options)
    first.reset(seed=0)
    before = _rss_bytes()
    more = [make_env_instance(env_id, options) for _ in range(_MEASURED)]
    for i, env in enumerate(more):
        env.reset(seed=i + 1)
    after = _rss_bytes()
    for env in (first, *more):
        env.close()
    if before is None or after is None:
        return _MIN_INSTANCE_BYTES
    return max((after - before) // _MEASURED, _MIN_INSTANCE_BYTES)


@dataclass(frozen=True)
class PopulationMemory:
    """Estimated bytes of one population, by part."""

    envs: int
    buffers: int
    networks: int

    @property
    def total(self) -> int:
        return self.envs + self.buffers + self.networks

    def describe(self) -> str:
        return (f"about {_gib(self.total)} (environments {_gib(self.envs)}, rollout buffers "
                f"{_gib(self.buffers)}, networks {_gib(self.networks)})")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.0f} MiB"


def _mlp_params(sizes: Sequence[int]) -> int:
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def _encoder(hp: Structure, obs_shape: Sequence[int]) -> tuple[int, int, int]:
    """(parameters, activations per row, features) of the encoder of ``hp``."""
    from study.config import conv_layers, encoder_units

    layers = conv_layers(hp, tuple(obs_shape))
    if not layers:
        return 0, 0, math.prod(obs_shape)
    params = sum((c_in * k * k + 1) * out for c_in, k, _, out, _, _ in layers)
    acts = sum(2 * out * h * w for *_, out, h, w in layers)
    *_, c, h, w = layers[-1]
    units = encoder_units(hp)
    if units:
        params += (c * h * w + 1) * units
        acts += units
    return params, acts, units or c * h * w


def population_bytes(env_id: str, hp: Structure, n_members: int,
                     obs_shape: Sequence[int] | int, n_outputs: int,
                     obs_itemsize: int = _FLOAT) -> PopulationMemory:
    """The estimate for ``n_members`` members with hyperparameters ``hp`` (network sizes,
    num_envs, n_steps) on ``env_id``, whose observations have shape ``obs_shape`` (items
    of ``obs_itemsize`` bytes: 1 for images) and whose policy head ``n_outputs``."""
    n_envs, n_steps = hp.num_envs, hp.n_steps
    shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
    enc_params, enc_acts, n_feat = _encoder(hp, shape)
    towers = 1 if hp.share_trunk else 2
    pi = [n_feat, *hp.policy_hidden_sizes, n_outputs]
    vf = [n_feat, *hp.value_hidden_sizes, 1]
    params = _mlp_params(pi) + _mlp_params(vf) + towers * enc_params
    activations = sum(pi[1:]) + sum(vf[1:]) + towers * enc_acts
    rows = (n_steps + 1) * n_envs
    obs_bytes = math.prod(shape) * obs_itemsize
    return PopulationMemory(
        envs=n_members * n_envs * instance_bytes(env_id, hp),
        buffers=2 * n_members * rows * (activations * _FLOAT + obs_bytes),
        networks=4 * n_members * params * _FLOAT,
    )


Member = Mapping[str, Any] | Hyperparameters  # one member's resolved hyperparameters


def check_fits(populations: Sequence[tuple[str, Member | Sequence[Member], int]],
               where: str = "", fewer: str = "--population-size or --n-jobs") -> str:
    """ConfigError (one line) when the populations trained at the same time,
    ``[(env_id, hp, n_members), ...]`` (``hp``: one member's, or every member's, which
    share their structural values), would not fit in the memory available now; else a
    line saying what they need (for dry runs). ``fewer`` names what makes populations
    fewer or smaller in the caller's terms."""
    from study.trainer.envs import env_spaces
    from study.trainer.networks import check_network

    estimates = []
    for env_id, members, n in populations:
        values = [Hyperparameters.of(m) for m in (
            [members] if isinstance(members, Mapping | Hyperparameters) else members)]
        hp = values[0].structure()
        obs_space, act_space = env_spaces(env_id, hp)
        check_network(env_id, hp, obs_space, any(v.normalize_obs for v in values))
        n_out = int(getattr(act_space, "n", 0)) or math.prod(act_space.shape or ())
        memory = population_bytes(env_id, hp, n, obs_space.shape, n_out,
                                  obs_space.dtype.itemsize)
        estimates.append((memory, env_id, hp, n))
    total = sum(e.total for e, *_ in estimates)
    biggest, env_id, hp, n = max(estimates, key=lambda x: x[0].total)
    free = available_bytes()
    if free is None or total <= free:
        avail = f" of the {_gib(free)} available" if free is not None else ""
        return (f"about {_gib(total)}{avail} for {len(estimates)} population(s) at once "
                f"(the largest {biggest.describe()[6:]})")
    part = max(("envs", "buffers", "networks"), key=lambda k: getattr(biggest, k))
    keys = {"envs": "num_envs", "buffers": "num_envs, n_steps or the hidden sizes",
            "networks": "policy_hidden_sizes / value_hidden_sizes"}[part]
    one = f"{n} members x {hp.num_envs} envs of {env_id!r}"
    if len(estimates) == 1:
        what = f"a population of {one} needs {biggest.describe()}"
    else:
        what = (f"{len(estimates)} populations trained at once need about {_gib(total)}, "
                f"the largest ({one}) {biggest.describe()}")
    raise ConfigError(f"{where}{what}, more than the {_gib(free)} available; lower {keys} "
                      f"or {fewer}")
