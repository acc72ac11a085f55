"""``python -m study.train``: one configuration, many seeds, trained now as one population.

    python -m study.train --env CartPole-v1 --seeds 0-63 --total-steps 100000 \\
        --set policy_lr=1e-3 --set gamma=0.995 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from study import config as cfg
from study.cli_util import ArgumentParser, run_cli
from study.sweeps.spec import MAX_STEPS, Budget


def parse_seeds(text: str) -> list[int]:
    """``"0-63"``, ``"1,5,9"`` or mixes such as ``"0-3,10"`` -> a list of distinct seeds."""
    usage = (f"--seeds {text!r} is invalid: expected non-negative integers and ranges such as "
             "0-63, 1,5,9 or 0-3,10")
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            a, b = int(lo), int(hi if sep else lo)
        except ValueError:
            raise cfg.ConfigError(usage) from None
        if b < a:
            raise cfg.ConfigError(f"--seeds {text!r} is invalid: the range {part} is reversed; "
                                  f"expected {b}-{a}")
        if len(seeds) + b - a >= MAX_SEEDS:
            raise cfg.ConfigError(f"--seeds {text!r} is invalid: more than {MAX_SEEDS:,} seeds "
                                  f"(run larger studies as a sweep: python -m study.grid)")
        seeds.extend(range(a, b + 1))
    if not seeds or min(seeds) < 0:
        raise cfg.ConfigError(usage)
    dup = sorted(s for s, n in collections.Counter(seeds).items() if n > 1)
    if dup:
        raise cfg.ConfigError(f"--seeds {text!r} is invalid: duplicate seed(s) {dup[:5]}")
    return seeds


#: At most this many seeds in one population (one process); sweeps spread more over many.
MAX_SEEDS = 100_000


def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _positive_int(name: str, value: str) -> int:
    try:
        v = int(str(value).replace("_", ""))
    except ValueError:
        v = -1
    if not 1 <= v <= MAX_STEPS:
        raise cfg.ConfigError(f"{name} {value!r} is invalid: expected an integer in "
                              f"[1, {MAX_STEPS:_}]")
    return v


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="study.train", description=__doc__.split("\n")[0])
    p.add_argument("--env", default="CartPole-v1", help="gymnasium env id (default CartPole-v1)")
    p.add_argument("--seeds", default="0-7", help="e.g. 0-63, 1,5,9 (default 0-7)")
    p.add_argument("--total-steps", default="100000", help="env steps per seed")
    p.add_argument("--log-every", default="1000", help="env steps between curve points")
    p.add_argument("--eval-every", default="0", help="env steps between evaluations (0: none)")
    p.add_argument("--eval-episodes", default="10", help="episodes per evaluation")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override (repeatable); keys: " + ", ".join(cfg.NAMES),
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _budget(args: argparse.Namespace) -> Budget:
    return Budget(
        total_steps=_positive_int("--total-steps", args.total_steps),
        log_every=_positive_int("--log-every", args.log_every),
        eval_every=(0 if str(args.eval_every) == "0"
                    else _positive_int("--eval-every", args.eval_every)),
        eval_episodes=_positive_int("--eval-episodes", args.eval_episodes),
    )


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    budget = _budget(args)
    seeds = parse_seeds(args.seeds)
    hp = cfg.resolve(cfg.parse_set(args.set), where="--set: ", env=args.env)
    if args.device != "cpu":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise cfg.ConfigError(f"--device {args.device!r} is invalid: CUDA is not available")
    results, wall, env_steps = _train(args, hp, seeds, budget)
    _print_summary(results, budget.eval_every > 0, wall, env_steps)
    if args.json:
        _write_json(args.json, args.env, budget, hp, results, wall, env_steps)
    return 0


def _train(args: argparse.Namespace, hp: dict[str, Any], seeds: Sequence[int],
           budget: Budget) -> tuple[list[Any], float, int]:
    """Train every seed as one population with a progress bar: (results, wall seconds,
    env steps trained)."""
    # Imported late so that bad input fails fast without paying for torch start-up twice.
    import torch

    from study.sweeps.executors import Bar, announce_compilation
    from study.trainer.envs import env_spaces
    from study.trainer.envs.memory import check_fits
    from study.trainer.population import Member, train_population

    env_spaces(args.env)  # validates the env id and its spaces before anything runs
    check_fits([(args.env, hp, len(seeds))], fewer="the number of --seeds")
    torch.set_num_threads(1)
    n_batch = hp["num_envs"] * hp["n_steps"]
    env_steps = math.ceil(budget.total_steps / n_batch) * n_batch * len(seeds)
    if not args.quiet:
        announce_compilation()
    bar = Bar(env_steps, enabled=not args.quiet, label=f"{args.env} x{len(seeds)}")
    t0 = time.perf_counter()
    try:
        results = train_population(args.env, [Member(hp, s) for s in seeds],
                                   budget.total_steps, **budget.train_kwargs(),
                                   device=args.device, on_progress=bar.advance)
    finally:
        bar.close()
    return results, time.perf_counter() - t0, env_steps


def _print_summary(results: Sequence[Any], has_eval: bool, wall: float,
                   env_steps: int) -> None:
    """The seed table, the median and IQR of final returns, and the throughput."""
    header = (
        f"{'seed':>10}  {'final_return':>12}  "
        + (f"{'final_eval':>10}  " if has_eval else "")
        + "status"
    )
    print(header)
    for r in results:
        line = f"{r.seed:>10}  {_fmt(r.final_return):>12}  "
        if has_eval:
            line += f"{_fmt(r.final_eval_return):>10}  "
        print(line + r.status)
    finals = np.array([r.final_return for r in results], dtype=float)
    finite = finals[np.isfinite(finals)]
    if finite.size:
        q25, med, q75 = np.percentile(finite, [25, 50, 75])
        print(
            f"final_return over {finite.size} seeds: median {med:.2f}, IQR [{q25:.2f}, "
            f"{q75:.2f}] ({q75 - q25:.2f})"
        )
    n_div = sum(r.status == "diverged" for r in results)
    if n_div:
        print(f"{n_div} of {len(results)} seeds diverged")
    print(f"{env_steps:,} env steps in {wall:.1f} s ({env_steps / wall:,.0f} steps/s)")


def _write_json(path: str, env: str, budget: Budget, hp: dict[str, Any],
                results: Sequence[Any], wall: float, env_steps: int) -> None:
    def num(x: float) -> float | None:
        return float(x) if x is not None and math.isfinite(x) else None

    payload = {
        "env": env,
        "total_steps": budget.total_steps,
        "hyperparameters": cfg.to_jsonable(hp),
        "wall_s": wall,
        "env_steps_per_s": env_steps / wall,
        "runs": [
            {
                "seed": r.seed,
                "final_return": num(r.final_return),
                "final_eval_return": num(r.final_eval_return),
                "status": r.status,
                "diverged_at_step": r.diverged_at_step,
                "curve": [
                    [int(s), num(v)]
                    for s, v in zip(r.curve["step"], r.curve["episode_return"], strict=True)
                ],
            }
            for r in results
        ],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
