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


class _NaNRewardCartPole:
    """CartPole-v1 whose reward turns NaN at its 30th step after a reset: the environment,
    not the learner, makes the run diverge."""

    def __new__(cls, **kwargs):  # noqa: ANN003, ANN204
        import gymnasium as gym_
        from gymnasium.envs.classic_control.cartpole import CartPoleEnv

        class _Env(gym_.Wrapper):
            def reset(self, *, seed=None, options=None):  # noqa: ANN001, ANN201
                self.t = 0
                return self.env.reset(seed=seed, options=options)

            def step(self, action):  # noqa: ANN001, ANN201
                self.t += 1
                obs, r, term, trunc, info = self.env.step(action)
                return obs, (float("nan") if self.t == 30 else r), term, trunc, info

        return _Env(CartPoleEnv(**kwargs))


if "NaNReward-v0" not in gym.registry:
    gym.register(id="NaNReward-v0", entry_point=_NaNRewardCartPole, max_episode_steps=100)


if "LongPendulum-v0" not in gym.registry:  # episodes of 1000 steps
    gym.register(id="LongPendulum-v0",
                 entry_point="gymnasium.envs.classic_control.pendulum:PendulumEnv",
                 max_episode_steps=1000)
