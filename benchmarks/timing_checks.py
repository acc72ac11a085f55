"""Checks that measure time or OS counters: out of the test suite, whose verdicts must not
depend on how busy the machine is.

    python benchmarks/timing_checks.py            # both checks; exit 1 if one fails
    python benchmarks/timing_checks.py --only failures

``failures``: ``study.analysis.failures.failure_report`` on 400 synthetic runs x 300 curve points
(40 configs, trapped, still-learning and successful seeds) must take under 5 s: the
classification is one vectorized pass over all curves, not a loop over points (the full
analysis benchmark, ``benchmarks/analysis.py``, times 1,000 x 500). It also checks the
labels it found (20 trapped, 80 still learning).

``page-faults`` (Linux, glibc): ``study.trainer.alloc.keep_freed_memory`` stops glibc from
returning freed blocks to the OS, so reallocating the same 8 MiB fifty times faults
fewer than 200 pages, against more than 50,000 without it (about 2,000 per round).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(extra))

FAILURES_LIMIT_S = 5.0

_FAULTS = """
import resource, numpy as np
from study.trainer.alloc import keep_freed_memory
if {keep}:
    assert keep_freed_memory() and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    blocks = [np.ones(1 << 18) for _ in range(4)]  # 4 x 2 MiB, then all freed
before = faults()
for _ in range(50):
    blocks = [np.ones(1 << 18) for _ in range(4)]
    del blocks
print(faults() - before)
"""


def check_failures_speed() -> tuple[bool, str]:
    from test_failures import make_sweep  # the test suite's synthetic sweeps

    from study.analysis.failures import failure_report

    spec = [(f"c{i:02d}", {"policy_lr": 10.0 ** -(i % 4)},
             [("success", 300)] * 7 + [("trapped", -28)] * (i % 2) + [("learning", 300)] * 2)
            for i in range(40)]
    runs, curves = make_sweep(spec, seed=6, n_points=300)
    t0 = time.perf_counter()
    rep = failure_report(runs, curves)
    wall = time.perf_counter() - t0
    counts = rep.counts
    ok = wall < FAILURES_LIMIT_S and counts["trapped"] == 20 and counts["learning"] == 80
    return ok, (f"failure_report on {len(runs)} runs x 300 points: {wall:.2f} s (limit "
                f"{FAILURES_LIMIT_S:.0f} s); {counts['trapped']} trapped (expected 20), "
                f"{counts['learning']} learning (expected 80)")


def check_page_faults() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return True, "page faults: skipped (glibc malloc only)"

    def faults(keep: bool) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS.format(keep=keep)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        return int(out.stdout)

    without, with_ = faults(False), faults(True)
    ok = without > 50 * 1000 and with_ < 200
    return ok, (f"page faults of 50 reallocations of 8 MiB: {without:,} without "
                f"keep_freed_memory (expected > 50,000), {with_:,} with it (expected < 200)")


CHECKS = {"failures": check_failures_speed, "page-faults": check_page_faults}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(CHECKS), help="run one check")
    args = ap.parse_args(argv)
    failed = 0
    for name, check in CHECKS.items():
        if args.only and name != args.only:
            continue
        ok, line = check()
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
