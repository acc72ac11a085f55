"""Memory per environment instance on the generic path: the estimate against the real cost.

    python benchmarks/env_memory.py [--envs ALE/Breakout-v5 MinAtar/Breakout-v1 Hopper-v5]

For each env (skipped when its extra is not installed): ``study.trainer.envs.memory.instance_bytes``
(what populations are checked against before they are built) next to the resident-memory
growth of building and resetting a real 8 x 8 population, per instance, and the time it
took. Each env is measured in a fresh process, so one env's allocations do not hide
another's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

DEFAULT_ENVS = ("ALE/Breakout-v5", "MinAtar/Breakout-v1", "Hopper-v5", "HalfCheetah-v5",
                "Ant-v5")

_ONE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
from study.config import ConfigError
from study.trainer.envs import make_population_env
from study.trainer.envs.memory import _rss_bytes, instance_bytes
env_id = sys.argv[1]
try:
    estimate = instance_bytes(env_id)
except ConfigError as e:
    print(json.dumps({"env": env_id, "skipped": str(e)}))
    raise SystemExit(0)
before, t0 = _rss_bytes(), time.perf_counter()
pop = make_population_env(env_id, list(range(8)), 8)
pop.reset()
wall, after = time.perf_counter() - t0, _rss_bytes()
print(json.dumps({"env": env_id, "estimate": estimate, "measured": (after - before) / 64,
                  "build_s_per_instance": wall / 64}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--envs", nargs="+", default=list(DEFAULT_ENVS))
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    rows = []
    for env_id in args.envs:
        out = subprocess.run([sys.executable, "-c", _ONE, env_id], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| env | estimate per instance | measured per instance (8 x 8) | per member (8 envs) "
          "| build time per instance |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['env']} | skipped: {r['skipped']} | | | |")
            continue
        mib = 2**20
        print(f"| {r['env']} | {r['estimate'] / mib:.2f} MiB | {r['measured'] / mib:.2f} MiB | "
              f"{8 * r['measured'] / mib:.1f} MiB | {r['build_s_per_instance'] * 1e3:.1f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
