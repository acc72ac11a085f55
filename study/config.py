"""Hyperparameters: names, defaults, types, allowed values, and which ones are structural.

A population shares its *structural* hyperparameters (they fix array shapes or the code
path); every other hyperparameter is a per-member scalar, so a grid over them trains as
one population. The names here are the keys of sweep files and of ``--set key=value``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from study.hyperparameters import Structure


class ConfigError(ValueError):
    """Invalid user input; the message is one line, meant to be shown as is."""


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    kind: str  # "int" | "float" | "bool" | "choice" | "intlist"
    structural: bool
    allowed: str  # human-readable description of the allowed values
    choices: tuple[str, ...] = ()
    low: float | None = None  # bounds for int/float
    high: float | None = None
    low_open: bool = False
    allow_inf: bool = False
    help: str = ""
    max_len: int = 0  # intlist: at most this many items (0: MAX_LAYERS)


def _f(name: str, default: float, allowed: str, low: float | None = None,
       high: float | None = None, low_open: bool = False, allow_inf: bool = False,
       help: str = "") -> Spec:
    return Spec(
        name,
        default,
        "float",
        False,
        allowed,
        low=low,
        high=high,
        low_open=low_open,
        allow_inf=allow_inf,
        help=help,
    )


def _i(name: str, default: int, low: int, high: int, help: str = "") -> Spec:
    return Spec(name, default, "int", True, f"an integer in [{low}, {high:_}]", low=low,
                high=high, help=help)


#: Bounds of the network sizes: far beyond any use, small enough that a typo (10**10)
#: is refused here rather than by the memory estimate after the plan.
MAX_LAYERS = 16
MAX_WIDTH = 65_536


#: Observation encoders: a flat MLP input, a convolution stack from cnn_* keys, or a preset
#: (see :data:`CNN_PRESETS`).
ENCODERS: tuple[str, ...] = ("mlp", "cnn", "nature_cnn", "minatar_cnn")

#: Preset encoders: (channels, kernels, strides, hidden units after the convolutions).
#: nature_cnn: Mnih et al. 2015; minatar_cnn: Young & Tian 2019.
CNN_PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]] = {
    "nature_cnn": ((32, 64, 64), (8, 4, 3), (4, 2, 1), 512),
    "minatar_cnn": ((16,), (3,), (1,), 128),
}

_CNN_LIST = "a list of at most 8 integers in [1, 1024], one per convolution ({what})"

SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        _i("num_envs", 8, 1, 4096, "environments per member"),
        _i("n_steps", 5, 1, 1_000_000, "rollout length T per update"),
        _f("gamma", 0.99, "a float in (0, 1]", 0.0, 1.0, low_open=True, help="discount"),
        _f("lam", 1.0, "a float in [0, 1]", 0.0, 1.0, help="GAE lambda"),
        _f("policy_lr", 7e-4, "a float > 0", 0.0, low_open=True),
        _f("value_lr", 7e-4, "a float > 0", 0.0, low_open=True),
        Spec(
            "policy_optimizer",
            "rmsprop",
            "choice",
            True,
            "one of rmsprop, adam",
            choices=("rmsprop", "adam"),
        ),
        Spec(
            "value_optimizer",
            "rmsprop",
            "choice",
            True,
            "one of rmsprop, adam",
            choices=("rmsprop", "adam"),
        ),
        _i("value_iters", 1, 1, 10_000, "value-function passes over the rollout per update"),
        _i("n_minibatches", 1, 1, 1_000_000, "minibatches per pass over the rollout"),
        _f("entropy_coef", 0.0, "a float >= 0", 0.0),
        _f("value_coef", 0.5, "a float > 0", 0.0, low_open=True),
        _f("max_grad_norm", 0.5, 'a float > 0 or "inf"', 0.0, low_open=True, allow_inf=True),
        _f("value_max_grad_norm", 0.5, 'a float > 0 or "inf"', 0.0, low_open=True, allow_inf=True),
        Spec("normalize_advantage", False, "bool", False, "true or false"),
        Spec("value_target", "gae", "choice", False, "one of gae, mc", choices=("gae", "mc")),
        Spec(
            "policy_hidden_sizes",
            (64, 64),
            "intlist",
            True,
            f"a list of at most {MAX_LAYERS} integers in [1, {MAX_WIDTH}], e.g. [64, 64] "
            "([] = linear)",
        ),
        Spec(
            "value_hidden_sizes",
            (64, 64),
            "intlist",
            True,
            f"a list of at most {MAX_LAYERS} integers in [1, {MAX_WIDTH}], e.g. [64, 64] "
            "([] = linear)",
        ),
        Spec("activation", "tanh", "choice", True, "one of tanh, relu", choices=("tanh", "relu")),
        _f("log_std_init", 0.0, "a finite float", allow_inf=False),
        Spec("normalize_obs", False, "bool", False, "true or false"),
        Spec("normalize_reward", False, "bool", False, "true or false",
             help="divide rewards by the running std of the discounted return"),
        Spec("share_trunk", False, "bool", True, "true or false"),
        # ---- observation encoders (structural: they fix the network's shapes)
        Spec("encoder", "mlp", "choice", True, "one of " + ", ".join(ENCODERS),
             choices=ENCODERS,
             help="mlp: flat observations; cnn: cnn_channels/kernels/strides; or a preset"),
        Spec("cnn_channels", (), "intlist", True, _CNN_LIST.format(what="output channels"),
             high=1024, max_len=8,
             help="output channels of each convolution (encoder = cnn)"),
        Spec("cnn_kernels", (), "intlist", True, _CNN_LIST.format(what="kernel sizes"),
             high=1024, max_len=8,
             help="square kernel size of each convolution"),
        Spec("cnn_strides", (), "intlist", True, _CNN_LIST.format(what="strides"),
             high=1024, max_len=8,
             help="stride of each convolution"),
        # ---- Atari preprocessing (ALE/* only; structural: they change the environment)
        _i("frame_skip", 4, 1, 64, "ALE: frames per action (max-pooled over the last two)"),
        _i("frame_stack", 4, 1, 64, "ALE: observations stacked as channels"),
        _i("screen_size", 84, 8, 1024, "ALE: observations resized to screen_size^2"),
        Spec("grayscale", True, "bool", True, "true or false", help="ALE: grayscale frames"),
        _i("noop_max", 30, 0, 10_000, "ALE: at most this many no-ops after a reset"),
        Spec("sticky_actions", 0.25, "float", True, "a float in [0, 1]", low=0.0, high=1.0,
             help="ALE: repeat_action_probability (Machado et al. 2018)"),
        # ---- per-member reward and episode handling
        Spec("clip_reward", False, "bool", False, "true or false",
             help="learn from sign(reward); episode returns stay in the game's units"),
        Spec("terminal_on_life_loss", False, "bool", False, "true or false",
             help="ALE: a lost life ends the episode for learning (not for the game)"),
        # ---- the algorithm: A2C, or PPO's clipped surrogate over several epochs
        Spec("algorithm", "a2c", "choice", True, "one of a2c, ppo", choices=("a2c", "ppo")),
        _i("n_epochs", 10, 1, 10_000, "PPO: passes over each rollout"),
        _f("clip_range", 0.2, "a float > 0", 0.0, low_open=True,
           help="PPO: the probability ratio is clipped to [1 - c, 1 + c]"),
        _f("clip_range_vf", math.inf, 'a float > 0, or "none"', 0.0, low_open=True,
           allow_inf=True, help="PPO: value predictions kept within c of the rollout's"),
        _f("target_kl", math.inf, 'a float > 0, or "none"', 0.0, low_open=True,
           allow_inf=True,
           help="PPO: a member whose approximate KL passes 1.5 x this ends its epochs"),
    ]
}
#: Keys of one algorithm only; the other refuses them in a sweep or ``--set``.
ALGORITHM_ONLY: dict[str, tuple[str, ...]] = {
    "ppo": ("n_epochs", "clip_range", "clip_range_vf", "target_kl"),
    "a2c": ("value_iters",),
}

#: Defaults that differ by algorithm, applied where a sweep does not set them: PPO's
#: follow Stable-Baselines3's PPO (n_steps 2048 with batches of 64, Adam 3e-4, GAE 0.95,
#: normalized advantages; one environment per member, as SB3 with one env).
ALGORITHM_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"num_envs": 1, "n_steps": 2048, "n_minibatches": 32, "lam": 0.95,
            "policy_lr": 3e-4, "value_lr": 3e-4, "policy_optimizer": "adam",
            "value_optimizer": "adam", "normalize_advantage": True},
}

#: Keys that only mean something for ALE/* environments.
#: Environment families whose observations are images.
IMAGE_FAMILIES: tuple[str, ...] = ("ALE", "MinAtar")

ALE_ONLY: tuple[str, ...] = ("frame_skip", "frame_stack", "screen_size", "grayscale",
                             "noop_max", "sticky_actions", "terminal_on_life_loss")

#: Defaults that differ by environment namespace (the common protocol of each family):
#: Atari after Mnih et al. 2015 and Machado et al. 2018, MinAtar after Young & Tian 2019.
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "ALE": {"encoder": "nature_cnn", "share_trunk": True, "policy_hidden_sizes": (),
            "value_hidden_sizes": (), "clip_reward": True},
    "MinAtar": {"encoder": "minatar_cnn", "share_trunk": True, "policy_hidden_sizes": (),
                "value_hidden_sizes": ()},
}


def env_family(env_id: str) -> str:
    """The namespace of ``env_id`` ("ALE", "MinAtar", ...), or "" for plain ids."""
    return env_id.split("/", 1)[0] if "/" in env_id else ""


def env_defaults(env_id: str | None) -> dict[str, Any]:
    """Every hyperparameter at its default for ``env_id`` (see :data:`ENV_DEFAULTS`)."""
    return {**defaults(), **ENV_DEFAULTS.get(env_family(env_id or ""), {})}


def conv_spec(hp: Structure) -> tuple[tuple[int, int, int], ...]:
    """``(channels, kernel, stride)`` of each convolution of ``hp``'s encoder (empty for
    the MLP encoder)."""
    name = hp.encoder
    if name == "mlp":
        return ()
    if name in CNN_PRESETS:
        chans, kernels, strides, _ = CNN_PRESETS[name]
    else:
        chans, kernels, strides = hp.cnn_channels, hp.cnn_kernels, hp.cnn_strides
    return tuple(zip(map(int, chans), map(int, kernels), map(int, strides), strict=True))


def conv_layers(hp: Structure, obs_shape: tuple[int, ...]
                ) -> list[tuple[int, int, int, int, int, int]]:
    """Per convolution of ``hp``'s encoder on ``[C, H, W]`` images: ``(in_channels,
    kernel, stride, out_channels, out_height, out_width)`` (valid padding: an output side
    ``(side - kernel) // stride + 1``, below 1 when the kernel no longer fits)."""
    c, h, w = obs_shape[-3:] if len(obs_shape) >= 3 else (0, 0, 0)
    out = []
    for channels, k, stride in conv_spec(hp):
        h, w = (h - k) // stride + 1, (w - k) // stride + 1
        out.append((c, k, stride, channels, h, w))
        c = channels
    return out


def encoder_units(hp: Structure) -> int:
    """Units of the dense layer a preset encoder ends with (0: none)."""
    return CNN_PRESETS[hp.encoder][3] if hp.encoder in CNN_PRESETS else 0

#: Hyperparameters added after stores existed: left out of run and config ids while at
#: their default, so the runs stored before them keep their ids (and are not retrained).
ID_OMIT_AT_DEFAULT: frozenset[str] = frozenset({
    "normalize_reward", "encoder", "cnn_channels", "cnn_kernels", "cnn_strides",
    "frame_skip", "frame_stack", "screen_size", "grayscale", "noop_max", "sticky_actions",
    "clip_reward", "terminal_on_life_loss", "algorithm", "n_epochs", "clip_range",
    "clip_range_vf", "target_kl"})

NAMES: tuple[str, ...] = tuple(SPECS)
STRUCTURAL: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.structural)
SCALAR: tuple[str, ...] = tuple(n for n, s in SPECS.items() if not s.structural)


def defaults() -> dict[str, Any]:
    """Every hyperparameter at its default."""
    return {n: s.default for n, s in SPECS.items()}


def _close_match(name: str) -> str:
    import difflib

    m = difflib.get_close_matches(name, NAMES, n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def check_name(name: str, where: str = "") -> Spec:
    """The spec of ``name``; ConfigError listing the known names if there is none."""
    if name not in SPECS:
        raise ConfigError(
            f"{where}unknown hyperparameter {name!r}{_close_match(name)}; known: {', '.join(NAMES)}"
        )
    return SPECS[name]


def coerce(name: str, value: Any, where: str = "") -> Any:
    """Validate one value and return it in canonical form (float, int, bool, str, tuple).

    Raises ConfigError naming the key and what is allowed.
    """
    spec = check_name(name, where)

    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{where}{name} = {value!r} is invalid{extra}: expected {spec.allowed}")

    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad()
    if spec.kind == "choice":
        if isinstance(value, str) and value.lower() in spec.choices:
            return value.lower()
        raise bad()
    if spec.kind == "intlist":
        if isinstance(value, str):
            text = value.strip().strip("[]()").strip()
            try:
                value = [int(v) for v in text.replace(",", " ").split()] if text else []
            except ValueError:
                raise bad() from None
        top = int(spec.high) if spec.high is not None else MAX_WIDTH
        if isinstance(value, (list, tuple)) and len(value) <= (spec.max_len or MAX_LAYERS) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= top for v in value
        ):
            return tuple(int(v) for v in value)
        raise bad()
    if spec.kind == "int":
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
        if (spec.low is not None and value < spec.low) or (
                spec.high is not None and value > spec.high):
            raise bad()
        return int(value)
    # float
    if spec.allow_inf and isinstance(value, str) and value.strip().lower() == "none":
        return math.inf
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad() from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad()
    value = float(value)
    if math.isnan(value):
        raise bad()
    if math.isinf(value):
        if spec.allow_inf and value > 0:
            return value
        raise bad()
    if spec.low is not None and (value < spec.low or (spec.low_open and value == spec.low)):
        raise bad()
    if spec.high is not None and value > spec.high:
        raise bad()
    return value


def resolve(overrides: Mapping[str, Any], where: str = "",
            env: str | None = None) -> dict[str, Any]:
    """Defaults (those of ``env``'s family when given) updated with validated
    ``overrides``; checks cross-key constraints, and with ``env`` that the keys apply to it."""
    hp = env_defaults(env)
    algorithm = coerce("algorithm", overrides.get("algorithm", hp["algorithm"]), where)
    hp.update(ALGORITHM_DEFAULTS.get(algorithm, {}))
    for k, v in overrides.items():
        hp[k] = coerce(k, v, where)
    for other, keys in ALGORITHM_ONLY.items():
        for k in keys:
            if other != algorithm and k in overrides and overrides[k] is not None and \
                    coerce(k, overrides[k]) != SPECS[k].default:
                raise ConfigError(f"{where}{k} applies to algorithm = \"{other}\" only, not "
                                  f"to \"{algorithm}\"; remove it or set algorithm = "
                                  f"\"{other}\"")
    _check_encoder(hp, where)
    if env is not None and env_family(env) != "ALE":
        for k in ALE_ONLY:
            if hp[k] != SPECS[k].default:
                raise ConfigError(f"{where}{k} applies to ALE/* environments only, not to "
                                  f"{env!r}; remove it or set it to {SPECS[k].default}")
    if env is not None and env_family(env) in IMAGE_FAMILIES and hp["normalize_obs"]:
        # (other image envs are refused by the trainer, which sees their observations)
        raise ConfigError(f"{where}normalize_obs = true applies to vector observations, not "
                          f"to the images of {env!r} (they are scaled to [0, 1])")
    batch = hp["num_envs"] * hp["n_steps"]
    if hp["n_minibatches"] > batch:
        raise ConfigError(
            f"{where}n_minibatches = {hp['n_minibatches']} is invalid: expected at most "
            f"num_envs * n_steps = {batch}"
        )
    if hp["share_trunk"] and tuple(hp["policy_hidden_sizes"]) != tuple(hp["value_hidden_sizes"]):
        raise ConfigError(
            f"{where}share_trunk = true needs policy_hidden_sizes == value_hidden_sizes "
            f"(got {list(hp['policy_hidden_sizes'])} and {list(hp['value_hidden_sizes'])})"
        )
    if hp["share_trunk"] and not hp["policy_hidden_sizes"] and hp["encoder"] == "mlp":
        raise ConfigError(f"{where}share_trunk = true needs a non-empty policy_hidden_sizes")
    return hp


def _check_encoder(hp: Mapping[str, Any], where: str) -> None:
    """The cnn_* lists: given (equally long) exactly when ``encoder = "cnn"``."""
    lists = ("cnn_channels", "cnn_kernels", "cnn_strides")
    if hp["encoder"] == "cnn":
        lengths = {k: len(hp[k]) for k in lists}
        if 0 in lengths.values() or len(set(lengths.values())) != 1:
            shown = ", ".join(f"{k} = {list(hp[k])}" for k in lists)
            raise ConfigError(f"{where}encoder = \"cnn\" needs cnn_channels, cnn_kernels and "
                              f"cnn_strides as non-empty lists of one length (got {shown})")
        return
    for k in lists:
        if hp[k]:
            raise ConfigError(f"{where}{k} = {list(hp[k])} applies only with encoder = "
                              f"\"cnn\" (encoder is {hp['encoder']!r})")


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items (values validated later by :func:`resolve`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is invalid: expected key=value")
        k, v = item.split("=", 1)
        k = k.strip()
        check_name(k, "--set: ")
        out[k] = v.strip()
    return out


def structural_key(hp: Mapping[str, Any]) -> tuple:
    """Members can share a population iff their structural keys are equal."""
    return tuple((n, hp[n]) for n in STRUCTURAL)


def to_jsonable(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Lists instead of tuples and "inf" instead of float inf (TOML/JSON friendly)."""
    out: dict[str, Any] = {}
    for k, v in hp.items():
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, float) and math.isinf(v):
            v = "inf"
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# The typed values (study/hyperparameters.py is generated from SPECS by this function)

_PY_TYPES = {"int": "int", "float": "float", "bool": "bool", "choice": "str",
             "intlist": "tuple[int, ...]"}


def _default_source(spec: Spec) -> str:
    if isinstance(spec.default, float) and math.isinf(spec.default):
        return "math.inf" if spec.default > 0 else "-math.inf"
    return repr(spec.default)


def _fields_source(specs: list[Spec]) -> list[str]:
    lines = []
    for s in specs:
        lines.append(f"    #: {s.allowed}")
        lines.append(f"    {s.name}: {_PY_TYPES[s.kind]} = {_default_source(s)}")
    return lines


_MODULE_TEMPLATE = '''"""Typed, frozen hyperparameters: one field per key of ``study.config.SPECS``.

GENERATED by ``study.config.hyperparameters_source()`` from SPECS; do not edit by hand.
The trainer reads its members' hyperparameters as these values (attributes, not string
keys): ``Hyperparameters`` for one member, ``Structure`` for what a population shares.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["Hyperparameters", "Structure"]


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Every hyperparameter of one member (validated values, as resolved)."""

{all_fields}

    @classmethod
    def of(cls, hp: Mapping[str, Any] | Hyperparameters) -> Hyperparameters:
        """``hp`` as this type: a mapping must hold every field (resolved values, as
        ``study.config.resolve`` returns them); other keys are ignored."""
        if isinstance(hp, Hyperparameters):
            return hp
        return cls(**{{name: hp[name] for name in _fields(cls)}})

    def structure(self) -> Structure:
        """The structural hyperparameters (what a population shares)."""
        return Structure.of(self)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (the mapping form of sweep files and the store)."""
        return {{name: getattr(self, name) for name in _fields(type(self))}}


@dataclasses.dataclass(frozen=True)
class Structure:
    """The structural hyperparameters: they fix array shapes or the code path, so every
    member of a population has the same ones."""

{structural_fields}

    @classmethod
    def of(cls, hp: Mapping[str, Any] | Hyperparameters | Structure) -> Structure:
        """``hp``'s structural values: from a mapping with every structural key (other
        keys are ignored), or from a member's hyperparameters."""
        if isinstance(hp, Structure):
            return hp
        if isinstance(hp, Hyperparameters):
            return cls(**{{name: getattr(hp, name) for name in _fields(cls)}})
        return cls(**{{name: hp[name] for name in _fields(cls)}})
'''


def hyperparameters_source() -> str:
    """The source of ``study/hyperparameters.py``: frozen dataclasses with one typed field
    per hyperparameter of :data:`SPECS` (``Hyperparameters``) and per structural one
    (``Structure``). Regenerate after changing SPECS with
    ``python -c "from study.config import write_hyperparameters; write_hyperparameters()"``
    (tests/test_sweep.py fails while the file is stale)."""
    specs = list(SPECS.values())
    return _MODULE_TEMPLATE.format(
        all_fields="\n".join(_fields_source(specs)),
        structural_fields="\n".join(_fields_source([s for s in specs if s.structural])))


def write_hyperparameters() -> None:
    """Write :func:`hyperparameters_source` to ``study/hyperparameters.py``."""
    from pathlib import Path

    (Path(__file__).parent / "hyperparameters.py").write_text(hyperparameters_source())
