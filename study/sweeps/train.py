"""``python -m study.train``: one configuration, many seeds, trained now as one population.

    python -m study.train --env CartPole-v1 --seeds 0-63 --total-steps 100000 \\
        --set policy_lr=1e-3 --set gamma=0.995 --json out.json
"""

from __future__ import annotations

import collections
import json
import math
import sys
import time
from collections.abc import Sequence

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


def _main(argv: Sequence[str] | None) -> int:
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
    args = p.parse_args(argv)

    budget = Budget(
        total_steps=_positive_int("--total-steps", args.total_steps),
        log_every=_positive_int("--log-every", args.log_every),
        eval_every=(0 if str(args.eval_every) == "0"
                    else _positive_int("--eval-every", args.eval_every)),
        eval_episodes=_positive_int("--eval-episodes", args.eval_episodes),
    )
    seeds = parse_seeds(args.seeds)
    hp = cfg.resolve(cfg.parse_set(args.set), where="--set: ", env=args.env)
    if args.device != "cpu":
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise cfg.ConfigError(f"--device {args.device!r} is invalid: CUDA is not available")

    # Imported late so that bad input fails fast without paying for torch start-up twice.
    import torch

    from study.trainer.envs import env_spaces
    from study.trainer.envs.memory import check_fits
    from study.trainer.population import Member, train_population

    env_spaces(args.env)  # validates the env id and its spaces before anything runs
    check_fits([(args.env, hp, len(seeds))], fewer="the number of --seeds")
    torch.set_num_threads(1)
    members = [Member(hp, s) for s in seeds]
    n_batch = hp["num_envs"] * hp["n_steps"]
    effective = math.ceil(budget.total_steps / n_batch) * n_batch

    from tqdm import tqdm

    from study.trainer import kernels

    if not args.quiet and kernels.cold_cache():
        print("compiling the numba kernels (once after an install; the first progress "
              "figures include it)", file=sys.stderr, flush=True)

    bar = tqdm(
        total=effective * len(seeds),
        unit="step",
        unit_scale=True,
        file=sys.stderr,
        disable=args.quiet,
        desc=f"{args.env} x{len(seeds)}",
        smoothing=0.1,
        mininterval=0.5,
    )
    t0 = time.perf_counter()
    try:
        results = train_population(
            args.env,
            members,
            budget.total_steps,
            **budget.train_kwargs(),
            device=args.device,
            on_progress=bar.update,
        )
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    steps_per_s = effective * len(seeds) / wall

    has_eval = budget.eval_every > 0
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
    print(f"{effective * len(seeds):,} env steps in {wall:.1f} s ({steps_per_s:,.0f} steps/s)")

    if args.json:

        def num(x: float) -> float | None:
            return float(x) if x is not None and math.isfinite(x) else None

        payload = {
            "env": args.env,
            "total_steps": budget.total_steps,
            "hyperparameters": cfg.to_jsonable(hp),
            "wall_s": wall,
            "env_steps_per_s": steps_per_s,
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
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
