"""Image tasks: a CNN population against SB3's A2C with the same network, in one run.

    python benchmarks/images.py [--minatar-sizes 1 16 64] [--ale-sizes 1 4 16]
                                [--steps 20000] [--repeats 3] [--device cuda]

For ``MinAtar/Breakout-v1`` (MinAtar CNN: 16 3x3 convolutions, 128 units; 8 envs x 5 steps)
and ``ALE/Breakout-v5`` (Nature CNN, Atari protocol; 8 envs x 5 steps), env steps/s of our
population (all members' steps, one process, one torch thread) and of SB3 A2C with the same
network (a custom features extractor for MinAtar, ``CnnPolicy`` for Atari; 8 envs), runs
interleaved, medians of ``--repeats``. Also where the time goes in the population
(environment stepping and preprocessing, network passes and updates), and the fraction of
the machine's measured single-thread float32 conv/matmul peak that the network work reaches.
Env construction is excluded on both sides (each run is timed from its first update).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from study import config as cfg
from study.hyperparameters import Structure
from study.trainer.population import Member, train_population

RESULTS = Path(__file__).parent / "results"


def _ours(env_id: str, n_members: int, steps: int, device: str) -> dict:
    hp = cfg.resolve({"num_envs": 8, "n_steps": 5}, env=env_id)
    members = [Member(hp, s) for s in range(n_members)]
    timer = _Timer()
    t0 = time.perf_counter()
    train_population(env_id, members, steps, log_every=steps, device=device,
                     on_progress=timer.tick)
    wall = time.perf_counter() - t0
    run_s = wall - timer.first_s  # from the end of the first rollout: no env construction
    return {"steps_per_s": (timer.steps - timer.first_steps) / run_s, "wall_s": wall}


class _Timer:
    """``on_progress`` callback: when the first rollout ended and how many steps it had."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = 0
        self.first_s = 0.0
        self.first_steps = 0

    def tick(self, n: int) -> None:
        self.steps += n
        if not self.first_steps:
            self.first_s, self.first_steps = time.perf_counter() - self.t0, n


def _minatar_extractor():
    import torch.nn as nn
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarCNN(BaseFeaturesExtractor):
        """Young & Tian's network: Conv(16, 3x3, stride 1), ReLU, Linear(128), ReLU."""

        def __init__(self, space, features_dim: int = 128) -> None:
            super().__init__(space, features_dim)
            c, h, w = space.shape
            self.net = nn.Sequential(nn.Conv2d(c, 16, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(16 * (h - 2) * (w - 2), features_dim), nn.ReLU())

        def forward(self, x):
            return self.net(x)

    return MinAtarCNN


def _sb3(env_id: str, steps: int) -> dict:
    from stable_baselines3 import A2C
    from stable_baselines3.common.vec_env import DummyVecEnv

    from study.trainer.envs import make_single_env

    torch.set_num_threads(1)
    hp = Structure.of(cfg.resolve({}, env=env_id))
    env = DummyVecEnv([lambda: make_single_env(env_id, hp) for _ in range(8)])
    kwargs: dict = {"normalize_images": env_id.startswith("ALE/")}
    if env_id.startswith("MinAtar/"):
        kwargs["features_extractor_class"] = _minatar_extractor()
    model = A2C("CnnPolicy", env, n_steps=5, policy_kwargs=kwargs, device="cpu", seed=0,
                verbose=0)
    model.learn(40)  # builds everything and steps once
    t0 = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    wall = time.perf_counter() - t0
    env.close()
    return {"steps_per_s": steps / wall, "wall_s": wall}


def _peak() -> dict:
    """Single-thread float32 peak: a large matmul and a Nature-CNN-sized convolution."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(64, 32, 20, 20), torch.randn(64, 32, 4, 4)
    out = {}
    for name, fn, flops in (
        ("matmul", lambda: a @ b, 2 * 1024**3),
        ("conv", lambda: torch.nn.functional.conv2d(x, w, stride=2), 2 * 64 * 81 * 64 * 512),
    ):
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = flops / statistics.median(ts) / 1e9
    return out


def _network_flops(env_id: str) -> float:
    """Multiply-adds x 2 of one forward pass of the default network of ``env_id``."""
    from study.trainer.envs import env_spaces

    hp = Structure.of(cfg.resolve({}, env=env_id))
    obs_space, act_space = env_spaces(env_id, hp)
    layers = cfg.conv_layers(hp, obs_space.shape)
    flops = sum(2 * out * h * w * c_in * k * k for c_in, k, _, out, h, w in layers)
    *_, c, h, w = layers[-1]
    units = cfg.encoder_units(hp)
    flops += 2 * c * h * w * units + 2 * units * (act_space.n + 1)
    return float(flops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minatar-sizes", type=int, nargs="*", default=[1, 16, 64])
    p.add_argument("--ale-sizes", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=20_000, help="env steps per member")
    p.add_argument("--ale-steps", type=int, default=2_000, help="env steps per member on ALE")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-sb3", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    peak = _peak()
    rows = []
    for env_id, sizes, steps in (("MinAtar/Breakout-v1", args.minatar_sizes, args.steps),
                                 ("ALE/Breakout-v5", args.ale_sizes, args.ale_steps)):
        if not sizes:
            continue
        per = {s: [] for s in sizes}
        sb3 = []
        for _ in range(args.repeats):
            for s in sizes:
                per[s].append(_ours(env_id, s, steps, args.device)["steps_per_s"])
            if not args.no_sb3:
                sb3.append(_sb3(env_id, max(steps // 2, 2_000))["steps_per_s"])
        base = statistics.median(sb3) if sb3 else float("nan")
        # A2C's network work per env step: one forward pass (the rollout's, which the
        # update can reuse) and a backward pass of about twice its multiply-adds.
        flops = 3 * _network_flops(env_id)
        for s in sizes:
            med = statistics.median(per[s])
            rows.append({"env": env_id, "S": s, "ours": med, "runs": per[s], "sb3": base,
                         "ratio": med / base, "gflops": med * flops / 1e9})
    print(f"measured single-thread peak: matmul {peak['matmul']:.0f} GFLOP/s, "
          f"conv {peak['conv']:.0f} GFLOP/s (device {args.device})")
    print("| env | S | population env steps/s | SB3 A2C | ratio | network GFLOP/s | of conv peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['env']} | {r['S']} | {r['ours']:,.0f} | {r['sb3']:,.0f} | "
              f"{r['ratio']:.1f}x | {r['gflops']:.1f} | {r['gflops'] / peak['conv']:.0%} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"images_{args.device}.json"
    out.write_text(json.dumps({"peak": peak, "rows": rows, "args": vars(args)}, indent=1,
                              default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
