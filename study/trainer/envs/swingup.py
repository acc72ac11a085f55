"""CartPoleSwingUp: gymnasium environments and the NumPy population version.

Dynamics, reset distribution, observation and rewards follow gym-cartpole-swingup 0.1.4
(angelolovatto/gym-cartpole-swingup, ``envs/cartpole_swingup.py``), ported to the
gymnasium 1.x API:

* physics: g = 9.82, force = 10 * a with a clipped to [-1, 1], dt = 0.01, friction 0.1,
  cart mass 0.5, pole mass 0.5, pole length 0.6; explicit Euler from the old state;
* the episode terminates (without penalty) when ``|x| > 2.4``; the 500-step limit comes
  from the registration (``max_episode_steps=500``);
* reset: ``N([0, 0, pi, 0], 0.2)`` per component (the pole hangs down);
* observation ``[x, x_dot, cos(theta), sin(theta), theta_dot]`` (float32);
* reward from the new state's angle: ``cos(theta)`` (v0) or ``(1 + cos(theta)) / 2`` (v1).

Two deliberate differences from the reference: the state evolves in float64 (the
reference starts from float32 values and its precision then depends on NumPy's
promotion rules) and the reward is computed in float64 (the reference rounds it to
float32); reset values are rounded to float32 like the reference's.

``state`` is ``(x, x_dot, theta, theta_dot)`` as in gymnasium's CartPole (the reference's
``State`` namedtuple has the same order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from study.trainer.envs.cartpole import FastPopulationEnv
from study.trainer.rng import STREAM_RESET

GRAVITY = 9.82
FORCE_MAG = 10.0
DT = 0.01
FRICTION = 0.1
X_THRESHOLD = 2.4
CART_MASS = 0.5
CART_WIDTH = 1 / 3
CART_HEIGHT = 1 / 6
POLE_MASS = 0.5
POLE_LENGTH = 0.6
POLE_WIDTH = 0.05
MASS_TOTAL = CART_MASS + POLE_MASS
MPL = POLE_MASS * POLE_LENGTH
RESET_MEAN = np.array([0.0, 0.0, np.pi, 0.0])
RESET_SD = 0.2

# Constant factors of the reference formulas, folded exactly as Python folds the
# reference's left-to-right products (e.g. ``-2 * mpl * theta_dot**2`` is
# ``(-2 * mpl) * theta_dot**2``), so the results are bit-for-bit the reference's.
_XD_A = -2 * MPL
_XD_B = 3 * POLE_MASS * GRAVITY
_XD_C = 4 * FRICTION
_XD_D = 4 * MASS_TOTAL
_XD_E = 3 * POLE_MASS
_TD_A = -3 * MPL
_TD_B = 6 * MASS_TOTAL * GRAVITY
_TD_D = 4 * POLE_LENGTH * MASS_TOTAL
_TD_E = 3 * MPL


def swingup_spaces() -> tuple[gym.spaces.Box, gym.spaces.Box]:
    """Observation and action space of one CartPoleSwingUp environment."""
    high = np.full(5, np.finfo(np.float32).max, dtype=np.float32)
    obs_space = gym.spaces.Box(-high, high, dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    return obs_space, act_space


def swingup_accelerations(
    x_dot: Any, cos_theta: Any, sin_theta: Any, theta_dot: Any, force: Any
) -> tuple[Any, Any]:
    """``(xdot_update, thetadot_update)`` of the reference, for scalars or arrays.

    ``force`` is ``10 * a``. The expressions keep the reference's evaluation order.
    """
    theta_dot_sq = theta_dot**2
    cos_sq = cos_theta**2
    xdot_update = (
        _XD_A * theta_dot_sq * sin_theta + _XD_B * sin_theta * cos_theta + 4 * force - _XD_C * x_dot
    ) / (_XD_D - _XD_E * cos_sq)
    thetadot_update = (
        _TD_A * theta_dot_sq * sin_theta * cos_theta
        + _TD_B * sin_theta
        + 6 * (force - FRICTION * x_dot) * cos_theta
    ) / (_TD_D - _TD_E * cos_sq)
    return xdot_update, thetadot_update


def _reward(cos_theta: Any, version: int) -> Any:
    return cos_theta if version == 0 else (1 + cos_theta) / 2


class CartPoleSwingUpEnv(gym.Env[np.ndarray, np.ndarray]):
    """Single CartPoleSwingUp environment (gymnasium API); see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}
    reward_version = 1

    def __init__(self, render_mode: str | None = None) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unsupported render_mode {render_mode!r}; only 'rgb_array'")
        self.render_mode = render_mode
        self.observation_space, self.action_space = swingup_spaces()
        self.state: np.ndarray | None = None
        self._renderer: _Renderer | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Draw a new state around the hanging position; returns ``(obs, {})``."""
        super().reset(seed=seed)
        # Rounded to float32 like the reference's reset, then kept in float64.
        draw = self.np_random.normal(loc=RESET_MEAN, scale=RESET_SD)
        self.state = draw.astype(np.float32).astype(np.float64)
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply force ``10 * clip(action[0], -1, 1)`` for one 0.01 s Euler step."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        x, x_dot, theta, theta_dot = (float(v) for v in self.state)
        xdot_update, thetadot_update = swingup_accelerations(
            x_dot, np.cos(theta), np.sin(theta), theta_dot, a * FORCE_MAG
        )
        self.state = np.array(
            [
                x + x_dot * DT,
                x_dot + xdot_update * DT,
                theta + theta_dot * DT,
                theta_dot + thetadot_update * DT,
            ],
            dtype=np.float64,
        )
        reward = float(_reward(np.cos(self.state[2]), self.reward_version))
        terminated = bool(abs(self.state[0]) > X_THRESHOLD)
        return self._obs(), reward, terminated, False, {}

    def _obs(self) -> np.ndarray:
        assert self.state is not None
        x, x_dot, theta, theta_dot = self.state
        return np.array([x, x_dot, np.cos(theta), np.sin(theta), theta_dot], dtype=np.float32)

    def render(self) -> np.ndarray | None:
        """An ``HxWx3`` uint8 image of the track, cart and pole (``render_mode="rgb_array"``)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; use render_mode='rgb_array'")
            return None
        if self.state is None:
            return None
        if self._renderer is None:
            self._renderer = _Renderer()
        return self._renderer.draw(float(self.state[0]), float(self.state[2]))

    def close(self) -> None:
        """Release the matplotlib figure, if any."""
        self._renderer = None


class CartPoleSwingUpV0(CartPoleSwingUpEnv):
    """CartPoleSwingUp with reward ``cos(theta)`` in [-1, 1]."""

    reward_version = 0


class CartPoleSwingUpV1(CartPoleSwingUpEnv):
    """CartPoleSwingUp with reward ``(1 + cos(theta)) / 2`` in [0, 1]."""

    reward_version = 1


class _Renderer:
    """Off-screen matplotlib drawing of the cart-pole (Agg canvas, no display needed).

    Geometry follows the reference viewer: a 600x400 image of a 5-unit-wide world, the
    cart centred at mid-height, the pole at angle ``theta`` from upright.
    """

    width, height, world_width = 600, 400, 5.0

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Circle, Rectangle

        dpi = 100
        self.fig = Figure(figsize=(self.width / dpi, self.height / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        ax = self.fig.add_axes((0, 0, 1, 1))
        half_w = self.world_width / 2
        half_h = half_w * self.height / self.width
        ax.set_xlim(-half_w, half_w)
        ax.set_ylim(-half_h, half_h)
        ax.set_axis_off()
        track_y = -CART_HEIGHT / 2 - CART_HEIGHT / 4
        ax.plot([-half_w, half_w], [track_y, track_y], color="black", lw=1)
        ax.plot([-X_THRESHOLD, -X_THRESHOLD], [track_y - 0.1, track_y + 0.1], color="gray")
        ax.plot([X_THRESHOLD, X_THRESHOLD], [track_y - 0.1, track_y + 0.1], color="gray")
        self.cart = Rectangle((0, 0), CART_WIDTH, CART_HEIGHT, color="red")
        ax.add_patch(self.cart)
        self.wheels = [Circle((0, 0), CART_HEIGHT / 4, color="black") for _ in range(2)]
        for wheel in self.wheels:
            ax.add_patch(wheel)
        pole_px = POLE_WIDTH * self.width / self.world_width
        (self.pole,) = ax.plot([], [], color="blue", lw=pole_px * 72 / dpi, solid_capstyle="butt")
        self.bob = Circle((0, 0), POLE_WIDTH / 2, color="black", zorder=3)
        ax.add_patch(self.bob)

    def draw(self, x: float, theta: float) -> np.ndarray:
        """Render the cart at ``x`` with the pole at ``theta``; ``[H, W, 3]`` uint8."""
        self.cart.set_xy((x - CART_WIDTH / 2, -CART_HEIGHT / 2))
        self.wheels[0].center = (x - CART_WIDTH / 2, -CART_HEIGHT / 2)
        self.wheels[1].center = (x + CART_WIDTH / 2, -CART_HEIGHT / 2)
        tip = (x - POLE_LENGTH * np.sin(theta), POLE_LENGTH * np.cos(theta))
        self.pole.set_data([x, tip[0]], [0.0, tip[1]])
        self.bob.center = tip
        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


class SwingUpPopulation(FastPopulationEnv):
    """``S x E`` CartPoleSwingUp environments stepped together in NumPy.

    Same dynamics as :class:`CartPoleSwingUpEnv`; ``reward_version`` 0 or 1 selects the
    v0 or v1 reward. Actions are ``[S, E, 1]`` floats (clipped to [-1, 1] here as well).
    """

    n_draws = 8  # two uniforms per normal (Box-Muller) for 4 components
    # Rows x, x_dot, cos(theta), sin(theta), theta_dot (the observation, in order) and
    # theta. cos and sin of the current angle are kept because the observation needs
    # them and the next step's dynamics reuse them (two trigonometric passes per step
    # instead of four). Positions x, theta are rows 0::5, velocities rows 1::3.
    n_components = 6
    obs_dim = 5
    state_rows = (0, 1, 5, 4)

    def __init__(
        self,
        seeds: Sequence[int],
        num_envs: int,
        stream: int = STREAM_RESET,
        reward_version: int = 1,
        max_episode_steps: int = 500,
    ) -> None:
        if reward_version not in (0, 1):
            raise ValueError(f"reward_version must be 0 or 1, got {reward_version!r}")
        super().__init__(seeds, num_envs, stream, max_episode_steps)
        self.reward_version = reward_version
        self.observation_space, self.action_space = swingup_spaces()
        self._vel_step = np.empty((2, self.n_members, self.n_envs))

    def _sample(self, u: np.ndarray) -> np.ndarray:
        # Box-Muller exactly as MemberStreams.normal: (0, 1] keeps the log finite.
        z = np.sqrt(-2.0 * np.log(1.0 - u[..., :4])) * np.cos(2.0 * np.pi * u[..., 4:])
        # Rounded to float32 like the reference's reset, then kept in float64.
        draw = (RESET_MEAN + RESET_SD * z).astype(np.float32).astype(np.float64)
        x, x_dot, theta, theta_dot = np.moveaxis(draw, -1, 0)
        return np.stack([x, x_dot, np.cos(theta), np.sin(theta), theta_dot, theta], axis=-1)

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = self._state
        x_dot, cos, sin, theta_dot = state[1], state[2], state[3], state[4]
        a = np.asarray(actions, dtype=np.float64).reshape(self.n_members, self.n_envs)
        # np.maximum + np.minimum: same result as np.clip, at less than half its overhead.
        force = np.maximum(a, -1.0)
        np.minimum(force, 1.0, out=force)
        force *= FORCE_MAG
        xdot_update, thetadot_update = swingup_accelerations(x_dot, cos, sin, theta_dot, force)
        vel_step = self._vel_step
        np.multiply(xdot_update, DT, out=vel_step[0])
        np.multiply(thetadot_update, DT, out=vel_step[1])
        # Euler from the old state: positions (x, theta) move with the old velocities.
        state[0::5] += state[1::3] * DT
        state[1::3] += vel_step
        theta = state[5]
        np.cos(theta, out=cos)
        np.sin(theta, out=sin)
        reward = cos.copy() if self.reward_version == 0 else (1 + cos) / 2
        terminated = np.abs(state[0]) > X_THRESHOLD
        return reward, terminated

    def set_state(self, state: np.ndarray) -> None:
        """Overwrite the physical state with ``[S, E, 4]`` values (x, x_dot, theta, theta_dot)."""
        super().set_state(state)
        np.cos(self._state[5], out=self._state[2])
        np.sin(self._state[5], out=self._state[3])
