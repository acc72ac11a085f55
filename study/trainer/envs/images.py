"""Image environments: Atari preprocessing for ``ALE/*`` and channel-first observations.

Image observations reach the network as ``[C, H, W]`` unsigned bytes (uint8 stays uint8
in the rollout buffers; the network's first layer converts and scales them):

* ``ALE/*-v5`` get the usual preprocessing (Mnih et al. 2015; Machado et al. 2018), each
  step a hyperparameter (:class:`AtariOptions`): sticky actions with probability
  ``sticky_actions`` (v5's 0.25), up to ``noop_max`` no-ops after a reset, ``frame_skip``
  frames per action max-pooled over the last two, ``screen_size`` x ``screen_size``
  grayscale frames, and the last ``frame_stack`` frames stacked as channels. Reward
  clipping and terminal-on-life-loss act on what the trainer learns from, not on the game
  (the episode returns it logs are the game's), so they are per-member hyperparameters of
  the trainer, not of the environment.
* ``MinAtar/*`` (Young & Tian 2019) observations are ``[10, 10, C]`` booleans: made
  ``[C, 10, 10]`` uint8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import gymnasium as gym
import numpy as np

from study.config import ConfigError, env_family
from study.hyperparameters import Structure


@dataclass(frozen=True)
class AtariOptions:
    """How an ``ALE/*`` environment is preprocessed (see the module docstring; the
    defaults are those of the hyperparameters of the same names)."""

    frame_skip: int
    frame_stack: int
    screen_size: int
    grayscale: bool
    noop_max: int
    sticky_actions: float

    @classmethod
    def from_hyperparameters(cls, hp: Structure) -> AtariOptions:
        return cls(hp.frame_skip, hp.frame_stack, hp.screen_size, hp.grayscale, hp.noop_max,
                   hp.sticky_actions)


def env_options(env_id: str, hp: Structure | None) -> AtariOptions | None:
    """The preprocessing of ``env_id`` under hyperparameters ``hp`` (the defaults when
    ``hp`` is None); None for environments that have none."""
    if env_family(env_id) != "ALE":
        return None
    return AtariOptions.from_hyperparameters(Structure() if hp is None else hp)


class ChannelsFirst(gym.ObservationWrapper):
    """Image observations as ``[C, H, W]`` uint8: ``[H, W, C]`` is transposed (a 3-axis
    image is taken as channels-first only when its first axis is shorter than its last),
    ``[N, H, W, C]`` (stacked colour frames) becomes ``[N * C, H, W]``, ``[H, W]`` gets
    one channel; booleans become 0/1."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        shape = space.shape or ()
        if len(shape) == 2:
            self._to_chw = lambda o: o[None]
        elif len(shape) == 4:
            self._to_chw = lambda o: np.moveaxis(o, -1, 1).reshape(-1, *o.shape[1:3])
        elif shape[0] < shape[-1]:  # [C, H, W] already (stacked grayscale frames)
            self._to_chw = lambda o: o
        else:  # [H, W, C], the usual layout, also when C == H (MinAtar's Seaquest: 10)
            self._to_chw = lambda o: np.moveaxis(o, -1, 0)
        probe = self._to_chw(np.zeros(shape, dtype=np.uint8))
        high = 1 if space.dtype == np.bool_ else int(np.max(cast(gym.spaces.Box, space).high))
        self.observation_space = gym.spaces.Box(0, high, probe.shape, dtype=np.uint8)

    def observation(self, observation: Any) -> np.ndarray:
        return np.ascontiguousarray(self._to_chw(np.asarray(observation)), dtype=np.uint8)


def is_image_space(space: gym.Space) -> bool:
    """Box observations of 2 to 4 axes in bytes or booleans: pixels or feature planes."""
    return (isinstance(space, gym.spaces.Box) and 2 <= len(space.shape) <= 4
            and space.dtype in (np.uint8, np.bool_))


def make_atari(env_id: str, options: AtariOptions, render_mode: str | None = None) -> gym.Env:
    """One preprocessed ``ALE/*`` instance (ConfigError when OpenCV, which resizes frames,
    is missing)."""
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    env = gym.make(env_id, frameskip=1, repeat_action_probability=options.sticky_actions,
                   render_mode=render_mode)
    try:
        env = AtariPreprocessing(env, noop_max=options.noop_max, frame_skip=options.frame_skip,
                                 screen_size=options.screen_size, grayscale_obs=options.grayscale,
                                 terminal_on_life_loss=False, scale_obs=False)
    except gym.error.DependencyNotInstalled:
        env.close()
        raise ConfigError(f"environment {env_id!r} needs OpenCV to resize its frames: "
                          "pip install -e '.[atari]'") from None
    if options.frame_stack > 1:
        env = FrameStackObservation(env, options.frame_stack)
    return env


def wrap_images(env: gym.Env) -> gym.Env:
    """``env`` with :class:`ChannelsFirst` when it observes images, else unchanged."""
    return ChannelsFirst(env) if is_image_space(env.observation_space) else env
