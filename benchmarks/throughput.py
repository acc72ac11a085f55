"""Env steps/s of a CartPole-v1 population in ONE process with one thread: study's
trainer, a vmapped JAX A2C and SB3's A2C side by side, against the machine's compute floor.

    python benchmarks/throughput.py [--sizes 1 8 64 256] [--seconds 8] [--repeats 3]
                                    [--pin CORE] [--no-sb3] [--no-jax] [--json FILE]

Default hyperparameters everywhere (SB3's A2C: 8 envs, 5-step rollouts, separate 64-64
tanh networks, RMSprop). For each population size S:

* study's trainer (one torch thread) trains S seeds for a number of env steps per seed
  calibrated to take about ``--seconds`` (after a short run that also warms it up);
* the JAX A2C of benchmarks/_jax_a2c.py (``jax.jit(jax.vmap(train))`` over S seeds,
  CartPole-v1 written in JAX, XLA single-threaded) trains S seeds for the same number of steps
  per seed. It is compiled once per S for that length (``lax.scan``'s length is static);
  the compile time is reported apart and left out of its rate;
* SB3's A2C (one run, ``--sb3-steps``) gives the speed-up column.

Repeats are interleaved (for each repeat, for each S: study, then JAX) so that the
machine's noise hits both alike; rates are medians over ``--repeats``. The compute floor
is the measured single-thread float32 matmul peak divided by the matmul FLOPs of one env
step of this A2C (:func:`flops_per_env_step`); each rate is also shown as a fraction of it.

``--pin CORE`` pins the process (torch, XLA and their threads) to one core before any
computation starts; XLA's CPU thread pool is sized by the cores the process may use when
its backend starts. The JAX columns need the optional extra: ``pip install -e ".[jax]"``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from study import config as cfg
from study.trainer.population import Member, train_population

try:
    from _sb3 import run_sb3_a2c, sb3_available
except ImportError:  # run as a module
    from benchmarks._sb3 import run_sb3_a2c, sb3_available

JAX_EXTRA = 'pip install -e ".[jax]"'
ROLLOUT_MULTIPLE = 40  # env steps per member are whole rollouts (8 envs x 5 steps)


# ------------------------------------------------------------------ the compute floor


def mlp_macs(sizes: Sequence[int]) -> tuple[int, int]:
    """Multiply-adds of one row through an MLP with layer widths ``sizes``: all layers,
    and all but the first (whose input gradient nobody needs)."""
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return sum(macs), sum(macs[1:])


def flops_per_env_step(hp: dict[str, Any], obs_dim: int = 4, n_actions: int = 2) -> float:
    """Matmul FLOPs of one env step of A2C with separate policy and value MLPs, counting a
    multiply-add as 2 FLOPs:

        F = 2 [P + V (T + 1) / T]   forward: policy and value over the rollout, and V(s_T)
          + 2 [P + V]               backward: weight gradients
          + 2 [P' + V']             backward: input gradients, the first layer's excluded

    with P = sum_l d_(l-1) d_l the multiply-adds of the policy's layers, V those of the
    value network, P' and V' the same sums without the first layer, and T the rollout
    length. For 4-64-64-2 and 4-64-64-1 (P = 4480, V = 4416, P' = 4224, V' = 4160) and
    T = 5: F = 19,558 + 17,792 + 16,768 = 54,118. Biases, activations, the softmax, the
    optimizer and the environment are left out, and so are the forward passes an
    implementation may repeat (JAX recomputes the policy's inside its gradient): this is
    the least matmul work the algorithm needs.
    """
    p, p_in = mlp_macs([obs_dim, *hp["policy_hidden_sizes"], n_actions])
    v, v_in = mlp_macs([obs_dim, *hp["value_hidden_sizes"], 1])
    t = hp["n_steps"]
    return 2 * (p + v * (t + 1) / t) + 2 * (p + v) + 2 * (p_in + v_in)


def matmul_peak(sizes: Sequence[int] = (256, 512), trials: int = 15, reps: int = 20) -> float:
    """Single-thread float32 matmul FLOP/s: the best, over n in ``sizes``, of ``trials``
    timings of ``reps`` ``n x n @ n x n`` products (torch, its thread count already 1).
    Both sizes, because a neighbour's memory traffic slows 512 (3 MiB of operands) more
    than 256 (in L2) on a shared machine, and the floor wants the compute peak."""
    best = math.inf
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / reps / (2 * n**3))
    return 1 / best


# ------------------------------------------------------------------ the three trainers


def calibrate_study(env_id: str, size: int, seconds: float, device: str) -> int:
    """Env steps per member for a run of about ``seconds``, in whole rollouts: from the
    second of two short runs (the first warms up compiled kernels and allocations)."""
    members = [Member(cfg.resolve({}), s) for s in range(size)]
    train_population(env_id, members, 2000, log_every=10_000, device=device)
    t0 = time.perf_counter()
    train_population(env_id, members, 2000, log_every=10_000, device=device)
    rate = 2000 * size / (time.perf_counter() - t0)
    return max(4000, int(rate * seconds / size) // ROLLOUT_MULTIPLE * ROLLOUT_MULTIPLE)


def run_study(env_id: str, size: int, steps: int, device: str) -> tuple[float, list[float]]:
    """Env steps/s of one run of S = ``size`` seeds for ``steps`` steps each, and the
    seeds' final returns."""
    members = [Member(cfg.resolve({}), s) for s in range(size)]
    t0 = time.perf_counter()
    results = train_population(env_id, members, steps, log_every=10_000, device=device)
    rate = steps * size / (time.perf_counter() - t0)
    return rate, [r.final_return for r in results]


def jax_missing() -> list[str]:
    """The JAX A2C's packages that are not installed."""
    return [m for m in ("jax", "optax") if importlib.util.find_spec(m) is None]


def pin_process(core: int | None) -> None:
    """Pin this process to ``core`` (if given) and ask XLA for a single-threaded CPU
    runtime; must run before any torch or JAX computation."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    flag = "--xla_cpu_multi_thread_eigen=false"  # as _jax_a2c.SINGLE_THREAD_XLA_FLAGS
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    torch.set_num_threads(1)


# ------------------------------------------------------------------ report


def _median(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return statistics.median(finite) if finite else math.nan


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def print_report(args: argparse.Namespace, rows: list[dict[str, Any]], summary: dict[str, Any]
                 ) -> None:
    """The Markdown tables and the lines around them."""
    jax_v = summary["versions"].get("jax")
    print(f"# Throughput: {args.env}, default hyperparameters, 1 thread, {args.device}")
    print(f"machine: {summary['machine']}, torch {torch.__version__}"
          + (f", jax {jax_v}" if jax_v else "")
          + (f", pinned to core {args.pin}" if args.pin is not None else ", not pinned"))
    print(f"\nMedians of {args.repeats} interleaved runs per size (study, then JAX); "
          "JAX rates leave compilation out.\n")
    print("| S | study env steps/s | JAX env steps/s | study/JAX | SB3 x "
          "| fraction of floor (study) | fraction of floor (JAX) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    floor = summary["floor_env_steps_per_s"]
    sb3 = summary["sb3_steps_per_s"]
    if sb3:
        print(f"| SB3 A2C (1 run) | {sb3:,.0f} | | | 1.0x | {sb3 / floor:.2%} | |")
    for r in rows:
        sb3_x = "n/a" if r["speedup_vs_sb3"] is None else f"{r['speedup_vs_sb3']:.1f}x"
        print(f"| {r['S']} | {r['study_env_steps_per_s']:,.0f} "
              f"| {_fmt(r['jax_env_steps_per_s'], ',.0f')} | {_fmt(r['study_over_jax'], '.2f')} "
              f"| {sb3_x} | {r['study_fraction_of_floor']:.2%} "
              f"| {_fmt(r['jax_fraction_of_floor'], '.2%')} |")
    print("\n| S | env steps per seed | JAX compile (s) | study median final return "
          "| JAX median final return |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['S']} | {r['steps_per_member']:,} | {_fmt(r['jax_compile_s'], '.1f')} "
              f"| {_fmt(r['study_median_final_return'], '.1f')} "
              f"| {_fmt(r['jax_median_final_return'], '.1f')} |")
    print(f"\nFLOPs per env step (matmuls): {summary['flops_per_env_step']:,.0f}")
    print(f"single-thread float32 matmul peak (torch, best of n x n @ n x n, n = 256, 512): "
          f"{summary['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"compute floor: {floor:,.0f} env steps/s (peak / FLOPs per step)")
    if summary["jax_skipped"]:
        print(f"JAX A2C skipped: {summary['jax_skipped']}")
    if sb3:
        print(f"SB3 A2C final return (1 seed, {args.sb3_steps:,} steps): "
              f"{summary['sb3_final_return']:.1f}")
    print("final return: mean return of the episodes that ended in a seed's last 10% of "
          "env steps (runs as long as the timed ones, so short runs have not learnt yet)")


# ------------------------------------------------------------------ main


@dataclass
class Size:
    """The measurements of one population size S."""

    steps: int  # env steps per seed of every timed run
    study_rates: list[float] = field(default_factory=list)
    jax_rates: list[float] = field(default_factory=list)
    study_finals: list[float] = field(default_factory=list)  # one run: repeats are identical
    jax_finals: list[float] = field(default_factory=list)  # every run: other seeds each
    jax_compile_s: float | None = None

    def row(self, size: int, floor: float, sb3_rate: float | None) -> dict[str, Any]:
        """The figures of this size, for the table and the JSON file."""
        study = statistics.median(self.study_rates)
        jx = statistics.median(self.jax_rates) if self.jax_rates else None
        return {
            "S": size, "steps_per_member": self.steps,
            "study_env_steps_per_s": study, "study_runs_env_steps_per_s": self.study_rates,
            "jax_env_steps_per_s": jx, "jax_runs_env_steps_per_s": self.jax_rates,
            "study_over_jax": study / jx if jx else None,
            "speedup_vs_sb3": study / sb3_rate if sb3_rate else None,
            "jax_speedup_vs_sb3": jx / sb3_rate if jx and sb3_rate else None,
            "study_fraction_of_floor": study / floor,
            "jax_fraction_of_floor": jx / floor if jx else None,
            "jax_compile_s": self.jax_compile_s,
            "study_median_final_return": _median(self.study_finals),
            "jax_median_final_return": _median(self.jax_finals) if jx else None,
            "study_final_returns": self.study_finals, "jax_final_returns": self.jax_finals,
        }  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--seconds", type=float, default=8.0, help="target time per study run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per size (median shown)")
    p.add_argument("--sb3-steps", type=int, default=20_000)
    p.add_argument("--no-sb3", action="store_true")
    p.add_argument("--no-jax", action="store_true", help="leave the JAX A2C out")
    p.add_argument("--pin", type=int, metavar="CORE", help="run on this CPU core only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.repeats < 1 or args.seconds <= 0 or min(args.sizes) < 1:
        p.error("--repeats and --sizes take integers >= 1, --seconds a number > 0")
    return args


def load_jax_a2c(args: argparse.Namespace) -> tuple[Any, str | None]:
    """benchmarks/_jax_a2c.py as a module, or None and why it is left out."""
    if args.no_jax:
        return None, "--no-jax"
    if args.env != "CartPole-v1":
        return None, "runs CartPole-v1 only"
    if missing := jax_missing():
        return None, f"{', '.join(missing)} not installed: {JAX_EXTRA}"
    try:
        import _jax_a2c as jax_a2c
    except ImportError:  # run as a module
        from benchmarks import _jax_a2c as jax_a2c
    return jax_a2c, None


def measure(args: argparse.Namespace, jax_a2c: Any) -> dict[int, Size]:
    """Calibrate study per S and compile the JAX program for the same length, then the
    interleaved timed runs: for each repeat, for each S, study then JAX."""
    sizes = {s: Size(calibrate_study(args.env, s, args.seconds, args.device))
             for s in args.sizes}
    pops: dict[int, Any] = {}
    if jax_a2c is not None:
        for s, m in sizes.items():
            pops[s] = jax_a2c.Population.compile(
                jax_a2c.A2CConfig.from_hyperparameters(cfg.resolve({}), m.steps), s)
            m.jax_compile_s = pops[s].compile_s
            print(f"JAX A2C S={s}: compiled in {m.jax_compile_s:.1f} s", flush=True)
    for rep in range(args.repeats):
        for s, m in sizes.items():
            rate, m.study_finals = run_study(args.env, s, m.steps, args.device)
            m.study_rates.append(rate)
            if s in pops:
                wall, finals = pops[s].run(seed=rep)
                m.jax_rates.append(pops[s].env_steps / wall)
                m.jax_finals += [float(x) for x in finals]
    return sizes


def main() -> None:
    args = parse_args()
    pin_process(args.pin)  # before any computation
    hp = cfg.resolve({})
    flops, peak = flops_per_env_step(hp), matmul_peak()
    summary: dict[str, Any] = {
        "env": args.env, "machine": platform.processor() or platform.machine(),
        "pinned_core": args.pin, "repeats": args.repeats, "xla_flags": os.environ["XLA_FLAGS"],
        "versions": {"torch": torch.__version__}, "flops_per_env_step": flops,
        "matmul_peak_flops": peak, "floor_env_steps_per_s": peak / flops,
        "sb3_steps_per_s": None, "sb3_final_return": None, "jax_skipped": None,
    }  # fmt: skip

    if not args.no_sb3 and not sb3_available():
        print('SB3 A2C skipped: stable-baselines3 not installed: pip install -e ".[bench]"')
    elif not args.no_sb3:
        sb3 = run_sb3_a2c(args.env, 0, args.sb3_steps, hp)
        summary["sb3_steps_per_s"] = sb3["steps_per_s"]
        summary["sb3_final_return"] = sb3["final_return"]
    jax_a2c, summary["jax_skipped"] = load_jax_a2c(args)
    if jax_a2c is None:
        print(f"JAX A2C skipped: {summary['jax_skipped']}")
    else:
        summary["versions"].update(
            {m: importlib.metadata.version(m) for m in ("jax", "jaxlib", "optax")})

    sizes = measure(args, jax_a2c)
    rows = [m.row(s, summary["floor_env_steps_per_s"], summary["sb3_steps_per_s"])
            for s, m in sizes.items()]
    print_report(args, rows, summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
