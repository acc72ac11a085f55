"""A custom gymnasium env module for tests: ``marker_env:Marker-v0``.

Importing it registers ``Marker-v0`` (CartPole-v1's dynamics with a 100-step limit) and,
when ``STUDY_TEST_MARKER`` names a file, appends this process's id to it: a test can tell
whether (and in which processes) a command imported the module a store names.
"""

import os

import gymnasium as gym

if os.environ.get("STUDY_TEST_MARKER"):
    with open(os.environ["STUDY_TEST_MARKER"], "a") as f:
        f.write(f"{os.getpid()}\n")

if "Marker-v0" not in gym.registry:
    gym.register(id="Marker-v0",
                 entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=100)


class _WarnyCartPole:
    """CartPole-v1 that warns on construction, as some envs warn once per instance."""

    def __new__(cls, **kwargs):  # noqa: ANN003, ANN204
        import warnings

        from gymnasium.envs.classic_control.cartpole import CartPoleEnv

        warnings.warn("Warny-v0 is deprecated", DeprecationWarning, stacklevel=2)
        return CartPoleEnv(**kwargs)


if "Warny-v0" not in gym.registry:
    gym.register(id="Warny-v0", entry_point=_WarnyCartPole, max_episode_steps=100)
