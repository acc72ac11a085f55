"""Where the compiled A2C loop spends its time, by numba function, with Linux ``perf``.

    NUMBA_CACHE_DIR=$(mktemp -d) perf record -o loop.data \\
        python benchmarks/profile_loop.py [--members 64] [--steps 200000]
    perf report -i loop.data --no-children --sort dso,symbol

``perf`` sees numba's compiled code as anonymous memory. After a warm-up run this script
writes ``/tmp/perf-<pid>.map`` (the format ``perf report`` reads for JIT code): the address
and size of every function in the compiled libraries of study's numba modules. numba keeps
a library's functions only when it compiled them in this process, not when it loaded them
from its cache: hence the empty ``NUMBA_CACHE_DIR`` (the first run compiles for about two
minutes). Functions inlined into others count as their callers.
"""

from __future__ import annotations

import argparse
import os
import time
from types import ModuleType

from numba.core.registry import CPUDispatcher

from study import config as cfg
from study.trainer import compiled, compiled_a2c, kernels, rng, views
from study.trainer.envs import cartpole
from study.trainer.population import Member, train_population


def write_perf_map(modules: list[ModuleType]) -> int:
    """``/tmp/perf-<pid>.map`` for the compiled functions of these modules' dispatchers;
    returns how many functions it names."""
    names: dict[int, str] = {}
    for module in modules:
        for obj in vars(module).values():
            if not isinstance(obj, CPUDispatcher):
                continue
            for cres in obj.overloads.values():
                library = cres.library  # type: ignore[attr-defined]
                for fn in library._final_module.functions:  # empty when loaded from the cache
                    if not fn.is_declaration:
                        address = library.get_pointer_to_function(fn.name)
                        if address:
                            names[address] = fn.name
    starts = sorted(names)
    if not starts:
        return 0
    with open(f"/tmp/perf-{os.getpid()}.map", "w") as f:
        for start, end in zip(starts, [*starts[1:], starts[-1] + 4096], strict=True):
            size = end - start if end - start < 1 << 20 else 4096
            f.write(f"{start:x} {size:x} {names[start]}\n")
    return len(starts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--steps", type=int, default=200_000, help="env steps per member")
    args = p.parse_args()
    members = [Member(cfg.resolve({}), s) for s in range(args.members)]
    train_population("CartPole-v1", members, 2000, log_every=10_000)  # compiles
    n = write_perf_map([compiled, compiled_a2c, kernels, rng, views, cartpole])
    print(f"perf map: {n} functions")
    start = time.perf_counter()
    train_population("CartPole-v1", members, args.steps, log_every=10_000)
    rate = args.steps * args.members / (time.perf_counter() - start)
    print(f"{rate:,.0f} env steps/s")


if __name__ == "__main__":
    main()
