"""``python -m study.render RESULTS_DIR --run RUN_ID``: watch one run's final policy.

    python -m study.render results/a2c-blog-swingup --run 1f3c9a0e2b7d4c55
    python -m study.render results/a2c-blog-swingup --run 1f3c9a0e2b7d4c55 --out agent.gif
    python -m study.render results/a2c-blog-swingup --run 1f3c9a0e2b7d4c55 --frames 12 --seed 3
    python -m study.render results/a2c-blog-swingup --list     # which runs can be drawn

Needs a sweep run with ``save_policies = true`` (``policies/<run_id>.npz`` in the store).
The run's hyperparameters rebuild its networks; the policy acts deterministically (the
argmax of the logits, or the Gaussian mean clipped to the action bounds) for one episode
of the run's environment, reset with ``--seed`` (default 0). The output is a filmstrip PNG
(``--frames`` frames evenly spaced over the episode, in a row or a grid, each labelled with
the step and the return so far) or an animated GIF (Pillow), by the extension of ``--out``
(default ``RESULTS_DIR/render/<run_id>.png``).

Frames come from the environment's ``rgb_array`` renderer. CartPole and Pendulum render
through pygame in gymnasium; without pygame they are drawn here with matplotlib (same
geometry, plainer look). A run trained with ``normalize_obs = true`` is replayed with the
observation statistics saved beside its weights (frozen at the end of training).

Bad input (not a store, an unknown run id, a run without a saved policy, an unknown
extension) is one ``error:`` line and exit code 2, with nothing written.
"""

from __future__ import annotations

import difflib
import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from study import store
from study.config import SPECS, ConfigError, coerce, resolve
from study.hyperparameters import Structure
from study.trust import require_trust

__all__ = [
    "Episode",
    "Filmstrip",
    "SavedPolicy",
    "episode_filmstrip",
    "filmstrip",
    "frame_steps",
    "list_runs",
    "load_policy",
    "main",
    "play_episode",
    "render_filmstrip",
]

EXTENSIONS: tuple[str, ...] = (".png", ".gif")
#: Frames when ``--frames`` is not given: a 2 x 4 filmstrip, or a short animation.
DEFAULT_FRAMES: dict[str, int] = {".png": 8, ".gif": 60}
#: Filmstrip PNG: each frame this many pixels wide, at this resolution.
PANEL_PX = 300
DPI = 150
#: At most this many frames in one row of a filmstrip.
MAX_COLUMNS = 6
#: GIF frames are scaled to this width (pixels).
GIF_WIDTH = 400
#: Episode cap for environments without a time limit (when --max-steps is not given).
DEFAULT_MAX_STEPS = 1000


# --------------------------------------------------------------------------------------
# the saved policy


@dataclass(frozen=True)
class SavedPolicy:
    """A run's final policy weights with what is needed to act with them: its resolved
    hyperparameters rebuild the trainer's own network (study.trainer.networks.ActorCritic), into
    which the weights are loaded by name."""

    run_id: str
    env_id: str
    seed: int
    status: str
    final_return: float
    hyperparameters: dict[str, Any]
    weights: dict[str, np.ndarray]

    def _normalise(self, x: np.ndarray) -> np.ndarray:
        """The trainer's observation normalization (``ObsNormalizer``), when it was on."""
        if "obs_mean" not in self.weights:
            return x
        mean, var = self.weights["obs_mean"], self.weights["obs_var"]
        return np.clip((x.astype(np.float64) - mean) / np.sqrt(var + 1e-8), -10, 10)

    def policy_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """``obs -> policy output`` (logits or Gaussian means, float64) of one observation
        of :func:`study.trainer.envs.make_single_env`, computed by the trainer's network with one
        member; ConfigError (one line) when the weights do not fit that network."""
        import torch

        from study.trainer.envs import env_spaces
        from study.trainer.networks import ActorCritic

        structure = Structure.of(self.hyperparameters)
        obs_space, act_space = env_spaces(self.env_id, structure)
        log_std = torch.zeros(1)
        net = ActorCritic(structure, [0], obs_space, act_space, log_std,
                          torch.device("cpu"))
        try:
            net.load_member_state({k: v for k, v in self.weights.items()
                                   if not k.startswith("obs_")})
        except ConfigError as e:
            raise ConfigError(f"the saved policy of run {self.run_id} does not fit its "
                              f"network on {self.env_id}: {e}") from None
        image = obs_space.dtype == np.uint8

        def out(obs: np.ndarray) -> np.ndarray:
            x = np.asarray(obs)
            x = x.astype(np.uint8) if image else self._normalise(
                x.astype(np.float32).reshape(-1)).astype(np.float32)
            with torch.no_grad():
                y = net.policy_out(torch.from_numpy(np.ascontiguousarray(x))[None, None])
            return y[0, 0].numpy().astype(np.float64)

        return out


def _hyperparameters(row: dict[str, Any], env_id: str) -> dict[str, Any]:
    """A run's resolved hyperparameters from its row (keys a store predates, or NaN cells
    of other envs' keys, at their defaults for ``env_id``)."""
    given = {}
    for k in SPECS:
        v = row.get(k)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        given[k] = v.tolist() if hasattr(v, "tolist") else v
    return resolve(given, f"run {row.get('run_id')}: ", env=env_id)


def _run_row(root: Path, run_id: str) -> dict[str, Any]:
    runs = store.load_runs(root)  # StoreError (one line) if not a store / empty
    ids = runs["run_id"].astype(str).tolist()
    if run_id not in ids:
        close = [i for i in ids if i.startswith(run_id)][:3] if run_id else []
        close = close or difflib.get_close_matches(run_id, ids, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{root}: no run {run_id!r} among its {len(ids)} runs{hint}")
    return runs[runs["run_id"].astype(str) == run_id].iloc[0].to_dict()


def load_policy(results_dir: str | Path, run_id: str) -> SavedPolicy:
    """The saved policy of ``run_id`` in the store at ``results_dir``.

    ConfigError (one line) if the path is not a store, the run is unknown (with close
    ids), has no saved policy, its weights are not finite, or it normalised observations.
    """
    root = Path(results_dir)
    row = _run_row(root, run_id)
    path = root / store.POLICIES_DIR / f"{run_id}.npz"
    if not path.is_file():
        raise ConfigError(
            f"run {run_id} has no saved policy ({path} is missing); run its sweep with "
            "save_policies = true to keep the final weights")
    try:
        with np.load(path, allow_pickle=False) as data:  # plain arrays: never unpickle
            weights = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable saved policy ({' '.join(str(e).split())})") \
            from None
    if coerce("normalize_obs", row.get("normalize_obs", False)) and "obs_mean" not in weights:
        raise ConfigError(
            f"run {run_id} used normalize_obs = true and its observation statistics are not "
            "saved (a store from an older version), so its policy cannot be replayed")
    if not any(k.startswith(("pi.", "trunk.")) for k in weights):
        raise ConfigError(f"{path}: not a saved policy (no policy weights)")
    if not all(np.isfinite(w).all() for w in weights.values()):
        raise ConfigError(f"run {run_id} ({row.get('status')}) has non-finite saved weights; "
                          "there is no policy to replay")
    env_id = str(row["env"])
    return SavedPolicy(
        run_id=run_id, env_id=env_id, seed=int(row["seed"]),
        status=str(row.get("status", "ok")), final_return=float(row.get("final_return", np.nan)),
        hyperparameters=_hyperparameters(row, env_id), weights=weights,
    )


# --------------------------------------------------------------------------------------
# playing an episode


@dataclass
class Episode:
    """One deterministic episode: the actions taken and the rewards they got."""

    env_id: str
    seed: int
    actions: list[Any]
    rewards: np.ndarray
    terminated: bool
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.actions)

    def return_at(self, step: int) -> float:
        """The return after ``step`` steps (0 at the reset)."""
        return float(self.rewards[:step].sum())


def _make_env(policy: SavedPolicy) -> Any:
    """The run's environment as the trainer made it (Atari preprocessing, channel-first
    images), drawing ``rgb_array`` frames of the game itself."""
    from study.trainer.envs import make_single_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "CartPole-v0 is out of date"
        return make_single_env(policy.env_id, Structure.of(policy.hyperparameters),
                               render_mode="rgb_array")


def _actor(policy: SavedPolicy, env: Any) -> Callable[[np.ndarray], Any]:
    """``obs -> action`` for ``env``: argmax of the logits, or the mean clipped to bounds."""
    import gymnasium as gym

    space = env.action_space
    out = policy.policy_fn()
    if isinstance(space, gym.spaces.Discrete):
        return lambda obs: int(space.start + int(np.argmax(out(obs))))
    low, high = space.low.astype(np.float64), space.high.astype(np.float64)
    return lambda obs: np.clip(out(obs).reshape(space.shape), low, high).astype(space.dtype)


def play_episode(policy: SavedPolicy, seed: int = 0, max_steps: int | None = None) -> Episode:
    """Play one episode of the run's env with its deterministic policy, reset by ``seed``.

    Ends at termination, at the env's time limit, or after ``max_steps`` steps, whichever
    comes first (without a time limit and ``max_steps``: :data:`DEFAULT_MAX_STEPS`).
    """
    env = _make_env(policy)
    try:
        act = _actor(policy, env)
        limit = max_steps or (env.spec.max_episode_steps if env.spec else None) or \
            DEFAULT_MAX_STEPS
        obs, _ = env.reset(seed=int(seed))
        actions: list[Any] = []
        rewards: list[float] = []
        terminated = truncated = False
        while len(actions) < limit and not (terminated or truncated):
            a = act(obs)
            obs, r, terminated, truncated, _ = env.step(a)
            actions.append(a)
            rewards.append(float(r))
    finally:
        env.close()
    return Episode(policy.env_id, int(seed), actions, np.asarray(rewards, float),
                   bool(terminated), bool(truncated or (not terminated and len(actions) >= limit)))


def frame_steps(length: int, n: int) -> list[int]:
    """``n`` steps evenly spaced over an episode of ``length`` steps, both ends included
    (0 is the reset state); fewer when the episode has fewer than ``n`` states."""
    return sorted({int(round(s)) for s in np.linspace(0, length, max(1, n))})


# --------------------------------------------------------------------------------------
# frames


class _MplDrawer:
    """Off-screen matplotlib drawing of a classic-control state (used without pygame)."""

    def __init__(self, width: int, height: int, xlim: float, ylim: float) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(width / 100, height / 100), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(-xlim, xlim)
        self.ax.set_ylim(-ylim, ylim)
        self.ax.set_axis_off()

    def image(self) -> np.ndarray:
        self.canvas.draw()
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


class _CartPoleDrawer(_MplDrawer):
    """gymnasium's CartPole viewer geometry: a 600x400 image of a 4.8-unit-wide world."""

    def __init__(self, env: Any) -> None:
        from matplotlib.patches import Rectangle

        half_world = 2 * float(env.x_threshold) / 2  # world width 2 * x_threshold = 4.8
        super().__init__(600, 400, half_world, half_world * 400 / 600)
        self.half_len = float(env.length)
        self.ax.axhline(0, color="black", lw=1)
        self.cart = Rectangle((0, 0), 0.4, 0.24, color="black", zorder=2)
        self.ax.add_patch(self.cart)
        (self.pole,) = self.ax.plot([], [], color="#ca9865", lw=8, solid_capstyle="butt")

    def draw(self, env: Any) -> np.ndarray:
        x, _, theta, _ = (float(v) for v in env.state)
        self.cart.set_xy((x - 0.2, -0.05))
        top = 0.19
        length = 2 * self.half_len
        self.pole.set_data([x, x + length * math.sin(theta)], [top, top + length * math.cos(theta)])
        return self.image()


class _PendulumDrawer(_MplDrawer):
    """gymnasium's Pendulum viewer geometry: a unit rod from the centre (0 = upright)."""

    def __init__(self, env: Any) -> None:
        from matplotlib.patches import Circle

        super().__init__(400, 400, 2.2, 2.2)
        (self.rod,) = self.ax.plot([], [], color="#cc4d4d", lw=16, solid_capstyle="round")
        self.ax.add_patch(Circle((0, 0), 0.05, color="black", zorder=3))

    def draw(self, env: Any) -> np.ndarray:
        theta = float(env.state[0])
        self.rod.set_data([0, -math.sin(theta)], [0, math.cos(theta)])
        return self.image()


_FALLBACK_DRAWERS: dict[str, Callable[[Any], Any]] = {
    "CartPoleEnv": _CartPoleDrawer,
    "PendulumEnv": _PendulumDrawer,
}


def episode_frames(policy: SavedPolicy, episode: Episode, steps: Sequence[int]) -> list[np.ndarray]:
    """``[H, W, 3]`` uint8 images of the states after each of ``steps`` steps, by replaying
    the episode's actions from the same reset."""
    import gymnasium as gym

    env = _make_env(policy)
    drawer: Any = None

    def frame() -> np.ndarray:
        nonlocal drawer
        if drawer is None:
            try:
                img = env.render()
                if img is not None:
                    return np.asarray(img)[..., :3]
            except gym.error.DependencyNotInstalled as e:
                why = str(e).splitlines()[0] if str(e) else "a dependency is missing"
            else:
                why = "it has no rgb_array renderer"
            make = _FALLBACK_DRAWERS.get(type(env.unwrapped).__name__)
            if make is None:
                raise ConfigError(f"environment {policy.env_id!r} cannot draw frames: {why}")
            drawer = make(env.unwrapped)
        return drawer.draw(env.unwrapped)

    wanted = set(steps)
    frames: list[np.ndarray] = []
    try:
        env.reset(seed=episode.seed)
        if 0 in wanted:
            frames.append(frame())
        for t, a in enumerate(episode.actions, start=1):
            if t > max(wanted):
                break
            env.step(a)
            if t in wanted:
                frames.append(frame())
    finally:
        env.close()
    return frames


@dataclass
class Filmstrip:
    """Frames of one episode with their labels, ready for
    :func:`study.report.figures.filmstrip_figure`."""

    title: str
    frames: list[np.ndarray]
    labels: list[str]
    steps: list[int]
    episode: Episode


def _label(step: int, ret: float) -> str:
    return f"step {step}\nreturn {ret:.1f}"


def episode_filmstrip(policy: SavedPolicy, n_frames: int, seed: int = 0,
                      max_steps: int | None = None, title: str | None = None) -> Filmstrip:
    """Play one episode and take ``n_frames`` frames evenly spaced over it."""
    episode = play_episode(policy, seed, max_steps)
    steps = frame_steps(episode.length, n_frames)
    frames = episode_frames(policy, episode, steps)
    end = "terminated" if episode.terminated else "time limit"
    title = title or (f"run {policy.run_id} (seed {policy.seed}) on {policy.env_id}: "
                      f"return {episode.return_at(episode.length):.1f} in {episode.length} "
                      f"steps ({end})")
    return Filmstrip(title, frames, [_label(s, episode.return_at(s)) for s in steps], steps,
                     episode)


def filmstrip(results_dir: str | Path, run_id: str, n_frames: int = 8, seed: int = 0,
              max_steps: int | None = None, title: str | None = None) -> Filmstrip:
    """:func:`episode_filmstrip` of the saved policy of ``run_id`` (see :func:`load_policy`)."""
    return episode_filmstrip(load_policy(results_dir, run_id), n_frames, seed, max_steps, title)


# --------------------------------------------------------------------------------------
# writing


def columns_for(n_frames: int) -> int:
    """Columns of a filmstrip of ``n_frames``: one row up to :data:`MAX_COLUMNS`, else
    the fewest rows of at most that many, balanced (8 -> 2 x 4, 10 -> 2 x 5)."""
    rows = math.ceil(n_frames / MAX_COLUMNS)
    return math.ceil(n_frames / rows)


def _png_bytes(strip: Filmstrip) -> bytes:
    from study.report.figures import filmstrip_figure

    fig = filmstrip_figure([(strip.title, strip.frames, strip.labels)],
                           ncols=columns_for(len(strip.frames)), panel_width=PANEL_PX / DPI,
                           dpi=DPI)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _gif_bytes(strip: Filmstrip, fps: float) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font: Any = ImageFont.load_default(size=14)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: the bitmap font
        font = ImageFont.load_default()
    images = []
    for img, label in zip(strip.frames, strip.labels, strict=True):
        im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8))
        h = round(im.height * GIF_WIDTH / im.width)
        im = im.resize((GIF_WIDTH, h), Image.Resampling.LANCZOS)
        ImageDraw.Draw(im).text((6, 4), label.replace("\n", "   "), fill=(0, 0, 0), font=font)
        images.append(im)
    gaps = np.diff([*strip.steps, strip.steps[-1] + 1]) if strip.steps else np.ones(1)
    durations = [max(20, int(round(1000 * g / fps))) for g in gaps]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=durations, loop=0, disposal=1)
    return buf.getvalue()


def _check_out(out: Path) -> str:
    ext = out.suffix.lower()
    if ext not in EXTENSIONS:
        what = f"unknown extension {out.suffix!r}" if out.suffix else "no extension"
        raise ConfigError(f"--out {out}: {what}; expected {' or '.join(EXTENSIONS)}")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out}: is a directory")
    return ext


def render_filmstrip(results_dir: str | Path, run_id: str, out: str | Path | None = None,
                     frames: int | None = None, seed: int = 0,
                     max_steps: int | None = None, trust: bool = False) -> Path:
    """Write run ``run_id``'s filmstrip PNG or GIF (by ``out``'s extension; default
    ``results_dir/render/<run_id>.png``) and return its path.

    Every check (store, run, saved policy, extension) happens before anything is written;
    the file itself is written atomically. Raises ConfigError (one line) for bad input,
    and for a run whose env names a module (``module:Env-v0``) in a store made elsewhere
    unless ``trust`` (see :mod:`study.trust`).
    """
    root = Path(results_dir)
    path = Path(out) if out is not None else root / "render" / f"{run_id}.png"
    ext = _check_out(path)
    n = DEFAULT_FRAMES[ext] if frames is None else int(frames)
    if n < 1:
        raise ConfigError(f"--frames {n} is invalid: expected an integer >= 1")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps {max_steps} is invalid: expected an integer >= 1")
    if seed < 0:
        raise ConfigError(f"--seed {seed} is invalid: expected an integer >= 0")
    policy = load_policy(root, run_id)
    require_trust(root, store.read_manifest(root), policy.env_id, trust)
    strip = episode_filmstrip(policy, n, seed, max_steps)
    if ext == ".png":
        data = _png_bytes(strip)
    else:
        env = _make_env(policy)
        fps = float(env.metadata.get("render_fps") or 50)
        env.close()
        data = _gif_bytes(strip, fps)
    store.atomic_write_bytes(path, data)
    return path


# --------------------------------------------------------------------------------------
# CLI


def list_runs(results_dir: str | Path) -> str:
    """The store's runs as a text table: run id, config (the hyperparameters that differ),
    seed, final return, status, and whether a policy is saved (what ``--run`` can draw).

    ConfigError (one line) if the path is not a store or holds no runs.
    """
    from study.analysis.failures import config_labels
    from study.text import format_value

    root = Path(results_dir)
    runs = store.load_runs(root)
    saved = {p.stem for p in (root / store.POLICIES_DIR).glob("*.npz")}
    labels = config_labels(runs)
    header = ["run_id", "config", "seed", "final_return", "status", "policy"]
    rows = [[str(r.run_id), labels.get(str(r.config_id), str(r.config_id)), str(r.seed),
             "nan" if math.isnan(float(r.final_return)) else format_value(
                 round(float(r.final_return), 2)),
             str(r.status), "saved" if str(r.run_id) in saved else "-"]
            for r in runs.itertuples(index=False)]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    right = {2, 3}  # numbers

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    n_saved = sum(r[-1] == "saved" for r in rows)
    tail = (f"{len(rows)} runs, {n_saved} with a saved policy"
            + ("" if n_saved else "; run the sweep with save_policies = true to keep them"))
    return "\n".join([line(header), *[line(r) for r in rows], tail]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.render RESULTS_DIR --run RUN_ID [--out F] [--frames N] ...``, or
    ``--list`` for the run ids."""
    from study.cli_util import ArgumentParser, run_cli

    def body(args_in: Sequence[str] | None) -> int:
        ap = ArgumentParser(prog="python -m study.render",
                            description="Draw one episode of a run's saved policy as a "
                                        "filmstrip PNG or an animated GIF, or list the runs.")
        ap.add_argument("results_dir", help="a results store of a sweep with save_policies")
        what = ap.add_mutually_exclusive_group(required=True)
        what.add_argument("--run", metavar="RUN_ID", help="the run to watch")
        what.add_argument("--list", action="store_true",
                          help="list the runs (id, config, seed, final return, status, "
                               "saved policy) and exit")
        ap.add_argument("--out", metavar="FILE",
                        help="FILE.png (filmstrip) or FILE.gif (animation); default "
                             "RESULTS_DIR/render/RUN_ID.png")
        ap.add_argument("--frames", type=int, metavar="N",
                        help="frames evenly spaced over the episode (default 8 for PNG, "
                             "60 for GIF)")
        ap.add_argument("--seed", type=int, default=0, help="seed of the episode's reset")
        ap.add_argument("--max-steps", type=int, metavar="N",
                        help="stop the episode after N steps (default: the time limit)")
        ap.add_argument("--trust", action="store_true",
                        help="import the module named by the run's env (module:Env-v0) "
                             "even though the store was made elsewhere: it runs that "
                             "module's code")
        args = ap.parse_args(args_in)
        if args.list:
            print(list_runs(args.results_dir), end="")
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = render_filmstrip(args.results_dir, args.run, args.out, args.frames,
                                    args.seed, args.max_steps, trust=args.trust)
        print(f"wrote {path}")
        return 0

    return run_cli(body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
