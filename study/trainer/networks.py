"""The actor-critic of a population: one object that owns the stacked weights of every
learning member, its forward passes and the names of its weights.

A member's network is an *encoder* (nothing for flat observations; ReLU convolutions, and
for the presets a dense layer, for images), MLP hidden layers (``activation``) and heads:
logits of a Categorical, or the mean of a diagonal Gaussian whose log-std is a
state-independent parameter. With ``share_trunk`` the encoder and hidden layers feed both
heads; otherwise the policy and the value function have their own.

Weights are stacked ``[S, ...]`` (study.trainer.nets), so a population's forward pass is one batched
product per layer. Gradients come from autograd over the stacked weights (the reference
path, any network and loss); :attr:`ActorCritic.accelerated` networks (separate MLPs on flat
observations) also offer hand-written gradients, :meth:`ActorCritic.policy_grads` and
:meth:`ActorCritic.value_grads`, tested against autograd (tests/test_nets.py,
tests/test_networks.py).

Weight names (saved policies, ``study.report.render``): ``{group}.{j}`` for the j-th tensor of a
group (``trunk_enc``, ``trunk``, ``pi_enc``, ``pi``, ``v_enc``, ``v``; weights and biases
alternate), and ``log_std``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import gymnasium as gym
import numpy as np
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.trainer import kernels
from study.trainer.nets import (
    activation_fn,
    backward,
    cnn,
    forward_cached,
    hidden_gains,
    init_convs,
    init_layers,
    mlp,
)

__all__ = ["GROUPS", "ActorCritic", "accelerations_enabled", "check_network", "feature_size",
           "reference_path"]

_LOG_2PI = math.log(2.0 * math.pi)
#: Weight groups in the order of :meth:`ActorCritic.all_params` (when present).
GROUPS = ("trunk_enc", "trunk", "pi_enc", "pi", "v_enc", "v")
#: Init stream offsets (study.trainer.nets.init_layers) of each group; MLP groups keep the offsets
#: they had before encoders existed, so MLP members start from the same weights.
_STREAM = {"trunk": 0, "pi": 1, "v": 2, "trunk_enc": 3, "pi_enc": 4, "v_enc": 5}
#: A loss over a large batch is accumulated over chunks of rows of about this many bytes of
#: activations per member (see study.trainer.updates.CHUNK_ROWS for MLPs).
_CHUNK_BYTES = 32 * 2**20


_ACCELERATE = [True]


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Within the block, networks built use autograd only (no hand-written gradients):
    the reference that tests and benchmarks compare the accelerated path with."""
    _ACCELERATE[0] = False
    try:
        yield
    finally:
        _ACCELERATE[0] = True


def accelerations_enabled() -> bool:
    """False inside :func:`reference_path`: networks built there take no acceleration."""
    return _ACCELERATE[0]


def is_image(obs_space: gym.spaces.Box) -> bool:
    """Observations the population env hands over as uint8 ``[C, H, W]`` images."""
    return obs_space.dtype == np.uint8 and len(obs_space.shape) == 3


def feature_size(hp: Structure, obs_space: gym.spaces.Box) -> int:
    """Features the encoder of ``hp`` makes of one observation (ConfigError, one line,
    when its convolutions do not fit the image or the observations are not images)."""
    convs = cfg.conv_spec(hp)
    if not convs:
        return int(np.prod(obs_space.shape))
    if not is_image(obs_space):
        raise cfg.ConfigError(
            f"encoder = {hp.encoder!r} needs image observations, but they are "
            f"{list(obs_space.shape)} {obs_space.dtype}; use encoder = \"mlp\"")
    layers = cfg.conv_layers(hp, obs_space.shape)
    sizes = [f"{obs_space.shape[1]}x{obs_space.shape[2]}"]
    for *_, h, w in layers:
        sizes.append(f"{max(h, 0)}x{max(w, 0)}")
        if h < 1 or w < 1:
            raise cfg.ConfigError(
                f"encoder = {hp.encoder!r}: the convolutions (kernels "
                f"{[k for _, k, _ in convs]}, strides {[s for _, _, s in convs]}) shrink the "
                f"{obs_space.shape[1]}x{obs_space.shape[2]} observations below 1x1 "
                f"({' -> '.join(sizes)}); use smaller kernels or strides")
    *_, c, h, w = layers[-1]
    return cfg.encoder_units(hp) or c * h * w


def check_network(env_id: str, hp: Structure, obs_space: gym.spaces.Box,
                  normalize_obs: bool = False) -> None:
    """ConfigError (one line, naming ``env_id``) unless ``hp``'s network fits these
    observations (and, with ``normalize_obs`` for any member, they are not images)."""
    try:
        feature_size(hp, obs_space)
        if is_image(obs_space) and normalize_obs:
            raise cfg.ConfigError("normalize_obs = true applies to vector observations, not "
                                  "images (they are scaled to [0, 1])")
    except cfg.ConfigError as e:
        raise cfg.ConfigError(f"{env_id}: {e}") from None


class ActorCritic:
    """Policy and value networks of the learning members, weights stacked ``[S, ...]``
    (see the module docstring)."""

    def __init__(
        self,
        hp: Structure,
        seeds: Sequence[int],
        obs_space: gym.spaces.Box,
        action_space: gym.spaces.Space,
        log_std_init: torch.Tensor,
        device: torch.device,
    ) -> None:
        self.activation = hp.activation
        self.share_trunk = hp.share_trunk
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        self.act_dim = (int(action_space.n) if isinstance(action_space, gym.spaces.Discrete)
                        else int(np.prod(action_space.shape or ())))
        self.image = is_image(obs_space)
        self.scale = 1.0 / float(np.max(obs_space.high)) if self.image else 1.0
        self.convs = cfg.conv_spec(hp)
        self.obs_shape = tuple(obs_space.shape)
        n_feat = feature_size(hp, obs_space)  # (checks the convolutions fit the image)
        self.conv_layers = cfg.conv_layers(hp, self.obs_shape)
        self.groups: dict[str, list[torch.Tensor]] = {}
        pi_hidden = list(hp.policy_hidden_sizes)
        v_hidden = list(hp.value_hidden_sizes)
        units = cfg.encoder_units(hp)
        towers = ["trunk"] if self.share_trunk else ["pi", "v"]
        for tower in towers:
            if self.convs:
                enc = init_convs(seeds, obs_space.shape[0], self.convs, _STREAM[f"{tower}_enc"])
                if units:
                    *_, c, h, w = self.conv_layers[-1]
                    enc += init_layers(seeds, [c * h * w, units], [math.sqrt(2.0)],
                                       _STREAM[f"{tower}_enc"] + 10)
                self.groups[f"{tower}_enc"] = enc
        if self.share_trunk:
            gains = [math.sqrt(2.0)] * len(pi_hidden)
            self.groups["trunk"] = init_layers(seeds, [n_feat, *pi_hidden], gains, 0)
            width = pi_hidden[-1] if pi_hidden else n_feat
            self.groups["pi"] = init_layers(seeds, [width, self.act_dim], [0.01], 1)
            self.groups["v"] = init_layers(seeds, [width, 1], [1.0], 2)
        else:
            self.groups["pi"] = init_layers(seeds, [n_feat, *pi_hidden, self.act_dim],
                                            hidden_gains(len(pi_hidden), 0.01), 1)
            self.groups["v"] = init_layers(seeds, [n_feat, *v_hidden, 1],
                                           hidden_gains(len(v_hidden), 1.0), 2)
        self.log_std = (
            None
            if self.discrete
            else log_std_init.reshape(-1, 1).repeat(1, self.act_dim).to(torch.float32)
        )
        #: Hand-written gradients available (study.trainer.updates.AcceleratedMLPUpdate).
        self.accelerated = (_ACCELERATE[0] and not self.share_trunk and not self.convs
                            and not self.image)
        for p in self.all_params():
            p.data = p.data.to(device)
            p.requires_grad_(True)

    # the groups, as attributes ---------------------------------------------------------
    def _group(self, name: str) -> list[torch.Tensor]:
        return self.groups.get(name, [])

    @property
    def trunk(self) -> list[torch.Tensor]:
        return self._group("trunk")

    @property
    def pi(self) -> list[torch.Tensor]:
        return self._group("pi")

    @property
    def v(self) -> list[torch.Tensor]:
        return self._group("v")

    # parameter groups -------------------------------------------------------------
    def policy_params(self) -> list[torch.Tensor]:
        """What the policy optimizer updates (everything, when the trunk is shared)."""
        extra = [self.log_std] if self.log_std is not None else []
        if self.share_trunk:
            return [*self._group("trunk_enc"), *self.trunk, *self.pi, *self.v, *extra]
        return [*self._group("pi_enc"), *self.pi, *extra]

    def value_params(self) -> list[torch.Tensor]:
        return [] if self.share_trunk else [*self._group("v_enc"), *self.v]

    def all_params(self) -> list[torch.Tensor]:
        return self.policy_params() + self.value_params()

    def _layout(self) -> list[tuple[str, int]]:
        """``(group or "log_std", length)`` in the order of :meth:`all_params`."""
        if self.share_trunk:
            order = ["trunk_enc", "trunk", "pi", "v", "log_std"]
        else:
            order = ["pi_enc", "pi", "log_std", "v_enc", "v"]
        out = []
        for name in order:
            if name == "log_std":
                if self.log_std is not None:
                    out.append((name, 1))
            elif name in self.groups:
                out.append((name, len(self.groups[name])))
        return out

    def set_params(self, new: Sequence[torch.Tensor]) -> None:
        """Replace all parameters, in the order of :meth:`all_params`."""
        new = [p.detach().requires_grad_(True) for p in new]
        at = 0
        for name, n in self._layout():
            if name == "log_std":
                self.log_std = new[at]
            else:
                self.groups[name] = new[at : at + n]
            at += n

    # forward passes -------------------------------------------------------------------
    def _encode(self, obs: torch.Tensor, tower: str) -> torch.Tensor:
        """Encoder features ``[S, B, features]`` of observations ``[S, B, *obs_shape]``."""
        if not self.image:
            return obs
        x = obs.to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if not self.convs:
            return x.reshape(x.shape[0], x.shape[1], -1)
        return cnn(x, self.groups[f"{tower}_enc"], self.convs)

    def _features(self, obs: torch.Tensor, tower: str) -> torch.Tensor:
        """What a head sees: the shared trunk's output, or a tower's encoder features."""
        if not self.share_trunk:
            return self._encode(obs, tower)
        h = self._encode(obs, "trunk")
        if not self.trunk:
            return h
        return activation_fn(self.activation)(mlp(h, self.trunk, self.activation))

    def policy_out(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (discrete) or Gaussian means (Box), ``[S, B, act_dim]``."""
        return mlp(self._features(obs, "pi"), self.pi, self.activation)

    def values(self, obs: torch.Tensor) -> torch.Tensor:
        """State values ``[S, B]``."""
        return mlp(self._features(obs, "v"), self.v, self.activation).squeeze(-1)

    def policy_and_values(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`policy_out` and :meth:`values` at once: one pass through a shared CNN
        trunk. A shared MLP trunk keeps its two passes (their gradients are summed in
        another order than one pass's, and the runs stored before this existed keep
        their bits; the trunk is cheap there)."""
        if not self.share_trunk or not self.convs:
            return self.policy_out(obs), self.values(obs)
        h = self._features(obs, "trunk")
        return (mlp(h, self.pi, self.activation),
                mlp(h, self.v, self.activation).squeeze(-1))

    @property
    def values_in_rollout(self) -> bool:
        """Whether the trainer takes V(s_t) from the rollout's passes (one pass per step
        gives both outputs) rather than from one more pass over the rollout: so for CNNs,
        whose passes dominate. MLPs keep the separate pass (cheap for them, and the runs
        stored before CNNs existed keep their bits)."""
        return bool(self.convs)

    @property
    def chunk_rows(self) -> int | None:
        """Rows per chunk for losses over large batches of image observations (about
        ``_CHUNK_BYTES`` of encoder activations per member; it depends on the network
        only, never on S); None: study.trainer.updates.CHUNK_ROWS."""
        if not self.convs:
            return None
        # The image, and each convolution's output and its ReLU.
        per_row = int(np.prod(self.obs_shape)) + sum(
            2 * c * h * w for *_, c, h, w in self.conv_layers)
        return max(1, _CHUNK_BYTES // (4 * per_row))

    def log_prob_entropy(
        self, out: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of ``actions`` and entropy, both ``[S, B]``."""
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            logp = torch.take_along_dim(logp_all, actions.long().unsqueeze(-1), dim=-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            return logp.squeeze(-1), entropy
        assert self.log_std is not None  # a Gaussian policy has one
        log_std = self.log_std.unsqueeze(1)  # [S, 1, A]
        z = (actions - out) * torch.exp(-log_std)
        logp = (-0.5 * z * z - log_std - 0.5 * _LOG_2PI).sum(-1)
        entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1).expand_as(logp)
        return logp, entropy

    # hand-written gradients (separate networks only) -------------------------------------
    @torch.no_grad()
    def policy_grads(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        adv: torch.Tensor,
        entropy_coef: torch.Tensor,
        n_rows: int,
        forward: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        surrogate: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
        | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Sums over these rows, divided by ``n_rows``, of the policy-gradient loss
        ``-A log pi(a|s)`` and the entropy, and the gradients of ``pg - c_ent * entropy``
        with respect to :meth:`policy_params` (``actions``: ``[S, B]`` or ``[S, B, A]``).

        Categorical, with p = softmax(z), H = -sum p log p:
            d pg / dz = A (p - onehot(a)),    d H / dz = -p (log p + H).
        Diagonal Gaussian, with u = (a - mu) / sigma:
            d log pi / d mu = u / sigma,      d log pi / d log sigma = u^2 - 1,
            H = sum(log sigma) + const.

        ``forward`` is the policy's :func:`forward_cached` on ``obs`` when already computed.
        ``surrogate(log pi(a|s))`` replaces the loss ``-A log pi``: it returns the weight
        ``W = -d pg / d log pi`` per row (used where A is above) and the terms it defines
        (``pg`` at least, as sums over the rows divided by ``n_rows``).
        """
        out, inputs = forward or forward_cached(obs, self.pi, self.activation)
        defined: dict[str, torch.Tensor] = {}
        if surrogate is not None:
            adv, defined = surrogate(self.log_prob_entropy(out, actions)[0])
        w = (adv / n_rows).unsqueeze(-1)  # [S, B, 1]
        c = (entropy_coef / n_rows).reshape(-1, 1, 1)
        terms: dict[str, torch.Tensor] = {}
        if self.discrete and out.device.type == "cpu" and out.dtype == torch.float32:
            g_out = torch.empty_like(out)
            pg, ent = kernels.categorical_policy_grad(
                out.contiguous().numpy(), actions.long().contiguous().numpy(),
                w.squeeze(-1).contiguous().numpy(), c.reshape(-1).contiguous().numpy(),
                g_out.numpy(),
            )  # fmt: skip
            grads = backward(g_out, inputs, self.pi, self.activation)
            terms["ent"] = torch.from_numpy(ent) / n_rows
            terms["pg"] = torch.from_numpy(pg)
            terms.update(defined)
            terms["loss"] = terms["pg"] - entropy_coef * terms["ent"]
            return terms, grads
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            p = logp_all.exp()
            onehot = torch.zeros_like(p).scatter_(-1, actions.long().unsqueeze(-1), 1.0)
            logp = (logp_all * onehot).sum(-1)
            entropy = -(p * logp_all).sum(-1)  # [S, B]
            g_out = w * (p - onehot) + c * p * (logp_all + entropy.unsqueeze(-1))
            grads = backward(g_out, inputs, self.pi, self.activation)
            terms["ent"] = entropy.sum(dim=1) / n_rows
        else:
            assert self.log_std is not None  # a Gaussian policy has one
            log_std = self.log_std.unsqueeze(1)  # [S, 1, A]
            inv_std = torch.exp(-log_std)
            u = (actions - out) * inv_std
            logp = (-0.5 * u * u - log_std - 0.5 * _LOG_2PI).sum(-1)
            g_out = -w * u * inv_std
            grads = backward(g_out, inputs, self.pi, self.activation)
            # Every row has the same entropy, so its term contributes c_ent * rows / n_rows.
            g_log_std = -(w * (u * u - 1.0)).sum(dim=1) - c.squeeze(-1) * obs.shape[1]
            grads.append(g_log_std)
            entropy = (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1).squeeze(1)  # [S]
            terms["ent"] = entropy * (obs.shape[1] / n_rows)
        terms["pg"] = -(adv * logp).sum(dim=1) / n_rows
        terms.update(defined)
        terms["loss"] = terms["pg"] - entropy_coef * terms["ent"]
        return terms, grads

    @torch.no_grad()
    def value_grads(
        self, obs: torch.Tensor, returns: torch.Tensor, value_coef: torch.Tensor, n_rows: int,
        clip: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Sum over these rows, divided by ``n_rows``, of ``(V(s) - R)^2``, and the gradients
        of ``c_v`` times it with respect to :meth:`value_params`. With ``clip = (V_old, c)``
        (PPO) the prediction is ``V_old + clip(V - V_old, -c, c)`` (V itself where c is
        infinite), whose derivative is 0 where the clip binds."""
        out, inputs = forward_cached(obs, self.v, self.activation)
        err = out.squeeze(-1) - returns
        slope = None
        if clip is not None and not bool(torch.isinf(clip[1]).all()):  # else: no clipping
            old, c = clip[0], clip[1][:, None]
            delta = out.squeeze(-1) - old
            pred = old + torch.maximum(torch.minimum(delta, c), -c)
            err = torch.where(torch.isinf(c), out.squeeze(-1), pred) - returns
            slope = (delta.abs() <= c).to(err.dtype)
        g_out = ((2.0 / n_rows) * value_coef.reshape(-1, 1) * err).unsqueeze(-1)
        if slope is not None:
            g_out = g_out * slope.unsqueeze(-1)
        v = (err * err).sum(dim=1) / n_rows
        return {"v": v, "loss": value_coef * v}, backward(g_out, inputs, self.v, self.activation)

    def select(self, idx: torch.Tensor) -> None:
        """Keep only the members at ``idx`` (population compaction)."""
        self.set_params([p.detach()[idx] for p in self.all_params()])

    def member_state(self, i: int) -> dict[str, np.ndarray]:
        """Member i's weights as NumPy arrays, by name (saved policies)."""
        out: dict[str, np.ndarray] = {}
        for name in GROUPS:
            for j, p in enumerate(self.groups.get(name, [])):
                out[f"{name}.{j}"] = p.detach()[i].cpu().numpy()
        if self.log_std is not None:
            out["log_std"] = self.log_std.detach()[i].cpu().numpy()
        return out

    def load_member_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Set this (one-member) network's weights from :meth:`member_state`'s names;
        ConfigError (one line) naming the first weight that is missing or mis-shaped."""
        new = []
        for name, n in self._layout():
            keys = ["log_std"] if name == "log_std" else [f"{name}.{j}" for j in range(n)]
            for key, p in zip(keys, self._flat(name), strict=True):
                if key not in state or tuple(np.shape(state[key])) != tuple(p.shape[1:]):
                    got = "missing" if key not in state else f"shaped {np.shape(state[key])}"
                    raise cfg.ConfigError(f"saved weight {key!r} is {got}; this network needs "
                                          f"{tuple(p.shape[1:])}")
                new.append(torch.as_tensor(np.asarray(state[key], np.float32))[None])
        self.set_params(new)

    def _flat(self, name: str) -> list[torch.Tensor]:
        if name == "log_std":
            assert self.log_std is not None
            return [self.log_std]
        return self.groups[name]
